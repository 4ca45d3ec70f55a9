//! A running test service and every generation it upgrades to: their
//! events, their logs (through the test's own output, shown only when the
//! test fails), and their end (killed, whatever happens to the test).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

use crate::harness::{DEADLINE, Scratch, wait_a_little, wait_until};
use crate::net::{pid_file_pid, reply_pid, tcp_get};
use crate::process::{
    ADOPTING, SPAWNED, forget_spawned, is_alive, pid_of, proc_state, reap_adopted, signal,
    wait_gone,
};

/// One `EVENT <pid> <kind> key=value…` line.
#[derive(Debug, Clone)]
pub struct Event {
    /// The process that printed it.
    pub pid: u32,
    /// The event kind (`start`, `ready`, `upgrade-ok`…).
    pub kind: String,
    /// The `key=value` fields (quoted values unquoted).
    pub fields: HashMap<String, String>,
    /// The whole line.
    pub line: String,
}

impl Event {
    /// A field, or `""`.
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }

    /// A numeric field (a PID, a count); panics naming the event if it is
    /// missing or not a number.
    pub fn num<T: std::str::FromStr>(&self, key: &str) -> T {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("no numeric field {key:?} in {:?}", self.line))
    }

    fn parse(line: &str) -> Option<Event> {
        let rest = line.strip_prefix("EVENT ")?;
        let (pid, rest) = rest.split_once(' ')?;
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut fields = HashMap::new();
        let mut chars = rest.trim().chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        value.push(c);
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    } else {
                        value.push(c);
                    }
                }
                while chars.peek() == Some(&' ') {
                    chars.next();
                }
            } else {
                value = chars.by_ref().take_while(|c| *c != ' ').collect();
            }
            fields.insert(key.trim().to_owned(), value);
        }
        Some(Event {
            pid: pid.parse().ok()?,
            kind: kind.to_owned(),
            fields,
            line: line.to_owned(),
        })
    }
}

/// A running `svc` (and every generation it upgrades to: they share its
/// stdout). Every process seen is SIGKILLed on drop.
#[derive(Debug)]
pub struct Service {
    child: Child,
    events: Receiver<Event>,
    /// Every event received so far, in order.
    pub history: Vec<Event>,
    /// Which events of `history` a `wait_for` has returned already.
    consumed: Vec<bool>,
}

/// The command that runs `exe`, a `macro_svc` build (see
/// `tests/src/macro_svc/common.rs`), in `mode` (`supervised` or
/// `replace`): `TF_CTL=ctl`, its Unix listener at `u.sock` in `ctl`,
/// `RUST_LOG=info`.
pub fn macro_svc_cmd(exe: impl AsRef<std::ffi::OsStr>, ctl: &Scratch, mode: &str) -> Command {
    let mut cmd = Command::new(exe);
    // A test runner under systemd may have one: every service would put
    // its control socket there.
    cmd.env_remove("RUNTIME_DIRECTORY");
    cmd.env("TF_CTL", ctl.path())
        .env("TABLEFLIP_MODE", mode)
        .env("MS_UNIX", ctl.path().join("u.sock"))
        .env("RUST_LOG", "info");
    cmd
}

/// Sends `cmd`'s stderr (its log) to the file `stderr.log` in `ctl`, for
/// a test to read; returns its path. Start it with
/// [`Service::spawn_keeping_stderr`].
pub fn log_to_file(cmd: &mut Command, ctl: &Scratch) -> std::path::PathBuf {
    let log = ctl.path().join("stderr.log");
    let file = std::fs::File::create(&log)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    cmd.stderr(file);
    log
}

impl Service {
    /// `SIGTERM` to the first process (the supervisor, in supervised
    /// mode); checks that it exits 0, then waits until every process the
    /// service had has exited.
    pub fn terminate_first(&mut self) {
        signal(self.first_pid(), Signal::SIGTERM);
        let status = self.wait_first();
        assert_eq!(status.code(), Some(0), "{status:?}");
        self.wait_all_exited();
    }

    /// Starts `exe` (the `svc` binary) with `TF_CTL=ctl` and `envs`.
    pub fn start(exe: &str, ctl: &Scratch, envs: &[(&str, &str)]) -> Service {
        Self::spawn(Self::command(exe, ctl, envs))
    }

