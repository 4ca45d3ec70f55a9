//! Many consecutive upgrades under light load: nothing accumulates from one
//! generation to the next (fds, memory, processes), and no request fails.
//!
//! `TABLEFLIP_SOAK_UPGRADES` sets the number of upgrades (default 200, what
//! CI runs). The long version:
//!
//! ```text
//! TABLEFLIP_SOAK_UPGRADES=1000 cargo test -p tableflip-tests --test soak -- --nocapture
//! ```
//!
//! prints the figures (fds and RSS of the first and the newest generation,
//! requests, duration).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// How much more resident memory the newest generation may use than the
/// first one. Every later generation uses a little more than the first
/// from the start: it ran the inheritance code (more of the binary's pages
/// are resident) and a thread that watched its parent. Measured: the
/// newest 0.2 to 0.7 MiB above the first, the peak at most 0.9 MiB above,
/// after 200 as after 1000 upgrades. A leak per generation would add up
/// past this over the run.
const RSS_SLACK_KB: u64 = 2048;

/// The light load: one client, one request at a time, at most one request
/// per `LOAD_PACE` (pacing the load, not waiting for anything).
const LOAD_PACE: Duration = Duration::from_millis(2);

/// How many upgrades to run: `TABLEFLIP_SOAK_UPGRADES`, else 200.
fn soak_upgrades() -> usize {
    const VAR: &str = "TABLEFLIP_SOAK_UPGRADES";
    match std::env::var(VAR) {
        Err(std::env::VarError::NotPresent) => 200,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                panic!("{VAR}={v:?}: expected a positive whole number of upgrades, e.g. {VAR}=1000")
            }
        },
        Err(e) => panic!("{VAR}: {e}"),
    }
}

/// The command line and environment `pid` was started with, without the
/// handover variable (its fd numbers may differ): what each generation
/// passes on unchanged to the next.
fn launch(pid: u32) -> (Vec<u8>, Vec<Vec<u8>>) {
    let read = |what: &str| {
        std::fs::read(format!("/proc/{pid}/{what}"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/{what}: {e}"))
    };
    let env = read("environ")
        .split(|b| *b == 0)
        .filter(|v| !v.starts_with(tableflip::ENV_HANDOVER.as_bytes()))
        .map(<[u8]>::to_vec)
        .collect();
    (read("cmdline"), env)
}

/// `fd → target` of every fd `pid` has open (an fd closed while listing is
/// left out).
fn fd_targets(pid: u32) -> HashMap<u32, String> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let fd: u32 = name.to_str()?.parse().ok()?;
            let target = std::fs::read_link(format!("{dir}/{fd}")).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect()
}

/// The inodes listed in the socket table `/proc/<pid>/net/<table>` (in
/// `pid`'s network namespace) whose line `keep` accepts, with the column
/// that holds the inode.
fn socket_table(
    pid: u32,
    table: &str,
    column: usize,
    keep: impl Fn(&[&str]) -> bool,
) -> Vec<String> {
    let path = format!("/proc/{pid}/net/{table}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            keep(&cols).then(|| cols.get(column).map(|c| (*c).to_owned()))?
        })
        .collect()
}

/// The inode of a `socket:[N]` fd target.
fn socket_ino(target: &str) -> Option<&str> {
    target.strip_prefix("socket:[")?.strip_suffix(']')
}

