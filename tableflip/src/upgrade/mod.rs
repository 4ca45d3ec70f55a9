//! The [`Upgrader`]: one per process, it receives the sockets of the
//! previous generation, and starts and hands over to the next one.

mod app_state;
mod child;
#[cfg(feature = "http")]
mod http_conns;
pub(crate) mod launch;
pub(crate) mod spawn;
mod state;
mod successor;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod supervised;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod supervised {
    //! Supervised mode is Linux-only.
    #[derive(Debug)]
    pub(super) struct Supervised {
        pub(super) pid: u32,
    }
}

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use self::child::Signaller;
use self::launch::Launch;
use self::state::{Phase, Refusal, StopEffect};
use self::supervised::Supervised;
use crate::bind::ListenSpec;
use crate::error::{Error, Result};
use crate::fds::{Defaults, Fds};
use crate::mode::Mode;
use crate::options::Options;
use crate::protocol::Inherited;
use crate::report::chain;
use crate::socket::{Listener, PacketConn};
use crate::systemd::{self, Notice, Notifier};
use crate::{pidfile, protocol, sys};

static CREATED: AtomicBool = AtomicBool::new(false);

/// Handles zero-downtime upgrades: receives the sockets handed on by the
/// previous generation, and starts the next one and hands them over.
///
/// Create one per process with [`Upgrader::new`], at startup; it is a cheap
/// handle (clone it freely into tasks). The life of a generation:
///
/// 1. [`Upgrader::new`] takes what the parent handed on, if anything;
/// 2. the program opens its sockets with [`listen`](Self::listen) and
///    friends (inherited when the parent had them, created otherwise);
/// 3. [`ready`](Self::ready) once initialisation is done: the parent is told
///    and starts draining;
/// 4. on `SIGHUP`, [`upgrade`](Self::upgrade) starts the next generation and
///    waits for it to be ready;
/// 5. [`exit`](Self::exit) resolves after a successful upgrade (or
///    [`stop`](Self::stop)): stop accepting, drain, exit.
///
/// ```no_run
/// use tableflip::{Options, Upgrader};
/// use tokio::signal::unix::{SignalKind, signal};
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let upg = Upgrader::new(Options::default())?;
///     let listener: tokio::net::TcpListener = upg.listen("tcp", "127.0.0.1:8080")?;
///     // … start serving on `listener` …
///     upg.ready()?;
///
///     let mut hup = signal(SignalKind::hangup())?;
///     loop {
///         tokio::select! {
///             _ = hup.recv() => {
///                 if let Err(e) = upg.upgrade().await {
///                     eprintln!("upgrade failed: {e}");
///                 }
///             }
///             () = upg.exit() => break,
///         }
///     }
///     drop(listener); // stop accepting; then drain what is in flight
///     Ok(())
/// }
/// ```
///
/// # Platform support
///
/// Unix. Tested on Linux; macOS compiles but is not tested. `unixpacket`
/// and abstract Unix addresses are Linux-only.
#[derive(Clone, Debug)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    opts: Options,
    fds: Fds,
    launch: Launch,
    parent: Option<ParentLink>,
    generation: u64,
    stub: bool,
    notify: Notifier,
    phase: Mutex<Phase>,
    exit: CancellationToken,
    stop: CancellationToken,
    parent_exited: CancellationToken,
    /// True while a successor that died after it took over is being
    /// replaced (see [`Upgrader::settled`]).
    replacing: tokio::sync::watch::Sender<bool>,
    /// How many dead successors this process has replaced.
    replacements: AtomicU32,
    /// The successor in charge, as long as it has not been reaped, and
    /// how to signal it (by pidfd where there is one).
    successor: Mutex<Option<(u32, Option<Signaller>)>>,
    /// In a generation of a supervised service: the supervisor.
    supervised: Option<Supervised>,
    /// The outcome of each upgrade this process ran (`Upgraded` or
    /// `Failed`), numbered: control-socket requests that join an upgrade
    /// in flight wait for the next number.
    outcomes: tokio::sync::watch::Sender<(u64, Option<crate::ctl::Reply>)>,
    /// The control socket's connections being answered: the process waits
    /// for them before it exits ([`Upgrader::ctl_settled`]).
    ctl_tasks: tokio_util::task::TaskTracker,
    /// The newest upgrade, for the control socket's `status`: the one
    /// this process ran, else the one that started it.
    last_upgrade: Mutex<Option<crate::ctl::LastUpgrade>>,
    /// A lame-duck stop (`Options::stop_delay`) is under way.
    lame_duck: AtomicBool,
    /// When the upgrade in flight (or the last one) started.
    upgrade_started_at: Mutex<Option<Instant>>,
    /// This generation is a rollback (what happened), from the handover.
    rollback_of: Option<String>,
    /// When the successor in charge became ready (its probation starts).
    successor_ready_at: Mutex<Option<Instant>>,
    /// Set once a successor died during its probation: every replacement
    /// this process starts from then on runs this process's own binary
    /// (the previous one), with this note.
    rolling_back: Mutex<Option<String>>,
    /// The rollbacks this process started: the dead successor and what
    /// happened (control-socket requests waiting for a probation).
    rollbacks: tokio::sync::watch::Sender<Option<(u32, String)>>,
    /// The process is about to exit: requests waiting for a probation are
    /// answered now.
    ctl_finishing: CancellationToken,
    /// The control socket's file, removed at the exit after a stop.
    ctl_file_at_exit: Mutex<Option<crate::unixfile::SocketFile>>,
    /// The control socket, when no runtime answers it.
    ctl_unserved: Mutex<Option<std::os::unix::net::UnixListener>>,
    /// A stop has come after readiness: the PID file is removed when the
    /// process is about to exit ([`Upgrader::release_pid_file`], or the
    /// last `Upgrader` dropped), not at the stop, so that it names the
    /// process as long as that process runs (a process manager reading it
    /// during the drain finds the process it must wait for).
    pid_file_at_exit: AtomicBool,
    /// What this generation hands the next one when an upgrade starts
    /// ([`Upgrader::hand_over_state`]).
    state_sources: Mutex<std::collections::BTreeMap<String, crate::state::Source>>,
    /// The channels that idle HTTP connections are handed over on.
    #[cfg(feature = "http")]
    http_conns: Mutex<crate::http::handoff::Ends>,
}

