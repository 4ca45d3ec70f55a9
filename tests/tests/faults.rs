//! Faults around an upgrade (issue 6): broken binaries on disk, a parent or
//! child SIGKILLed at each phase, a successor dying after it took over,
//! the fd limit nearly reached, a PID file that cannot be written. After
//! each, exactly one generation serves, nothing is left behind, and the
//! next upgrade works.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::signal::Signal;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// Starts `exe` (a copy of `svc` or `svc` itself) listening on one TCP
/// port, with the PID file `svc.pid` in `ctl` and stderr (the library's
/// log) in `ctl/stderr.log`; returns once the first generation is ready.
fn start(exe: &str, ctl: &Scratch, envs: &[(&str, &str)]) -> (Service, u32, String) {
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", "wait-parent\n");
    let pid_file = ctl.path().join("svc.pid");
    let log = std::fs::File::create(ctl.path().join("stderr.log")).expect("create stderr.log");
    let mut cmd = Service::command(exe, ctl, envs);
    cmd.env("TF_PID_FILE", &pid_file)
        .env("RUST_LOG", "info")
        .stderr(log);
    let mut svc = Service::spawn_keeping_stderr(cmd);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    (svc, first, addr)
}

/// The number of fds `pid` has open (its `stats` event, on `SIGUSR1`).
fn fd_count(svc: &mut Service, pid: u32) -> usize {
    signal(pid, Signal::SIGUSR1);
    svc.wait_kind("stats", Some(pid)).num("fds")
}

/// Replaces the file at `exe` by `content` with `mode`, atomically (by
/// rename, as a package manager does: the running binary is not touched).
fn replace_exe(exe: &Path, content: &[u8], mode: u32) {
    let tmp = exe.with_extension("new");
    std::fs::write(&tmp, content).expect("write the new executable");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, exe).expect("rename the new executable into place");
}

fn log_of(ctl: &Scratch) -> String {
    std::fs::read_to_string(ctl.path().join("stderr.log")).unwrap_or_default()
}

/// Everything but `keep` among the service's processes has exited and
/// been reaped: one generation is left.
fn only_one_left(svc: &Service, keep: u32) {
    for pid in svc.pids().into_iter().filter(|p| *p != keep) {
        wait_gone(pid);
    }
    assert!(is_alive(keep), "generation {keep} is still running");
}

/// What replaces the executable, and the upgrade error it must give.
struct Broken {
    what: &'static str,
    content: &'static [u8],
    mode: u32,
    kind: &'static str,
    detail: &'static str,
}

const BROKEN: &[Broken] = &[
    Broken {
        what: "a program that exits at once",
        content: b"#!/bin/sh\nexit 7\n",
        mode: 0o755,
        kind: "ChildExited",
        detail: "exited with status 7",
    },
    Broken {
        what: "a program that crashes with SIGSEGV",
        content: b"#!/bin/sh\nkill -SEGV $$\n",
        mode: 0o755,
        kind: "ChildKilled",
        detail: "killed by signal 11",
    },
    Broken {
        what: "a program that is not a tableflip service and never gets ready",
        content: b"#!/bin/sh\nexec sleep 60\n",
        mode: 0o755,
        kind: "Timeout",
        detail: "was not ready within",
    },
    Broken {
        what: "a file that is not executable",
        content: b"#!/bin/sh\nexit 0\n",
        mode: 0o644,
        kind: "Spawn",
        detail: "Permission denied",
    },
    Broken {
        what: "an interpreter that does not exist",
        content: b"#!/nonexistent/interpreter\n",
        mode: 0o755,
        kind: "Spawn",
        detail: "No such file or directory",
    },
];

