//! Socket inheritance across upgrades of the `svc` test service: every
//! network kind, port 0, unclaimed sockets, changed addresses.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;

use nix::sys::signal::Signal;

use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// The `listening` events of `pid`, by socket name, once `pid` is ready.
fn listening(svc: &mut Service, pid: u32) -> HashMap<String, Event> {
    svc.wait_kind("ready", Some(pid));
    svc.history
        .iter()
        .filter(|e| e.pid == pid && e.kind == "listening")
        .map(|e| (e.get("name").to_owned(), e.clone()))
        .collect()
}

/// Upgrades `pid`; returns the new generation once its parent has exited
/// (so only it holds the sockets). Needs the `wait-parent` action.
fn upgrade_and_settle(svc: &mut Service, pid: u32) -> u32 {
    let next = svc.upgrade(pid);
    svc.wait_kind("parent-exited", Some(next));
    next
}

/// Stops the service, checks that nothing of it is left.
fn stop(svc: &mut Service, pid: u32) {
    svc.stop(pid);
    assert_eq!(stray_children(), Vec::<u32>::new(), "processes left behind");
}

fn abstract_name(ctl: &Scratch, tag: &str) -> String {
    let dir = ctl.path().file_name().expect("name").to_string_lossy();
    format!("{dir}-{tag}")
}

#[test]
fn every_socket_kind_is_inherited_in_one_upgrade() {
    let h = Harness::new("allkinds");
    let ctl = &h.ctl;
    let p = |n: &str| ctl.path().join(n).display().to_string();
    let (unix, gram, packet) = (p("s.sock"), p("g.sock"), p("p.sock"));
    let abs = abstract_name(ctl, "abs");
    let mut listen = format!(
        "tcp tcp 127.0.0.1:0\n\
         udp udp 127.0.0.1:0\n\
         unix unix {unix}\n\
         gram unixgram {gram}\n\
         abs unix @{abs}\n\
         packet unixpacket {packet}\n"
    );
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if ipv6 {
        listen.push_str("tcp6 tcp6 [::1]:0\n");
    } else {
        eprintln!("no IPv6 loopback here: tcp6 not covered");
    }
    ctl.write("listen", &listen);
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let gen1 = listening(&mut svc, first);
    let tcp = gen1["tcp"].get("addr").to_owned();
    let udp = gen1["udp"].get("addr").to_owned();

    let ask = |svc: &Service, pid: u32| {
        let mut answers = vec![
            ("tcp", tcp_get(&tcp)),
            ("udp", udp_get(&udp)),
            ("unix", unix_get(&unix)),
            ("unixgram", unixgram_get(&gram, ctl)),
            ("abstract", abstract_get(&abs)),
        ];
        if ipv6 {
            let tcp6 = svc
                .history
                .iter()
                .find(|e| e.pid == pid && e.get("name") == "tcp6")
                .expect("tcp6 listening")
                .get("addr")
                .to_owned();
            answers.push(("tcp6", tcp_get(&tcp6)));
        }
        for (what, answer) in answers {
            let answer = answer.unwrap_or_else(|e| panic!("{what} does not answer: {e}"));
            assert_eq!(
                reply_pid(&answer),
                pid,
                "{what} answered by another process"
            );
        }
        seqpacket_connect(&packet).expect("unixpacket listens");
    };
    ask(&svc, first);

    let second = upgrade_and_settle(&mut svc, first);
    let gen2 = listening(&mut svc, second);
    assert_eq!(gen2.len(), gen1.len(), "{gen2:#?}");
    for (name, ev) in &gen2 {
        let old = &gen1[name];
        assert_eq!(ev.get("addr"), old.get("addr"), "{name}");
        assert_eq!(
            ev.get("ino"),
            old.get("ino"),
            "{name}: the new generation holds the same kernel socket"
        );
    }
    assert!(svc.wait_first().success());
    ask(&svc, second);
    stop(&mut svc, second);
    for path in [&unix, &gram, &packet] {
        assert!(
            !std::path::Path::new(path).exists(),
            "{path} outlived the service"
        );
    }
}

