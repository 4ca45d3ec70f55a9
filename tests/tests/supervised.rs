//! Supervised mode (`TABLEFLIP_MODE=supervised`), end to end with real
//! processes and signals: the process that was started stays at its PID,
//! runs no application code, starts each generation as its child,
//! re-executes itself into the new binary after an upgrade, and replaces a
//! generation that dies.
//!
//! The service is `macro_svc` (a `#[tableflip::main]` service; see
//! `tests/src/macro_svc/common.rs` for its events and protocol). Only
//! generations print events: the supervisor runs no application code.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nix::sys::signal::Signal;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const HTTP_UPGRADER: &str = env!("CARGO_BIN_EXE_http_upgrader");
const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// A supervised `macro_svc`, started from a copy of the binary in the
/// scratch directory (so that a test can replace it), and where it serves.
struct Supervised {
    svc: Service,
    /// The supervisor: the PID that was started.
    sup: u32,
    /// The generation serving now.
    current: u32,
    tcp: String,
    unix: String,
    pid_file: PathBuf,
    exe: PathBuf,
}

fn start(ctl: &Scratch, extra: &[(&str, &str)]) -> Supervised {
    let exe = ctl.path().join("app");
    install_exe(MACRO_SVC, &exe, 0);
    let unix = ctl.path().join("u.sock").display().to_string();
    let pid_file = ctl.path().join("svc.pid");
    let mut cmd = macro_svc_cmd(&exe, ctl, "supervised");
    cmd.env("MS_PID_FILE", &pid_file);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut svc = Service::spawn(cmd);
    let sup = svc.first_pid();
    let first = svc.wait_kind("start", None);
    assert_ne!(first.pid, sup, "the supervisor runs no application code");
    assert_eq!(first.get("gen"), "1");
    assert_eq!(
        parent_of(first.pid),
        Some(sup),
        "a generation is the supervisor's child"
    );
    let tcp = svc
        .wait_for("TCP listening", |e| {
            e.pid == first.pid && e.get("name") == "TCP"
        })
        .get("addr")
        .to_owned();
    svc.wait_kind("init-done", Some(first.pid));
    wait_until("the PID file names the supervisor", || {
        pid_file_pid(&pid_file) == Some(sup)
    });
    Supervised {
        svc,
        sup,
        current: first.pid,
        tcp,
        unix,
        pid_file,
        exe,
    }
}

impl Supervised {
    /// The PID in the reply of a fresh TCP request.
    fn serving(&self) -> u32 {
        reply_pid(&tcp_get_line(&self.tcp, "GET").expect("the service answers over TCP"))
    }

    /// Waits for the next generation (not `current`) to start and finish
    /// its init, and for `current` to drain; returns the new PID.
    fn next_generation(&mut self) -> u32 {
        let old = self.current;
        let started = self.svc.wait_for("a new generation", |e| {
            e.kind == "start" && e.pid != old && e.pid != self.sup
        });
        assert_eq!(parent_of(started.pid), Some(self.sup));
        self.svc.wait_kind("init-done", Some(started.pid));
        self.current = started.pid;
        started.pid
    }

    /// `SIGHUP` to `target`; returns the new generation's PID once the
    /// old one drains.
    fn upgrade_via(&mut self, target: u32) -> u32 {
        let old = self.current;
        signal(target, Signal::SIGHUP);
        let new = self.next_generation();
        self.svc.wait_kind("draining", Some(old));
        wait_gone(old);
        new
    }

    /// Waits until the supervisor runs the binary now at `exe` (it
    /// re-executes itself once the new generation is ready).
    fn wait_supervisor_runs_current_binary(&self) {
        self.wait_supervisor_runs(&self.exe);
    }

    /// Waits until the supervisor runs the file at `binary`.
    fn wait_supervisor_runs(&self, binary: &Path) {
        let want = std::fs::metadata(binary).map(|m| (m.dev(), m.ino())).ok();
        wait_until("the supervisor runs the new binary", || {
            std::fs::metadata(format!("/proc/{}/exe", self.sup))
                .map(|m| (m.dev(), m.ino()))
                .ok()
                == want
        });
    }

    /// `SIGTERM` to the supervisor: every generation drains, the
    /// supervisor exits last, with status 0, leaving nothing behind.
    fn stop(mut self) {
        signal(self.sup, Signal::SIGTERM);
        let status = self.svc.wait_first();
        assert_eq!(status.code(), Some(0), "the supervisor exits 0: {status:?}");
        self.svc.wait_all_exited();
        for pid in self.svc.pids() {
            wait_gone(pid);
        }
        assert!(
            !self.pid_file.exists(),
            "the PID file is removed at the stop"
        );
        assert!(
            !Path::new(&self.unix).exists(),
            "the Unix socket file is removed at the stop"
        );
        assert!(tcp_refused(&self.tcp), "nothing listens after the stop");
    }
}

/// Upgrades keep the supervisor's PID (the PID file names it throughout),
/// run each new binary (the generations, and the supervisor itself once
/// the new generation is ready), and never make a request fail; `SIGHUP`
/// to a generation is forwarded to the supervisor.
#[test]
fn upgrades_keep_the_pid_and_run_the_new_binary() {
    let h = Harness::new("sup-upgrade");
    let mut s = start(&h.ctl, &[]);
    assert_eq!(s.serving(), s.current);
    assert_eq!(
        reply_pid(&unix_get_line(&s.unix, "GET").expect("Unix socket")),
        s.current
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (tcp, stop, ok, failed) = (s.tcp.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match tcp_get_line(&tcp, "GET") {
                    Ok(r) if r.starts_with("pid ") => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        })
    };
    for round in 1..=3 {
        // A new binary at the path: the next generation runs it, and so
        // does the supervisor afterwards.
        install_exe(MACRO_SVC, &s.exe, round);
        let old = s.current;
        let target = if round == 2 { old } else { s.sup };
        let new = s.upgrade_via(target);
        assert_ne!(new, old);
        s.wait_supervisor_runs_current_binary();
        assert_eq!(s.serving(), new);
        assert!(is_alive(s.sup), "the supervisor stays");
        assert_eq!(pid_file_pid(&s.pid_file), Some(s.sup));
    }
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request fails");
    assert!(ok.load(Ordering::SeqCst) > 0);
    s.stop();
}