    /// The command [`start`](Self::start) runs, to adjust (working
    /// directory…) before [`spawn`](Self::spawn).
    pub fn command(exe: &str, ctl: &Scratch, envs: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(exe);
        // These tests are about the replace mode.
        cmd.env("TABLEFLIP_MODE", "replace");
        cmd.env_remove("RUNTIME_DIRECTORY");
        cmd.env("TF_CTL", ctl.path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts a prepared command whose stdout carries events, in a process
    /// group of its own (every generation that becomes ready joins it; the
    /// group is killed when the service is dropped, or, by the
    /// undertaker (a process of its own), when this test process ends however it ends). Its
    /// stderr, if piped, goes through the test's own output, which the test
    /// harness shows only for a failing test.
    pub fn spawn(mut cmd: Command) -> Service {
        cmd.stderr(Stdio::piped());
        Self::spawn_keeping_stderr(cmd)
    }

    /// As [`spawn`](Self::spawn), for a command whose stderr the caller
    /// has redirected (to a file it reads, say).
    pub fn spawn_keeping_stderr(mut cmd: Command) -> Service {
        use std::os::unix::process::CommandExt;
        cmd.stdout(Stdio::piped()).process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        SPAWNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child.id());
        undertaker_note('+', child.id());
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[svc log] {line}");
                }
            });
        }
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(ev) = Event::parse(&line) {
                    eprintln!("[svc] {line}");
                    if tx.send(ev).is_err() {
                        break;
                    }
                } else {
                    eprintln!("[svc stdout] {line}");
                }
            }
        });
        Service {
            child,
            events: rx,
            history: Vec::new(),
            consumed: Vec::new(),
        }
    }

    /// The PID of the first generation.
    pub fn first_pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the first event not returned before that matches: one
    /// already received (events of different processes interleave in any
    /// order), or the next to arrive within [`DEADLINE`].
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        self.wait_for_within(what, DEADLINE, pred)
    }

    /// As [`wait_for`](Self::wait_for), with an explicit deadline.
    pub fn wait_for_within(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        for (i, ev) in self.history.iter().enumerate() {
            if !self.consumed[i] && pred(ev) {
                self.consumed[i] = true;
                return ev.clone();
            }
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => {
                    let hit = pred(&ev);
                    self.history.push(ev.clone());
                    self.consumed.push(hit);
                    if hit {
                        return ev;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "timed out after {limit:?} waiting for {what}; events: {:#?}",
                        self.lines()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "all generations exited while waiting for {what}; events: {:#?}",
                        self.lines()
                    )
                }
            }
        }
    }

    /// Waits for an event of `kind` from `pid` (any pid if `None`).
    pub fn wait_kind(&mut self, kind: &str, pid: Option<u32>) -> Event {
        let what = format!("{kind} from {pid:?}");
        self.wait_for(&what, |e| e.kind == kind && pid.is_none_or(|p| e.pid == p))
    }

    /// Collects events until every generation has closed stdout (all
    /// exited), within [`DEADLINE`].
    pub fn wait_all_exited(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => {
                    self.history.push(ev);
                    self.consumed.push(false);
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "processes still running after {DEADLINE:?}; events: {:#?}",
                        self.lines()
                    )
                }
            }
        }
    }

    /// Moves the events received so far into [`history`](Self::history),
    /// without waiting.
    pub fn poll_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.history.push(ev);
            self.consumed.push(false);
        }
    }

    /// As [`poll_events`](Self::poll_events); `true` once every process
    /// that shares the events pipe has closed it (they have all exited).
    pub fn poll_all_exited(&mut self) -> bool {
        loop {
            match self.events.try_recv() {
                Ok(ev) => {
                    self.history.push(ev);
                    self.consumed.push(false);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    /// The event lines seen so far.
    pub fn lines(&self) -> Vec<&str> {
        self.history.iter().map(|e| e.line.as_str()).collect()
    }

    /// Waits for the first generation's exit status (it is our child).
    pub fn wait_first(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    forget_spawned(self.child.id());
                    return status;
                }
                Ok(None) if Instant::now() < deadline => wait_a_little(),
                other => panic!("first generation did not exit: {other:?}"),
            }
        }
    }

    /// Stops the service through its current generation `pid` (`SIGTERM`),
    /// then waits until every process it ever had is gone: exited, and
    /// reaped (orphans by this process, see [`adopt_orphans`](crate::process::adopt_orphans)).
    pub fn stop(&mut self, pid: u32) {
        signal(pid, Signal::SIGTERM);
        self.wait_kind("exit", Some(pid));
        self.wait_all_exited();
        self.wait_first();
        for pid in self.pids() {
            wait_gone(pid);
        }
    }

    /// Sends `SIGHUP` to `pid` and returns the PID of the new generation
    /// from its `upgrade-ok` (failing at once on an `upgrade-err`).
    pub fn upgrade(&mut self, pid: u32) -> u32 {
        signal(pid, Signal::SIGHUP);
        let what = format!("the outcome of the upgrade of {pid}");
        let ev = self.wait_for(&what, |e| {
            e.pid == pid && (e.kind == "upgrade-ok" || e.kind == "upgrade-err")
        });
        assert_eq!(
            ev.kind, "upgrade-ok",
            "upgrade of {pid} failed: {}",
            ev.line
        );
        ev.num("child")
    }

    /// Sends `SIGHUP` to `pid` and returns its `upgrade-err` (failing at
    /// once on an `upgrade-ok`).
    pub fn upgrade_err(&mut self, pid: u32) -> Event {
        signal(pid, Signal::SIGHUP);
        self.wait_upgrade_err(pid)
    }

    /// Waits for the outcome of an upgrade `pid` runs, which must be an
    /// `upgrade-err`.
    pub fn wait_upgrade_err(&mut self, pid: u32) -> Event {
        let what = format!("the outcome of the upgrade of {pid}");
        let ev = self.wait_for(&what, |e| {
            e.pid == pid && (e.kind == "upgrade-ok" || e.kind == "upgrade-err")
        });
        assert_eq!(
            ev.kind, "upgrade-err",
            "the upgrade of {pid} should have failed: {}",
            ev.line
        );
        ev
    }

    /// The position in [`history`](Self::history) of the first event that
    /// matches (events of all generations arrive through one pipe, so this
    /// orders events of different processes too).
    pub fn position(&self, pred: impl Fn(&Event) -> bool) -> Option<usize> {
        self.history.iter().position(pred)
    }

    /// The PIDs of [`pids`](Self::pids) still running (not zombies).
    pub fn alive_pids(&self) -> Vec<u32> {
        self.pids().into_iter().filter(|p| is_alive(*p)).collect()
    }

    /// Every PID that printed an event.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.history.iter().map(|e| e.pid).collect();
        pids.push(self.child.id());
        // PID 1 is what a service in its own PID namespace reports
        // (faults.rs): never this namespace's init, never to be signalled.
        pids.retain(|p| *p > 1);
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Events not read yet name processes to kill too (a test that
        // failed early leaves generations it never heard from).
        while let Ok(ev) = self.events.try_recv() {
            self.history.push(ev);
            self.consumed.push(false);
        }
        for pid in self.pids() {
            if is_alive(pid) {
                let _ = kill(pid_of(pid), Signal::SIGKILL);
            }
        }
        // The group too (generations it never heard from); its leader is
        // not reaped yet, so the group ID is still this service's.
        let _ = nix::sys::signal::killpg(pid_of(self.child.id()), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        undertaker_note('-', self.child.id());
        forget_spawned(self.child.id());
        if ADOPTING.load(std::sync::atomic::Ordering::SeqCst) {
            // Reap what this process adopted, so that a failed test leaves
            // no zombie to be counted by the next one's `stray_children`.
            let deadline = Instant::now() + Duration::from_secs(5);
            let pids = self.pids();
            while Instant::now() < deadline {
                pids.iter().for_each(|pid| reap_adopted(*pid));
                if pids.iter().all(|pid| proc_state(*pid).is_none()) {
                    break;
                }
                wait_a_little();
            }
        }
    }
}

/// Upgrades the service whose serving generation is `old` (named by
/// `pid_file`): sends SIGHUP, waits until the PID file names a new
/// generation (it is ready), then until `old` has exited (the first
/// generation, `svc`'s own child, must exit 0). Returns the new PID.
pub fn upgrade_via_pid_file(svc: &mut Service, pid_file: &Path, old: u32) -> u32 {
    signal(old, Signal::SIGHUP);
    wait_until("the new generation writes the pid file", || {
        pid_file_pid(pid_file).is_some_and(|p| p != old)
    });
    let new = pid_file_pid(pid_file).unwrap_or_else(|| panic!("{} vanished", pid_file.display()));
    if old == svc.first_pid() {
        assert!(svc.wait_first().success(), "generation {old} exits 0");
    } else {
        wait_gone(old);
    }
    new
}

/// Starts `cmd` (an example service that writes `pid_file`) and waits
/// until it is ready: its PID file names it.
pub fn spawn_ready(cmd: Command, pid_file: &Path) -> Service {
    let svc = Service::spawn(cmd);
    let first = svc.first_pid();
    wait_until("the service writes its pid file", || {
        pid_file_pid(pid_file) == Some(first)
    });
    svc
}

/// The PID that answers a TCP request at `addr` (the `svc` protocol);
/// panics naming the address if nothing serves.
pub fn serves(addr: &str) -> u32 {
    reply_pid(&tcp_get(addr).unwrap_or_else(|e| panic!("{addr} does not serve: {e}")))
}

/// After a successful upgrade of the first generation `first` to
/// `second`: the first generation exits cleanly, and `second` alone
/// serves at `addr`.
pub fn finish_upgrade(svc: &mut Service, first: u32, second: u32, addr: &str) {
    svc.wait_kind("exit", Some(first));
    assert!(
        svc.wait_first().success(),
        "the old generation exits with 0"
    );
    assert_eq!(serves(addr), second);
}

/// A process run to its end, stdout and stderr captured; killed if the
/// test fails first.
#[derive(Debug)]
pub struct Captured {
    child: Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Captured {
    /// Starts `cmd` with stdout and stderr piped.
    pub fn spawn(mut cmd: Command) -> Captured {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s);
                }
                s
            })
        };
        let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
        let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
        Captured { child, out, err }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (within [`DEADLINE`]) for the exit; returns the status,
    /// stdout and stderr.
    pub fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => wait_a_little(),
                other => panic!("{} did not exit: {other:?}", self.child.id()),
            }
        };
        let out = std::mem::replace(&mut self.out, std::thread::spawn(String::new));
        let err = std::mem::replace(&mut self.err, std::thread::spawn(String::new));
        (
            status,
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        )
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The undertaker: a process of its own that reads `+<group>` and
/// `-<group>` lines from a pipe, and when the pipe ends (this test process
/// is gone, however it ended: a panic, a timeout's SIGKILL) kills the
/// process groups still listed, so that no service outlives its test.
struct Undertaker {
    pid: u32,
    pipe: std::process::ChildStdin,
}

