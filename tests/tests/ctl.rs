//! The control socket and `tableflip-ctl`, run as a deploy script runs it,
//! against real services in both process models: an upgrade's success and
//! each kind of failure come back with their own exit status and JSON
//! line; a request made during an upgrade joins it; a stopping service
//! refuses; a service that cannot be reached says so.

use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const CTL: &str = env!("CARGO_BIN_EXE_tableflip-ctl-under-test");

fn ctl(args: &[&str]) -> Said {
    run_ctl(CTL, args)
}

fn upgrade_reports_success_and_each_failure(mode: &str) {
    let h = Harness::new(&format!("ctl-{mode}"));
    // A copy of the binary, so that it can be removed (a spawn failure).
    let exe = h.ctl.path().join("svc");
    install_exe(MACRO_SVC, &exe, 0);
    let mut s = CtlService::start(&h, &exe, mode, &[("MS_UPGRADE_TIMEOUT_MS", "1500")]);
    let first = s.first;
    let sock = s.socket.clone();
    let meta = std::fs::symlink_metadata(&sock).unwrap_or_else(|e| panic!("{sock}: {e}"));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600,
        "the control socket is the service's user's only"
    );

    let status = ctl(&["status", "--socket", &sock, "--json"]);
    assert_eq!(status.code, Some(0), "{status:?}");
    assert_eq!(status.str("outcome"), "status");
    assert_eq!(status.str("mode"), mode);
    assert_eq!(status.str("state"), "serving");
    assert_eq!(status.num("generation"), 1);
    assert_eq!(status.num("pid"), u64::from(first));

    // Success: exit 0, one JSON line with both PIDs.
    let ok = ctl(&["upgrade", "--socket", &sock]);
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert_eq!(ok.str("outcome"), "upgraded", "{ok:?}");
    assert_eq!(ok.json["joined"], false);
    assert_eq!(ok.num("old_pid"), u64::from(first));
    assert_eq!(ok.num("generation"), 2);
    let second = ok.pid("new_pid");
    s.svc.wait_kind("init-done", Some(second));
    s.svc.wait_kind("draining", Some(first));

    // Each failure: exit 1, its kind, the reason the service logged; the
    // second generation serves on.
    for (init, failure, says) in [
        ("exit 3", "exited", "status 3"),
        ("abort", "killed", "SIGABRT"),
        ("hang", "timeout", "1.5s"),
    ] {
        h.ctl.write("init", init);
        let failed = ctl(&["upgrade", "--socket", &sock]);
        assert_eq!(failed.code, Some(1), "{init}: {failed:?}");
        assert_eq!(failed.str("outcome"), "failed", "{init}: {failed:?}");
        assert_eq!(failed.str("failure"), failure, "{init}: {failed:?}");
        assert!(failed.str("error").contains(says), "{init}: {failed:?}");
        assert!(failed.stderr.contains(failure), "{init}: {failed:?}");
        let status = ctl(&["status", "--socket", &sock, "--json"]);
        assert_eq!(status.num("pid"), u64::from(second), "{status:?}");
        assert_eq!(status.str("state"), "serving", "{status:?}");
        assert_eq!(status.json["last_upgrade"]["ok"], false, "{status:?}");
        assert_eq!(
            status.json["last_upgrade"]["failure"], failure,
            "{status:?}"
        );
    }

    // Through the PID file (the control socket found among the process's
    // sockets).
    h.ctl.write("init", "ok");
    let pid_file = h.ctl.path().join("svc.pid").display().to_string();
    let ok = ctl(&["upgrade", "--pid-file", &pid_file]);
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert_eq!(ok.num("old_pid"), u64::from(second));
    let third = ok.pid("new_pid");
    // Replace mode numbers generations by descent (3); the supervisor
    // numbers every one it started, failed ones included (6).
    let expected = if mode == "supervised" { 6 } else { 3 };
    assert_eq!(ok.num("generation"), expected, "{ok:?}");
    s.svc.wait_kind("init-done", Some(third));
    s.svc.wait_kind("draining", Some(second));

    // The executable is gone: the spawn fails.
    std::fs::remove_file(&exe).unwrap_or_else(|e| panic!("{e}"));
    let failed = ctl(&["upgrade", "--socket", &sock]);
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert_eq!(failed.str("failure"), "spawn", "{failed:?}");
    assert!(failed.str("error").contains("svc"), "{failed:?}");

    let status = ctl(&["status", "--socket", &sock]);
    assert_eq!(status.code, Some(0), "{status:?}");

    s.stop(third);
    wait_until("the control socket's file is removed", || {
        !Path::new(&sock).exists()
    });
}

