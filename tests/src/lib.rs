//! Shared helpers for the integration tests: start the `svc` test service,
//! read the events every generation prints, send signals, wait for
//! observable states with deadlines (never fixed sleeps).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

pub mod http1;
use nix::unistd::Pid;

/// The default deadline for anything a test waits for. Generous: the suite
/// must pass on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises tests that fork, exec or send signals.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates a fresh, empty directory.
    pub fn new(tag: &str) -> Scratch {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Short: Unix socket paths must fit in 108 bytes.
        let path = PathBuf::from(format!("/tmp/tf-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Scratch { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a control file (creating or replacing it).
    pub fn write(&self, name: &str, content: &str) {
        let p = self.path.join(name);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
    }

    /// Removes a control file, if present.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path.join(name));
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

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

impl Service {
    /// Starts `exe` (the `svc` binary) with `TF_CTL=ctl` and `envs`.
    pub fn start(exe: &str, ctl: &Scratch, envs: &[(&str, &str)]) -> Service {
        Self::spawn(Self::command(exe, ctl, envs))
    }

    /// The command [`start`](Self::start) runs, to adjust (working
    /// directory…) before [`spawn`](Self::spawn).
    pub fn command(exe: &str, ctl: &Scratch, envs: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(exe);
        cmd.env("TF_CTL", ctl.path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts a prepared command whose stdout carries events.
    pub fn spawn(mut cmd: Command) -> Service {
        cmd.stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        SPAWNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child.id());
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
    /// reaped (orphans by this process, see [`adopt_orphans`]).
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// `pid`, started by [`Service::spawn`], has been reaped: its number may be
/// reused by any process from now on.
fn forget_spawned(pid: u32) {
    SPAWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p| *p != pid);
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: Signal) {
    kill(pid_of(pid), sig).unwrap_or_else(|e| panic!("cannot send {sig} to {pid}: {e}"));
}

/// The process state letter from `/proc/<pid>/stat` (`Z` for a zombie), or
/// `None` once the process is gone (reaped).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// Whether `pid` has begun to exit (the kernel's `PF_EXITING` flag, set
/// before the process's fds are closed), is a zombie, or is gone. A process
/// whose fds have been closed by its exit is always in one of these states,
/// though not necessarily a zombie yet.
pub fn exiting_or_gone(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return true;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    state == "Z" || state == "X" || flags & PF_EXITING != 0
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z')
}

/// The PIDs of the processes [`Service::spawn`] started (direct children,
/// reaped through their `std::process::Child`, never by [`wait_gone`]).
static SPAWNED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Whether [`adopt_orphans`] was called in this test binary.
static ADOPTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this test process the reaper of its orphaned descendants (Linux
/// `PR_SET_CHILD_SUBREAPER`): an old generation whose parent has exited is
/// adopted by the test rather than by PID 1, whose reaping is slow in some
/// sandboxes and absent in containers without an init. [`wait_gone`] then
/// reaps such an orphan itself, and [`stray_children`] sees every leftover
/// descendant.
///
/// Process-wide: call it in every test of a test binary, or in none.
pub fn adopt_orphans() {
    nix::sys::prctl::set_child_subreaper(true)
        .unwrap_or_else(|e| panic!("cannot become a child subreaper: {e}"));
    ADOPTING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The parent PID of `pid`, from `/proc/<pid>/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Processes (other than those [`Service::spawn`] started and not yet
/// reaped) whose parent is this test process: with [`adopt_orphans`],
/// every descendant left behind by a service ends up here.
pub fn stray_children() -> Vec<u32> {
    let me = std::process::id();
    let spawned = SPAWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| parent_of(*pid) == Some(me) && !spawned.contains(pid))
                .collect()
        })
        .unwrap_or_default()
}

/// Reaps `pid` if it is a zombie this process adopted (see
/// [`adopt_orphans`]).
fn reap_adopted(pid: u32) {
    if !ADOPTING.load(std::sync::atomic::Ordering::SeqCst)
        || proc_state(pid) != Some('Z')
        || parent_of(pid) != Some(std::process::id())
        || SPAWNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&pid)
    {
        return;
    }
    let _ = nix::sys::wait::waitpid(pid_of(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Waits until `pid` is gone entirely (exited and reaped: no zombie). An
/// orphan this process adopted (see [`adopt_orphans`]) is reaped here.
pub fn wait_gone(pid: u32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        reap_adopted(pid);
        if proc_state(pid).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still exists (state {:?}) after {DEADLINE:?}",
            proc_state(pid)
        );
        wait_a_little();
    }
}

/// Polling interval for conditions with no event to wait on (process
/// states, files); always bounded by a deadline by the caller.
pub fn wait_a_little() {
    std::thread::sleep(Duration::from_millis(5));
}

/// Polls `cond` until it holds, failing with `what` after [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        wait_a_little();
    }
}

/// Connects to a TCP service, reads its whole reply.
pub fn tcp_get(addr: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects to a Unix stream service, reads its whole reply.
pub fn unix_get(path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sends a datagram to a UDP service, returns the reply.
pub fn udp_get(addr: &str) -> std::io::Result<String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1500];
    // UDP may drop: retry a few times within the deadline.
    let deadline = Instant::now() + DEADLINE;
    loop {
        s.send_to(b"ping", addr)?;
        match s.recv_from(&mut buf) {
            Ok((n, _)) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    }
}

/// Sends a datagram to a Unix datagram service, returns the reply.
pub fn unixgram_get(path: &str, scratch: &Scratch) -> std::io::Result<String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let me = scratch.path().join(format!(
        "c{}",
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let s = std::os::unix::net::UnixDatagram::bind(&me)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.send_to(b"ping", path)?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    let _ = std::fs::remove_file(&me);
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The PID in a `pid <N>` reply.
pub fn reply_pid(reply: &str) -> u32 {
    reply
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a `pid <N>` reply: {reply:?}"))
}

/// Writes `content` to `w` and flushes (helper for control sockets).
pub fn send_line(w: &mut impl Write, content: &str) -> std::io::Result<()> {
    w.write_all(content.as_bytes())?;
    w.flush()
}

/// Connects to a Linux abstract Unix stream socket (`@name` without the
/// `@`), reads its whole reply.
pub fn abstract_get(name: &str) -> std::io::Result<String> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let mut s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects a `SOCK_SEQPACKET` socket to the Unix path (succeeds while a
/// socket listens there, accepted or not).
pub fn seqpacket_connect(path: &str) -> std::io::Result<()> {
    use tableflip::socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    s.connect(&SockAddr::unix(path)?)
}

/// Whether connecting to `addr` is refused (nobody listens there any more).
pub fn tcp_refused(addr: &str) -> bool {
    matches!(
        std::net::TcpStream::connect(addr),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// An executable copy of `exe` at `dest` (written under a temporary name,
/// then renamed over `dest`, so a running process's binary is replaced, not
/// modified), with `extra` bytes appended: an ELF file with trailing bytes
/// still runs, and its size tells the copies apart.
pub fn install_exe(exe: &str, dest: &Path, extra: usize) {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(exe).unwrap_or_else(|e| panic!("cannot read {exe}: {e}"));
    bytes.extend(std::iter::repeat_n(0u8, extra));
    let tmp = dest.with_extension("tmp");
    std::fs::write(&tmp, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dest)
        .unwrap_or_else(|e| panic!("cannot rename over {}: {e}", dest.display()));
}

/// The size of a file, in bytes.
pub fn file_size(path: impl AsRef<Path>) -> u64 {
    let path = path.as_ref();
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .len()
}

/// A port that was free a moment ago on 127.0.0.1 (for services whose
/// address must be known before they start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
        .port()
}

/// The PID a PID file names, if it exists and holds one.
pub fn pid_file_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
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

/// Whether this test process itself has `fd` open on `target` without
/// close-on-exec: then every process it starts inherits it, tableflip or
/// not (test runners and shells do leak such fds).
pub fn passed_down_by_the_test_runner(fd: &str, target: &str) -> bool {
    let same = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|t| t.display().to_string() == target);
    let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("flags:"))?.to_owned();
            u32::from_str_radix(line.trim_start_matches("flags:").trim(), 8).ok()
        });
    const O_CLOEXEC: u32 = 0o2_000_000;
    same && flags.is_some_and(|f| f & O_CLOEXEC == 0)
}

/// How many upgrades the load tests run: `TABLEFLIP_LOAD_UPGRADES`, else 20.
pub fn load_upgrades() -> usize {
    std::env::var("TABLEFLIP_LOAD_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
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
