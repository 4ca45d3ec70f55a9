//! TLS session resumption across upgrades, with the session-ticket keys
//! handed over (`tableflip::http::tls::TicketKeys::handed_over`) and
//! without (keys of each process alone, which is what rustls' own ticketer
//! gives): the share of reconnecting clients that resume, and the CPU time
//! of the new generation in its first second, under a reconnect storm
//! right after each upgrade.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::Error;
use crate::procs::{Kind, Lab, Service, free_port};
use crate::scenarios::Config;

/// The name the run's certificate is for.
const HOST: &str = "localhost";

/// The tableflip service with HTTPS (`bench/src/bin/bench_tableflip_tls.rs`).
pub(crate) const TLS_BINARY: &str = "bench-tableflip-tls";

/// What one ticket-key mode measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct TlsResult {
    /// The certificate's key type.
    pub(crate) key: String,
    /// `handover` or `fresh`.
    pub(crate) tickets: String,
    pub(crate) upgrades: usize,
    /// Clients, each with its own session cache, all reconnecting after
    /// each upgrade.
    pub(crate) clients: usize,
    /// Reconnections after upgrades, and how many of them resumed.
    pub(crate) reconnects: usize,
    pub(crate) resumed: usize,
    /// Failed reconnections (connect, handshake or request).
    pub(crate) failed: usize,
    /// CPU time of the new generation from its readiness to one second
    /// after the storm began, per upgrade, ms.
    pub(crate) first_second_cpu_ms: Vec<f64>,
    /// How long the storm took (every client reconnected and answered),
    /// per upgrade, ms.
    pub(crate) storm_ms: Vec<f64>,
}

/// CPU time used so far by every thread of `pid`, from
/// `/proc/<pid>/task/*/schedstat` (its first field: nanoseconds on a CPU;
/// the clock-tick counts of `stat` are too coarse for one second).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The run's certificate, as PEM files in `dir`, and client settings
/// trusting it.
struct Pki {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    roots: Arc<rustls::RootCertStore>,
}

/// The certificate's key: what a full handshake costs the server is
/// mostly its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    /// ECDSA P-256, made by rcgen.
    EcdsaP256,
    /// RSA 2048, the key made by `openssl genpkey` (ring cannot make RSA
    /// keys), the certificate by rcgen; left
    /// out with a message when there is no `openssl`.
    Rsa2048,
}

impl KeyType {
    fn name(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ECDSA P-256",
            KeyType::Rsa2048 => "RSA 2048",
        }
    }
}

impl Pki {
    fn new(dir: &std::path::Path, key_type: KeyType) -> Result<Pki, Error> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let write = |path: &std::path::Path, pem: String| {
            std::fs::write(path, pem)
                .map_err(|e| Error::msg(format!("cannot write {}: {e}", path.display())))
        };
        match key_type {
            KeyType::EcdsaP256 => {
                let made = rcgen::generate_simple_self_signed(vec![HOST.to_owned()])
                    .map_err(|e| Error::msg(format!("cannot make the test certificate: {e}")))?;
                write(&cert, made.cert.pem())?;
                write(&key, made.signing_key.serialize_pem())?;
            }
            KeyType::Rsa2048 => {
                // The driver's reaper thread reaps every child (it is a
                // subreaper), so openssl's exit status may never reach this
                // thread: its end is its output closing, and its success
                // is the certificate read below.
                let mut child = std::process::Command::new("openssl")
                    .args([
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        "rsa_keygen_bits:2048",
                    ])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| Error::msg(format!("cannot run openssl: {e}")))?;
                let mut pem = String::new();
                if let Some(mut out) = child.stdout.take() {
                    let _ = out.read_to_string(&mut pem);
                }
                let key_pair = rcgen::KeyPair::from_pem(&pem)
                    .map_err(|e| Error::msg(format!("openssl genpkey gave no RSA key: {e}")))?;
                let made = rcgen::CertificateParams::new(vec![HOST.to_owned()])
                    .and_then(|p| p.self_signed(&key_pair))
                    .map_err(|e| Error::msg(format!("cannot make the RSA certificate: {e}")))?;
                write(&cert, made.pem())?;
                write(&key, pem)?;
            }
        }
        let der = CertificateDer::from_pem_file(&cert)
            .map_err(|e| Error::msg(format!("cannot read {}: {e}", cert.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(der)
            .map_err(|e| Error::msg(format!("cannot trust the test certificate: {e}")))?;
        Ok(Pki {
            cert,
            key,
            roots: Arc::new(roots),
        })
    }

    /// A client with a session cache of its own (what one browser or one
    /// service's connection pool has).
    fn client(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::msg(format!("TLS versions: {e}")))?
        .with_root_certificates(Arc::clone(&self.roots))
        .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// One connection, one `GET /` with `Connection: close`: whether the
/// handshake resumed, and the PID that answered.
fn visit(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Result<(bool, u32), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| tcp.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| format!("timeouts: {e}"))?;
    let name = ServerName::try_from(HOST).map_err(|e| format!("server name: {e}"))?;
    let conn = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| format!("client: {e}"))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| format!("request: {e}"))?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|e| format!("reply: {e}"))?;
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(format!("reply: {reply:?}"));
    }
    let pid = reply
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no pid in {reply:?}"))?;
    let resumed = stream.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((resumed, pid))
}

