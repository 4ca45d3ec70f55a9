//! The demo service: HTTP on `#[tableflip::main]`, upgradeable with
//! `kill -HUP <pid>` without failing a request.
//!
//! ```text
//! cargo run --release --example http
//! curl http://127.0.0.1:8080/              # pid <N>: the serving generation
//! kill -HUP <N>                            # a new generation serves the same socket
//! curl 'http://127.0.0.1:8080/slow?ms=2000'
//! ```
//!
//! - `HTTP_ADDR`: the address (default `127.0.0.1:8080`);
//! - `PID_FILE`: where to write the PID to signal (none if unset): the
//!   supervisor's in supervised mode (the default; it never changes), the
//!   serving generation's with `TABLEFLIP_MODE=replace`;
//! - `GET /` answers `pid <N>`; `GET /slow?ms=N` waits N milliseconds
//!   first;
//! - `SIGHUP` upgrades; `SIGTERM`/`SIGINT` stop gracefully (a second one
//!   exits at once). Logs go to stderr (`RUST_LOG` filters).
//!
//! Serving goes through `tableflip::http::Server`, which drains so that no
//! request fails during an upgrade (see its documentation).

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tableflip::{Context, Options, listener};
use tokio::net::TcpListener;

/// The public HTTP endpoint, handed from each generation to the next.
#[listener("tcp", "127.0.0.1:8080", env = "HTTP_ADDR")]
static HTTP: TcpListener;

/// The options, computed at startup: the PID file comes from `PID_FILE`.
fn options() -> Options {
    match std::env::var_os("PID_FILE") {
        Some(path) => Options::new().pid_file(path),
        None => Options::new(),
    }
}

#[tableflip::main(options = options, drain_timeout = "30s", upgrade_timeout = "30s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let listener = HTTP.take()?;
    tracing::info!(address = %HTTP.address(), pid = std::process::id(), "serving HTTP");
    let server = tableflip::http::Server::new();
    let serve_cx = cx.clone();
    cx.spawn(async move {
        server
            .serve(&serve_cx, listener, hyper::service::service_fn(handle))
            .await;
    });
    Ok(())
}

/// The longest `/slow` wait accepted.
const MAX_SLOW: Duration = Duration::from_secs(600);

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        Ok(response)
    };
    let pid = std::process::id();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => reply(StatusCode::OK, format!("pid {pid}\n")),
        (&Method::GET, "/slow") => {
            let ms = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .map(str::parse::<u64>);
            match ms {
                Some(Ok(ms)) if Duration::from_millis(ms) <= MAX_SLOW => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    reply(StatusCode::OK, format!("pid {pid}\n"))
                }
                _ => reply(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected /slow?ms=N with N from 0 to {}\n",
                        MAX_SLOW.as_millis()
                    ),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}
