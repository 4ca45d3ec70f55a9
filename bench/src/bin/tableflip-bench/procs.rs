//! Processes under test: starting the services, upgrading them, and seeing
//! precisely when each generation is ready and when each one is gone.
//!
//! - **Gone.** The driver makes itself a child subreaper
//!   (`PR_SET_CHILD_SUBREAPER`), so every generation, started by the driver
//!   or by a previous generation that has exited since, is reparented to
//!   the driver and reaped by its reaper thread, which timestamps each exit
//!   as `waitpid` returns it.
//! - **Ready.** Each service gets its own `NOTIFY_SOCKET`, a Unix datagram
//!   socket the driver listens on (what systemd does for `Type=notify`
//!   services); a generation is ready when a datagram with `READY=1` and
//!   `MAINPID=<its pid>` arrives. Both libraries speak this protocol.
//! - **PID file.** As a cross-check, an inotify watch on the service's
//!   directory timestamps every replacement of its PID file (both
//!   libraries rename a temporary file over it at readiness).
//!
//! Go's tableflip does not speak the notify protocol: its service sends
//! `READY=1` with its own `MAINPID=` right after the library's `Ready()`
//! returns (which has written the PID file and told the parent), as a
//! `Type=notify` service built on it would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::Error;

/// How long any single step (readiness, exit) may take before the driver
/// gives up on it.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(40);

/// Events recorded by a background thread, waited for with a deadline.
#[derive(Debug)]
pub(crate) struct Log<T> {
    events: Mutex<Vec<T>>,
    changed: Condvar,
}

impl<T: Clone> Log<T> {
    fn new() -> Self {
        Log {
            events: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }
    }

    fn push(&self, event: T) {
        lock(&self.events).push(event);
        self.changed.notify_all();
    }

    /// How many events have been recorded: a mark for [`Log::wait`].
    pub(crate) fn mark(&self) -> usize {
        lock(&self.events).len()
    }

