//! HTTPS: [`TlsListener`] puts TLS (rustls 0.23, through tokio-rustls) in
//! front of any [`Accept`] listener (feature `tls`).
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use tableflip::http::tls::rustls::ServerConfig;
//! use tableflip::http::tls::rustls::pki_types::pem::PemObject;
//! use tableflip::http::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
//! use tableflip::http::tls::TlsListener;
//! use tableflip::{Context, listener};
//!
//! #[listener("tcp", "127.0.0.1:8443", env = "HTTPS_ADDR")]
//! static HTTPS: tokio::net::TcpListener;
//!
//! #[tableflip::main(drain_timeout = "30s")]
//! async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error>> {
//!     // Each generation reads the files again: an upgrade also rotates
//!     // the certificate.
//!     let certs = CertificateDer::pem_file_iter("cert.pem")?.collect::<Result<Vec<_>, _>>()?;
//!     let key = PrivateKeyDer::from_pem_file("key.pem")?;
//!     let config = ServerConfig::builder()
//!         .with_no_client_auth()
//!         .with_single_cert(certs, key)?;
//!     let listener = TlsListener::new(HTTPS.take()?, Arc::new(config));
//!     let app = axum::Router::new();
//!     let server = tableflip::http::Server::new();
//!     let serving = cx.clone();
//!     cx.spawn(async move { server.serve_tower(&serving, listener, app).await });
//!     Ok(())
//! }
//! ```
//!
//! The handshake runs in the connection's task, bounded by the server's
//! [first-request timeout](crate::http::Server::first_request_timeout)
//! (default 10 s): a client that connects and stays silent, or stalls in
//! the middle of its handshake, never holds up the accept loop, and is
//! closed when the timeout passes. During the drain, a connection in its
//! handshake is busy (the drain waits for it, at most that long); once the
//! handshake completes, it is served with the drain's rules (its HTTP/1
//! responses carry `Connection: close`, HTTP/2 gets GOAWAY). Every
//! connection the server closes gets a TLS `close_notify` before the TCP
//! close, so a client tells the end of the connection from a truncation.
//!
//! # ALPN and HTTP/2
//!
//! A [`ServerConfig`](rustls::ServerConfig) whose `alpn_protocols` is
//! empty gets `h2` and `http/1.1` (in that order of preference), so that
//! clients negotiate HTTP/2 over TLS as they expect to; a non-empty list
//! is left as it is (set `vec![b"http/1.1".to_vec()]` for a
//! [`Server`](crate::http::Server) configured for HTTP/1 only).
//!
//! # Crypto provider
//!
//! The feature builds rustls with its `ring` provider (a C compiler is
//! enough), and [`ServerConfig::builder`](rustls::ServerConfig::builder)
//! uses it. If another crate of the program also turns on rustls's
//! `aws-lc-rs`, rustls cannot choose for you and `builder()` panics: use
//! `ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))`
//! or install a process default first
//! (`rustls::crypto::ring::default_provider().install_default()`).

use std::future::Future;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use super::Accept;

mod tickets;
pub use tickets::{DEFAULT_ROTATION, TicketKeys};

/// The rustls this crate was built with: build the
/// [`ServerConfig`](rustls::ServerConfig) from it (and read PEM files with
/// its `pki_types::pem::PemObject`) without matching versions by hand.
pub use tokio_rustls::rustls;

/// The connection a [`TlsListener`] serves: tokio-rustls' server stream
/// over the inner listener's connection (its `get_ref()` gives the inner
/// connection and rustls' `ServerConnection`: the negotiated protocol, the
/// SNI name, the client's certificates).
pub use tokio_rustls::server::TlsStream;

/// A listener whose connections speak TLS: any [`Accept`] (a tokio
/// `TcpListener` or `UnixListener`) and a rustls
/// [`ServerConfig`](rustls::ServerConfig); give it to
/// [`Server::serve`](crate::http::Server::serve) or
/// [`serve_tower`](crate::http::Server::serve_tower). See the [module
/// documentation](self) for an example, the handshake's timeout and ALPN.
#[derive(Clone)]
pub struct TlsListener<L> {
    inner: L,
    acceptor: TlsAcceptor,
}

impl<L> TlsListener<L> {
    /// Serves TLS with `config` on `inner`'s connections. If `config` has
    /// no ALPN protocols, they become `h2` and `http/1.1`.
    pub fn new(inner: L, config: Arc<rustls::ServerConfig>) -> TlsListener<L> {
        let config = if config.alpn_protocols.is_empty() {
            let mut config = rustls::ServerConfig::clone(&config);
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(config)
        } else {
            config
        };
        TlsListener {
            inner,
            acceptor: TlsAcceptor::from(config),
        }
    }

    /// The listener underneath.
    pub fn get_ref(&self) -> &L {
        &self.inner
    }

    /// The TLS configuration in use (with the ALPN protocols set by
    /// [`new`](Self::new)).
    pub fn config(&self) -> &Arc<rustls::ServerConfig> {
        self.acceptor.config()
    }

    /// The listener underneath, giving up TLS.
    pub fn into_inner(self) -> L {
        self.inner
    }
}

impl<L: std::fmt::Debug> std::fmt::Debug for TlsListener<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("inner", &self.inner)
            .field("alpn_protocols", &AlpnList(&self.config().alpn_protocols))
            .finish_non_exhaustive()
    }
}

/// ALPN protocol names, shown as text.
struct AlpnList<'a>(&'a [Vec<u8>]);

impl std::fmt::Debug for AlpnList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|p| String::from_utf8_lossy(p)))
            .finish()
    }
}

/// A connection accepted by a [`TlsListener`], before its TLS handshake
/// ([`Accept::Conn`]); the server completes it in the connection's task.
pub struct TlsHandshake<C> {
    conn: C,
    acceptor: TlsAcceptor,
}

impl<C> TlsHandshake<C> {
    /// The accepted connection (its handshake, if it has one of its own,
    /// not done yet).
    pub fn get_ref(&self) -> &C {
        &self.conn
    }
}

impl<C: std::fmt::Debug> std::fmt::Debug for TlsHandshake<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsHandshake")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl<L: Accept> Accept for TlsListener<L> {
    type Conn = TlsHandshake<L::Conn>;
    type Io = TlsStream<L::Io>;

    fn accept_io(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send {
        let acceptor = self.acceptor.clone();
        let next = self.inner.accept_io();
        async move {
            let conn = next.await?;
            Ok(TlsHandshake { conn, acceptor })
        }
    }

    async fn handshake(conn: Self::Conn) -> std::io::Result<Self::Io> {
        let io = L::handshake(conn.conn).await?;
        conn.acceptor.accept(io).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    #[test]
    fn alpn_defaults_to_h2_then_http1_and_a_given_list_is_kept() {
        let listener = TlsListener::new((), config(&[]));
        assert_eq!(
            listener.config().alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let listener = TlsListener::new((), config(&[b"http/1.1"]));
        assert_eq!(listener.config().alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(format!("{listener:?}").contains("http/1.1"));
    }
}