/// The fds `pid` holds for good, as sorted kinds (`socket:web` for a
/// declared socket, `socket:unix` for another Unix socket, `pipe`,
/// `anon_inode:[eventfd]`, a file's path…), and as `fd:kind` for messages.
///
/// The load makes accepted TCP connections come and go at any moment; they
/// are left out. An fd counts if it has the same target in two listings
/// taken before and after reading the socket tables (an fd open across
/// both was open while the tables were read, so it is listed there). A
/// socket that is neither declared nor a Unix socket is, in all
/// likelihood, a connection being served: the measure is taken again a few
/// times, and the last time the TCP tables are read too (they hold every
/// `TIME_WAIT` the load leaves behind: long to read), to leave out a
/// connection still open; any other socket counts as `socket:other`.
fn steady_fds(pid: u32, listeners: &HashMap<String, String>) -> (Vec<String>, Vec<String>) {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        let last = attempt == ATTEMPTS;
        let before = fd_targets(pid);
        let unix = socket_table(pid, "unix", 6, |_| true);
        let other = |target: &String| {
            socket_ino(target)
                .is_some_and(|i| !listeners.contains_key(i) && !unix.iter().any(|u| u == i))
        };
        let conns: Vec<String> = if last && before.values().any(other) {
            // `st` 0A is LISTEN.
            ["tcp", "tcp6"]
                .into_iter()
                .flat_map(|t| socket_table(pid, t, 9, |cols| cols.get(3) != Some(&"0A")))
                .collect()
        } else {
            Vec::new()
        };
        let after = fd_targets(pid);
        let mut steady: Vec<(u32, String)> = before
            .into_iter()
            .filter(|(fd, target)| after.get(fd) == Some(target))
            .filter_map(|(fd, target)| {
                let kind = match socket_ino(&target) {
                    Some(ino) if conns.iter().any(|c| c == ino) => return None,
                    Some(ino) => match listeners.get(ino) {
                        Some(name) => format!("socket:{name}"),
                        None if unix.iter().any(|u| u == ino) => "socket:unix".to_owned(),
                        None => "socket:other".to_owned(),
                    },
                    None if target.starts_with("pipe:") => "pipe".to_owned(),
                    None => target,
                };
                Some((fd, kind))
            })
            .collect();
        if last || steady.iter().all(|(_, kind)| kind != "socket:other") {
            steady.sort();
            let listed = steady.iter().map(|(fd, k)| format!("{fd}:{k}")).collect();
            let mut kinds: Vec<String> = steady.into_iter().map(|(_, k)| k).collect();
            kinds.sort();
            return (kinds, listed);
        }
        attempt += 1;
        wait_a_little();
    }
}

/// `VmRSS` of `pid`, in KiB.
fn rss_kb(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"))
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| parent_of(*p) == Some(pid))
                .collect()
        })
        .unwrap_or_default()
}

/// What the load client saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failures: Vec<String>,
    by_pid: HashMap<u32, u64>,
}

/// Sets its flag when dropped: the load stops even if the test fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One client making TCP requests to `addr`, one after the other, until
/// `stop`; `last` is the PID of the latest reply.
fn light_load(addr: String, stop: Arc<AtomicBool>, last: Arc<AtomicU32>) -> Tally {
    let mut tally = Tally::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match tcp_get(&addr) {
            Ok(reply) => match reply.trim().strip_prefix("pid ").map(str::parse::<u32>) {
                Some(Ok(pid)) => {
                    tally.ok += 1;
                    *tally.by_pid.entry(pid).or_default() += 1;
                    last.store(pid, Ordering::SeqCst);
                }
                _ => tally.failures.push(format!("unexpected reply {reply:?}")),
            },
            Err(e) => tally.failures.push(e.to_string()),
        }
        next += LOAD_PACE;
        match next.checked_duration_since(Instant::now()) {
            Some(ahead) => std::thread::sleep(ahead),
            None => next = Instant::now(),
        }
    }
    tally
}

