//! Rollback (`Options::probation`): a release that crashes right after it
//! took over is replaced by the *previous* binary — the inode that served
//! before, though the path on disk now holds the crashing one — once, and
//! the status says so; a fixed release then upgrades as usual. Both
//! process models, two different binaries (copies of the test service of
//! different sizes; the one of the crashing size aborts once ready).

use std::io::{Read, Write};
use std::path::Path;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const CTL: &str = env!("CARGO_BIN_EXE_tableflip-ctl-under-test");

fn ctl_json(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let said = run_ctl(CTL, args);
    (said.code, said.json)
}

fn exe_size(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).map_or(0, |m| m.len())
}

fn a_release_that_crashes_after_taking_over_is_rolled_back(mode: &str) {
    let h = Harness::new(&format!("rollback-{mode}"));
    let exe = h.ctl.path().join("svc");
    install_exe(MACRO_SVC, &exe, 0);
    let size_a = file_size(&exe);
    // A probation shorter than the default (the drain timeout), so that
    // waiting for it to pass costs the test little.
    let mut s = CtlService::start(&h, &exe, mode, &[("MS_PROBATION_MS", "4000")]);
    let (sup, first, sock) = (s.first_pid, s.first, s.socket.clone());
    let tcp = s.tcp.clone();

    // Replace mode: the old generation rolls back, so it must still be
    // there (draining a request) when the new one crashes.
    let slow = (mode == "replace").then(|| {
        let addr = tcp.clone();
        let t = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("{e}"));
            s.set_read_timeout(Some(DEADLINE))
                .unwrap_or_else(|e| panic!("{e}"));
            writeln!(s, "SLOW 5000").unwrap_or_else(|e| panic!("{e}"));
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        });
        s.svc.wait_kind("slow", Some(first));
        t
    });

    // Release B, which crashes once it has taken over, at the same path.
    install_exe(MACRO_SVC, &exe, 4096);
    let size_b = file_size(&exe);
    assert_ne!(size_a, size_b);
    h.ctl.write("crash-if-size", &size_b.to_string());
    // The deploy script waits for the probation: the rollback is its
    // answer.
    let asked = start_ctl(CTL, &["upgrade", "--socket", &sock, "--wait-probation"]);
    let second = s
        .svc
        .wait_for("the new generation", |e| {
            e.kind == "init-done" && ![sup, first].contains(&e.pid)
        })
        .pid;
    // Once it has taken over (the old generation drains), it crashes.
    s.svc.wait_kind("draining", Some(first));
    h.ctl.write("crash-now", "");
    s.svc.wait_kind("crashing", Some(second));
    let said = asked.finish();
    assert_eq!(said.code, Some(1), "{said:?}");
    assert_eq!(said.str("outcome"), "failed", "{said:?}");
    assert_eq!(said.str("failure"), "rolled_back", "{said:?}");
    assert_eq!(said.pid("new_pid"), second, "{said:?}");
    assert!(said.str("error").contains("rolled back"), "{said:?}");

    // The previous binary (release A's inode) takes its place.
    let third = s
        .svc
        .wait_for("the rollback generation", |e| {
            e.kind == "init-done" && ![sup, first, second].contains(&e.pid)
        })
        .pid;
    assert_eq!(
        exe_size(third),
        size_a,
        "the rollback runs the previous binary"
    );
    assert_eq!(file_size(&exe), size_b, "the path still holds release B");
    // Started from an image (`/proc/…`), named after its argv[0] all the
    // same (what ps and systemctl status show), as is the supervisor after
    // re-executing itself.
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm(third).trim(), "svc");
    assert_eq!(comm(sup).trim(), "svc");
    let main = s.main_pid(third);
    wait_until("the rollback generation is in charge", || {
        pid_file_pid(&s.pid_file) == Some(main)
    });
    let (code, status) = ctl_json(&["status", "--socket", &sock, "--json"]);
    assert_eq!(code, Some(0), "{status}");
    assert_eq!(status["pid"], third, "{status}");
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["last_upgrade"]["rolled_back"], true, "{status}");
    assert_eq!(status["last_upgrade"]["ok"], false, "{status}");
    let what = status["last_upgrade"]["error"].as_str().unwrap_or("");
    assert!(
        what.contains("rolled back to the previous binary"),
        "{status}"
    );
    assert!(what.contains(&second.to_string()), "{status}");
    assert!(s.logged("ROLLBACK"), "the rollback is logged loudly");
    if let Some(t) = slow {
        assert_eq!(
            t.join().map(|s| reply_pid(&s)).ok(),
            Some(first),
            "the request in flight on the old generation completed"
        );
    }

    // A fixed release (another size) upgrades as usual, and survives its
    // probation: the answer comes after it (in replace mode the old
    // generation, drained, stays for it: it is what can roll back).
    install_exe(MACRO_SVC, &exe, 8192);
    let said = run_ctl(CTL, &["upgrade", "--socket", &sock, "--wait-probation"]);
    assert_eq!(said.code, Some(0), "{said:?}");
    assert_eq!(said.str("outcome"), "upgraded", "{said:?}");
    let served = said.num("probation_ms");
    assert!(
        (3900..u64::MAX).contains(&served),
        "the answer came after the probation: {said:?}"
    );
    let fourth = said.pid("new_pid");
    s.svc.wait_kind("init-done", Some(fourth));
    assert_eq!(exe_size(fourth), file_size(&exe));
    s.svc.wait_kind("draining", Some(third));
    s.stop(fourth);
    assert!(!Path::new(&sock).exists());
}

#[test]
fn supervised_a_release_that_crashes_after_taking_over_is_rolled_back() {
    a_release_that_crashes_after_taking_over_is_rolled_back("supervised");
}

#[test]
fn replace_a_release_that_crashes_after_taking_over_is_rolled_back() {
    a_release_that_crashes_after_taking_over_is_rolled_back("replace");
}
