//! Upgrades of the `svc` test service: real processes, sockets, signals.

use nix::sys::signal::Signal;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

#[test]
fn upgrade_hands_the_same_socket_to_a_new_pid() {
    let h = Harness::new("basic");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    assert_eq!(
        reply_pid(&tcp_get(&addr).expect("first generation serves")),
        first
    );

    signal(first, Signal::SIGHUP);
    let ok = svc.wait_kind("upgrade-ok", Some(first));
    let second: u32 = ok.get("child").parse().expect("child pid");
    assert_ne!(second, first);
    let listening = svc.wait_kind("listening", Some(second));
    assert_eq!(
        listening.get("addr"),
        addr,
        "the port-0 socket is inherited with its port"
    );
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert_eq!(
        reply_pid(&tcp_get(&addr).expect("second generation serves")),
        second
    );

    stop(&mut svc, second);
}

#[test]
fn second_and_third_generations_are_reaped() {
    let h = Harness::new("reap");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    let second = svc.upgrade(first);
    svc.wait_kind("ready", Some(second));
    assert!(svc.wait_first().success());
    // The second generation may upgrade once it has seen its parent exit
    // (before that, it would refuse: ParentAlive).
    svc.wait_kind("parent-exited", Some(second));
    let third = svc.upgrade(second);
    svc.wait_kind("exit", Some(second));
    wait_gone(second);
    stop(&mut svc, third);
    wait_gone(third);
}

/// Starts `svc` listening on one TCP port; returns the service, its first
/// PID and the address, once the first generation is ready.
fn start_web(ctl: &Scratch, envs: &[(&str, &str)]) -> (Service, u32, String) {
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, envs);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    (svc, first, addr)
}

/// Stops the service, checks that nothing of it is left.
fn stop(svc: &mut Service, pid: u32) {
    svc.stop(pid);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

#[test]
fn upgrade_before_ready_is_refused() {
    let h = Harness::new("notready");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", "upgrade-now\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let err = svc.wait_kind("upgrade-err", Some(first));
    assert_eq!(err.get("kind"), "NotReady", "{}", err.line);
    assert!(err.get("msg").contains("not ready"), "{}", err.line);
    let ready = svc.wait_kind("ready", Some(first));
    let refused_at = svc
        .position(|e| e.pid == first && e.kind == "upgrade-err")
        .expect("refusal seen");
    assert!(
        svc.position(|e| e.line == ready.line).expect("ready seen") > refused_at,
        "the refusal came before readiness"
    );
    assert!(
        svc.history.iter().all(|e| e.pid == first),
        "a refused upgrade starts no process: {:#?}",
        svc.lines()
    );
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    assert_eq!(serves(&addr), first);

    // The refusal leaves the upgrader usable: once ready, it upgrades (and
    // the next generation's own `upgrade-now` is refused the same way).
    let second = svc.upgrade(first);
    let err = svc.wait_kind("upgrade-err", Some(second));
    assert_eq!(err.get("kind"), "NotReady", "{}", err.line);
    finish_upgrade(&mut svc, first, second, &addr);
    stop(&mut svc, second);
}

/// The next generation fails in its init (`init` control file): the parent
/// reports `kind` with `detail` in the message, has reaped the child by
/// then, keeps serving, and a later upgrade succeeds.
fn child_fails_before_ready(tag: &str, init: &str, kind: &str, detail: &str) {
    let _serial = serial();
    adopt_orphans();
    let ctl = Scratch::new(tag);
    let (mut svc, first, addr) = start_web(&ctl, &[]);

    ctl.write("init", init);
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), kind, "{}", err.line);
    assert!(err.get("msg").contains(detail), "{}", err.line);
    let child: u32 = err.num("child");
    let started = svc.wait_for("the failed child's start", |e| {
        e.kind == "start" && e.get("parent") == first.to_string()
    });
    assert_eq!(started.pid, child, "the error names the child that failed");
    assert_eq!(
        proc_state(child),
        None,
        "the parent reaped the failed child before reporting (no zombie)"
    );
    assert!(is_alive(first));
    assert_eq!(serves(&addr), first, "the parent keeps serving");

    ctl.write("init", "ok");
    let second = svc.upgrade(first);
    assert_ne!(second, child);
    finish_upgrade(&mut svc, first, second, &addr);
    stop(&mut svc, second);
}

#[test]
fn child_exiting_0_before_ready_fails_the_upgrade() {
    child_fails_before_ready("exit0", "exit 0", "ChildExited", "exited with status 0");
}

#[test]
fn child_exiting_non_zero_before_ready_fails_the_upgrade() {
    child_fails_before_ready("exit3", "exit 3", "ChildExited", "exited with status 3");
}

