//! `tableflip::http::tls::TlsListener` through upgrades: real rustls
//! clients (HTTP/1.1 over a blocking `StreamOwned`, HTTP/2 negotiated by
//! ALPN with hyper's client) against the `axum_svc` test service serving
//! HTTPS with a self-signed certificate made for the test (rcgen).

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use tableflip_tests::http1::{Reply, Tally, read_reply, record};
use tableflip_tests::*;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

const AXUM: &str = env!("CARGO_BIN_EXE_axum_svc");

/// The name the test certificate is for.
const HOST: &str = "localhost";

/// A self-signed certificate for [`HOST`], written as PEM files into the
/// scratch directory; the client configuration that trusts it.
struct Pki {
    cert: PathBuf,
    key: PathBuf,
    roots: Arc<rustls::RootCertStore>,
}

impl Pki {
    fn new(ctl: &Scratch) -> Pki {
        let made = rcgen::generate_simple_self_signed(vec![HOST.to_owned()]).expect("rcgen");
        let (cert, key) = (ctl.path().join("cert.pem"), ctl.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).expect("write cert.pem");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key.pem");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(made.cert.der().clone())
            .expect("trust the test certificate");
        Pki {
            cert,
            key,
            roots: Arc::new(roots),
        }
    }

    /// A client configuration offering `alpn` (ring, named: the build may
    /// have another provider too).
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(Arc::clone(&self.roots))
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(HOST).expect("server name")
}

/// The running service, serving HTTPS at `tls_addr`.
struct Https {
    svc: Service,
    tls_addr: String,
    pid_file: PathBuf,
}

fn start(ctl: &Scratch, pki: &Pki, envs: &[(&str, &str)]) -> Https {
    let addr = format!("127.0.0.1:{}", free_port());
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let pid_file = ctl.path().join("axum.pid");
    let mut cmd = Command::new(AXUM);
    cmd.env("TABLEFLIP_MODE", "replace")
        .env("AX_ADDR", &addr)
        .env("AX_TLS_ADDR", &tls_addr)
        .env("AX_TLS_CERT", &pki.cert)
        .env("AX_TLS_KEY", &pki.key)
        // Declared, so bound even when not served: in the scratch
        // directory, not the shared default path.
        .env("AX_UNIX", ctl.path().join("http.sock"))
        .env("PID_FILE", &pid_file)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied());
    let svc = spawn_ready(cmd, &pid_file);
    Https {
        svc,
        tls_addr,
        pid_file,
    }
}

/// A blocking HTTP/1.1-over-TLS connection.
type TlsConn = BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// Connects to `addr` and completes the TLS handshake (offering
/// `http/1.1` by ALPN, which the server must choose).
fn tls_connect(addr: &str, config: &Arc<rustls::ClientConfig>) -> std::io::Result<TlsConn> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(DEADLINE))?;
    tcp.set_write_timeout(Some(DEADLINE))?;
    tcp.set_nodelay(true)?;
    let conn = rustls::ClientConnection::new(Arc::clone(config), server_name())
        .map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    if stream.conn.alpn_protocol() != Some(b"http/1.1") {
        return Err(std::io::Error::other(format!(
            "ALPN: {:?}, expected http/1.1",
            stream.conn.alpn_protocol()
        )));
    }
    Ok(BufReader::new(stream))
}

/// `GET path` on an HTTP/1.1-over-TLS connection.
fn tls_request(conn: &mut TlsConn, path: &str, keep_alive: bool) -> std::io::Result<Reply> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let stream = conn.get_mut();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: {connection}\r\n\r\n"
    )?;
    stream.flush()?;
    read_reply(conn)
}

/// Reads what follows on `conn` until the end: `Ok(0)` only if the server
/// ended the TLS session cleanly (close_notify; rustls reports a bare TCP
/// close as `UnexpectedEof`).
fn read_to_end(conn: &mut TlsConn) -> std::io::Result<usize> {
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)
}