#[test]
fn broken_binaries_on_disk_fail_the_upgrade_and_the_old_generation_serves_on() {
    let h = Harness::new("f-broken");
    let ctl = &h.ctl;
    let exe = ctl.path().join("svc-bin");
    install_exe(SVC, &exe, 0);
    let exe_str = exe.to_str().expect("utf-8 path").to_owned();
    let (mut svc, first, addr) = start(&exe_str, ctl, &[("TF_UPGRADE_TIMEOUT_MS", "2000")]);
    let fds = fd_count(&mut svc, first);

    for broken in BROKEN {
        replace_exe(&exe, broken.content, broken.mode);
        let err = svc.upgrade_err(first);
        assert_eq!(
            err.get("kind"),
            broken.kind,
            "{}: {}",
            broken.what,
            err.line
        );
        assert!(
            err.get("msg").contains(broken.detail),
            "{}: the error says {:?}: {}",
            broken.what,
            broken.detail,
            err.line
        );
        if broken.kind == "Spawn" {
            assert!(
                err.get("msg").contains(&exe_str),
                "{}: the error names the executable: {}",
                broken.what,
                err.line
            );
        } else {
            let child: u32 = err.num("child");
            assert_eq!(
                proc_state(child),
                None,
                "{}: the child was reaped before the error (no zombie)",
                broken.what
            );
        }
        assert_eq!(
            serves(&addr),
            first,
            "{}: the old generation serves",
            broken.what
        );
        assert_eq!(
            fd_count(&mut svc, first),
            fds,
            "{}: the failed upgrade left no fd open",
            broken.what
        );
        let log = log_of(ctl);
        assert!(
            log.lines()
                .any(|l| l.contains("upgrade failed; this process keeps serving")
                    && l.contains(broken.detail)),
            "{}: no log line says the upgrade failed with {:?}:\n{log}",
            broken.what,
            broken.detail
        );
    }

    // A new process that names itself in the PID file and then dies
    // before it is ready: the old generation names itself again.
    let pid_file = ctl.path().join("svc.pid");
    replace_exe(
        &exe,
        b"#!/bin/sh\necho $$ > \"$TF_PID_FILE\"\nexit 9\n",
        0o755,
    );
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "ChildExited", "{}", err.line);
    assert_eq!(
        pid_file_pid(&pid_file),
        Some(first),
        "the PID file names the old generation again"
    );

    // The real binary is back: the next upgrade succeeds.
    install_exe(SVC, &exe, 0);
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &addr);
    assert_eq!(
        pid_file_pid(&ctl.path().join("svc.pid")),
        Some(second),
        "the PID file names the new generation"
    );
    svc.stop(second);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

/// When the parent is SIGKILLed during an upgrade.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// The child exists but has not read the handover yet.
    Spawned,
    /// The child has the sockets and runs its initialisation.
    Init,
    /// The child has just signalled readiness.
    Ready,
}

