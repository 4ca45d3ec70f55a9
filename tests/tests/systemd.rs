//! systemd integration, end to end: readiness and reload notifications
//! (`Type=notify`, `Type=notify-reload`) recorded on a fake
//! `NOTIFY_SOCKET`, and socket activation for real with
//! `systemd-socket-activate` (Debian package `systemd`; `.ci/run` installs
//! it when it is missing).
//!
//! The fake `NOTIFY_SOCKET` is a Unix datagram socket bound by the test
//! with `SO_PASSCRED`, so every message arrives with the PID of the process
//! that sent it (`SCM_CREDENTIALS`, filled in by the kernel). That is what
//! systemd checks under the default `NotifyAccess=main`: a message is
//! accepted only from the main PID, which `MAINPID=` (sent by the main
//! process itself) moves. [`systemd_view`] replays every recorded sequence
//! through those rules and through `Type=notify-reload`'s: each
//! `RELOADING=1` carries `MONOTONIC_USEC=` and is ended by exactly one
//! `READY=1`, and nothing follows `STOPPING=1`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use nix::sys::signal::Signal;
use tableflip_tests::notify::*;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const MOVED: &str = env!("CARGO_BIN_EXE_macro_svc_moved");
const RT_SVC: &str = env!("CARGO_BIN_EXE_svc");

// ---------------------------------------------------------------------------
// Driving macro_svc.

/// A running `macro_svc` and where its sockets are.
struct Macro {
    svc: Service,
    tcp: String,
    pid_file: PathBuf,
}