/// The `FDSize:` of `/proc/<pid>/status`: how many fds the process's fd
/// table holds now (proc(5)).
fn fd_table_size(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no FDSize in /proc/{pid}/status"))
}

/// A generation the supervisor starts (with few fds of its own to pass
/// on) makes room in its fd table for the connections the previous one may
/// hand over, before it has threads: growing the table of a process with
/// threads waits for an RCU grace period (kernel fs/file.c), which stalled
/// the takeover of 1000 idle connections for 8–24 ms at a time (the
/// supervisor section of tableflip-bench: old generation gone after
/// 50–70 ms, against 24–27 ms in replace mode, whose generations inherit
/// their parent's table). Before the fix a generation's table held 256 here.
#[test]
fn a_generation_starts_with_room_for_the_connections_handed_over() {
    let h = Harness::new("sup-fd-table");
    let mut s = start(&h.ctl, &[]);
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit")
        .0;
    let want = usize::try_from(soft.min(16_384)).expect("a usize");
    assert!(
        fd_table_size(s.current) >= want,
        "the first generation's fd table holds {} fds, not {want}",
        fd_table_size(s.current)
    );
    let sup = s.sup;
    let new = s.upgrade_via(sup);
    assert!(
        fd_table_size(new) >= want,
        "the new generation's fd table holds {} fds, not {want}",
        fd_table_size(new)
    );
    s.stop();
}

/// A generation killed while serving is replaced from the sockets the
/// supervisor holds: no connection is refused meanwhile.
#[test]
fn a_generation_killed_is_replaced_without_refusing_a_connection() {
    let h = Harness::new("sup-kill");
    let mut s = start(&h.ctl, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let client = {
        let (tcp, stop, refused, served) =
            (s.tcp.clone(), stop.clone(), refused.clone(), served.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match std::net::TcpStream::connect(&tcp) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    for _ in 0..2 {
        let old = s.current;
        signal(old, Signal::SIGKILL);
        let new = s.next_generation();
        assert_ne!(new, old);
        assert_eq!(s.serving(), new);
    }
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "no connection is refused"
    );
    assert!(served.load(Ordering::SeqCst) > 0);
    assert!(is_alive(s.sup));
    s.stop();
}

/// A new binary that exits at once, or hangs past the upgrade timeout, is
/// killed; the serving generation keeps serving, and the next upgrade with
/// a good binary succeeds.
#[test]
fn a_broken_new_binary_leaves_the_old_generation_serving() {
    let h = Harness::new("sup-broken");
    let mut s = start(&h.ctl, &[("MS_UPGRADE_TIMEOUT_MS", "1000")]);
    let old = s.current;

    // A binary that fails at once; it leaves a mark when it runs.
    let mark = h.ctl.path().join("broken-ran");
    install_script(
        &s.exe,
        &format!("#!/bin/sh\necho $$ > {}\nexit 3\n", mark.display()),
    );
    signal(s.sup, Signal::SIGHUP);
    wait_until("the broken binary ran", || mark.exists());
    let broken: u32 = std::fs::read_to_string(&mark)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .expect("the broken binary's pid");
    wait_gone(broken);
    assert_eq!(s.serving(), old, "the old generation serves on");
    assert_eq!(pid_file_pid(&s.pid_file), Some(s.sup));

    // A binary that hangs in its init: killed after the upgrade timeout.
    install_exe(MACRO_SVC, &s.exe, 1);
    h.ctl.write("init", "hang");
    signal(s.sup, Signal::SIGHUP);
    let hanging = s
        .svc
        .wait_for("the hanging generation", |e| e.kind == "hanging");
    s.svc.wait_for("the hanging generation's start", |e| {
        e.kind == "start" && e.pid == hanging.pid
    });
    wait_gone(hanging.pid);
    assert_eq!(s.serving(), old, "the old generation serves on");

    h.ctl.write("init", "ok");
    let new = s.upgrade_via(s.sup);
    assert_ne!(new, old);
    assert_eq!(s.serving(), new);
    s.stop();
}

/// A deploy that replaces the binary while a new generation initialises:
/// the supervisor re-executes itself into the binary that generation runs
/// (checked, ready), never into what the path names by then (here a
/// program that exits at once, which would end the service).
#[test]
fn the_supervisor_re_executes_into_the_binary_its_generation_runs() {
    let h = Harness::new("sup-swap");
    let mut s = start(&h.ctl, &[]);
    let old = s.current;
    // The next generation: a wrapper that waits for `go`, then runs a
    // copy of the service (another file, another inode).
    let real = h.ctl.path().join("app-real");
    install_exe(MACRO_SVC, &real, 2);
    let go = h.ctl.path().join("go");
    let waiting = h.ctl.path().join("waiting");
    install_script(
        &s.exe,
        &format!(
            "#!/bin/sh\ntouch {waiting}\nwhile [ ! -e {go} ]; do sleep 0.05; done\nexec {real} \"$@\"\n",
            waiting = waiting.display(),
            go = go.display(),
            real = real.display()
        ),
    );
    signal(s.sup, Signal::SIGHUP);
    // The wrapper runs (no tableflip generation yet); the path now names
    // a program that exits at once.
    wait_until("the wrapper waits", || waiting.exists());
    install_script(&s.exe, "#!/bin/sh\nexit 3\n");
    std::fs::write(&go, "").expect("go");
    let new = s.next_generation();
    s.svc.wait_kind("draining", Some(old));
    wait_gone(old);
    s.wait_supervisor_runs(&real);
    assert_eq!(s.serving(), new);
    assert_eq!(pid_file_pid(&s.pid_file), Some(s.sup));
    s.stop();
}

/// The supervisor's re-exec into the new binary fails (here the file lost
/// its execute permission after the new generation started from it): the
/// supervisor says so, keeps running its previous binary, and serves on;
/// the next upgrade re-executes it normally.
#[test]
fn a_failed_re_exec_leaves_the_supervisor_serving_on_its_old_binary() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new("sup-reexec-fails");
    let exe = h.ctl.path().join("app");
    install_exe(MACRO_SVC, &exe, 0);
    let pid_file = h.ctl.path().join("svc.pid");
    let mut cmd = macro_svc_cmd(&exe, &h.ctl, "supervised");
    cmd.env("MS_PID_FILE", &pid_file);
    let log = log_to_file(&mut cmd, &h.ctl);
    let mut svc = Service::spawn_keeping_stderr(cmd);
    let sup = svc.first_pid();
    let a = svc.wait_kind("init-done", None).pid;
    wait_until("the service is ready", || {
        pid_file_pid(&pid_file) == Some(sup)
    });
    let running = |pid: u32| {
        std::fs::metadata(format!("/proc/{pid}/exe"))
            .map(|m| (m.dev(), m.ino()))
            .ok()
    };
    let first_binary = running(sup);

    // A new release, which loses its execute bit once its generation runs.
    install_exe(MACRO_SVC, &exe, 1);
    h.ctl.write("init", "block");
    signal(sup, Signal::SIGHUP);
    let b = svc
        .wait_for("the new generation blocks", |e| {
            e.kind == "blocked" && e.pid != a
        })
        .pid;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    h.ctl.write("init", "ok");
    h.ctl.write("unblock", "");
    svc.wait_kind("draining", Some(a));
    wait_gone(a);
    wait_until("the supervisor says the re-exec failed", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("cannot re-execute itself"))
    });
    assert!(is_alive(sup), "the supervisor runs on");
    assert_eq!(running(sup), first_binary, "on its previous binary");
    let reply = |addr: &str| reply_pid(&tcp_get_line(addr, "GET").expect("the service answers"));
    let tcp = svc
        .wait_for("B's TCP", |e| {
            e.kind == "listening" && e.pid == b && e.get("name") == "TCP"
        })
        .get("addr")
        .to_owned();
    assert_eq!(reply(&tcp), b, "the new generation serves");

    // The next upgrade re-executes the supervisor as usual.
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    signal(sup, Signal::SIGHUP);
    let c = svc
        .wait_for("a third generation", |e| {
            e.kind == "init-done" && e.pid != a && e.pid != b
        })
        .pid;
    svc.wait_kind("draining", Some(b));
    wait_until("the supervisor runs the release", || {
        running(sup) == running(c)
    });
    assert_eq!(reply(&tcp), c);
    svc.terminate_first();
}

