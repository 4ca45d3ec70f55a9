//! Options of the [`Upgrader`](crate::Upgrader).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::bind::{ListenSpec, SetupHook};
use crate::mode::Mode;

/// How long a new generation may take to become ready before it is killed.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `#[tableflip::main]` service waits for its tasks to finish
/// when it drains.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The default `listen(2)` backlog of fresh stream sockets (tokio's too).
pub const DEFAULT_BACKLOG: u32 = 1024;

/// Controls the behaviour of an [`Upgrader`](crate::Upgrader).
///
/// Built from [`Options::new()`] (the defaults) with chained setters, as
/// tokio's `runtime::Builder`; options added later get a default and a
/// setter, so such code keeps compiling.
///
/// ```
/// use std::time::Duration;
/// use tableflip::Options;
///
/// let opts = Options::new()
///     .upgrade_timeout(Duration::from_secs(10))
///     .pid_file("/run/my-service/pid");
/// # let _ = opts;
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) upgrade_timeout: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) drain_timeout: Duration,
    pub(crate) stop_delay: Duration,
    pub(crate) upgrade_signal: UpgradeSignal,
    pub(crate) backlog: u32,
    pub(crate) socket_setup: Option<SetupHook>,
    pub(crate) executable: Option<PathBuf>,
    pub(crate) raise_fd_limit: bool,
    /// `None`: not chosen; `Upgrader::new` takes [`Mode::Replace`],
    /// `#[tableflip::main]` its own default.
    pub(crate) mode: Option<Mode>,
    pub(crate) control_socket: crate::ctl::ControlSocket,
    /// `None`: the drain timeout.
    pub(crate) probation: Option<Duration>,
}

impl Options {
    /// The defaults: see each setter.
    pub fn new() -> Options {
        Options {
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            pid_file: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            stop_delay: Duration::ZERO,
            upgrade_signal: UpgradeSignal::Hup,
            backlog: DEFAULT_BACKLOG,
            socket_setup: None,
            executable: None,
            raise_fd_limit: true,
            mode: None,
            control_socket: crate::ctl::ControlSocket::Auto,
            probation: None,
        }
    }

    /// How long the new generation has to become ready before it is killed
    /// and the upgrade fails. Default: 60 s ([`DEFAULT_UPGRADE_TIMEOUT`]).
    #[must_use]
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// Where to write this process's PID once it is ready, replacing the
    /// file atomically; a relative path is relative to the directory the
    /// service started in. Keep it in a directory of the service's own
    /// (`/run/<service>/`, systemd's `RuntimeDirectory=`), not a shared
    /// one such as `/tmp`. Default: none.
    #[must_use]
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// How long a `#[tableflip::main]` service waits, once it drains, for
    /// the tasks it started with `Context::spawn`. Not used by the
    /// `Upgrader` itself. Default: 30 s ([`DEFAULT_DRAIN_TIMEOUT`]).
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// A lame-duck stop: how long a `#[tableflip::main]` service (and, in
    /// supervised mode, its supervisor) keeps accepting after its first
    /// `SIGTERM` or `SIGINT`, before it drains. It reports itself as
    /// stopping meanwhile (`STOPPING=1` and `STATUS=` to systemd, and in
    /// the log) and starts no upgrade; a second stop signal ends the delay
    /// at once (a third exits at once). For load balancers that stop
    /// sending new connections only some time after the stop begins (a
    /// Kubernetes pod's endpoints are removed asynchronously). Not used
    /// after an upgrade: a generation that drains because its successor
    /// took over stops accepting at once. Default: 0 (drain at once).
    #[must_use]
    pub fn stop_delay(mut self, delay: Duration) -> Self {
        self.stop_delay = delay;
        self
    }

    /// The signal that upgrades a `#[tableflip::main]` service (and, in
    /// supervised mode, the supervisor): `SIGHUP` by default, as in Go's
    /// tableflip; `SIGUSR2` as nginx; or none, for upgrades only through
    /// [`Upgrader::upgrade`](crate::Upgrader::upgrade). The signals it
    /// leaves are the application's: it handles them itself (with
    /// `tokio::signal`), and in supervised mode the supervisor forwards
    /// `SIGHUP`, `SIGUSR1` and `SIGUSR2` to the serving generation. A
    /// process that does not handle a signal it gets dies of it (the
    /// supervisor then replaces the generation).
    #[must_use]
    pub fn upgrade_signal(mut self, signal: UpgradeSignal) -> Self {
        self.upgrade_signal = signal;
        self
    }

