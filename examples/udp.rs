//! A UDP service on the macros, upgradeable with `kill -HUP <pid>`: every
//! datagram is answered with `pid <N>: <datagram>`.
//!
//! ```text
//! UDP_ADDR=127.0.0.1:5300 cargo run -p tableflip-examples-more --example udp
//! ```
//!
//! Both generations share one kernel socket during the overlap: datagrams
//! the old process has not read when it starts draining stay in the socket
//! and are read by the new one. The old process stops receiving as soon as
//! the drain starts, then drops its handle.

use tableflip::{Context, listener};
use tokio::net::UdpSocket;

/// The UDP endpoint.
#[listener("udp", "127.0.0.1:5300", env = "UDP_ADDR")]
static UDP: UdpSocket;

#[tableflip::main(drain_timeout = "5s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let socket = UDP.take()?;
    tracing::info!(address = %UDP.address(), pid = std::process::id(), "udp service");
    let draining = cx.draining();
    cx.spawn(async move {
        tokio::pin!(draining);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                biased;
                () = &mut draining => break,
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        let mut reply = format!("pid {}: ", std::process::id()).into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        if let Err(e) = socket.send_to(&reply, from).await {
                            tracing::debug!(error = %e, %from, "cannot reply");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "recv failed"),
                },
            }
        }
    });
    Ok(())
}