/// Starts an upgrade, holds the child at `phase`, SIGKILLs the parent,
/// lets the child go on: it must end up serving alone, named by the PID
/// file, and able to upgrade in turn.
fn parent_sigkilled(tag: &str, phase: Phase) {
    let _serial = serial();
    adopt_orphans();
    let ctl = Scratch::new(tag);
    let pid_file = ctl.path().join("svc.pid");
    let (mut svc, first, addr) = start(SVC, &ctl, &[]);
    match phase {
        Phase::Spawned => ctl.write("prenew", "block"),
        Phase::Init => ctl.write("init", "block"),
        // Keeps the parent alive after the handover, however fast it
        // would drain, so that the SIGKILL finds it.
        Phase::Ready => ctl.write("linger", &first.to_string()),
    }
    signal(first, Signal::SIGHUP);
    let held_at = match phase {
        Phase::Spawned => "pre-new",
        Phase::Init => "blocked",
        Phase::Ready => "ready",
    };
    let child = svc
        .wait_for(&format!("the child's {held_at}"), |e| {
            e.kind == held_at && e.pid != first
        })
        .pid;
    signal(first, Signal::SIGKILL);
    assert!(!svc.wait_first().success(), "the parent was SIGKILLed");
    ctl.remove("prenew");
    ctl.write("init", "ok");
    match phase {
        Phase::Spawned => ctl.write("unblock-new", ""),
        Phase::Init => ctl.write("unblock", ""),
        Phase::Ready => {}
    }
    let start = svc.wait_kind("start", Some(child));
    assert_eq!(start.get("parent"), first.to_string(), "{phase:?}");
    if !matches!(phase, Phase::Ready) {
        svc.wait_kind("ready", Some(child));
    }
    svc.wait_kind("parent-exited", Some(child));
    assert_eq!(serves(&addr), child, "{phase:?}: the child serves");
    assert_eq!(
        pid_file_pid(&pid_file),
        Some(child),
        "{phase:?}: the PID file names the child"
    );
    only_one_left(&svc, child);

    // It upgrades in turn.
    let next = svc.upgrade(child);
    svc.wait_kind("exit", Some(child));
    wait_gone(child);
    assert_eq!(serves(&addr), next);
    assert_eq!(pid_file_pid(&pid_file), Some(next));
    svc.stop(next);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

#[test]
fn parent_sigkilled_right_after_the_spawn_leaves_the_child_in_charge() {
    parent_sigkilled("f-pk-spawn", Phase::Spawned);
}

#[test]
fn parent_sigkilled_during_the_childs_init_leaves_the_child_in_charge() {
    parent_sigkilled("f-pk-init", Phase::Init);
}

#[test]
fn parent_sigkilled_right_after_readiness_leaves_the_child_in_charge() {
    parent_sigkilled("f-pk-ready", Phase::Ready);
}

#[test]
fn child_sigkilled_before_it_read_the_handover_fails_the_upgrade() {
    let h = Harness::new("f-ck-spawn");
    let ctl = &h.ctl;
    let (mut svc, first, addr) = start(SVC, ctl, &[]);
    let fds = fd_count(&mut svc, first);
    ctl.write("prenew", "block");
    signal(first, Signal::SIGHUP);
    let child = svc
        .wait_for("the child's pre-new", |e| {
            e.kind == "pre-new" && e.pid != first
        })
        .pid;
    signal(child, Signal::SIGKILL);
    let err = svc.wait_upgrade_err(first);
    assert_eq!(err.get("kind"), "ChildKilled", "{}", err.line);
    assert_eq!(err.num::<u32>("child"), child);
    assert_eq!(proc_state(child), None, "reaped before the error");
    assert_eq!(serves(&addr), first);
    assert_eq!(fd_count(&mut svc, first), fds, "no fd left open");

    ctl.remove("prenew");
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &addr);
    svc.stop(second);
}

