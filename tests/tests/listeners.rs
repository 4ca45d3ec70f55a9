//! How listeners are addressed: the same address twice, port 0, a new
//! release on a wider address, hundreds of listeners under the usual fd
//! limit, relative Unix socket paths, socket files that another process
//! replaced, host names.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// Starts `svc` with `listen` as its listener list; returns it once the
/// first generation is ready, with its `listening` events in order.
fn start(ctl: &Scratch, listen: &str, cmd: Option<Command>) -> (Service, Vec<Event>) {
    ctl.write("listen", listen);
    let mut svc = Service::spawn(cmd.unwrap_or_else(|| Service::command(SVC, ctl, &[])));
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    let listening = listening_of(&svc, first);
    (svc, listening)
}

fn listening_of(svc: &Service, pid: u32) -> Vec<Event> {
    svc.history
        .iter()
        .filter(|e| e.pid == pid && e.kind == "listening")
        .cloned()
        .collect()
}

/// `listen("tcp", "127.0.0.1:P")` twice in one generation: the second is a
/// clear error naming the address (it used to return the same socket
/// again); under two names, the same (it used to be a bare "Address
/// already in use").
#[test]
fn the_same_address_twice_is_refused() {
    let _serial = serial();
    adopt_orphans();
    for (tag, listen) in [
        ("same-api", "- tcp 127.0.0.1:{P}\n- tcp 127.0.0.1:{P}\n"),
        ("same-names", "a tcp 127.0.0.1:{P}\nb tcp 127.0.0.1:{P}\n"),
    ] {
        let ctl = Scratch::new(tag);
        let port = free_port();
        ctl.write("listen", &listen.replace("{P}", &port.to_string()));
        let mut svc = Service::start(SVC, &ctl, &[]);
        let first = svc.first_pid();
        let err = svc.wait_for("the start error", |e| {
            e.pid == first && (e.kind == "error" || e.kind == "ready")
        });
        assert_eq!(err.kind, "error", "{tag}: {:?}", svc.lines());
        assert_eq!(err.get("kind"), "AlreadyListening", "{tag}: {}", err.line);
        assert!(
            err.get("msg").contains(&format!("127.0.0.1:{port}")),
            "{tag}: {}",
            err.line
        );
        assert_eq!(svc.wait_first().code(), Some(2), "{tag}");
    }
}

/// Port 0 asks for a free port each time: two `listen` calls give two
/// sockets on two ports, and the next generation inherits both, in order.
#[test]
fn each_port_zero_listen_is_its_own_socket() {
    let h = Harness::new("port0");
    let ctl = &h.ctl;
    let (mut svc, gen1) = start(ctl, "- tcp 127.0.0.1:0\n- tcp 127.0.0.1:0\n", None);
    let first = svc.first_pid();
    assert_eq!(gen1.len(), 2);
    assert_ne!(gen1[0].get("addr"), gen1[1].get("addr"), "two ports");
    assert_ne!(gen1[0].get("ino"), gen1[1].get("ino"), "two sockets");
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, gen1[0].get("addr"));
    let gen2 = listening_of(&svc, second);
    assert_eq!(gen2.len(), 2);
    for (a, b) in gen1.iter().zip(&gen2) {
        assert_eq!(a.get("addr"), b.get("addr"), "inherited in order");
        assert_eq!(a.get("ino"), b.get("ino"), "the same socket");
    }
    assert_eq!(serves(gen1[1].get("addr")), second);
    svc.stop(second);
}

