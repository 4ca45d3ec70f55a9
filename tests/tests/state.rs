//! Application state across upgrades (`Context::hand_over_state`,
//! `Context::inherited_state`), in both process models, with real
//! processes: 1 byte, 1 MB and 100 MB (through a memfd), with extra fds,
//! reach the next generation intact; a source that fails fails the
//! upgrade and the serving generation keeps serving. (A corrupt state is
//! in `handover.rs`, where a test plays the parent.)

use std::path::Path;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const CTL: &str = env!("CARGO_BIN_EXE_tableflip-ctl-under-test");

/// Upgrades through the control socket; returns the new generation.
fn upgrade(s: &CtlService) -> u32 {
    let said = run_ctl(CTL, &["upgrade", "--socket", &s.socket, "--timeout", "2m"]);
    assert_eq!(said.code, Some(0), "{said:?}");
    said.pid("new_pid")
}

fn state_reaches_the_next_generation(mode: &str) {
    let h = Harness::new(&format!("state-{mode}"));
    h.ctl.write("app-state", "1 0");
    let mut s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let first = s.first;
    s.svc.wait_kind("state-none", Some(first));
    let mut serving = first;
    // What each generation hands on, set before the upgrade that starts
    // the next one: the serving generation read the file when it started.
    for (size, fds) in [(1 << 20, 2), (100 << 20, 1), (1, 0)] {
        h.ctl.write("app-state", &format!("{size} {fds}"));
        let next = upgrade(&s);
        let offered = s.svc.wait_kind("state-offered", Some(serving));
        let taken = s.svc.wait_kind("state-taken", Some(next));
        assert_eq!(taken.get("len"), offered.get("len"), "{}", taken.line);
        assert_eq!(taken.get("crc"), offered.get("crc"), "{}", taken.line);
        assert_eq!(taken.get("fds"), offered.get("fds"), "{}", taken.line);
        let extra: Vec<String> = (0..offered.num::<usize>("fds"))
            .map(|i| format!("fd {i} of {serving}"))
            .collect();
        assert_eq!(taken.get("extra"), extra.join("|"), "{}", taken.line);
        // The second state, handed over beside the first.
        let second = s.svc.wait_kind("second-state", Some(next));
        assert_eq!(second.get("text"), format!("second of {serving}"));
        serving = next;
    }
    // The sizes, in the order they were handed over.
    let sizes: Vec<String> = s
        .svc
        .history
        .iter()
        .filter(|e| e.kind == "state-taken")
        .map(|e| e.get("len").to_owned())
        .collect();
    assert_eq!(sizes, ["1", "1048576", "104857600"]);
    s.stop(serving);
}

#[test]
fn supervised_state_of_1_b_1_mb_and_100_mb_reaches_the_next_generation() {
    state_reaches_the_next_generation("supervised");
}

#[test]
fn replace_state_of_1_b_1_mb_and_100_mb_reaches_the_next_generation() {
    state_reaches_the_next_generation("replace");
}

/// After an upgrade that failed before any spawn: no generation but
/// `first` ever started, and `first` still answers.
fn assert_first_serves_alone(s: &CtlService, first: u32) {
    assert!(
        !s.svc
            .history
            .iter()
            .any(|e| e.kind == "start" && e.pid != first),
        "no generation was started: {:#?}",
        s.svc.lines()
    );
    assert_eq!(reply_pid(&tcp_get_line(&s.tcp, "GET").expect("GET")), first);
}

fn a_failing_source_fails_the_upgrade(mode: &str) {
    let h = Harness::new(&format!("state-fail-{mode}"));
    h.ctl.write("app-state", "fail");
    let s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let first = s.first;
    let said = run_ctl(CTL, &["upgrade", "--socket", &s.socket]);
    assert_eq!(said.code, Some(1), "{said:?}");
    assert_eq!(said.str("failure"), "other", "{said:?}");
    let error = said.str("error");
    assert!(
        error.contains("state") && error.contains("no state today"),
        "the answer names the state source's failure: {said:?}"
    );
    // Nothing was started, and the first generation serves on.
    assert_first_serves_alone(&s, first);
    s.stop(first);
}

#[test]
fn supervised_a_failing_state_source_fails_the_upgrade() {
    a_failing_source_fails_the_upgrade("supervised");
}

#[test]
fn replace_a_failing_state_source_fails_the_upgrade() {
    a_failing_source_fails_the_upgrade("replace");
}

/// A source that panics fails the upgrade like one that fails, and the
/// service upgrades again once it no longer panics (the panic neither
/// kills the thread that reads the supervisor's messages nor the task
/// that runs upgrades).
fn a_panicking_source_fails_the_upgrade(mode: &str) {
    let h = Harness::new(&format!("state-panic-{mode}"));
    h.ctl.write("app-state", "panic");
    let s = CtlService::start(&h, Path::new(MACRO_SVC), mode, &[]);
    let first = s.first;
    let said = run_ctl(CTL, &["upgrade", "--socket", &s.socket, "--timeout", "2m"]);
    assert_eq!(said.code, Some(1), "{said:?}");
    let error = said.str("error");
    assert!(
        error.contains("state") && error.contains("panicked"),
        "the answer names the state source's panic: {said:?}"
    );
    assert_eq!(reply_pid(&tcp_get_line(&s.tcp, "GET").expect("GET")), first);
    // The service still runs upgrades: the same source fails the next
    // one the same way.
    let again = run_ctl(CTL, &["upgrade", "--socket", &s.socket, "--timeout", "2m"]);
    assert_eq!(again.code, Some(1), "{again:?}");
    assert!(again.str("error").contains("panicked"), "{again:?}");
    assert_first_serves_alone(&s, first);
    s.stop(first);
}

#[test]
fn supervised_a_panicking_state_source_fails_the_upgrade() {
    a_panicking_source_fails_the_upgrade("supervised");
}

#[test]
fn replace_a_panicking_state_source_fails_the_upgrade() {
    a_panicking_source_fails_the_upgrade("replace");
}

/// Supervised mode: a state source slower than the supervisor's 5 s wait
/// for connections and files is waited for (up to the upgrade timeout),
/// not dropped: the next generation gets the state.
#[test]
fn supervised_a_slow_state_source_is_waited_for() {
    let h = Harness::new("state-slow");
    h.ctl.write("app-state", "slow 6000");
    let mut s = CtlService::start(&h, Path::new(MACRO_SVC), "supervised", &[]);
    let first = s.first;
    let next = upgrade(&s);
    s.svc.wait_kind("state-slow", Some(first));
    let taken = s.svc.wait_kind("state-taken", Some(next));
    assert_eq!(taken.get("len"), "4", "{}", taken.line);
    s.stop(next);
}

/// Supervised mode: a state source that has not returned within the
/// upgrade timeout fails the upgrade (the serving generation keeps its
/// state and serves on), rather than starting the next generation without
/// the state.
#[test]
fn supervised_a_state_source_past_the_upgrade_timeout_fails_the_upgrade() {
    let h = Harness::new("state-late");
    h.ctl.write("app-state", "slow 6000");
    let s = CtlService::start(
        &h,
        Path::new(MACRO_SVC),
        "supervised",
        &[("MS_UPGRADE_TIMEOUT_MS", "2500")],
    );
    let first = s.first;
    let said = run_ctl(CTL, &["upgrade", "--socket", &s.socket]);
    assert_eq!(said.code, Some(1), "{said:?}");
    assert!(
        said.str("error")
            .contains("did not return within the upgrade timeout"),
        "{said:?}"
    );
    assert_first_serves_alone(&s, first);
    s.stop(first);
}