/// Locks `m`; a panic while it was held leaves the data usable (every
/// update is one assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many times one process replaces a successor that died after it took
/// over, before it gives up (a binary that crashes right after readiness
/// must not make the old generation spawn it in a loop).
const MAX_REPLACEMENTS: u32 = 3;

#[derive(Debug)]
struct ParentLink {
    pid: u32,
    ready_pipe: Mutex<Option<OwnedFd>>,
    /// The parent's process group, read at startup: the parent starts
    /// each generation in a group of its own (so that a failed upgrade
    /// kills what it started too); once ready, it rejoins this one, where
    /// a terminal's Ctrl-C and a supervisor's group signals reach it.
    group: Option<nix::unistd::Pid>,
}

impl Upgrader {
    /// Creates the process's upgrader, taking over whatever a parent
    /// generation handed on.
    ///
    /// Call it once, early in `main`. Called while the process runs a
    /// single thread (before a multi-thread runtime starts, as
    /// `#[tableflip::main]` does), it also removes the protocol's
    /// environment variables; with threads running (inside
    /// `#[tokio::main]`, say) it leaves the environment alone, since
    /// editing it could race another thread's `getenv`. Either way a
    /// subprocess that inherits the variables ignores them (they name pipes
    /// it does not hold), and inherits none of the protocol's fds.
    ///
    /// It also raises the soft limit of open files to the hard limit,
    /// unless [`Options::raise_fd_limit`] is off, and checks that the PID
    /// file, if any, can be replaced by this process.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyCreated`] on a second call in the same process (even
    /// if the first failed: the handover can only be taken once);
    /// [`Error::InvalidHandover`] or [`Error::InheritMismatch`] when the
    /// handover is malformed, names fds that are not open, or names fds that
    /// are not what they claim to be; [`Error::SocketActivation`] for
    /// unusable `LISTEN_FDS`; [`Error::PidFile`] when the PID file can never
    /// be replaced by this process (another user's file in a sticky
    /// directory, a directory it cannot write).
    pub fn new(mut opts: Options) -> Result<Upgrader> {
        if CREATED.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyCreated {
                pid: std::process::id(),
            });
        }
        if opts.raise_fd_limit {
            raise_fd_limit();
        }
        sys::name_after_argv0_if_started_from_proc();
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(state) = crate::supervisor::carried_state() {
            // This process is a supervisor that re-executed itself.
            crate::supervisor::check_can_start()?;
            crate::supervisor::resume(opts, state?);
        }
        let mode = Mode::from_env()?.unwrap_or(opts.get_mode());
        let handover = protocol::receive()?;
        if handover.is_none() && mode == Mode::Supervised {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                crate::supervisor::check_can_start()?;
                crate::supervisor::start(opts);
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            return Err(Error::Supervisor {
                reason: "supervised mode is Linux-only; use TABLEFLIP_MODE=replace".to_owned(),
            });
        }
        let parent_exited = CancellationToken::new();
        let mut supervisor = None;
        let mut rollback_of = None;
        // Room in the fd table, while this process has one thread (see
        // `sys::reserve_fd_table`): for the listeners it binds, the
        // connections it accepts or is handed, and the copies of its fds
        // the next upgrade makes; a generation started by a supervisor or
        // by a version-2 handover starts with a small table.
        let handed = handover.as_ref().map_or(0, |h| h.entries.len());
        sys::reserve_fd_table(fd_table_reserve(
            handed.saturating_mul(2).saturating_add(1024),
        ));
        let (parent, generation, inherited) = match handover {
            Some(mut h) => {
                supervisor = h.supervisor.take();
                rollback_of = h.rollback.take();
                if let (None, Some(path)) = (&opts.executable, h.executable.take()) {
                    // A rollback runs from an image (`/proc/…`): later
                    // upgrades start from the release path its parent
                    // used.
                    opts.executable = Some(path);
                }
                let count = h.entries.len();
                tracing::info!(
                    generation = h.generation,
                    parent_pid = h.parent_pid,
                    inherited = count,
                    protocol = h.version,
                    "started by parent process {}; inherited {count} fds",
                    h.parent_pid
                );
                // Socket activation concerns the first generation only (an
                // older parent may have passed the variables on). Before
                // the thread below starts: only a single-threaded process
                // edits its environment.
                sys::remove_env(&systemd::LISTEN_VARS);
                watch_parent(h.parent_pipe, h.parent_pid, parent_exited.clone())?;
                // The group of the process that really is this one's
                // parent (`getppid`), when it is the one the metadata names.
                let ppid = nix::unistd::getppid();
                let group = (i32::try_from(h.parent_pid).ok() == Some(ppid.as_raw()))
                    .then(|| nix::unistd::getpgid(Some(ppid)).ok())
                    .flatten();
                let link = ParentLink {
                    pid: h.parent_pid,
                    ready_pipe: Mutex::new(Some(h.ready_pipe)),
                    group,
                };
                (Some(link), h.generation, h.entries)
            }
            None => {
                parent_exited.cancel();
                (None, 1, systemd::listen_fds()?)
            }
        };
        let mut upgrader = Self::build(opts, parent, generation, inherited, parent_exited, false)?;
        if let Some(what) = rollback_of {
            tracing::error!(what = %what, "this generation is a ROLLBACK: it runs the previous binary because the new one died during its probation");
            if let Some(inner) = Arc::get_mut(&mut upgrader.inner) {
                inner.rollback_of = Some(what);
            }
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(link) = supervisor {
            let mut upgrader = upgrader;
            tracing::info!(
                supervisor_pid = link.pid,
                generation,
                "a generation of a supervised service"
            );
            match Arc::get_mut(&mut upgrader.inner) {
                Some(inner) => {
                    inner.fds.set_supervised(link.collects);
                    inner.supervised = Some(Supervised::new(link));
                    // The supervisor alone speaks to the service manager.
                    inner.notify = Notifier::none();
                }
                None => unreachable!("a new upgrader has one handle"),
            }
            supervised::watch(&upgrader.inner)?;
            return Ok(upgrader);
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = supervisor;
        if let Some(path) = upgrader.pid_file() {
            pidfile::check(&path)?;
        }
        Ok(upgrader)
    }

    /// The `testing` stub: no handover, never forks.
    pub(crate) fn stub(opts: Options) -> Result<Upgrader> {
        let parent_exited = CancellationToken::new();
        parent_exited.cancel();
        Self::build(opts, None, 1, Vec::new(), parent_exited, true)
    }

    fn build(
        opts: Options,
        parent: Option<ParentLink>,
        generation: u64,
        inherited: Vec<Inherited>,
        parent_exited: CancellationToken,
        stub: bool,
    ) -> Result<Upgrader> {
        let launch = Launch::capture(opts.executable.as_deref())?;
        let fds = Fds::new(
            inherited,
            Defaults {
                backlog: opts.backlog,
                setup: opts.socket_setup.clone(),
                start_dir: launch.start_dir.clone(),
            },
        );
        // Taken now: entries not claimed by readiness are closed then.
        #[cfg(feature = "http")]
        let http_conns = crate::http::handoff::Ends {
            predecessor: match fds.conn::<socket2::Socket>(crate::http::handoff::CHANNEL) {
                Ok(Some(end)) => crate::http::handoff::Slot::Fd(end.into_inner().into()),
                Ok(None) => crate::http::handoff::Slot::None,
                Err(e) => {
                    tracing::warn!(
                        error = %chain(&e),
                        "the channel for idle connections handed over is unusable; none are taken"
                    );
                    crate::http::handoff::Slot::None
                }
            },
            ..Default::default()
        };
        let notify = if stub {
            Notifier::none()
        } else {
            Notifier::from_env(&launch.env)
        };
        Ok(Upgrader {
            inner: Arc::new(Inner {
                opts,
                fds,
                launch,
                parent,
                generation,
                stub,
                notify,
                phase: Mutex::new(Phase::Starting),
                exit: CancellationToken::new(),
                stop: CancellationToken::new(),
                parent_exited,
                replacing: tokio::sync::watch::Sender::new(false),
                replacements: AtomicU32::new(0),
                successor: Mutex::new(None),
                supervised: None,
                outcomes: tokio::sync::watch::Sender::new((0, None)),
                ctl_tasks: tokio_util::task::TaskTracker::new(),
                last_upgrade: Mutex::new(None),
                lame_duck: AtomicBool::new(false),
                ctl_unserved: Mutex::new(None),
                ctl_file_at_exit: Mutex::new(None),
                rollback_of: None,
                upgrade_started_at: Mutex::new(None),
                successor_ready_at: Mutex::new(None),
                rolling_back: Mutex::new(None),
                rollbacks: tokio::sync::watch::Sender::new(None),
                ctl_finishing: CancellationToken::new(),
                pid_file_at_exit: AtomicBool::new(false),
                state_sources: Mutex::new(std::collections::BTreeMap::new()),
                #[cfg(feature = "http")]
                http_conns: Mutex::new(http_conns),
            }),
        })
    }

    /// Removes the PID file, if a stop after readiness left it for the
    /// exit (see [`Upgrader::stop`]): called by `#[tableflip::main]` once
    /// the drain is over.
    pub(crate) fn release_pid_file(&self) {
        self.inner.release_pid_file();
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        lock(&self.inner.phase)
    }

    /// The named fds this generation holds and will hand on.
    pub fn fds(&self) -> &Fds {
        &self.inner.fds
    }

    /// The options this upgrader was created with.
    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    /// Shorthand for [`Fds::listen`].
    ///
    /// # Errors
    ///
    /// As [`Fds::listen`].
    pub fn listen<T: Listener>(&self, network: &str, address: &str) -> Result<T> {
        self.inner.fds.listen(network, address)
    }

    /// Shorthand for [`Fds::listen_with`].
    ///
    /// # Errors
    ///
    /// As [`Fds::listen_with`].
    pub fn listen_with<T: Listener>(&self, spec: &ListenSpec) -> Result<T> {
        self.inner.fds.listen_with(spec)
    }

    /// Shorthand for [`Fds::listen_packet`].
    ///
    /// # Errors
    ///
    /// As [`Fds::listen_packet`].
    pub fn listen_packet<T: PacketConn>(&self, network: &str, address: &str) -> Result<T> {
        self.inner.fds.listen_packet(network, address)
    }

    /// Shorthand for [`Fds::listen_packet_with`].
    ///
    /// # Errors
    ///
    /// As [`Fds::listen_packet_with`].
    pub fn listen_packet_with<T: PacketConn>(&self, spec: &ListenSpec) -> Result<T> {
        self.inner.fds.listen_packet_with(spec)
    }

    /// Whether this process was started by a tableflip parent.
    pub fn has_parent(&self) -> bool {
        self.inner.parent.is_some()
    }

    /// The parent generation's PID, if this process was started by one.
    pub fn parent_pid(&self) -> Option<u32> {
        self.inner.parent.as_ref().map(|p| p.pid)
    }

    /// The generation number: 1 for a process started without a parent,
    /// its parent's plus one otherwise.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The PID of the generation this process handed over to, after a
    /// successful [`upgrade`](Self::upgrade).
    pub fn successor_pid(&self) -> Option<u32> {
        self.phase().successor()
    }

    /// Sends `signal` to the generation this process handed over to, and
    /// returns its PID. Through a pidfd where the system has them (Linux
    /// 5.3 and later), so that a successor that has exited is reported as
    /// such (`ESRCH`) instead of its PID, possibly reused by now, being
    /// signalled.
    pub(crate) fn signal_successor(
        &self,
        signal: nix::sys::signal::Signal,
    ) -> std::io::Result<u32> {
        let gone = || std::io::Error::from_raw_os_error(nix::libc::ESRCH);
        let successor = lock(&self.inner.successor).clone();
        let Some((pid, signaller)) = successor else {
            return Err(gone());
        };
        match signaller {
            Some(s) => s.send(signal).map(|()| pid),
            // No pidfd on this system: by PID, which is still the
            // successor's: it has not been reaped (`watch_successor`
            // forgets it before it reaps).
            None => {
                let target = i32::try_from(pid)
                    .ok()
                    .filter(|p| *p > 0)
                    .map(nix::unistd::Pid::from_raw)
                    .ok_or_else(gone)?;
                nix::sys::signal::kill(target, signal)
                    .map(|()| pid)
                    .map_err(std::io::Error::from)
            }
        }
    }

    /// Whether the parent process has exited (true when there was none).
    pub fn parent_exited(&self) -> bool {
        self.inner.parent_exited.is_cancelled()
    }

    /// Whether [`ready`](Self::ready) has succeeded.
    pub fn is_ready(&self) -> bool {
        self.phase().is_ready()
    }

    /// Resolves when the parent process has exited (at once when there is
    /// no parent). Exit by any means counts, `SIGKILL` included: it is
    /// noticed as EOF on a pipe only the parent holds.
    pub async fn wait_for_parent(&self) {
        self.inner.parent_exited.cancelled().await;
        // The channel idle HTTP connections came on is closed by then too.
        #[cfg(feature = "http")]
        self.http_predecessor_closed().await;
    }

    /// Resolves once no replacement of a dead successor is in flight (at
    /// once, normally).
    ///
    /// After a successful [`upgrade`](Self::upgrade) this process keeps
    /// holding the sockets while it drains. If the new generation dies in
    /// that time by anything but a clean exit (status 0), this process
    /// starts the executable again and hands the sockets to the
    /// replacement, so the service keeps being served (at most three
    /// times; never after [`stop`](Self::stop)). Await this before the
    /// process exits, so that a replacement in flight is not killed with
    /// it: `#[tableflip::main]` does.
    pub async fn settled(&self) {
        let mut replacing = self.inner.replacing.subscribe();
        let _ = replacing.wait_for(|r| !*r).await;
    }

    /// Signals that initialisation is done.
    ///
    /// In order: inherited fds nobody claimed are closed (and the files of
    /// unclaimed Unix sockets removed), the PID file is written atomically,
    /// and the parent is told, which lets it stop. Idempotent.
    ///
    /// # Errors
    ///
    /// [`Error::PidFile`] when the PID file cannot be written: the parent is
    /// then not told, so it keeps serving and the upgrade fails (or times
    /// out). [`Error::Stopped`] after [`stop`](Self::stop). In replace
    /// mode, as [`Fds::listen_with`] when the control socket
    /// ([`Options::control_socket`]) cannot be bound; it is claimed here
    /// (inherited from the parent, or bound), and answered on the tokio
    /// runtime current here.
    pub fn ready(&self) -> Result<()> {
        let mut phase = self.phase();
        match phase.check_ready() {
            Err(refusal) => return Err(refused(refusal)),
            Ok(false) => return Ok(()),
            Ok(true) => {}
        }
        // The control socket (replace mode) is claimed like a listener,
        // before the unclaimed ones are closed; a path that cannot be
        // bound fails the readiness (the parent keeps serving).
        let ctl = if self.inner.supervised.is_none() && !self.inner.stub {
            self.claim_control_socket()?
        } else {
            None
        };
        // Closed now, but their files are removed only once the handover
        // has committed: until then the parent serves on them, and keeps
        // serving if this fails.
        let (leftovers, closed) = self.inner.fds.close_unclaimed();
        #[cfg(feature = "http")]
        self.start_http_predecessor();
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(sup) = &self.inner.supervised {
            // The supervisor writes the PID file (its own PID), and removes
            // the files of sockets no generation serves any more.
            drop((leftovers, closed));
            self.rejoin_parent_group();
            self.report_ready(sup)?;
            phase.became_ready();
            tracing::info!(
                pid = std::process::id(),
                generation = self.inner.generation,
                supervisor_pid = sup.pid,
                "ready"
            );
            return Ok(());
        }
        if let Some(path) = self.pid_file() {
            pidfile::write(&path, std::process::id())?;
        }
        self.rejoin_parent_group();
        if let Some(parent) = &self.inner.parent {
            let pipe = parent
                .ready_pipe
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(pipe) = pipe {
                if let Err(e) = sys::write_no_sigpipe(pipe.as_fd(), b"1") {
                    // The parent is gone; this process carries on alone.
                    tracing::warn!(parent_pid = parent.pid, error = %e, "cannot tell the parent we are ready; it has probably exited");
                }
            }
        }
        phase.became_ready();
        drop(phase);
        if self.inner.parent.is_some() {
            self.record_takeover();
        }
        if let Some(listener) = ctl {
            self.serve_control_socket(listener);
        }
        // Committed: the files of sockets no generation serves any more go.
        for file in leftovers {
            file.remove();
        }
        self.sync_fd_store(&closed);
        if self.inner.parent.is_none() {
            // The first generation is systemd's main process; later ones
            // are announced by their parent (see `upgrade`).
            let pid = std::process::id();
            self.inner.notify.notify(&Notice::Ready {
                generation: self.inner.generation,
                pid,
            });
        }
        tracing::info!(
            pid = std::process::id(),
            generation = self.inner.generation,
            "ready"
        );
        Ok(())
    }

    fn pid_file(&self) -> Option<PathBuf> {
        self.inner.pid_file()
    }

    /// A lame-duck stop begins (`Options::stop_delay`): systemd hears
    /// `STOPPING=1` and why the service still accepts, from the main
    /// process.
    /// Whether an upgrade this process runs is in flight (replace mode).
    pub(crate) fn upgrading(&self) -> bool {
        matches!(*self.phase(), Phase::Upgrading { .. })
    }

    pub(crate) fn announce_lame_duck(&self, delay: std::time::Duration) {
        self.inner.lame_duck.store(true, Ordering::SeqCst);
        if self.is_ready() || self.inner.parent.is_none() {
            self.inner.notify.notify(&Notice::LameDuck { delay });
        }
    }

    /// Replace mode, once ready: keeps systemd's fd store in step. The
    /// sockets closed at readiness (a listener moved to another address, or
    /// gone from this release) are removed from it, then those this
    /// generation bound itself are put there. Inherited ones are there
    /// already: the generation that bound them put them there. The store
    /// takes messages from the main process only, unless the unit says
    /// `NotifyAccess=all` (which the replace-mode units ship): a later
    /// generation is not the main process until its parent says so.
    fn sync_fd_store(&self, closed: &[String]) {
        let notify = &self.inner.notify;
        if !notify.stores() {
            return;
        }
        let superseded = crate::systemd::take_superseded();
        for name in superseded.iter().chain(closed) {
            tracing::info!(listener = %name, "removing the socket no longer served from systemd's fd store");
            notify.unstore_fd(name);
        }
        let mut created = self.inner.fds.created_sockets();
        // A stored socket kept when the store had two under its name goes
        // back (the removal above took both).
        created.extend(self.inner.fds.stored_sockets(&superseded));
        if let Some(max) = notify.store_max() {
            if created.len() > usize::try_from(max).unwrap_or(usize::MAX) {
                tracing::warn!(
                    max,
                    listeners = created.len(),
                    "FileDescriptorStoreMax={max} is smaller than the number of listeners: systemd keeps the first {max} only; raise it"
                );
            }
        }
        for (name, fd) in created {
            // Whatever the store may hold under the name goes first: two
            // under one name would both come back.
            notify.unstore_fd(&name);
            if notify.store_fd(&name, fd.as_fd()) {
                tracing::info!(listener = %name, "kept in systemd's fd store (it survives restarts and crashes)");
            }
        }
    }

    /// Once ready, a generation rejoins its parent's process group, where
    /// a terminal's Ctrl-C and a supervisor's group signals reach it.
    fn rejoin_parent_group(&self) {
        let Some(group) = self.inner.parent.as_ref().and_then(|p| p.group) else {
            return;
        };
        if nix::unistd::getpgrp() != group {
            if let Err(e) = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), group) {
                tracing::debug!(error = %e, "cannot rejoin the parent's process group");
            }
        }
    }

    /// A future that resolves when this process should exit: after a
    /// successful [`upgrade`](Self::upgrade), or after [`stop`](Self::stop).
    /// Independent of `self`: it can be moved into a task.
    pub fn exit(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.inner.exit.clone().cancelled_owned()
    }

    /// Whether [`exit`](Self::exit) has resolved.
    pub fn is_exiting(&self) -> bool {
        self.inner.exit.is_cancelled()
    }

    /// Stops the upgrader: [`exit`](Self::exit) resolves, and, unless an
    /// upgrade succeeded, the service really stops: systemd is told
    /// `STOPPING=1` (by the main process only: never by a child that was
    /// not ready yet), the Unix socket files this generation owns (never
    /// those of sockets systemd passed) are removed, and the upgrader's
    /// own handles of listening sockets are closed, so that each socket
    /// closes (and new clients are refused) as soon as the program drops
    /// its handle. The PID file stays, naming this process until it
    /// exits: it is removed (if it still names this process) when the last
    /// `Upgrader` clone is dropped, or by `#[tableflip::main]` once the
    /// drain is over. Idempotent.
    ///
    /// An upgrade in flight decides first. The handover is committed when
    /// the new generation signals readiness: a stop before that kills and
    /// reaps the new process, and the service stops; a stop that arrives
    /// after it (the readiness byte is already in the pipe, though this
    /// process had not read it yet) leaves the new generation in charge,
    /// and this one exits as after any upgrade, since killing a process
    /// that has already taken over and named itself in the PID file would
    /// leave the service down with a stale PID file.
    pub fn stop(&self) {
        let effect = self.phase().stop();
        if effect == StopEffect::Nothing {
            return;
        }
        tracing::debug!("upgrader stopped");
        self.inner.stop.cancel();
        match effect {
            // The upgrade in flight ends the stop (see `UpgradingFlag`).
            StopEffect::UpgradeDecides | StopEffect::Nothing => {}
            StopEffect::StopServing { ready } => {
                self.inner.stop_serving(ready);
                self.inner.exit.cancel();
            }
            StopEffect::ExitOnly => self.inner.exit.cancel(),
        }
    }

    /// Starts the next generation and hands everything over.
    ///
    /// The next generation runs the executable (see
    /// [`Options::executable`]) with this process's arguments, environment
    /// and initial working directory, and inherits every socket and file in
    /// [`fds`](Self::fds). Resolves with the child's PID once it is ready;
    /// then [`exit`](Self::exit) resolves too.
    ///
    /// # Errors
    ///
    /// Refused with [`Error::NotReady`], [`Error::Pid1`], [`Error::ParentAlive`],
    /// [`Error::UpgradeInProgress`], [`Error::AlreadyUpgraded`] or
    /// [`Error::Stopped`]. Failed with [`Error::Spawn`] (the executable
    /// cannot be started), [`Error::ChildExited`], [`Error::ChildKilled`],
    /// [`Error::Timeout`] (the child was killed) or [`Error::Stopped`] (stop
    /// during the upgrade; the child was killed). After a failure the child
    /// has been reaped, this process serves on, and a later upgrade may be
    /// tried. [`Error::NotSupported`] from the [`testing`](crate::testing)
    /// stub.
    pub async fn upgrade(&self) -> Result<u32> {
        self.upgrade_reporting().await.0
    }

    /// [`upgrade`](Self::upgrade), with the outcome as the control socket
    /// reports it when an upgrade ran (not when it was refused). Every
    /// outcome is also published to the requests that join it.
    pub(crate) async fn upgrade_reporting(&self) -> (Result<u32>, Option<crate::ctl::Reply>) {
        if self.inner.stub {
            return (Err(Error::NotSupported), None);
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(sup) = &self.inner.supervised {
            return (self.upgrade_through_supervisor(sup).await, None);
        }
        if self.inner.lame_duck.load(Ordering::SeqCst) {
            tracing::warn!("upgrade refused: the service is stopping (stop_delay)");
            return (Err(Error::Stopped), None);
        }
        let parent_alive =
            (!self.inner.parent_exited.is_cancelled()).then(|| self.parent_pid().unwrap_or(0));
        let begun = self
            .phase()
            .begin_upgrade(std::process::id() == 1, parent_alive)
            .map_err(refused);
        if let Err(e) = begun {
            // Logged here, where the reason is known: a caller such as
            // the SIGHUP handler may have no better place to say it.
            tracing::warn!(error = %chain(&e), "upgrade refused");
            return (Err(e), None);
        }
        crate::metrics::emit(&crate::metrics::Metric::UpgradeStarted);
        // Ends the upgrade however this future ends, dropped included.
        let mut upgrading = UpgradingFlag {
            upgrader: self,
            successor: None,
        };
        let started = Instant::now();
        *lock(&self.inner.upgrade_started_at) = Some(started);
        tracing::info!(
            generation = self.inner.generation.saturating_add(1),
            "upgrade: starting the next generation"
        );
        let me = std::process::id();
        let next = self.inner.generation.saturating_add(1);
        self.inner.notify.notify(&Notice::Reloading { next });
        let result = self.run_upgrade().await;
        match &result {
            Ok(pid) => {
                upgrading.successor = Some(*pid);
                *lock(&self.inner.successor_ready_at) = Some(Instant::now());
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                // Still the main process: hand systemd over to the child.
                self.inner.notify.notify(&Notice::HandedOver {
                    generation: next,
                    pid: *pid,
                    from: me,
                    elapsed_ms,
                });
                tracing::info!(
                    child_pid = pid,
                    elapsed_ms,
                    "upgrade: the new generation is ready; this process will exit"
                );
            }
            Err(e) => {
                if !matches!(e, Error::Stopped) {
                    // Ends the reload: systemd offers no way to fail it.
                    let generation = self.inner.generation;
                    self.inner.notify.notify(&Notice::UpgradeFailed {
                        generation,
                        pid: me,
                        error: e,
                    });
                }
                tracing::warn!(error = %chain(e), "upgrade failed; this process keeps serving");
            }
        }
        drop(upgrading);
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let reply = match &result {
            Ok(pid) => crate::ctl::Reply::Upgraded {
                joined: false,
                old_pid: me,
                new_pid: *pid,
                generation: next,
                duration_ms,
                probation_ms: None,
            },
            Err(e) => crate::ctl::Reply::Failed {
                joined: false,
                failure: failure_of(e),
                error: chain(e),
                new_pid: child_of(e),
                duration_ms,
            },
        };
        *lock(&self.inner.last_upgrade) = crate::ctl::LastUpgrade::of(&reply, next);
        if let Err(e) = &result {
            // A success is recorded by the new generation, which serves on.
            crate::metrics::emit(&crate::metrics::Metric::UpgradeFailed {
                reason: failure_of(e),
            });
        }
        self.inner.outcomes.send_modify(|(n, last)| {
            *n += 1;
            *last = Some(reply.clone());
        });
        (result, Some(reply))
    }

    /// The bound or inherited control socket, if the options ask for one
    /// (replace mode).
    fn claim_control_socket(&self) -> Result<Option<std::os::unix::net::UnixListener>> {
        let Some(path) = self
            .inner
            .launch
            .control_socket(&self.inner.opts.control_socket)
        else {
            return Ok(None);
        };
        let Some(address) = path.to_str() else {
            return Err(Error::InvalidAddress {
                network: "unix".to_owned(),
                address: path.to_string_lossy().into_owned(),
                reason: "the control socket's path is not valid UTF-8".to_owned(),
            });
        };
        let spec =
            ListenSpec::new(crate::ctl::LISTENER_NAME, "unix", address).mode(crate::ctl::MODE);
        self.inner.fds.listen_with(&spec).map(Some)
    }

    /// Answers the control socket on the current tokio runtime until this
    /// generation exits; without a runtime, says that it cannot.
    fn serve_control_socket(&self, listener: std::os::unix::net::UnixListener) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "the control socket is not answered: Upgrader::ready was called outside a tokio runtime"
            );
            // Kept open all the same: the next generation inherits it.
            *lock(&self.inner.ctl_unserved) = Some(listener);
            return;
        };
        let _guard = handle.enter();
        match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => {
                let addr = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                    .unwrap_or_default();
                tracing::info!(path = %addr, "control socket: answering upgrade and status requests");
                handle.spawn(crate::ctl::server::serve(self.clone(), l));
            }
            Err(e) => tracing::warn!(error = %e, "the control socket is not answered"),
        }
    }

    /// Replace mode, a generation started by its parent, once ready: the
    /// upgrade that started it succeeded (as seen from here: from this
    /// process's start to its readiness), or was a rollback. Until this
    /// generation runs one itself, that is the newest upgrade (status);
    /// measured too, and once the parent has exited, how long that took
    /// and that one generation is left (see [`crate::metrics`]).
    fn record_takeover(&self) {
        use crate::metrics::{Metric, emit, seconds};
        let generation = self.inner.generation;
        let last = match &self.inner.rollback_of {
            Some(what) => {
                emit(&Metric::RolledBack);
                crate::ctl::LastUpgrade::rolled_back(generation, what.clone())
            }
            None => {
                let up = sys::process_uptime_ms().unwrap_or(0);
                #[allow(clippy::cast_precision_loss)]
                emit(&Metric::UpgradeSucceeded {
                    ready_seconds: up as f64 / 1000.0,
                });
                crate::ctl::LastUpgrade {
                    ok: true,
                    failure: None,
                    error: None,
                    generation,
                    duration_ms: up,
                    ended_unix_ms: crate::ctl::unix_ms(),
                    rolled_back: false,
                }
            }
        };
        *lock(&self.inner.last_upgrade) = Some(last);
        let alive = if self.parent_exited() { 1 } else { 2 };
        emit(&Metric::GenerationsAlive { count: alive });
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ready = Instant::now();
        let parent = self.inner.parent_exited.clone();
        handle.spawn(async move {
            parent.cancelled().await;
            emit(&Metric::OldGenerationGone {
                seconds: seconds(ready.elapsed()),
            });
            emit(&Metric::GenerationsAlive { count: 1 });
        });
    }

    /// The control socket's answers in flight.
    pub(crate) fn ctl_tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.ctl_tasks
    }

    /// `upgrade` with `wait_probation`: the answer `reply` (`Upgraded`)
    /// once the new generation's probation is over, or its rollback, or
    /// this process's exit (which ends the probation in replace mode).
    pub(crate) async fn ctl_after_probation(&self, reply: crate::ctl::Reply) -> crate::ctl::Reply {
        let crate::ctl::Reply::Upgraded {
            new_pid, joined, ..
        } = &reply
        else {
            return reply;
        };
        let (new_pid, joined) = (*new_pid, *joined);
        let window = self.inner.opts.get_probation();
        let started = lock(&self.inner.successor_ready_at).unwrap_or_else(Instant::now);
        let left = window.saturating_sub(started.elapsed());
        let mut rollbacks = self.inner.rollbacks.subscribe();
        let rolled_back =
            rollbacks.wait_for(|r| r.as_ref().is_some_and(|(pid, _)| *pid == new_pid));
        tokio::select! {
            r = rolled_back => {
                if let Ok(r) = r {
                    if let Some((_, what)) = r.clone() {
                        return crate::ctl::Reply::rolled_back(new_pid, what, joined);
                    }
                }
            }
            () = tokio::time::sleep(left) => {}
            // The service stops: the probation is cut short.
            () = self.inner.stop.cancelled() => {}
            () = self.inner.ctl_finishing.cancelled() => {}
        }
        let served = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        reply.after_probation(served)
    }

    /// Whether the upgrade in flight (or the last one) started before
    /// `t`.
    pub(crate) fn upgrade_started_before(&self, t: Instant) -> bool {
        lock(&self.inner.upgrade_started_at).is_some_and(|s| s < t)
    }

    /// The upgrades' outcomes, as they come.
    pub(crate) fn ctl_outcomes(
        &self,
    ) -> tokio::sync::watch::Receiver<(u64, Option<crate::ctl::Reply>)> {
        self.inner.outcomes.subscribe()
    }

    /// Resolves once every control-socket answer in flight has been
    /// written (or after `timeout`): awaited before the process exits.
    /// A request that waits for a probation keeps this process (drained,
    /// holding the sockets, able to roll back) until the probation is over,
    /// at most `timeout`; then every answer still pending is written (at
    /// most 1 s more).
    pub(crate) async fn ctl_settled(&self, timeout: std::time::Duration) {
        self.inner.ctl_tasks.close();
        let waiting = !self.inner.ctl_tasks.is_empty();
        if waiting {
            tracing::info!(
                "waiting for the new generation's probation before exiting: a control-socket request asked for its outcome"
            );
        }
        let _ = tokio::time::timeout(timeout, self.inner.ctl_tasks.wait()).await;
        self.inner.ctl_finishing.cancel();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.inner.ctl_tasks.wait(),
        )
        .await;
    }

    /// The control socket's `status` (replace mode).
    pub(crate) fn ctl_status(&self) -> crate::ctl::Status {
        let me = std::process::id();
        let state = if self.is_exiting() {
            "stopping"
        } else if self.inner.lame_duck.load(Ordering::SeqCst) {
            "stopping (lame duck)"
        } else if self.upgrading() {
            "upgrading"
        } else if self.is_ready() {
            "serving"
        } else {
            "starting"
        };
        let mut pids = Vec::new();
        if let (Some(parent), false) = (self.parent_pid(), self.parent_exited()) {
            pids.push(parent);
        }
        pids.push(me);
        let starting = match *self.phase() {
            Phase::Upgrading { child, .. } => child,
            _ => None,
        };
        pids.extend(starting);
        pids.extend(lock(&self.inner.successor).as_ref().map(|(pid, _)| *pid));
        pids.dedup();
        crate::ctl::Status {
            mode: "replace".to_owned(),
            state: state.to_owned(),
            generation: self.inner.generation,
            pid: me,
            supervisor_pid: None,
            pids,
            uptime_ms: sys::process_uptime_ms().unwrap_or(0),
            last_upgrade: lock(&self.inner.last_upgrade).clone(),
        }
    }
}

