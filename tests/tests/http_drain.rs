//! `tableflip::http`'s drain with axum and over HTTP/2, against the
//! `axum_svc` test service.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use tableflip_tests::http1::{Tally, keep_alive_client, per_request_client};
use tableflip_tests::*;

const AXUM: &str = env!("CARGO_BIN_EXE_axum_svc");

fn start(ctl: &Scratch) -> (Service, String, std::path::PathBuf) {
    start_with(ctl, &[])
}

fn start_with(ctl: &Scratch, envs: &[(&str, &str)]) -> (Service, String, std::path::PathBuf) {
    let addr = format!("127.0.0.1:{}", free_port());
    let pid_file = ctl.path().join("axum.pid");
    let mut cmd = Command::new(AXUM);
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.env("AX_ADDR", &addr)
        .env("AX_UNIX", ctl.path().join("http.sock"))
        .env("PID_FILE", &pid_file)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied());
    let svc = spawn_ready(cmd, &pid_file);
    (svc, addr, pid_file)
}

/// An axum `Router` behind `tableflip::http::Server` goes through upgrades
/// under keep-alive and connection-per-request load without a failure.
#[test]
fn axum_under_load_fails_no_request_across_upgrades() {
    let h = Harness::new("axum");
    let ctl = &h.ctl;
    let (mut svc, addr, pid_file) = start(ctl);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    keep_alive_client(addr, stop)
                } else {
                    per_request_client(addr, stop)
                }
            })
        })
        .collect();
    let mut current = svc.first_pid();
    for _ in 0..5 {
        current = upgrade_via_pid_file(&mut svc, &pid_file, current);
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for c in clients {
        let t = c.join().expect("client thread");
        total.ok += t.ok;
        total.failures.extend(t.failures);
    }
    eprintln!(
        "axum: 5 upgrades, {} requests, {} failed",
        total.ok,
        total.failures.len()
    );
    assert!(
        total.failures.is_empty(),
        "{:?}",
        &total.failures[..total.failures.len().min(20)]
    );
    assert!(total.ok > 0);
    signal(current, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// The axum application on a Unix socket (`serve_tower` on a
/// `UnixListener`, as behind a reverse proxy): a client making one request
/// per connection through upgrades sees no failure, and is served by each
/// generation in turn.
#[test]
fn axum_on_a_unix_socket_fails_no_request_across_upgrades() {
    use std::io::Write;
    let h = Harness::new("axum-unix");
    let ctl = &h.ctl;
    let (mut svc, _addr, pid_file) = start(ctl);
    let path = ctl.path().join("http.sock");
    let stop = Arc::new(AtomicBool::new(false));
    // The last PID that answered, for the test to wait on.
    let last = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let client = {
        let (path, stop, last) = (path.clone(), Arc::clone(&stop), Arc::clone(&last));
        std::thread::spawn(move || {
            let (mut ok, mut failures, mut pids) = (0u64, Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let reply = std::os::unix::net::UnixStream::connect(&path).and_then(|s| {
                    s.set_read_timeout(Some(DEADLINE))?;
                    let mut conn = std::io::BufReader::new(s);
                    write!(
                        conn.get_mut(),
                        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
                    )?;
                    tableflip_tests::http1::read_reply(&mut conn)
                });
                match reply {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        let pid = reply_pid(&r.body);
                        last.store(pid, Ordering::Relaxed);
                        if !pids.contains(&pid) {
                            pids.push(pid);
                        }
                    }
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (ok, failures, pids)
        })
    };
    let mut current = svc.first_pid();
    for _ in 0..3 {
        current = upgrade_via_pid_file(&mut svc, &pid_file, current);
    }
    // The old generation is gone; the client's request in flight may have
    // been its last: stop once the newest generation has answered one.
    wait_until("the newest generation answers the client", || {
        last.load(Ordering::Relaxed) == current
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, pids) = client.join().expect("client thread");
    eprintln!(
        "axum on a Unix socket: 3 upgrades, {ok} requests, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(20)]
    );
    assert!(ok > 0);
    assert!(
        pids.contains(&current),
        "the last generation served: {pids:?}"
    );
    signal(current, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// What the HTTP/2 client thread reports.
#[derive(Debug)]
enum H2 {
    First(Result<String, String>),
    Slow(Result<(u16, String), String>),
    /// The connection ended (the server's GOAWAY, then close).
    Closed,
}

async fn get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> Result<(u16, String), String> {
    let req = Request::get(format!("http://test{path}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// HTTP/2: a stream open on the old generation when the upgrade happens
/// completes (GOAWAY lets open streams finish), then the server closes the
/// connection; a new connection reaches the new generation.
#[test]
fn http2_streams_in_flight_complete_then_goaway_closes() {
    let h = Harness::new("h2");
    let ctl = &h.ctl;
    let (mut svc, addr, pid_file) = start(ctl);
    let first = svc.first_pid();
    let (tx, rx) = channel();
    let client_addr = addr.clone();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let stream = tokio::net::TcpStream::connect(&client_addr)
                .await
                .expect("connect");
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("h2 handshake");
            let conn = tokio::spawn(conn);
            let _ = tx.send(H2::First(get(&mut sender, "/").await.map(|(_, b)| b)));
            let slow = get(&mut sender, "/slow?ms=1500").await;
            let _ = tx.send(H2::Slow(slow));
            // Ends, cleanly or with an error, once the server has sent
            // GOAWAY and closed: either way the connection is over.
            let _ = conn.await;
            let _ = tx.send(H2::Closed);
        });
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(H2::First(Ok(body))) => assert_eq!(reply_pid(&body), first),
        other => panic!("first HTTP/2 request: {other:?}"),
    }
    // The slow stream has reached the first generation: upgrade now.
    svc.wait_kind("slow-start", Some(first));
    let second = upgrade_via_pid_file(&mut svc, &pid_file, first);
    match rx.recv_timeout(DEADLINE) {
        Ok(H2::Slow(Ok((200, body)))) => assert_eq!(reply_pid(&body), first),
        other => panic!("the HTTP/2 stream in flight at the upgrade: {other:?}"),
    }
    match rx.recv_timeout(DEADLINE) {
        Ok(H2::Closed) => {}
        other => panic!("the old generation's HTTP/2 connection did not end: {other:?}"),
    }
    client.join().expect("client thread");
    assert_eq!(reply_pid(&tcp_http_get(&addr)), second);
    signal(second, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// `GET /` over HTTP/1.1 on a fresh connection; the body.
fn tcp_http_get(addr: &str) -> String {
    let mut c = tableflip_tests::http1::connect(addr).expect("connect");
    let reply = tableflip_tests::http1::request(&mut c, "/", false).expect("request");
    assert_eq!(reply.status, 200);
    reply.body
}

/// HTTP/1 without idle-connection handover (`hand_over_idle(false)`, or a
/// new generation that takes none): a connection the old generation
/// accepted just before the drain, whose first request comes only after
/// the drain started, is answered (with `Connection: close`), never closed
/// unread; an idle keep-alive connection is closed cleanly (EOF, no reset)
/// once it has been idle for the linger.
#[test]
fn fresh_connections_are_answered_and_idle_ones_closed_cleanly() {
    use std::io::{Read, Write};
    let h = Harness::new("fresh");
    let ctl = &h.ctl;
    let (mut svc, addr, pid_file) = start_with(ctl, &[("AX_HAND_OVER", "off")]);
    let first = svc.first_pid();
    let mut idle = tableflip_tests::http1::connect(&addr).expect("connect");
    let reply = tableflip_tests::http1::request(&mut idle, "/", true).expect("request");
    assert_eq!(reply_pid(&reply.body), first);
    assert!(!reply.close);
    let before = socket_count(first);
    let mut fresh = tableflip_tests::http1::connect(&addr).expect("connect");
    wait_until("the first generation accepted the fresh connection", || {
        socket_count(first) > before
    });
    signal(first, Signal::SIGHUP);
    // The PID file names the new generation a moment before the old one
    // has read its readiness: wait until the old one drains. (Its socket
    // count cannot tell: the upgrader keeps its own handle of the
    // listening socket through the drain.)
    svc.wait_kind("draining", Some(first));
    // The fresh connection's first request arrives during the drain.
    let reply = tableflip_tests::http1::request(&mut fresh, "/", true)
        .expect("the fresh connection is answered");
    assert_eq!(reply.status, 200);
    assert_eq!(reply_pid(&reply.body), first);
    assert!(
        reply.close,
        "a response written during the drain carries Connection: close"
    );
    // The idle keep-alive connection is closed by the old generation.
    let mut rest = Vec::new();
    let read = idle.get_mut().read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0)),
        "clean close, not a reset: {read:?} {rest:?}"
    );
    assert!(svc.wait_first().success());
    let second = pid_file_pid(&pid_file).expect("pid file");
    let mut c = tableflip_tests::http1::connect(&addr).expect("connect");
    c.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let reply = tableflip_tests::http1::read_reply(&mut c).expect("reply");
    assert_eq!(reply_pid(&reply.body), second);
    signal(second, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// What a WebSocket client saw on `/ws`: the handshake's response, then the
/// reply to one text message.
#[derive(Debug)]
struct WsExchange {
    status: u16,
    /// The handshake response's `Connection` header(s), joined.
    connection: String,
    reply: String,
}

/// Runs a real WebSocket client (tokio-tungstenite) on `stream`, an open
/// connection to `addr`: the handshake for `/ws`, one text message and
/// its reply, then a clean close. Each step has the [`DEADLINE`].
fn websocket_exchange(
    stream: std::net::TcpStream,
    addr: &str,
    text: &str,
) -> Result<WsExchange, String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        let stream =
            tokio::net::TcpStream::from_std(stream).map_err(|e| format!("from_std: {e}"))?;
        let (mut ws, response) = timeout(
            DEADLINE,
            tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream),
        )
        .await
        .map_err(|_| "no handshake response within the deadline".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
        let connection = response
            .headers()
            .get_all("connection")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        timeout(DEADLINE, ws.send(Message::text(text)))
            .await
            .map_err(|_| "cannot send within the deadline".to_owned())?
            .map_err(|e| format!("send: {e}"))?;
        let reply = loop {
            match timeout(DEADLINE, ws.next()).await {
                Err(_) => return Err("no reply within the deadline".to_owned()),
                Ok(None) => return Err("the connection ended before the reply".to_owned()),
                Ok(Some(Err(e))) => return Err(format!("receive: {e}")),
                Ok(Some(Ok(Message::Text(reply)))) => break reply.as_str().to_owned(),
                Ok(Some(Ok(_))) => {}
            }
        };
        // A clean close: ours, then the server's answer, then the end.
        timeout(DEADLINE, ws.close(None))
            .await
            .map_err(|_| "cannot close within the deadline".to_owned())?
            .map_err(|e| format!("close: {e}"))?;
        while let Some(next) = timeout(DEADLINE, ws.next())
            .await
            .map_err(|_| "the server did not close within the deadline".to_owned())?
        {
            if let Err(e) = next {
                return Err(format!("after close: {e}"));
            }
        }
        Ok(WsExchange {
            status: response.status().as_u16(),
            connection,
            reply,
        })
    })
}

/// The text message each WebSocket test sends.
const HELLO: &str = "hello during the drain";

/// Checks a WebSocket exchange run during `pid`'s drain: the handshake is
/// intact (a `101` with `Connection: upgrade`, no `close`), and the
/// message makes the round trip through the draining generation.
fn assert_websocket_served(exchange: Result<WsExchange, String>, pid: u32) {
    let exchange = exchange.unwrap_or_else(|e| panic!("WebSocket during the drain of {pid}: {e}"));
    assert_eq!(exchange.status, 101, "{exchange:?}");
    let connection = exchange.connection.to_ascii_lowercase();
    assert!(
        connection.contains("upgrade") && !connection.contains("close"),
        "the handshake's Connection header is left alone: {exchange:?}"
    );
    let (echo, served_by) = exchange
        .reply
        .split_once('\n')
        .unwrap_or_else(|| panic!("not `<text>\\npid <N>`: {exchange:?}"));
    assert_eq!(echo, HELLO, "{exchange:?}");
    assert_eq!(reply_pid(served_by), pid, "{exchange:?}");
}

/// After a WebSocket exchange with the first generation during its drain:
/// it exits cleanly (the drain waited for the WebSocket), and the new
/// generation serves alone, then stops on SIGTERM.
fn finish_after_websocket(svc: &mut Service, pid_file: &std::path::Path, addr: &str) {
    assert!(
        svc.wait_first().success(),
        "the old generation exits 0 once its WebSocket is closed"
    );
    let second = pid_file_pid(pid_file).expect("pid file");
    assert_eq!(reply_pid(&tcp_http_get(addr)), second);
    signal(second, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// The WebSocket tests' service: a linger far above anything a loaded
/// machine takes between two steps of a test, so the drain never closes
/// the idle keep-alive connection before its next request.
fn start_for_websockets(ctl: &Scratch) -> (Service, String, std::path::PathBuf) {
    // Without idle-connection handover: these tests are about the old
    // generation's drain (`http_handover.rs` has the handover's).
    start_with(ctl, &[("AX_LINGER_MS", "60000"), ("AX_HAND_OVER", "off")])
}

/// A keep-alive connection that served `GET /` before the upgrade sends a
/// WebSocket handshake while its generation drains: the `101` keeps its
/// `Connection: upgrade` (the drain's `Connection: close` is for responses
/// that go on speaking HTTP), and the WebSocket works, on the old
/// generation, until the client closes it.
#[test]
fn websocket_handshake_on_a_keep_alive_connection_during_the_drain() {
    let h = Harness::new("ws-ka");
    let ctl = &h.ctl;
    let (mut svc, addr, pid_file) = start_for_websockets(ctl);
    let first = svc.first_pid();
    let mut conn = tableflip_tests::http1::connect(&addr).expect("connect");
    let reply = tableflip_tests::http1::request(&mut conn, "/", true).expect("request");
    assert_eq!(reply.status, 200);
    assert_eq!(reply_pid(&reply.body), first);
    assert!(!reply.close, "{reply:?}");
    assert!(
        conn.buffer().is_empty(),
        "nothing follows the first response"
    );
    signal(first, Signal::SIGHUP);
    svc.wait_kind("draining", Some(first));
    assert_websocket_served(websocket_exchange(conn.into_inner(), &addr, HELLO), first);
    finish_after_websocket(&mut svc, &pid_file, &addr);
}

/// A connection the old generation accepted just before the drain, whose
/// first request is a WebSocket handshake sent during the drain: the
/// handshake succeeds and the WebSocket works.
#[test]
fn websocket_handshake_as_the_first_request_during_the_drain() {
    let h = Harness::new("ws-fresh");
    let ctl = &h.ctl;
    let (mut svc, addr, pid_file) = start_for_websockets(ctl);
    let first = svc.first_pid();
    let before = socket_count(first);
    let fresh = std::net::TcpStream::connect(&addr).expect("connect");
    wait_until("the first generation accepted the fresh connection", || {
        socket_count(first) > before
    });
    signal(first, Signal::SIGHUP);
    svc.wait_kind("draining", Some(first));
    assert_websocket_served(websocket_exchange(fresh, &addr, HELLO), first);
    finish_after_websocket(&mut svc, &pid_file, &addr);
}

/// `/ws-live`, the WebSocket that watches the `Drain` handle every request
/// carries: a client exchanges a message with the first generation; at
/// the upgrade it receives a close frame 1001 ("going away"); the old
/// generation then exits at once (its drain does not wait for the drain
/// timeout); the client reconnects, and the new generation answers.
#[test]
fn live_websocket_is_closed_with_1001_at_the_drain_and_reconnects_to_the_new_generation() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let h = Harness::new("ws-live");
    let ctl = &h.ctl;
    let (mut svc, addr, pid_file) = start(ctl);
    let first = svc.first_pid();
    let url = format!("ws://{addr}/ws-live");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // One text message, its reply's PID.
    async fn exchange<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> u32
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        timeout(DEADLINE, ws.send(Message::text(text)))
            .await
            .expect("send within the deadline")
            .expect("send");
        loop {
            match timeout(DEADLINE, ws.next()).await {
                Ok(Some(Ok(Message::Text(reply)))) => {
                    let (echo, pid) = reply.as_str().split_once('\n').expect("`<text>\\npid <N>`");
                    assert_eq!(echo, text);
                    return reply_pid(pid);
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no reply to {text:?}: {other:?}"),
            }
        }
    }
    let mut ws = rt.block_on(async {
        let (mut ws, _) = timeout(DEADLINE, tokio_tungstenite::connect_async(&url))
            .await
            .expect("handshake within the deadline")
            .expect("handshake");
        assert_eq!(exchange(&mut ws, "before").await, first);
        ws
    });
    signal(first, Signal::SIGHUP);
    let close = rt.block_on(async {
        match timeout(DEADLINE, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => frame,
            Ok(Some(Ok(other))) => panic!("before the close frame: {other:?}"),
            other => panic!("no close frame at the drain: {other:?}"),
        }
    });
    let frame = close.expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    assert_eq!(frame.reason.as_str(), "going away");
    // The WebSocket waits for our answering close (tungstenite sends it
    // when the stream is next polled): still open when the server stopped
    // accepting, it is the connection handed to the drain.
    let served = svc.wait_for("the TCP server's served event", |e| {
        e.pid == first && e.kind == "served" && e.get("listener") == "tcp"
    });
    assert_eq!(served.num::<u64>("accepted"), 1, "{}", served.line);
    assert_eq!(served.num::<usize>("handed_to_drain"), 1, "{}", served.line);
    rt.block_on(async {
        // Our answering close goes; the server then ends the connection.
        while let Ok(Some(Ok(_))) = timeout(DEADLINE, ws.next()).await {}
    });
    let closed_at = Instant::now();
    assert!(svc.wait_first().success(), "the old generation exits 0");
    let exit_after = closed_at.elapsed();
    // The drain timeout is 20 s: the drain ended with the WebSocket.
    assert!(
        exit_after < Duration::from_secs(10),
        "the old generation exited {exit_after:?} after the close"
    );
    let second = pid_file_pid(&pid_file).expect("pid file");
    assert_ne!(second, first);
    rt.block_on(async {
        let (mut ws, _) = timeout(DEADLINE, tokio_tungstenite::connect_async(&url))
            .await
            .expect("reconnect within the deadline")
            .expect("reconnect");
        assert_eq!(exchange(&mut ws, "after").await, second);
        timeout(DEADLINE, ws.close(None))
            .await
            .expect("close within the deadline")
            .expect("close");
    });
    eprintln!(
        "ws-live: the old generation exited {exit_after:?} after the WebSocket closed (1001)"
    );
    signal(second, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// What one WebSocket load client saw.
#[derive(Debug, Default)]
struct WsTally {
    /// Messages answered.
    answered: u64,
    /// Clean closes with code 1001 ("going away") from a draining
    /// generation, each followed by a reconnection.
    going_away: u64,
    /// Everything else: a refused or failed connection, a reset, a close
    /// without 1001, a message that got no answer.
    failures: Vec<String>,
}

/// A WebSocket client on `/ws-live` until `stop`: sends numbered
/// messages, one at a time, each until it is answered; when the server
/// closes with 1001 it reconnects (to whichever generation accepts) and
/// sends the unanswered message again. `last_pid` is the PID that
/// answered last.
fn ws_load_client(
    addr: String,
    stop: Arc<AtomicBool>,
    last_pid: Arc<std::sync::atomic::AtomicU32>,
) -> WsTally {
    use futures_util::{SinkExt, StreamExt};
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let mut tally = WsTally::default();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tally.failures.push("no runtime".to_owned());
        return tally;
    };
    let url = format!("ws://{addr}/ws-live");
    rt.block_on(async {
        let mut n = 0u64;
        'connect: while !stop.load(Ordering::Relaxed) {
            let mut ws = match timeout(DEADLINE, tokio_tungstenite::connect_async(&url)).await {
                Ok(Ok((ws, _))) => ws,
                other => {
                    tally.failures.push(format!("connect: {other:?}"));
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let text = format!("message {n}");
                if let Err(e) = ws.send(Message::text(text.clone())).await {
                    tally.failures.push(format!("send {n}: {e}"));
                    return;
                }
                loop {
                    match timeout(DEADLINE, ws.next()).await {
                        Ok(Some(Ok(Message::Text(reply)))) => {
                            let Some((echo, pid)) = reply.as_str().split_once('\n') else {
                                tally.failures.push(format!("reply {reply:?}"));
                                return;
                            };
                            if echo != text {
                                tally.failures.push(format!("{echo:?} for {text:?}"));
                                return;
                            }
                            last_pid.store(reply_pid(pid), Ordering::Relaxed);
                            tally.answered += 1;
                            n += 1;
                            break;
                        }
                        Ok(Some(Ok(Message::Close(Some(frame)))))
                            if frame.code == CloseCode::Away =>
                        {
                            // The answering close, then the end; the
                            // unanswered message goes again on the next
                            // connection.
                            while let Ok(Some(Ok(_))) = timeout(DEADLINE, ws.next()).await {}
                            tally.going_away += 1;
                            continue 'connect;
                        }
                        Ok(Some(Ok(_))) => {}
                        other => {
                            tally.failures.push(format!("message {n}: {other:?}"));
                            return;
                        }
                    }
                }
            }
            let _ = timeout(DEADLINE, ws.close(None)).await;
        }
    });
    tally
}

/// WebSocket clients through upgrades: each live WebSocket is closed with
/// 1001 by its draining generation, its client reconnects to the new
/// generation and goes on; no connection fails, no message goes
/// unanswered, and each old generation exits as soon as its WebSockets
/// are closed.
#[test]
fn websockets_under_load_reconnect_cleanly_across_upgrades() {
    let h = Harness::new("ws-load");
    let (mut svc, addr, pid_file) = start(&h.ctl);
    let stop = Arc::new(AtomicBool::new(false));
    let pids: Vec<Arc<std::sync::atomic::AtomicU32>> = (0..4)
        .map(|_| Arc::new(std::sync::atomic::AtomicU32::new(0)))
        .collect();
    let clients: Vec<_> = pids
        .iter()
        .map(|pid| {
            let (addr, stop, pid) = (addr.clone(), Arc::clone(&stop), Arc::clone(pid));
            std::thread::spawn(move || ws_load_client(addr, stop, pid))
        })
        .collect();
    let mut current = svc.first_pid();
    let upgrades = 3;
    for _ in 0..upgrades {
        // Every client is being answered by the generation in charge.
        wait_until("every client is answered by the serving generation", || {
            pids.iter().all(|p| p.load(Ordering::Relaxed) == current)
        });
        current = upgrade_via_pid_file(&mut svc, &pid_file, current);
    }
    wait_until("every client is answered by the last generation", || {
        pids.iter().all(|p| p.load(Ordering::Relaxed) == current)
    });
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<WsTally> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    eprintln!("websockets: {upgrades} upgrades: {tallies:?}");
    for t in &tallies {
        assert!(t.failures.is_empty(), "{tallies:?}");
        assert_eq!(
            t.going_away, upgrades,
            "one 1001 close per upgrade: {tallies:?}"
        );
        assert!(t.answered > 0);
    }
    signal(current, Signal::SIGTERM);
    svc.wait_all_exited();
}
