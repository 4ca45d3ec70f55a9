//! The benchmark's tableflip service for the tls section: the HTTP
//! contract on `BENCH_ADDR` as `bench-tableflip` serves it, and over HTTPS
//! on `BENCH_TLS_ADDR`. A binary of its own so that `bench-tableflip`, like
//! the other libraries' services, carries no TLS stack (rustls and ring
//! doubled its dynamic relocations and its start-up cost).

use tableflip::{Context, ListenSpec, listener};
use tokio::net::TcpListener;

/// The HTTP endpoint, handed from each generation to the next.
#[listener("tcp", "127.0.0.1:8080", env = "BENCH_ADDR")]
static HTTP: TcpListener;

#[tableflip::main(options = tableflip_bench::tableflip_options, drain_timeout = "30s", upgrade_timeout = "30s")]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tableflip_bench::serve_tableflip(&cx, HTTP.take()?);
    tls(&cx)
}

/// `BENCH_TLS_ADDR`, `BENCH_TLS_CERT`, `BENCH_TLS_KEY` (PEM files): the
/// same contract over HTTPS on that address (opened here, not declared,
/// so that the other sections bind nothing more), with the session-ticket
/// keys `BENCH_TLS_TICKETS` says: `handover` (`TicketKeys::handed_over`)
/// or `fresh` (keys of this process alone, as rustls' own ticketer).
fn tls(cx: &Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tableflip::http::tls::rustls::pki_types::pem::PemObject;
    use tableflip::http::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tableflip::http::tls::{TicketKeys, TlsListener, rustls};
    let (Some(addr), Some(cert), Some(key)) = (
        std::env::var_os("BENCH_TLS_ADDR"),
        std::env::var_os("BENCH_TLS_CERT"),
        std::env::var_os("BENCH_TLS_KEY"),
    ) else {
        return Ok(());
    };
    let certs = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.ticketer = match std::env::var("BENCH_TLS_TICKETS").as_deref() {
        Ok("handover") => TicketKeys::handed_over(cx.upgrader())?,
        _ => std::sync::Arc::new(TicketKeys::new(tableflip::http::tls::DEFAULT_ROTATION)?),
    };
    let addr = addr.to_string_lossy().into_owned();
    let listener: TcpListener = cx
        .upgrader()
        .listen_with(&ListenSpec::new("HTTPS", "tcp", addr))?;
    tableflip_bench::serve_tableflip(cx, TlsListener::new(listener, std::sync::Arc::new(config)));
    Ok(())
}