impl Inner {
    /// The PID file, a relative path resolved against the start directory.
    fn pid_file(&self) -> Option<PathBuf> {
        let path = self.opts.pid_file.as_ref()?;
        Some(self.launch.resolve(path))
    }

    /// What a real stop (no successor in charge) does besides resolving
    /// `exit`: tell systemd, remove owned files, close shared sockets.
    fn stop_serving(&self, ready: bool) {
        // Only the main process speaks to systemd: a child that stops
        // before it is ready (its listeners cannot be opened…) was never
        // announced, and its STOPPING=1 would stop the service under
        // NotifyAccess=all; after a handover, the successor is the main one.
        if ready || self.parent.is_none() {
            self.notify.notify(&Notice::Stopping);
        }
        self.remove_owned_files(ready);
        self.fds.close_shared();
    }

    fn remove_owned_files(&self, ready: bool) {
        if ready && self.supervised.is_some() {
            // The supervisor holds the sockets, and removes their files.
            return;
        }
        for file in self.fds.owned_unix_files(ready, self.notify.stores()) {
            file.remove();
        }
        // The control socket answers ("stopping", the status) during the
        // drain: its file goes at the exit.
        *lock(&self.ctl_file_at_exit) = self.fds.control_socket_file(ready);
        if ready {
            self.pid_file_at_exit.store(true, Ordering::SeqCst);
        }
    }

