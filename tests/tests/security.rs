//! Nothing outside the service can be changed through it: socket file
//! permissions, socket files and PID files in shared directories, what is
//! handed to the next generation, children that must be reaped and killed
//! with what they started, signals that must reach the right process.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tableflip::{ListenSpec, Options};
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

/// `mode=` on a Unix socket: a local user who can write the socket's
/// directory swaps the new socket file for a symlink to a secret as soon
/// as it appears. The mode must never reach the secret. (The library used
/// to `chmod` the path after `bind`, following the symlink: a root service
/// made the secret world-writable within about a second of retries.)
#[test]
fn a_socket_files_mode_never_follows_a_swapped_path() {
    let _serial = serial();
    let dir = Scratch::new("s-mode");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret").expect("write the secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let path = dir.path().join("app.sock");
    let link = dir.path().join("link.tmp");

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let attacker = {
        let (stop, swaps, path, link, secret) = (
            Arc::clone(&stop),
            Arc::clone(&swaps),
            path.clone(),
            link.clone(),
            secret.clone(),
        );
        std::thread::spawn(move || {
            use std::os::unix::fs::FileTypeExt;
            while !stop.load(Ordering::Relaxed) {
                let fresh =
                    std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
                if fresh {
                    let _ = std::fs::remove_file(&link);
                    if std::os::unix::fs::symlink(&secret, &link).is_ok()
                        && std::fs::rename(&link, &path).is_ok()
                    {
                        swaps.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let spec = ListenSpec::new("ADMIN", "unix", path.display().to_string()).mode(0o666);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut attempts = 0u32;
    while Instant::now() < deadline && mode_of(&secret) == 0o600 {
        let _ = std::fs::remove_file(&path);
        let upg = tableflip::testing::upgrader(Options::default()).expect("stub");
        if let Ok(l) = upg.listen_with::<std::os::unix::net::UnixListener>(&spec) {
            drop(l);
        }
        attempts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("the attacker thread");
    assert_eq!(
        mode_of(&secret),
        0o600,
        "the secret's mode was changed through the socket path ({attempts} attempts, {} swaps)",
        swaps.load(Ordering::Relaxed)
    );
    assert!(
        swaps.load(Ordering::Relaxed) > 0,
        "the race was never run ({attempts} attempts)"
    );
}

/// Another instance, starting at the same moment, has bound its socket at
/// the path but not called `listen` yet (it refuses connections, as a
/// stale file does): it is not taken for stale; binding fails with
/// "address in use" and its file is untouched. (Probe-then-unlink deleted
/// it.)
#[test]
fn a_socket_bound_but_not_yet_listening_is_not_stale() {
    let _serial = serial();
    let dir = Scratch::new("s-bound");
    let path = dir.path().join("app.sock");
    let other = tableflip::socket2::Socket::new(
        tableflip::socket2::Domain::UNIX,
        tableflip::socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    other
        .bind(&tableflip::socket2::SockAddr::unix(&path).expect("address"))
        .expect("bind");
    let before = std::fs::symlink_metadata(&path).expect("stat");
    let upg = tableflip::testing::upgrader(Options::default()).expect("stub");
    let spec = ListenSpec::new("ADMIN", "unix", path.display().to_string());
    let err = upg
        .listen_with::<std::os::unix::net::UnixListener>(&spec)
        .expect_err("the path is another process's");
    let text = error_text(&err);
    assert!(text.contains("in use"), "{text}");
    let after = std::fs::symlink_metadata(&path).expect("the other socket's file is still there");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(before.ino(), after.ino(), "and it is the same file");
    other.listen(1).expect("the other instance goes on");
    std::os::unix::net::UnixStream::connect(&path).expect("and serves");
}

/// Two instances start at the same moment on a path that holds a stale
/// socket file: at most one gets the path, and its socket file is never
/// deleted by the other. (Probe-then-unlink let the second delete the
/// first one's fresh, live socket.)
#[test]
fn a_stale_socket_file_is_never_cleared_over_a_live_one() {
    let _serial = serial();
    let dir = Scratch::new("s-stale");
    let path = dir.path().join("app.sock");
    let spec = ListenSpec::new("ADMIN", "unix", path.display().to_string());
    for round in 0..300 {
        let _ = std::fs::remove_file(&path);
        // A stale file: bound, then closed without removing it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind the stale one"));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let run = |_: u32| {
            let (barrier, spec) = (Arc::clone(&barrier), spec.clone());
            std::thread::spawn(move || {
                let upg = tableflip::testing::upgrader(Options::default()).expect("stub");
                barrier.wait();
                upg.listen_with::<std::os::unix::net::UnixListener>(&spec)
                    .ok()
                    .map(|l| (upg, l))
            })
        };
        let (a, b) = (run(0), run(1));
        let won: Vec<_> = [a, b]
            .into_iter()
            .filter_map(|t| t.join().expect("join"))
            .collect();
        assert!(
            won.len() <= 1,
            "round {round}: both instances think they own {}: {:?}",
            path.display(),
            won.iter()
                .map(|(_, l)| (
                    l.local_addr().ok(),
                    nix::sys::stat::fstat(l).map(|s| s.st_ino).ok()
                ))
                .collect::<Vec<_>>()
        );
        if let Some((_upg, l)) = won.first() {
            let client = std::os::unix::net::UnixStream::connect(&path)
                .unwrap_or_else(|e| panic!("round {round}: the winner's socket file is gone: {e}"));
            l.set_nonblocking(false).expect("blocking");
            let (_accepted, _) = l.accept().expect("the winner's socket answers");
            drop(client);
        }
    }
}

/// A socket-setup hook may call back into the registry (to read the names
/// registered so far, say): it runs without the registry's lock held.
/// (It used to deadlock.)
#[test]
fn a_socket_setup_hook_may_call_into_the_registry() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let upg = tableflip::testing::upgrader(Options::default()).expect("stub");
        let inner = upg.clone();
        let spec = ListenSpec::new("HTTP", "tcp", "127.0.0.1:0").setup(move |_, _| {
            let _ = inner.fds().names();
            Ok(())
        });
        let result = upg
            .listen_with::<std::net::TcpListener>(&spec)
            .map(|l| l.local_addr().is_ok());
        let _ = tx.send(result.map_err(|e| e.to_string()));
    });
    let result = rx
        .recv_timeout(DEADLINE)
        .expect("listen_with returns (no deadlock)");
    assert_eq!(result, Ok(true));
}

/// A new generation that fails after it closed its unclaimed sockets (its
/// PID file cannot be written): the socket files of the old generation,
/// which still serves on them, are untouched. (They used to be deleted
/// before the PID file was written.)
#[test]
fn a_failed_upgrade_leaves_the_old_generations_socket_files() {
    let h = Harness::new("s-files");
    let ctl = &h.ctl;
    let run = ctl.path().join("run");
    std::fs::create_dir(&run).expect("mkdir run");
    let sock = ctl.path().join("admin.sock");
    ctl.write(
        "listen",
        &format!("web tcp 127.0.0.1:0\nadmin unix {}\n", sock.display()),
    );
    let pid_file = run.join("svc.pid");
    let mut svc = Service::start(
        SVC,
        ctl,
        &[("TF_PID_FILE", pid_file.to_str().expect("utf-8"))],
    );
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    // The next release no longer listens on the Unix socket, and its PID
    // file cannot be written (its directory is now a regular file).
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    std::fs::rename(&run, ctl.path().join("run-moved")).expect("move run");
    std::fs::write(&run, "not a directory").expect("write");
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "ChildExited", "{}", err.line);
    assert!(
        sock.exists(),
        "the old generation's socket file is still there"
    );
    assert_eq!(
        reply_pid(&unix_get(sock.to_str().expect("utf-8")).expect("served")),
        first
    );
    std::fs::remove_file(&run).expect("rm");
    std::fs::rename(ctl.path().join("run-moved"), &run).expect("move back");
    svc.stop(first);
}

/// The application replaces the file inside its `Handover` guard
/// (`std::mem::replace` through `DerefMut`), closes the original, and opens
/// a secret that lands on the original's fd number: the next generation
/// gets the file that was registered, not the secret. (It used to get
/// whatever held the registered number.)
#[test]
fn what_is_handed_on_is_what_was_registered() {
    let h = Harness::new("s-swap");
    let ctl = &h.ctl;
    let log = ctl.path().join("app.log");
    let secret = ctl.path().join("secret");
    std::fs::write(&secret, "s3cret").expect("write the secret");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write(
        "actions",
        &format!(
            "add-file log {}\nswap-file log {}\n",
            log.display(),
            secret.display()
        ),
    );
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("swapped-file", Some(first));
    svc.wait_kind("ready", Some(first));
    ctl.write("actions", "take-file log\n");
    let second = svc.upgrade(first);
    let took = svc.wait_kind("took-file", Some(second));
    assert_eq!(took.get("path"), log.display().to_string(), "{}", took.line);
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    svc.stop(second);
}

/// An upgrade whose future is dropped (a caller's timeout) kills the new
/// process; one with much memory to free takes a while to die, and is
/// still reaped, by a thread of its own, never left a zombie. (The old
/// code waited 200 ms on the runtime thread, then gave up.)
#[test]
fn a_cancelled_upgrade_leaves_no_zombie() {
    let h = Harness::new("s-zombie");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    // The next generation takes 4 GiB, then blocks before it is ready.
    ctl.write("actions", "ballast 4096\n");
    ctl.write("init", "block");
    ctl.write("usr2", "upgrade-until cancel\n");
    signal(first, Signal::SIGUSR2);
    let child = svc
        .wait_for("the child's ballast", |e| {
            e.kind == "ballast" && e.pid != first
        })
        .pid;
    svc.wait_kind("blocked", Some(child));
    ctl.write("cancel", "");
    svc.wait_kind("upgrade-cancelled", Some(first));
    wait_until("the cancelled child is reaped", || {
        proc_state(child).is_none()
    });
    ctl.remove("init");
    ctl.remove("actions");
    ctl.write("usr2", "");
    let second = svc.upgrade(first);
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    svc.stop(second);
}

/// A std listener in blocking mode, served by a thread's blocking accept
/// loop: a failed upgrade (whose child made the shared socket
/// non-blocking) puts it back in blocking mode, so the loop never sees
/// `EAGAIN` afterwards.
#[test]
fn a_failed_upgrade_restores_a_blocking_listener() {
    let h = Harness::new("s-blocking");
    let ctl = &h.ctl;
    ctl.write("listen", "web stdtcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    // The next generation fails before it touches the socket itself: the
    // library made it non-blocking when the handover was received.
    ctl.write("listen", "");
    ctl.write("init", "exit 1");
    svc.upgrade_err(first);
    for _ in 0..3 {
        assert_eq!(serves(&addr), first);
        svc.wait_kind("accepted", Some(first));
    }
    svc.poll_events();
    assert!(
        !svc.history.iter().any(|e| e.kind == "accept-err"),
        "the accept loop failed: {:#?}",
        svc.lines()
    );
    signal(first, Signal::SIGKILL);
    assert!(!svc.wait_first().success());
}

/// An application that restores `SIGPIPE`'s default (fatal) action, whose
/// parent dies during its initialisation: telling the parent it is ready
/// meets a closed pipe, which must not kill it. (The library's write used
/// to raise `SIGPIPE`.)
#[test]
fn the_librarys_pipe_writes_never_raise_sigpipe() {
    let h = Harness::new("s-sigpipe");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    ctl.write("actions", "default-sigpipe\n");
    ctl.write("init", "block");
    signal(first, Signal::SIGHUP);
    let child = svc
        .wait_for("the child's SIGPIPE change", |e| {
            e.kind == "default-sigpipe" && e.pid != first
        })
        .pid;
    svc.wait_kind("blocked", Some(child));
    signal(first, Signal::SIGKILL);
    assert!(!svc.wait_first().success());
    ctl.write("unblock", "");
    let ready = svc.wait_kind("ready", Some(child));
    assert_eq!(ready.pid, child);
    let addr = svc
        .history
        .iter()
        .find(|e| e.kind == "listening" && e.pid == child)
        .map(|e| e.get("addr").to_owned())
        .expect("listening");
    assert_eq!(serves(&addr), child, "alive and serving");
    svc.stop(child);
}

/// A new generation that times out is killed with everything it started
/// during its initialisation (its process group). (What it started used to
/// survive it.)
#[test]
fn a_timed_out_upgrade_kills_what_the_child_started() {
    let h = Harness::new("s-group");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, ctl, &[("TF_UPGRADE_TIMEOUT_MS", "2000")]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    ctl.write("actions", "spawn-grandchild\n");
    ctl.write("init", "hang");
    signal(first, Signal::SIGHUP);
    let grandchild: u32 = svc
        .wait_for("the grandchild", |e| e.kind == "grandchild")
        .num("pid");
    let err = svc.wait_upgrade_err(first);
    assert_eq!(err.get("kind"), "Timeout", "{}", err.line);
    wait_until("what the child started is gone", || !is_alive(grandchild));
    wait_gone(grandchild);
    svc.stop(first);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

/// `svc` run as uid/gid `id` (root tests): through `setpriv`.
fn as_user(ctl: &Scratch, id: u32, envs: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = Service::command("setpriv", ctl, envs);
    cmd.args([
        &format!("--reuid={id}"),
        &format!("--regid={id}"),
        "--clear-groups",
        "--",
        SVC,
    ]);
    cmd
}

fn chown(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// A PID file in a shared sticky directory (`/tmp`), for a service that
/// does not run as root: another user who creates the path first makes
/// the start fail at once, with an error that names the path, the owner
/// and the remedy; and another user who plants files under the names the
/// temporary file could take (`.<name>.<pid>.tmp`, predictable from the
/// next PIDs) cannot make an upgrade fail: the name is random.
#[test]
#[ignore = "needs root: runs the service as another user (setpriv) against files of a third one (chown)"]
fn a_pid_file_in_a_sticky_directory_cannot_be_blocked_by_another_user() {
    let h = Harness::new("s-sticky");
    let ctl = &h.ctl;
    std::fs::set_permissions(ctl.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let shared = ctl.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let pid_file = shared.join("svc.pid");
    let env = [("TF_PID_FILE", pid_file.to_str().expect("utf-8"))];

    // Planted first, by uid 65533: a clear error at startup.
    std::fs::write(&pid_file, "1\n").expect("plant");
    chown(&pid_file, 65533);
    let mut svc = Service::spawn(as_user(ctl, 65534, &env));
    let err = svc.wait_for("the start error", |e| {
        e.kind == "error" || e.kind == "ready" || e.kind == "ready-err"
    });
    assert_eq!(
        (err.kind.as_str(), err.get("kind")),
        ("error", "PidFile"),
        "{}",
        err.line
    );
    for part in [
        pid_file.to_str().expect("utf-8"),
        "uid 65533",
        "sticky",
        "RuntimeDirectory=",
    ] {
        assert!(
            err.get("msg").contains(part),
            "{part:?} missing: {}",
            err.line
        );
    }
    assert_eq!(svc.wait_first().code(), Some(2));
    std::fs::remove_file(&pid_file).expect("rm");

    // Planted temporary names for the next PIDs: the upgrade still works.
    let mut svc = Service::spawn(as_user(ctl, 65534, &env));
    let first = svc.wait_kind("ready", None).pid;
    let addr = svc
        .history
        .iter()
        .find(|e| e.kind == "listening")
        .map(|e| e.get("addr").to_owned())
        .expect("listening");
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .expect("ns_last_pid")
        .trim()
        .parse()
        .expect("a pid");
    for pid in last + 1..last + 400 {
        let planted = shared.join(format!(".svc.pid.{pid}.tmp"));
        std::fs::write(&planted, "").expect("plant");
        chown(&planted, 65533);
    }
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, &addr);
    assert_eq!(pid_file_pid(&pid_file), Some(second));
    svc.stop(second);
}

/// A service that drops privileges after it started (root binds the
/// port, then the service runs as a user): its PID file's directory is
/// root's, so no next generation could ever write it. The upgrade is
/// refused before anything is started, naming the directory and the
/// reason. (The new generation used to be started, and fail.)
#[test]
#[ignore = "needs root: the service drops its privileges (setresuid)"]
fn privileges_dropped_after_the_start_are_named_at_the_upgrade() {
    let h = Harness::new("s-setuid");
    let ctl = &h.ctl;
    std::fs::set_permissions(ctl.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run = ctl.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let pid_file = run.join("svc.pid");
    let mut svc = Service::start(
        SVC,
        ctl,
        &[("TF_PID_FILE", pid_file.to_str().expect("utf-8"))],
    );
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    ctl.write("usr2", "setuid 65534\n");
    signal(first, Signal::SIGUSR2);
    let ev = svc.wait_kind("setuid", Some(first));
    assert_eq!(ev.get("ok"), "true", "{}", ev.line);
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "PidFile", "{}", err.line);
    for part in [run.to_str().expect("utf-8"), "not writable", "uid 65534"] {
        assert!(
            err.get("msg").contains(part),
            "{part:?} missing: {}",
            err.line
        );
    }
    assert!(
        err.get("child").is_empty(),
        "no process was started: {}",
        err.line
    );
    signal(first, Signal::SIGKILL);
    let _ = svc.wait_first();
}
