//! Socket inheritance across upgrades of the `svc` test service: every
//! network kind, port 0, unclaimed sockets, changed addresses.

use std::collections::HashMap;

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
    let _serial = serial();
    adopt_orphans();
    let ctl = Scratch::new("allkinds");
    let p = |n: &str| ctl.path().join(n).display().to_string();
    let (unix, gram, packet) = (p("s.sock"), p("g.sock"), p("p.sock"));
    let abs = abstract_name(&ctl, "abs");
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
    let mut svc = Service::start(SVC, &ctl, &[]);
    let first = svc.first_pid();
    let gen1 = listening(&mut svc, first);
    let tcp = gen1["tcp"].get("addr").to_owned();
    let udp = gen1["udp"].get("addr").to_owned();

    let ask = |svc: &Service, pid: u32| {
        let mut answers = vec![
            ("tcp", tcp_get(&tcp)),
            ("udp", udp_get(&udp)),
            ("unix", unix_get(&unix)),
            ("unixgram", unixgram_get(&gram, &ctl)),
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
    let _serial = serial();
    adopt_orphans();
    let ctl = Scratch::new("port0");
    ctl.write("listen", "web tcp 127.0.0.1:0\ndns udp 127.0.0.1:0\n");
    ctl.write("actions", "wait-parent\n");
    let mut svc = Service::start(SVC, &ctl, &[]);
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
    let _serial = serial();
    adopt_orphans();
    let ctl = Scratch::new("unclaimed");
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
    let mut svc = Service::start(SVC, &ctl, &[]);
    let first = svc.first_pid();
    let gen1 = listening(&mut svc, first);
    let (web, old) = (gen1["web"].get("addr"), gen1["old"].get("addr"));
    assert_eq!(reply_pid(&tcp_get(old).expect("old serves")), first);

    // The next generation wants only `web`.
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let second = svc.upgrade(first);
    // Unclaimed sockets are closed at readiness, before the parent is told.
    assert!(!sock.exists(), "the unclaimed unix socket file was removed");
    assert!(
        !gram.exists(),
        "the unclaimed unixgram socket file was removed"
    );
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
    let _serial = serial();
    adopt_orphans();
    let ctl = Scratch::new("moved");
    let (a, b) = (ctl.path().join("a.sock"), ctl.path().join("b.sock"));
    ctl.write(
        "listen",
        &format!("web tcp 127.0.0.1:0\nsock unix {}\n", a.display()),
    );
    let mut svc = Service::start(SVC, &ctl, &[]);
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
