//! Metrics (the `metrics` feature): a real service with a recorder
//! installed (the `metrics` crate's debugging recorder, standing for the
//! exporter an application has) sees the upgrade's measurements under
//! their documented names, in both process models; the `tracing` events
//! carry the same names.

use std::path::Path;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const CTL: &str = env!("CARGO_BIN_EXE_tableflip-ctl-under-test");

fn ctl_code(args: &[&str]) -> Option<i32> {
    run_ctl(CTL, args).code
}

/// The metrics recorded by the generation that answers on `addr`.
fn metrics(addr: &str) -> serde_json::Value {
    let line = tcp_get_line(addr, "METRICS").unwrap_or_else(|e| panic!("METRICS: {e}"));
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn the_upgrades_are_measured(mode: &str) {
    let h = Harness::new(&format!("metrics-{mode}"));
    let mut s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[("MS_METRICS", "1")]);
    let (sup, first, sock, tcp) = (s.first_pid, s.first, s.socket.clone(), s.tcp.clone());

    // A successful upgrade, then a failed one.
    assert_eq!(ctl_code(&["upgrade", "--socket", &sock]), Some(0));
    let second = s
        .svc
        .wait_for("the second generation", |e| {
            e.kind == "init-done" && e.pid != first && e.pid != sup
        })
        .pid;
    s.svc.wait_kind("draining", Some(first));
    h.ctl.write("init", "exit 3");
    assert_eq!(ctl_code(&["upgrade", "--socket", &sock]), Some(1));

    let expected = [
        ("tableflip_upgrades_succeeded_total", 1.0),
        ("tableflip_upgrade_ready_seconds", 1.0),
        ("tableflip_upgrade_old_gone_seconds", 1.0),
        ("tableflip_upgrades_started_total", 1.0),
        ("tableflip_upgrades_failed_total{reason=exited}", 1.0),
        ("tableflip_generations_alive", 1.0),
    ];
    let deadline = std::time::Instant::now() + DEADLINE;
    let last = loop {
        let m = metrics(&tcp);
        let all = expected
            .iter()
            .all(|(name, want)| m[*name].as_f64() == Some(*want));
        if all && reply_pid_of(&tcp) == second {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second generation has not recorded every measurement: {m}"
        );
        wait_a_little();
    };
    assert_eq!(
        last["tableflip_rollbacks_total"],
        serde_json::Value::Null,
        "{last}"
    );

    // The same names in the log, as tracing events (target
    // tableflip::metrics): the first generation's drain among them.
    for name in [
        "tableflip_upgrades_started_total",
        "tableflip_upgrades_succeeded_total",
        "tableflip_upgrades_failed_total",
        "tableflip_drains_total",
        "tableflip_drain_seconds",
    ] {
        assert!(
            s.logged(&format!("metric=\"{name}\"")),
            "{name} is not in the log"
        );
    }
    s.stop(second);
    assert!(!Path::new(&sock).exists());
}

/// The PID of the generation that answers on `addr`.
fn reply_pid_of(addr: &str) -> u32 {
    tcp_get_line(addr, "PID").map_or(0, |l| reply_pid(&l))
}

#[test]
fn supervised_the_upgrades_are_measured() {
    the_upgrades_are_measured("supervised");
}

#[test]
fn replace_the_upgrades_are_measured() {
    the_upgrades_are_measured("replace");
}