    /// Removes the PID file (if it still names this process) when a stop
    /// has deferred it to the exit.
    fn release_pid_file(&self) {
        if let Some(file) = lock(&self.ctl_file_at_exit).take() {
            file.remove();
        }
        if self.pid_file_at_exit.swap(false, Ordering::SeqCst) {
            if let Some(path) = self.pid_file() {
                pidfile::remove_if_ours(&path, std::process::id());
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let phase = *self
            .phase
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Some(ready), false) = (phase.owns_files(), self.stub) {
            self.remove_owned_files(ready);
        }
        self.release_pid_file();
    }
}

/// Ends the upgrade in flight when it is dropped, however the upgrade
/// ends (its future dropped included): the phase moves on, and what the
/// transition requires is done (`exit()` resolved, a stop that arrived
/// meanwhile finished, the sockets' copies released after a failure).
struct UpgradingFlag<'a> {
    upgrader: &'a Upgrader,
    /// The new generation, once it has taken over.
    successor: Option<u32>,
}

impl Drop for UpgradingFlag<'_> {
    fn drop(&mut self) {
        let end = self.upgrader.phase().end_upgrade(self.successor);
        let inner = &self.upgrader.inner;
        if self.successor.is_none() {
            // Back to one fd per listener, blocking sockets blocking again.
            inner.fds.release_copies();
        }
        if end.stop_serving {
            inner.stop_serving(true);
        }
        if end.exit {
            inner.exit.cancel();
        }
    }
}