#[test]
fn port_0_keeps_its_port_across_upgrades() {
    let h = Harness::new("port0");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\ndns udp 127.0.0.1:0\n");
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let gen1 = listening(&mut svc, first);
    let (web, dns) = (gen1["web"].get("addr"), gen1["dns"].get("addr"));
    assert!(!web.ends_with(":0") && !dns.ends_with(":0"), "{gen1:#?}");

    let mut cur = first;
    for _ in 0..3 {
        cur = upgrade_and_settle(&mut svc, cur);
        let now = listening(&mut svc, cur);
        for name in ["web", "dns"] {
            assert_eq!(now[name].get("addr"), gen1[name].get("addr"), "{name}");
            assert_eq!(now[name].get("ino"), gen1[name].get("ino"), "{name}");
        }
        assert_eq!(reply_pid(&tcp_get(web).expect("tcp")), cur);
        assert_eq!(reply_pid(&udp_get(dns).expect("udp")), cur);
    }
    stop(&mut svc, cur);
}

#[test]
fn unclaimed_sockets_are_closed_and_their_files_removed() {
    let h = Harness::new("unclaimed");
    let ctl = &h.ctl;
    let sock = ctl.path().join("s.sock");
    let gram = ctl.path().join("g.sock");
    ctl.write(
        "listen",
        &format!(
            "web tcp 127.0.0.1:0\nold tcp 127.0.0.1:0\nsock unix {}\ngram unixgram {}\n",
            sock.display(),
            gram.display()
        ),
    );
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let gen1 = listening(&mut svc, first);
    let (web, old) = (gen1["web"].get("addr"), gen1["old"].get("addr"));
    assert_eq!(reply_pid(&tcp_get(old).expect("old serves")), first);

    // The next generation wants only `web`.
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let second = svc.upgrade(first);
    // Unclaimed sockets are closed at readiness; their files are removed
    // right after the parent is told (not before: a handover that failed
    // there would leave the parent, still serving on them, without them).
    wait_until("the unclaimed socket files are removed", || {
        !sock.exists() && !gram.exists()
    });
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert!(
        tcp_refused(old),
        "the unclaimed TCP socket is closed once the old generation is gone"
    );
    assert_eq!(reply_pid(&tcp_get(web).expect("web serves")), second);
    let gen2 = listening(&mut svc, second);
    assert_eq!(gen2.keys().collect::<Vec<_>>(), ["web"]);
    stop(&mut svc, second);
}

#[test]
fn changed_address_is_bound_afresh_and_the_old_one_closed() {
    let h = Harness::new("moved");
    let ctl = &h.ctl;
    let (a, b) = (ctl.path().join("a.sock"), ctl.path().join("b.sock"));
    ctl.write(
        "listen",
        &format!("web tcp 127.0.0.1:0\nsock unix {}\n", a.display()),
    );
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let gen1 = listening(&mut svc, first);
    let old = gen1["web"].get("addr").to_owned();

    // Same names, other addresses.
    ctl.write(
        "listen",
        &format!("web tcp 127.0.0.2:0\nsock unix {}\n", b.display()),
    );
    let second = svc.upgrade(first);
    let gen2 = listening(&mut svc, second);
    let new = gen2["web"].get("addr").to_owned();
    assert!(new.starts_with("127.0.0.2:"), "{new}");
    for name in ["web", "sock"] {
        assert_ne!(
            gen2[name].get("ino"),
            gen1[name].get("ino"),
            "{name}: a fresh socket"
        );
    }
    assert!(!a.exists(), "the replaced unix socket file was removed");
    assert!(b.exists());
    svc.wait_kind("exit", Some(first));
    assert!(svc.wait_first().success());
    assert!(tcp_refused(&old), "the old address is closed");
    assert_eq!(reply_pid(&tcp_get(&new).expect("new address")), second);
    assert_eq!(
        reply_pid(&unix_get(&b.display().to_string()).expect("new path")),
        second
    );
    stop(&mut svc, second);
}

// Unix socket files left at the path a fresh socket is bound to (issue 6).
// A file from a crashed run (a socket nobody listens on) is replaced; a
// socket somebody listens on, and anything that is not a socket, are never
// removed: startup fails with an error naming the path. (The mode of a
// fresh socket file is tested with the macros, in `macros.rs`.)

/// The inode of the file at `path` (not following a symlink).
fn file_ino(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .ino()
}

/// Starts `svc` (first generation), which must fail to open its sockets
/// (`case` says why): returns its `error` event, once it has exited with
/// status 2 and left no process behind.
fn start_refused(ctl: &Scratch, case: &str) -> Event {
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let err = svc.wait_for("the startup error (or readiness)", |e| {
        e.pid == first && (e.kind == "error" || e.kind == "ready")
    });
    assert_eq!(
        err.kind,
        "error",
        "{case}: the service started: {:#?}",
        svc.lines()
    );
    assert_eq!(err.get("kind"), "Listen", "{case}: {}", err.line);
    assert_eq!(svc.wait_first().code(), Some(2), "{case}: {}", err.line);
    svc.wait_all_exited();
    assert_eq!(
        stray_children(),
        Vec::<u32>::new(),
        "{case}: processes left behind"
    );
    err
}

