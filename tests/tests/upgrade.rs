//! Upgrades of the `svc` test service: real processes, sockets, signals.

use nix::sys::signal::Signal;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

#[test]
fn upgrade_hands_the_same_socket_to_a_new_pid() {
    let _serial = serial();
    let ctl = Scratch::new("basic");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, &ctl, &[]);
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

    signal(second, Signal::SIGTERM);
    svc.wait_kind("exit", Some(second));
    svc.wait_all_exited();
}

#[test]
fn second_and_third_generations_are_reaped() {
    let _serial = serial();
    let ctl = Scratch::new("reap");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut svc = Service::start(SVC, &ctl, &[]);
    let first = svc.first_pid();
    svc.wait_kind("ready", Some(first));
    signal(first, Signal::SIGHUP);
    let second: u32 = svc
        .wait_kind("upgrade-ok", Some(first))
        .get("child")
        .parse()
        .expect("pid");
    svc.wait_kind("ready", Some(second));
    assert!(svc.wait_first().success());
    signal(second, Signal::SIGHUP);
    let third: u32 = svc
        .wait_kind("upgrade-ok", Some(second))
        .get("child")
        .parse()
        .expect("pid");
    svc.wait_kind("exit", Some(second));
    wait_gone(second);
    signal(third, Signal::SIGTERM);
    svc.wait_all_exited();
    wait_gone(third);
}