/// The kind of an upgrade's failure, for the control socket.
fn failure_of(e: &Error) -> crate::ctl::Failure {
    use crate::ctl::Failure;
    match e {
        Error::Spawn { .. } | Error::StartDirectory { .. } | Error::NoExecutable { .. } => {
            Failure::Spawn
        }
        Error::ChildExited { .. } => Failure::Exited,
        Error::ChildKilled { .. } => Failure::Killed,
        Error::Timeout { .. } => Failure::Timeout,
        Error::Stopped => Failure::Stopped,
        _ => Failure::Other,
    }
}

/// The new generation's PID named in an upgrade's error, if any.
fn child_of(e: &Error) -> Option<u32> {
    match e {
        Error::ChildExited { pid, .. }
        | Error::ChildKilled { pid, .. }
        | Error::Timeout { pid, .. } => Some(*pid),
        _ => None,
    }
}

/// The error for an upgrade refused before it started.
fn refused(refusal: Refusal) -> Error {
    match refusal {
        Refusal::Stopped => Error::Stopped,
        Refusal::AlreadyUpgraded(child_pid) => Error::AlreadyUpgraded { child_pid },
        Refusal::InProgress(child_pid) => Error::UpgradeInProgress { child_pid },
        Refusal::NotReady => Error::NotReady,
        Refusal::Pid1 => Error::Pid1,
        Refusal::ParentAlive(parent_pid) => Error::ParentAlive { parent_pid },
    }
}

