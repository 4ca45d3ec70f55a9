//! Options of the [`Upgrader`](crate::Upgrader).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::bind::{ListenSpec, SetupHook};

/// How long a new generation may take to become ready before it is killed.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `#[tableflip::main]` service waits for its tasks to finish
/// when it drains.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The default `listen(2)` backlog of fresh stream sockets (tokio's too).
pub const DEFAULT_BACKLOG: u32 = 1024;

/// Controls the behaviour of an [`Upgrader`](crate::Upgrader).
///
/// ```
/// use std::time::Duration;
/// use tableflip::Options;
///
/// let opts = Options {
///     upgrade_timeout: Duration::from_secs(10),
///     pid_file: Some("/run/my-service.pid".into()),
///     ..Options::default()
/// };
/// # let _ = opts;
/// ```
///
/// Build it with struct-update syntax from [`Options::default()`]; new
/// fields are added only with a default, so such code keeps compiling.
#[derive(Clone)]
pub struct Options {
    /// How long the new generation has to become ready before it is killed
    /// and the upgrade fails. Default: 60 s.
    pub upgrade_timeout: Duration,
    /// Where to write this process's PID once it is ready, replacing the
    /// file atomically. A relative path is relative to the directory the
    /// service started in. Default: none.
    pub pid_file: Option<PathBuf>,
    /// How long a `#[tableflip::main]` service waits, once it drains, for
    /// the tasks it started with `Context::spawn`. Not used by the
    /// `Upgrader` itself. Default: 30 s.
    pub drain_timeout: Duration,
    /// The `listen(2)` backlog of fresh stream sockets. Default: 1024.
    pub backlog: u32,
    /// A hook run on every socket this process creates afresh, before it is
    /// bound (never on inherited sockets). Default: none.
    pub socket_setup: Option<SetupHook>,
    /// The executable to run as the next generation. Default: `None`, which
    /// runs the path that named this program's executable when it
    /// started (the path given to `execve`, else `argv[0]` resolved
    /// against the start directory or `PATH`, but only if it names the
    /// running binary; else the running binary's own path), resolved again
    /// at upgrade time, so a binary replaced at that path is what runs
    /// next. A relative path is relative to the start directory.
    pub executable: Option<PathBuf>,
    /// Raise the soft limit of open files (`RLIMIT_NOFILE`) to the hard
    /// limit when the upgrader is created, as Go's runtime does since Go
    /// 1.19: an upgrade briefly needs a second fd for each listener (see
    /// [`Fds`](crate::Fds)), and the usual soft limit of 1024 would cap a
    /// service at about 500 listeners. The raised limit is inherited by
    /// processes the service starts; turn this off for a program that
    /// uses `select(2)` or starts such programs. Default: `true`.
    pub raise_fd_limit: bool,
}

impl Options {
    /// Sets [`socket_setup`](Self::socket_setup) from a closure.
    #[must_use]
    pub fn with_socket_setup(
        mut self,
        hook: impl Fn(&socket2::Socket, &ListenSpec) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.socket_setup = Some(Arc::new(hook));
        self
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            pid_file: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            backlog: DEFAULT_BACKLOG,
            socket_setup: None,
            executable: None,
            raise_fd_limit: true,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("upgrade_timeout", &self.upgrade_timeout)
            .field("pid_file", &self.pid_file)
            .field("drain_timeout", &self.drain_timeout)
            .field("backlog", &self.backlog)
            .field("socket_setup", &self.socket_setup.as_ref().map(|_| "Fn"))
            .field("executable", &self.executable)
            .field("raise_fd_limit", &self.raise_fd_limit)
            .finish()
    }
}