#[test]
fn child_sigkilled_before_ready_fails_the_upgrade() {
    child_fails_before_ready("sigkill", "sigkill", "ChildKilled", "killed by signal 9");
}

#[test]
fn child_aborting_before_ready_fails_the_upgrade() {
    child_fails_before_ready("abort", "abort", "ChildKilled", "killed by signal 6");
}

#[test]
fn child_panicking_before_ready_fails_the_upgrade() {
    // A panic in `main` unwinds out of it: exit status 101.
    child_fails_before_ready("panic", "panic", "ChildExited", "exited with status 101");
}

#[test]
fn upgrade_timeout_kills_and_reaps_the_child() {
    let h = Harness::new("timeout");
    let ctl = &h.ctl;
    let timeout = std::time::Duration::from_millis(1000);
    let ms = timeout.as_millis().to_string();
    let (mut svc, first, addr) = start_web(ctl, &[("TF_UPGRADE_TIMEOUT_MS", &ms)]);

    ctl.write("init", "hang");
    let asked = std::time::Instant::now();
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "Timeout", "{}", err.line);
    assert!(
        asked.elapsed() >= timeout,
        "the child got its whole grace period"
    );
    let child: u32 = err.num("child");
    assert_eq!(
        proc_state(child),
        None,
        "the timed-out child was killed and reaped before the error"
    );
    wait_gone(child);
    assert_eq!(serves(&addr), first, "the parent keeps serving");

    // The failed attempt does not block the next one.
    ctl.write("init", "ok");
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &addr);
    stop(&mut svc, second);
}

#[test]
fn concurrent_upgrade_is_refused() {
    let h = Harness::new("concurrent");
    let ctl = &h.ctl;
    let (mut svc, first, addr) = start_web(ctl, &[("TF_UPGRADE_TIMEOUT_MS", "60000")]);

    ctl.write("init", "block");
    signal(first, Signal::SIGHUP);
    let child = svc.wait_kind("blocked", None).pid;
    assert_ne!(child, first);

    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "UpgradeInProgress", "{}", err.line);
    assert_eq!(
        err.num::<u32>("child"),
        child,
        "the refusal names the upgrade in flight"
    );
    assert_eq!(
        svc.history
            .iter()
            .filter(|e| e.kind == "start" && e.get("parent") == first.to_string())
            .count(),
        1,
        "the refused upgrade started no second child"
    );

    // The upgrade in flight is unaffected, and completes.
    ctl.write("unblock", "");
    let ok = svc.wait_kind("upgrade-ok", Some(first));
    assert_eq!(ok.num::<u32>("child"), child);
    finish_upgrade(&mut svc, first, child, &addr);
    stop(&mut svc, child);
}

#[test]
fn stop_cancels_an_upgrade_in_flight() {
    let h = Harness::new("stopcancel");
    let ctl = &h.ctl;
    let sock = ctl.path().join("s.sock");
    ctl.write(
        "listen",
        &format!("web tcp 127.0.0.1:0\nsock unix {}\n", sock.display()),
    );
    let mut svc = Service::start(SVC, ctl, &[("TF_UPGRADE_TIMEOUT_MS", "60000")]);
    let first = svc.first_pid();
    let addr = svc
        .wait_for("web listening", |e| {
            e.kind == "listening" && e.get("name") == "web"
        })
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));

    ctl.write("init", "hang");
    signal(first, Signal::SIGHUP);
    let child = svc.wait_kind("hanging", None).pid;
    assert_ne!(child, first);

    signal(first, Signal::SIGTERM);
    let err = svc.wait_upgrade_err(first);
    assert_eq!(err.get("kind"), "Stopped", "{}", err.line);
    assert_eq!(
        proc_state(child),
        None,
        "the child was killed and reaped before the upgrade reported"
    );
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    svc.wait_all_exited();
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
    assert!(tcp_refused(&addr), "the service really stopped");
    assert!(
        !sock.exists(),
        "a stop without a successful upgrade removes the Unix socket file"
    );
}

