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
    Ok(())
}

/// Serves the contract on `listener` until the drain.
fn serve(cx: &Context, listener: TcpListener) {
    let server = tableflip::http::Server::new();
    let serve_cx = cx.clone();
    cx.spawn(async move {
        let service = hyper::service::service_fn(tableflip_bench::handle);
        server.serve(&serve_cx, listener, service).await;
    });
}