fn macro_cmd(exe: &str, ctl: &Scratch, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(exe);
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.env("TF_CTL", ctl.path())
        .env("MS_UNIX", ctl.path().join("u.sock"))
        .env("MS_PID_FILE", ctl.path().join("svc.pid"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

fn start_macro(exe: &str, ctl: &Scratch, extra: &[(&str, &str)]) -> Macro {
    start_macro_with(macro_cmd(exe, ctl, extra), ctl)
}

/// Starts `cmd` (from `macro_cmd`: its stderr piped to the test's output,
/// unless the caller redirected it).
fn start_macro_with(cmd: Command, ctl: &Scratch) -> Macro {
    let mut svc = Service::spawn_keeping_stderr(cmd);
    let pid = svc.first_pid();
    let tcp = svc
        .wait_for("TCP listening", |e| e.pid == pid && e.get("name") == "TCP")
        .get("addr")
        .to_owned();
    svc.wait_kind("init-done", Some(pid));
    let pid_file = ctl.path().join("svc.pid");
    wait_until("the pid file names the first generation", || {
        pid_file_pid(&pid_file) == Some(pid)
    });
    Macro { svc, tcp, pid_file }
}

/// Sends one request line on a TCP connection, returns the reply.
fn tcp_line(addr: &str, line: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    writeln!(s, "{line}").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Sends one request line on a Unix stream connection, returns the reply.
fn unix_line(path: &str, line: &str) -> String {
    let mut s =
        std::os::unix::net::UnixStream::connect(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    writeln!(s, "{line}").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// SIGHUP to `old`, the main process, and a successful upgrade: checks
/// `RELOADING=1` (with `MONOTONIC_USEC` bracketed by the test's own clock)
/// then `MAINPID=<new>` + `READY=1`, both from `old`; waits until `old` has
/// exited and checks that it said nothing more. Returns the new PID.
fn upgrade_ok(m: &mut Macro, n: &mut Notify, old: u32, next_gen: u64) -> u32 {
    let before = monotonic_usec();
    signal(old, Signal::SIGHUP);
    let reloading = n.next("RELOADING=1 at the upgrade");
    let after = monotonic_usec();
    expect(
        &reloading,
        old,
        &[
            ("RELOADING", is(1)),
            ("MONOTONIC_USEC", Want::Within(before, after)),
            (
                "STATUS",
                contains(format!("upgrading: starting generation {next_gen}")),
            ),
        ],
    );
    let handover = n.next("MAINPID= and READY=1 after the handover");
    let new: u32 = handover
        .get("MAINPID")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {:?}", handover.raw));
    expect(
        &handover,
        old,
        &[
            ("MAINPID", is(new)),
            ("READY", is(1)),
            (
                "STATUS",
                contains(format!(
                    "serving: generation {next_gen}, pid {new} (upgraded from pid {old}"
                )),
            ),
        ],
    );
    let start = m.svc.wait_kind("start", Some(new));
    assert_eq!(start.get("has_parent"), "true", "{}", start.line);
    assert_eq!(start.get("gen"), next_gen.to_string(), "{}", start.line);
    m.svc.wait_kind("init-done", Some(new));
    assert_eq!(
        pid_file_pid(&m.pid_file),
        Some(new),
        "the PID file names the new generation before systemd hears of it"
    );
    if old == m.svc.first_pid() {
        assert!(m.svc.wait_first().success(), "generation {old} exits 0");
    } else {
        wait_gone(old);
    }
    n.assert_quiet(&format!("after the old generation {old} exited"));
    assert_eq!(reply_pid(&tcp_line(&m.tcp, "GET")), new);
    new
}

/// SIGHUP to `main` with a next generation that fails: `RELOADING=1`, then
/// `READY=1` (no `MAINPID`) whose `STATUS` reports the failure `why`, both
/// from `main`. Returns the failed child's PID (from the STATUS), gone.
fn upgrade_fails(m: &mut Macro, n: &mut Notify, main: u32, generation: u64, why: &str) -> u32 {
    let before = monotonic_usec();
    signal(main, Signal::SIGHUP);
    let reloading = n.next("RELOADING=1 at the upgrade");
    let after = monotonic_usec();
    expect(
        &reloading,
        main,
        &[
            ("RELOADING", is(1)),
            ("MONOTONIC_USEC", Want::Within(before, after)),
            (
                "STATUS",
                contains(format!("upgrading: starting generation {}", generation + 1)),
            ),
        ],
    );
    let failed = n.next("READY=1 ending the failed reload");
    expect(
        &failed,
        main,
        &[
            ("READY", is(1)),
            (
                "STATUS",
                contains(format!(
                    "serving: generation {generation}, pid {main}; the last upgrade failed: the new process (pid "
                )),
            ),
        ],
    );
    let status = failed.get("STATUS").unwrap_or_default();
    assert!(status.contains(why), "STATUS {status:?} lacks {why:?}");
    let child: u32 = status
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no child pid in {status:?}"));
    assert_ne!(child, main);
    wait_gone(child);
    assert_eq!(
        reply_pid(&tcp_line(&m.tcp, "GET")),
        main,
        "the main process serves on"
    );
    assert_eq!(pid_file_pid(&m.pid_file), Some(main));
    child
}

/// SIGTERM to `main`: `STOPPING=1` from it; then every process exits and
/// nothing more is said.
fn stop_notified(m: &mut Macro, n: &mut Notify, main: u32) {
    signal(main, Signal::SIGTERM);
    let stopping = n.next("STOPPING=1");
    expect(
        &stopping,
        main,
        &[("STOPPING", is(1)), ("STATUS", is("stopping"))],
    );
    m.svc.wait_all_exited();
    if main == m.svc.first_pid() {
        assert!(m.svc.wait_first().success(), "a graceful stop exits 0");
    } else {
        wait_gone(main);
    }
    n.assert_quiet("after the service stopped");
}

/// The whole `Type=notify` sequence: start, upgrade, two failed upgrades
/// (the new generation's init fails; a new build cannot even open its
/// listeners), another upgrade, stop. Every message is asserted, its
/// sender too.
fn notify_sequence(n: &mut Notify, tag: &str) {
    let ctl = Scratch::new(tag);
    // Run a copy of the binary, so that a broken build can be deployed.
    let exe = ctl.path().join("svc-bin");
    install_exe(SVC, &exe, 0);
    let exe_str = exe.display().to_string();
    // The broken build binds its TCP listener at `MS_TCP_MOVED`: taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let busy_addr = busy.local_addr().expect("address").to_string();
    let mut m = start_macro(
        &exe_str,
        &ctl,
        &[
            ("NOTIFY_SOCKET", n.env.as_str()),
            ("MS_TCP_MOVED", busy_addr.as_str()),
        ],
    );
    let first = m.svc.first_pid();

    let ready = n.next("READY=1 from the first generation");
    expect(
        &ready,
        first,
        &[
            ("READY", is(1)),
            ("MAINPID", is(first)),
            (
                "STATUS",
                contains(format!("serving: generation 1, pid {first}")),
            ),
        ],
    );

    let second = upgrade_ok(&mut m, n, first, 2);

    ctl.write("init", "err");
    let failed_init = upgrade_fails(
        &mut m,
        n,
        second,
        2,
        "exited with status 1 before it was ready",
    );
    ctl.write("init", "ok");

    install_exe(MOVED, &exe, 1);
    let failed_build = upgrade_fails(
        &mut m,
        n,
        second,
        2,
        "exited with status 1 before it was ready",
    );
    install_exe(SVC, &exe, 2);

    let third = upgrade_ok(&mut m, n, second, 3);
    stop_notified(&mut m, n, third);
    drop(busy);

    assert_eq!(
        n.summaries(),
        [
            format!("{first}: READY=1 MAINPID={first} STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: MAINPID={second} READY=1 STATUS=…"),
            format!("{second}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{second}: READY=1 STATUS=…"),
            format!("{second}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{second}: READY=1 STATUS=…"),
            format!("{second}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{second}: MAINPID={third} READY=1 STATUS=…"),
            format!("{third}: STOPPING=1 STATUS=…"),
        ],
        "the exact sequence"
    );
    for pid in [failed_init, failed_build] {
        assert!(
            n.log.iter().all(|x| x.sender != pid),
            "the failed generation {pid} said nothing"
        );
    }
    assert_eq!(systemd_view(&n.log, first), third);
}

// ---------------------------------------------------------------------------
// Notifications.

/// `Type=notify` with `NOTIFY_SOCKET` a path: the exact sequence across
/// start, upgrades, failed upgrades and stop, each message sent by the
/// process systemd then knows as the main one (so `NotifyAccess=main`, the
/// default, accepts them all).
#[test]
fn notify_sequence_with_a_path_socket() {
    let _serial = serial();
    adopt_orphans();
    let dir = Scratch::new("n-path");
    let mut n = Notify::at_path(&dir);
    notify_sequence(&mut n, "n-path-svc");
}

/// The same with an abstract `NOTIFY_SOCKET` (`@name`, a Linux abstract
/// address), which service managers may set instead of a path.
#[test]
fn notify_sequence_with_an_abstract_socket() {
    let _serial = serial();
    adopt_orphans();
    let mut n = Notify::at_abstract("seq");
    assert!(n.env.starts_with('@'));
    notify_sequence(&mut n, "n-abs-svc");
}

/// `Type=notify-reload`: every way an upgrade can end ends the reload
/// with exactly one `READY=1` (new generation: with `MAINPID=`; failure:
/// without, `STATUS=` says why); a SIGHUP that arrives during an upgrade
/// becomes a second reload, run by the new main process once the old one
/// has gone; a stop during an upgrade in flight says `STOPPING=1` and never
/// `READY=1` after it.
#[test]
fn notify_reload_pairs_each_reloading_with_one_ready() {
    let h = Harness::new("n-reload");
    let ctl = &h.ctl;
    let mut n = Notify::at_path(ctl);
    let log = ctl.path().join("stderr.log");
    let mut cmd = macro_cmd(SVC, ctl, &[("NOTIFY_SOCKET", n.env.as_str())]);
    cmd.stderr(std::fs::File::create(&log).expect("create the log file"));
    let mut m = start_macro_with(cmd, ctl);
    let first = m.svc.first_pid();
    let ready = n.next("READY=1");
    expect(
        &ready,
        first,
        &[
            ("READY", is(1)),
            ("MAINPID", is(first)),
            ("STATUS", contains(format!("generation 1, pid {first}"))),
        ],
    );

    for (how, why) in [
        ("err", "exited with status 1"),
        ("panic", "exited with status 1"),
        ("exit 7", "exited with status 7"),
    ] {
        ctl.write("init", how);
        upgrade_fails(&mut m, &mut n, first, 1, why);
    }
    ctl.write("init", "ok");
    let second = upgrade_ok(&mut m, &mut n, first, 2);

    // Two SIGHUPs: the second arrives while the first upgrade is in flight
    // (the new generation is blocked in init). It is seen to be received
    // (the service logs it) before the new generation may go on.
    let sighups = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("SIGHUP: upgrade requested")
            .count()
    };
    ctl.write("init", "block");
    let before = monotonic_usec();
    signal(second, Signal::SIGHUP);
    expect(
        &n.next("RELOADING=1 (first of two SIGHUPs)"),
        second,
        &[
            ("RELOADING", is(1)),
            ("MONOTONIC_USEC", Want::Within(before, monotonic_usec())),
            ("STATUS", contains("upgrading: starting generation 3")),
        ],
    );
    let third = m
        .svc
        .wait_for("the third generation blocks", |e| {
            e.kind == "blocked" && e.pid != second
        })
        .pid;
    let seen = sighups();
    signal(second, Signal::SIGHUP);
    wait_until("the second SIGHUP is received", || sighups() > seen);
    ctl.write("init", "ok");
    ctl.write("unblock", "");
    expect(
        &n.next("the handover to the third generation"),
        second,
        &[
            ("MAINPID", is(third)),
            ("READY", is(1)),
            ("STATUS", contains(format!("generation 3, pid {third}"))),
        ],
    );
    wait_gone(second);
    let reloading = n.next("RELOADING=1 (the forwarded SIGHUP)");
    expect(
        &reloading,
        third,
        &[
            ("RELOADING", is(1)),
            ("MONOTONIC_USEC", Want::Within(before, monotonic_usec())),
            ("STATUS", contains("upgrading: starting generation 4")),
        ],
    );
    let handover = n.next("the handover to the fourth generation");
    let fourth: u32 = handover
        .get("MAINPID")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {:?}", handover.raw));
    expect(
        &handover,
        third,
        &[
            ("MAINPID", is(fourth)),
            ("READY", is(1)),
            ("STATUS", contains(format!("generation 4, pid {fourth}"))),
        ],
    );
    m.svc.wait_kind("init-done", Some(fourth));
    wait_gone(third);
    n.assert_quiet("after the third generation exited");
    ctl.remove("unblock");

    // A stop while an upgrade is in flight.
    ctl.write("init", "block");
    signal(fourth, Signal::SIGHUP);
    expect(
        &n.next("RELOADING=1 (upgrade to be interrupted)"),
        fourth,
        &[
            ("RELOADING", is(1)),
            ("MONOTONIC_USEC", Want::Within(before, monotonic_usec())),
            ("STATUS", contains("upgrading: starting generation 5")),
        ],
    );
    let fifth = m
        .svc
        .wait_for("the fifth generation blocks", |e| {
            e.kind == "blocked" && e.pid != fourth
        })
        .pid;
    signal(fourth, Signal::SIGTERM);
    expect(
        &n.next("STOPPING=1 during the upgrade"),
        fourth,
        &[("STOPPING", is(1)), ("STATUS", is("stopping"))],
    );
    m.svc.wait_all_exited();
    wait_gone(fifth);
    wait_gone(fourth);
    n.assert_quiet("after a stop during an upgrade (no READY=1 may follow STOPPING=1)");

    assert_eq!(
        n.summaries(),
        [
            format!("{first}: READY=1 MAINPID={first} STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: READY=1 STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: READY=1 STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: READY=1 STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: MAINPID={second} READY=1 STATUS=…"),
            format!("{second}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{second}: MAINPID={third} READY=1 STATUS=…"),
            format!("{third}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{third}: MAINPID={fourth} READY=1 STATUS=…"),
            format!("{fourth}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{fourth}: STOPPING=1 STATUS=…"),
        ],
        "the exact sequence"
    );
    assert_eq!(systemd_view(&n.log, first), fourth);
}

/// A new generation that hangs in init: killed at the upgrade timeout, and
/// the reload ends with `READY=1` naming the timeout.
#[test]
fn a_timed_out_upgrade_ends_the_reload() {
    let h = Harness::new("n-hang");
    let ctl = &h.ctl;
    let mut n = Notify::at_path(ctl);
    let mut m = start_macro(
        SVC,
        ctl,
        &[
            ("NOTIFY_SOCKET", n.env.as_str()),
            ("MS_UPGRADE_TIMEOUT_MS", "300"),
        ],
    );
    let first = m.svc.first_pid();
    n.next("READY=1");
    ctl.write("init", "hang");
    let child = upgrade_fails(
        &mut m,
        &mut n,
        first,
        1,
        "was not ready within 300ms; it was killed",
    );
    assert_eq!(m.svc.wait_kind("hanging", None).pid, child);
    stop_notified(&mut m, &mut n, first);
    assert_eq!(
        n.summaries(),
        [
            format!("{first}: READY=1 MAINPID={first} STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: READY=1 STATUS=…"),
            format!("{first}: STOPPING=1 STATUS=…"),
        ]
    );
    assert_eq!(systemd_view(&n.log, first), first);
}

/// The server-side socket of the TCP connection `client` has, if `pid`
/// holds it (has accepted it).
fn accepted_by(pid: u32, client: &std::net::TcpStream) -> bool {
    let (Ok(local), Ok(peer)) = (client.local_addr(), client.peer_addr()) else {
        return false;
    };
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => String::new(),
    };
    // The server side: local = the service's address, remote = ours.
    let (want_local, want_remote) = (hex(peer), hex(local));
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want_local.as_str()) && f.get(2) == Some(&want_remote.as_str()))
            .then(|| f.get(9).map(|i| (*i).to_owned()))
            .flatten()
    });
    let Some(inode) = inode.filter(|i| i != "0") else {
        return false;
    };
    let target = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.display().to_string() == target))
    })
}

