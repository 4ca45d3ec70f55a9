//! A Unix-socket service on the macros, upgradeable with `kill -HUP <pid>`:
//! each connection gets `pid <N>` and is closed.
//!
//! ```text
//! UNIX_PATH=/tmp/tableflip-demo.sock cargo run -p tableflip-examples-more --example unix
//! socat - UNIX-CONNECT:/tmp/tableflip-demo.sock
//! ```
//!
//! The socket file is created with mode 0660. An upgrade never removes it
//! (the new generation inherits the socket); a real stop (`SIGTERM`) does.
//! A socket file left behind by a crashed run is replaced at startup; a
//! path that is not a socket is never removed.

use tableflip::{Context, listener};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

/// The control socket.
#[listener("unix", "/tmp/tableflip-demo.sock", env = "UNIX_PATH", mode = 0o660)]
static CONTROL: UnixListener;

#[tableflip::main(drain_timeout = "10s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let listener = CONTROL.take()?;
    tracing::info!(path = %CONTROL.address(), pid = std::process::id(), "unix service");
    let tasks = cx.clone();
    let draining = cx.draining();
    cx.spawn(async move {
        tokio::pin!(draining);
        loop {
            tokio::select! {
                biased;
                () = &mut draining => break,
                accepted = listener.accept() => match accepted {
                    Ok((mut stream, _)) => {
                        tasks.spawn(async move {
                            let reply = format!("pid {}\n", std::process::id());
                            let _ = stream.write_all(reply.as_bytes()).await;
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                },
            }
        }
    });
    Ok(())
}