/// Accepts on `listener` until the connection that sent `hello` (the
/// service's probe may have connected and closed before it).
fn accept_hello(listener: &std::os::unix::net::UnixListener, hello: &[u8]) {
    for _ in 0..16 {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut got).expect("read");
        if got == hello {
            return;
        }
    }
    panic!("the test's own listener never got its client's connection");
}

#[test]
fn stale_socket_files_of_a_crashed_run_are_replaced() {
    let h = Harness::new("stale");
    let ctl = &h.ctl;
    let unix = ctl.path().join("s.sock");
    let gram = ctl.path().join("g.sock");
    let packet = ctl.path().join("p.sock");
    ctl.write(
        "listen",
        &format!(
            "sock unix {}\ngram unixgram {}\npacket unixpacket {}\n",
            unix.display(),
            gram.display(),
            packet.display()
        ),
    );
    // A run killed while listening: it leaves its socket files behind.
    let mut crashed = Service::start(SVC, ctl, &[]);
    let pid = crashed.first_pid();
    crashed.wait_kind("ready", Some(pid));
    signal(pid, Signal::SIGKILL);
    assert!(!crashed.wait_first().success());
    drop(crashed);
    let paths = [&unix, &gram, &packet];
    for path in paths {
        let meta = std::fs::symlink_metadata(path).expect("the crashed run left its socket file");
        assert!(meta.file_type().is_socket(), "{}", path.display());
        // A second name keeps the stale file's inode in use, so that a
        // fresh file cannot get the same inode number.
        std::fs::hard_link(path, path.with_extension("old")).expect("link");
    }
    // Stale indeed: nobody listens there any more.
    let refused = |r: std::io::Result<()>| {
        r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(
        std::os::unix::net::UnixStream::connect(&unix).map(drop)
    ));
    assert!(refused(
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(&gram))
    ));
    assert!(refused(seqpacket_connect(&packet.display().to_string())));

    // The next run replaces them and serves on them.
    let mut svc = Service::start(SVC, ctl, &[]);
    let first = svc.first_pid();
    let socks = listening(&mut svc, first);
    assert_eq!(socks.len(), 3, "{socks:#?}");
    for path in paths {
        assert_ne!(
            file_ino(path),
            file_ino(&path.with_extension("old")),
            "{}: a fresh socket file",
            path.display()
        );
    }
    assert_eq!(
        reply_pid(&unix_get(&unix.display().to_string()).expect("unix serves")),
        first
    );
    assert_eq!(
        reply_pid(&unixgram_get(&gram.display().to_string(), ctl).expect("unixgram serves")),
        first
    );
    seqpacket_connect(&packet.display().to_string()).expect("unixpacket listens");
    stop(&mut svc, first);
    for path in paths {
        assert!(!path.exists(), "{} outlived the service", path.display());
    }
}