/// After a successful upgrade the old generation is no longer the main
/// process: even stopped in the middle of its drain (a second stop signal
/// makes it exit at once), it never says `STOPPING=1`, which would make
/// systemd stop the service the new generation now runs.
#[test]
fn the_old_generation_never_says_stopping() {
    let h = Harness::new("n-old");
    let ctl = &h.ctl;
    let mut n = Notify::at_path(ctl);
    let mut m = start_macro(
        SVC,
        ctl,
        &[("NOTIFY_SOCKET", n.env.as_str()), ("MS_DRAIN_MS", "600000")],
    );
    let first = m.svc.first_pid();
    n.next("READY=1");
    // A request that keeps the first generation draining.
    let mut slow = std::net::TcpStream::connect(&m.tcp).expect("connect");
    writeln!(slow, "SLOW 600000").expect("send");
    wait_until("the first generation accepted the slow request", || {
        accepted_by(first, &slow)
    });
    let second = {
        let before = monotonic_usec();
        signal(first, Signal::SIGHUP);
        expect(
            &n.next("RELOADING=1"),
            first,
            &[
                ("RELOADING", is(1)),
                ("MONOTONIC_USEC", Want::Within(before, monotonic_usec())),
                ("STATUS", contains("generation 2")),
            ],
        );
        let h = n.next("the handover");
        let second: u32 = h
            .get("MAINPID")
            .and_then(|p| p.parse().ok())
            .expect("MAINPID");
        expect(
            &h,
            first,
            &[
                ("MAINPID", is(second)),
                ("READY", is(1)),
                ("STATUS", contains(format!("pid {second}"))),
            ],
        );
        second
    };
    m.svc.wait_kind("init-done", Some(second));
    assert!(is_alive(first), "the first generation is draining");
    // Stopped during its drain: SIGTERM there means "exit now". One that
    // arrives before the drain has begun is a stop (`Upgrader::stop`) of a
    // process that has handed over: silent too. Either way, repeat until it
    // exits.
    wait_until("the old generation exits on SIGTERM", || {
        if exiting_or_gone(first) {
            return true;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(first).unwrap_or(0)),
            Signal::SIGTERM,
        );
        false
    });
    let status = m.svc.wait_first();
    assert_eq!(status.code(), Some(130), "{status:?}");
    n.assert_quiet("after the old generation was stopped during its drain");
    assert_eq!(reply_pid(&tcp_line(&m.tcp, "GET")), second);
    drop(slow);

    signal(second, Signal::SIGTERM);
    expect(
        &n.next("STOPPING=1 from the new main process"),
        second,
        &[("STOPPING", is(1)), ("STATUS", is("stopping"))],
    );
    m.svc.wait_all_exited();
    wait_gone(second);
    n.assert_quiet("after the stop");
    assert_eq!(
        n.summaries(),
        [
            format!("{first}: READY=1 MAINPID={first} STATUS=…"),
            format!("{first}: RELOADING=1 MONOTONIC_USEC=… STATUS=…"),
            format!("{first}: MAINPID={second} READY=1 STATUS=…"),
            format!("{second}: STOPPING=1 STATUS=…"),
        ]
    );
    assert_eq!(systemd_view(&n.log, first), second);
}