/// Raises the soft limit of open files to the hard limit (capped at
/// `OPEN_MAX` on macOS, whose `setrlimit` refuses more).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    #[cfg(target_os = "macos")]
    let hard = hard.min(10_240);
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::debug!(
            from = soft,
            to = hard,
            "raised the soft limit of open files to the hard limit (Options::raise_fd_limit)"
        ),
        Err(e) => tracing::debug!(error = %e, "cannot raise the soft limit of open files"),
    }
}

/// How many fds a generation makes room for at its start: 16 384 (a
/// 128 KiB table in the kernel) or `at_least` if more, and never more than
/// the soft `RLIMIT_NOFILE`.
fn fd_table_reserve(at_least: usize) -> usize {
    const RESERVE: u64 = 16_384;
    let want = RESERVE.max(u64::try_from(at_least).unwrap_or(u64::MAX));
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(want, |(soft, _)| soft);
    usize::try_from(soft.min(want)).unwrap_or(0)
}

/// Watches the parent pipe: EOF means the parent has exited.
fn watch_parent(pipe: OwnedFd, parent_pid: u32, exited: CancellationToken) -> Result<()> {
    std::thread::Builder::new()
        .name("tableflip-parent".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                match nix::unistd::read(&pipe, &mut buf) {
                    Ok(0) => break,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => {
                        // Someone made the pipe non-blocking: wait for it.
                        let mut fds = [nix::poll::PollFd::new(
                            pipe.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
                    }
                    Err(_) => break,
                }
            }
            // Closed before anyone is told: once `wait_for_parent` resolves,
            // no protocol fd is left open.
            drop(pipe);
            tracing::info!(parent_pid, "the parent process has exited");
            exited.cancel();
        })
        .map(|_| ())
        .map_err(|e| Error::io("cannot start the thread that watches the parent", e))
}