#[test]
fn a_live_socket_at_the_path_is_left_alone_and_startup_fails() {
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
    let h = Harness::new("live");
    let ctl = &h.ctl;
    // (what the test binds at the path, the network the service wants)
    for (mine, wanted) in [
        ("stream", "unix"),
        ("dgram", "unixgram"),
        ("seqpacket", "unixpacket"),
        // Another type of socket listening there is just as alive.
        ("stream", "unixgram"),
        ("dgram", "unix"),
        ("stream", "unixpacket"),
    ] {
        let case = format!("{mine} socket, service wants {wanted}");
        let path = ctl.path().join(format!("{mine}-{wanted}.sock"));
        let shown = path.display().to_string();
        enum Mine {
            Stream(UnixListener),
            Dgram(UnixDatagram),
            Packet(tableflip::socket2::Socket),
        }
        let held = match mine {
            "stream" => Mine::Stream(UnixListener::bind(&path).expect("bind")),
            "dgram" => Mine::Dgram(UnixDatagram::bind(&path).expect("bind")),
            _ => {
                use tableflip::socket2::{Domain, SockAddr, Socket, Type};
                let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None).expect("socket");
                s.bind(&SockAddr::unix(&path).expect("addr")).expect("bind");
                s.listen(16).expect("listen");
                Mine::Packet(s)
            }
        };
        let ino = file_ino(&path);
        ctl.write("listen", &format!("taken {wanted} {shown}\n"));

        let err = start_refused(ctl, &case);
        let msg = err.get("msg");
        assert!(
            msg.contains(&shown),
            "{case}: the error names the path: {msg}"
        );
        assert!(
            msg.contains("in use"),
            "{case}: the error says the address is in use: {msg}"
        );
        assert_eq!(file_ino(&path), ino, "{case}: the socket file is untouched");
        // The test's own socket still works at that path.
        match &held {
            Mine::Stream(l) => {
                let mut c = UnixStream::connect(&path).expect("connect");
                std::io::Write::write_all(&mut c, b"hello").expect("write");
                drop(c);
                accept_hello(l, b"hello");
            }
            Mine::Dgram(s) => {
                UnixDatagram::unbound()
                    .and_then(|c| c.send_to(b"hello", &path))
                    .expect("send");
                s.set_read_timeout(Some(DEADLINE)).expect("timeout");
                let mut buf = [0u8; 16];
                let n = s.recv(&mut buf).expect("the test's socket receives");
                assert_eq!(&buf[..n], b"hello", "{case}");
            }
            Mine::Packet(l) => {
                seqpacket_connect(&shown).expect("still listening");
                drop(l.accept().expect("the test's listener accepts"));
            }
        }
        drop(held);
    }
}

#[test]
fn a_path_that_is_not_a_socket_is_never_removed() {
    let h = Harness::new("notsock");
    let ctl = &h.ctl;
    for wanted in ["unix", "unixgram"] {
        for what in ["regular file", "directory", "symlink"] {
            let case = format!("a {what}, service wants {wanted}");
            let path = ctl
                .path()
                .join(format!("{}-{wanted}", what.replace(' ', "-")));
            let shown = path.display().to_string();
            let content = format!("precious data: {case}\n");
            // What the path holds, and where its content is.
            let file = match what {
                "regular file" => path.clone(),
                "directory" => {
                    std::fs::create_dir(&path).expect("mkdir");
                    path.join("inside")
                }
                _ => {
                    let target = ctl.path().join(format!("target-{wanted}"));
                    std::os::unix::fs::symlink(&target, &path).expect("symlink");
                    target
                }
            };
            std::fs::write(&file, &content).expect("write");
            let ino = file_ino(&path);
            ctl.write("listen", &format!("file {wanted} {shown}\n"));

            let err = start_refused(ctl, &case);
            let msg = err.get("msg");
            assert!(
                msg.contains(&format!("{shown} exists and is not a socket")),
                "{case}: the error names the path and says it is not a socket: {msg}"
            );
            assert_eq!(file_ino(&path), ino, "{case}: {shown} is untouched");
            assert_eq!(
                std::fs::read_to_string(&file).expect("the content is still there"),
                content,
                "{case}"
            );
        }
    }
}

/// A live listener whose accept queue is full (a wedged or stopped
/// process) is still a live socket: startup fails at once instead of
/// waiting for the queue to drain, which may be never.
#[test]
fn a_live_socket_with_a_full_backlog_does_not_block_startup() {
    use tableflip::socket2::{Domain, SockAddr, Socket, Type};
    let h = Harness::new("fullq");
    let ctl = &h.ctl;
    let path = ctl.path().join("full.sock");
    let shown = path.display().to_string();
    let addr = SockAddr::unix(&path).expect("addr");
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).expect("socket");
    listener.bind(&addr).expect("bind");
    listener.listen(0).expect("listen");
    // Fill the accept queue: connect without accepting until a connect
    // would block.
    let mut queued = Vec::new();
    loop {
        let c = Socket::new(Domain::UNIX, Type::STREAM, None).expect("socket");
        c.set_nonblocking(true).expect("nonblocking");
        match c.connect(&addr) {
            Ok(()) => queued.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("cannot fill the accept queue: {e}"),
        }
        assert!(queued.len() < 10_000, "the accept queue never fills");
    }
    let ino = file_ino(&path);
    ctl.write("listen", &format!("full unix {shown}\n"));

    let err = start_refused(ctl, "a live socket with a full accept queue");
    let msg = err.get("msg");
    assert!(msg.contains(&shown) && msg.contains("in use"), "{msg}");
    assert_eq!(file_ino(&path), ino, "the socket file is untouched");
    // Still the test's listener: accepting makes room for a new client.
    drop(listener.accept().expect("accept a queued connection"));
    let c = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    drop((c, queued));
}