// ---------------------------------------------------------------------------
// Socket activation.

/// `systemd-socket-activate -l L… --fdname=N:… -E K=V… exe`: it binds
/// every `-l` address, waits for the first connection (or datagram), then
/// execs `exe` in its own process (same PID) with the sockets as fds 3….
/// Only the `-E` variables (and `PATH`, `HOME`, `TERM`) reach `exe`.
fn activate_cmd(
    listen: &[String],
    names: &[&str],
    datagram: bool,
    env: &[(&str, String)],
    exe: &str,
) -> Command {
    let mut cmd = Command::new(systemd_socket_activate());
    if datagram {
        cmd.arg("--datagram");
    }
    for l in listen {
        cmd.arg(format!("--listen={l}"));
    }
    // No names: systemd-socket-activate passes none (`LISTEN_FDNAMES`
    // unset), as a socket unit without `FileDescriptorName=` passes its
    // own name.
    if !names.is_empty() {
        cmd.arg(format!("--fdname={}", names.join(":")));
    }
    for (k, v) in env {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    // These tests are about the replace mode.
    cmd.arg("--setenv=TABLEFLIP_MODE=replace");
    cmd.arg(exe).stdin(Stdio::null());
    cmd
}

/// Connects to `addr` as soon as something listens there (this is also
/// what makes `systemd-socket-activate` start the service).
fn connect_when_listening(addr: &str) -> std::net::TcpStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(DEADLINE)).expect("timeout");
                return s;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "nothing listens on {addr} after {DEADLINE:?}: {e}"
            ),
        }
        wait_a_little();
    }
}