/// The new generation dies (SIGKILL) after it became ready, while the old
/// one still runs: the old one, which still holds the sockets, starts a
/// replacement, which serves. A successor that stops cleanly (exit 0) is
/// not replaced.
#[test]
fn a_successor_killed_after_taking_over_is_replaced_by_the_old_generation() {
    let h = Harness::new("f-ck-ready");
    let ctl = &h.ctl;
    let pid_file = ctl.path().join("svc.pid");
    let (mut svc, first, addr) = start(SVC, ctl, &[]);
    // The old generation stays alive after the handover, until `release`.
    ctl.write("linger", "");
    let second = svc.upgrade(first);
    svc.wait_kind("lingering", Some(first));
    assert_eq!(serves(&addr), second);

    signal(second, Signal::SIGKILL);
    let replacement = svc.wait_for("a replacement", |e| {
        e.kind == "start" && e.pid != first && e.pid != second
    });
    let third = replacement.pid;
    assert_eq!(
        replacement.get("parent"),
        first.to_string(),
        "the old generation started the replacement"
    );
    svc.wait_kind("ready", Some(third));
    wait_gone(second);
    assert_eq!(serves(&addr), third, "the replacement serves");
    assert_eq!(pid_file_pid(&pid_file), Some(third));
    let log = log_of(ctl);
    assert!(
        log.contains("the new generation died after it took over")
            && log.contains("killed by signal 9"),
        "the old generation logs what happened:\n{log}"
    );

    // The old generation goes; the replacement is in charge.
    ctl.remove("linger");
    ctl.write("release", "");
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    svc.wait_kind("parent-exited", Some(third));
    only_one_left(&svc, third);

    // A successor that is stopped on purpose (exit 0) is not replaced.
    ctl.remove("release");
    ctl.write("linger", &third.to_string());
    let fourth = svc.upgrade(third);
    svc.wait_kind("lingering", Some(third));
    signal(fourth, Signal::SIGTERM);
    svc.wait_kind("exit", Some(fourth));
    wait_gone(fourth);
    wait_until("the old generation sees its successor exit", || {
        log_of(ctl)
            .lines()
            .any(|l| l.contains("the new generation has exited") && l.contains(&fourth.to_string()))
    });
    ctl.write("release", "");
    svc.wait_kind("exit", Some(third));
    svc.wait_all_exited();
    let starts: Vec<u32> = svc
        .history
        .iter()
        .filter(|e| e.kind == "start")
        .map(|e| e.pid)
        .collect();
    assert_eq!(
        starts,
        vec![first, second, third, fourth],
        "no replacement for a successor that exited 0"
    );
    for pid in svc.pids() {
        wait_gone(pid);
    }
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

/// The fd limit is nearly reached in the old generation (1, 3 or 4 fds
/// left: the handover needs two pipes, and a pidfd or, where the system
/// spawns by fork, a pipe of its own): the upgrade fails with an error that
/// says so, no process is left behind (with 4 left, the child may already
/// exist when the last fd is refused: it is killed and reaped), the old
/// generation serves on with what it has, leaks nothing, and upgrades once
/// fds are free again.
#[test]
fn fd_limit_nearly_reached_fails_the_upgrade_cleanly() {
    let h = Harness::new("f-nofile");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    // A small limit keeps filling it quick.
    let mut cmd = Service::command("prlimit", ctl, &[("RUST_LOG", "info")]);
    cmd.args(["--nofile=128:128", "--", SVC]);
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    let fds = fd_count(&mut svc, first);

    for free in [1, 3, 4] {
        ctl.remove("release-fds");
        ctl.write("usr2", &format!("exhaust-fds {free}\n"));
        signal(first, Signal::SIGUSR2);
        let exhausted = svc.wait_kind("exhausted", Some(first));
        assert!(
            exhausted.num::<usize>("opened") > free,
            "{}",
            exhausted.line
        );
        let err = svc.upgrade_err(first);
        assert!(
            err.get("msg").contains("Too many open files"),
            "{free} fds left: the error says why: {}",
            err.line
        );
        assert_eq!(
            children_of(first),
            Vec::<u32>::new(),
            "{free} fds left: no child is left"
        );
        // Serving needs one fd per connection: it goes on.
        assert_eq!(serves(&addr), first, "{free} fds left: still serving");
        ctl.write("release-fds", "");
        svc.wait_kind("released-fds", Some(first));
        assert_eq!(
            fd_count(&mut svc, first),
            fds,
            "{free} fds left: the failed upgrade leaked no fd"
        );
    }

    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &addr);
    svc.stop(second);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

/// The children of `pid` (of all its threads), from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| {
                    let path = t.ok()?.path().join("children");
                    std::fs::read_to_string(path).ok()
                })
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A PID file that cannot be written in the new generation (its directory
/// removed, then turned into a regular file): the new generation cannot
/// become ready and exits, the upgrade fails, the old generation serves
/// on, and upgrades once the directory is back. A first generation whose
/// PID file cannot be written fails at startup, naming the path.
#[test]
fn unwritable_pid_file_directory_fails_the_upgrade_cleanly() {
    let h = Harness::new("f-piddir");
    let ctl = &h.ctl;
    let dir = ctl.path().join("run");
    std::fs::create_dir(&dir).expect("mkdir");
    let pid_file = dir.join("svc.pid");
    let pid_file_str = pid_file.to_str().expect("utf-8 path");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[("TF_PID_FILE", pid_file_str)]);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    assert_eq!(pid_file_pid(&pid_file), Some(first));

    let moved = ctl.path().join("run-moved");
    std::fs::rename(&dir, &moved).expect("move the directory away");
    for what in ["missing", "a regular file"] {
        if what == "a regular file" {
            std::fs::write(&dir, "not a directory").expect("write");
        }
        let err = svc.upgrade_err(first);
        assert_eq!(err.get("kind"), "ChildExited", "{what}: {}", err.line);
        let child: u32 = err.num("child");
        let ready_err = svc.wait_kind("ready-err", Some(child));
        assert_eq!(ready_err.get("kind"), "PidFile", "{}", ready_err.line);
        assert!(
            ready_err.get("msg").contains(pid_file_str),
            "{what}: the error names the PID file: {}",
            ready_err.line
        );
        assert_eq!(proc_state(child), None, "{what}: reaped");
        assert_eq!(serves(&addr), first, "{what}: the old generation serves");
    }
    std::fs::remove_file(&dir).expect("rm");
    std::fs::rename(&moved, &dir).expect("move the directory back");
    let second = svc.upgrade(first);
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert_eq!(pid_file_pid(&pid_file), Some(second));
    svc.stop(second);

    // A first generation fails at startup.
    let missing = ctl.path().join("nowhere").join("svc.pid");
    let missing = missing.to_str().expect("utf-8 path");
    let mut svc = Service::start(SVC, ctl, &[("TF_PID_FILE", missing)]);
    let first = svc.first_pid();
    let err = svc.wait_kind("ready-err", Some(first));
    assert!(err.get("msg").contains(missing), "{}", err.line);
    assert_eq!(svc.wait_first().code(), Some(3));
}