    /// The first event recorded at or after `from` that matches, waiting
    /// until `deadline`.
    pub(crate) fn wait(
        &self,
        from: usize,
        deadline: Instant,
        pred: impl Fn(&T) -> bool,
    ) -> Option<T> {
        let mut events = lock(&self.events);
        let mut seen = from;
        loop {
            if let Some(e) = events.iter().skip(seen).find(|e| pred(e)) {
                return Some(e.clone());
            }
            seen = events.len();
            let left = deadline.checked_duration_since(Instant::now())?;
            events = self
                .changed
                .wait_timeout(events, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One process exit, as `waitpid` reported it.
#[derive(Debug, Clone)]
pub(crate) struct Exit {
    pub(crate) pid: u32,
    pub(crate) at: Instant,
    pub(crate) status: String,
}

/// Reaps every child and orphan of the driver, timestamping each exit.
#[derive(Debug)]
pub(crate) struct Reaper {
    exits: Mutex<HashMap<u32, Exit>>,
    changed: Condvar,
}

impl Reaper {
    /// Makes the driver a child subreaper and starts the reaper thread.
    /// From here on, nothing else in the driver may wait for a child.
    pub(crate) fn start() -> Result<Arc<Reaper>, Error> {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| Error::msg(format!("cannot become a child subreaper: {e}")))?;
        let reaper = Arc::new(Reaper {
            exits: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        });
        let this = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || this.run())
            .map_err(|e| Error::msg(format!("cannot start the reaper thread: {e}")))?;
        Ok(reaper)
    }

    fn run(&self) {
        loop {
            match nix::sys::wait::waitpid(None::<Pid>, None) {
                Ok(status) => {
                    let at = Instant::now();
                    let (pid, text) = match status {
                        WaitStatus::Exited(pid, code) => (pid, format!("exit {code}")),
                        WaitStatus::Signaled(pid, sig, _) => (pid, format!("killed by {sig}")),
                        _ => continue,
                    };
                    let pid = pid.as_raw().unsigned_abs();
                    lock(&self.exits).insert(
                        pid,
                        Exit {
                            pid,
                            at,
                            status: text,
                        },
                    );
                    self.changed.notify_all();
                }
                // No child right now: one will be started soon. (While a
                // service runs there is always one, and `waitpid` blocks.)
                Err(nix::errno::Errno::ECHILD) => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => {}
            }
        }
    }

    /// When `pid`, known to be alive at `alive_at`, exited, waiting for it
    /// until `deadline`. (PIDs are reused: an exit recorded before
    /// `alive_at` was another process's.)
    pub(crate) fn wait_exit(&self, pid: u32, alive_at: Instant, deadline: Instant) -> Option<Exit> {
        let mut exits = lock(&self.exits);
        loop {
            if let Some(e) = exits.get(&pid).filter(|e| e.at >= alive_at) {
                return Some(e.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            exits = self
                .changed
                .wait_timeout(exits, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether `pid`, known to be alive at `alive_at`, has exited (and
    /// been reaped).
    pub(crate) fn exited(&self, pid: u32, alive_at: Instant) -> bool {
        lock(&self.exits)
            .get(&pid)
            .is_some_and(|e| e.at >= alive_at)
    }
}

/// One datagram received on a service's `NOTIFY_SOCKET`.
#[derive(Debug, Clone)]
pub(crate) struct Notification {
    pub(crate) at: Instant,
    pub(crate) ready: bool,
    /// The bench's own `BENCH_STARTED=1` (see `tableflip_bench::announce_start`).
    pub(crate) started: bool,
    pub(crate) main_pid: Option<u32>,
}

/// One replacement of a service's PID file.
#[derive(Debug, Clone)]
pub(crate) struct PidFileEvent {
    pub(crate) at: Instant,
    pub(crate) pid: u32,
}

/// Background threads that stop when this is dropped.
#[derive(Debug)]
struct Watchers {
    stop: Arc<AtomicBool>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub(crate) fn listen_notify(
    path: &Path,
    stop: Arc<AtomicBool>,
) -> Result<Arc<Log<Notification>>, Error> {
    let _ = std::fs::remove_file(path);
    let socket = UnixDatagram::bind(path)
        .map_err(|e| Error::msg(format!("cannot bind {}: {e}", path.display())))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| Error::msg(format!("cannot set a timeout on the notify socket: {e}")))?;
    let log = Arc::new(Log::new());
    let out = Arc::clone(&log);
    std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]);
                let mut ready = false;
                let mut started = false;
                let mut main_pid = None;
                for line in text.lines() {
                    match line.split_once('=') {
                        Some(("READY", "1")) => ready = true,
                        Some(("BENCH_STARTED", "1")) => started = true,
                        Some(("MAINPID", pid)) => main_pid = pid.trim().parse().ok(),
                        _ => {}
                    }
                }
                out.push(Notification {
                    at,
                    ready,
                    started,
                    main_pid,
                });
            }
        })
        .map_err(|e| Error::msg(format!("cannot start the notify thread: {e}")))?;
    Ok(log)
}

fn watch_pid_file(
    dir: &Path,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> Result<Arc<Log<PidFileEvent>>, Error> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| Error::msg(format!("inotify: {e}")))?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
        )
        .map_err(|e| Error::msg(format!("inotify watch on {}: {e}", dir.display())))?;
    let log = Arc::new(Log::new());
    let out = Arc::clone(&log);
    let path = dir.join(name);
    std::thread::Builder::new()
        .name("pidfile".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&inotify),
                    nix::poll::PollFlags::POLLIN,
                )];
                if !matches!(nix::poll::poll(&mut fds, 100u16), Ok(n) if n > 0) {
                    continue;
                }
                let Ok(events) = inotify.read_events() else {
                    continue;
                };
                let at = Instant::now();
                for event in events {
                    if event.name.as_deref() != Some(std::ffi::OsStr::new(name)) {
                        continue;
                    }
                    let pid = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse().ok());
                    if let Some(pid) = pid {
                        out.push(PidFileEvent { at, pid });
                    }
                }
            }
        })
        .map_err(|e| Error::msg(format!("cannot start the PID file thread: {e}")))?;
    Ok(log)
}