fn request(mut s: std::net::TcpStream, line: &str) -> String {
    writeln!(s, "{line}").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// The names of the variables in `pid`'s initial environment (as it was
/// exec'd with).
fn environ_keys(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("cannot read the environment of {pid}: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map_or(kv.to_string(), |(k, _)| k.to_owned())
        })
        .collect()
}

fn unix_refused(path: &Path) -> bool {
    matches!(
        std::os::unix::net::UnixStream::connect(path),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Two sockets passed by `systemd-socket-activate` (TCP and Unix), named as
/// the service's listeners: used instead of binding, whatever the declared
/// (or configured) address, the third listener (UDP) bound as usual; the
/// PID file and `READY=1`; then two upgrades, each new generation
/// inheriting the activated sockets (same addresses, the port answering
/// throughout) with no `LISTEN_*` variable in its environment; a stop
/// leaves the socket file, which belongs to the socket unit, in place.
#[test]
fn socket_activation_by_name_across_upgrades() {
    let h = Harness::new("sa-up");
    let ctl = &h.ctl;
    let mut n = Notify::at_path(ctl);
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let unix = ctl.path().join("activated.sock");
    // Configured addresses that activation overrides: never bound.
    let declared_port = free_port();
    let declared_unix = ctl.path().join("declared.sock");
    let pid_file = ctl.path().join("svc.pid");
    let p = |p: &Path| p.display().to_string();
    let cmd = activate_cmd(
        &[tcp.clone(), p(&unix)],
        &["TCP", "UNIX"],
        false,
        &[
            ("TF_CTL", p(ctl.path())),
            ("MS_TCP", format!("127.0.0.1:{declared_port}")),
            ("MS_UNIX", p(&declared_unix)),
            ("MS_PID_FILE", p(&pid_file)),
            ("NOTIFY_SOCKET", n.env.clone()),
            ("RUST_LOG", "info".to_owned()),
        ],
        SVC,
    );
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let conn = connect_when_listening(&tcp);
    assert_eq!(
        reply_pid(&request(conn, "GET")),
        first,
        "the connection that started the service is served, by the same PID"
    );
    let listening = |svc: &mut Service, pid: u32, name: &str| {
        svc.wait_for(&format!("{name} listening in {pid}"), |e| {
            e.pid == pid && e.kind == "listening" && e.get("name") == name
        })
    };
    let check_generation = |svc: &mut Service, pid: u32, gen_no: u32| -> String {
        let start = svc.wait_kind("start", Some(pid));
        assert_eq!(start.get("gen"), gen_no.to_string());
        assert_eq!(listening(svc, pid, "TCP").get("addr"), tcp);
        let u = listening(svc, pid, "UNIX");
        assert_eq!(u.get("local"), p(&unix), "{}", u.line);
        let udp = listening(svc, pid, "UDP").get("addr").to_owned();
        svc.wait_kind("init-done", Some(pid));
        wait_until("the PID file names the generation", || {
            pid_file_pid(&pid_file) == Some(pid)
        });
        assert!(
            !declared_unix.exists(),
            "the declared Unix path was not bound"
        );
        assert!(tcp_refused(&format!("127.0.0.1:{declared_port}")));
        assert_eq!(reply_pid(&tcp_line(&tcp, "GET")), pid);
        assert_eq!(reply_pid(&unix_line(&p(&unix), "GET")), pid);
        assert_eq!(reply_pid(&udp_get(&udp).expect("udp")), pid);
        udp
    };
    let udp = check_generation(&mut svc, first, 1);
    expect(
        &n.next("READY=1"),
        first,
        &[
            ("READY", is(1)),
            ("MAINPID", is(first)),
            ("STATUS", contains("generation 1")),
        ],
    );

    let mut main = first;
    for gen_no in [2, 3] {
        // A connection made before the upgrade is answered after it.
        let early = std::net::TcpStream::connect(&tcp).expect("connect before the upgrade");
        signal(main, Signal::SIGHUP);
        expect(
            &n.next("RELOADING=1"),
            main,
            &[
                ("RELOADING", is(1)),
                ("MONOTONIC_USEC", Want::Within(0, monotonic_usec())),
                ("STATUS", contains(format!("generation {gen_no}"))),
            ],
        );
        let h = n.next("the handover");
        let next: u32 = h
            .get("MAINPID")
            .and_then(|v| v.parse().ok())
            .expect("MAINPID");
        expect(
            &h,
            main,
            &[
                ("MAINPID", is(next)),
                ("READY", is(1)),
                ("STATUS", contains(format!("pid {next}"))),
            ],
        );
        // (The old generation's drain waits for this request.)
        let reply = reply_pid(&request(early, "GET"));
        assert!(reply == main || reply == next, "answered by {reply}");
        if main == first {
            assert!(svc.wait_first().success());
        } else {
            wait_gone(main);
        }
        assert_eq!(check_generation(&mut svc, next, gen_no), udp);
        let keys = environ_keys(next);
        assert!(keys.iter().any(|k| k == "TF_CTL"), "{keys:?}");
        assert!(
            !keys.iter().any(|k| k.starts_with("LISTEN_")),
            "generation {gen_no} got {keys:?}"
        );
        main = next;
    }

    signal(main, Signal::SIGTERM);
    expect(
        &n.next("STOPPING=1"),
        main,
        &[("STOPPING", is(1)), ("STATUS", is("stopping"))],
    );
    svc.wait_all_exited();
    wait_gone(main);
    n.assert_quiet("after the stop");
    systemd_view(&n.log, first);
    assert!(tcp_refused(&tcp), "a real stop closes the activated port");
    assert!(
        unix.exists(),
        "the activated socket's file belongs to the socket unit: never removed"
    );
}

/// A datagram socket passed by activation (`--datagram`) for the UDP
/// listener: the datagram that started the service is answered, and the
/// socket is handed on by an upgrade.
#[test]
fn socket_activation_of_a_datagram_socket() {
    let h = Harness::new("sa-udp");
    let ctl = &h.ctl;
    let port = free_port();
    let udp = format!("127.0.0.1:{port}");
    let pid_file = ctl.path().join("svc.pid");
    let p = |p: &Path| p.display().to_string();
    let cmd = activate_cmd(
        std::slice::from_ref(&udp),
        &["UDP"],
        true,
        &[
            ("TF_CTL", p(ctl.path())),
            ("MS_UNIX", p(&ctl.path().join("u.sock"))),
            ("MS_PID_FILE", p(&pid_file)),
            ("RUST_LOG", "info".to_owned()),
        ],
        SVC,
    );
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    // Bound once the port is taken; then the first datagram starts the
    // service, which answers it.
    wait_until("systemd-socket-activate binds the UDP port", || {
        std::net::UdpSocket::bind(&udp).is_err()
    });
    assert_eq!(reply_pid(&udp_get(&udp).expect("udp")), first);
    let ev = svc.wait_for("UDP listening", |e| {
        e.pid == first && e.get("name") == "UDP"
    });
    assert_eq!(ev.get("addr"), udp);
    svc.wait_kind("init-done", Some(first));
    wait_until("the PID file names the first generation", || {
        pid_file_pid(&pid_file) == Some(first)
    });
    let second = upgrade_via_pid_file(&mut svc, &pid_file, first);
    let ev = svc.wait_for("UDP listening", |e| {
        e.pid == second && e.get("name") == "UDP"
    });
    assert_eq!(ev.get("addr"), udp);
    assert_eq!(reply_pid(&udp_get(&udp).expect("udp")), second);
    signal(second, Signal::SIGTERM);
    svc.wait_all_exited();
    wait_gone(second);
}

/// A stream socket passed under the name of the UDP listener: the service
/// refuses to start (exit status 1), naming the listener and the mismatch,
/// and never says `READY=1`.
#[test]
fn socket_activation_of_the_wrong_type_is_a_clear_error() {
    let h = Harness::new("sa-wrong");
    let ctl = &h.ctl;
    let mut n = Notify::at_path(ctl);
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let p = |p: &Path| p.display().to_string();
    let run = Captured::spawn(activate_cmd(
        std::slice::from_ref(&tcp),
        &["UDP"],
        false,
        &[
            ("TF_CTL", p(ctl.path())),
            ("MS_UNIX", p(&ctl.path().join("u.sock"))),
            ("NOTIFY_SOCKET", n.env.clone()),
            ("RUST_LOG", "info".to_owned()),
        ],
        SVC,
    ));
    let pid = run.pid();
    let _trigger = connect_when_listening(&tcp);
    let (status, stdout, stderr) = run.finish();
    assert_eq!(status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains(
            "cannot inherit packet socket \"UDP\": the socket systemd passed under this name is a tcp listener, but the listener is declared udp"
        ),
        "stderr: {stderr}"
    );
    assert!(!stdout.contains("init-done"), "stdout: {stdout}");
    // The first generation is the main process: its stop is announced.
    expect(
        &n.next("STOPPING=1"),
        pid,
        &[("STOPPING", is(1)), ("STATUS", is("stopping"))],
    );
    n.assert_quiet("after a failed start");
}

/// A passed socket that no listener claims is closed at readiness: it
/// accepts connections into its queue while the service initialises, and
/// refuses them once it is ready. Its file, which belongs to the socket
/// unit, stays.
#[test]
fn socket_activation_unclaimed_sockets_close_at_readiness() {
    let h = Harness::new("sa-extra");
    let ctl = &h.ctl;
    let tcp = format!("127.0.0.1:{}", free_port());
    let extra = format!("127.0.0.1:{}", free_port());
    let extra_unix = ctl.path().join("extra.sock");
    let pid_file = ctl.path().join("svc.pid");
    let p = |p: &Path| p.display().to_string();
    ctl.write("init", "block");
    let mut svc = Service::spawn(activate_cmd(
        &[tcp.clone(), extra.clone(), p(&extra_unix)],
        &["TCP", "EXTRA", "EXTRA_UNIX"],
        false,
        &[
            ("TF_CTL", p(ctl.path())),
            ("MS_UNIX", p(&ctl.path().join("u.sock"))),
            ("MS_PID_FILE", p(&pid_file)),
            ("RUST_LOG", "info".to_owned()),
        ],
        SVC,
    ));
    let first = svc.first_pid();
    let held = connect_when_listening(&tcp);
    svc.wait_kind("blocked", Some(first));
    let queued = std::net::TcpStream::connect(&extra).expect("EXTRA is open during init");
    let queued_unix = std::os::unix::net::UnixStream::connect(&extra_unix)
        .expect("EXTRA_UNIX is open during init");
    ctl.write("unblock", "");
    svc.wait_kind("init-done", Some(first));
    wait_until("the PID file names the first generation", || {
        pid_file_pid(&pid_file) == Some(first)
    });
    assert!(
        tcp_refused(&extra),
        "EXTRA is closed once the service is ready"
    );
    assert!(
        extra_unix.exists(),
        "the file of EXTRA_UNIX, which belongs to the socket unit, stays"
    );
    assert!(
        unix_refused(&extra_unix),
        "EXTRA_UNIX is closed at readiness"
    );
    assert_eq!(reply_pid(&request(held, "GET")), first);
    drop((queued, queued_unix));
    signal(first, Signal::SIGTERM);
    svc.wait_all_exited();
    assert!(svc.wait_first().success());
}

// ---------------------------------------------------------------------------
// Activation variables that lie.

/// `LISTEN_PID` names another process: the variables are not for this one,
/// so they are ignored (the service binds its own sockets and serves) and
/// not passed on to the next generation.
#[test]
fn listen_fds_for_another_pid_are_ignored() {
    let h = Harness::new("lie-pid");
    let ctl = &h.ctl;
    let me = std::process::id().to_string();
    let mut m = start_macro(
        SVC,
        ctl,
        &[
            ("LISTEN_PID", me.as_str()),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "TCP:UNIX"),
        ],
    );
    let first = m.svc.first_pid();
    assert_eq!(reply_pid(&tcp_line(&m.tcp, "GET")), first);
    let unix = ctl.path().join("u.sock");
    assert_eq!(
        reply_pid(&unix_line(&unix.display().to_string(), "GET")),
        first
    );
    let second = upgrade_via_pid_file(&mut m.svc, &m.pid_file, first);
    m.svc.wait_kind("init-done", Some(second));
    assert_eq!(reply_pid(&tcp_line(&m.tcp, "GET")), second);
    let keys = environ_keys(second);
    assert!(
        !keys.iter().any(|k| k.starts_with("LISTEN_")),
        "passed on: {keys:?}"
    );
    signal(second, Signal::SIGTERM);
    m.svc.wait_all_exited();
    wait_gone(second);
}

/// `LISTEN_FDS` without `LISTEN_PID`: as `sd_listen_fds(3)`, the fds are
/// not for this process; the service binds its own sockets and serves.
#[test]
fn listen_fds_without_listen_pid_are_ignored() {
    let h = Harness::new("lie-nopid");
    let ctl = &h.ctl;
    let mut m = start_macro(
        SVC,
        ctl,
        &[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "TCP:UNIX")],
    );
    let first = m.svc.first_pid();
    assert_eq!(reply_pid(&tcp_line(&m.tcp, "GET")), first);
    signal(first, Signal::SIGTERM);
    m.svc.wait_all_exited();
}

