//! Lame-duck stops (`Options::stop_delay`), in both process models: after
//! the first `SIGTERM` the service keeps accepting for the delay, reports
//! itself as stopping, then drains; a second `SIGTERM` ends the delay at
//! once.

use std::path::Path;

use nix::sys::signal::Signal;
use tableflip_tests::notify::Notify;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");

struct Lame {
    svc: Service,
    notify: Notify,
    /// The process signalled: the supervisor, or the generation.
    main: u32,
    serving: u32,
    tcp: String,
    log: std::path::PathBuf,
}

fn start(h: &Harness, mode: &str, delay_ms: u64) -> Lame {
    let notify = Notify::at_path(&h.ctl);
    let pid_file = h.ctl.path().join("svc.pid");
    let mut cmd = macro_svc_cmd(MACRO_SVC, &h.ctl, mode);
    cmd.env("MS_PID_FILE", &pid_file)
        .env("MS_STOP_DELAY_MS", delay_ms.to_string())
        .env("NOTIFY_SOCKET", &notify.env);
    let log = log_to_file(&mut cmd, &h.ctl);
    let mut svc = Service::spawn_keeping_stderr(cmd);
    let serving = svc.wait_kind("init-done", None).pid;
    let tcp = svc
        .wait_for("TCP listening", |e| {
            e.kind == "listening" && e.pid == serving && e.get("name") == "TCP"
        })
        .get("addr")
        .to_owned();
    let main = if mode == "supervised" {
        svc.first_pid()
    } else {
        serving
    };
    wait_until("the service is ready", || {
        pid_file_pid(&pid_file) == Some(main)
    });
    Lame {
        svc,
        notify,
        main,
        serving,
        tcp,
        log,
    }
}

fn logged(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(what))
}

/// After `SIGTERM`, the service still accepts and answers (a stop without
/// the delay closes the listener at once), tells systemd it is stopping
/// (`STOPPING=1`, with a `STATUS=` naming the delay, from the main
/// process); a second `SIGTERM` ends the delay: it drains and exits 0
/// well before the 60 s delay would have ended.
fn second_signal_ends_the_delay(mode: &str) {
    let h = Harness::new(&format!("lame-{mode}"));
    let mut s = start(&h, mode, 60_000);
    let ready = s.notify.next("READY=1");
    assert!(ready.has("READY"), "{:?}", ready.raw);
    signal(s.main, Signal::SIGTERM);
    wait_until("the stop is delayed", || {
        logged(&s.log, "stopping after stop_delay")
    });
    let answered = tcp_get_line(&s.tcp, "GET").expect("still accepting during stop_delay");
    assert_eq!(reply_pid(&answered), s.serving);
    let lame = s.notify.next("STOPPING=1 for the lame duck");
    assert_eq!(lame.sender, s.main, "{:?}", lame.raw);
    assert_eq!(lame.get("STOPPING"), Some("1"), "{:?}", lame.raw);
    assert!(
        lame.get("STATUS").is_some_and(|t| t.contains("stop_delay")),
        "{:?}",
        lame.raw
    );
    signal(s.main, Signal::SIGTERM);
    s.svc.wait_kind("draining", Some(s.serving));
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    s.svc.wait_all_exited();
}

#[test]
fn supervised_a_second_sigterm_ends_the_stop_delay() {
    second_signal_ends_the_delay("supervised");
}

#[test]
fn replace_a_second_sigterm_ends_the_stop_delay() {
    second_signal_ends_the_delay("replace");
}

/// Without a second signal, the delay ends by itself and the service
/// drains and exits 0.
fn the_delay_ends_by_itself(mode: &str) {
    let h = Harness::new(&format!("lame-end-{mode}"));
    let mut s = start(&h, mode, 2_000);
    signal(s.main, Signal::SIGTERM);
    wait_until("the stop is delayed", || {
        logged(&s.log, "stopping after stop_delay")
    });
    s.svc.wait_kind("draining", Some(s.serving));
    assert!(
        logged(&s.log, "stop_delay over"),
        "the delay ended by itself"
    );
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    s.svc.wait_all_exited();
    assert!(tcp_refused(&s.tcp), "nothing listens after the stop");
}

#[test]
fn supervised_the_stop_delay_ends_by_itself() {
    the_delay_ends_by_itself("supervised");
}

#[test]
fn replace_the_stop_delay_ends_by_itself() {
    the_delay_ends_by_itself("replace");
}

/// Supervised mode with the signal to every process (systemd's
/// `KillMode=control-group`, Ctrl-C in a terminal): the generation delays
/// its own stop too, so it still answers during the delay.
#[test]
fn supervised_the_stop_delay_holds_when_every_process_gets_the_signal() {
    let h = Harness::new("lame-group");
    let mut s = start(&h, "supervised", 2_000);
    let group = nix::unistd::Pid::from_raw(i32::try_from(s.main).expect("pid"));
    nix::sys::signal::killpg(group, Signal::SIGTERM).expect("killpg");
    wait_until("the stop is delayed", || {
        logged(&s.log, "stopping after stop_delay")
    });
    let answered = tcp_get_line(&s.tcp, "GET").expect("still accepting during stop_delay");
    assert_eq!(reply_pid(&answered), s.serving);
    s.svc.wait_kind("draining", Some(s.serving));
    let status = s.svc.wait_first();
    assert_eq!(status.code(), Some(0), "{status:?}");
    s.svc.wait_all_exited();
}
