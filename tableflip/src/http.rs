//! HTTP serving that drains without failing a request (feature `http`).
//!
//! [`Server::serve_tower`] runs an axum `Router` (any tower service), and
//! [`Server::serve`] a hyper service, on a TCP or Unix listener, or either
//! behind TLS ([`TlsListener`][tls-listener], feature `tls`; see [`Accept`]), over
//! HTTP/1.1 and HTTP/2, and drains it so that an upgrade fails no request
//! and resets no connection:
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
//!   opens its next connection, which the new generation accepts. A
//!   response that switches the connection to another protocol is left as
//!   the application made it: `101 Switching Protocols` (a WebSocket
//!   handshake, whose `Connection: upgrade` must reach the client) and a
//!   2xx answer to `CONNECT` (a tunnel).
//! * A connection switched to another protocol (WebSocket, `CONNECT`
//!   tunnel) belongs to the application from then on, but stays a task of
//!   the [`Context`]: the drain waits until the application has dropped it
//!   (up to the drain timeout, as any task). To end such connections when
//!   the drain starts, the application watches the [`Drain`] handle that
//!   every request carries in its extensions (see [WebSockets](#websockets)).
//! * A connection still in its handshake (TLS) when the drain starts is
//!   busy: the drain waits for it, at most the first-request timeout,
//!   which bounds every handshake; once complete, the connection is served
//!   with the rules above.
//! * A keep-alive connection that is idle is closed only after it has been
//!   idle for the *linger* time (default 2 s): an active client sends its
//!   next request well within it and gets `Connection: close`; closing
//!   after the linger can only race a client that was itself idle for that
//!   long, and such a client must be ready to retry (RFC 9112 §9.3.1).
//! * HTTP/2 connections get GOAWAY at once and finish their open streams;
//!   the protocol makes that race-free.
//!
//! Limits: a request or a switched connection that lasts longer than the
//! drain timeout is cut when the process exits; a keep-alive client that
//! stays silent for longer than the linger sees its connection closed.
//!
//! [`Server::serve`] returns when the drain starts, with counts
//! ([`Served`]): connections accepted, and those still open, which the
//! drain then waits for.
//!
//! # WebSockets
//!
//! Each request handled by the server carries a [`Drain`] in its
//! extensions: an axum handler takes it as `Extension<Drain>` and moves it
//! into the WebSocket's task, which `select!`s on [`Drain::started`] next
//! to its socket. When the drain starts, the task sends a close frame with
//! code `1001` ("going away", RFC 6455 §7.4.1), waits briefly for the
//! client's answering close, and returns: the connection is dropped, the
//! old generation's drain is not held up, and the client reconnects, to
//! the new generation (which now accepts every new connection). The
//! [`Drain`] documentation has the code. A WebSocket that ignores the
//! drain keeps the old generation alive until the client leaves or the
//! drain timeout cuts it.
//!
//! # TLS
//!
//! With the `tls` feature, [`TlsListener`][tls-listener] wraps a listener and a
//! rustls `ServerConfig` (the crate re-exports the rustls it uses as
//! [`tls::rustls`][tls-rustls]); see the [`tls`][tls-module] module for the handshake's timeout,
//! ALPN (HTTP/2 over TLS) and the crypto provider.
//!
// The links to the `tls` module: into the docs when it is built, to
// docs.rs when it is not.
#![cfg_attr(
    feature = "tls",
    doc = "[tls-listener]: tls::TlsListener\n[tls-rustls]: tls::rustls\n[tls-module]: tls"
)]
#![cfg_attr(
    not(feature = "tls"),
    doc = "[tls-listener]: https://docs.rs/tableflip/latest/tableflip/http/tls/struct.TlsListener.html\n\
           [tls-rustls]: https://docs.rs/rustls/0.23\n\
           [tls-module]: https://docs.rs/tableflip/latest/tableflip/http/tls/index.html"
)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, oneshot};

use crate::service::Context;

#[cfg(feature = "tls")]
pub mod tls;

/// The default linger: how long a keep-alive connection must have been
/// idle before the drain closes it.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);

