//! Supervised mode: the process that was started stays, at the same PID,
//! for the life of the service. It holds the listening sockets, runs no
//! application code, and starts each generation of the service as its
//! child through the ordinary handover (plus a control channel, see
//! [`crate::control`]).
//!
//! ```text
//!   supervisor (pid S, for ever) ── holds the sockets, speaks to systemd
//!     ├─ generation 4 (draining after the upgrade)
//!     └─ generation 5 (serving)
//! ```
//!
//! - `SIGHUP` (to the supervisor, or forwarded by a generation) upgrades:
//!   the next generation is started from the executable's path as it is
//!   now; once it reports ready (with the sockets it serves on), the old
//!   one is told to drain, and the supervisor re-executes itself into the
//!   new binary in place (same PID; its state carried across `exec`, see
//!   [`carried`]). A generation that fails to start is killed; the old one
//!   keeps serving.
//! - A generation that dies while serving (a crash, `SIGKILL`, the OOM
//!   killer) is replaced from the sockets the supervisor holds, which never
//!   closed: connections wait in the listen backlog meanwhile. Replacements
//!   back off (see [`Backoff`]); a replacement that keeps failing to start
//!   ends the service with an error rather than a loop.
//! - `SIGTERM`/`SIGINT`: every generation drains (bounded by the drain
//!   timeout), then the supervisor exits 0. A second one kills them and
//!   exits 130.
//! - As PID 1 (a container) it also reaps every orphan the kernel hands it.
//!
//! It is single-threaded and event-driven: signals arrive through a
//! `signalfd` (blocked, so that none can be lost or kill the process,
//! even across its own `exec`), children's exits through `SIGCHLD` and
//! `waitpid(-1)`, messages through each generation's control socket; one
//! `poll(2)` waits for all of them, with a timeout only while a deadline
//! is pending, so an idle supervisor never wakes up.

mod carried;
mod ctl;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::control::{self, Received, ToGeneration, ToSupervisor};
use crate::error::{Error, Result};
use crate::metrics::Metric;
use crate::options::Options;
use crate::protocol::{self, EntryMeta};
use crate::report::chain;
use crate::systemd::{self, Notice, Notifier};
use crate::unixfile::SocketFile;
use crate::upgrade::launch::Launch;
use crate::{pidfile, sys};

pub(crate) use carried::VERSION as STATE_VERSION;
pub(crate) use carried::take_from_env as carried_state;

/// How long, after the drain timeout, a stopping supervisor waits for its
/// generations before it kills them.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How many replacements in a row may fail to start before the
/// supervisor gives up (and exits 1).
const MAX_FAILED_REPLACEMENTS: u32 = 5;

/// The signals the supervisor handles; they are blocked and read from a
/// `signalfd`.
const SIGNALS: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGCHLD,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Becomes the supervisor of a fresh service: never returns (the process
/// exits with the service's status).
pub(crate) fn start(opts: Options) -> ! {
    let code = match Supervisor::fresh(opts) {
        Ok(mut s) => s.run(),
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot start the supervisor");
            1
        }
    };
    std::process::exit(code)
}

/// Resumes the supervisor after it re-executed itself: never returns.
pub(crate) fn resume(opts: Options, state: carried::State) -> ! {
    let code = match Supervisor::resumed(opts, state) {
        Ok(mut s) => s.run(),
        Err(e) => {
            tracing::error!(error = %chain(&e), "the supervisor cannot resume after re-executing itself; its generations keep serving until they are stopped");
            1
        }
    };
    std::process::exit(code)
}

/// Checks what supervised mode needs before anything is started: a single
/// thread (the signal mask is per thread: a second thread with the
/// signals unblocked could take `SIGHUP` and die of it).
pub(crate) fn check_can_start() -> Result<()> {
    if !sys::single_threaded() {
        return Err(Error::Supervisor {
            reason: "the supervisor must start while the process runs a single thread: \
                     create the Upgrader in a plain `fn main` before building the tokio runtime \
                     (#[tableflip::main] does), or set TABLEFLIP_MODE=replace"
                .to_owned(),
        });
    }
    Ok(())
}

/// A socket the supervisor holds for the service.
#[derive(Debug)]
struct Held {
    /// As the generation that serves on it described it; `fd` is this
    /// process's number.
    meta: EntryMeta,
    fd: OwnedFd,
}

/// Why a generation is being started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The service's first generation.
    First,
    /// An upgrade: the serving generation drains once this one is ready.
    Upgrade,
    /// A replacement for a generation that died.
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Starting {
        purpose: Purpose,
        deadline: Option<Instant>,
    },
    Serving,
    Draining,
}

/// One generation: a child process of the supervisor.
#[derive(Debug)]
struct Generation {
    pid: u32,
    number: u64,
    role: Role,
    /// The supervisor's end of the control channel; `None` once closed.
    control: Option<OwnedFd>,
    /// The write end of the generation's parent pipe: it closes only when
    /// the supervisor exits, which the generation sees as EOF.
    parent_pipe: Arc<OwnedFd>,
    /// The read end of its readiness pipe while it starts: a generation
    /// built without supervised mode writes its byte there.
    ready_pipe: Option<OwnedFd>,
    /// Sockets it reported while starting.
    received: Vec<Held>,
    /// The executable it was started from.
    exe: PathBuf,
    started: Instant,
    /// Why the supervisor killed it, if it did.
    killed_because: Option<String>,
    /// It said (in `Ready`) that it answers `Collect`: it hands its
    /// connections and files on through the supervisor.
    hands_on: bool,
}

/// An upgrade waiting for the serving generation's connections and files
/// (`Collect`), before its new generation starts.
#[derive(Debug)]
struct Collecting {
    /// The request's id, echoed in each answer.
    id: u64,
    from: u32,
    deadline: Instant,
    received: Vec<Held>,
    /// The generation could not hand its application state over (why):
    /// the upgrade fails.
    error: Option<String>,
    /// When the generation was asked.
    asked_at: Instant,
    /// It said it is calling its application-state sources: a timeout
    /// fails the upgrade instead of starting the next generation without
    /// the state.
    state: bool,
}

/// How long an upgrade waits for the serving generation's connections and
/// files (at most the upgrade timeout). A generation answers from a thread
/// of its own, at once; one that does not is stuck, and the upgrade goes on
/// without them.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who asked for an upgrade and wants the outcome: a generation's PID and
/// its request id.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Requester {
    pid: u32,
    id: u64,
}

/// What woke the supervisor up.
#[derive(Debug, Default)]
struct Woken {
    /// Signals are pending.
    signals: bool,
    /// These generations sent something.
    gens: Vec<u32>,
    /// The control socket has connections to accept.
    ctl: bool,
    /// These control-socket connections sent something.
    clients: Vec<u64>,
    /// These control-socket connections, waiting for an outcome, hung up.
    hung_up: Vec<u64>,
}

/// The delay before a replacement starts: none for a crash after a quiet
/// minute, then doubling from 250 ms up to 8 s while crashes keep coming
/// within a minute of each other.
#[derive(Debug, Default)]
struct Backoff {
    last: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(8);
    const QUIET: Duration = Duration::from_secs(60);

    fn next(&mut self, now: Instant) -> Duration {
        self.delay = match self.last {
            Some(t) if now.duration_since(t) < Self::QUIET => {
                if self.delay.is_zero() {
                    Self::FIRST
                } else {
                    (self.delay * 2).min(Self::MAX)
                }
            }
            _ => Duration::ZERO,
        };
        self.last = Some(now);
        self.delay
    }
}

