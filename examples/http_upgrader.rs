//! An HTTP service that upgrades itself without dropping a request, written
//! on tableflip's runtime API (no macros).
//!
//! ```text
//! cargo run --release -p tableflip-examples-more --example http_upgrader
//! curl http://127.0.0.1:8080/            # pid 4242
//! kill -HUP 4242                         # a new generation takes over
//! curl http://127.0.0.1:8080/            # pid 4250
//! ```
//!
//! Environment:
//!
//! - `HTTP_ADDR`: the address to listen on (default `127.0.0.1:8080`);
//! - `PID_FILE`: where the serving generation writes its PID (default: no
//!   PID file), so `kill -HUP $(cat "$PID_FILE")` always reaches it;
//! - `RUST_LOG`: the log filter (default `info`); logs go to stderr.
//!
//! Endpoints: `GET /` answers `pid <N>` (the generation that served it);
//! `GET /slow?ms=N` waits `N` milliseconds (at most 60 000), then answers
//! the same, which makes it easy to watch a request survive an upgrade.
//!
//! Signals: `SIGHUP` upgrades; `SIGTERM` or `SIGINT` stops gracefully, and a
//! second one exits at once, with status 1.
//!
//! # The drain
//!
//! Serving goes through `tableflip::http::Server` (feature `http`), whose
//! drain fails no request: when this generation must exit it stops
//! accepting (dropping only its handle of the shared socket), answers every
//! further request with `Connection: close`, closes idle keep-alive
//! connections only after a linger, and waits for requests in flight, up to
//! [`DRAIN_TIMEOUT`]. See that module's documentation for the details.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use tableflip::{Context, ListenSpec, Options, Upgrader};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The address used when `HTTP_ADDR` is not set.
const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// The name under which the listening socket is handed to the next
/// generation.
const LISTENER: &str = "HTTP";

/// The longest wait `GET /slow?ms=N` accepts.
const MAX_SLOW_MS: u64 = 60_000;

/// How long a draining generation waits for its connections, in all.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::INFO.into())
                .from_env_lossy(),
        )
        .init();

    let addr = env_or("HTTP_ADDR").unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    let opts = match env_or("PID_FILE") {
        Some(path) => Options::new().pid_file(path),
        None => Options::new(),
    };

    // Before any other thread exists: the upgrader takes its handover out
    // of the environment.
    let upg = match Upgrader::new(opts) {
        Ok(upg) => upg,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            upg.stop();
            return ExitCode::FAILURE;
        }
    };

    let span = tracing::info_span!(
        "http_upgrader",
        pid = std::process::id(),
        generation = upg.generation()
    );
    match runtime.block_on(run(upg.clone(), addr).instrument(span)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            // Removes the PID file and Unix socket files this process owns
            // (unless it handed over); a parent, if any, keeps serving.
            upg.stop();
            ExitCode::FAILURE
        }
    }
}

/// An environment variable, if set and not empty.
fn env_or(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        Ok(_) | Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => {
            tracing::warn!("ignoring {name}={v:?}: not valid UTF-8");
            None
        }
    }
}

/// One generation's life: listen, serve, handle signals, drain.
async fn run(upg: Upgrader, addr: String) -> Result<(), String> {
    // Install the handlers first: from here on, SIGHUP and SIGTERM no longer
    // kill the process by default.
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot install the {name} handler: {e}"))
    };
    let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;

    // Inherited from the previous generation when it had it; bound now
    // otherwise.
    let listener: TcpListener = upg
        .listen_with(&ListenSpec::new(LISTENER, "tcp", &addr))
        .map_err(|e| e.to_string())?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the address of the listener: {e}"))?;
    tracing::info!("listening on http://{local}/");

    let server = tokio::spawn(serve(listener, upg.clone()).in_current_span());

    // Initialisation is done: write the PID file, tell the parent (which
    // then drains and exits).
    upg.ready()
        .map_err(|e| format!("cannot become ready: {e}"))?;

    let mut stop_signals = 0;
    let drained = async {
        match server.await {
            Ok(()) => Ok(()),
            Err(e) => Err(format!("the server task failed: {e}")),
        }
    };
    tokio::pin!(drained);
    loop {
        tokio::select! {
            result = &mut drained => {
                tracing::info!("exiting");
                return result;
            }
            Some(()) = hup.recv() => {
                let upg = upg.clone();
                tokio::spawn(upgrade(upg).in_current_span());
            }
            Some(()) = term.recv() => on_stop_signal(&upg, "SIGTERM", &mut stop_signals),
            Some(()) = int.recv() => on_stop_signal(&upg, "SIGINT", &mut stop_signals),
        }
    }
}

/// Runs one upgrade and logs how it went. This generation keeps serving if
/// it fails.
async fn upgrade(upg: Upgrader) {
    tracing::info!("SIGHUP: upgrading");
    let started = Instant::now();
    match upg.upgrade().await {
        Ok(child) => {
            let elapsed = started.elapsed();
            tracing::info!(
                child_pid = child,
                elapsed_ms = elapsed.as_millis(),
                "upgrade done in {elapsed:.0?}: pid {child} is serving; draining"
            );
        }
        Err(e) if upg.is_exiting() => tracing::warn!("upgrade refused: {e}"),
        Err(e) => tracing::error!("upgrade failed; this process keeps serving: {e}"),
    }
}

/// The first stop signal stops gracefully; a second exits at once.
fn on_stop_signal(upg: &Upgrader, name: &str, count: &mut u32) {
    *count += 1;
    if *count == 1 {
        tracing::info!("{name}: stopping; send it again to exit at once");
        upg.stop();
    } else {
        tracing::warn!("{name} again: exiting at once, without draining");
        std::process::exit(1);
    }
}

/// Serves until this generation must exit (the next one is ready, or a
/// stop), then drains.
async fn serve(listener: TcpListener, upg: Upgrader) {
    let cx = Context::new(upg.clone());
    let server = tableflip::http::Server::new();
    let serving = cx.clone();
    cx.spawn(async move {
        server.serve(&serving, listener, service_fn(handle)).await;
    });
    upg.exit().await;
    tracing::info!(tasks = cx.tasks(), "draining: no longer accepting");
    let abandoned = cx.drain(DRAIN_TIMEOUT).await;
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "drain timeout ({DRAIN_TIMEOUT:?}) reached; closing the remaining connections"
        );
    }
}

/// Answers one request.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    tracing::debug!(method = %req.method(), uri = %req.uri(), "request");
    let pid = std::process::id();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let response = match req.uri().path() {
        "/" if get => text(StatusCode::OK, format!("pid {pid}\n")),
        "/slow" if get => match slow_ms(req.uri().query()) {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("pid {pid}\n"))
            }
            Err(msg) => text(StatusCode::BAD_REQUEST, msg),
        },
        "/" | "/slow" => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try / or /slow?ms=N\n".into(),
        ),
    };
    Ok(response)
}

/// The `ms` parameter of `/slow`.
fn slow_ms(query: Option<&str>) -> Result<u64, String> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="));
    match value.map(str::parse::<u64>) {
        Some(Ok(ms)) if ms <= MAX_SLOW_MS => Ok(ms),
        _ => Err(format!(
            "expected /slow?ms=N with N a number of milliseconds from 0 to {MAX_SLOW_MS}\n"
        )),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