/// Runs `macro_svc` through `sh`, which sets `LISTEN_PID` to its own PID
/// (kept by `exec`) and closes fds 3 to 9, with `vars`; returns its exit
/// status and stderr.
fn run_with_listen_vars(ctl: &Scratch, vars: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut cmd = Command::new("/bin/sh");
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-; exec "$0""#)
        .arg(SVC)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env("TF_CTL", ctl.path())
        .env("MS_UNIX", ctl.path().join("u.sock"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let (status, stdout, stderr) = Captured::spawn(cmd).finish();
    assert!(!stdout.contains("init-done"), "{stdout}");
    (status, stderr)
}

/// `LISTEN_FDS` naming fds that are not open, `LISTEN_FDNAMES` that does
/// not match `LISTEN_FDS`, and unparsable values: the service refuses to
/// start with an error that says what is wrong.
#[test]
fn lying_listen_variables_are_clear_errors() {
    let h = Harness::new("lie-fds");
    let ctl = &h.ctl;
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("LISTEN_FDS", "5")],
            "socket activation: \"unknown\" (fd 3): fd 3 is not open",
        ),
        (
            &[("LISTEN_FDS", "5"), ("LISTEN_FDNAMES", "A:B:C:D:E")],
            "socket activation: \"A\" (fd 3): fd 3 is not open",
        ),
        (
            &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "TCP:UNIX")],
            "socket activation: LISTEN_FDNAMES names 2 fds but LISTEN_FDS=1",
        ),
        (
            &[("LISTEN_FDS", "three")],
            "socket activation: LISTEN_FDS=\"three\" is not a number of fds",
        ),
    ];
    for (vars, message) in cases {
        let (status, stderr) = run_with_listen_vars(ctl, vars);
        assert_eq!(status.code(), Some(1), "{vars:?}: {stderr}");
        assert!(stderr.contains(message), "{vars:?}: {stderr}");
    }
}