#[derive(Debug)]
struct Supervisor {
    opts: Options,
    launch: Launch,
    notify: Notifier,
    pid_file: Option<PathBuf>,
    signals: SignalFd,
    held: Vec<Held>,
    /// The number of the newest generation started.
    generation: u64,
    gens: Vec<Generation>,
    /// Whether the service has been ready (the first generation was).
    announced: bool,
    /// An upgrade was asked for and not started yet, by these requesters
    /// (and by signals, which want no answer).
    upgrade_wanted: bool,
    requesters: Vec<Requester>,
    /// Requesters of the upgrade in flight.
    in_flight: Vec<Requester>,
    upgrade_started: Option<Instant>,
    /// When the next replacement may start.
    replace_at: Option<Instant>,
    backoff: Backoff,
    failed_replacements: u32,
    /// Set once the service stops: when to kill what is left.
    stop_deadline: Option<Instant>,
    /// The files of the Unix sockets closed at the stop, removed at the
    /// exit.
    files_at_exit: Vec<crate::unixfile::SocketFile>,
    /// The stop was asked for by `SIGTERM` or `SIGINT` (a second one
    /// kills the generations).
    stop_signalled: bool,
    /// A lame-duck stop (`Options::stop_delay`): when the real stop
    /// begins.
    lame_duck_until: Option<Instant>,
    exit_code: i32,
    /// The generation whose exit is being handled, while the messages it
    /// sent before exiting are read.
    exiting: Option<u32>,
    /// An upgrade waiting for the serving generation's connections and
    /// files.
    collecting: Option<Collecting>,
    /// The id of the newest `Collect` request.
    collect_id: u64,
    /// What systemd's fd store holds for the service, as far as the
    /// supervisor knows (it put them there, or they came from
    /// `LISTEN_FDS`, which the store's sockets come back through): listener
    /// names and socket inodes.
    stored: Vec<(String, u64)>,
    buf: Vec<u8>,
    /// The control socket (`Options::control_socket`), if any.
    ctl: Option<ctl::CtlSocket>,
    /// Its connections.
    clients: Vec<ctl::Client>,
    /// The number of the newest connection.
    client_id: u64,
    /// The generation that served when the upgrade in flight started.
    upgrade_from: Option<u32>,
    /// The newest upgrade's outcome, for `status`.
    last_upgrade: Option<crate::ctl::LastUpgrade>,
    /// The binary that served before the last upgrade (its inode, open),
    /// for a rollback (`Options::probation`).
    previous_exe: Option<OwnedFd>,
    /// The generation on probation (the last upgrade's) and until when.
    probation: Option<(u32, Instant)>,
    /// A rollback happened (what): replacements run `previous_exe`.
    rolled_back: Option<String>,
    /// The rollback's generation has not been counted yet.
    rollback_uncounted: bool,
    /// When the last upgrade committed (the old generation's exit is
    /// measured from it).
    committed_at: Option<Instant>,
    /// Accepting on the control socket failed: not polled until then.
    ctl_paused_until: Option<Instant>,
}

impl Supervisor {
    fn base(opts: Options, signals: SignalFd) -> Result<Supervisor> {
        let launch = Launch::capture(opts.executable.as_deref())?;
        let notify = Notifier::from_env(&launch.env);
        let pid_file = opts.pid_file.as_ref().map(|p| launch.resolve(p));
        if let Some(path) = &pid_file {
            pidfile::check(path)?;
        }
        Ok(Supervisor {
            opts,
            launch,
            notify,
            pid_file,
            signals,
            held: Vec::new(),
            generation: 0,
            gens: Vec::new(),
            announced: false,
            upgrade_wanted: false,
            requesters: Vec::new(),
            in_flight: Vec::new(),
            upgrade_started: None,
            replace_at: None,
            backoff: Backoff::default(),
            failed_replacements: 0,
            stop_deadline: None,
            files_at_exit: Vec::new(),
            stop_signalled: false,
            lame_duck_until: None,
            exit_code: 0,
            exiting: None,
            collecting: None,
            // Not 0 at every start: an answer to a request made before a
            // re-exec never matches one made after it.
            collect_id: crate::systemd::monotonic_usec(),
            stored: Vec::new(),
            buf: Vec::new(),
            ctl: None,
            clients: Vec::new(),
            client_id: 0,
            upgrade_from: None,
            last_upgrade: None,
            previous_exe: None,
            probation: None,
            rolled_back: None,
            rollback_uncounted: false,
            committed_at: None,
            ctl_paused_until: None,
        })
    }

    /// The control socket's path, if the options ask for one.
    fn ctl_path(&self) -> Option<PathBuf> {
        self.launch.control_socket(&self.opts.control_socket)
    }

    fn fresh(opts: Options) -> Result<Supervisor> {
        let signals = block_signals()?;
        let activated = systemd::listen_fds()?;
        let mut s = Supervisor::base(opts, signals)?;
        if let Some(path) = s.ctl_path() {
            let socket = ctl::bind_socket(&path).map_err(|e| {
                Error::io(
                    format!("cannot create the control socket {}", path.display()),
                    e,
                )
            })?;
            tracing::info!(path = %path.display(), "supervisor: control socket: answering upgrade and status requests");
            s.ctl = Some(socket);
        }
        for item in activated {
            let mut meta = item.meta;
            meta.fd = item.fd.as_raw_fd();
            let held = Held { meta, fd: item.fd };
            if item.from_store && s.notify.stores() {
                // Still in the store (passing them on does not take them
                // out of it).
                if let Some(ino) = socket_inode(&held) {
                    s.stored.push((held.meta.name.clone(), ino));
                }
            }
            s.held.push(held);
        }
        tracing::info!(
            pid = std::process::id(),
            sockets = s.held.len(),
            "supervisor: starting the first generation"
        );
        s.start_generation(Purpose::First);
        Ok(s)
    }

    fn resumed(opts: Options, state: carried::State) -> Result<Supervisor> {
        let signals = block_signals()?;
        let mut s = Supervisor::base(opts, signals)?;
        state.restore(&mut s)?;
        s.resume_ctl();
        tracing::info!(
            pid = std::process::id(),
            generation = s.generation,
            generations = s.gens.len(),
            sockets = s.held.len(),
            "supervisor: running the new binary"
        );
        if !s.gens.iter().any(|g| g.role == Role::Serving) {
            // The serving generation was forgotten (not a child: a state
            // that was not this supervisor's own) or named none.
            tracing::warn!("supervisor: no generation serves after re-executing; starting one");
            s.upgrade_wanted = false;
            s.start_generation(Purpose::Replace);
        } else if s.upgrade_wanted {
            tracing::info!("supervisor: an upgrade was asked for during the last one: starting it");
            s.start_upgrade();
        }
        Ok(s)
    }

