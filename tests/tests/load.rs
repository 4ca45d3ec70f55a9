//! Zero failed requests under load while the HTTP demo (`examples/http.rs`)
//! is upgraded again and again: keep-alive clients and
//! connection-per-request clients hammer it, slow requests are in flight at
//! every upgrade, and every failure of any kind (refused, reset, EOF before
//! a whole response, a status other than 200) is counted.
//!
//! `TABLEFLIP_LOAD_UPGRADES=100 cargo test -p tableflip-tests --test load --release -- --nocapture`
//! runs a long version (default: 20 upgrades) and prints the figures.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tableflip_tests::http1::*;
use tableflip_tests::*;

const HTTP: &str = env!("CARGO_BIN_EXE_http");

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[test]
fn zero_failed_requests_across_upgrades_under_load() {
    let _serial = serial();
    adopt_orphans();
    let upgrades = load_upgrades();
    let ctl = Scratch::new("load");
    let addr = format!("127.0.0.1:{}", free_port());
    let pid_file = ctl.path().join("http.pid");
    let mut cmd = Command::new(HTTP);
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.env("HTTP_ADDR", &addr)
        .env("PID_FILE", &pid_file)
        .env("RUST_LOG", "warn");
    let mut svc = spawn_ready(cmd, &pid_file);
    let first = svc.first_pid();

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (addr, stop) = (addr.clone(), Arc::clone(&stop));
        clients.push(std::thread::spawn(move || {
            if i % 2 == 0 {
                keep_alive_client(addr, stop)
            } else {
                per_request_client(addr, stop)
            }
        }));
    }
    let served: Arc<Mutex<Vec<u32>>> = Arc::default();
    let mut generations = vec![first];
    let mut slow_results = Vec::new();
    let started = Instant::now();
    for _ in 0..upgrades {
        let old = *generations.last().expect("a generation");
        // A slow request in flight at the upgrade must complete, from the
        // old generation. Wait until it has reached the old process.
        let slow_addr = addr.clone();
        let (sent_tx, sent_rx) = std::sync::mpsc::channel();
        slow_results.push(std::thread::spawn(move || {
            let mut c = connect(&slow_addr).map_err(|e| e.to_string())?;
            let reply = request(&mut c, "/slow?ms=300", false);
            let _ = sent_tx.send(());
            reply.map(|r| (r.status, r.body)).map_err(|e| e.to_string())
        }));
        let _ = sent_rx.recv_timeout(Duration::from_millis(50));
        let new = upgrade_via_pid_file(&mut svc, &pid_file, old);
        generations.push(new);
        // Every generation serves: wait until a request is answered by it.
        wait_until(&format!("generation {new} answers"), || {
            tcp_http_pid(&addr) == Some(new)
        });
        served.lock().expect("lock").push(new);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    // [keep-alive, per-request]: client i runs mode i % 2.
    let mut modes = [Tally::default(), Tally::default()];
    for (i, c) in clients.into_iter().enumerate() {
        let t = c.join().expect("client thread");
        let mode = &mut modes[i % 2];
        mode.ok += t.ok;
        mode.failures.extend(t.failures);
        mode.latencies_us.extend(t.latencies_us);
        for (pid, n) in t.by_pid {
            *mode.by_pid.entry(pid).or_default() += n;
        }
    }
    let mut slow_ok = 0;
    for s in slow_results {
        match s.join().expect("slow thread") {
            Ok((200, body)) => {
                slow_ok += 1;
                assert!(body.starts_with("pid "), "{body}");
            }
            other => panic!("a slow request in flight at an upgrade failed: {other:?}"),
        }
    }
    eprintln!(
        "load: {upgrades} upgrades in {elapsed:?}; {slow_ok} slow requests in flight at an upgrade completed"
    );
    for (name, mode) in ["keep-alive", "per-request"].iter().zip(modes.iter_mut()) {
        mode.latencies_us.sort_unstable();
        let lat = &mode.latencies_us;
        eprintln!(
            "load: {name}: {} requests, {} failed; latency p50 {}us p99 {}us max {}us",
            mode.ok,
            mode.failures.len(),
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            lat.last().copied().unwrap_or(0),
        );
    }
    for (name, mode) in ["keep-alive", "per-request"].iter().zip(&modes) {
        assert!(
            mode.failures.is_empty(),
            "{name}: {} failures: {:?}",
            mode.failures.len(),
            &mode.failures[..mode.failures.len().min(20)]
        );
        assert!(mode.ok > 0, "{name} clients made no request");
    }
    assert_eq!(generations.len(), upgrades + 1);
    // Each generation answered the probe request that followed its
    // upgrade (that is what `served` records) or a client's.
    for g in &generations {
        let by_clients = modes.iter().any(|m| m.by_pid.contains_key(g));
        assert!(
            by_clients || served.lock().expect("lock").contains(g),
            "generation {g} served no request"
        );
    }
    let last = *generations.last().expect("a generation");
    signal(last, Signal::SIGTERM);
    svc.wait_all_exited();
    wait_gone(last);
}

/// The pid in the answer to `GET /` on a fresh connection, if any.
fn tcp_http_pid(addr: &str) -> Option<u32> {
    let mut c = connect(addr).ok()?;
    let reply = request(&mut c, "/", false).ok()?;
    (reply.status == 200).then(|| reply_pid(&reply.body))
}