/// The services under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// `#[tableflip::main]` + `tableflip::http::Server`.
    Tableflip,
    /// ecdysis's `TokioEcdysisBuilder` + hyper's graceful shutdown.
    Ecdysis,
    /// Go's `github.com/cloudflare/tableflip` + `net/http`'s
    /// `Server.Shutdown` (`bench/go/`), when Go is there to build it.
    #[serde(rename = "go-tableflip")]
    GoTableflip,
    /// Plain `#[tokio::main]` + hyper, no upgrades.
    Tokio,
}

impl Kind {
    /// The name used in tables and plots.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Tableflip => "tableflip",
            Kind::Ecdysis => "ecdysis",
            Kind::GoTableflip => "Go tableflip",
            Kind::Tokio => "plain tokio",
        }
    }

    /// The service binary's file name.
    pub(crate) fn binary(self) -> &'static str {
        match self {
            Kind::Tableflip => "bench-tableflip",
            Kind::Ecdysis => "bench-ecdysis",
            Kind::GoTableflip => "bench-go-tableflip",
            Kind::Tokio => "bench-tokio",
        }
    }
}

/// What the services need from the driver: where they live and the
/// reaper.
#[derive(Debug, Clone)]
pub(crate) struct Lab {
    pub(crate) bin_dir: PathBuf,
    pub(crate) run_dir: PathBuf,
    pub(crate) reaper: Arc<Reaper>,
    /// Whether Go's tableflip service was built (it needs Go and the
    /// Debian package of the library).
    pub(crate) go: bool,
    counter: Arc<Mutex<u32>>,
}

impl Lab {
    pub(crate) fn new(bin_dir: PathBuf, run_dir: PathBuf, reaper: Arc<Reaper>, go: bool) -> Lab {
        Lab {
            bin_dir,
            run_dir,
            reaper,
            go,
            counter: Arc::new(Mutex::new(0)),
        }
    }

    /// The libraries compared: tableflip, ecdysis, and Go's tableflip
    /// when it could be built.
    pub(crate) fn peers(&self) -> Vec<Kind> {
        let mut kinds = vec![Kind::Tableflip, Kind::Ecdysis];
        if self.go {
            kinds.push(Kind::GoTableflip);
        }
        kinds
    }

    pub(crate) fn next_dir(&self, kind: Kind) -> Result<PathBuf, Error> {
        let n = {
            let mut c = lock(&self.counter);
            *c += 1;
            *c
        };
        let dir = self.run_dir.join(format!("{n:04}-{}", kind.binary()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::msg(format!("cannot create {}: {e}", dir.display())))?;
        Ok(dir)
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub(crate) fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::msg(format!("cannot find a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::msg(format!("cannot find a free port: {e}")))
}

/// How a fresh start went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    /// From just before `spawn` to `READY=1` on the notify socket.
    pub(crate) ready: Duration,
    /// From just before `spawn` to the service's `BENCH_STARTED=1` (its
    /// own code runs), when it was asked to announce it.
    pub(crate) started: Option<Duration>,
}

/// How one upgrade went, each duration from the `SIGHUP`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Upgrade {
    /// The driver sent `SIGHUP`.
    pub(crate) hup_at: Instant,
    /// `READY=1` with `MAINPID=<new>` arrived.
    pub(crate) ready: Duration,
    /// The PID file named the new generation (`None` if the event was
    /// missed).
    pub(crate) pid_file: Option<Duration>,
    /// The old generation was reaped.
    pub(crate) gone: Duration,
    /// The new generation's own code runs (`BENCH_STARTED=1`), when it was
    /// asked to announce it.
    pub(crate) started: Option<Duration>,
}

/// A running service: its current generation and the ones before.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    pub(crate) dir: PathBuf,
    /// The generation that serves now.
    pub(crate) pid: u32,
    /// Every generation, oldest first, with a time it was known alive.
    pub(crate) generations: Vec<(u32, Instant)>,
    reaper: Arc<Reaper>,
    notify: Arc<Log<Notification>>,
    pid_file: Arc<Log<PidFileEvent>>,
    _watchers: Watchers,
    stopped: bool,
}

impl Service {
    /// Starts `kind` fresh on `addr` with `listeners` listeners in all, and
    /// waits until it is ready.
    pub(crate) fn start(
        lab: &Lab,
        kind: Kind,
        addr: SocketAddr,
        listeners: usize,
    ) -> Result<(Service, Start), Error> {
        Service::start_with(lab, kind, addr, listeners, None)
    }