    /// The event loop; returns the exit status.
    fn run(&mut self) -> i32 {
        // Signals that arrived during `exec`, before this image read any:
        // a stop signal counts before the exit of a generation that the
        // same Ctrl-C stopped. Then children that exited meanwhile.
        self.read_signals();
        self.reap();
        loop {
            if self.stop_deadline.is_some() && self.gens.is_empty() {
                break;
            }
            self.run_timers();
            if self.stop_deadline.is_some() && self.gens.is_empty() {
                break;
            }
            let woken = match self.wait() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "supervisor: poll failed; stopping the service");
                    self.exit_code = 1;
                    self.stop("an internal error");
                    continue;
                }
            };
            if woken.signals {
                self.read_signals();
            }
            for pid in woken.gens {
                self.read_control(pid);
            }
            if woken.ctl {
                self.accept_clients();
            }
            for id in woken.clients {
                self.read_client(id);
            }
            if !woken.hung_up.is_empty() {
                tracing::debug!(
                    count = woken.hung_up.len(),
                    "supervisor: control socket: clients waiting for an outcome hung up"
                );
                self.clients.retain(|c| !woken.hung_up.contains(&c.id));
            }
        }
        self.finish()
    }

    /// Waits for a signal, a control message, a control-socket client or
    /// the next deadline; returns what is ready.
    fn wait(&mut self) -> std::io::Result<Woken> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let timeout = match self.next_deadline() {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                // Rounded up, so that the deadline has passed on waking.
                let ms = left.as_millis().saturating_add(1);
                PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
            }
        };
        let watched: Vec<(u32, BorrowedFd<'_>)> = self
            .gens
            .iter()
            .filter_map(|g| g.control.as_ref().map(|c| (g.pid, c.as_fd())))
            .collect();
        let reading: Vec<(u64, BorrowedFd<'_>)> = self
            .clients
            .iter()
            .filter(|c| c.phase == ctl::Phase::Reading)
            .map(|c| (c.id, c.fd.as_fd()))
            .collect();
        // Those waiting for an outcome: watched for hang-up only (a client
        // that gave up frees its slot).
        let waiting: Vec<(u64, BorrowedFd<'_>)> = self
            .clients
            .iter()
            .filter(|c| c.phase != ctl::Phase::Reading)
            .map(|c| (c.id, c.fd.as_fd()))
            .collect();
        let mut fds = Vec::with_capacity(watched.len() + reading.len() + waiting.len() + 2);
        fds.push(PollFd::new(self.signals.as_fd(), PollFlags::POLLIN));
        fds.extend(
            watched
                .iter()
                .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
        );
        fds.extend(
            reading
                .iter()
                .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
        );
        fds.extend(
            waiting
                .iter()
                .map(|(_, fd)| PollFd::new(*fd, PollFlags::empty())),
        );
        let paused = self.ctl_paused_until.is_some_and(|t| t > Instant::now());
        let listening = self.ctl.as_ref().filter(|_| !paused);
        if let Some(c) = listening {
            fds.push(PollFd::new(c.fd.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Woken::default()),
            Err(e) => return Err(e.into()),
        }
        let fired = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let n = watched.len();
        let r = reading.len();
        Ok(Woken {
            hung_up: waiting
                .iter()
                .zip(&fds[n + 1 + r..])
                .filter(|(_, fd)| fired(fd))
                .map(|((id, _), _)| *id)
                .collect(),
            signals: fired(&fds[0]),
            gens: watched
                .iter()
                .zip(&fds[1..=n])
                .filter(|(_, fd)| fired(fd))
                .map(|((pid, _), _)| *pid)
                .collect(),
            clients: reading
                .iter()
                .zip(&fds[n + 1..n + 1 + r])
                .filter(|(_, fd)| fired(fd))
                .map(|((id, _), _)| *id)
                .collect(),
            ctl: listening.is_some() && fds.last().is_some_and(fired),
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        let starting = self.gens.iter().filter_map(|g| match g.role {
            Role::Starting { deadline, .. } => deadline,
            _ => None,
        });
        starting
            .chain(self.replace_at)
            .chain(self.stop_deadline)
            .chain(self.collecting.as_ref().map(|c| c.deadline))
            .chain(self.lame_duck_until)
            .chain(self.probation.map(|(_, until)| until))
            .chain(self.ctl_paused_until)
            .chain(
                self.clients
                    .iter()
                    .filter(|c| c.phase == ctl::Phase::Reading)
                    .map(|c| c.deadline),
            )
            .min()
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        if self.ctl_paused_until.is_some_and(|t| t <= now) {
            self.ctl_paused_until = None;
        }
        self.ctl_timeouts(now);
        if self.probation.is_some_and(|(_, until)| until <= now) {
            self.ctl_probation_over(None);
            self.probation = None;
            if self.rolled_back.is_none() {
                self.previous_exe = None;
            }
        }
        let late: Vec<(u32, Purpose)> = self
            .gens
            .iter()
            .filter_map(|g| match g.role {
                Role::Starting {
                    purpose,
                    deadline: Some(d),
                } if d <= now && g.killed_because.is_none() => Some((g.pid, purpose)),
                _ => None,
            })
            .collect();
        for (pid, _) in late {
            let timeout = self.opts.upgrade_timeout;
            self.kill(pid, format!("was not ready within {timeout:?}"));
        }
        if self.lame_duck_until.is_some_and(|t| t <= now) {
            tracing::info!("supervisor: stop_delay over: stopping");
            self.stop_now("the end of stop_delay", true);
        }
        if self.collecting.as_ref().is_some_and(|c| c.deadline <= now) {
            let timeout = self.opts.upgrade_timeout;
            match self.collecting.as_mut() {
                Some(c) if c.state => {
                    c.error = Some(format!(
                        "its application-state sources did not return within the upgrade timeout ({timeout:?})"
                    ));
                }
                _ => tracing::warn!(
                    timeout = ?self.collect_timeout(),
                    "upgrade: the serving generation did not hand over its connections and files in time; the new generation starts without them"
                ),
            }
            self.collected();
        }
        if self.replace_at.is_some_and(|t| t <= now) {
            self.replace_at = None;
            if self.stop_deadline.is_none() && !self.starting() {
                self.start_generation(Purpose::Replace);
            }
        }
        if let Some(deadline) = self.stop_deadline {
            if deadline <= now {
                // Nothing gets a second deadline: kill, then wait for the
                // reaping alone.
                self.stop_deadline = Some(now + Duration::from_secs(3600));
                for g in &self.gens {
                    tracing::warn!(
                        pid = g.pid,
                        generation = g.number,
                        "supervisor: the generation has not exited within the drain timeout; killing it"
                    );
                }
                let pids: Vec<u32> = self.gens.iter().map(|g| g.pid).collect();
                for pid in pids {
                    signal_group_and_process(pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// Whether an upgrade or a replacement is under way (a generation
    /// starts, or an upgrade collects what it hands on).
    fn starting(&self) -> bool {
        self.collecting.is_some()
            || self
                .gens
                .iter()
                .any(|g| matches!(g.role, Role::Starting { .. }))
    }

    fn serving(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| g.role == Role::Serving)
    }

    fn read_signals(&mut self) {
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    let upgrade = self.opts.upgrade_signal;
                    match Signal::try_from(signo) {
                        Ok(Signal::SIGCHLD) => self.reap(),
                        _ if upgrade.number() == Some(signo) => {
                            tracing::info!("supervisor: {upgrade}: upgrade requested");
                            self.request_upgrade(None);
                        }
                        Ok(Signal::SIGTERM) => self.stop("SIGTERM"),
                        Ok(Signal::SIGINT) => self.stop("SIGINT"),
                        Ok(sig @ (Signal::SIGHUP | Signal::SIGUSR1 | Signal::SIGUSR2)) => {
                            self.forward(sig);
                        }
                        _ => {}
                    }
                }
                Ok(None) => return,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "supervisor: cannot read signals");
                    return;
                }
            }
        }
    }

    /// `SIGUSR1`/`SIGUSR2` are the application's: they go to the serving
    /// generation.
    fn forward(&self, signal: Signal) {
        match self.serving() {
            Some(g) => {
                tracing::info!(
                    pid = g.pid,
                    "supervisor: {signal} forwarded to the serving generation"
                );
                let _ = nix::sys::signal::kill(pid_of(g.pid), signal);
            }
            None => tracing::info!("supervisor: {signal} ignored: no generation is serving"),
        }
    }

    /// Reaps every child that has exited: generations, and any orphan the
    /// kernel handed over (as PID 1, or a subreaper).
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else {
                        continue;
                    };
                    let pid = u32::try_from(pid.as_raw()).unwrap_or(0);
                    let (text, clean) = match status {
                        WaitStatus::Exited(_, code) => {
                            (format!("exited with status {code}"), code == 0)
                        }
                        WaitStatus::Signaled(_, sig, _) => (format!("was killed by {sig}"), false),
                        _ => continue,
                    };
                    let code = match status {
                        WaitStatus::Exited(_, code) => code,
                        _ => 1,
                    };
                    self.exited(pid, &text, clean, code);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "supervisor: waitpid failed");
                    return;
                }
            }
        }
    }

    fn exited(&mut self, pid: u32, how: &str, clean: bool, code: i32) {
        if !self.gens.iter().any(|g| g.pid == pid) {
            tracing::debug!(
                pid,
                "supervisor: reaped a process that was not a generation (an orphan)"
            );
            return;
        }
        // What it sent before it exited counts first: its exit and its last
        // messages can reach one wake-up, and signals are read first. A
        // generation that said it was ready and then exited at once (a
        // service told to stop during its init) was ready.
        self.exiting = Some(pid);
        self.read_control(pid);
        self.exiting = None;
        let Some(i) = self.gens.iter().position(|g| g.pid == pid) else {
            return;
        };
        let mut g = self.gens.remove(i);
        match g.role {
            Role::Draining => {
                tracing::info!(
                    pid,
                    generation = g.number,
                    "supervisor: the previous generation {how} after its drain"
                );
                if let Some(t) = self.committed_at.take() {
                    self.measure(&Metric::OldGenerationGone {
                        seconds: crate::metrics::seconds(t.elapsed()),
                    });
                }
            }
            Role::Serving => self.serving_exited(&g, how, clean),
            Role::Starting { purpose, .. } => {
                let mut reason = g.killed_because.take().unwrap_or_else(|| how.to_owned());
                if let Some(hint) = old_protocol_hint(&g) {
                    reason.push_str(hint);
                }
                self.start_failed(&g, purpose, &reason, code);
            }
        }
        if self.collecting.as_ref().is_some_and(|c| c.from == pid) {
            // What it handed on is lost with it; the upgrade goes on.
            self.collected();
        }
        self.measure_alive();
    }

    fn serving_exited(&mut self, g: &Generation, how: &str, clean: bool) {
        if self.stop_deadline.is_some() {
            tracing::info!(
                pid = g.pid,
                generation = g.number,
                "supervisor: the generation {how}"
            );
            return;
        }
        if clean {
            tracing::info!(
                pid = g.pid,
                generation = g.number,
                "supervisor: the serving generation {how} on its own; the service stops"
            );
            self.stop("the serving generation's exit");
            return;
        }
        if let Some((_, until)) = self
            .probation
            .filter(|(pid, until)| *pid == g.pid && Instant::now() < *until)
        {
            if self.previous_exe.is_some() {
                self.roll_back(g, how, until);
                return;
            }
        }
        let delay = self.backoff.next(Instant::now());
        tracing::error!(
            pid = g.pid,
            generation = g.number,
            delay_ms = millis(delay),
            "supervisor: the serving generation {how}; starting a replacement from the sockets held here (connections wait in the backlog)"
        );
        self.notify.notify(&Notice::Status {
            text: &format!(
                "generation {} (pid {}) {how}; starting a replacement",
                g.number, g.pid
            ),
        });
        if self.starting() {
            // An upgrade in flight: its new generation takes over, or, if
            // it fails, a replacement starts then.
            return;
        }
        self.replace_at = Some(Instant::now() + delay);
    }

    /// Logs a measurement and has the serving generation record it (the
    /// supervisor has no exporter: see [`crate::metrics`]).
    fn measure(&self, m: &Metric) {
        crate::metrics::emit(m);
        if let Some(i) = self.gens.iter().position(|g| g.role == Role::Serving) {
            self.tell(i, &ToGeneration::Metric { metric: m.clone() });
        }
    }

    /// The number of generations alive, measured.
    fn measure_alive(&self) {
        self.measure(&Metric::GenerationsAlive {
            count: self.gens.len() as u64,
        });
    }

    /// The upgrade to generation `pid` has committed: its probation
    /// begins, with the binary that served before (`from`'s, else the
    /// supervisor's own, which is the last one committed) kept open.
    fn start_probation(&mut self, pid: u32, from: Option<u32>) {
        // Those waiting for the previous upgrade's probation: cut short.
        self.ctl_probation_over(None);
        self.rolled_back = None;
        self.probation = None;
        self.previous_exe = None;
        let window = self.opts.get_probation();
        if window.is_zero() {
            return;
        }
        let open = |path: String| {
            nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
        };
        let exe = from
            .and_then(|p| open(format!("/proc/{p}/exe")).ok())
            .or_else(|| open("/proc/self/exe".to_owned()).ok());
        match exe {
            Some(fd) => {
                self.previous_exe = Some(fd);
                self.probation = Some((pid, Instant::now() + window));
            }
            None => tracing::warn!(
                "supervisor: cannot keep the previous binary open: no rollback for this upgrade"
            ),
        }
    }

    /// The last upgrade's generation `g` died during its probation (which
    /// ends at `until`): the previous binary replaces it, at once. Once per
    /// upgrade: the probation ends here.
    fn roll_back(&mut self, g: &Generation, how: &str, until: Instant) {
        let window = self.opts.get_probation();
        let after = window.saturating_sub(until.saturating_duration_since(Instant::now()));
        let what = format!(
            "generation {} (pid {}) {how} {} ms after it took over, within its probation ({window:?}); rolled back to the previous binary",
            g.number,
            g.pid,
            after.as_millis()
        );
        tracing::error!(
            pid = g.pid,
            generation = g.number,
            after_ms = millis(after),
            "supervisor: ROLLBACK: the new generation {how} during its probation; starting the previous binary in its place, not the one on disk"
        );
        self.notify.notify(&Notice::Status {
            text: &format!("ROLLBACK: {what}"),
        });
        self.last_upgrade = Some(crate::ctl::LastUpgrade::rolled_back(g.number, what.clone()));
        self.ctl_probation_over(Some((g.pid, what.clone())));
        self.rolled_back = Some(what);
        self.rollback_uncounted = true;
        self.probation = None;
        if self.starting() {
            // An upgrade in flight: its new generation takes over, or, if
            // it fails, a replacement (the previous binary) starts then.
            return;
        }
        self.replace_at = Some(Instant::now());
    }

    fn start_failed(&mut self, g: &Generation, purpose: Purpose, reason: &str, code: i32) {
        match purpose {
            Purpose::First => {
                tracing::error!(
                    pid = g.pid,
                    "supervisor: the first generation {reason} before it was ready; the service does not start"
                );
                self.exit_code = if code == 0 { 1 } else { code };
                self.stop("the first generation's failure");
            }
            Purpose::Upgrade => {
                // PID 0: it never existed (the spawn itself failed).
                let error = if g.pid == 0 {
                    format!("the new generation {reason}")
                } else {
                    format!("the new generation (pid {}) {reason}", g.pid)
                };
                if self.stop_deadline.is_some() {
                    tracing::info!(error = %error, "upgrade abandoned: the service is stopping");
                } else {
                    tracing::warn!(error = %error, "upgrade failed; the serving generation keeps serving");
                }
                let current = self.serving().map(|s| (s.number, s.pid));
                self.notify.notify(&Notice::UpgradeFailedText {
                    generation: current.map_or(0, |c| c.0),
                    pid: current.map_or(0, |c| c.1),
                    error: &error,
                });
                self.reclaim_pid_file(g.pid);
                let failed = crate::ctl::Reply::Failed {
                    joined: false,
                    failure: ctl::failure_of(g.pid, reason, self.stop_deadline.is_some()),
                    error: error.clone(),
                    new_pid: (g.pid != 0).then_some(g.pid),
                    duration_ms: self.upgrade_started.map_or(0, |t| millis(t.elapsed())),
                };
                // Measured before the answers: whoever is told can read it.
                self.measure(&Metric::UpgradeFailed {
                    reason: ctl::failure_of(g.pid, reason, self.stop_deadline.is_some()),
                });
                self.ctl_upgrade_ended(&failed, g.number);
                let asked = std::mem::take(&mut self.in_flight);
                self.answer(&asked, &Err(error));
                self.upgrade_started = None;
                if self.stop_deadline.is_some() {
                    return;
                }
                if self.serving().is_none() {
                    // The serving generation died meanwhile.
                    let delay = self.backoff.next(Instant::now());
                    self.replace_at = Some(Instant::now() + delay);
                } else if self.upgrade_wanted {
                    tracing::info!(
                        "supervisor: SIGHUP arrived during the failed upgrade: trying again"
                    );
                    self.start_upgrade();
                }
            }
            Purpose::Replace => {
                self.failed_replacements += 1;
                if self.stop_deadline.is_some() {
                    return;
                }
                if self.failed_replacements >= MAX_FAILED_REPLACEMENTS {
                    tracing::error!(
                        pid = g.pid,
                        attempts = self.failed_replacements,
                        "supervisor: the replacement generation {reason} before it was ready, {} times in a row; giving up: the service stops",
                        self.failed_replacements
                    );
                    self.exit_code = 1;
                    self.stop("repeated failures to start a replacement");
                    return;
                }
                let delay = self.backoff.next(Instant::now());
                tracing::error!(
                    pid = g.pid,
                    attempt = self.failed_replacements,
                    delay_ms = millis(delay),
                    "supervisor: the replacement generation {reason} before it was ready; trying again"
                );
                self.replace_at = Some(Instant::now() + delay);
            }
        }
    }

    fn read_control(&mut self, pid: u32) {
        loop {
            let Some(g) = self.gens.iter_mut().find(|g| g.pid == pid) else {
                return;
            };
            let Some(control) = &g.control else {
                return;
            };
            match control::recv::<ToSupervisor>(control.as_fd(), &mut self.buf) {
                Ok(Some(Received::Message(msg, fds))) => self.on_message(pid, msg, fds),
                Ok(Some(Received::Unknown(what))) => {
                    tracing::warn!(pid, message = %what, "supervisor: ignoring a control message it does not understand (a newer generation?)");
                }
                Ok(None) => {
                    g.control = None;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // One packet lost; the generation is still there.
                    tracing::warn!(pid, error = %e, "supervisor: dropped a control message");
                }
                Err(e) => {
                    tracing::warn!(pid, error = %e, "supervisor: the control channel failed; closing it");
                    g.control = None;
                    return;
                }
            }
        }
    }

    fn on_message(&mut self, pid: u32, msg: ToSupervisor, fds: Vec<OwnedFd>) {
        match msg {
            ToSupervisor::Listeners { entries } => {
                let Some(g) = self.gens.iter_mut().find(|g| g.pid == pid) else {
                    return;
                };
                if !matches!(g.role, Role::Starting { .. }) {
                    tracing::warn!(
                        pid,
                        "supervisor: ignoring sockets sent by a generation that is not starting"
                    );
                    return;
                }
                if entries.len() != fds.len() {
                    let reason = format!(
                        "it sent {} socket descriptions with {} fds",
                        entries.len(),
                        fds.len()
                    );
                    self.kill(pid, reason);
                    return;
                }
                for (mut meta, fd) in entries.into_iter().zip(fds) {
                    meta.fd = fd.as_raw_fd();
                    g.received.push(Held { meta, fd });
                }
            }
            ToSupervisor::HandedOn {
                id,
                entries,
                done,
                error,
                state,
            } => {
                if state {
                    self.state_coming(pid, id);
                }
                self.on_handed_on(pid, id, (entries, fds), done, error);
            }
            ToSupervisor::Ready {
                state_version,
                hands_on,
                ..
            } => {
                let starting = self.gens.iter().position(|g| {
                    g.pid == pid
                        && matches!(g.role, Role::Starting { .. })
                        && g.killed_because.is_none()
                });
                let Some(i) = starting else {
                    return;
                };
                let upgrade = matches!(
                    self.gens[i].role,
                    Role::Starting {
                        purpose: Purpose::Upgrade,
                        ..
                    }
                );
                if upgrade && self.exiting == Some(pid) {
                    // The serving generation has not been told to drain:
                    // it keeps serving, and the upgrade fails.
                    tracing::warn!(
                        pid,
                        "upgrade: the new generation said it was ready, then exited before the upgrade took effect"
                    );
                    return;
                }
                self.gens[i].hands_on = hands_on;
                self.commit(i, state_version);
            }
            ToSupervisor::Upgrade { id } => {
                tracing::info!(pid, "supervisor: upgrade requested by a generation");
                self.request_upgrade((id != 0).then_some(Requester { pid, id }));
            }
        }
    }

    fn request_upgrade(&mut self, requester: Option<Requester>) {
        if self.stop_deadline.is_some() || self.lame_duck_until.is_some() {
            if let Some(r) = requester {
                self.answer(&[r], &Err("the service is stopping".to_owned()));
            }
            return;
        }
        self.upgrade_wanted = true;
        self.requesters.extend(requester);
        if self.starting() {
            tracing::info!(
                "supervisor: a generation is starting; the upgrade runs once it is done"
            );
            return;
        }
        if self.serving().is_none() {
            tracing::info!("supervisor: no generation is serving; the upgrade runs once one is");
            return;
        }
        self.start_upgrade();
    }

    fn start_upgrade(&mut self) {
        self.upgrade_wanted = false;
        self.in_flight = std::mem::take(&mut self.requesters);
        self.upgrade_started = Some(Instant::now());
        self.ctl_upgrade_started();
        self.measure(&Metric::UpgradeStarted);
        self.notify.notify(&Notice::Reloading {
            next: self.generation.saturating_add(1),
        });
        // The serving generation's connections and files first, if it
        // hands any on (it answers at once, from a thread of its own).
        self.collect_id = self.collect_id.wrapping_add(1);
        let id = self.collect_id;
        let asked = self
            .gens
            .iter()
            .position(|g| g.role == Role::Serving && g.hands_on)
            .filter(|&i| self.tell(i, &ToGeneration::Collect { id }));
        match asked {
            Some(i) => {
                self.collecting = Some(Collecting {
                    id,
                    from: self.gens[i].pid,
                    deadline: Instant::now() + self.collect_timeout(),
                    received: Vec::new(),
                    error: None,
                    asked_at: Instant::now(),
                    state: false,
                });
            }
            None => self.start_generation(Purpose::Upgrade),
        }
    }

    fn collect_timeout(&self) -> Duration {
        COLLECT_TIMEOUT.min(self.opts.upgrade_timeout)
    }

    /// Connections and files from the serving generation, for the upgrade
    /// that waits for them.
    fn on_handed_on(
        &mut self,
        pid: u32,
        id: u64,
        (entries, fds): (Vec<EntryMeta>, Vec<OwnedFd>),
        done: bool,
        error: Option<String>,
    ) {
        let Some(c) = self
            .collecting
            .as_mut()
            .filter(|c| c.from == pid && c.id == id)
        else {
            tracing::debug!(
                pid,
                "supervisor: ignoring connections and files nobody asked for"
            );
            return;
        };
        if entries.len() == fds.len() {
            for (mut meta, fd) in entries.into_iter().zip(fds) {
                meta.fd = fd.as_raw_fd();
                c.received.push(Held { meta, fd });
            }
        } else {
            tracing::warn!(
                pid,
                entries = entries.len(),
                fds = fds.len(),
                "upgrade: the serving generation sent connections and files that do not match their fds; they are not handed on"
            );
        }
        if error.is_some() {
            c.error = error;
        }
        if done {
            self.collected();
        }
    }

    /// The serving generation is calling its application-state sources:
    /// they get the upgrade timeout, not the collect timeout.
    fn state_coming(&mut self, pid: u32, id: u64) {
        let timeout = self.opts.upgrade_timeout;
        if let Some(c) = self
            .collecting
            .as_mut()
            .filter(|c| c.from == pid && c.id == id)
        {
            c.state = true;
            c.deadline = c.deadline.max(c.asked_at + timeout);
        }
    }

    /// The collection for the upgrade is over (done, timed out, or the
    /// generation is gone): the new generation starts with what came.
    fn collected(&mut self) {
        let Some(c) = self.collecting.take() else {
            return;
        };
        if self.stop_deadline.is_some() {
            return;
        }
        if let Some(error) = c.error {
            let reason = format!(
                "was not started: the serving generation (pid {}) cannot hand its application state over: {error}",
                c.from
            );
            self.fail_unstarted(self.generation.saturating_add(1), Purpose::Upgrade, &reason);
            return;
        }
        let held: Vec<&str> = self.held.iter().map(|h| h.meta.name.as_str()).collect();
        let (clash, extras): (Vec<Held>, Vec<Held>) = c
            .received
            .into_iter()
            .partition(|e| held.contains(&e.meta.name.as_str()));
        for e in clash {
            tracing::warn!(name = %e.meta.name, "upgrade: a connection or file has the name of a listener; it is not handed on");
        }
        if !extras.is_empty() {
            tracing::info!(
                count = extras.len(),
                "upgrade: handing the serving generation's connections and files to the new one"
            );
        }
        // Dropped on return: the new generation has its own copies now (or
        // never started).
        self.start_generation_with(Purpose::Upgrade, &extras);
    }

    /// Starts a generation; a failure to start one is handled as its
    /// failure.
    fn start_generation(&mut self, purpose: Purpose) {
        self.start_generation_with(purpose, &[]);
    }

    /// As [`start_generation`](Self::start_generation), handing on
    /// `extras` (connections and files collected for an upgrade) besides
    /// the sockets held.
    fn start_generation_with(&mut self, purpose: Purpose, extras: &[Held]) {
        let number = self.generation.saturating_add(1);
        match self.spawn(number, purpose, extras) {
            Ok(g) => {
                tracing::info!(
                    pid = g.pid,
                    generation = number,
                    executable = %g.exe.display(),
                    "supervisor: started generation {number}"
                );
                self.generation = number;
                self.gens.push(g);
                self.measure_alive();
            }
            Err(e) => {
                self.fail_unstarted(
                    number,
                    purpose,
                    &format!("could not be started: {}", chain(&e)),
                );
            }
        }
    }

    /// Generation `number` was never started (`reason`): handled as its
    /// failure.
    fn fail_unstarted(&mut self, number: u64, purpose: Purpose, reason: &str) {
        {
            {
                let g = Generation {
                    pid: 0,
                    number,
                    role: Role::Starting {
                        purpose,
                        deadline: None,
                    },
                    control: None,
                    parent_pipe: Arc::new(match sys::pipe_cloexec() {
                        Ok((_, w)) => w,
                        Err(_) => return self.spawn_impossible(reason),
                    }),
                    ready_pipe: None,
                    received: Vec::new(),
                    exe: PathBuf::new(),
                    started: Instant::now(),
                    killed_because: None,
                    hands_on: false,
                };
                self.start_failed(&g, purpose, reason, 1);
            }
        }
    }

    fn spawn_impossible(&mut self, why: &str) {
        tracing::error!("supervisor: cannot start a generation ({why}); the service stops");
        self.exit_code = 1;
        self.stop("an internal error");
    }

    fn spawn(&mut self, number: u64, purpose: Purpose, extras: &[Held]) -> Result<Generation> {
        let rollback = self
            .rolled_back
            .clone()
            .filter(|_| purpose == Purpose::Replace);
        let previous = self.previous_exe.as_ref().map(AsRawFd::as_raw_fd);
        let exe = if let (Some(_), Some(fd)) = (&rollback, previous) {
            // The previous binary, by the inode that served (open here).
            PathBuf::from(format!("/proc/self/fd/{fd}"))
        } else if purpose == Purpose::Replace && self.failed_replacements > 0 {
            // The binary at the path has just failed to replace a
            // generation that died (a broken deploy, a deleted file): the
            // next attempts run the supervisor's own binary, which is the
            // one the last upgrade committed (it re-executes into it), or
            // the one the service started with. A reload still starts
            // what the path names.
            tracing::warn!(
                "supervisor: starting the replacement from the supervisor's own binary (the last one that served), not the path"
            );
            PathBuf::from("/proc/self/exe")
        } else {
            self.launch.executable()?
        };
        let io = |what: &str| {
            let what = what.to_owned();
            move |e| Error::io(what, e)
        };
        let (parent_r, parent_w) = sys::pipe_cloexec().map_err(io("cannot create a pipe"))?;
        let (ready_r, ready_w) = sys::pipe_cloexec().map_err(io("cannot create a pipe"))?;
        let (mine, theirs) =
            sys::seqpacket_pair().map_err(io("cannot create the control socket pair"))?;
        sys::set_nonblocking(mine.as_fd()).map_err(io("cannot set up the control socket"))?;
        let me = std::process::id();
        let meta = protocol::Metadata {
            // Version 1: the generation inherits the fds across `exec`.
            version: protocol::VERSION_INHERITED,
            parent_pid: me,
            generation: number,
            entries: self
                .held
                .iter()
                .chain(extras)
                .map(|h| h.meta.clone())
                .collect(),
            supervisor: Some(protocol::SupervisorMeta {
                pid: me,
                control_fd: theirs.as_raw_fd(),
                collects: true,
            }),
            executable: rollback
                .as_ref()
                .and_then(|_| self.launch.executable().ok()),
            rollback,
        };
        let mut payload = protocol::encode(&meta)?;
        let written = sys::prefill_pipe(parent_w.as_fd(), &payload);
        payload.drain(..written);
        let mut env: Vec<_> = self
            .launch
            .env
            .iter()
            // Only the supervisor speaks to the service manager.
            .filter(|(k, _)| k != "NOTIFY_SOCKET")
            .cloned()
            .collect();
        env.push((
            protocol::ENV_HANDOVER.into(),
            protocol::env_value(parent_r.as_raw_fd(), ready_w.as_raw_fd()).into(),
        ));
        env.push((
            protocol::ENV_HANDOVER_ID.into(),
            protocol::id_value(&[parent_r.as_fd(), ready_w.as_fd()])?.into(),
        ));
        let mut argv = self.launch.args.clone();
        if argv.is_empty() {
            argv.push(exe.clone().into_os_string());
        }
        let mut inherit: Vec<_> = self
            .held
            .iter()
            .chain(extras)
            .map(|h| h.fd.as_raw_fd())
            .collect();
        inherit.extend([
            parent_r.as_raw_fd(),
            ready_w.as_raw_fd(),
            theirs.as_raw_fd(),
        ]);
        let spec = sys::SpawnSpec {
            exe: &exe,
            argv: &argv,
            env: &env,
            cwd: &self.launch.start_dir,
            inherit: &inherit,
        };
        let spawn_error = |source| Error::Spawn {
            path: exe.clone(),
            source,
        };
        let pid = match sys::spawn_inheriting(&spec) {
            Some(r) => r.map_err(spawn_error)?,
            None => {
                use std::os::unix::process::CommandExt;
                let mut cmd = std::process::Command::new(&exe);
                if let Some(arg0) = argv.first() {
                    cmd.arg0(arg0);
                }
                cmd.process_group(0)
                    .args(argv.iter().skip(1))
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .current_dir(&self.launch.start_dir);
                sys::inherit_across_exec(&mut cmd, inherit);
                // Reaped by `reap`, as every child of the supervisor.
                cmd.spawn().map_err(spawn_error)?.id()
            }
        };
        drop((parent_r, ready_w, theirs));
        let parent_pipe = Arc::new(parent_w);
        if !payload.is_empty() {
            crate::upgrade::spawn::send_metadata(Arc::clone(&parent_pipe), payload, pid);
        }
        let deadline = match purpose {
            // systemd's TimeoutStartSec= (or the operator) bounds the start.
            Purpose::First => None,
            Purpose::Upgrade | Purpose::Replace => Some(Instant::now() + self.opts.upgrade_timeout),
        };
        Ok(Generation {
            pid,
            number,
            role: Role::Starting { purpose, deadline },
            control: Some(mine),
            parent_pipe,
            ready_pipe: Some(ready_r),
            received: Vec::new(),
            exe,
            started: Instant::now(),
            killed_because: None,
            hands_on: false,
        })
    }

    /// The generation `i` is ready: it takes over.
    /// `reads_state`: the newest carried-state version the generation's
    /// binary reads (from its `Ready`).
    fn commit(&mut self, i: usize, reads_state: u32) {
        let Role::Starting { purpose, .. } = self.gens[i].role else {
            return;
        };
        let (pid, number) = (self.gens[i].pid, self.gens[i].number);
        let elapsed_ms = millis(self.gens[i].started.elapsed());
        let received = std::mem::take(&mut self.gens[i].received);
        self.gens[i].role = Role::Serving;
        self.gens[i].ready_pipe = None;
        self.replace_held(received);
        self.sync_store();
        let previous: Vec<usize> = (0..self.gens.len())
            .filter(|&j| j != i && self.gens[j].role == Role::Serving)
            .collect();
        for j in previous {
            self.gens[j].role = Role::Draining;
            self.tell(
                j,
                &ToGeneration::Drain {
                    successor: Some(pid),
                },
            );
        }
        match purpose {
            Purpose::First => {
                self.announce_ready(number, pid);
                tracing::info!(
                    pid,
                    generation = number,
                    init_ms = elapsed_ms,
                    "supervisor: the service is ready"
                );
            }
            Purpose::Replace => {
                self.failed_replacements = 0;
                if std::mem::take(&mut self.rollback_uncounted) {
                    self.measure(&Metric::RolledBack);
                }
                self.notify.notify(&Notice::Serving {
                    generation: number,
                    pid,
                    note: "replaced a generation that died",
                });
                tracing::info!(
                    pid,
                    generation = number,
                    init_ms = elapsed_ms,
                    "supervisor: the replacement generation serves"
                );
            }
            Purpose::Upgrade => {
                let total_ms = self
                    .upgrade_started
                    .take()
                    .map_or(elapsed_ms, |t| millis(t.elapsed()));
                self.notify.notify(&Notice::Serving {
                    generation: number,
                    pid,
                    note: &format!("upgraded in {total_ms} ms"),
                });
                tracing::info!(
                    pid,
                    generation = number,
                    elapsed_ms = total_ms,
                    "upgrade: the new generation is ready; the previous one drains"
                );
                let asked = std::mem::take(&mut self.in_flight);
                self.answer(&asked, &Ok((pid, number)));
                let from = self.upgrade_from;
                let upgraded = crate::ctl::Reply::Upgraded {
                    joined: false,
                    old_pid: from.unwrap_or(0),
                    new_pid: pid,
                    generation: number,
                    duration_ms: total_ms,
                    probation_ms: None,
                };
                self.start_probation(pid, from);
                self.ctl_upgrade_ended(&upgraded, number);
                self.committed_at = Some(Instant::now());
                self.measure(&Metric::UpgradeSucceeded {
                    ready_seconds: crate::metrics::seconds(Duration::from_millis(total_ms)),
                });
                self.measure_alive();
                if self.stop_deadline.is_none() {
                    let (exe, reads) = (self.gens[i].exe.clone(), reads_state);
                    if reads >= STATE_VERSION {
                        self.reexec(pid, &exe);
                    } else {
                        tracing::warn!(
                            executable = %exe.display(),
                            reads,
                            writes = STATE_VERSION,
                            "supervisor: the new binary cannot read this supervisor's state (an older tableflip); the supervisor keeps running the previous binary, the generations run the new one; restart the service to replace the supervisor too"
                        );
                    }
                }
            }
        }
        if !self.announced {
            // A replacement or upgrade before the first readiness.
            self.announce_ready(number, pid);
        }
        if self.upgrade_wanted && self.stop_deadline.is_none() && !self.starting() {
            self.start_upgrade();
        }
    }

    fn announce_ready(&mut self, number: u64, pid: u32) {
        if let Some(path) = &self.pid_file {
            if let Err(e) = pidfile::write(path, std::process::id()) {
                tracing::warn!(error = %chain(&e), "supervisor: cannot write the PID file");
            }
        }
        if !self.announced {
            self.announced = true;
            // `READY=1` and the status in one datagram, from the main
            // process itself: no `MAINPID=`.
            self.notify.notify(&Notice::Serving {
                generation: number,
                pid,
                note: "started",
            });
        }
    }

    /// The sockets the new generation serves on become the ones held; the
    /// files of Unix sockets no longer served are removed.
    fn replace_held(&mut self, received: Vec<Held>) {
        let kept: Vec<PathBuf> = received
            .iter()
            .filter_map(|h| self.file_of(h).map(|f| f.path))
            .collect();
        let old = std::mem::replace(&mut self.held, received);
        for h in &old {
            if h.meta.activated {
                continue;
            }
            if let Some(file) = self.file_of(h) {
                if !kept.contains(&file.path) {
                    file.remove();
                }
            }
        }
    }

    /// Keeps systemd's fd store in step with the sockets held: a socket no
    /// longer held (a listener moved to another address, or gone from the
    /// release) is removed from it, then each held socket not in it yet is
    /// put there under its listener's name. Sockets that came from
    /// `LISTEN_FDS` are there already, or belong to a socket unit.
    fn sync_store(&mut self) {
        if !self.notify.stores() {
            return;
        }
        for name in crate::systemd::take_superseded() {
            self.notify.unstore_fd(&name);
            // The socket kept for it (if stored) goes back below.
            self.stored.retain(|(n, _)| *n != name);
        }
        let now: Vec<(String, u64)> = self
            .held
            .iter()
            .filter_map(|h| Some((h.meta.name.clone(), socket_inode(h)?)))
            .collect();
        let mut gone: Vec<String> = self
            .stored
            .iter()
            .filter(|s| !now.contains(s))
            .map(|(name, _)| name.clone())
            .collect();
        gone.dedup();
        for name in gone {
            tracing::info!(listener = %name, "supervisor: removing the socket no longer served from systemd's fd store");
            self.notify.unstore_fd(&name);
            self.stored.retain(|(n, _)| *n != name);
        }
        for h in &self.held {
            let Some(ino) = socket_inode(h) else {
                continue;
            };
            let key = (h.meta.name.clone(), ino);
            if h.meta.activated || self.stored.contains(&key) {
                continue;
            }
            if let Some(max) = self.notify.store_max() {
                if self.stored.len() >= usize::try_from(max).unwrap_or(usize::MAX) {
                    tracing::warn!(listener = %h.meta.name, max, "supervisor: not kept in systemd's fd store: FileDescriptorStoreMax={max} is full; raise it to the number of listeners");
                    continue;
                }
            }
            if !self.stored.iter().any(|(n, _)| *n == h.meta.name) {
                // Whatever the store may hold under the name (left by a
                // supervisor that could not say, a removal systemd did not
                // take) goes first: two under one name would both come
                // back.
                self.notify.unstore_fd(&h.meta.name);
            }
            if self.notify.store_fd(&h.meta.name, h.fd.as_fd()) {
                tracing::info!(listener = %h.meta.name, "supervisor: kept in systemd's fd store (it survives restarts and crashes)");
                self.stored.push(key);
            }
        }
    }

    /// Whether systemd's fd store holds this socket: its Unix socket file
    /// then stays when the service stops, for the next start.
    fn in_store(&self, h: &Held) -> bool {
        socket_inode(h).is_some_and(|ino| {
            self.stored
                .iter()
                .any(|(n, i)| *n == h.meta.name && *i == ino)
        })
    }

    fn file_of(&self, h: &Held) -> Option<SocketFile> {
        let unix = h
            .meta
            .network
            .as_deref()
            .is_some_and(|n| n.starts_with("unix"));
        if !unix {
            return None;
        }
        crate::fds::socket_file(h.fd.as_fd(), &h.meta, &self.launch.start_dir)
    }

    fn answer(&self, who: &[Requester], outcome: &std::result::Result<(u32, u64), String>) {
        for r in who {
            let Some(j) = self.gens.iter().position(|g| g.pid == r.pid) else {
                continue;
            };
            let msg = match outcome {
                Ok((pid, generation)) => ToGeneration::Upgraded {
                    id: r.id,
                    pid: *pid,
                    generation: *generation,
                },
                Err(error) => ToGeneration::UpgradeFailed {
                    id: r.id,
                    error: error.clone(),
                },
            };
            self.tell(j, &msg);
        }
    }

    /// Sends `msg` to generation `i`; whether it went.
    fn tell(&self, i: usize, msg: &ToGeneration) -> bool {
        let g = &self.gens[i];
        let Some(control) = &g.control else {
            return false;
        };
        match control::send(control.as_fd(), msg, &[], true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pid = g.pid, error = %e, "supervisor: cannot send to the generation");
                false
            }
        }
    }

    /// Kills a starting (or misbehaving) generation and its process
    /// group; its exit is handled when it is reaped.
    fn kill(&mut self, pid: u32, reason: String) {
        let Some(g) = self.gens.iter_mut().find(|g| g.pid == pid) else {
            return;
        };
        if g.killed_because.is_none() {
            g.killed_because = Some(format!("{reason}; it was killed"));
        }
        if self.exiting == Some(pid) {
            // Reaped already: the number may be another process's now.
            return;
        }
        signal_group_and_process(pid, Signal::SIGKILL);
    }

    /// A stop signal (or a fatal condition): every generation drains; the
    /// loop ends once all have exited.
    fn stop(&mut self, why: &str) {
        let by_signal = why == "SIGTERM" || why == "SIGINT";
        if by_signal && self.stop_deadline.is_none() {
            let delay = self.opts.stop_delay;
            if self.lame_duck_until.take().is_some() {
                tracing::info!("supervisor: {why}: ending stop_delay early: stopping");
            } else if !delay.is_zero() && !self.starting() {
                // A lame duck: the generations keep serving, the sockets
                // stay open; no upgrade starts. (During an upgrade the
                // stop is at once, as without a delay.)
                tracing::info!(
                    delay_ms = millis(delay),
                    "supervisor: {why}: stopping after stop_delay; still accepting meanwhile (another {why} stops at once)"
                );
                self.lame_duck_until = Some(Instant::now() + delay);
                if self.announced {
                    self.notify.notify(&Notice::LameDuck { delay });
                }
                let asked: Vec<Requester> = self.requesters.drain(..).collect();
                self.answer(&asked, &Err("the service is stopping".to_owned()));
                self.ctl_stopping(false);
                self.upgrade_wanted = false;
                return;
            }
        }
        self.stop_now(why, by_signal);
    }

    fn stop_now(&mut self, why: &str, by_signal: bool) {
        self.lame_duck_until = None;
        if self.stop_deadline.is_some() {
            if by_signal && !self.stop_signalled {
                // The stop began for another reason (the serving generation
                // exited, say, because the same Ctrl-C reached it first):
                // this is the first stop signal, not a second.
                self.stop_signalled = true;
                tracing::info!(
                    "supervisor: {why}: already stopping; the generations drain (a second SIGTERM or SIGINT stops at once)"
                );
            } else if by_signal {
                tracing::warn!(
                    "supervisor: second stop signal: killing the generations and exiting at once"
                );
                self.exit_code = 130;
                let pids: Vec<u32> = self.gens.iter().map(|g| g.pid).collect();
                for pid in pids {
                    signal_group_and_process(pid, Signal::SIGKILL);
                }
            }
            return;
        }
        tracing::info!(
            generations = self.gens.len(),
            timeout = ?self.opts.drain_timeout,
            "supervisor: {why}: stopping; the generations drain (a second SIGTERM or SIGINT stops at once)"
        );
        self.stop_deadline = Some(Instant::now() + self.opts.drain_timeout + STOP_GRACE);
        self.stop_signalled = by_signal;
        self.replace_at = None;
        // An upgrade that waited for connections and files is abandoned.
        self.collecting = None;
        if self.announced {
            self.notify.notify(&Notice::Stopping);
        }
        let asked: Vec<Requester> = self
            .requesters
            .drain(..)
            .chain(self.in_flight.drain(..))
            .collect();
        self.answer(&asked, &Err("the service is stopping".to_owned()));
        self.ctl_stopping(true);
        self.upgrade_wanted = false;
        let all: Vec<(usize, Role, u32)> = self
            .gens
            .iter()
            .enumerate()
            .map(|(i, g)| (i, g.role, g.pid))
            .collect();
        for (i, role, pid) in all {
            match role {
                Role::Starting { .. } => self.kill(pid, "the service is stopping".to_owned()),
                Role::Serving | Role::Draining => {
                    self.tell(i, &ToGeneration::Drain { successor: None });
                }
            }
        }
        // The generations close their handles as they start draining; with
        // the supervisor's closed too, a new connection is refused at once
        // (a load balancer tries elsewhere) instead of waiting in a backlog
        // nobody accepts from any more. Socket files go at the exit, but
        // for those systemd holds (socket units, the fd store): the next
        // start serves on them again.
        for h in std::mem::take(&mut self.held) {
            if !h.meta.activated && !self.in_store(&h) {
                if let Some(file) = self.file_of(&h) {
                    self.files_at_exit.push(file);
                }
            }
        }
    }

    /// After the last generation has exited: removes what the service
    /// owned, returns the exit status.
    fn finish(&mut self) -> i32 {
        for h in std::mem::take(&mut self.held) {
            if h.meta.activated || self.in_store(&h) {
                continue;
            }
            if let Some(file) = self.file_of(&h) {
                file.remove();
            }
        }
        for file in std::mem::take(&mut self.files_at_exit) {
            file.remove();
        }
        self.clients.clear();
        if let Some(file) = self.ctl.take().and_then(|c| c.file) {
            file.remove();
        }
        if let Some(path) = &self.pid_file {
            pidfile::remove_if_ours(path, std::process::id());
        }
        tracing::info!(
            status = self.exit_code,
            "supervisor: every generation has exited; exiting"
        );
        self.exit_code
    }

    /// A failed new generation that wrote the PID file (one built without
    /// supervised mode does) leaves it naming itself: it names the
    /// supervisor again.
    fn reclaim_pid_file(&self, child: u32) {
        let Some(path) = &self.pid_file else {
            return;
        };
        if pidfile::names(path, child) {
            if let Err(e) = pidfile::write(path, std::process::id()) {
                tracing::warn!(error = %chain(&e), "supervisor: cannot restore the PID file");
            }
        }
    }

    /// Re-executes this process into the new binary, keeping its PID, its
    /// children and its state. On failure, carries on with the old binary.
    /// Re-executes the supervisor into the binary that the generation
    /// `pid` runs: `/proc/<pid>/exe`, that very file, not whatever is at
    /// the path `exe` by now (a deploy may have replaced it since the
    /// generation started, with a binary nobody checked, or the path may
    /// name a wrapper script). The path the next generations start from
    /// is carried in the state.
    fn reexec(&mut self, pid: u32, exe: &std::path::Path) {
        let state = match carried::Outgoing::capture(self) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "supervisor: cannot save its state; it keeps running the previous binary until the service restarts");
                return;
            }
        };
        let mut env = self.launch.env.clone();
        env.push((carried::ENV.into(), state.env_value().into()));
        let mut argv = self.launch.args.clone();
        if argv.is_empty() {
            argv.push(exe.as_os_str().to_owned());
        }
        let running = PathBuf::from(format!("/proc/{pid}/exe"));
        tracing::info!(executable = %exe.display(), generation_pid = pid, "supervisor: re-executing itself into the new generation's binary (same pid)");
        let error = state.exec(self, &running, &argv, &env);
        tracing::warn!(
            executable = %exe.display(),
            generation_pid = pid,
            error = %error,
            "supervisor: cannot re-execute itself into the new generation's binary; it keeps running the previous one (the generations run the new one)"
        );
    }
}