/// A tmpfs mounted for a test, unmounted on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The PID file's file system is full (a 16 KiB tmpfs): the new
/// generation cannot write its PID file, the upgrade fails, the old PID
/// file is intact and no temporary file is left; once there is room, the
/// upgrade succeeds.
#[test]
#[ignore = "needs root: mounts a 16 KiB tmpfs"]
fn full_pid_file_directory_fails_the_upgrade_cleanly() {
    let h = Harness::new("f-pidfull");
    let ctl = &h.ctl;
    let dir = ctl.path().join("run");
    std::fs::create_dir(&dir).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tableflip-test"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount a tmpfs (this test needs root)");
    let _mount = Mount(dir.clone());
    let pid_file = dir.join("svc.pid");
    let pid_file_str = pid_file.to_str().expect("utf-8 path");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[("TF_PID_FILE", pid_file_str)]);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    assert_eq!(pid_file_pid(&pid_file), Some(first));

    // Fill the file system.
    let filler = dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("create filler");
        let block = [0u8; 1024];
        while f.write_all(&block).is_ok() {}
    }
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "ChildExited", "{}", err.line);
    let child: u32 = err.num("child");
    let ready_err = svc.wait_kind("ready-err", Some(child));
    assert!(
        ready_err.get("msg").contains("No space left on device")
            && ready_err.get("msg").contains(pid_file_str),
        "{}",
        ready_err.line
    );
    assert_eq!(serves(&addr), first);
    assert_eq!(
        pid_file_pid(&pid_file),
        Some(first),
        "the old PID file is intact"
    );
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .expect("ls")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    left.sort();
    assert_eq!(left, ["filler", "svc.pid"], "no temporary file left behind");

    std::fs::remove_file(&filler).expect("rm filler");
    let second = svc.upgrade(first);
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert_eq!(pid_file_pid(&pid_file), Some(second));
    svc.stop(second);
}

