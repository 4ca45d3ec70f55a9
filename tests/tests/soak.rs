//! Many consecutive upgrades: nothing accumulates from one generation to
//! the next (fds, memory, processes).

use std::time::Instant;

use nix::sys::signal::Signal;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

const UPGRADES: usize = 200;

/// How much more resident memory the newest generation may use than the
/// second one (allocator noise; a leak per generation would exceed it).
const RSS_SLACK_KB: u64 = 2048;

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

/// Asks `pid` for its `stats` (fd count, RSS).
fn stats(svc: &mut Service, pid: u32) -> Event {
    signal(pid, Signal::SIGUSR1);
    svc.wait_kind("stats", Some(pid))
}

#[test]
fn two_hundred_upgrades_leave_fds_and_memory_flat() {
    let _serial = serial();
    adopt_orphans();
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
    let addr = svc
        .wait_for("web listening", |e| {
            e.kind == "listening" && e.get("name") == "web"
        })
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));

    let first_launch = launch(first);
    let mut cur = first;
    let mut baseline: Option<(usize, u64, String)> = None;
    let mut peak_rss = 0;
    for n in 1..=UPGRADES {
        let next = svc.upgrade(cur);
        // Measured once the new generation is ready (its readiness pipe
        // closed) and has seen its parent exit (the parent pipe closed):
        // the same state in every generation.
        svc.wait_kind("ready", Some(next));
        svc.wait_kind("parent-exited", Some(next));
        let settled = stats(&mut svc, next);
        let (fds, rss): (usize, u64) = (settled.num("fds"), settled.num("rss_kb"));
        // Only the new generation holds the sockets now: it answers.
        assert_eq!(
            reply_pid(&tcp_get(&addr).expect("serves")),
            next,
            "after upgrade {n}"
        );
        match &baseline {
            None => baseline = Some((fds, rss, settled.get("fd_list").to_owned())),
            Some((base_fds, _, base_list)) => assert_eq!(
                fds,
                *base_fds,
                "generation {} has {fds} fds open, generation 2 had {base_fds}:\n{}\n{base_list}",
                n + 1,
                settled.get("fd_list")
            ),
        }
        assert_eq!(
            launch(next),
            first_launch,
            "generation {} started with other arguments or environment",
            n + 1
        );
        peak_rss = peak_rss.max(rss);
        cur = next;
    }
    let (base_fds, base_rss, _) = baseline.expect("at least one upgrade");
    let last_rss: u64 = svc
        .history
        .iter()
        .rfind(|e| e.pid == cur && e.kind == "stats")
        .expect("stats")
        .num("rss_kb");
    eprintln!(
        "{UPGRADES} upgrades in {:?}; fds {base_fds}; RSS generation 2: {base_rss} KiB, \
         newest: {last_rss} KiB, peak: {peak_rss} KiB",
        started.elapsed()
    );
    assert!(
        last_rss <= base_rss + RSS_SLACK_KB,
        "RSS grew from {base_rss} KiB to {last_rss} KiB"
    );

    assert_eq!(svc.pids().len(), UPGRADES + 1, "one process per generation");
    // Every generation exits and is reaped, and no other process of the
    // service is left behind.
    svc.stop(cur);
    assert!(svc.wait_first().success());
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
    assert!(!sock.exists(), "the socket file outlived the service");
    eprintln!("all gone after {:?}", started.elapsed());
}
