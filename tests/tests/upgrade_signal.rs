//! The upgrade signal (`Options::upgrade_signal`): with `SIGUSR2` chosen,
//! `SIGUSR2` upgrades and `SIGHUP` is the application's (here it handles
//! it, as a service that reopens its logs would), in both process models;
//! in supervised mode the supervisor forwards `SIGHUP` to the serving
//! generation.

use nix::sys::signal::Signal;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");

fn usr2_upgrades_and_sighup_is_the_applications(mode: &str) {
    let h = Harness::new(&format!("usr2-{mode}"));
    h.ctl.write("app-sighup", "");
    let pid_file = h.ctl.path().join("svc.pid");
    let mut cmd = macro_svc_cmd(MACRO_SVC, &h.ctl, mode);
    cmd.env("MS_PID_FILE", &pid_file)
        .env("MS_UPGRADE_SIGNAL", "SIGUSR2");
    let mut svc = Service::spawn(cmd);
    let supervised = mode == "supervised";
    let first = svc.wait_kind("init-done", None).pid;
    let sup = svc.first_pid();
    // The process to signal: the supervisor, or the serving generation.
    let main_of = |serving: u32| if supervised { sup } else { serving };
    wait_until("the service is ready", || {
        pid_file_pid(&pid_file) == Some(main_of(first))
    });

    // SIGUSR2 upgrades.
    signal(main_of(first), Signal::SIGUSR2);
    let second = svc.wait_for("the second generation", |e| {
        e.kind == "start" && e.pid != first && e.pid != sup
    });
    assert_eq!(second.get("gen"), "2");
    svc.wait_kind("init-done", Some(second.pid));
    svc.wait_kind("draining", Some(first));
    wait_until("the second generation is ready", || {
        pid_file_pid(&pid_file) == Some(main_of(second.pid))
    });

    // SIGHUP is the application's: handled by the serving generation, no
    // upgrade.
    signal(main_of(second.pid), Signal::SIGHUP);
    svc.wait_kind("app-sighup", Some(second.pid));

    // The next upgrade is the third generation: SIGHUP started none.
    signal(main_of(second.pid), Signal::SIGUSR2);
    let third = svc.wait_for("the third generation", |e| {
        e.kind == "start" && e.pid != first && e.pid != second.pid && e.pid != sup
    });
    assert_eq!(third.get("gen"), "3", "{third:?}");
    svc.wait_kind("init-done", Some(third.pid));
    svc.wait_kind("draining", Some(second.pid));
    wait_until("the third generation is ready", || {
        pid_file_pid(&pid_file) == Some(main_of(third.pid))
    });
    signal(main_of(third.pid), Signal::SIGTERM);
    svc.wait_kind("draining", Some(third.pid));
    if supervised {
        assert_eq!(svc.wait_first().code(), Some(0));
    }
    svc.wait_all_exited();
    wait_gone(third.pid);
}

#[test]
fn supervised_sigusr2_upgrades_and_sighup_is_the_applications() {
    usr2_upgrades_and_sighup_is_the_applications("supervised");
}

#[test]
fn replace_sigusr2_upgrades_and_sighup_is_the_applications() {
    usr2_upgrades_and_sighup_is_the_applications("replace");
}