/// A generation that dies after a deploy left a broken binary at the path
/// (no reload yet): the replacement started from the path fails, and the
/// next one runs the supervisor's own binary, the last that served; the
/// service goes on, the supervisor does not give up.
#[test]
fn a_crash_after_a_broken_deploy_is_replaced_from_the_last_good_binary() {
    let h = Harness::new("sup-crash-broken");
    let mut s = start(&h.ctl, &[]);
    let old = s.current;
    let mark = h.ctl.path().join("broken-ran");
    install_script(
        &s.exe,
        &format!("#!/bin/sh\necho $$ > {}\nexit 3\n", mark.display()),
    );
    signal(old, Signal::SIGKILL);
    wait_until("the broken binary was tried", || mark.exists());
    let new = s.next_generation();
    assert_ne!(new, old);
    assert_eq!(s.serving(), new);
    assert!(
        std::fs::read_to_string(format!("/proc/{}/cmdline", s.sup)).is_ok(),
        "the supervisor is still there"
    );
    s.stop();
}

/// `SIGTERM` to the supervisor right after an upgrade, with a slow request
/// in flight on the draining generation: new connections are refused at
/// once, the request is answered, every process exits, the supervisor
/// last, with status 0.
#[test]
fn a_stop_right_after_an_upgrade_answers_the_request_in_flight() {
    let h = Harness::new("sup-stop");
    let mut s = start(&h.ctl, &[]);
    let old = s.current;
    let slow = {
        let tcp = s.tcp.clone();
        std::thread::spawn(move || -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(&tcp)?;
            c.set_read_timeout(Some(DEADLINE))?;
            c.write_all(b"SLOW 3000\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })
    };
    s.svc.wait_kind("slow", Some(old));
    signal(s.sup, Signal::SIGHUP);
    let new = s.next_generation();
    s.svc.wait_kind("draining", Some(old));
    signal(s.sup, Signal::SIGTERM);
    // New clients are refused at once, not left in a backlog nobody
    // accepts from, while the request in flight is still being answered.
    wait_until("new connections are refused", || tcp_refused(&s.tcp));
    assert!(!slow.is_finished(), "refused while the drain still runs");
    let reply = slow
        .join()
        .expect("slow client")
        .expect("the slow request is answered");
    assert_eq!(reply_pid(&reply), old, "by the generation that took it");
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    s.svc.wait_all_exited();
    wait_gone(old);
    wait_gone(new);
    assert!(!s.pid_file.exists());
}

/// A stop that began without a signal (the serving generation exited 0 on
/// its own) still drains gracefully when a `SIGTERM` or `SIGINT` follows:
/// that is the first stop signal, not the second that kills at once. (The
/// same Ctrl-C reaches the supervisor and its generation, and the
/// supervisor may see the generation's exit first.)
#[test]
fn the_first_stop_signal_during_a_stop_for_another_reason_still_drains() {
    let h = Harness::new("sup-stop-twice");
    let mut s = start(&h.ctl, &[]);
    let old = s.current;
    let slow = {
        let tcp = s.tcp.clone();
        std::thread::spawn(move || tcp_get_line(&tcp, "SLOW 3000"))
    };
    s.svc.wait_kind("slow", Some(old));
    signal(s.sup, Signal::SIGHUP);
    let new = s.next_generation();
    s.svc.wait_kind("draining", Some(old));
    // The serving generation stops on its own: the service stops.
    signal(new, Signal::SIGTERM);
    wait_until("the supervisor reaped it", || proc_state(new).is_none());
    signal(s.sup, Signal::SIGINT);
    assert!(!slow.is_finished(), "the drain still runs");
    let reply = slow
        .join()
        .expect("slow client")
        .expect("the slow request is answered");
    assert_eq!(reply_pid(&reply), old, "by the generation that took it");
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    s.svc.wait_all_exited();
    wait_gone(old);
}

/// Ctrl-C in a terminal (`SIGINT` to the foreground process group) stops
/// the service after any number of upgrades: generations rejoin the
/// supervisor's group once ready.
#[test]
fn sigint_to_the_process_group_stops_the_service_after_upgrades() {
    let h = Harness::new("sup-ctrlc");
    let mut s = start(&h.ctl, &[]);
    for _ in 0..2 {
        let sup = s.sup;
        s.upgrade_via(sup);
    }
    let group = nix::unistd::Pid::from_raw(i32::try_from(s.sup).expect("pid"));
    assert_eq!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(
            i32::try_from(s.current).expect("pid")
        )))
        .ok(),
        Some(group),
        "the serving generation is in the supervisor's process group"
    );
    nix::sys::signal::killpg(group, Signal::SIGINT).expect("killpg");
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    s.svc.wait_all_exited();
    wait_gone(s.current);
}