/// As PID 1 of its PID namespace (a container started without an init),
/// the service refuses to upgrade, with an error that says why and what
/// to do: its exit after the handover would end the namespace, the new
/// generation with it. It serves on.
#[test]
#[ignore = "needs root: creates a PID namespace (unshare --pid)"]
fn as_pid_1_an_upgrade_is_refused_with_advice() {
    let h = Harness::new("f-pid1");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut cmd = Service::command("unshare", ctl, &[]);
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child", "--", SVC]);
    let mut svc = Service::spawn(cmd);
    let addr = svc.wait_kind("listening", Some(1)).get("addr").to_owned();
    svc.wait_kind("ready", Some(1));
    assert_eq!(serves(&addr), 1, "the service is PID 1 in its namespace");
    // Its PID as seen from here: the only child of `unshare`.
    let unshare = svc.first_pid();
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
        .expect("read the children of unshare");
    let host_pid: u32 = children.trim().parse().expect("one child");

    signal(host_pid, Signal::SIGHUP);
    let err = svc.wait_upgrade_err(1);
    assert_eq!(err.get("kind"), "Pid1", "{}", err.line);
    assert!(
        err.get("msg").contains("TABLEFLIP_MODE=supervised"),
        "{}",
        err.line
    );
    assert_eq!(serves(&addr), 1, "it serves on");
    signal(host_pid, Signal::SIGTERM);
    svc.wait_kind("exit", Some(1));
    assert!(svc.wait_first().success());
}

/// Where the system has what `posix_spawn` needs (glibc 2.29, Linux 5.3),
/// the next generation is spawned that way; `TABLEFLIP_SPAWN_WITH_FORK=1`
/// selects the fork-and-exec path every other system uses. That path hands
/// over every kind of socket too, reports a failing child, and leaves no
/// process behind.
#[test]
fn the_fork_and_exec_path_hands_over_too() {
    let h = Harness::new("f-fork");
    let ctl = &h.ctl;
    let sock = ctl.path().join("s.sock");
    ctl.write(
        "listen",
        &format!(
            "web tcp 127.0.0.1:0\ndns udp 127.0.0.1:0\nsock unix {}\n",
            sock.display()
        ),
    );
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(SVC, ctl, &[("TABLEFLIP_SPAWN_WITH_FORK", "1")]);
    let first = svc.first_pid();
    let listening = |svc: &mut Service, pid: u32, name: &str| {
        svc.wait_for(&format!("{name} of {pid}"), |e| {
            e.kind == "listening" && e.pid == pid && e.get("name") == name
        })
    };
    let web = listening(&mut svc, first, "web");
    let dns = listening(&mut svc, first, "dns");
    let sock_ino = listening(&mut svc, first, "sock").get("ino").to_owned();
    svc.wait_kind("ready", Some(first));

    ctl.write("init", "exit 4");
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "ChildExited", "{}", err.line);
    assert_eq!(proc_state(err.num("child")), None, "reaped");
    ctl.write("init", "ok");

    let second = svc.upgrade(first);
    for (name, before) in [("web", &web), ("dns", &dns)] {
        let after = listening(&mut svc, second, name);
        assert_eq!(
            after.get("ino"),
            before.get("ino"),
            "{name}: the same socket"
        );
    }
    assert_eq!(listening(&mut svc, second, "sock").get("ino"), sock_ino);
    finish_upgrade(&mut svc, first, second, web.get("addr"));
    assert_eq!(reply_pid(&udp_get(dns.get("addr")).expect("udp")), second);
    svc.wait_kind("parent-exited", Some(second));
    let third = svc.upgrade(second);
    svc.wait_kind("exit", Some(second));
    wait_gone(second);
    assert_eq!(serves(web.get("addr")), third);
    svc.stop(third);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}
