//! The benchmark's baseline: the same HTTP contract on plain
//! `#[tokio::main]` and hyper, without any upgrade machinery. It binds its
//! listener, starts serving, and tells `NOTIFY_SOCKET` `READY=1` (as a
//! systemd service with `Type=notify` would); `SIGTERM` ends it. With
//! `BENCH_BALLAST_MIB=N` it allocates and touches N MiB before readiness.

use std::process::ExitCode;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-tokio: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tableflip_bench::announce_start();
    let mut term = signal(SignalKind::terminate())?;
    let mut listeners = vec![TcpListener::bind(tableflip_bench::main_addr()).await?];
    for (_, addr) in tableflip_bench::extra_listeners()? {
        listeners.push(TcpListener::bind(addr).await?);
    }
    for listener in listeners {
        tokio::spawn(serve(listener));
    }
    // `BENCH_BALLAST_MIB`: resident memory before readiness.
    tableflip_bench::hold_ballast()?;
    if let Some(path) = std::env::var_os("PID_FILE") {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    let pid = std::process::id();
    tableflip_bench::sd_notify(&format!("READY=1\nMAINPID={pid}"));
    term.recv().await;
    Ok(())
}

async fn serve(listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: retry shortly rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(tableflip_bench::handle),
            )
            .into_owned();
        tokio::spawn(conn);
    }
}