/// The first generation failing its init fails the start: the supervisor
/// exits with its status, and names what happened.
#[test]
fn a_first_generation_that_fails_makes_the_supervisor_exit_with_its_status() {
    let h = Harness::new("sup-first");
    h.ctl.write("init", "exit 7");
    let exe = h.ctl.path().join("app");
    install_exe(MACRO_SVC, &exe, 0);
    let out = macro_svc_cmd(&exe, &h.ctl, "supervised")
        .output()
        .expect("run the service");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("the first generation exited with status 7"),
        "{stderr}"
    );
}

/// A generation's messages come before its exit: one that said it was
/// ready and then exited at once (a service asked to stop during its init)
/// was ready, even when the supervisor sees the exit and the message in the
/// same wake-up. The supervisor is stopped (`SIGSTOP`) across that window
/// so that it always does; it then exits 0, as the service asked, not 1 as
/// for a first generation that failed.
#[test]
fn a_generation_ready_then_gone_before_the_supervisor_looks_was_ready() {
    let h = Harness::new("sup-ready-gone");
    h.ctl.write("init", "block-stop");
    let exe = h.ctl.path().join("app");
    install_exe(MACRO_SVC, &exe, 0);
    let mut svc = Service::spawn(macro_svc_cmd(&exe, &h.ctl, "supervised"));
    let sup = svc.first_pid();
    let generation = svc.wait_kind("blocked", None).pid;
    stop_process(sup);
    h.ctl.write("unblock", "");
    // Its exit closes its fds after its messages were sent.
    wait_until("the generation has exited", || exiting_or_gone(generation));
    wait_until("the supervisor has its SIGCHLD pending", || {
        exit_reported_to_parent(generation)
    });
    signal(sup, Signal::SIGCONT);
    let status = svc.wait_first();
    assert_eq!(
        status.code(),
        Some(0),
        "the service stopped as its init asked: {status:?}"
    );
}

/// The same during an upgrade: a new generation that said it was ready and
/// exited before the supervisor acted on it never took over, so the old
/// one, never told to drain, serves on and the service does not stop.
#[test]
fn a_new_generation_ready_then_gone_leaves_the_old_one_serving() {
    let h = Harness::new("sup-upgrade-gone");
    let mut s = start(&h.ctl, &[]);
    let old = s.current;
    h.ctl.write("init", "block-stop");
    signal(s.sup, Signal::SIGHUP);
    let new = s
        .svc
        .wait_for("the new generation blocks", |e| {
            e.kind == "blocked" && e.pid != old
        })
        .pid;
    s.svc
        .wait_for("its start", |e| e.kind == "start" && e.pid == new);
    stop_process(s.sup);
    h.ctl.write("unblock", "");
    // Its exit reached the supervisor (not only a zombie leader whose
    // other threads still run: the kernel tells the parent after them).
    wait_until("the supervisor has its SIGCHLD pending", || {
        exit_reported_to_parent(new)
    });
    signal(s.sup, Signal::SIGCONT);
    wait_until("the supervisor reaped it", || proc_state(new).is_none());
    assert_eq!(s.serving(), old, "the old generation serves on");
    assert!(is_alive(s.sup), "the supervisor runs on");
    assert!(
        s.svc
            .position(|e| e.kind == "draining" && e.pid == old)
            .is_none(),
        "the old generation was never told to drain"
    );

    h.ctl.write("init", "ok");
    let next = s.upgrade_via(s.sup);
    assert_eq!(s.serving(), next);
    s.stop();
}