#[test]
fn wait_for_parent_resolves_after_the_parent_exits() {
    let h = Harness::new("waitparent");
    let ctl = &h.ctl;
    ctl.write("actions", "wait-parent\n");
    let (mut svc, first, addr) = start_web(ctl, &[]);
    // Without a parent it resolves at once.
    let none = svc.wait_kind("parent-exited", Some(first));
    assert!(is_alive(first), "{}", none.line);

    let second = svc.upgrade(first);
    svc.wait_kind("parent-exited", Some(second));
    // Its fds are closed by then: it is exiting, if not a zombie yet.
    assert!(
        exiting_or_gone(first),
        "parent-exited while the parent still runs"
    );
    let exited = svc
        .position(|e| e.pid == first && e.kind == "exit")
        .expect("the first generation printed its exit");
    let noticed = svc
        .position(|e| e.pid == second && e.kind == "parent-exited")
        .expect("seen");
    assert!(exited < noticed, "{:#?}", svc.lines());
    finish_upgrade(&mut svc, first, second, &addr);
    stop(&mut svc, second);
}

#[test]
fn wait_for_parent_notices_a_sigkilled_parent() {
    let h = Harness::new("waitkill");
    let ctl = &h.ctl;
    ctl.write("actions", "wait-parent\n");
    ctl.write("linger", "");
    let (mut svc, first, addr) = start_web(ctl, &[]);
    let second = svc.upgrade(first);
    svc.wait_kind("ready", Some(second));
    svc.wait_kind("lingering", Some(first));
    assert!(is_alive(first));

    signal(first, Signal::SIGKILL);
    svc.wait_kind("parent-exited", Some(second));
    assert!(exiting_or_gone(first));
    assert_eq!(serves(&addr), second);
    ctl.write("release", "");
    stop(&mut svc, second);
}

#[test]
fn upgrade_is_refused_while_the_parent_still_runs() {
    let h = Harness::new("parentalive");
    let ctl = &h.ctl;
    ctl.write("actions", "wait-parent\n");
    ctl.write("linger", "");
    let (mut svc, first, addr) = start_web(ctl, &[]);
    let second = svc.upgrade(first);
    svc.wait_kind("ready", Some(second));
    svc.wait_kind("lingering", Some(first));

    let err = svc.upgrade_err(second);
    assert_eq!(err.get("kind"), "ParentAlive", "{}", err.line);
    assert!(
        err.get("msg").contains(&format!("pid {first}")),
        "the refusal names the parent: {}",
        err.line
    );
    assert!(
        !svc.history
            .iter()
            .any(|e| e.kind == "start" && e.get("parent") == second.to_string()),
        "no third generation was started"
    );

    // Once the parent has gone, the same upgrade works.
    ctl.write("release", "");
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    svc.wait_kind("parent-exited", Some(second));
    let third = svc.upgrade(second);
    svc.wait_kind("parent-exited", Some(third));
    assert_eq!(serves(&addr), third);
    stop(&mut svc, third);
}

#[test]
fn pid_file_is_replaced_atomically_relative_to_the_initial_directory() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new("pidfile");
    let ctl = &h.ctl;
    let elsewhere = ctl.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    // Each generation moves away from its initial directory before it is
    // ready: the relative PID file must still land in the initial one.
    ctl.write(
        "actions",
        &format!("chdir {}\nwait-parent\n", elsewhere.display()),
    );
    let pid_file = ctl.path().join("svc.pid");
    let mut cmd = Service::command(SVC, ctl, &[("TF_PID_FILE", "svc.pid")]);
    cmd.current_dir(ctl.path());
    // A restrictive umask: the PID file is 0644 all the same.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let mut svc = Service::spawn(cmd);
    nix::sys::stat::umask(old_umask);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));

    let check = |pid: u32| {
        let content = std::fs::read_to_string(&pid_file).expect("the PID file exists");
        assert_eq!(content, format!("{pid}\n"));
        let mode = std::fs::metadata(&pid_file)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "mode {mode:o}");
        assert!(
            !elsewhere.join("svc.pid").exists(),
            "the PID file followed the current directory"
        );
        let leftovers: Vec<String> = std::fs::read_dir(ctl.path())
            .expect("readdir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("svc.pid") && n != "svc.pid")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    };
    check(first);

    // A reader polling all along sees a whole PID every time, never an
    // empty, partial or missing file.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = std::sync::Arc::clone(&done);
        let pid_file = pid_file.clone();
        std::thread::spawn(move || {
            let (mut reads, mut bad) = (0u32, Vec::new());
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                match std::fs::read_to_string(&pid_file) {
                    Ok(c) if c.ends_with('\n') && c.trim().parse::<u32>().is_ok() => {}
                    other => bad.push(format!("{other:?}")),
                }
                reads += 1;
            }
            (reads, bad)
        })
    };

    let mut cur = first;
    for _ in 0..3 {
        let next = svc.upgrade(cur);
        // Written by the new generation before it told its parent.
        check(next);
        svc.wait_kind("parent-exited", Some(next));
        check(next);
        cur = next;
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (reads, bad) = reader.join().expect("reader");
    assert!(reads > 0);
    assert!(
        bad.is_empty(),
        "{} of {reads} reads were bad: {bad:?}",
        bad.len()
    );

    // A stop (no upgrade) removes the PID file this generation wrote.
    stop(&mut svc, cur);
    assert!(!pid_file.exists(), "the PID file outlived the service");
}