    /// As [`Service::start`]; with `Some(ballast_mib)`, the service (and
    /// every generation after it, which inherits its environment) holds
    /// `ballast_mib` MiB of touched memory from before its readiness on
    /// (`BENCH_BALLAST_MIB`), and announces when its own code starts
    /// (`BENCH_ANNOUNCE_START`). With `None`, neither variable is set.
    pub(crate) fn start_with(
        lab: &Lab,
        kind: Kind,
        addr: SocketAddr,
        listeners: usize,
        ballast_mib: Option<usize>,
    ) -> Result<(Service, Start), Error> {
        Service::start_env(lab, kind, addr, listeners, ballast_mib, &[])
    }

    /// As [`Service::start_with`], with `env` set for the service too.
    pub(crate) fn start_env(
        lab: &Lab,
        kind: Kind,
        addr: SocketAddr,
        listeners: usize,
        ballast_mib: Option<usize>,
        env: &[(&str, String)],
    ) -> Result<(Service, Start), Error> {
        Service::start_binary(lab, kind, kind.binary(), addr, listeners, ballast_mib, env)
    }

    /// As [`Service::start_env`], running `binary` (of the bin directory)
    /// as a service of `kind`.
    pub(crate) fn start_binary(
        lab: &Lab,
        kind: Kind,
        binary: &str,
        addr: SocketAddr,
        listeners: usize,
        ballast_mib: Option<usize>,
        env: &[(&str, String)],
    ) -> Result<(Service, Start), Error> {
        let dir = lab.next_dir(kind)?;
        let stop = Arc::new(AtomicBool::new(false));
        let notify_path = dir.join("notify.sock");
        let notify = listen_notify(&notify_path, Arc::clone(&stop))?;
        let pid_file = watch_pid_file(&dir, "pid", Arc::clone(&stop))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .map_err(|e| Error::msg(format!("cannot open the service log: {e}")))?;
        let exe = lab.bin_dir.join(binary);
        let mut cmd = Command::new(&exe);
        // The peers' process model: each generation replaces the last
        // (the supervised mode has its own scenario).
        cmd.env("TABLEFLIP_MODE", "replace")
            .env("BENCH_ADDR", addr.to_string())
            .env("BENCH_LISTENERS", listeners.to_string())
            .env("PID_FILE", dir.join("pid"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG")
            .env_remove("BENCH_BALLAST_MIB")
            .env_remove("BENCH_ANNOUNCE_START")
            .env_remove("BENCH_STATE_MIB")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(mib) = ballast_mib {
            cmd.env("BENCH_BALLAST_MIB", mib.to_string())
                .env("BENCH_ANNOUNCE_START", "1");
        }
        let mark = notify.mark();
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| Error::msg(format!("cannot start {}: {e}", exe.display())))?;
        let pid = child.id();
        // The reaper thread collects it; `Child` must not wait for it.
        drop(child);
        let mut service = Service {
            kind,
            addr,
            dir,
            pid,
            generations: vec![(pid, started)],
            reaper: Arc::clone(&lab.reaper),
            notify,
            pid_file,
            _watchers: Watchers { stop },
            stopped: false,
        };
        let deadline = started + STEP_TIMEOUT;
        let ready = service
            .notify
            .wait(mark, deadline, |n| n.ready && n.main_pid == Some(pid))
            .ok_or_else(|| service.failure(&format!("pid {pid} never became ready")))?;
        service.stopped = false;
        // Sent before `READY=1`, so received by now if at all.
        let announced = service
            .notify
            .wait(mark, Instant::now(), |n| {
                n.started && n.main_pid == Some(pid)
            })
            .map(|n| n.at - started);
        Ok((
            service,
            Start {
                ready: ready.at - started,
                started: announced,
            },
        ))
    }

    /// Upgrades with `SIGHUP` and waits until the new generation is ready
    /// and the old one is gone.
    pub(crate) fn upgrade(&mut self) -> Result<Upgrade, Error> {
        let old = self.pid;
        let notify_mark = self.notify.mark();
        let pid_mark = self.pid_file.mark();
        let hup_at = Instant::now();
        signal(old, Signal::SIGHUP)?;
        let deadline = hup_at + STEP_TIMEOUT;
        let ready = self
            .notify
            .wait(notify_mark, deadline, |n| {
                n.ready && n.main_pid.is_some_and(|p| p != old)
            })
            .ok_or_else(|| self.failure(&format!("no new generation after SIGHUP to {old}")))?;
        let new = ready.main_pid.unwrap_or(0);
        self.pid = new;
        self.generations.push((new, ready.at));
        let gone = self
            .reaper
            .wait_exit(old, hup_at, deadline)
            .ok_or_else(|| self.failure(&format!("old generation {old} did not exit")))?;
        if gone.status != "exit 0" {
            return Err(self.failure(&format!(
                "old generation {} ended with {}",
                gone.pid, gone.status
            )));
        }
        let pid_file = self
            .pid_file
            .wait(pid_mark, Instant::now(), |e| e.pid == new)
            .map(|e| e.at - hup_at);
        let started = self
            .notify
            .wait(notify_mark, Instant::now(), |n| {
                n.started && n.main_pid == Some(new)
            })
            .map(|n| n.at - hup_at);
        Ok(Upgrade {
            hup_at,
            ready: ready.at - hup_at,
            pid_file,
            gone: gone.at - hup_at,
            started,
        })
    }

    /// Stops the service (`SIGTERM`, then `SIGKILL` after `grace`) and
    /// returns how long it took to exit.
    pub(crate) fn stop(mut self, grace: Duration) -> Result<Duration, Error> {
        self.stopped = true;
        let started = Instant::now();
        signal(self.pid, Signal::SIGTERM)?;
        if let Some(exit) = self.reaper.wait_exit(self.pid, started, started + grace) {
            return Ok(exit.at - started);
        }
        let _ = signal(self.pid, Signal::SIGKILL);
        let _ = self
            .reaper
            .wait_exit(self.pid, started, Instant::now() + STEP_TIMEOUT);
        Err(Error::msg(format!(
            "{} (pid {}) did not stop within {grace:?}; killed",
            self.kind.name(),
            self.pid
        )))
    }

    /// The current generation's resource use.
    pub(crate) fn usage(&self) -> Usage {
        Usage::of(self.pid)
    }

    fn failure(&self, what: &str) -> Error {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::msg(format!(
            "{}: {what}; log {}:\n{}",
            self.kind.name(),
            self.dir.join("log").display(),
            tail.join("\n")
        ))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        for &(pid, alive_at) in &self.generations {
            if !self.reaper.exited(pid, alive_at) {
                let _ = signal(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Sends `sig` to `pid`.
pub(crate) fn signal(pid: u32, sig: Signal) -> Result<(), Error> {
    let raw = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::msg(format!("refusing to signal pid {pid}")))?;
    nix::sys::signal::kill(Pid::from_raw(raw), sig)
        .map_err(|e| Error::msg(format!("kill -{sig} {pid}: {e}")))
}

/// A process's resource use, from `/proc`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Usage {
    /// Open file descriptors.
    pub(crate) fds: usize,
    /// Resident set size, KiB, and its anonymous and file-backed parts.
    pub(crate) rss_kib: u64,
    pub(crate) rss_anon_kib: u64,
    pub(crate) rss_file_kib: u64,
    /// Threads.
    pub(crate) threads: u64,
}

impl Usage {
    /// Reads `/proc/<pid>`; zeros for what cannot be read.
    pub(crate) fn of(pid: u32) -> Usage {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| proc_field(&status, name);
        Usage {
            fds,
            rss_kib: field("VmRSS:"),
            rss_anon_kib: field("RssAnon:"),
            rss_file_kib: field("RssFile:"),
            threads: field("Threads:"),
        }
    }
}

/// The number after `name` (`"VmRSS:"`, `"Pss:"`…) in a `/proc` file of
/// `name value [unit]` lines; 0 when absent.
pub(crate) fn proc_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
