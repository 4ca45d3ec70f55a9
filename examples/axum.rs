//! The demo service as an axum application, served through
//! `tableflip::http::Server`: upgradeable with `kill -HUP <pid>` without
//! failing a request.
//!
//! ```text
//! cargo run --release -p tableflip-examples-more --example axum
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
//! The `Router` is served by `tableflip::http::Server::serve_tower` (one
//! call: any tower service), whose drain fails no request.
//! Not `axum::serve(…).with_graceful_shutdown(cx.draining())`: axum's
//! graceful shutdown closes idle keep-alive connections and connections
//! accepted just before the drain, so some requests fail at each upgrade.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::get;
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
    tracing::info!(address = %HTTP.address(), pid = std::process::id(), "serving HTTP (axum)");
    let app = Router::new()
        .route("/", get(hello))
        .route("/slow", get(slow));
    let server = tableflip::http::Server::new();
    let serve_cx = cx.clone();
    cx.spawn(async move {
        server.serve_tower(&serve_cx, listener, app).await;
    });
    Ok(())
}

/// The longest `/slow` wait accepted.
const MAX_SLOW: Duration = Duration::from_secs(600);

async fn hello() -> String {
    format!("pid {}\n", std::process::id())
}

async fn slow(Query(query): Query<HashMap<String, String>>) -> (StatusCode, String) {
    match query.get("ms").map(|ms| ms.parse::<u64>()) {
        Some(Ok(ms)) if Duration::from_millis(ms) <= MAX_SLOW => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (StatusCode::OK, hello().await)
        }
        _ => (
            StatusCode::BAD_REQUEST,
            format!(
                "expected /slow?ms=N with N from 0 to {}\n",
                MAX_SLOW.as_millis()
            ),
        ),
    }
}
