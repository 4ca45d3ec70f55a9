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
//! With `BENCH_TLS_ADDR` (and `BENCH_TLS_CERT`, `BENCH_TLS_KEY`,
//! `BENCH_TLS_TICKETS`), the contract is served over HTTPS too: the tls
//! section.
//!
//! With `BENCH_HAND_OVER=off`, idle connections are not handed to the next
//! generation at the drain (`Server::hand_over_idle(false)`): the drain of
//! before issue 18, for a before/after comparison in one build.

use tableflip::{Context, ListenSpec, Options, listener};
use tokio::net::TcpListener;

/// The HTTP endpoint, handed from each generation to the next.
#[listener("tcp", "127.0.0.1:8080", env = "BENCH_ADDR")]
static HTTP: TcpListener;

/// The PID file comes from `PID_FILE`.
fn options() -> Options {
    match std::env::var_os("PID_FILE") {
        Some(path) => Options::new().pid_file(path),
        None => Options::new(),
    }
}

#[tableflip::main(options = options, drain_timeout = "30s", upgrade_timeout = "30s")]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tableflip_bench::announce_start();
    serve(&cx, HTTP.take()?);
    for (name, addr) in tableflip_bench::extra_listeners()? {
        let spec = ListenSpec::new(name, "tcp", addr.to_string());
        serve(&cx, cx.upgrader().listen_with(&spec)?);
    }
    // `BENCH_BALLAST_MIB`: resident memory before readiness (after init).
    tableflip_bench::hold_ballast()?;
    state(&cx)?;
    tls(&cx)?;
    Ok(())
}

/// `BENCH_TLS_ADDR`, `BENCH_TLS_CERT`, `BENCH_TLS_KEY` (PEM files): the
/// same contract over HTTPS on that address (opened here, not declared,
/// so that the other sections bind nothing more), with the session-ticket
/// keys `BENCH_TLS_TICKETS` says: `handover` (`TicketKeys::handed_over`)
/// or `fresh` (keys of this process alone, as rustls' own ticketer).
fn tls(cx: &Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tableflip::http::tls::rustls::pki_types::pem::PemObject;
    use tableflip::http::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tableflip::http::tls::{TicketKeys, TlsListener, rustls};
    let (Some(addr), Some(cert), Some(key)) = (
        std::env::var_os("BENCH_TLS_ADDR"),
        std::env::var_os("BENCH_TLS_CERT"),
        std::env::var_os("BENCH_TLS_KEY"),
    ) else {
        return Ok(());
    };
    let certs = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.ticketer = match std::env::var("BENCH_TLS_TICKETS").as_deref() {
        Ok("handover") => TicketKeys::handed_over(cx.upgrader())?,
        _ => std::sync::Arc::new(TicketKeys::new(tableflip::http::tls::DEFAULT_ROTATION)?),
    };
    let addr = addr.to_string_lossy().into_owned();
    let listener: TcpListener = cx
        .upgrader()
        .listen_with(&ListenSpec::new("HTTPS", "tcp", addr))?;
    let listener = TlsListener::new(listener, std::sync::Arc::new(config));
    let hand_over = std::env::var("BENCH_HAND_OVER").as_deref() != Ok("off");
    let server = tableflip::http::Server::new().hand_over_idle(hand_over);
    let serve_cx = cx.clone();
    cx.spawn(async move {
        let service = hyper::service::service_fn(tableflip_bench::handle);
        server.serve(&serve_cx, listener, service).await;
    });
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

/// Serves the contract on `listener` until the drain.
fn serve(cx: &Context, listener: TcpListener) {
    let hand_over = std::env::var("BENCH_HAND_OVER").as_deref() != Ok("off");
    let server = tableflip::http::Server::new().hand_over_idle(hand_over);
    let serve_cx = cx.clone();
    cx.spawn(async move {
        let service = hyper::service::service_fn(tableflip_bench::handle);
        server.serve(&serve_cx, listener, service).await;
    });
}