/// What the load's client threads share: the stop flag, and the number
/// of requests made so far (the test upgrades once the load has made
/// progress on the current generation).
#[derive(Debug, Clone, Default)]
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl Load {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Counts a request made (called after each one).
    fn made(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until `n` more requests have been made (by any client).
    fn wait_for_requests(&self, n: u64) {
        let target = self.requests.load(Ordering::Relaxed) + n;
        wait_until("the clients make progress", || {
            self.requests.load(Ordering::Relaxed) >= target
        });
    }
}

/// HTTP/1.1 over TLS on one connection for as long as the server keeps it
/// open (a new one after `Connection: close`).
fn keep_alive_client(addr: String, config: Arc<rustls::ClientConfig>, load: Load) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<TlsConn> = None;
    while !load.stopped() {
        let started = Instant::now();
        let mut c = match conn.take() {
            Some(c) => c,
            None => match tls_connect(&addr, &config) {
                Ok(c) => c,
                Err(e) => {
                    tally.failures.push(format!("TLS keep-alive connect: {e}"));
                    continue;
                }
            },
        };
        let result = tls_request(&mut c, "/", true);
        let keep = record(&mut tally, started, result, "TLS keep-alive request");
        load.made();
        if keep {
            conn = Some(c);
        } else if let Err(e) = read_to_end(&mut c) {
            // After `Connection: close`, the server ends the session with
            // close_notify: anything else is a failure of the drain.
            tally.failures.push(format!("TLS keep-alive close: {e}"));
        }
    }
    tally
}

/// One HTTP/1.1-over-TLS connection (handshake included) per request.
fn per_request_client(addr: String, config: Arc<rustls::ClientConfig>, load: Load) -> Tally {
    let mut tally = Tally::default();
    while !load.stopped() {
        let started = Instant::now();
        let result = tls_connect(&addr, &config).and_then(|mut c| {
            let reply = tls_request(&mut c, "/", false)?;
            read_to_end(&mut c)?;
            Ok(reply)
        });
        record(&mut tally, started, result, "TLS per-request request");
        load.made();
    }
    tally
}

/// What the HTTP/2 client saw besides its [`Tally`].
#[derive(Debug, Default)]
struct H2Tally {
    tally: Tally,
    /// Connections made (each after the previous one's GOAWAY).
    connections: u64,
    /// Requests the client did not send because the connection was
    /// closing (GOAWAY): tried again on a new connection, as HTTP/2 allows
    /// for a request the server never saw.
    not_sent: u64,
}

/// HTTP/2 over TLS (ALPN `h2`), hyper's client: requests one after the
/// other on a connection until the server's GOAWAY, then a new
/// connection.
fn h2_client(addr: String, config: Arc<rustls::ClientConfig>, load: Load) -> H2Tally {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut out = H2Tally::default();
        while !load.stopped() {
            let connected = async {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let tls = connector.connect(server_name(), tcp).await?;
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                if alpn.as_deref() != Some(b"h2") {
                    return Err(std::io::Error::other(format!(
                        "ALPN: {alpn:?}, expected h2"
                    )));
                }
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(std::io::Error::other)
            };
            let (mut sender, conn) = match tokio::time::timeout(DEADLINE, connected).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    out.tally.failures.push(format!("h2 connect: {e}"));
                    continue;
                }
                Err(_) => {
                    out.tally.failures.push("h2 connect: timed out".to_owned());
                    continue;
                }
            };
            out.connections += 1;
            let conn = tokio::spawn(conn);
            while !load.stopped() {
                if sender.ready().await.is_err() {
                    break; // closing: GOAWAY received
                }
                let started = Instant::now();
                let req = Request::get(format!("https://{HOST}/"))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let response = match sender.try_send_request(req).await {
                    Ok(response) => response,
                    Err(mut e) => {
                        if e.take_message().is_some() {
                            out.not_sent += 1;
                        } else {
                            out.tally
                                .failures
                                .push(format!("h2 request: {}", e.error()));
                        }
                        break;
                    }
                };
                let status = response.status().as_u16();
                let body = tokio::time::timeout(DEADLINE, response.into_body().collect()).await;
                let result = match body {
                    Ok(Ok(body)) => Ok(Reply {
                        status,
                        close: false,
                        body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                    }),
                    Ok(Err(e)) => Err(std::io::Error::other(e)),
                    Err(_) => Err(std::io::Error::other("body timed out")),
                };
                record(&mut out.tally, started, result, "h2 request");
                load.made();
            }
            drop(sender);
            match tokio::time::timeout(DEADLINE, conn).await {
                Ok(Ok(Ok(()))) => {}
                // A connection still open when the test stops: dropped.
                _ if load.stopped() => {}
                other => out
                    .tally
                    .failures
                    .push(format!("h2 connection ended badly: {other:?}")),
            }
        }
        out
    })
}