/// The default first-request timeout: how long the drain waits for the
/// first request of a connection that has not sent one, and how long any
/// connection's handshake (TLS) may take.
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

    /// Sets the first-request timeout (default
    /// [`DEFAULT_FIRST_REQUEST_TIMEOUT`]): during the drain, how long a
    /// connection that has not sent a request yet is waited for (see the
    /// [module documentation](self)); at all times, how long its handshake
    /// ([`Accept::handshake`]: TLS) may take, after which it is closed.
    #[must_use]
    pub fn first_request_timeout(mut self, timeout: Duration) -> Self {
        self.first_request_timeout = timeout;
        self
    }

    /// hyper's connection builder, to tune HTTP/1 and HTTP/2 settings.
    pub fn builder_mut(&mut self) -> &mut auto::Builder<TokioExecutor> {
        &mut self.builder
    }

    /// [`serve`](Self::serve) for a tower service, such as an axum
    /// `Router` (`Router<()>`: with its state given, `.with_state(…)`):
    /// one call, no wrapper.
    ///
    /// ```no_run
    /// # async fn app(cx: tableflip::Context, listener: tokio::net::TcpListener) {
    /// # let router = axum::Router::new();
    /// tableflip::http::Server::new().serve_tower(&cx, listener, router).await;
    /// # }
    /// ```
    pub async fn serve_tower<L, S, B>(&self, cx: &Context, listener: L, service: S) -> Served
    where
        L: Accept,
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let service = hyper_util::service::TowerToHyperService::new(service);
        self.serve(cx, listener, service).await
    }

    /// Accepts connections on `listener` (a TCP or Unix listener, or
    /// either behind TLS: see [`Accept`]) and serves each with `service`
    /// until the drain starts; each connection is a task of `cx`, so the
    /// drain waits for it. Returns when the drain starts (the listener is
    /// dropped then: this process's handle only), with the counts of
    /// [`Served`]; the connections still open go on as tasks of `cx`.
    ///
    /// A connection's handshake ([`Accept::handshake`]: TLS, for a
    /// `tls::TlsListener`) runs in the connection's task,
    /// never in the accept loop, and must complete within the
    /// [first-request timeout](Self::first_request_timeout) (default 10 s),
    /// drain or not: a connection whose handshake fails or takes longer is
    /// closed (logged at debug level). A connection in its handshake is
    /// busy for the drain, which waits for it as for any task.
    pub async fn serve<L, S, B>(&self, cx: &Context, listener: L, service: S) -> Served
    where
        L: Accept,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let draining = cx.draining();
        tokio::pin!(draining);
        let open = Arc::new(AtomicUsize::new(0));
        let mut accepted: u64 = 0;
        loop {
            tokio::select! {
                biased;
                () = &mut draining => break,
                next = listener.accept_io() => match next {
                    Ok(conn) => {
                        accepted += 1;
                        let open = OpenConn::new(&open);
                        let this = self.clone();
                        let conn_cx = cx.clone();
                        let service = service.clone();
                        cx.spawn(async move {
                            let _open = open;
                            let limit = this.first_request_timeout;
                            match tokio::time::timeout(limit, L::handshake(conn)).await {
                                Ok(Ok(io)) => this.serve_connection(&conn_cx, io, service).await,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "connection handshake failed");
                                }
                                Err(_) => tracing::debug!(
                                    timeout = ?limit,
                                    "connection handshake timed out"
                                ),
                            }
                        });
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
        let served = Served {
            accepted,
            handed_to_drain: open.load(Ordering::Acquire),
        };
        tracing::debug!(
            accepted = served.accepted,
            handed_to_drain = served.handed_to_drain,
            "HTTP server stopped accepting"
        );
        served
    }

    /// Serves one connection (already accepted) with the drain rules.
    /// Returns when the connection is over: closed, or, if a response
    /// switched it to another protocol, dropped by the application.
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
        let (io, released) = Tracked::new(io);
        self.drive_connection(cx, io, service).await;
        // hyper has let go of the connection. If it was switched to another
        // protocol, the application holds it now (axum runs a WebSocket in
        // a task of its own): this task, which the drain waits for, ends
        // only when the application drops it.
        let _ = released.await;
    }

    /// Runs hyper's side of one connection with the drain rules, until
    /// hyper is done with it (closed, or handed to the application by a
    /// protocol switch).
    async fn drive_connection<I, S, B>(&self, cx: &Context, io: I, service: S)
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

