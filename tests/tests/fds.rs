//! Connections and files handed across upgrades, and fd hygiene: what the
//! next generation receives, and what a subprocess of it inherits.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// Stops the service, checks that nothing of it is left.
fn stop(svc: &mut Service, pid: u32) {
    svc.stop(pid);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

/// A listener the test owns, for the service to connect to (`add-conn`).
fn peer() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

/// Accepts the connection the service made; its `added-conn` event has been
/// seen, so the connection is already queued.
fn accept(l: &TcpListener) -> TcpStream {
    let (s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s
}

/// What the fds of `pid` point to (`socket:[ino]`, paths…).
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn assert_nonblock_cloexec(ev: &Event) {
    assert_eq!(ev.get("nonblock"), "true", "not non-blocking: {}", ev.line);
    assert_eq!(ev.get("cloexec"), "true", "not close-on-exec: {}", ev.line);
}

#[test]
fn connection_and_file_round_trip_and_really_close() {
    let h = Harness::new("connfile");
    let ctl = &h.ctl;
    let (l, addr) = peer();
    let log = ctl.path().join("f.log");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write(
        "actions",
        &format!("add-conn c {addr}\nadd-file f {}\n", log.display()),
    );
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("added-conn", Some(first));
    svc.wait_kind("added-file", Some(first));
    svc.wait_kind("ready", Some(first));
    let mut conn = accept(&l);

    ctl.write("actions", "take-conn-close c\ntake-file f\n");
    let second = svc.upgrade(first);
    let closed = svc.wait_kind("closed-conn", Some(second));
    assert_eq!(closed.get("missing"), "", "{}", closed.line);
    let took = svc.wait_kind("took-file", Some(second));
    assert_eq!(took.get("missing"), "", "{}", took.line);

    // The line the new generation wrote, then EOF: once the old generation
    // has exited, the new one's close really closes the connection (Go
    // tableflip's issue #74: there, a duplicate kept it open).
    let mut got = String::new();
    conn.read_to_string(&mut got)
        .expect("EOF while the new generation still runs");
    assert_eq!(got, format!("hello from {second}\n"));
    assert!(
        is_alive(second),
        "EOF came only because the new generation exited"
    );
    assert!(
        svc.wait_first().success(),
        "the old generation exited cleanly"
    );

    let content = std::fs::read_to_string(&log).expect("log");
    assert!(
        content.contains(&format!("written by {second}\n")),
        "{content:?}"
    );
    // Neither is still open in the new generation.
    let targets = fd_targets(second);
    let conn_sock = format!("socket:[{}]", closed.get("ino"));
    assert!(
        !targets.contains(&conn_sock),
        "{conn_sock} still open: {targets:?}"
    );
    assert!(
        !targets.iter().any(|t| Path::new(t) == log),
        "the file is still open: {targets:?}"
    );
    stop(&mut svc, second);
}

#[test]
fn connection_is_passed_through_two_upgrades() {
    let h = Harness::new("connkeep");
    let ctl = &h.ctl;
    let (l, addr) = peer();
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", &format!("add-conn c {addr}\nwait-parent\n"));
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("added-conn", Some(first));
    svc.wait_kind("ready", Some(first));
    let conn = accept(&l);
    let mut lines = BufReader::new(conn);

    ctl.write("actions", "take-conn-keep c\nwait-parent\n");
    let second = svc.upgrade(first);
    let kept = svc.wait_kind("kept-conn", Some(second));
    assert_eq!(kept.get("missing"), "", "{}", kept.line);
    let mut line = String::new();
    lines.read_line(&mut line).expect("read");
    assert_eq!(line, format!("kept by {second}\n"));
    svc.wait_kind("parent-exited", Some(second));

    ctl.write("actions", "take-conn-close c\n");
    let third = svc.upgrade(second);
    let closed = svc.wait_kind("closed-conn", Some(third));
    assert_eq!(closed.get("missing"), "", "{}", closed.line);
    // Generation 2 made it blocking for its own use; generation 3 still
    // receives it non-blocking.
    assert_nonblock_cloexec(&closed);
    let mut rest = String::new();
    lines.read_to_string(&mut rest).expect("EOF");
    assert_eq!(rest, format!("hello from {third}\n"));
    assert!(is_alive(third), "EOF came only because generation 3 exited");
    stop(&mut svc, third);
}

#[test]
fn handed_over_fds_are_nonblocking_and_close_on_exec() {
    let h = Harness::new("fdflags");
    let ctl = &h.ctl;
    let (l, addr) = peer();
    let p = |n: &str| ctl.path().join(n).display().to_string();
    ctl.write(
        "listen",
        &format!(
            "tcp tcp 127.0.0.1:0\nudp udp 127.0.0.1:0\nunix unix {}\ngram unixgram {}\npacket unixpacket {}\n",
            p("s.sock"),
            p("g.sock"),
            p("p.sock")
        ),
    );
    // The connection and the file are created blocking by generation 1.
    ctl.write(
        "actions",
        &format!("add-conn c {addr}\nadd-file f {}\n", p("f.log")),
    );
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    let _conn = accept(&l);

    ctl.write("actions", "take-conn-close c\ntake-file f\n");
    let second = svc.upgrade(first);
    svc.wait_kind("ready", Some(second));
    let events: Vec<Event> = svc
        .history
        .iter()
        .filter(|e| e.kind == "listening")
        .cloned()
        .collect();
    assert_eq!(events.len(), 10, "five sockets in each generation");
    for ev in &events {
        assert_nonblock_cloexec(ev);
    }
    let took = svc.wait_kind("took-file", Some(second));
    assert_nonblock_cloexec(&took);
    let closed = svc.wait_kind("closed-conn", Some(second));
    assert_nonblock_cloexec(&closed);
    svc.wait_kind("exit", Some(first));
    stop(&mut svc, second);
}

/// The fds a `probe` event lists, as `(fd, target)`.
fn probe_fds(ev: &Event) -> Vec<(String, String)> {
    ev.get("fds")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (fd, target) = s.split_once(':').unwrap_or((s, ""));
            (fd.to_owned(), target.to_owned())
        })
        .collect()
}