/// An upgrade asked for with `Upgrader::upgrade` while another is in
/// flight runs after it and is answered, although the supervisor
/// re-executes itself in between (the queue of askers was not carried
/// across the `exec`: the asker waited for ever).
#[test]
fn an_upgrade_asked_for_during_one_is_answered_after_the_re_exec() {
    let h = Harness::new("sup-queued");
    h.ctl.write("usr2-upgrade", "");
    let exe = h.ctl.path().join("app");
    install_exe(MACRO_SVC, &exe, 0);
    let mut cmd = macro_svc_cmd(&exe, &h.ctl, "supervised");
    cmd.env("MS_PID_FILE", h.ctl.path().join("svc.pid"));
    let log = log_to_file(&mut cmd, &h.ctl);
    let mut svc = Service::spawn_keeping_stderr(cmd);
    let sup = svc.first_pid();
    let a = svc.wait_kind("init-done", None).pid;
    // The supervisor forwards SIGUSR2 to the generation once it serves.
    wait_until("the service is ready", || {
        pid_file_pid(&h.ctl.path().join("svc.pid")) == Some(sup)
    });
    h.ctl.write("init", "block");
    signal(sup, Signal::SIGUSR2);
    svc.wait_kind("upgrade-asked", Some(a));
    let b = svc
        .wait_for("the new generation blocks", |e| {
            e.kind == "blocked" && e.pid != a
        })
        .pid;
    signal(sup, Signal::SIGUSR2);
    svc.wait_kind("upgrade-asked", Some(a));
    wait_until("the supervisor has queued the second upgrade", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("the upgrade runs once it is done"))
    });
    h.ctl.write("init", "ok");
    h.ctl.write("unblock", "");
    let first = svc.wait_kind("upgrade-result", Some(a));
    assert_eq!(first.get("ok"), "true", "{first:?}");
    assert_eq!(first.num::<u32>("child"), b);
    let second = svc.wait_kind("upgrade-result", Some(a));
    assert_eq!(second.get("ok"), "true", "{second:?}");
    let c = second.num::<u32>("child");
    assert!(c != a && c != b, "a third generation: {second:?}");
    svc.terminate_first();
}

/// A replacement that keeps failing its init is not started for ever: after
/// five failures in a row (backing off in between) the supervisor gives up
/// and exits 1.
#[test]
fn a_replacement_that_keeps_failing_is_given_up() {
    let h = Harness::new("sup-giveup");
    let s = start(&h.ctl, &[]);
    h.ctl.write("init", "exit 4");
    signal(s.current, Signal::SIGKILL);
    let mut s = s;
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(1), "{status:?}");
    s.svc.wait_all_exited();
    let attempts = s
        .svc
        .history
        .iter()
        .filter(|e| e.kind == "start" && e.pid != s.current)
        .count();
    assert_eq!(
        attempts,
        5,
        "five replacements were tried: {:#?}",
        s.svc.lines()
    );
    assert!(!s.pid_file.exists());
}

/// The runtime API gets the same mode: `Upgrader::new` becomes the
/// supervisor in the process that was started, and returns only in the
/// generations (`examples/http_upgrader.rs`, unchanged).
#[test]
fn the_runtime_api_example_runs_supervised() {
    let h = Harness::new("sup-api");
    let pid_file = h.ctl.path().join("http.pid");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(HTTP_UPGRADER);
    cmd.env("TABLEFLIP_MODE", "supervised")
        .env("HTTP_ADDR", &addr)
        .env("PID_FILE", &pid_file)
        .env("RUST_LOG", "info");
    let mut svc = Service::spawn(cmd);
    let sup = svc.first_pid();
    wait_until("the PID file names the supervisor", || {
        pid_file_pid(&pid_file) == Some(sup)
    });
    let get = || -> u32 {
        let text = http_get(&addr);
        text.split_whitespace()
            .skip_while(|w| *w != "pid")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {text:?}"))
    };
    let first = get();
    assert_ne!(first, sup);
    assert_eq!(parent_of(first), Some(sup));
    signal(sup, Signal::SIGHUP);
    wait_until("a new generation serves", || get() != first);
    wait_gone(first);
    signal(sup, Signal::SIGTERM);
    assert_eq!(svc.wait_first().code(), Some(0));
    assert!(!pid_file.exists());
}