/// What [`Server::serve`] (and [`serve_tower`](Server::serve_tower))
/// returns when the drain starts: how much it served, for a log line or a
/// metric.
///
/// ```no_run
/// # async fn app(cx: tableflip::Context, listener: tokio::net::TcpListener) {
/// # let router = axum::Router::new();
/// let served = tableflip::http::Server::new().serve_tower(&cx, listener, router).await;
/// tracing::info!(
///     accepted = served.accepted,
///     draining = served.handed_to_drain,
///     "stopped accepting"
/// );
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Served {
    /// Connections accepted over the server's life (those whose handshake
    /// then failed included).
    pub accepted: u64,
    /// Connections still open when the server stopped accepting, just
    /// after the drain started (in their handshake, in a request, idle, or
    /// switched to another protocol): the ones the drain then waits for,
    /// as tasks of the [`Context`]. A connection the drain closes at once
    /// (one idle for longer than the linger) may or may not be counted.
    pub handed_to_drain: usize,
}

/// Counts a connection as open until its task ends.
#[derive(Debug)]
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn new(open: &Arc<AtomicUsize>) -> OpenConn {
        open.fetch_add(1, Ordering::AcqRel);
        OpenConn(Arc::clone(open))
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The drain signal, as every request handled by a [`Server`] carries it
/// in its extensions: an axum handler takes `Extension<Drain>`, and code
/// that outlives the response (a WebSocket, a tunnel) watches it, without
/// passing the [`Context`] through the application's state.
///
/// The drain waits for a connection switched to another protocol until
/// the application drops it (up to the drain timeout): a WebSocket that
/// ends itself when the drain starts, with a close frame `1001` ("going
/// away"), lets the old generation exit at once, and its client
/// reconnects to the new one.
///
/// ```no_run
/// use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
/// use axum::response::Response;
/// use axum::Extension;
/// use tableflip::http::Drain;
///
/// async fn ws(upgrade: WebSocketUpgrade, Extension(drain): Extension<Drain>) -> Response {
///     upgrade.on_upgrade(move |socket| session(socket, drain))
/// }
///
/// async fn session(mut socket: WebSocket, drain: Drain) {
///     let started = drain.started();
///     tokio::pin!(started);
///     loop {
///         tokio::select! {
///             () = &mut started => {
///                 let close = CloseFrame { code: 1001, reason: "going away".into() };
///                 let _ = socket.send(Message::Close(Some(close))).await;
///                 break;
///             }
///             message = socket.recv() => match message {
///                 Some(Ok(Message::Text(text))) => {
///                     if socket.send(Message::Text(text)).await.is_err() {
///                         break;
///                     }
///                 }
///                 Some(Ok(_)) => {}
///                 Some(Err(_)) | None => break,
///             },
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    token: tokio_util::sync::CancellationToken,
}

impl Drain {
    /// Whether the drain has started.
    pub fn is_started(&self) -> bool {
        self.token.is_cancelled()
    }

    /// A future that resolves when the drain starts (at once if it has);
    /// independent of `self`, usable in `select!` and in spawned tasks.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }
}

impl From<&Context> for Drain {
    /// The drain signal of `cx`, for code outside a request (the same
    /// signal as [`Context::draining`]).
    fn from(cx: &Context) -> Drain {
        Drain {
            token: cx.draining_token(),
        }
    }
}

