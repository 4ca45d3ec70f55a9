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
//! * Idle HTTP/1 keep-alive connections (TCP and Unix) are handed to the
//!   new generation: see [below](#idle-connections-go-to-the-next-generation).
//!   The rules that follow are for the connections that are not.
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
//! stays silent for longer than the linger on a connection that is not
//! handed over sees its connection closed.
//!
//! [`Server::serve`] returns when the drain starts, with counts
//! ([`Served`]): connections accepted, and those still open, which the
//! drain then waits for.
//!
//! # Idle connections go to the next generation
//!
//! When the drain starts, each HTTP/1 connection on a TCP or Unix listener
//! is handed to the new generation as soon as it is idle: at once if no
//! request is in flight, else once its response has been written (that
//! response keeps the connection alive: no `Connection: close`). The old
//! generation stops reading the connection, and sends its socket
//! (`SCM_RIGHTS`, [unix(7)]) with the bytes it read and had not parsed
//! yet — the start of the next request, at most 16 KiB — over a
//! `SOCK_SEQPACKET` channel made at each upgrade and inherited by the new
//! generation with the listeners (in supervised mode too: the supervisor
//! passes it on; the generations then speak directly). The new
//! generation's [`Server`] serving the same listener takes it, answers
//! that it has it, and serves it as a connection it accepted, those bytes
//! first. The old generation closes its copy: the client sees no close,
//! and the old generation exits as soon as its last request in flight is
//! answered. A connection that has sent nothing yet goes over too.
//!
//! The connection stays with the old generation, under the rules above,
//! when it cannot be handed over safely:
//!
//! * HTTP/2: its GOAWAY already makes the drain race-free.
//! * TLS ([`TlsListener`][tls-listener]): the session's keys are in the old
//!   process's memory. (A custom [`Accept`] is handed over only if it
//!   implements [`Accept::handover_key`] and its two companions.)
//! * The client or the application asked to close it (`Connection:
//!   close`, HTTP/1.0), or it switched to another protocol.
//! * The new generation does not take it: it runs no [`Server`] on the
//!   same listener within 0.5 s of its readiness, runs a build without it,
//!   was built with [`Server::hand_over_idle`]`(false)`, refuses it (its
//!   server stopped meanwhile), or is gone. The old generation learns so
//!   before it reads the connection again: nothing is read twice or lost.
//! * More than 16 KiB read and not parsed (pipelined requests).
//!
//! [unix(7)]: https://man7.org/linux/man-pages/man7/unix.7.html
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode, Version};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use hyper::body::{Bytes, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, oneshot};

use crate::service::Context;