#[test]
fn supervised_upgrade_reports_success_and_each_failure() {
    upgrade_reports_success_and_each_failure("supervised");
}

#[test]
fn replace_upgrade_reports_success_and_each_failure() {
    upgrade_reports_success_and_each_failure("replace");
}

fn a_request_during_an_upgrade_joins_it(mode: &str) {
    let h = Harness::new(&format!("ctl-join-{mode}"));
    let mut s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let (first, sup, sock) = (s.first, s.first_pid, s.socket.clone());
    h.ctl.write("init", "block");
    let asked = start_ctl(CTL, &["upgrade", "--socket", &sock, "--timeout", "60s"]);
    let second = s
        .svc
        .wait_for("the new generation", |e| {
            e.kind == "start" && e.pid != first && e.pid != sup
        })
        .pid;
    let joined = start_ctl(CTL, &["upgrade", "--socket", &sock, "--timeout", "60s"]);
    wait_until("the second request has joined the upgrade", || {
        s.logged("the request joins it")
    });
    h.ctl.write("unblock", "");
    let first_said = asked.finish();
    let joined_said = joined.finish();
    assert_eq!(first_said.code, Some(0), "{first_said:?}");
    assert_eq!(first_said.json["joined"], false);
    assert_eq!(joined_said.code, Some(4), "{joined_said:?}");
    assert_eq!(joined_said.str("outcome"), "upgraded");
    assert_eq!(joined_said.json["joined"], true);
    assert_eq!(joined_said.num("new_pid"), u64::from(second));
    assert_eq!(first_said.num("new_pid"), u64::from(second));
    assert!(
        joined_said.stderr.contains("already running"),
        "{joined_said:?}"
    );
    s.svc.wait_kind("draining", Some(first));
    s.stop(second);
}

#[test]
fn supervised_a_request_during_an_upgrade_joins_it() {
    a_request_during_an_upgrade_joins_it("supervised");
}

#[test]
fn replace_a_request_during_an_upgrade_joins_it() {
    a_request_during_an_upgrade_joins_it("replace");
}

fn a_stopping_service_refuses(mode: &str) {
    let h = Harness::new(&format!("ctl-stop-{mode}"));
    let delay = [("MS_STOP_DELAY_MS", "60000")];
    let mut s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &delay);
    let (first, sock) = (s.first, s.socket.clone());
    let main = s.main_pid(first);
    signal(main, Signal::SIGTERM);
    wait_until("the lame-duck stop has begun", || {
        s.logged("stopping after stop_delay")
    });
    let refused = ctl(&["upgrade", "--socket", &sock]);
    assert_eq!(refused.code, Some(3), "{refused:?}");
    assert_eq!(refused.str("outcome"), "refused");
    assert!(refused.str("error").contains("stopping"), "{refused:?}");
    let status = ctl(&["status", "--socket", &sock, "--json"]);
    assert_eq!(status.str("state"), "stopping (lame duck)", "{status:?}");
    // A second SIGTERM ends the delay.
    signal(main, Signal::SIGTERM);
    s.svc.wait_kind("draining", Some(first));
    s.svc.wait_all_exited();
}

#[test]
fn supervised_a_stopping_service_refuses() {
    a_stopping_service_refuses("supervised");
}

#[test]
fn replace_a_stopping_service_refuses() {
    a_stopping_service_refuses("replace");
}