fn merge(total: &mut Tally, t: Tally) {
    total.ok += t.ok;
    total.failures.extend(t.failures);
    for (pid, n) in t.by_pid {
        *total.by_pid.entry(pid).or_default() += n;
    }
}

/// How many requests the load makes (at least) on each generation before
/// the test upgrades it.
const REQUESTS_PER_GENERATION: u64 = 300;

/// HTTPS under load (HTTP/1.1 keep-alive and connection-per-request
/// clients, HTTP/2 over ALPN) through several upgrades: no request fails,
/// every connection the server ends gets close_notify, and each
/// generation serves.
#[test]
fn https_under_load_fails_no_request_across_upgrades() {
    let h = Harness::new("tls-load");
    let ctl = &h.ctl;
    let pki = Pki::new(ctl);
    let Https {
        mut svc,
        tls_addr,
        pid_file,
        ..
    } = start(ctl, &pki, &[]);
    let load = Load::default();
    let h1 = pki.client(&[b"http/1.1"]);
    let h1_clients: Vec<_> = (0..4)
        .map(|i| {
            let (addr, config, load) = (tls_addr.clone(), Arc::clone(&h1), load.clone());
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    keep_alive_client(addr, config, load)
                } else {
                    per_request_client(addr, config, load)
                }
            })
        })
        .collect();
    let h2 = {
        let (addr, config, load) = (tls_addr.clone(), pki.client(&[b"h2"]), load.clone());
        std::thread::spawn(move || h2_client(addr, config, load))
    };
    let mut generations = vec![svc.first_pid()];
    let upgrades = 4;
    for _ in 0..upgrades {
        load.wait_for_requests(REQUESTS_PER_GENERATION);
        let current = *generations.last().expect("a generation");
        generations.push(upgrade_via_pid_file(&mut svc, &pid_file, current));
    }
    load.wait_for_requests(REQUESTS_PER_GENERATION);
    // Some load on the last generation alone.
    let last = *generations.last().expect("a generation");
    let mut check = tls_connect(&tls_addr, &h1).expect("connect to the last generation");
    let reply = tls_request(&mut check, "/", false).expect("request");
    assert_eq!(reply_pid(&reply.body), last);
    load.stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for c in h1_clients {
        merge(&mut total, c.join().expect("client thread"));
    }
    let h2 = h2.join().expect("h2 client thread");
    let h2_ok = h2.tally.ok;
    merge(&mut total, h2.tally);
    eprintln!(
        "https: {upgrades} upgrades, {} requests ({h2_ok} over HTTP/2 on {} connections, \
         {} not sent on a closing one and sent again), {} failed; by pid: {:?}",
        total.ok,
        h2.connections,
        h2.not_sent,
        total.failures.len(),
        total.by_pid
    );
    assert!(
        total.failures.is_empty(),
        "{:?}",
        &total.failures[..total.failures.len().min(20)]
    );
    assert!(h2_ok > 0, "HTTP/2 requests were served");
    let served_by: Vec<_> = generations
        .iter()
        .filter(|pid| total.by_pid.contains_key(pid))
        .collect();
    assert!(
        served_by.len() > 1,
        "more than one generation served: {:?} of {generations:?}",
        total.by_pid
    );
    signal(last, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// The first bytes a rustls client sends: its ClientHello (it then waits
/// for the server), and the connection state to go on with.
fn client_hello(config: &Arc<rustls::ClientConfig>) -> (rustls::ClientConnection, Vec<u8>) {
    let mut conn =
        rustls::ClientConnection::new(Arc::clone(config), server_name()).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("ClientHello");
    }
    (conn, hello)
}