#[test]
fn subprocess_of_a_child_generation_inherits_nothing() {
    let h = Harness::new("probe");
    let ctl = &h.ctl;
    let (l, addr) = peer();
    let p = |n: &str| ctl.path().join(n).display().to_string();
    ctl.write(
        "listen",
        &format!(
            "tcp tcp 127.0.0.1:0\nudp udp 127.0.0.1:0\nunix unix {}\ngram unixgram {}\n",
            p("s.sock"),
            p("g.sock")
        ),
    );
    ctl.write(
        "actions",
        &format!(
            "add-conn c {addr}\nadd-file f {}\nprobe-child\n",
            p("f.log")
        ),
    );
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let baseline = svc.wait_kind("probe", Some(first));
    svc.wait_kind("ready", Some(first));
    let _conn = accept(&l);

    // Generation 2 probes before it is ready: it then holds every inherited
    // socket, the connection and the file (unclaimed, so still held by the
    // library), and both protocol pipes.
    ctl.write("actions", "probe-child\n");
    let second = svc.upgrade(first);
    let probe = svc.wait_kind("probe", Some(second));

    for ev in [&baseline, &probe] {
        // The environment is not edited in a process that runs threads
        // (svc creates its upgrader inside a multi-thread runtime), so the
        // variables may be there: the subprocess must ignore them.
        assert_eq!(
            (ev.get("has_parent"), ev.get("gen"), ev.get("names")),
            ("false", "1", ""),
            "a subprocess took what was meant for its parent: {}",
            ev.line
        );
        // The probe's own fd: the one it lists `/proc/self/fd` with (already
        // closed when it reads the targets).
        let fds = probe_fds(ev);
        assert_eq!(
            fds.iter().filter(|(_, target)| target.is_empty()).count(),
            1,
            "{}",
            ev.line
        );
        // Anything else was passed down by whatever runs the tests.
        for (fd, target) in fds.iter().filter(|(_, t)| !t.is_empty()) {
            assert!(
                passed_down_by_the_test_runner(fd, target),
                "the subprocess inherited fd {fd} ({target}): {}",
                ev.line
            );
        }
    }
    // Generation 2 created its upgrader with threads running: it left its
    // environment as it was (unsetenv there could race a getenv of another
    // thread), so the subprocess sees the handover variables, and ignores
    // them (above).
    assert!(
        probe.get("vars").contains("TABLEFLIP_HANDOVER"),
        "the environment was edited while threads ran: {}",
        probe.line
    );
    assert_eq!(
        probe_fds(&probe),
        probe_fds(&baseline),
        "a subprocess of generation 2 has more open than one of generation 1"
    );
    svc.wait_kind("exit", Some(first));
    stop(&mut svc, second);
}
