//! HTTP serving that drains without failing a request (feature `http`).
//!
//! [`Server::serve`] runs a hyper service (or an axum `Router`, wrapped with
//! `hyper_util::service::TowerToHyperService`) on a listener, HTTP/1.1 and
//! HTTP/2, and drains it so that an upgrade fails no request and resets no
//! connection:
//!
//! * When the drain starts, the accept loop stops and drops its handle of
//!   the listener; connections still queued in the kernel belong to the new
//!   generation, which shares the socket.
//! * A connection accepted just before the drain counts as busy until its
//!   first request is answered: it is never closed unread (the failure mode
//!   of a plain graceful shutdown, which closes it as "idle" while the
//!   client's first request is on its way). Only a connection that stays
//!   silent for the *first-request timeout* (default 10 s: a health check's
//!   bare TCP connect, a port scan) is closed without a request.
//! * Every HTTP/1 response written during the drain carries
//!   `Connection: close`, so a keep-alive client finishes its exchange and
//!   opens its next connection, which the new generation accepts.
//! * A keep-alive connection that is idle is closed only after it has been
//!   idle for the *linger* time (default 2 s): an active client sends its
//!   next request well within it and gets `Connection: close`; closing
//!   after the linger can only race a client that was itself idle for that
//!   long, and such a client must be ready to retry (RFC 9112 §9.3.1).
//! * HTTP/2 connections get GOAWAY at once and finish their open streams;
//!   the protocol makes that race-free.
//!
//! Limits: a request that takes longer than the drain timeout is cut when
//! the process exits; a client that opens a connection and stays silent for
//! longer than the linger sees it closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::service::Context;

/// The default linger: how long a keep-alive connection must have been
/// idle before the drain closes it.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);

/// The default first-request timeout: how long the drain waits for the
/// first request of a connection that has not sent one.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP server that drains without failing requests; see the
/// [module documentation](self).
///
/// ```no_run
/// use std::convert::Infallible;
///
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use hyper::{Request, Response};
/// use tableflip::{Context, listener};
///
/// #[listener("tcp", "127.0.0.1:8080")]
/// static HTTP: tokio::net::TcpListener;
///
/// async fn hello(_: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
///     Ok(Response::new(Full::new(Bytes::from("hello\n"))))
/// }
///
/// #[tableflip::main]
/// async fn main(cx: Context) -> std::io::Result<()> {
///     let listener = HTTP.take()?;
///     let server = tableflip::http::Server::new();
///     let serve_cx = cx.clone();
///     cx.spawn(async move {
///         server.serve(&serve_cx, listener, hyper::service::service_fn(hello)).await;
///     });
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Server {
    builder: auto::Builder<TokioExecutor>,
    linger: Duration,
    first_request_timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server for HTTP/1.1 and HTTP/2 (prior knowledge), with the
    /// default linger.
    pub fn new() -> Self {
        Server {
            builder: auto::Builder::new(TokioExecutor::new()),
            linger: DEFAULT_LINGER,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
        }
    }

    /// Sets the linger (see the [module documentation](self)).
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets the first-request timeout (see the [module documentation](self)).
    #[must_use]
    pub fn first_request_timeout(mut self, timeout: Duration) -> Self {
        self.first_request_timeout = timeout;
        self
    }

    /// hyper's connection builder, to tune HTTP/1 and HTTP/2 settings.
    pub fn builder_mut(&mut self) -> &mut auto::Builder<TokioExecutor> {
        &mut self.builder
    }

    /// Accepts connections on `listener` and serves each with `service`
    /// until the drain starts; each connection is a task of `cx`, so the
    /// drain waits for it. Returns when the drain starts (the listener is
    /// dropped then: this process's handle only).
    pub async fn serve<S, B>(&self, cx: &Context, listener: tokio::net::TcpListener, service: S)
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let draining = cx.draining();
        tokio::pin!(draining);
        loop {
            tokio::select! {
                biased;
                () = &mut draining => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        let this = self.clone();
                        let conn_cx = cx.clone();
                        let service = service.clone();
                        cx.spawn(async move { this.serve_connection(&conn_cx, stream, service).await });
                    }
                    Err(e) => {
                        // EMFILE and the like: keep serving what is open,
                        // retry shortly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        tracing::debug!("HTTP server stopped accepting");
    }

    /// Serves one connection (already accepted) with the drain rules.
    pub async fn serve_connection<I, S, B>(&self, cx: &Context, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let state = Arc::new(ConnState::new(cx.draining_token()));
        let service = DrainService {
            inner: service,
            state: Arc::clone(&state),
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let draining = cx.draining();
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            () = draining => {}
        }
        loop {
            if state.http2.load(Ordering::Acquire) {
                conn.as_mut().graceful_shutdown();
                break;
            }
            let limit = if state.answered.load(Ordering::Acquire) {
                self.linger
            } else {
                self.first_request_timeout
            };
            match state.idle_for() {
                Some(idle) if idle >= limit => {
                    conn.as_mut().graceful_shutdown();
                    break;
                }
                idle => {
                    let wait = idle.map_or(limit, |i| limit - i);
                    tokio::select! {
                        result = conn.as_mut() => return log_end(result),
                        () = tokio::time::sleep(wait), if idle.is_some() => {}
                        () = state.changed.notified() => {}
                    }
                }
            }
        }
        log_end(conn.await);
    }
}

fn log_end(result: Result<(), BoxError>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// What the drain needs to know about one connection.
#[derive(Debug)]
struct ConnState {
    in_flight: AtomicUsize,
    /// When the connection last went idle (accepted, or a response done).
    idle_since: Mutex<Instant>,
    http2: AtomicBool,
    /// Whether a response was produced on this connection.
    answered: AtomicBool,
    changed: Notify,
    draining: tokio_util::sync::CancellationToken,
}

impl ConnState {
    fn new(draining: tokio_util::sync::CancellationToken) -> Self {
        ConnState {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            http2: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            changed: Notify::new(),
            draining,
        }
    }

    /// How long the connection has been idle, or `None` while a request
    /// is in flight.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(since.elapsed())
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    fn end(&self) {
        self.answered.store(true, Ordering::Release);
        *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// Marks the request in flight until its response is produced (also when
/// the response future is dropped).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Wraps the application's service: tracks requests in flight and adds
/// `Connection: close` to HTTP/1 responses during the drain.
#[derive(Debug, Clone)]
struct DrainService<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S, B> Service<Request<Incoming>> for DrainService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.state.http2.store(true, Ordering::Release);
        }
        self.state.begin();
        let guard = InFlight(Arc::clone(&self.state));
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            if http1 && guard.0.draining.is_cancelled() {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            drop(guard);
            Ok(response)
        })
    }
}
