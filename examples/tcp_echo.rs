//! A TCP echo service on the macros, upgradeable with `kill -HUP <pid>`.
//!
//! ```text
//! ECHO_ADDR=127.0.0.1:7000 PID_FILE=echo.pid cargo run -p tableflip-examples-more --example tcp_echo
//! kill -HUP $(cat echo.pid)
//! ```
//!
//! The pattern for any custom protocol over TCP (or a Unix stream socket):
//!
//! 1. accept in a loop that also watches [`Context::draining`];
//! 2. spawn each connection with [`Context::spawn`], so the drain waits
//!    for it;
//! 3. when the drain starts, leave the accept loop and drop the listener.
//!    That closes only this process's handle: the kernel socket, and every
//!    connection queued on it, now belong to the new generation alone.
//!    Never call `shutdown(2)` on the listener: it would stop the new
//!    generation's accept queue too;
//! 4. let each connection finish at a point that is safe for the
//!    protocol: here, the echo server keeps echoing until the client closes
//!    or the drain timeout passes (then the process exits anyway).

use tableflip::{Context, Options, listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The echo endpoint.
#[listener("tcp", "127.0.0.1:7000", env = "ECHO_ADDR")]
static ECHO: TcpListener;

/// The PID file comes from `PID_FILE` (none if unset).
fn options() -> Options {
    match std::env::var_os("PID_FILE") {
        Some(path) => Options::new().pid_file(path),
        None => Options::new(),
    }
}

#[tableflip::main(options = options, drain_timeout = "30s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let listener = ECHO.take()?;
    tracing::info!(address = %ECHO.address(), pid = std::process::id(), "echo service");
    let tasks = cx.clone();
    let draining = cx.draining();
    cx.spawn(async move {
        tokio::pin!(draining);
        loop {
            tokio::select! {
                biased;
                () = &mut draining => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        tasks.spawn(echo(stream));
                    }
                    // Out of fds and the like: log, and keep serving.
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                },
            }
        }
        tracing::info!("stopped accepting; the new generation owns the socket");
        // `listener` is dropped here: this process's handle only.
    });
    Ok(())
}

async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