#[test]
fn replaced_executable_is_the_one_that_runs() {
    let h = Harness::new("newexe");
    let ctl = &h.ctl;
    let exe = ctl.path().join("svc-bin");
    install_exe(SVC, &exe, 0);
    let size = file_size(&exe);
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(exe.to_str().expect("utf-8 path"), ctl, &[]);
    let first = svc.first_pid();
    let ready = svc.wait_kind("ready", Some(first));
    assert_eq!(ready.num::<u64>("exe_size"), size);

    let mut cur = first;
    for extra in [16u64, 32] {
        // Replaced by rename while the old binary runs (as a package
        // manager does).
        install_exe(SVC, &exe, usize::try_from(extra).expect("small"));
        let next = svc.upgrade(cur);
        let ready = svc.wait_kind("ready", Some(next));
        assert_eq!(
            ready.num::<u64>("exe_size"),
            size + extra,
            "generation {next} runs the binary on disk at upgrade time"
        );
        svc.wait_kind("parent-exited", Some(next));
        cur = next;
    }
    stop(&mut svc, cur);
}

#[test]
fn missing_executable_fails_with_spawn_and_the_path() {
    let h = Harness::new("noexe");
    let ctl = &h.ctl;
    let exe = ctl.path().join("svc-bin");
    install_exe(SVC, &exe, 0);
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(exe.to_str().expect("utf-8 path"), ctl, &[]);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));

    std::fs::remove_file(&exe).expect("rm");
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "Spawn", "{}", err.line);
    assert!(
        err.get("msg").contains(&exe.display().to_string()),
        "the error names the executable: {}",
        err.line
    );
    assert!(
        svc.history.iter().all(|e| e.pid == first),
        "no process was started"
    );
    assert_eq!(serves(&addr), first, "the parent keeps serving");

    install_exe(SVC, &exe, 0);
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &addr);
    stop(&mut svc, second);
}

/// A parent hands a large handover (more than 256 fds) over with version 2
/// (the fds over a socket while the child starts) only to an executable
/// whose ELF note says it receives it; to anything else (here a script
/// that `exec`s the service, as an older build would be treated) with
/// version 1, which every build receives. Both ways, the same sockets go
/// on serving.
#[test]
fn upgrade_speaks_version_2_only_to_an_executable_that_says_it_receives_it() {
    let h = Harness::new("protover");
    let ctl = &h.ctl;
    let exe = ctl.path().join("svc-bin");
    install_exe(SVC, &exe, 0);
    let listen = many_tcp_listeners(300);
    ctl.write("listen", &listen);
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(exe.to_str().expect("utf-8 path"), ctl, &[]);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));

    let script = format!("#!/bin/sh\nexec {SVC} \"$@\"\n");
    let mut cur = first;
    // The binary, then the script; then the generation the script started
    // upgrades from the path it was `exec`ed with, the test binary itself.
    for (install, expected) in [(Some(true), "2"), (Some(false), "1"), (None, "2")] {
        match install {
            Some(true) => install_exe(SVC, &exe, 0),
            Some(false) => install_script(&exe, &script),
            None => {}
        }
        let next = svc.upgrade(cur);
        svc.wait_kind("ready", Some(next));
        assert_eq!(
            if handed_over_by_socket(next) {
                "2"
            } else {
                "1"
            },
            expected,
            "generation {next}, started from {}",
            match install {
                Some(false) => "a script",
                _ => "the binary",
            }
        );
        assert_eq!(serves(&addr), next, "the socket is inherited and served");
        svc.wait_kind("parent-exited", Some(next));
        cur = next;
    }
    stop(&mut svc, cur);
}

/// A small handover goes with version 1 even to a build that receives
/// version 2: queued whole before the child exists, it has nothing to gain.
#[test]
fn a_small_handover_uses_version_1() {
    let h = Harness::new("protosmall");
    let ctl = &h.ctl;
    ctl.write("actions", "wait-parent\n");
    let (mut svc, first, addr) = start_web(ctl, &[]);
    let second = svc.upgrade(first);
    svc.wait_kind("ready", Some(second));
    assert!(!handed_over_by_socket(second), "version 1 for one listener");
    assert_eq!(serves(&addr), second);
    svc.wait_kind("parent-exited", Some(second));
    stop(&mut svc, second);
}