/// Socket activation: the supervisor takes the socket systemd passed
/// (`systemd-socket-activate` stands in for systemd), hands it to every
/// generation, and keeps it across upgrades; the generations never bind
/// the address themselves (they could not: the passed socket holds it).
#[test]
fn activated_sockets_are_held_by_the_supervisor() {
    let h = Harness::new("sup-activated");
    let tcp = format!("127.0.0.1:{}", free_port());
    let unix = h.ctl.path().join("u.sock");
    let mut cmd = Command::new(systemd_socket_activate());
    cmd.arg(format!("--listen={tcp}")).arg("--fdname=TCP");
    for (k, v) in [
        ("TF_CTL", h.ctl.path().display().to_string()),
        ("TABLEFLIP_MODE", "supervised".to_owned()),
        ("MS_UNIX", unix.display().to_string()),
        ("RUST_LOG", "info".to_owned()),
    ] {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    cmd.arg(MACRO_SVC).stdin(std::process::Stdio::null());
    let mut svc = Service::spawn(cmd);
    // systemd-socket-activate execs the service in place: this is the
    // supervisor.
    let sup = svc.first_pid();
    let mut reply = None;
    wait_until("the activated socket is served", || {
        reply = tcp_get_line(&tcp, "GET").ok();
        reply.is_some()
    });
    let first = svc.wait_kind("start", None);
    assert_ne!(first.pid, sup, "the supervisor runs no application code");
    assert_eq!(parent_of(first.pid), Some(sup));
    assert_eq!(reply.map(|r| reply_pid(&r)), Some(first.pid));
    let ev = svc.wait_for("TCP listening", |e| {
        e.pid == first.pid && e.kind == "listening" && e.get("name") == "TCP"
    });
    assert_eq!(
        ev.get("addr"),
        tcp,
        "the passed socket, not the declared address"
    );
    svc.wait_kind("init-done", Some(first.pid));

    signal(sup, Signal::SIGHUP);
    let second = svc.wait_for("a new generation", |e| {
        e.kind == "start" && e.pid != first.pid && e.pid != sup
    });
    let ev = svc.wait_for("TCP listening in generation 2", |e| {
        e.pid == second.pid && e.kind == "listening" && e.get("name") == "TCP"
    });
    assert_eq!(ev.get("addr"), tcp);
    svc.wait_kind("draining", Some(first.pid));
    wait_gone(first.pid);
    assert_eq!(
        reply_pid(&tcp_get_line(&tcp, "GET").expect("served after the upgrade")),
        second.pid
    );

    signal(sup, Signal::SIGTERM);
    let status = svc.wait_first();
    assert_eq!(status.code(), Some(0), "the supervisor exits 0: {status:?}");
    svc.wait_all_exited();
    assert!(tcp_refused(&tcp), "nothing listens after the stop");
}

/// What systemd hears in supervised mode: every notification comes from
/// the supervisor (the main PID), none names another `MAINPID=`, and the
/// generations do not get `NOTIFY_SOCKET`: `READY=1` with the serving
/// generation in `STATUS=`; per upgrade `RELOADING=1` with
/// `MONOTONIC_USEC=`, then `READY=1`; `STOPPING=1` on stop.
#[test]
fn only_the_supervisor_notifies_and_never_sends_mainpid() {
    use tableflip_tests::notify::{Notify, contains, expect, is};
    let h = Harness::new("sup-notify");
    let mut notify = Notify::at_path(&h.ctl);
    let env = notify.env.clone();
    let mut s = start(&h.ctl, &[("NOTIFY_SOCKET", &env)]);
    let first = s.current;
    let ready = notify.next("READY=1 at the start");
    expect(
        &ready,
        s.sup,
        &[
            ("READY", is(1)),
            ("STATUS", contains(format!("generation 1, pid {first}"))),
        ],
    );
    for _ in 0..2 {
        let old = s.current;
        let new = s.upgrade_via(s.sup);
        assert_ne!(new, old);
        let reloading = notify.next("RELOADING=1");
        assert_eq!(reloading.sender, s.sup, "{:?}", reloading.raw);
        assert_eq!(reloading.get("RELOADING"), Some("1"), "{:?}", reloading.raw);
        assert!(reloading.has("MONOTONIC_USEC"), "{:?}", reloading.raw);
        let done = notify.next("READY=1 after the upgrade");
        expect(
            &done,
            s.sup,
            &[("READY", is(1)), ("STATUS", contains(format!("pid {new}")))],
        );
    }
    let sup = s.sup;
    s.stop();
    let stopping = notify.next("STOPPING=1");
    assert_eq!(stopping.sender, sup);
    assert!(stopping.has("STOPPING"), "{:?}", stopping.raw);
    notify.assert_quiet("after the supervisor exited");
    assert!(
        notify.log.iter().all(|n| !n.has("MAINPID")),
        "no MAINPID= in supervised mode: {:?}",
        notify.summaries()
    );
}

/// Connections and files handed on (`fds().add_conn`, `add_file`) go
/// from generation to generation through the supervisor, as in replace
/// mode: the same TCP connection (the peer reads what each new generation
/// writes to it) and the same open file (its inode), across two upgrades
/// and the supervisor's re-execution.
#[test]
fn connections_and_files_are_handed_on_through_the_supervisor() {
    let h = Harness::new("sup-handon");
    let peer = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the peer");
    let state = h.ctl.path().join("state");
    std::fs::write(&state, "").expect("state file");
    let ino = std::fs::metadata(&state).expect("state").ino();
    h.ctl.write(
        "hand-on",
        &format!(
            "{} {}",
            peer.local_addr().expect("peer address"),
            state.display()
        ),
    );
    let mut s = start(&h.ctl, &[]);
    s.svc.wait_kind("added-conn", Some(s.current));
    s.svc.wait_kind("added-file", Some(s.current));
    let (conn, _) = peer.accept().expect("the first generation connects");
    conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut lines = std::io::BufReader::new(conn);
    for generation in 2..=3 {
        let sup = s.sup;
        let new = s.upgrade_via(sup);
        s.svc.wait_kind("took-conn", Some(new));
        let file = s.svc.wait_kind("took-file", Some(new));
        assert_eq!(file.num::<u64>("ino"), ino, "the same file");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut lines, &mut line).expect("read from the connection");
        assert_eq!(
            line.trim(),
            format!("gen {generation} pid {new}"),
            "the new generation writes to the connection the first one opened"
        );
        s.wait_supervisor_runs_current_binary();
    }
    s.stop();
}

/// A serving generation that does not answer the supervisor's request for
/// its connections and files (here stopped with `SIGSTOP`) does not hold
/// the upgrade up: after the collect timeout (the upgrade timeout when it
/// is shorter than 5 s) the new generation starts without them and serves.
#[test]
fn a_generation_that_does_not_hand_on_does_not_hold_the_upgrade_up() {
    let h = Harness::new("sup-handon-stuck");
    let peer = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the peer");
    let state = h.ctl.path().join("state");
    std::fs::write(&state, "").expect("state file");
    h.ctl.write(
        "hand-on",
        &format!(
            "{} {}",
            peer.local_addr().expect("peer address"),
            state.display()
        ),
    );
    let mut s = start(&h.ctl, &[("MS_UPGRADE_TIMEOUT_MS", "2000")]);
    let old = s.current;
    s.svc.wait_kind("added-conn", Some(old));
    stop_process(old);
    signal(s.sup, Signal::SIGHUP);
    let new = s.next_generation();
    // It did not get the connection: it opened one of its own.
    s.svc.wait_kind("added-conn", Some(new));
    assert!(
        s.svc.position(|e| e.kind == "took-conn").is_none(),
        "nothing was handed on"
    );
    assert_eq!(s.serving(), new, "the upgrade went through");
    signal(old, Signal::SIGCONT);
    s.svc.wait_kind("draining", Some(old));
    wait_gone(old);
    s.stop();
}