/// A new release listens on a wider address on the same port
/// (`127.0.0.1:P` → `0.0.0.0:P`): the old socket holds the port until the
/// old generation exits, so the upgrade fails; the error names both
/// addresses and says what to do.
#[test]
fn a_wider_address_on_the_same_port_names_both() {
    let h = Harness::new("wider");
    let ctl = &h.ctl;
    let port = free_port();
    let (mut svc, _) = start(ctl, &format!("web tcp 127.0.0.1:{port}\n"), None);
    let first = svc.first_pid();
    ctl.write("listen", &format!("web tcp 0.0.0.0:{port}\n"));
    let err = svc.upgrade_err(first);
    let child: u32 = err.num("child");
    let why = svc.wait_for("the new generation's error", |e| {
        e.pid == child && e.kind == "error"
    });
    let msg = why.get("msg");
    for part in [
        format!("0.0.0.0:{port}"),
        format!("127.0.0.1:{port}"),
        "previous generation".to_owned(),
        "restart".to_owned(),
        "SO_REUSEPORT".to_owned(),
    ] {
        assert!(msg.contains(&part), "{part:?} missing from: {msg}");
    }
    assert_eq!(serves(&format!("127.0.0.1:{port}")), first, "still serving");
    svc.stop(first);
}

/// 600 listeners with the usual soft limit of 1024 open files: one fd per
/// listener while serving (not two), and the upgrade, which needs a copy
/// of each for a moment, works: the soft limit is raised to the hard one
/// at startup.
#[test]
fn six_hundred_listeners_under_a_soft_limit_of_1024() {
    let h = Harness::new("many");
    let ctl = &h.ctl;
    let listen = many_tcp_listeners(600);
    let mut cmd = Service::command("prlimit", ctl, &[("RUST_LOG", "info")]);
    cmd.args(["--nofile=1024:4096", "--", SVC]);
    let (mut svc, gen1) = start(ctl, &listen, Some(cmd));
    let first = svc.first_pid();
    assert_eq!(gen1.len(), 600);
    let ready = svc
        .history
        .iter()
        .find(|e| e.pid == first && e.kind == "ready")
        .expect("ready");
    let fds: usize = ready.num("fds");
    assert!(fds < 650, "one fd per listener: {fds} open");
    let limits = std::fs::read_to_string(format!("/proc/{first}/limits")).expect("limits");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    assert!(
        nofile.split_whitespace().nth(3) == Some("4096"),
        "soft limit raised to the hard one: {nofile}"
    );
    let second = svc.upgrade(first);
    finish_upgrade(&mut svc, first, second, gen1[599].get("addr"));
    let ready2 = svc.wait_kind("ready", Some(second));
    let fds2: usize = ready2.num("fds");
    assert!(fds2 < 650, "one fd per listener after the upgrade: {fds2}");
    assert_eq!(listening_of(&svc, second).len(), 600);
    assert_eq!(serves(gen1[0].get("addr")), second);
    svc.stop(second);
}

/// 3000 listeners across two upgrades: with version 2 of the handover they
/// go over a socket in 12 packets of at most 253 fds (the kernel's
/// `SCM_MAX_FD`), sent while the new process starts; every listener is
/// inherited, the very socket (its address). The second upgrade starts
/// from a generation that received its fds that way (and sized its fd
/// table for them while it had one thread). (What the socket cannot take
/// at once is sent by a thread: `upgrade::spawn`'s unit test.)
#[test]
fn three_thousand_listeners_go_over_the_handover_socket() {
    let h = Harness::new("3k");
    let ctl = &h.ctl;
    let listen = many_tcp_listeners(3000);
    let mut cmd = Service::command("prlimit", ctl, &[("RUST_LOG", "info")]);
    cmd.args(["--nofile=8192:8192", "--", SVC]);
    ctl.write("actions", "wait-parent\n");
    let (mut svc, gen1) = start(ctl, &listen, Some(cmd));
    let first = svc.first_pid();
    assert_eq!(gen1.len(), 3000);
    let mut addrs: Vec<String> = gen1.iter().map(|e| e.get("addr").to_owned()).collect();
    addrs.sort();
    let mut cur = first;
    for _ in 0..2 {
        let next = svc.upgrade(cur);
        svc.wait_kind("ready", Some(next));
        let mut inherited: Vec<String> = listening_of(&svc, next)
            .iter()
            .map(|e| e.get("addr").to_owned())
            .collect();
        inherited.sort();
        assert_eq!(
            inherited, addrs,
            "generation {next} inherits every listener"
        );
        assert_eq!(serves(&addrs[0]), next);
        assert_eq!(serves(&addrs[2999]), next);
        svc.wait_kind("parent-exited", Some(next));
        cur = next;
    }
    svc.stop(cur);
}