#[test]
fn consecutive_upgrades_under_load_leave_fds_memory_and_processes_flat() {
    let _serial = serial();
    adopt_orphans();
    let upgrades = soak_upgrades();
    let ctl = Scratch::new("soak");
    let sock = ctl.path().join("s.sock");
    ctl.write(
        "listen",
        &format!(
            "web tcp 127.0.0.1:0\ndns udp 127.0.0.1:0\nsock unix {}\n",
            sock.display()
        ),
    );
    ctl.write("actions", "wait-parent\n");
    let started = Instant::now();
    let mut svc = Service::start(SVC, &ctl, &[("RUST_LOG", "warn")]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    // The declared sockets, by inode: the same in every generation.
    let listeners: HashMap<String, String> = svc
        .history
        .iter()
        .filter(|e| e.pid == first && e.kind == "listening")
        .map(|e| (e.get("ino").to_owned(), e.get("name").to_owned()))
        .collect();
    let addr = svc
        .history
        .iter()
        .find(|e| e.kind == "listening" && e.get("name") == "web")
        .expect("web listening")
        .get("addr")
        .to_owned();

    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let last_reply = Arc::new(AtomicU32::new(0));
    let load = {
        let (addr, stop, last) = (addr.clone(), Arc::clone(&stop.0), Arc::clone(&last_reply));
        std::thread::spawn(move || light_load(addr, stop, last))
    };

    // Every generation is measured in the same state: ready, and its
    // parent gone (`parent-exited`; for the first, at once, as it has
    // none). Until its parent exits, a later generation also holds the
    // read end of the pipe that tells it so (closed before
    // `parent-exited`); the first never has one. Measured there, the
    // first generation has the same fds as any other, so the newest is
    // compared with the first. (Its RSS is a few hundred KiB lower: see
    // `RSS_SLACK_KB`.)
    svc.wait_kind("parent-exited", Some(first));
    let (first_fds, first_list) = steady_fds(first, &listeners);
    let first_rss = rss_kb(first);
    let first_launch = launch(first);
    let mut cur = first;
    let (mut newest_fds, mut newest_rss) = (first_fds.len(), first_rss);
    let mut peak_rss = first_rss;
    for n in 1..=upgrades {
        let next = svc.upgrade(cur);
        svc.wait_kind("ready", Some(next));
        svc.wait_kind("parent-exited", Some(next));
        // The old generation is gone, reaped: no zombie. (Each one is
        // adopted by this test once its own parent has exited.)
        if cur == first {
            assert!(svc.wait_first().success(), "generation 1 exits 0");
        } else {
            wait_gone(cur);
        }
        let (fds, list) = steady_fds(next, &listeners);
        assert_eq!(
            fds,
            first_fds,
            "generation {} holds other fds than generation 1:\n{list:?}\n{first_list:?}",
            n + 1
        );
        let rss = rss_kb(next);
        peak_rss = peak_rss.max(rss);
        (newest_fds, newest_rss) = (fds.len(), rss);
        // Only the new generation holds the sockets now: it answers.
        assert_eq!(
            reply_pid(&tcp_get(&addr).expect("serves")),
            next,
            "after upgrade {n}"
        );
        assert_eq!(
            launch(next),
            first_launch,
            "generation {} started with other arguments or environment",
            n + 1
        );
        // The service is this one process: nothing else of it is left,
        // and it has started nothing.
        assert_eq!(stray_children(), vec![next], "after upgrade {n}");
        assert_eq!(children_of(next), Vec::<u32>::new(), "after upgrade {n}");
        cur = next;
    }
    let upgraded_in = started.elapsed();

    // The load ran to the end: the newest generation served it too.
    wait_until(
        "the load client is answered by the newest generation",
        || last_reply.load(Ordering::SeqCst) == cur,
    );
    drop(stop);
    let tally = load.join().expect("the load client panicked");
    let pids = svc.pids();
    eprintln!(
        "{upgrades} upgrades in {upgraded_in:?}; steady fds: generation 1: {}, newest: \
         {newest_fds}; RSS: generation 1: {first_rss} KiB, newest: {newest_rss} KiB, \
         peak: {peak_rss} KiB; load: {} requests, {} failed, answered by {} of {} generations",
        first_fds.len(),
        tally.ok + tally.failures.len() as u64,
        tally.failures.len(),
        tally.by_pid.len(),
        pids.len(),
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        tally.failures.len(),
        tally.ok + tally.failures.len() as u64,
        &tally.failures[..tally.failures.len().min(20)]
    );
    assert!(tally.ok > 0, "the load client made no request");
    for pid in tally.by_pid.keys() {
        assert!(pids.contains(pid), "{pid}, not a generation, answered");
    }
    assert!(
        newest_rss <= first_rss + RSS_SLACK_KB,
        "RSS grew from {first_rss} KiB (generation 1) to {newest_rss} KiB"
    );
    assert_eq!(pids.len(), upgrades + 1, "one process per generation");

    // Every generation exits and is reaped, and no other process of the
    // service is left behind.
    svc.stop(cur);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
    assert!(!sock.exists(), "the socket file outlived the service");
    eprintln!("all gone after {:?}", started.elapsed());
}