/// A forged `TABLEFLIP_SUPERVISOR` state (what a hostile environment can
/// hand the binary) naming PID 0 (to `kill` and `waitid`, the caller's
/// whole process group) and a process that is not the supervisor's child
/// as its generations: neither is adopted, signalled or waited for; with
/// nothing left serving, the supervisor starts a generation of its own.
#[test]
fn a_forged_state_naming_pid_0_and_a_stranger_adopts_neither() {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::io::Write as _;
    let h = Harness::new("sup-forged");
    /// Kills the stranger whatever happens.
    struct Victim(std::process::Child);
    impl Drop for Victim {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut victim = Victim(Command::new("sleep").arg("600").spawn().expect("sleep"));
    let state = format!(
        r#"{{"version":1,"generation":3,"announced":true,"held":[],"generations":[{{"pid":0,"number":3,"draining":false,"parent_pipe_fd":8}},{{"pid":{},"number":2,"draining":true,"parent_pipe_fd":9}}]}}"#,
        victim.0.id()
    );
    let memfd = memfd_create(
        c"forged",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd_create");
    let mut file = std::fs::File::from(memfd);
    file.write_all(state.as_bytes()).expect("write the state");
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK,
        ),
    )
    .expect("seal");
    let fifo = h.ctl.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // The state on fd 7 (from stdin), pipes on fds 8 and 9, then the
    // service in place of the shell, in a process group of its own.
    let mut cmd = Command::new("/bin/sh");
    use std::os::unix::process::CommandExt as _;
    cmd.arg("-c")
        .arg(r#"exec 7<&0 8<>"$FIFO" 9<>"$FIFO" </dev/null; exec "$0""#)
        .arg(MACRO_SVC)
        .process_group(0)
        .stdin(std::process::Stdio::from(file))
        .env("FIFO", &fifo)
        .env("TABLEFLIP_SUPERVISOR", "1:7")
        .env("TABLEFLIP_MODE", "supervised")
        .env("TF_CTL", h.ctl.path())
        .env("MS_UNIX", h.ctl.path().join("u.sock"))
        .env("RUST_LOG", "info");
    let mut svc = Service::spawn(cmd);
    let sup = svc.first_pid();
    let started = svc.wait_kind("start", None);
    assert_ne!(started.pid, sup);
    assert_eq!(
        started.get("gen"),
        "4",
        "the generation after the carried one"
    );
    assert_eq!(parent_of(started.pid), Some(sup));
    let tcp = svc
        .wait_for("TCP listening", |e| {
            e.pid == started.pid && e.get("name") == "TCP"
        })
        .get("addr")
        .to_owned();
    svc.wait_kind("init-done", Some(started.pid));
    assert_eq!(
        reply_pid(&tcp_get_line(&tcp, "GET").expect("the new generation serves")),
        started.pid
    );
    signal(sup, Signal::SIGTERM);
    let status = svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    svc.wait_all_exited();
    assert_eq!(
        victim.0.try_wait().expect("try_wait"),
        None,
        "the stranger named in the state was left alone"
    );
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    out
}

/// A program that creates its `Upgrader` inside a multi-thread runtime
/// cannot become a supervisor (a thread with the signals unblocked could
/// die of `SIGHUP`): it is told so, with the fix, and nothing starts.
#[test]
fn a_supervisor_inside_a_running_runtime_is_refused_with_the_fix() {
    let h = Harness::new("sup-threads");
    h.ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, &h.ctl, &[("TABLEFLIP_MODE", "supervised")]);
    let err = svc.wait_kind("error", None);
    let msg = err.get("msg");
    assert!(msg.contains("single thread"), "{}", err.line);
    assert!(msg.contains("TABLEFLIP_MODE=replace"), "{}", err.line);
    svc.wait_all_exited();
}

/// `TABLEFLIP_MODE` with a value that is no mode stops the start, naming
/// the value and the two that work.
#[test]
fn an_unknown_mode_is_an_error_naming_it() {
    let _serial = serial();
    let out = Command::new(MACRO_SVC)
        .env("TABLEFLIP_MODE", "supervisor")
        .env("RUST_LOG", "info")
        .output()
        .expect("run the service");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TABLEFLIP_MODE=\"supervisor\"") && stderr.contains("`supervised`"),
        "{stderr}"
    );
}

/// A `TABLEFLIP_SUPERVISOR` that is not a state this supervisor wrote
/// (garbage, a standard stream, a closed fd, a version from the future,
/// an fd that is not a sealed memory file): a startup error naming the
/// variable and the problem, exit status 1, nothing started.
#[test]
fn a_bogus_carried_state_is_an_error_naming_it() {
    let _serial = serial();
    let regular = Scratch::new("sup-bogus");
    let path = regular.path().join("state");
    std::fs::write(&path, "{}").expect("write");
    for (value, says) in [
        ("garbage", "is not `<version>:<fd>`"),
        ("1:1", "standard stream"),
        ("1:-1", "not a file descriptor"),
        ("0:7", "version 0"),
        ("9:7", "version 9"),
        ("1:987", "fd 987"),
        ("1:7", "not a sealed memory file"),
    ] {
        let file = std::fs::File::open(&path).expect("open");
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"exec 7<&0 </dev/null; exec "$0""#)
            .arg(MACRO_SVC)
            .stdin(std::process::Stdio::from(file))
            .env("TABLEFLIP_SUPERVISOR", value)
            .env("RUST_LOG", "info")
            .output()
            .expect("run the service");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{value}: {stderr}");
        assert!(
            stderr.contains("carried across exec is unusable") && stderr.contains(says),
            "{value}: {stderr}"
        );
        assert!(
            !stderr.contains("\"start\"") && !stderr.contains("starting the first generation"),
            "{value}: nothing started: {stderr}"
        );
    }
}