pub(crate) mod handoff;
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
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    linger: Duration,
    first_request_timeout: Duration,
    hand_over_idle: bool,
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
            http1: http1::Builder::new(),
            http2: http2::Builder::new(TokioExecutor::new()),
            linger: DEFAULT_LINGER,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            hand_over_idle: true,
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

    /// Whether idle HTTP/1 connections are handed to the next generation
    /// when the drain starts (default: yes; see the [module
    /// documentation](self#idle-connections-go-to-the-next-generation)).
    /// Without it, the drain closes them after the linger.
    #[must_use]
    pub fn hand_over_idle(mut self, on: bool) -> Self {
        self.hand_over_idle = on;
        self
    }

    /// hyper's HTTP/1 connection builder, to tune HTTP/1 settings.
    pub fn http1_mut(&mut self) -> &mut http1::Builder {
        &mut self.http1
    }

    /// hyper's HTTP/2 connection builder, to tune HTTP/2 settings.
    pub fn http2_mut(&mut self) -> &mut http2::Builder<TokioExecutor> {
        &mut self.http2
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
        let mut taken_over: u64 = 0;
        let key = listener.handover_key().filter(|_| self.hand_over_idle);
        if key.is_some() {
            cx.upgrader().hand_http_conns_over();
        }
        // Connections the previous generation hands over, for this
        // listener (until the route is dropped, at this server's drain).
        let mut route = match (key, cx.upgrader().http_predecessor()) {
            (Some(key), Some(from)) if !cx.is_draining() => from.route(key).await,
            _ => None,
        };
        loop {
            let (conn, prefix, answered) = tokio::select! {
                biased;
                () = &mut draining => break,
                handed = next_handed(&mut route) => match handed {
                    Some(h) => match L::from_handed_over(h.fd) {
                        Ok(io) => {
                            taken_over += 1;
                            (Arrival::HandedOver(io), h.bytes, true)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "a connection handed over cannot be served");
                            continue;
                        }
                    },
                    None => {
                        route = None;
                        continue;
                    }
                },
                next = listener.accept_io() => match next {
                    Ok(conn) => {
                        accepted += 1;
                        (Arrival::Accepted(conn), Bytes::new(), false)
                    }
                    Err(e) => {
                        // EMFILE and the like: keep serving what is open,
                        // retry shortly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let open = OpenConn::new(&open);
            let this = self.clone();
            let conn_cx = cx.clone();
            let service = service.clone();
            cx.spawn(async move {
                let _open = open;
                let io = match conn {
                    Arrival::HandedOver(io) => io,
                    Arrival::Accepted(conn) => {
                        let limit = this.first_request_timeout;
                        match tokio::time::timeout(limit, L::handshake(conn)).await {
                            Ok(Ok(io)) => io,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "connection handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(timeout = ?limit, "connection handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let handoff = key.map(|key| HandOff {
                    key,
                    fd_of: L::handover_fd,
                });
                this.run_conn(&conn_cx, io, prefix, answered, service, handoff)
                    .await;
            });
        }
        drop(route);
        let served = Served {
            accepted,
            handed_to_drain: open.load(Ordering::Acquire),
            taken_over,
        };
        tracing::debug!(
            accepted = served.accepted,
            handed_to_drain = served.handed_to_drain,
            taken_over = served.taken_over,
            "HTTP server stopped accepting"
        );
        served
    }

    /// Serves one connection (already accepted) with the drain rules.
    /// Returns when the connection is over: closed, or, if a response
    /// switched it to another protocol, dropped by the application. A
    /// connection served this way is never handed over to the next
    /// generation (this function does not know its listener).
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
        self.run_conn(cx, io, Bytes::new(), false, service, None)
            .await;
    }

    /// Serves one connection: `prefix` first (bytes already read from it),
    /// `answered` if it has been answered before (handed over). With
    /// `handoff`, an idle HTTP/1 connection goes to the next generation
    /// when the drain starts.
    async fn run_conn<I, S, B>(
        &self,
        cx: &Context,
        io: I,
        prefix: Bytes,
        answered: bool,
        service: S,
        handoff: Option<HandOff<I>>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AppService<B>,
        B: AppBody,
    {
        let (alive, released) = oneshot::channel();
        let state = Arc::new(ConnState::new(cx.draining_token()));
        if answered {
            state.answered.store(true, Ordering::Release);
        }
        let mut io = ConnIo {
            io,
            prefix,
            no_shutdown: Arc::new(AtomicBool::new(false)),
            _alive: alive,
        };
        let service = Arc::new(service);
        match self.sniff(cx, &mut io, handoff.as_ref()).await {
            Sniffed::H2 => self.drive_h2(cx, io, &state, service).await,
            Sniffed::H1 => self.drive_h1(cx, io, &state, service, handoff).await,
            Sniffed::Done => return,
        }
        // hyper has let go of the connection. If it was switched to another
        // protocol, the application holds it now (axum runs a WebSocket in
        // a task of its own): this task, which the drain waits for, ends
        // only when the application drops it.
        let _ = released.await;
    }

    /// Reads until the connection's protocol is known: HTTP/2 starts with
    /// its preface (RFC 9113 §3.4), anything else is HTTP/1. The bytes read
    /// go back in front of the connection. If the drain starts first, the
    /// connection is handed over (with what it sent so far) or, if it
    /// cannot be, given the first-request timeout.
    async fn sniff<I>(
        &self,
        cx: &Context,
        io: &mut ConnIo<I>,
        handoff: Option<&HandOff<I>>,
    ) -> Sniffed
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut seen: Vec<u8> = Vec::with_capacity(PREFACE.len());
        let draining = cx.draining();
        tokio::pin!(draining);
        let mut cut_at: Option<tokio::time::Instant> = None;
        let h2 = loop {
            if seen.len() == PREFACE.len() {
                break true;
            }
            let mut chunk = [0u8; 24];
            let want = PREFACE.len() - seen.len();
            tokio::select! {
                read = io.read(&mut chunk[..want]) => match read {
                    // EOF: hyper sees it too, and ends the connection.
                    Ok(0) => break false,
                    Ok(n) => {
                        seen.extend_from_slice(&chunk[..n]);
                        if seen[..] != PREFACE[..seen.len()] {
                            break false;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                        return Sniffed::Done;
                    }
                },
                () = &mut draining, if cut_at.is_none() => {
                    if let Some(h) = handoff {
                        let mut bytes = std::mem::take(&mut seen);
                        bytes.extend_from_slice(&io.prefix);
                        if self.hand_over(cx, h.key, (h.fd_of)(&io.io), &bytes).await {
                            return Sniffed::Done;
                        }
                        seen = bytes;
                        seen.truncate(seen.len() - io.prefix.len());
                    }
                    cut_at = Some(tokio::time::Instant::now() + self.first_request_timeout);
                }
                () = sleep_until_opt(cut_at) => {
                    tracing::debug!("a connection that sent no request was closed by the drain");
                    return Sniffed::Done;
                }
            }
        };
        let mut front = seen;
        front.extend_from_slice(&io.prefix);
        io.prefix = Bytes::from(front);
        if h2 { Sniffed::H2 } else { Sniffed::H1 }
    }

    /// Hands the connection over to the next generation, if it serves the
    /// listener; true once it has it (this process must let go of it).
    async fn hand_over(
        &self,
        cx: &Context,
        key: u64,
        fd: Option<BorrowedFd<'_>>,
        bytes: &[u8],
    ) -> bool {
        let (Some(next), Some(fd)) = (cx.upgrader().http_successor(), fd) else {
            return false;
        };
        if !next
            .wait_serving(key, Instant::now() + handoff::SERVING_WAIT)
            .await
        {
            return false;
        }
        let handed = next.hand_over(key, fd, bytes, None).await;
        tracing::trace!(handed, "idle connection handover");
        handed
    }

    /// HTTP/2: GOAWAY when the drain starts; the open streams finish.
    async fn drive_h2<I, S, B>(
        &self,
        cx: &Context,
        io: ConnIo<I>,
        state: &Arc<ConnState>,
        service: Arc<S>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AppService<B>,
        B: AppBody,
    {
        state.http2.store(true, Ordering::Release);
        let service = DrainService {
            inner: service,
            state: Arc::clone(state),
        };
        let conn = self.http2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => return log_end(result.map_err(Into::into)),
            () = cx.draining() => {}
        }
        conn.as_mut().graceful_shutdown();
        log_end(conn.await.map_err(Into::into));
    }

    /// HTTP/1: when the drain starts, the connection is handed over as soon
    /// as it is idle (the request in flight, if any, answered as usual);
    /// if it cannot be, the drain rules of the module documentation apply.
    async fn drive_h1<I, S, B>(
        &self,
        cx: &Context,
        mut io: ConnIo<I>,
        state: &Arc<ConnState>,
        service: Arc<S>,
        mut handoff: Option<HandOff<I>>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AppService<B>,
        B: AppBody,
    {
        loop {
            let svc = DrainService {
                inner: Arc::clone(&service),
                state: Arc::clone(state),
            };
            let no_shutdown = Arc::clone(&io.no_shutdown);
            let mut conn = self
                .http1
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            if !cx.is_draining() {
                tokio::select! {
                    result = &mut conn => return log_end(result.map_err(Into::into)),
                    () = cx.draining() => {}
                }
            }
            let Some(h) = handoff.take() else {
                return self.drain_h1(conn, state).await;
            };
            let Some(next) = cx.upgrader().http_successor() else {
                return self.drain_h1(conn, state).await;
            };
            // Does the next generation serve this listener? Then this
            // connection waits for its turn on the channel, served here
            // meanwhile (its responses keep it alive), then until it is
            // idle.
            let serving = next.wait_serving(h.key, Instant::now() + handoff::SERVING_WAIT);
            tokio::select! {
                result = &mut conn => return log_end(result.map_err(Into::into)),
                serving = serving => if !serving {
                    return self.drain_h1(conn, state).await;
                },
            }
            state.handing_over.store(true, Ordering::Release);
            // A busy connection gives its place back: a long request must
            // not hold up the idle ones.
            let mut turn = None;
            loop {
                if state.switched.load(Ordering::Acquire) || state.closing.load(Ordering::Acquire) {
                    state.handing_over.store(false, Ordering::Release);
                    return self.drain_h1(conn, state).await;
                }
                if state.in_flight.load(Ordering::Acquire) == 0 {
                    if turn.is_some() {
                        break;
                    }
                    tokio::select! {
                        result = &mut conn => return log_end(result.map_err(Into::into)),
                        taken = next.turn() => match taken {
                            Some(t) => turn = Some(t),
                            None => {
                                state.handing_over.store(false, Ordering::Release);
                                return self.drain_h1(conn, state).await;
                            }
                        },
                    }
                    continue;
                }
                turn = None;
                tokio::select! {
                    result = &mut conn => return log_end(result.map_err(Into::into)),
                    () = state.changed.notified() => {}
                }
            }
            // Idle. No request begun in this process (new, or handed over
            // and silent since): hyper has written nothing, and holds what
            // it read (a request's start) in its buffer. Otherwise hyper
            // closes an idle connection at once on a graceful shutdown
            // (after flushing), without shutting the socket down.
            let begun = state.begun.load(Ordering::Acquire);
            if begun > 0 {
                no_shutdown.store(true, Ordering::Release);
                Pin::new(&mut conn).graceful_shutdown();
                let result = (&mut conn).await;
                if result.is_err() || state.begun.load(Ordering::Acquire) != begun {
                    // It was not idle after all: hyper answered with
                    // `Connection: close` (or failed) and is done with it.
                    return log_end(result.map_err(Into::into));
                }
            }
            let Some(parts) = conn.into_parts() else {
                return;
            };
            let mut back = parts.io.into_inner();
            no_shutdown.store(false, Ordering::Release);
            let mut bytes = parts.read_buf.to_vec();
            bytes.extend_from_slice(&back.prefix);
            let handed = match (h.fd_of)(&back.io) {
                Some(fd) => next.hand_over(h.key, fd, &bytes, turn).await,
                None => false,
            };
            if handed {
                return;
            }
            // Refused, or the next generation is gone: this process serves
            // the connection on, with today's drain rules.
            state.handing_over.store(false, Ordering::Release);
            back.prefix = Bytes::from(bytes);
            io = back;
        }
    }

    /// The drain rules without handover (module documentation): HTTP/1
    /// responses get `Connection: close`; an idle connection is closed once
    /// it has been idle for the linger, one never answered after the
    /// first-request timeout.
    async fn drain_h1<I, S, B>(&self, mut conn: H1Conn<I, S>, state: &Arc<ConnState>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AppService<B>,
        B: AppBody,
    {
        loop {
            let limit = if state.answered.load(Ordering::Acquire) {
                self.linger
            } else {
                self.first_request_timeout
            };
            match state.idle_for() {
                Some(idle) if idle >= limit => {
                    Pin::new(&mut conn).graceful_shutdown();
                    break;
                }
                idle => {
                    let wait = idle.map_or(limit, |i| limit - i);
                    tokio::select! {
                        result = &mut conn => return log_end(result.map_err(Into::into)),
                        () = tokio::time::sleep(wait), if idle.is_some() => {}
                        () = state.changed.notified() => {}
                    }
                }
            }
        }
        log_end(conn.await.map_err(Into::into));
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
    /// Idle connections handed to the next generation are among them
    /// (they are handed over during the drain).
    pub handed_to_drain: usize,
    /// Connections the previous generation handed over to this server
    /// (idle keep-alive connections it did not close).
    pub taken_over: u64,
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

/// The bounds the server puts on the application's service.
trait AppService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + Sync
    + 'static
{
}

impl<S, B> AppService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Send
        + Sync
        + 'static
{
}

/// The bounds the server puts on a response body.
trait AppBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> AppBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// hyper's HTTP/1 connection over a [`ConnIo`].
type H1Conn<I, S> = http1::UpgradeableConnection<TokioIo<ConnIo<I>>, DrainService<S>>;

/// How a connection came to the accept loop.
enum Arrival<C, I> {
    /// Accepted, before its handshake.
    Accepted(C),
    /// Handed over by the previous generation.
    HandedOver(I),
}

/// What [`Server::sniff`] found.
enum Sniffed {
    H1,
    H2,
    /// Handed over, closed, or failed: nothing more to do.
    Done,
}

/// How to hand a connection of one listener over.
struct HandOff<I> {
    key: u64,
    fd_of: for<'a> fn(&'a I) -> Option<BorrowedFd<'a>>,
}

async fn next_handed(route: &mut Option<handoff::Route>) -> Option<handoff::Handed> {
    match route {
        Some(r) => r.conns.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A connection's transport as hyper sees it: `prefix` (bytes already read
/// from it) first; a shutdown that can be skipped (a connection handed
/// over must not be shut down: the next generation serves it); and a
/// channel closed when it is dropped.
///
/// A connection switched to another protocol outlives hyper's connection
/// future: hyper hands the transport to the application (inside
/// `hyper::upgrade::Upgraded`), so its drop is the one event that says the
/// connection is over.
#[derive(Debug)]
struct ConnIo<I> {
    io: I,
    prefix: Bytes,
    no_shutdown: Arc<AtomicBool>,
    /// Never sent on: dropped with the transport.
    _alive: oneshot::Sender<Infallible>,
}

impl<I: AsyncRead + Unpin> AsyncRead for ConnIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ConnIo<I> {
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
        if self.no_shutdown.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the drain needs to know about one connection.
#[derive(Debug)]
struct ConnState {
    /// Requests whose response has not been handed to hyper in full (its
    /// body's end included).
    in_flight: AtomicUsize,
    /// Requests begun, ever.
    begun: AtomicU64,
    /// When the connection last went idle (accepted, or a response done).
    idle_since: Mutex<Instant>,
    http2: AtomicBool,
    /// Whether a response was produced on this connection.
    answered: AtomicBool,
    /// The connection is being handed over once idle: responses keep it
    /// alive (no `Connection: close`).
    handing_over: AtomicBool,
    /// A response switched it to another protocol.
    switched: AtomicBool,
    /// The client or the application asked for it to close (HTTP/1.0,
    /// `Connection: close`): it is never handed over.
    closing: AtomicBool,
    changed: Notify,
    draining: tokio_util::sync::CancellationToken,
}

impl ConnState {
    fn new(draining: tokio_util::sync::CancellationToken) -> Self {
        ConnState {
            in_flight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            http2: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            switched: AtomicBool::new(false),
            closing: AtomicBool::new(false),
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
        self.begun.fetch_add(1, Ordering::AcqRel);
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

/// Marks the request in flight until its response is handed to hyper in
/// full: until the body's last frame is taken, or the body (or the
/// response future) is dropped.
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until its end.
    struct DrainBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B> std::fmt::Debug for DrainBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainBody").finish_non_exhaustive()
    }
}

impl<B: Body> Body for DrainBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps the application's service: tracks requests in flight and adds
/// `Connection: close` to HTTP/1 responses during the drain (unless the
/// connection is being handed over), except to those that switch
/// protocols.
#[derive(Debug)]
struct DrainService<S> {
    inner: Arc<S>,
    state: Arc<ConnState>,
}

impl<S, B> Service<Request<Incoming>> for DrainService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body,
{
    type Response = Response<DrainBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(Drain {
            token: self.state.draining.clone(),
        });
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.state.http2.store(true, Ordering::Release);
        }
        if req.version() < Version::HTTP_11 || asks_to_close(req.headers()) {
            self.state.closing.store(true, Ordering::Release);
        }
        let connect = req.method() == Method::CONNECT;
        self.state.begin();
        let guard = InFlight(Arc::clone(&self.state));
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            let state = &guard.0;
            let switches = switches_protocols(connect, response.status());
            if switches {
                state.switched.store(true, Ordering::Release);
            }
            if asks_to_close(response.headers()) {
                state.closing.store(true, Ordering::Release);
            }
            let (mut parts, body) = response.into_parts();
            if http1
                && state.draining.is_cancelled()
                && !state.handing_over.load(Ordering::Acquire)
                && !switches
            {
                parts
                    .headers
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(Response::from_parts(
                parts,
                DrainBody {
                    inner: body,
                    guard: Some(guard),
                },
            ))
        })
    }
}

/// Whether a `Connection` header says `close` (RFC 9112 §9.6).
fn asks_to_close(headers: &hyper::HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|option| option.trim().eq_ignore_ascii_case("close"))
        })
    })
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

    /// For [idle-connection handover](crate::http#idle-connections-go-to-the-next-generation):
    /// a number that names this listener's socket alike in every
    /// generation (TCP and Unix: its inode number). `None` (the default)
    /// keeps this listener's connections from being handed over: a TLS
    /// connection's session lives in this process's memory.
    fn handover_key(&self) -> Option<u64> {
        None
    }

    /// For handover: the socket under a connection (`None` by default).
    fn handover_fd(io: &Self::Io) -> Option<BorrowedFd<'_>> {
        let _ = io;
        None
    }

    /// For handover: a connection handed over by the previous generation,
    /// accepted there by this same listener, as this listener's `Io`.
    ///
    /// # Errors
    ///
    /// If `fd` is not such a connection (by default, always: `Unsupported`).
    fn from_handed_over(fd: OwnedFd) -> std::io::Result<Self::Io> {
        drop(fd);
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this listener takes no connection handed over",
        ))
    }
}