/// A subprocess of a socket-activated service (on the runtime API)
/// inherits no activated socket, and takes none even though the
/// `LISTEN_*` variables reach it.
#[test]
fn a_subprocess_of_an_activated_service_inherits_no_activation() {
    let h = Harness::new("sa-probe");
    let ctl = &h.ctl;
    let tcp = format!("127.0.0.1:{}", free_port());
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", "probe-child\n");
    let p = |p: &Path| p.display().to_string();
    let mut svc = Service::spawn(activate_cmd(
        std::slice::from_ref(&tcp),
        &["web"],
        false,
        &[("TF_CTL", p(ctl.path())), ("RUST_LOG", "info".to_owned())],
        RT_SVC,
    ));
    let first = svc.first_pid();
    let conn = connect_when_listening(&tcp);
    let ev = svc.wait_for("web listening", |e| {
        e.pid == first && e.kind == "listening" && e.get("name") == "web"
    });
    assert_eq!(ev.get("addr"), tcp, "the activated socket, by name");
    let probe = svc.wait_kind("probe", Some(first));
    svc.wait_kind("ready", Some(first));
    assert_eq!(reply_pid(&request(conn, "")), first);
    // The variables stay in a process that runs threads (the runtime-API
    // service creates its upgrader in a multi-thread runtime); LISTEN_PID
    // names the service, so the subprocess takes nothing.
    assert_eq!(
        (probe.get("has_parent"), probe.get("names")),
        ("false", ""),
        "{}",
        probe.line
    );
    let fds: Vec<(&str, &str)> = probe
        .get("fds")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.split_once(':').unwrap_or((s, "")))
        .collect();
    // The probe's own fd (listing /proc/self/fd) has no target left.
    assert_eq!(
        fds.iter().filter(|(_, t)| t.is_empty()).count(),
        1,
        "{}",
        probe.line
    );
    for (fd, target) in fds.iter().filter(|(_, t)| !t.is_empty()) {
        assert!(
            passed_down_by_the_test_runner(fd, target) && !target.starts_with("socket:"),
            "the subprocess inherited fd {fd} ({target}): {}",
            probe.line
        );
    }
    signal(first, Signal::SIGTERM);
    svc.wait_kind("exit", Some(first));
    svc.wait_all_exited();
    assert!(svc.wait_first().success());
}