/// The inode of a held socket: the same in every process that has it.
fn socket_inode(h: &Held) -> Option<u64> {
    sys::socket_inode_of_number(h.fd.as_raw_fd())
}

/// Blocks the supervisor's signals and opens a `signalfd` for them.
fn block_signals() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in SIGNALS {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| Error::io("cannot block the supervisor's signals", e))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::io("cannot create a signalfd", e))
}

/// A duration in whole milliseconds, for the log and the status line.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Signals a generation and, while it still leads its own process group
/// (it starts in one, and rejoins the supervisor's once ready), that
/// group: what it started during its initialisation goes with it. Safe to
/// address by PID: only the supervisor reaps its children, so an unreaped
/// child's PID (and group ID) is still its own.
fn signal_group_and_process(pid: u32, signal: Signal) {
    let target = pid_of(pid);
    if nix::unistd::getpgid(Some(target)).ok() == Some(target) {
        let _ = nix::sys::signal::killpg(target, signal);
    }
    let _ = nix::sys::signal::kill(target, signal);
}

/// Why a starting generation may never have reported ready: it wrote the
/// replace mode's readiness byte instead (built with a tableflip that has
/// no supervised mode).
fn old_protocol_hint(g: &Generation) -> Option<&'static str> {
    let pipe = g.ready_pipe.as_ref()?;
    let _ = sys::set_nonblocking(pipe.as_fd());
    let mut byte = [0u8; 1];
    matches!(nix::unistd::read(pipe, &mut byte), Ok(1)).then_some(
        " (it reported ready the replace-mode way: its binary was built with a tableflip without supervised mode; restart the service to run it)",
    )
}