    /// The `listen(2)` backlog of fresh stream sockets. Default: 1024
    /// ([`DEFAULT_BACKLOG`]).
    #[must_use]
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// A hook run on every socket this process creates afresh, before it
    /// is bound (never on inherited sockets): socket options such as
    /// `SO_REUSEPORT`, buffer sizes. It may call back into the upgrader.
    /// Default: none.
    #[must_use]
    pub fn socket_setup(
        mut self,
        hook: impl Fn(&socket2::Socket, &ListenSpec) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.socket_setup = Some(Arc::new(hook));
        self
    }

    /// The executable to run as the next generation; a relative path is
    /// relative to the start directory. Default: the path that named this
    /// program's executable when it started (the path given to `execve`,
    /// else `argv[0]` resolved against the start directory or `PATH`, but
    /// only if it names the running binary; else the running binary's own
    /// path), resolved again at each upgrade, so that a binary replaced at
    /// that path is what runs next.
    #[must_use]
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }

    /// Whether to raise the soft limit of open files (`RLIMIT_NOFILE`) to
    /// the hard limit when the upgrader is created, as Go's runtime does
    /// since Go 1.19: an upgrade briefly needs a second fd for each
    /// listener (see [`Fds`](crate::Fds)), and the usual soft limit of 1024
    /// would cap a service at about 500 listeners. The raised limit is
    /// inherited by processes the service starts; turn this off for a
    /// program that uses `select(2)` or starts such programs. Default: on.
    #[must_use]
    pub fn raise_fd_limit(mut self, raise: bool) -> Self {
        self.raise_fd_limit = raise;
        self
    }

    /// The process model (see [`Mode`]). `TABLEFLIP_MODE` in the
    /// environment wins over it. Default: [`Mode::Replace`] for programs
    /// that create their [`Upgrader`](crate::Upgrader) themselves;
    /// [`Mode::Supervised`] for `#[tableflip::main]` programs on Linux
    /// (replace elsewhere), unless their `options` function or `mode =`
    /// option chooses.
    ///
    /// In supervised mode, [`Upgrader::new`](crate::Upgrader::new), called
    /// in the process that was started, becomes the supervisor and never
    /// returns: it returns only in the generations the supervisor starts.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }
}

/// Reading the options back (as `std::process::Command`'s `get_*`: the
/// plain names are the setters).
impl Options {
    /// See [`upgrade_timeout`](Self::upgrade_timeout).
    pub fn get_upgrade_timeout(&self) -> Duration {
        self.upgrade_timeout
    }

    /// See [`pid_file`](Self::pid_file).
    pub fn get_pid_file(&self) -> Option<&std::path::Path> {
        self.pid_file.as_deref()
    }

    /// See [`drain_timeout`](Self::drain_timeout).
    pub fn get_drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Where the service answers `tableflip-ctl` (see [`crate::ctl`]): a
    /// Unix socket, created with mode `0600`, on which an upgrade can be
    /// asked for and its outcome awaited, and the status read. A relative
    /// path is resolved against the directory the service started in.
    ///
    /// Default: `$RUNTIME_DIRECTORY/tableflip.sock` when systemd sets
    /// `$RUNTIME_DIRECTORY` (`RuntimeDirectory=` in the unit), else none.
    /// In replace mode it is served on the tokio runtime that is current
    /// when [`Upgrader::ready`](crate::Upgrader::ready) is called (a path
    /// that cannot be bound makes `ready` fail); in supervised mode the
    /// supervisor serves it.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_socket = crate::ctl::ControlSocket::Path(path.into());
        self
    }

    /// No control socket, even with `$RUNTIME_DIRECTORY` set.
    pub fn no_control_socket(mut self) -> Self {
        self.control_socket = crate::ctl::ControlSocket::Off;
        self
    }

    /// The probation window after an upgrade: a new generation that dies
    /// (by anything but a clean exit, status 0) within this time after it
    /// became ready is replaced by the *previous* binary (a rollback), not
    /// by the binary on disk, which is the one that just crashed. Logged
    /// at error level, reported by the control socket's `status`
    /// (`last_upgrade.rolled_back`); at most once per upgrade (a rolled-back
    /// generation that dies is replaced as any other, from the previous
    /// binary still, with the usual limits). `Duration::ZERO`: never roll
    /// back. Default: the drain timeout.
    ///
    /// The previous binary is started from the inode that ran (the old
    /// generation's `/proc/<pid>/exe`), so a binary replaced or deleted on
    /// disk since still runs. In supervised mode the supervisor keeps it
    /// open for the window. In replace mode the old generation rolls back,
    /// so the window also ends when the old generation exits (its drain
    /// over), unless a control-socket request waits for the probation
    /// (`tableflip-ctl upgrade --wait-probation`): the drained old
    /// generation then stays until the window is over (or a stop signal).
    /// Use supervised mode for a window longer than the drain without that.
    pub fn probation(mut self, window: Duration) -> Self {
        self.probation = Some(window);
        self
    }

    /// See [`probation`](Self::probation).
    pub fn get_probation(&self) -> Duration {
        self.probation.unwrap_or(self.drain_timeout)
    }

    /// See [`control_socket`](Self::control_socket).
    pub fn get_control_socket(&self) -> &crate::ctl::ControlSocket {
        &self.control_socket
    }

    /// See [`stop_delay`](Self::stop_delay).
    pub fn get_stop_delay(&self) -> Duration {
        self.stop_delay
    }

    /// See [`upgrade_signal`](Self::upgrade_signal).
    pub fn get_upgrade_signal(&self) -> UpgradeSignal {
        self.upgrade_signal
    }

    /// See [`backlog`](Self::backlog).
    pub fn get_backlog(&self) -> u32 {
        self.backlog
    }

    /// See [`executable`](Self::executable).
    pub fn get_executable(&self) -> Option<&std::path::Path> {
        self.executable.as_deref()
    }

    /// See [`raise_fd_limit`](Self::raise_fd_limit).
    pub fn get_raise_fd_limit(&self) -> bool {
        self.raise_fd_limit
    }

    /// See [`mode`](Self::mode): as set, before `TABLEFLIP_MODE`;
    /// [`Mode::Replace`] when not set.
    pub fn get_mode(&self) -> Mode {
        self.mode.unwrap_or(Mode::Replace)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
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
            .field("mode", &self.get_mode())
            .field("stop_delay", &self.stop_delay)
            .field("upgrade_signal", &self.upgrade_signal)
            .field("control_socket", &self.control_socket)
            .field("probation", &self.get_probation())
            .finish()
    }
}