/// The processes whose parent is `pid` (from `/proc`), with their command
/// names.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| parent_of(*p) == Some(pid))
                .map(|p| {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                    (p, comm.trim().to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A supervised `macro_svc` in a container made with `unshare` (PID, mount
/// and network namespaces, loopback up), started through `init` (`[]` for
/// none: the supervisor is PID 1).
struct Container {
    svc: Service,
    /// The host PID of the namespace's first process (PID 1 inside).
    pid1: u32,
    unix: String,
}

fn container(h: &Harness, init: &[&str]) -> Container {
    let unix = h.ctl.path().join("u.sock").display().to_string();
    let mut cmd = Service::command("unshare", &h.ctl, &[]);
    cmd.env("TABLEFLIP_MODE", "supervised")
        .env("MS_UNIX", &unix)
        .env("MS_PID_FILE", h.ctl.path().join("svc.pid"))
        .env("RUST_LOG", "info")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--net",
            "--kill-child",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$@\"",
            "sh",
        ])
        .args(init)
        .arg(MACRO_SVC);
    let mut svc = Service::spawn(cmd);
    let first = svc.wait_kind("init-done", None);
    let unshare = svc.first_pid();
    let pid1 = children_of(unshare)
        .first()
        .map(|(p, _)| *p)
        .expect("the namespace's PID 1 (the only child of unshare)");
    assert_eq!(
        reply_pid(&unix_get_line(&unix, "GET").expect("the service answers")),
        first.pid
    );
    Container { svc, pid1, unix }
}

impl Container {
    /// `upgrades` upgrades by `SIGHUP` to `target` (a host PID), under a
    /// client that never stops asking; returns the number of failed
    /// requests.
    fn upgrades_under_load(&mut self, target: u32, upgrades: usize) -> usize {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let client = {
            let (unix, stop, failed) = (self.unix.clone(), stop.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if !unix_get_line(&unix, "GET").is_ok_and(|r| r.starts_with("pid ")) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        let mut current = reply_pid(&unix_get_line(&self.unix, "GET").expect("a reply"));
        for _ in 0..upgrades {
            signal(target, Signal::SIGHUP);
            let next = self.svc.wait_for("a new generation ready", |e| {
                e.kind == "init-done" && e.pid != current
            });
            self.svc.wait_kind("draining", Some(current));
            current = next.pid;
            wait_until("the new generation answers", || {
                unix_get_line(&self.unix, "GET").is_ok_and(|r| reply_pid(&r) == current)
            });
        }
        stop.store(true, Ordering::SeqCst);
        client.join().expect("client thread");
        failed.load(Ordering::SeqCst)
    }

    /// The container is still running (its first process has not exited).
    fn running(&mut self) -> bool {
        self.svc.poll_events();
        is_alive(self.pid1) && is_alive(self.svc.first_pid())
    }
}

/// As PID 1 of a container (as `docker run` without `--init` starts it),
/// upgrades under load fail no request and never end the container; the
/// orphans the kernel hands to PID 1 are reaped; `SIGTERM` (`docker
/// stop`) stops the service and ends the container with status 0.
#[test]
#[ignore = "needs root: creates PID, mount and network namespaces (unshare)"]
fn as_pid_1_of_a_container_upgrades_never_end_it() {
    let h = Harness::new("sup-pid1");
    h.ctl.write("orphan", "");
    let mut c = container(&h, &[]);
    let pid1 = c.pid1;
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid1}/exe")).ok(),
        std::fs::canonicalize(MACRO_SVC).ok(),
        "the supervisor itself is PID 1"
    );
    assert_eq!(c.upgrades_under_load(pid1, 3), 0, "no request fails");
    assert!(c.running(), "the container is still running");
    // Each generation left a `sleep` behind; PID 1 adopts and reaps them.
    wait_until("the orphans are reaped", || {
        children_of(pid1).iter().all(|(_, comm)| comm != "sleep")
    });
    assert!(
        children_of(pid1)
            .iter()
            .all(|(p, _)| proc_state(*p) != Some('Z')),
        "no zombie is left: {:?}",
        children_of(pid1)
    );
    signal(pid1, Signal::SIGTERM);
    let status = c.svc.wait_first();
    assert_eq!(
        status.code(),
        Some(0),
        "the container ends cleanly: {status:?}"
    );
}

/// Under tini (what `docker run --init` uses), which exits when its child
/// exits: in supervised mode its child, the supervisor, stays, so upgrades
/// under load never end the container; tini forwards `SIGTERM` and the
/// service stops cleanly.
#[test]
#[ignore = "needs root: creates PID, mount and network namespaces (unshare); needs tini (Debian package tini)"]
fn under_tini_upgrades_never_end_the_container() {
    let h = Harness::new("sup-tini");
    let mut c = container(&h, &["tini", "--"]);
    let tini = c.pid1;
    let sup = children_of(tini)
        .first()
        .map(|(p, _)| *p)
        .expect("tini's child: the supervisor");
    assert_eq!(c.upgrades_under_load(sup, 3), 0, "no request fails");
    assert!(c.running(), "tini and the container are still running");
    assert_eq!(
        children_of(tini).first().map(|(p, _)| *p),
        Some(sup),
        "tini's child is still the supervisor"
    );
    signal(tini, Signal::SIGTERM);
    let status = c.svc.wait_first();
    assert_eq!(
        status.code(),
        Some(0),
        "the container ends cleanly: {status:?}"
    );
}