/// Checks that `fd` is a connected stream socket of `domain`.
fn handed_stream(fd: &OwnedFd, domain: socket2::Domain, what: &str) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(fd);
    let ok = sock.r#type()? == socket2::Type::STREAM
        && sock.domain()? == domain
        && sock.peer_addr().is_ok();
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the connection handed over is not a connected {what} socket"),
        ))
    }
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

    fn handover_key(&self) -> Option<u64> {
        handoff::key_of(self.as_fd())
    }

    fn handover_fd(io: &Self::Io) -> Option<BorrowedFd<'_>> {
        Some(io.as_fd())
    }

    fn from_handed_over(fd: OwnedFd) -> std::io::Result<Self::Io> {
        let local = socket2::SockRef::from(&fd).local_addr()?;
        let domain = if local.is_ipv6() {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        handed_stream(&fd, domain, "TCP")?;
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
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

    fn handover_key(&self) -> Option<u64> {
        handoff::key_of(self.as_fd())
    }

    fn handover_fd(io: &Self::Io) -> Option<BorrowedFd<'_>> {
        Some(io.as_fd())
    }

    fn from_handed_over(fd: OwnedFd) -> std::io::Result<Self::Io> {
        handed_stream(&fd, socket2::Domain::UNIX, "Unix stream")?;
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(stream)
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
