//! A service built with `#[tableflip::main]` and `#[listener]`, driven by
//! the macro integration tests; see `macro_svc/common.rs`.

#[path = "../macro_svc/common.rs"]
mod common;

use tableflip::{Context, listener};

#[listener("tcp", "127.0.0.1:0", env = "MS_TCP")]
static TCP: tokio::net::TcpListener;

#[listener("udp", "127.0.0.1:0", env = "MS_UDP")]
static UDP: tokio::net::UdpSocket;

#[listener("unix", "/tmp/tableflip-macro-svc.sock", env = "MS_UNIX", mode = 0o660)]
static UNIX: tokio::net::UnixListener;

#[tableflip::main(options = common::options, flavor = "current_thread")]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    common::init(cx, &TCP, &UDP, &UNIX).await
}
