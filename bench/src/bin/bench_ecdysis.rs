//! The benchmark's ecdysis service: the HTTP contract of `tableflip_bench`
//! in ecdysis's idiomatic tokio form (`TokioEcdysisBuilder`, upgrade on
//! `SIGHUP`, stop on `SIGTERM`/`SIGINT`, a PID file, systemd
//! notifications), served by hyper with hyper-util's `GracefulShutdown`,
//! hyper's own graceful drain.
//!
//! Lifecycle: listen (inherited from the parent generation, or bound),
//! start serving, allocate the ballast (`BENCH_BALLAST_MIB`), `ready()`, await ecdysis's future; when it resolves
//! (upgrade done, or stop) the supervised listener streams end, and the
//! open connections are shut down gracefully, waited for up to
//! [`DRAIN_TIMEOUT`].

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ecdysis::tokio_ecdysis::{SignalKind, StopOnShutdown, TokioEcdysisBuilder};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio_stream::{Stream, StreamExt};

/// How long the drain waits for open connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The listen backlog (tableflip's default, for parity).
const BACKLOG: i32 = 1024;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-ecdysis[{}]: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tableflip_bench::announce_start();
    let addr: SocketAddr = tableflip_bench::main_addr().parse()?;
    let mut builder = TokioEcdysisBuilder::new(SignalKind::hangup())?;
    builder.stop_on_signal(SignalKind::terminate())?;
    builder.stop_on_signal(SignalKind::interrupt())?;
    if let Some(path) = std::env::var_os("PID_FILE") {
        builder.set_pid_file(path);
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        builder.enable_systemd_notifications()?;
    }

    let graceful = Arc::new(GracefulShutdown::new());
    let mut servers = Vec::new();
    let mut addrs = vec![addr];
    addrs.extend(
        tableflip_bench::extra_listeners()?
            .into_iter()
            .map(|(_, a)| a),
    );
    for addr in addrs {
        let incoming = builder.build_listen_tcp(StopOnShutdown::Yes, addr, |socket, addr| {
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            Ok(socket.into())
        })?;
        servers.push(tokio::spawn(accept_loop(incoming, Arc::clone(&graceful))));
    }

    // `BENCH_BALLAST_MIB`: resident memory before readiness.
    tableflip_bench::hold_ballast()?;
    let (_ecdysis, exit) = builder.ready()?;
    let reason = exit.await?;
    eprintln!("bench-ecdysis[{}]: exiting: {reason:?}", std::process::id());
    // The supervised streams have ended: the accept loops return.
    for server in servers {
        server.await?;
    }
    let graceful = Arc::try_unwrap(graceful).map_err(|_| "the accept loops still run")?;
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("bench-ecdysis: drain timeout; closing the remaining connections");
    }
    Ok(())
}

/// Accepts from an ecdysis-supervised listener until ecdysis stops it,
/// serving each connection under hyper's graceful shutdown.
async fn accept_loop<S>(mut incoming: S, graceful: Arc<GracefulShutdown>)
where
    S: Stream<Item = std::io::Result<tokio::net::TcpStream>> + Unpin,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    while let Some(accepted) = incoming.next().await {
        let Ok(stream) = accepted else {
            // EMFILE and the like: retry shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(tableflip_bench::handle),
            )
            .into_owned();
        tokio::spawn(graceful.watch(conn));
    }
}
