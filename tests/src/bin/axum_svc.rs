//! An axum application served through `tableflip::http::Server`, on the
//! attributes: shows that the drain works for axum (`serve_tower`) and
//! over HTTP/2.
//!
//! `AX_ADDR` (the address), `PID_FILE`, `AX_LINGER_MS` (the server's
//! linger in milliseconds; default `tableflip::http::DEFAULT_LINGER`).
//! `GET /` answers `pid <N>`; `GET /slow?ms=N` prints
//! `EVENT <pid> slow-start` on stdout, then waits N ms and answers the
//! same. `GET /ws` is a WebSocket (axum's): each text message `M` is
//! answered with the text message `M\npid <N>\n`, until the client
//! closes. Each generation prints `EVENT <pid> start` as it initialises,
//! and `EVENT <pid> draining` when its drain starts (from then on, every
//! response gets the drain's treatment).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use tableflip::{Context, Options, listener};

#[listener("tcp", "127.0.0.1:0", env = "AX_ADDR")]
static HTTP: tokio::net::TcpListener;

/// The same application on a Unix socket (a reverse proxy's upstream),
/// when `AX_UNIX` names a path.
#[listener("unix", "/tmp/tableflip-axum-svc.sock", env = "AX_UNIX")]
static HTTP_UNIX: tokio::net::UnixListener;

fn options() -> Options {
    match std::env::var_os("PID_FILE") {
        Some(path) => Options::new().pid_file(path),
        None => Options::new(),
    }
}

fn pid() -> String {
    format!("pid {}\n", std::process::id())
}

fn event(kind: &str) {
    let line = format!("EVENT {} {kind}\n", std::process::id());
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(line.as_bytes());
    let _ = stdout.flush();
}

async fn slow(Query(query): Query<HashMap<String, u64>>) -> String {
    event("slow-start");
    let ms = query.get("ms").copied().unwrap_or(0).min(60_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    pid()
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

/// Answers each text message with itself and the PID, until the
/// connection ends: after the client's close frame, the next `recv` sends
/// the answering close frame and returns `None`.
async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        if let Message::Text(text) = message {
            let reply = format!("{}\n{}", text.as_str(), pid());
            if socket.send(Message::Text(reply.into())).await.is_err() {
                break;
            }
        }
    }
}

#[tableflip::main(options = options, drain_timeout = "20s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(|| async { pid() }))
        .route("/slow", get(slow))
        .route("/ws", get(ws));
    let listener = HTTP.take()?;
    let mut server = tableflip::http::Server::new();
    if let Some(ms) = std::env::var("AX_LINGER_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        server = server.linger(Duration::from_millis(ms));
    }
    event("start");
    let draining = cx.draining();
    cx.spawn(async move {
        draining.await;
        event("draining");
    });
    if std::env::var_os("AX_UNIX").is_some() {
        let unix = HTTP_UNIX.take()?;
        let (server, app, serving) = (server.clone(), app.clone(), cx.clone());
        cx.spawn(async move { server.serve_tower(&serving, unix, app).await });
    }
    let serving = cx.clone();
    cx.spawn(async move {
        server.serve_tower(&serving, listener, app).await;
    });
    Ok(())
}