/// The signal that upgrades the service: see [`Options::upgrade_signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeSignal {
    /// `SIGHUP`, the default.
    Hup,
    /// `SIGUSR1`.
    Usr1,
    /// `SIGUSR2`, as nginx uses it.
    Usr2,
    /// No signal upgrades: only [`Upgrader::upgrade`](crate::Upgrader::upgrade)
    /// (in supervised mode, called in a generation).
    None,
}

impl UpgradeSignal {
    /// How `#[tableflip::main(upgrade_signal = …)]` writes it: `"SIGHUP"`,
    /// `"SIGUSR1"`, `"SIGUSR2"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeSignal::Hup => "SIGHUP",
            UpgradeSignal::Usr1 => "SIGUSR1",
            UpgradeSignal::Usr2 => "SIGUSR2",
            UpgradeSignal::None => "none",
        }
    }

    /// The signal's number, `None` for [`UpgradeSignal::None`].
    pub fn number(self) -> Option<i32> {
        match self {
            UpgradeSignal::Hup => Some(nix::libc::SIGHUP),
            UpgradeSignal::Usr1 => Some(nix::libc::SIGUSR1),
            UpgradeSignal::Usr2 => Some(nix::libc::SIGUSR2),
            UpgradeSignal::None => None,
        }
    }
}

impl std::fmt::Display for UpgradeSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for UpgradeSignal {
    type Err = String;

    /// `SIGHUP`/`HUP`, `SIGUSR1`/`USR1`, `SIGUSR2`/`USR2`, or `none`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim() {
            "SIGHUP" | "HUP" => Ok(UpgradeSignal::Hup),
            "SIGUSR1" | "USR1" => Ok(UpgradeSignal::Usr1),
            "SIGUSR2" | "USR2" => Ok(UpgradeSignal::Usr2),
            "none" => Ok(UpgradeSignal::None),
            other => Err(format!(
                "{other:?} is not an upgrade signal; expected SIGHUP, SIGUSR1, SIGUSR2 or none"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UpgradeSignal;

    #[test]
    fn upgrade_signals_parse_and_print() {
        for s in [
            UpgradeSignal::Hup,
            UpgradeSignal::Usr1,
            UpgradeSignal::Usr2,
            UpgradeSignal::None,
        ] {
            assert_eq!(s.as_str().parse::<UpgradeSignal>(), Ok(s));
        }
        assert_eq!("USR2".parse::<UpgradeSignal>(), Ok(UpgradeSignal::Usr2));
        let err = "SIGTERM".parse::<UpgradeSignal>();
        assert!(err.is_err_and(|e| e.contains("SIGTERM") && e.contains("SIGUSR2")));
        assert_eq!(UpgradeSignal::None.number(), None);
    }
}
