//! An axum application served through `tableflip::http::Server`, on the
//! attributes: shows that the drain works for axum (through hyper-util's
//! `TowerToHyperService`) and over HTTP/2.
//!
//! `AX_ADDR` (the address), `PID_FILE`. `GET /` answers `pid <N>`;
//! `GET /slow?ms=N` prints `EVENT <pid> slow-start` on stdout, then waits
//! N ms and answers the same.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::routing::get;
use hyper_util::service::TowerToHyperService;
use tableflip::{Context, Options, listener};

#[listener("tcp", "127.0.0.1:0", env = "AX_ADDR")]
static HTTP: tokio::net::TcpListener;

fn options() -> Options {
    Options {
        pid_file: std::env::var_os("PID_FILE").map(Into::into),
        ..Options::default()
    }
}

fn pid() -> String {
    format!("pid {}\n", std::process::id())
}

async fn slow(Query(query): Query<HashMap<String, u64>>) -> String {
    let line = format!("EVENT {} slow-start\n", std::process::id());
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    let _ = std::io::stdout().flush();
    let ms = query.get("ms").copied().unwrap_or(0).min(60_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    pid()
}

#[tableflip::main(options = options, drain_timeout = "20s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(|| async { pid() }))
        .route("/slow", get(slow));
    let listener = HTTP.take()?;
    let server = tableflip::http::Server::new();
    let serving = cx.clone();
    cx.spawn(async move {
        server
            .serve(&serving, listener, TowerToHyperService::new(app))
            .await;
    });
    Ok(())
}