fn unix_serves(path: &Path) -> u32 {
    reply_pid(&unix_get(&path.display().to_string()).expect("unix request"))
}

/// A relative Unix socket path with an application that changes directory
/// during its initialisation: the socket is bound once, against the start
/// directory; the next generation inherits it; the stop removes that file
/// and leaves another program's live socket of the same name, in the
/// directory the application moved to, alone.
#[test]
fn a_relative_unix_path_is_resolved_once_against_the_start_directory() {
    let h = Harness::new("relunix");
    let ctl = &h.ctl;
    let a = ctl.path().join("a");
    let b = ctl.path().join("b");
    std::fs::create_dir(&a).expect("mkdir a");
    std::fs::create_dir(&b).expect("mkdir b");
    // Another program's live socket, where the service will `chdir` to.
    let other = std::os::unix::net::UnixListener::bind(b.join("app.sock")).expect("bind b");
    ctl.write("actions", &format!("chdir {}\n", b.display()));
    let mut cmd = Service::command(SVC, ctl, &[]);
    cmd.current_dir(&a);
    let (mut svc, _) = start(ctl, "u unix ./app.sock\n", Some(cmd));
    let first = svc.first_pid();
    assert_eq!(unix_serves(&a.join("app.sock")), first);
    let second = svc.upgrade(first);
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert_eq!(unix_serves(&a.join("app.sock")), second, "inherited");
    svc.stop(second);
    assert!(!a.join("app.sock").exists(), "its own file is removed");
    assert!(b.join("app.sock").exists(), "the other program's is kept");
    std::os::unix::net::UnixStream::connect(b.join("app.sock"))
        .expect("the other program's socket still works");
    drop(other);
}

/// A socket file that another process put at the path since the service
/// bound it (the service's own was removed by hand) is left alone at the
/// stop: the library removes only the file it bound.
#[test]
fn a_socket_file_replaced_since_is_left_alone() {
    let h = Harness::new("replaced");
    let ctl = &h.ctl;
    let path = ctl.path().join("s.sock");
    let (mut svc, _) = start(ctl, &format!("u unix {}\n", path.display()), None);
    let first = svc.first_pid();
    assert_eq!(unix_serves(&path), first);
    std::fs::remove_file(&path).expect("remove the service's file");
    let other = std::os::unix::net::UnixListener::bind(&path).expect("bind another");
    signal(first, Signal::SIGTERM);
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert!(path.exists(), "another program's socket file is kept");
    std::os::unix::net::UnixStream::connect(&path).expect("and still works");
    drop(other);
}

/// `localhost:P` where `/etc/hosts` lists `::1` first (Debian's layout,
/// with RFC 6724 ordering): the service listens on 127.0.0.1, as Go's
/// `net.Listen` does, so IPv4 clients are not refused. Runs the service in
/// a private mount namespace with its own `/etc/hosts`.
#[test]
#[ignore = "needs root: a private mount namespace with its own /etc/hosts (unshare -m, mount --bind)"]
fn localhost_listens_on_ipv4_first() {
    let h = Harness::new("localhost");
    let ctl = &h.ctl;
    let hosts = ctl.path().join("hosts");
    std::fs::write(&hosts, "::1 localhost ip6-localhost\n127.0.0.1 localhost\n")
        .expect("write hosts");
    let port = free_port();
    ctl.write("listen", &format!("web tcp localhost:{port}\n"));
    let mut cmd = Service::command("unshare", ctl, &[]);
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/hosts && exec "$1""#,
        &hosts.display().to_string(),
        SVC,
    ]);
    let mut svc = Service::spawn(cmd);
    let ev = svc.wait_for("listening", |e| e.kind == "listening");
    let pid = ev.pid;
    assert_eq!(ev.get("addr"), format!("127.0.0.1:{port}"), "{}", ev.line);
    svc.wait_kind("ready", Some(pid));
    assert_eq!(serves(&format!("127.0.0.1:{port}")), pid);
    signal(pid, Signal::SIGTERM);
    svc.wait_kind("exit", Some(pid));
    svc.wait_all_exited();
}