#[test]
fn a_service_that_cannot_be_reached_is_reported() {
    let h = Harness::new("ctl-unreachable");
    let missing = h.ctl.path().join("nothing.sock").display().to_string();
    let said = ctl(&["upgrade", "--socket", &missing]);
    assert_eq!(said.code, Some(5), "{said:?}");
    assert!(said.stderr.contains("nothing.sock"), "{said:?}");
    assert!(said.json.is_null(), "{said:?}");
    // A PID without a control socket (this test process).
    let me = std::process::id().to_string();
    let said = ctl(&["status", "--pid", &me]);
    assert_eq!(said.code, Some(5), "{said:?}");
    assert!(said.stderr.contains("no control socket"), "{said:?}");
    // A PID file that holds no PID.
    h.ctl.write("bad.pid", "not a pid\n");
    let bad = h.ctl.path().join("bad.pid").display().to_string();
    let said = ctl(&["upgrade", "--pid-file", &bad]);
    assert_eq!(said.code, Some(5), "{said:?}");
    assert!(said.stderr.contains("does not hold a PID"), "{said:?}");
    // Something that is not a tableflip service.
    let path = h.ctl.path().join("other.sock");
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
    let answer = std::thread::spawn(move || {
        if let Ok((s, _)) = other.accept() {
            // The request first, as a server would: then an answer that
            // is not a tableflip reply.
            let mut r = std::io::BufReader::new(&s);
            let _ = std::io::BufRead::read_line(&mut r, &mut String::new());
            let _ = std::io::Write::write_all(&mut &s, b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let said = ctl(&["upgrade", "--socket", &path.display().to_string()]);
    assert_eq!(said.code, Some(5), "{said:?}");
    assert!(said.stderr.contains("not a tableflip reply"), "{said:?}");
    let _ = answer.join();
    // Usage errors are clap's: status 2.
    let said = ctl(&["upgrade"]);
    assert_eq!(said.code, Some(2), "{said:?}");
}

fn another_user_is_refused(mode: &str) {
    use std::os::unix::process::CommandExt;
    let h = Harness::new(&format!("ctl-user-{mode}"));
    let s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let (first, sock) = (s.first, s.socket.clone());
    // The scratch directory must be reachable by the other user for the
    // mode of the socket itself to be what refuses.
    let dir_mode: std::fs::Permissions = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(h.ctl.path(), dir_mode).unwrap_or_else(|e| panic!("{e}"));
    let as_nobody = |args: &[&str]| {
        let out = Command::new(CTL)
            .args(args)
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Mode 0600: the connection itself is refused.
    let (code, stderr) = as_nobody(&["upgrade", "--socket", &sock]);
    assert_eq!(code, Some(5), "{stderr}");
    assert!(
        stderr.contains("Permission denied") || stderr.contains("permission denied"),
        "{stderr}"
    );
    // Opened up by mistake: the service checks the peer's user itself.
    let open: std::fs::Permissions = std::os::unix::fs::PermissionsExt::from_mode(0o666);
    std::fs::set_permissions(&sock, open).unwrap_or_else(|e| panic!("{e}"));
    let (code, stderr) = as_nobody(&["upgrade", "--socket", &sock]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("neither the service's user nor root"),
        "{stderr}"
    );
    // Nothing was upgraded.
    let status = ctl(&["status", "--socket", &sock, "--json"]);
    assert_eq!(status.num("generation"), 1, "{status:?}");
    s.stop(first);
}

#[test]
#[ignore = "needs root: runs tableflip-ctl as another user"]
fn supervised_another_user_is_refused() {
    another_user_is_refused("supervised");
}

#[test]
#[ignore = "needs root: runs tableflip-ctl as another user"]
fn replace_another_user_is_refused() {
    another_user_is_refused("replace");
}

fn a_request_without_a_newline_is_answered(mode: &str) {
    use std::io::{Read, Write};
    let h = Harness::new(&format!("ctl-eof-{mode}"));
    let s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let ask = |bytes: &[u8]| {
        let mut c =
            std::os::unix::net::UnixStream::connect(&s.socket).unwrap_or_else(|e| panic!("{e}"));
        c.set_read_timeout(Some(DEADLINE))
            .unwrap_or_else(|e| panic!("{e}"));
        c.write_all(bytes).unwrap_or_else(|e| panic!("{e}"));
        c.shutdown(std::net::Shutdown::Write)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    // The end of the stream ends the request.
    let status = ask(br#"{"command":"status"}"#);
    assert!(status.contains(r#""outcome":"status""#), "{status:?}");
    // Nothing at all: said so.
    let nothing = ask(b"");
    assert!(
        nothing.contains(r#""outcome":"bad_request""#),
        "{nothing:?}"
    );
    let first = s.first;
    s.stop(first);
}

#[test]
fn supervised_a_request_without_a_newline_is_answered() {
    a_request_without_a_newline_is_answered("supervised");
}

#[test]
fn replace_a_request_without_a_newline_is_answered() {
    a_request_without_a_newline_is_answered("replace");
}

/// A supervisor that does not accept (stopped, its backlog full): the
/// client's `--timeout` covers the connection too.
#[test]
fn the_timeout_covers_a_service_that_does_not_accept() {
    let h = Harness::new("ctl-backlog");
    let s = CtlService::start(&h, Path::new(MACRO_SVC), "supervised", &[]);
    let sup = s.first_pid;
    stop_process(sup);
    // Fill the control socket's backlog.
    let addr = socket2::SockAddr::unix(&s.socket).unwrap_or_else(|e| panic!("{e}"));
    let mut held = Vec::new();
    loop {
        let c = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .unwrap_or_else(|e| panic!("{e}"));
        c.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
        match c.connect(&addr) {
            Ok(()) => held.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect: {e}"),
        }
        assert!(held.len() < 10_000, "the backlog never filled");
    }
    let said = ctl(&["status", "--socket", &s.socket, "--timeout", "1s"]);
    signal(sup, Signal::SIGCONT);
    drop(held);
    assert_eq!(said.code, Some(6), "{said:?}");
    assert!(said.stderr.contains("does not accept"), "{said:?}");
    let first = s.first;
    s.stop(first);
}

/// During the drain of a stop (a request still in flight), the control
/// socket answers: the service is stopping.
fn a_draining_service_still_answers(mode: &str) {
    use std::io::{Read, Write};
    let h = Harness::new(&format!("ctl-drain-{mode}"));
    let mut s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let (first, sock, tcp) = (s.first, s.socket.clone(), s.tcp.clone());
    let slow = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(&tcp).unwrap_or_else(|e| panic!("{e}"));
        c.set_read_timeout(Some(DEADLINE))
            .unwrap_or_else(|e| panic!("{e}"));
        writeln!(c, "SLOW 3000").unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    });
    s.svc.wait_kind("slow", Some(first));
    signal(s.main_pid(first), Signal::SIGTERM);
    s.svc.wait_kind("draining", Some(first));
    let refused = ctl(&["upgrade", "--socket", &sock]);
    assert_eq!(refused.code, Some(3), "{refused:?}");
    assert!(refused.str("error").contains("stopping"), "{refused:?}");
    let status = ctl(&["status", "--socket", &sock, "--json"]);
    assert_eq!(status.code, Some(0), "{status:?}");
    assert_eq!(status.str("state"), "stopping", "{status:?}");
    assert_eq!(
        slow.join().map(|r| reply_pid(&r)).ok(),
        Some(first),
        "the request in flight completed"
    );
    s.svc.wait_all_exited();
    wait_until("the control socket's file is removed at the exit", || {
        !Path::new(&sock).exists()
    });
}

#[test]
fn supervised_a_draining_service_still_answers() {
    a_draining_service_still_answers("supervised");
}

#[test]
fn replace_a_draining_service_still_answers() {
    a_draining_service_still_answers("replace");
}

/// Clients that gave up while waiting for an upgrade's outcome free their
/// slots (supervised mode, which caps them at 64): `status` still answers.
#[test]
fn clients_that_hang_up_while_waiting_free_their_slots() {
    use std::io::Write;
    let h = Harness::new("ctl-hangup");
    let s = CtlService::start(&h, Path::new(MACRO_SVC), "supervised", &[]);
    let (first, sup, sock) = (s.first, s.first_pid, s.socket.clone());
    let mut s = s;
    h.ctl.write("init", "block");
    let asked = start_ctl(CTL, &["upgrade", "--socket", &sock, "--timeout", "60s"]);
    let second = s
        .svc
        .wait_for("the new generation", |e| {
            e.kind == "start" && e.pid != first && e.pid != sup
        })
        .pid;
    // Every other slot taken by a client that joins the upgrade.
    let mut waiting = Vec::new();
    for _ in 0..63 {
        let mut c =
            std::os::unix::net::UnixStream::connect(&sock).unwrap_or_else(|e| panic!("{e}"));
        c.write_all(b"{\"command\":\"upgrade\"}\n")
            .unwrap_or_else(|e| panic!("{e}"));
        waiting.push(c);
    }
    wait_until("63 requests have joined the upgrade", || {
        std::fs::read_to_string(&s.log)
            .is_ok_and(|l| l.matches("the request joins it").count() >= 63)
    });
    let full = ctl(&["status", "--socket", &sock, "--json"]);
    assert_eq!(full.code, Some(3), "every slot is taken: {full:?}");
    drop(waiting);
    wait_until("the slots are free again", || {
        ctl(&["status", "--socket", &sock, "--json"]).code == Some(0)
    });
    h.ctl.write("unblock", "");
    let said = asked.finish();
    assert_eq!(said.code, Some(0), "{said:?}");
    s.svc.wait_kind("draining", Some(first));
    s.stop(second);
}