const UNDERTAKER: &str = r#"trap '' HUP INT TERM
groups=' '
while read -r op pg; do
    case "$op" in
        +) groups="$groups$pg " ;;
        -) groups=$(printf '%s' "$groups" | sed "s/ $pg / /") ;;
    esac
done
for pg in $groups; do kill -KILL -- "-$pg" 2>/dev/null; done"#;

fn undertaker() -> Option<&'static Mutex<Undertaker>> {
    static UNDERTAKER_PROCESS: OnceLock<Option<Mutex<Undertaker>>> = OnceLock::new();
    UNDERTAKER_PROCESS
        .get_or_init(|| {
            use std::os::unix::process::CommandExt;
            let mut child = Command::new("sh")
                .args(["-c", UNDERTAKER])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .ok()?;
            let pipe = child.stdin.take()?;
            // Never waited for: it outlives this process on purpose.
            let pid = child.id();
            std::mem::forget(child);
            Some(Mutex::new(Undertaker { pid, pipe }))
        })
        .as_ref()
}

/// Tells the undertaker about a process group (`+`: to kill if this test
/// process ends; `-`: gone, forget it).
fn undertaker_note(op: char, group: u32) {
    if let Some(u) = undertaker() {
        let mut u = u.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(u.pipe, "{op} {group}");
    }
}

/// The undertaker's PID (a child of this process that is not a service).
pub(crate) fn undertaker_pid() -> Option<u32> {
    undertaker().map(|u| {
        u.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pid
    })
}