/// Each ticket-key mode in turn: the service over HTTPS, `clients`
/// clients visit it once (a full handshake: each gets tickets), then
/// `upgrades` times: an upgrade, and at once every client reconnects
/// (each in a thread of its own, all started together).
pub(crate) fn tls(lab: &Lab, cfg: &Config) -> Result<Vec<TlsResult>, Error> {
    let mut results = Vec::new();
    let mut key_types = vec![KeyType::EcdsaP256];
    let openssl = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("openssl").is_file()));
    if openssl {
        key_types.push(KeyType::Rsa2048);
    } else {
        eprintln!("  tls: no openssl: RSA 2048 left out (ECDSA P-256 only)");
    }
    for key_type in key_types {
        for tickets in ["handover", "fresh"] {
            let dir = lab.next_dir(Kind::Tableflip)?;
            let pki = Pki::new(&dir, key_type)?;
            let tls_addr = crate::scenarios::local(free_port()?);
            let env = [
                ("BENCH_TLS_ADDR", tls_addr.to_string()),
                ("BENCH_TLS_CERT", pki.cert.display().to_string()),
                ("BENCH_TLS_KEY", pki.key.display().to_string()),
                ("BENCH_TLS_TICKETS", tickets.to_owned()),
            ];
            let (mut svc, _) = Service::start_binary(
                lab,
                Kind::Tableflip,
                TLS_BINARY,
                crate::scenarios::local(free_port()?),
                1,
                None,
                &env,
            )?;
            let clients: Vec<Arc<rustls::ClientConfig>> = (0..cfg.tls_clients)
                .map(|_| pki.client())
                .collect::<Result<_, _>>()?;
            for c in &clients {
                visit(tls_addr, c)
                    .map_err(|e| Error::msg(format!("tls ({tickets}): first visit: {e}")))?;
            }
            let mut r = TlsResult {
                key: key_type.name().to_owned(),
                tickets: tickets.to_owned(),
                upgrades: cfg.tls_upgrades,
                clients: clients.len(),
                ..TlsResult::default()
            };
            for done in 1..=cfg.tls_upgrades {
                svc.upgrade()?;
                let pid = svc.pid;
                let cpu_before = cpu_ns(pid);
                let started = Instant::now();
                let storm: Vec<_> = clients
                    .iter()
                    .map(|c| {
                        let c = Arc::clone(c);
                        std::thread::spawn(move || visit(tls_addr, &c))
                    })
                    .collect();
                for visit in storm {
                    r.reconnects += 1;
                    match visit.join() {
                        Ok(Ok((resumed, by))) if by == pid => r.resumed += usize::from(resumed),
                        _ => r.failed += 1,
                    }
                }
                r.storm_ms.push(started.elapsed().as_secs_f64() * 1e3);
                // The window is the generation's first second under the storm.
                if let Some(left) = Duration::from_secs(1).checked_sub(started.elapsed()) {
                    std::thread::sleep(left);
                }
                #[allow(clippy::cast_precision_loss)]
                r.first_second_cpu_ms
                    .push(cpu_ns(pid).saturating_sub(cpu_before) as f64 / 1e6);
                eprint!(
                    "\r  tls ({}, {tickets}): {done}/{} upgrades",
                    key_type.name(),
                    cfg.tls_upgrades
                );
            }
            eprintln!();
            svc.stop(Duration::from_secs(10))?;
            results.push(r);
        }
    }
    Ok(results)
}
