//! The benchmark's tableflip service: the HTTP contract of
//! `tableflip_bench` in tableflip's idiomatic form, `#[tableflip::main]`,
//! a `#[listener]`, and `tableflip::http::Server` (as `examples/http.rs`).
//!
//! The extra listeners of the scale test (`BENCH_LISTENERS`) cannot be
//! declared with `#[listener]`, whose number is fixed at compile time: they
//! are opened in the init function through the same upgrader
//! (`cx.upgrader().listen_with`), inherited by name like the declared one.
//!
//! With `BENCH_BALLAST_MIB=N`, the init function ends by allocating and
//! touching N MiB (`tableflip_bench::hold_ballast`), before readiness.
//!
//! With `BENCH_STATE_MIB=N`, each generation takes the application state
//! the previous one handed over (checking its size and content), and hands
//! over N MiB of its own at the next upgrade (`Context::hand_over_state`):
//! the state section of the bench.
//!
//! With `BENCH_HAND_OVER=off`, idle connections are not handed to the next
//! generation at the drain (see `tableflip_bench::serve_tableflip`).
//!
//! The tls section runs `bench-tableflip-tls` instead, so that this binary,
//! like the other libraries' services, carries no TLS stack: its start-up
//! and memory are compared with theirs.

use tableflip::{Context, ListenSpec, listener};
use tokio::net::TcpListener;

/// The HTTP endpoint, handed from each generation to the next.
#[listener("tcp", "127.0.0.1:8080", env = "BENCH_ADDR")]
static HTTP: TcpListener;

#[tableflip::main(options = tableflip_bench::tableflip_options, drain_timeout = "30s", upgrade_timeout = "30s")]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tableflip_bench::announce_start();
    tableflip_bench::serve_tableflip(&cx, HTTP.take()?);
    for (name, addr) in tableflip_bench::extra_listeners()? {
        let spec = ListenSpec::new(name, "tcp", addr.to_string());
        tableflip_bench::serve_tableflip(&cx, cx.upgrader().listen_with::<TcpListener>(&spec)?);
    }
    // `BENCH_BALLAST_MIB`: resident memory before readiness (after init).
    tableflip_bench::hold_ballast()?;
    state(&cx)?;
    Ok(())
}

/// `BENCH_STATE_MIB=N`: the first generation builds N MiB of state;
/// each next one takes the state handed over as its own (checking its size
/// and a sample of its bytes, as an application's deserialization would
/// reject a wrong one), and hands it over again at the next upgrade.
fn state(cx: &Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(mib) = std::env::var("BENCH_STATE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return Ok(());
    };
    let len = mib << 20;
    // The state itself: as received (mapped, nothing copied), or built.
    let state = match cx.inherited_state("bench")? {
        Some(inherited) => {
            let bytes = inherited.bytes();
            let sample_ok = (0..bytes.len())
                .step_by(4093)
                .all(|i| bytes[i] == (i % 251) as u8);
            if bytes.len() != len || !sample_ok {
                return Err(format!(
                    "the state handed over is not the {mib} MiB expected ({} bytes)",
                    bytes.len()
                )
                .into());
            }
            inherited
        }
        None => tableflip::State::new((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
    };
    let state = std::sync::Arc::new(state);
    if mib > 0 {
        // A copy, as an application's serialization would make.
        cx.hand_over_state("bench", move || Ok(tableflip::State::new(state.bytes())))?;
    }
    Ok(())
}