/// Whether the server has ended a raw connection (EOF or reset).
fn ended_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            // A TLS alert, say: read on.
            Ok(_) => {}
        }
    }
}

/// The handshake timeout of this test's service (the server's
/// first-request timeout): long enough for a handshake begun before an
/// upgrade to complete during the drain on a loaded machine, far below
/// the drain timeout (20 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(8);

/// During the drain: connections stuck in their TLS handshake (silent, or
/// half a ClientHello) hold the drain only until the handshake timeout,
/// not the drain timeout; a handshake begun before the drain and completed
/// during it is served (with `Connection: close`); an idle keep-alive TLS
/// connection is closed with close_notify; `Served` counts them all.
#[test]
fn handshakes_stuck_or_completed_during_the_drain() {
    let h = Harness::new("tls-hs");
    let ctl = &h.ctl;
    let pki = Pki::new(ctl);
    let timeout_ms = HANDSHAKE_TIMEOUT.as_millis().to_string();
    let Https {
        mut svc,
        tls_addr,
        pid_file,
        ..
    } = start(
        ctl,
        &pki,
        &[("AX_FIRST_REQUEST_TIMEOUT_MS", timeout_ms.as_str())],
    );
    let first = svc.first_pid();
    let config = pki.client(&[b"http/1.1"]);
    let before = socket_count(first);
    // An idle keep-alive connection that has made a request.
    let mut idle = tls_connect(&tls_addr, &config).expect("connect");
    let reply = tls_request(&mut idle, "/", true).expect("request");
    assert_eq!(reply_pid(&reply.body), first);
    assert!(!reply.close, "{reply:?}");
    // A connection that sends nothing.
    let mut silent = TcpStream::connect(&tls_addr).expect("connect");
    silent.set_read_timeout(Some(DEADLINE)).expect("timeout");
    // One that sends half its ClientHello, and no more.
    let (_stalled_conn, hello) = client_hello(&config);
    let mut stalled = TcpStream::connect(&tls_addr).expect("connect");
    stalled.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stalled
        .write_all(&hello[..hello.len() / 2])
        .expect("half a ClientHello");
    // One that sends half its ClientHello now, the rest during the drain.
    let (late_conn, hello) = client_hello(&config);
    let mut late = TcpStream::connect(&tls_addr).expect("connect");
    late.set_read_timeout(Some(DEADLINE)).expect("timeout");
    late.write_all(&hello[..hello.len() / 2])
        .expect("half a ClientHello");
    wait_until("the first generation accepted the four connections", || {
        socket_count(first) >= before + 4
    });
    signal(first, Signal::SIGHUP);
    svc.wait_kind("draining", Some(first));
    let drain_started = Instant::now();
    late.write_all(&hello[hello.len() / 2..])
        .expect("the rest of the ClientHello");
    let mut late = BufReader::new(rustls::StreamOwned::new(late_conn, late));
    let reply = tls_request(&mut late, "/", true)
        .expect("the handshake completed during the drain is served");
    assert_eq!(reply.status, 200);
    assert_eq!(reply_pid(&reply.body), first);
    assert!(reply.close, "Connection: close during the drain: {reply:?}");
    assert!(
        matches!(read_to_end(&mut late), Ok(0)),
        "the server ends the session with close_notify"
    );
    // The idle keep-alive connection: closed after the linger, cleanly.
    let end = read_to_end(&mut idle);
    assert!(
        matches!(end, Ok(0)),
        "idle TLS connection closed with close_notify: {end:?}"
    );
    // The stuck handshakes: closed by the server, at the handshake timeout.
    assert!(ended_by_server(&mut silent), "silent connection closed");
    assert!(ended_by_server(&mut stalled), "stalled handshake closed");
    assert!(svc.wait_first().success(), "the old generation exits 0");
    let drained_in = drain_started.elapsed();
    eprintln!(
        "drain with two stuck handshakes: {drained_in:?} (handshake timeout {HANDSHAKE_TIMEOUT:?}, drain timeout 20 s)"
    );
    assert!(
        drained_in < Duration::from_secs(15),
        "the drain ended at the handshake timeout, not the drain timeout: {drained_in:?}"
    );
    let served = svc.wait_for("the TLS server's served event", |e| {
        e.pid == first && e.kind == "served" && e.get("listener") == "tls"
    });
    assert_eq!(served.num::<u64>("accepted"), 4, "{}", served.line);
    // The three handshakes were open; the idle connection too, unless it
    // had been idle for the linger (2 s) by the time the drain started
    // (a slow upgrade): then its close races the count.
    let handed = served.num::<usize>("handed_to_drain");
    assert!((3..=4).contains(&handed), "{}", served.line);
    // The new generation serves HTTPS.
    let second = pid_file_pid(&pid_file).expect("pid file");
    let mut c = tls_connect(&tls_addr, &config).expect("connect");
    let reply = tls_request(&mut c, "/", false).expect("request");
    assert_eq!(reply_pid(&reply.body), second);
    signal(second, Signal::SIGTERM);
    svc.wait_all_exited();
}

