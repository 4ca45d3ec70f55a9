//! An axum application served through `tableflip::http::Server`, on the
//! attributes: shows that the drain works for axum (`serve_tower`) and
//! over HTTP/2.
//!
//! `AX_ADDR` (the address), `PID_FILE`, `AX_LINGER_MS` (the server's
//! linger in milliseconds; default `tableflip::http::DEFAULT_LINGER`),
//! `AX_FIRST_REQUEST_TIMEOUT_MS` (its first-request timeout, which also
//! bounds a TLS handshake; default
//! `tableflip::http::DEFAULT_FIRST_REQUEST_TIMEOUT`), `AX_HAND_OVER`
//! (`off`: idle connections are not handed to the next generation,
//! `Server::hand_over_idle(false)`, nor taken from the previous one;
//! `first-only`: only the first generation does; default on).
//! `GET /` answers `pid <N>`; `GET /slow?ms=N` prints
//! `EVENT <pid> slow-start` on stdout, then waits N ms and answers the
//! same. `GET /ws` is a WebSocket (axum's): each text message `M` is
//! answered with the text message `M\npid <N>\n`, until the client
//! closes. `GET /ws-live` is the same WebSocket, which also ends itself
//! when the drain starts, as an application should: a close frame `1001`
//! ("going away"), then it waits (up to 5 s) for the client's answering
//! close. Each generation prints `EVENT <pid> start` as it initialises,
//! `EVENT <pid> draining` when its drain starts (from then on, every
//! response gets the drain's treatment), and, as each server stops
//! accepting, `EVENT <pid> served listener=<tcp|unix|tls> accepted=<N>
//! handed_to_drain=<M> taken_over=<K>` (`tableflip::http::Served`).
//!
//! HTTPS: with `AX_TLS_CERT` and `AX_TLS_KEY` (PEM files: the certificate
//! chain, the private key), the same application is also served over TLS
//! (`tableflip::http::tls::TlsListener`, HTTP/1.1 and HTTP/2 by ALPN) on
//! `AX_TLS_ADDR`. `AX_TLS_TICKETS`: `handover` (session-ticket keys handed
//! from generation to generation: `tableflip::http::tls::TicketKeys`) or
//! `fresh` (ticket keys of each process alone); unset: rustls' default (no
//! tickets in TLS 1.2, stateful resumption in the process's memory).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use std::sync::Arc;

use axum::extract::Query;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use tableflip::http::tls::TlsListener;
use tableflip::http::tls::rustls;
use tableflip::http::{Accept, Drain, Server};
use tableflip::{Context, Options, listener};

#[listener("tcp", "127.0.0.1:0", env = "AX_ADDR")]
static HTTP: tokio::net::TcpListener;

/// The same application on a Unix socket (a reverse proxy's upstream),
/// when `AX_UNIX` names a path.
#[listener("unix", "/tmp/tableflip-axum-svc.sock", env = "AX_UNIX")]
static HTTP_UNIX: tokio::net::UnixListener;

/// The same application over TLS, when `AX_TLS_CERT` and `AX_TLS_KEY`
/// name PEM files.
#[listener("tcp", "127.0.0.1:0", env = "AX_TLS_ADDR")]
static HTTPS: tokio::net::TcpListener;

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

async fn ws_live(upgrade: WebSocketUpgrade, Extension(drain): Extension<Drain>) -> Response {
    upgrade.on_upgrade(move |socket| echo_until_drain(socket, drain))
}

/// [`echo`], until the drain starts: then a close frame 1001, and the
/// client's answering close (or 5 s) ends the connection, so that the
/// drain does not wait for a client that would stay.
async fn echo_until_drain(mut socket: WebSocket, drain: Drain) {
    let started = drain.started();
    tokio::pin!(started);
    loop {
        tokio::select! {
            () = &mut started => break,
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    let reply = format!("{}\n{}", text.as_str(), pid());
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
    let close = CloseFrame {
        code: 1001,
        reason: "going away".into(),
    };
    if socket.send(Message::Close(Some(close))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

/// The TLS configuration from the PEM files `AX_TLS_CERT` and `AX_TLS_KEY`
/// (ring as the crypto provider, named: the build may have another).
fn tls_config(
    cert: &std::ffi::OsStr,
    key: &std::ffi::OsStr,
) -> std::io::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| invalid("AX_TLS_CERT", &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("AX_TLS_KEY", &e))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("certificate and key", &e))
}

/// Serves `app` on `listener` as a task of `cx`; prints the `served`
/// event when it stops accepting.
fn serve<L: Accept>(cx: &Context, server: &Server, name: &'static str, listener: L, app: Router) {
    let (server, serving) = (server.clone(), cx.clone());
    cx.spawn(async move {
        let served = server.serve_tower(&serving, listener, app).await;
        event(&format!(
            "served listener={name} accepted={} handed_to_drain={} taken_over={}",
            served.accepted, served.handed_to_drain, served.taken_over
        ));
    });
}

#[tableflip::main(options = options, drain_timeout = "20s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(|| async { pid() }))
        .route("/slow", get(slow))
        .route("/ws", get(ws))
        .route("/ws-live", get(ws_live));
    let listener = HTTP.take()?;
    let mut server = Server::new();
    if let Some(ms) = std::env::var("AX_LINGER_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        server = server.linger(Duration::from_millis(ms));
    }
    if let Some(ms) = std::env::var("AX_FIRST_REQUEST_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        server = server.first_request_timeout(Duration::from_millis(ms));
    }
    match std::env::var("AX_HAND_OVER").as_deref() {
        Ok("off") => server = server.hand_over_idle(false),
        // The first generation hands over; those after it do not take.
        Ok("first-only") if cx.upgrader().generation() > 1 => {
            server = server.hand_over_idle(false);
        }
        _ => {}
    }
    event("start");
    let draining = cx.draining();
    cx.spawn(async move {
        draining.await;
        event("draining");
    });
    if std::env::var_os("AX_UNIX").is_some() {
        serve(&cx, &server, "unix", HTTP_UNIX.take()?, app.clone());
    }
    if let (Some(cert), Some(key)) = (
        std::env::var_os("AX_TLS_CERT"),
        std::env::var_os("AX_TLS_KEY"),
    ) {
        let mut config = tls_config(&cert, &key)?;
        // `AX_TLS_TICKETS`: session tickets with keys handed from
        // generation to generation (`handover`), or with keys of this
        // process alone (`fresh`: what rustls' own ticketer gives).
        match std::env::var("AX_TLS_TICKETS").as_deref() {
            Ok("handover") => {
                config.ticketer = tableflip::http::tls::TicketKeys::handed_over(cx.upgrader())
                    .map_err(std::io::Error::other)?;
            }
            Ok("fresh") => {
                config.ticketer = Arc::new(
                    tableflip::http::tls::TicketKeys::new(tableflip::http::tls::DEFAULT_ROTATION)
                        .map_err(std::io::Error::other)?,
                );
            }
            _ => {}
        }
        let config = Arc::new(config);
        serve(
            &cx,
            &server,
            "tls",
            TlsListener::new(HTTPS.take()?, config),
            app.clone(),
        );
    }
    serve(&cx, &server, "tcp", listener, app);
    Ok(())
}
