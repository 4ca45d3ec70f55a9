//! `macro_svc` with its TCP listener's address taken from another variable
//! (`MS_TCP_MOVED`): a new build that moved the listener. The integration
//! tests replace `macro_svc` on disk with this binary to change an address
//! between generations.

#[path = "../macro_svc/common.rs"]
mod common;

use tableflip::{Context, listener};

#[listener("tcp", "127.0.0.1:0", env = "MS_TCP_MOVED")]
static TCP: tokio::net::TcpListener;

#[listener("udp", "127.0.0.1:0", env = "MS_UDP")]
static UDP: tokio::net::UdpSocket;

#[listener("unix", "/tmp/tableflip-macro-svc.sock", env = "MS_UNIX", mode = 0o660)]
static UNIX: tokio::net::UnixListener;

#[tableflip::main(options = common::options, worker_threads = 2)]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    common::init(cx, &TCP, &UDP, &UNIX).await
}