/// Connects to `addr` with `config` (whose session cache holds the tickets
/// of earlier connections), makes one request, and returns how the
/// handshake went and who answered.
fn resume_once(addr: &str, config: &Arc<rustls::ClientConfig>) -> (rustls::HandshakeKind, u32) {
    let mut conn = tls_connect(addr, config).unwrap_or_else(|e| panic!("connect: {e}"));
    let kind = conn
        .get_ref()
        .conn
        .handshake_kind()
        .unwrap_or_else(|| panic!("no handshake kind after the handshake"));
    let reply = tls_request(&mut conn, "/", false).unwrap_or_else(|e| panic!("request: {e}"));
    assert_eq!(reply.status, 200, "{reply:?}");
    (kind, reply_pid(&reply.body))
}

/// Reconnects after each of `upgrades` upgrades; returns the handshake
/// kinds seen after them, and checks that each was answered by the new
/// generation.
fn handshakes_across_upgrades(tickets: &str, upgrades: usize) -> Vec<rustls::HandshakeKind> {
    let h = Harness::new(&format!("tls-tickets-{tickets}"));
    let pki = Pki::new(&h.ctl);
    let mut https = start(&h.ctl, &pki, &[("AX_TLS_TICKETS", tickets)]);
    let config = pki.client(&[b"http/1.1"]);
    let mut serving = https.svc.first_pid();
    let (first, pid) = resume_once(&https.tls_addr, &config);
    assert_eq!(first, rustls::HandshakeKind::Full);
    assert_eq!(pid, serving);
    // The same generation: resumed, whatever the keys.
    let (again, _) = resume_once(&https.tls_addr, &config);
    assert_eq!(again, rustls::HandshakeKind::Resumed);
    let mut kinds = Vec::new();
    for _ in 0..upgrades {
        let next = upgrade_via_pid_file(&mut https.svc, &https.pid_file, serving);
        let (kind, pid) = resume_once(&https.tls_addr, &config);
        assert_eq!(pid, next, "answered by the new generation");
        kinds.push(kind);
        serving = next;
    }
    signal(serving, Signal::SIGTERM);
    https.svc.wait_all_exited();
    kinds
}

/// The session-ticket keys handed over (`TicketKeys::handed_over`): a
/// client that resumed before an upgrade resumes after it, with the new
/// generation, at every upgrade.
#[test]
fn tls_sessions_resume_across_upgrades_with_the_ticket_keys_handed_over() {
    let kinds = handshakes_across_upgrades("handover", 3);
    assert!(
        kinds.iter().all(|k| *k == rustls::HandshakeKind::Resumed),
        "{kinds:?}"
    );
}

/// Without the handover (keys of each process alone), the same client
/// does a full handshake after each upgrade: what the handover saves, and
/// proof that the test above can fail.
#[test]
fn tls_sessions_do_not_resume_across_upgrades_with_keys_of_one_process() {
    let kinds = handshakes_across_upgrades("fresh", 2);
    assert!(
        kinds.iter().all(|k| *k != rustls::HandshakeKind::Resumed),
        "{kinds:?}"
    );
}