// ---------------------------------------------------------------------------
// Sockets passed without names.

/// `systemd-socket-activate` without `--fdname` (and a socket unit
/// without `FileDescriptorName=`) passes sockets under a name systemd
/// makes up: each is used for the listener whose address it has. (The
/// service used to bind the address itself, fail with EADDRINUSE against
/// its own inherited socket, and reset the first client.) The next
/// generation inherits it under the listener's name.
#[test]
fn socket_activation_without_names_matches_listeners_by_address() {
    let h = Harness::new("sa-unnamed");
    let ctl = &h.ctl;
    let tcp = format!("127.0.0.1:{}", free_port());
    ctl.write("listen", &format!("web tcp {tcp}\n"));
    let p = |p: &Path| p.display().to_string();
    let mut svc = Service::spawn(activate_cmd(
        std::slice::from_ref(&tcp),
        &[],
        false,
        &[("TF_CTL", p(ctl.path())), ("RUST_LOG", "info".to_owned())],
        RT_SVC,
    ));
    let first = svc.first_pid();
    let early = connect_when_listening(&tcp);
    let ev = svc.wait_for("web listening", |e| {
        e.pid == first && e.kind == "listening" && e.get("name") == "web"
    });
    assert_eq!(ev.get("addr"), tcp);
    svc.wait_kind("ready", Some(first));
    assert_eq!(
        reply_pid(&request(early, "")),
        first,
        "the first client is served"
    );
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &tcp);
    let ev2 = svc.wait_for("web listening in generation 2", |e| {
        e.pid == second && e.kind == "listening"
    });
    assert_eq!(ev2.get("ino"), ev.get("ino"), "the same socket, inherited");
    svc.stop(second);
}

/// A socket passed without a name whose address no declared listener
/// has: the service refuses to start, naming the socket's address and
/// the setting that fixes it; and with the address declared, it serves.
#[test]
fn an_unnamed_activated_socket_is_matched_by_address_or_named_in_the_error() {
    let h = Harness::new("sa-unnamed-macro");
    let ctl = &h.ctl;
    let tcp = format!("127.0.0.1:{}", free_port());
    let p = |p: &Path| p.display().to_string();
    let env = |declared: &str| {
        vec![
            ("TF_CTL", p(ctl.path())),
            ("MS_UNIX", p(&ctl.path().join("u.sock"))),
            ("MS_TCP", declared.to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]
    };
    let run = Captured::spawn(activate_cmd(
        std::slice::from_ref(&tcp),
        &[],
        false,
        &env("127.0.0.1:0"),
        SVC,
    ));
    let _trigger = connect_when_listening(&tcp);
    let (status, stdout, stderr) = run.finish();
    assert_eq!(status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    for part in [tcp.as_str(), "FileDescriptorName=", "TCP"] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
    assert!(!stdout.contains("init-done"), "{stdout}");

    let mut svc = Service::spawn(activate_cmd(
        std::slice::from_ref(&tcp),
        &[],
        false,
        &env(&tcp),
        SVC,
    ));
    let first = svc.first_pid();
    let early = connect_when_listening(&tcp);
    svc.wait_kind("init-done", Some(first));
    assert_eq!(reply_pid(&request(early, "GET")), first);
    signal(first, Signal::SIGTERM);
    svc.wait_all_exited();
    assert!(svc.wait_first().success());
}

/// A newline in a value sent to systemd (here the executable's path,
/// named by the failed upgrade's `STATUS=`) adds no field: every value is
/// one line. (A path containing `\nSTOPPING=1` used to inject it.)
#[test]
fn a_newline_in_a_value_adds_no_notification_field() {
    let h = Harness::new("sd-newline");
    let ctl = &h.ctl;
    let mut n = Notify::at_path(ctl);
    let dir = ctl.path().join("x\nSTOPPING=1");
    std::fs::create_dir(&dir).expect("mkdir");
    let exe = dir.join("svc");
    install_exe(RT_SVC, &exe, 0);
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut cmd = Command::new(&exe);
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.env("TF_CTL", ctl.path())
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &n.env);
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    n.next("READY=1");
    std::fs::remove_file(&exe).expect("remove the binary");
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "Spawn", "{}", err.line);
    n.next("RELOADING=1");
    let done = n.next("READY=1 after the failure");
    assert!(done.has("READY"), "{:?}", done.raw);
    assert!(
        !done.has("STOPPING"),
        "a value injected a field: {:?}",
        done.raw
    );
    assert!(
        done.get("STATUS").is_some_and(|s| s.contains("STOPPING=1")),
        "the path is in STATUS, on its one line: {:?}",
        done.raw
    );
    signal(first, Signal::SIGTERM);
    svc.wait_kind("exit", Some(first));
    svc.wait_all_exited();
    assert!(svc.wait_first().success());
}
