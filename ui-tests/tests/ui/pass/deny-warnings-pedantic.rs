//! The generated code triggers no warning and no pedantic clippy lint, with
//! every option of both attributes. trybuild does not run clippy: this file
//! is also the `pedantic` example of this package, which
//! `cargo clippy --all-targets` checks.
#![deny(warnings, clippy::pedantic, unused_qualifications)]

use tableflip::{Context, Options, listener};
use tokio::net::{TcpListener, UdpSocket, UnixDatagram, UnixListener};

/// The public endpoint.
#[listener(
    "tcp",
    "127.0.0.1:0",
    env = "TABLEFLIP_UI_TESTS_UNSET_VARIABLE",
    backlog = 128,
    crate = "::tableflip"
)]
pub(crate) static HTTP: TcpListener;

/// Metrics over UDP.
#[listener("udp6", "[::1]:0", env = "TABLEFLIP_UI_TESTS_UNSET_VARIABLE")]
static METRICS: UdpSocket;

/// The admin socket.
#[listener(
    "unix",
    "/tmp/tableflip-ui-tests-deny-warnings-pedantic.sock",
    backlog = 8,
    mode = 0o660
)]
static ADMIN: UnixListener;

/// Log lines.
#[listener("unixgram", "@tableflip-ui-tests-deny-warnings-pedantic", mode = 0o600)]
static LOGS: std::os::unix::net::UnixDatagram;

fn options() -> Options {
    Options::new().backlog(256)
}

#[tableflip::main(
    upgrade_timeout = "1m",
    drain_timeout = "5s",
    pid_file = "/tmp/tableflip-ui-tests-deny-warnings-pedantic.pid",
    flavor = "multi_thread",
    worker_threads = 2,
    options = options,
    crate = "::tableflip"
)]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let http = HTTP.take()?;
    let metrics = METRICS.take()?;
    let admin = ADMIN.take()?;
    let logs = UnixDatagram::from_std(LOGS.take()?)?;
    let draining = cx.draining();
    cx.spawn(async move {
        draining.await;
        drop((http, metrics, admin, logs));
    });
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