fn log_end(result: Result<(), BoxError>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A connection's transport, which closes a channel when it is dropped.
///
/// A connection switched to another protocol outlives hyper's connection
/// future: hyper hands the transport to the application (inside
/// `hyper::upgrade::Upgraded`), so its drop is the one event that says the
/// connection is over.
#[derive(Debug)]
struct Tracked<I> {
    io: I,
    /// Never sent on: dropped with the transport.
    _alive: oneshot::Sender<Infallible>,
}

impl<I> Tracked<I> {
    /// Wraps `io`; the receiver resolves (with an error) when the wrapper
    /// is dropped.
    fn new(io: I) -> (Tracked<I>, oneshot::Receiver<Infallible>) {
        let (alive, released) = oneshot::channel();
        (Tracked { io, _alive: alive }, released)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
/// `Connection: close` to HTTP/1 responses during the drain, except to
/// those that switch protocols.
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

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(Drain {
            token: self.state.draining.clone(),
        });
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.state.http2.store(true, Ordering::Release);
        }
        let connect = req.method() == Method::CONNECT;
        self.state.begin();
        let guard = InFlight(Arc::clone(&self.state));
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            if http1
                && guard.0.draining.is_cancelled()
                && !switches_protocols(connect, response.status())
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            drop(guard);
            Ok(response)
        })
    }
}

/// Whether a response with `status` to a request (a `CONNECT` one if
/// `connect`) turns the connection into something other than HTTP: a
/// protocol switch (`101`, RFC 9110 §15.2.2) or a tunnel (a 2xx answer to
/// `CONNECT`, RFC 9110 §9.3.6). Its headers belong to that handshake: a
/// `Connection: close` would break it (a WebSocket client rejects a 101
/// without `Connection: upgrade`).
fn switches_protocols(connect: bool, status: StatusCode) -> bool {
    status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success())
}

/// A listener [`Server::serve`] accepts connections from: TCP and Unix
/// stream listeners (tokio's), and either behind TLS
/// (`tls::TlsListener`, feature `tls`). A TCP connection
/// gets `TCP_NODELAY`.
///
/// Accepting is two steps: [`accept_io`](Self::accept_io) takes the
/// connection off the listener, in the accept loop, and must not wait for
/// the peer; [`handshake`](Self::handshake) then runs in the connection's
/// own task (a TLS handshake: one slow client never holds up the accept
/// loop), bounded by the server's first-request timeout.
pub trait Accept: Send + 'static {
    /// A connection as accepted, before its handshake.
    type Conn: Send + 'static;

    /// The connection after its handshake: what HTTP is spoken on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Accepts the next connection.
    ///
    /// # Errors
    ///
    /// The listener's accept error (`EMFILE`…); the server logs it and
    /// tries again 10 ms later.
    fn accept_io(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;

    /// Completes a connection accepted by [`accept_io`](Self::accept_io):
    /// nothing for TCP and Unix, the TLS handshake for a
    /// `tls::TlsListener`.
    ///
    /// # Errors
    ///
    /// A failed handshake; the server closes the connection.
    fn handshake(conn: Self::Conn) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Io = tokio::net::TcpStream;

    async fn accept_io(&self) -> std::io::Result<Self::Conn> {
        let (stream, _peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn handshake(conn: Self::Conn) -> std::io::Result<Self::Io> {
        Ok(conn)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    type Io = tokio::net::UnixStream;

    async fn accept_io(&self) -> std::io::Result<Self::Conn> {
        self.accept().await.map(|(stream, _peer)| stream)
    }

    async fn handshake(conn: Self::Conn) -> std::io::Result<Self::Io> {
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_switches_are_recognised_by_kind() {
        assert!(switches_protocols(false, StatusCode::SWITCHING_PROTOCOLS));
        assert!(switches_protocols(true, StatusCode::SWITCHING_PROTOCOLS));
        for code in [200, 201, 204, 299] {
            let status = StatusCode::from_u16(code).expect("status");
            assert!(switches_protocols(true, status), "CONNECT {code}");
            assert!(!switches_protocols(false, status), "{code}");
        }
        for code in [100, 102, 103, 300, 301, 400, 407, 500, 502] {
            let status = StatusCode::from_u16(code).expect("status");
            assert!(!switches_protocols(true, status), "CONNECT {code}");
            assert!(!switches_protocols(false, status), "{code}");
        }
    }
}
