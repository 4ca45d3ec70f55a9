//! The TCP echo example (`examples/tcp_echo.rs`) upgraded again and again
//! under load: every byte sent is echoed back, no connection is refused or
//! reset. Connections are short exchanges (open, echo 32 KiB in pieces,
//! close), so that each drain ends quickly.
//!
//! `TABLEFLIP_LOAD_UPGRADES=100 cargo test -p tableflip-tests --test echo -- --nocapture`
//! runs a longer version (default: 20 upgrades) and prints the figures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nix::sys::signal::Signal;
use tableflip_tests::*;

const ECHO: &str = env!("CARGO_BIN_EXE_tcp_echo");

/// One exchange: 32 KiB written in 4 KiB pieces, each read back and
/// compared before the next is sent.
fn exchange(addr: &str, seed: u64) -> Result<u64, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    let mut piece = vec![0u8; 4096];
    let mut back = vec![0u8; 4096];
    let mut x = seed | 1;
    for round in 0..8 {
        for b in &mut piece {
            // xorshift: different bytes on every connection and round.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        stream
            .write_all(&piece)
            .map_err(|e| format!("write in round {round}: {e}"))?;
        stream
            .read_exact(&mut back)
            .map_err(|e| format!("read in round {round}: {e}"))?;
        if back != piece {
            return Err(format!(
                "round {round}: the echo differs from what was sent"
            ));
        }
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    match stream.read(&mut back) {
        Ok(0) => Ok(8 * 4096),
        Ok(n) => Err(format!("{n} unexpected bytes after the exchange")),
        Err(e) => Err(format!("reading EOF: {e}")),
    }
}

#[test]
fn every_byte_is_echoed_across_upgrades() {
    let _serial = serial();
    adopt_orphans();
    let upgrades = load_upgrades();
    let ctl = Scratch::new("echo");
    let addr = format!("127.0.0.1:{}", free_port());
    let pid_file = ctl.path().join("echo.pid");
    let mut cmd = Command::new(ECHO);
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.env("ECHO_ADDR", &addr)
        .env("PID_FILE", &pid_file)
        .env("RUST_LOG", "warn");
    let mut svc = spawn_ready(cmd, &pid_file);
    let first = svc.first_pid();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6u64)
        .map(|i| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut bytes, mut exchanges, mut failures) = (0u64, 0u64, Vec::new());
                let mut seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i + 1);
                while !stop.load(Ordering::Relaxed) {
                    seed = seed.wrapping_add(0x2545_F491_4F6C_DD1D);
                    match exchange(&addr, seed) {
                        Ok(n) => {
                            bytes += n;
                            exchanges += 1;
                        }
                        Err(e) => failures.push(e),
                    }
                }
                (bytes, exchanges, failures)
            })
        })
        .collect();
    let started = Instant::now();
    let mut current = first;
    for _ in 0..upgrades {
        current = upgrade_via_pid_file(&mut svc, &pid_file, current);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut bytes, mut exchanges, mut failures) = (0u64, 0u64, Vec::new());
    for c in clients {
        let (b, e, f) = c.join().expect("client thread");
        bytes += b;
        exchanges += e;
        failures.extend(f);
    }
    eprintln!(
        "echo: {upgrades} upgrades in {elapsed:?}; {exchanges} connections, {bytes} bytes echoed, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    assert!(exchanges > 0);
    signal(current, Signal::SIGTERM);
    svc.wait_all_exited();
    wait_gone(current);
}
