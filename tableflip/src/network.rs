//! Networks (`tcp`, `udp`, `unix`, …) and the addresses they take.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A network, named as in Go's `net` package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Network {
    /// TCP over IPv4 or IPv6, as the address says.
    Tcp,
    /// TCP over IPv4 only.
    Tcp4,
    /// TCP over IPv6 only (`IPV6_V6ONLY` set).
    Tcp6,
    /// UDP over IPv4 or IPv6, as the address says.
    Udp,
    /// UDP over IPv4 only.
    Udp4,
    /// UDP over IPv6 only (`IPV6_V6ONLY` set).
    Udp6,
    /// Unix stream socket (path, or `@name` for a Linux abstract address).
    Unix,
    /// Unix datagram socket.
    Unixgram,
    /// Unix sequenced-packet socket (Linux).
    Unixpacket,
}

/// Every network, in the order used by error messages.
pub(crate) const NETWORKS: &[(&str, Network)] = &[
    ("tcp", Network::Tcp),
    ("tcp4", Network::Tcp4),
    ("tcp6", Network::Tcp6),
    ("udp", Network::Udp),
    ("udp4", Network::Udp4),
    ("udp6", Network::Udp6),
    ("unix", Network::Unix),
    ("unixgram", Network::Unixgram),
    ("unixpacket", Network::Unixpacket),
];

impl Network {
    /// The network's name, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        NETWORKS
            .iter()
            .find(|(_, n)| *n == self)
            .map_or("?", |(s, _)| s)
    }

    /// Whether this network uses Unix-domain sockets.
    pub fn is_unix(self) -> bool {
        matches!(
            self,
            Network::Unix | Network::Unixgram | Network::Unixpacket
        )
    }

    /// Whether sockets of this network are connection-oriented listeners
    /// (`tcp*`, `unix`, `unixpacket`) rather than packet sockets.
    pub fn is_stream(self) -> bool {
        matches!(
            self,
            Network::Tcp | Network::Tcp4 | Network::Tcp6 | Network::Unix | Network::Unixpacket
        )
    }

    pub(crate) fn socket_type(self) -> socket2::Type {
        match self {
            Network::Tcp | Network::Tcp4 | Network::Tcp6 | Network::Unix => socket2::Type::STREAM,
            Network::Udp | Network::Udp4 | Network::Udp6 | Network::Unixgram => {
                socket2::Type::DGRAM
            }
            Network::Unixpacket => socket2::Type::SEQPACKET,
        }
    }

    /// Parses and resolves an address for this network.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`] when the address cannot be valid for the
    /// network, or does not resolve.
    pub(crate) fn parse_address(self, address: &str) -> Result<Address> {
        let invalid = |reason: &str| Error::InvalidAddress {
            network: self.as_str().to_owned(),
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        if address.is_empty() {
            return Err(invalid("the address is empty"));
        }
        if self.is_unix() {
            if address.contains('\0') {
                return Err(invalid("a Unix address cannot contain a NUL byte"));
            }
            if self == Network::Unixpacket && !cfg!(any(target_os = "linux", target_os = "android"))
            {
                return Err(invalid("unixpacket is only supported on Linux"));
            }
            if let Some(name) = address.strip_prefix('@') {
                if !cfg!(any(target_os = "linux", target_os = "android")) {
                    return Err(invalid(
                        "abstract Unix addresses (@name) exist only on Linux",
                    ));
                }
                if name.len() > 107 {
                    return Err(invalid("an abstract name is at most 107 bytes"));
                }
                return Ok(Address::Abstract(name.to_owned()));
            }
            if address.len() > 107 {
                return Err(invalid("a Unix socket path is at most 107 bytes"));
            }
            return Ok(Address::Path(PathBuf::from(address)));
        }
        let Some((host, port)) = address.rsplit_once(':') else {
            return Err(invalid("expected `host:port`"));
        };
        if port.is_empty() {
            return Err(invalid("the port is missing"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("the port must be a number from 0 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let v6only = matches!(self, Network::Tcp6 | Network::Udp6);
        let v4only = matches!(self, Network::Tcp4 | Network::Udp4);
        if host.is_empty() {
            // As Go's `net.Listen`: an empty host listens on every address
            // of the system: `tcp` on the dual-stack IPv6 wildcard (IPv4
            // clients too), unless the system has no IPv6.
            let any6 = SocketAddr::from(([0u16; 8], port));
            let any4 = SocketAddr::from(([0u8; 4], port));
            return Ok(Address::Inet(match (v4only, v6only) {
                (true, _) => any4,
                (_, true) => any6,
                _ if ipv6_available() => any6,
                _ => any4,
            }));
        }
        let candidates: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| invalid(&format!("cannot resolve host {host:?}: {e}")))?
            .collect();
        match pick_listen_address(&candidates, v4only, v6only) {
            Some(addr) => Ok(Address::Inet(addr)),
            None if v4only => Err(invalid("the host has no IPv4 address")),
            None if v6only => Err(invalid("the host has no IPv6 address")),
            None => Err(invalid("the host resolves to no address")),
        }
    }
}

/// Which of a host name's addresses to listen on, as Go's `net.Listen`
/// does (`addrList.first(isIPv4)`): the first IPv4 address, else the
/// first address. So `localhost` is 127.0.0.1 even where the resolver
/// returns `::1` first (Debian's `/etc/hosts`, RFC 6724 ordering), and
/// IPv4 clients, the common case, can connect.
pub(crate) fn pick_listen_address(
    candidates: &[SocketAddr],
    v4only: bool,
    v6only: bool,
) -> Option<SocketAddr> {
    if v4only {
        return candidates.iter().copied().find(SocketAddr::is_ipv4);
    }
    if v6only {
        return candidates.iter().copied().find(SocketAddr::is_ipv6);
    }
    candidates
        .iter()
        .copied()
        .find(SocketAddr::is_ipv4)
        .or_else(|| candidates.first().copied())
}

/// Whether this system can create IPv6 sockets (checked once).
fn ipv6_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).is_ok()
    })
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Network {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        NETWORKS
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, n)| *n)
            .ok_or_else(|| Error::UnknownNetwork {
                network: s.to_owned(),
            })
    }
}

/// A resolved address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub(crate) enum Address {
    /// An IP address and port.
    Inet(SocketAddr),
    /// A Unix socket path.
    Path(PathBuf),
    /// A Linux abstract Unix address (written `@name`), without the `@`.
    Abstract(String),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Inet(a) => a.fmt(f),
            Address::Path(p) => p.display().fmt(f),
            Address::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_network_name() {
        for (name, net) in NETWORKS {
            assert_eq!(name.parse::<Network>().ok(), Some(*net));
            assert_eq!(net.as_str(), *name);
        }
        let err = "tpc".parse::<Network>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("\"tpc\"")));
    }

    #[test]
    fn inet_addresses() {
        let a = Network::Tcp.parse_address("127.0.0.1:80").ok();
        assert_eq!(a, Some(Address::Inet(([127, 0, 0, 1], 80).into())));
        assert!(matches!(
            Network::Tcp6.parse_address(":0"),
            Ok(Address::Inet(SocketAddr::V6(_)))
        ));
        assert!(Network::Tcp4.parse_address("[::1]:80").is_err());
        for bad in ["", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "x:y"] {
            assert!(Network::Tcp.parse_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_names_listen_on_ipv4_first_as_go_does() {
        let v6: SocketAddr = "[::1]:80".parse().unwrap_or_else(|_| unreachable!());
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap_or_else(|_| unreachable!());
        // Debian's /etc/hosts, sorted by RFC 6724: ::1 first.
        assert_eq!(pick_listen_address(&[v6, v4], false, false), Some(v4));
        assert_eq!(pick_listen_address(&[v6], false, false), Some(v6));
        assert_eq!(pick_listen_address(&[v6, v4], false, true), Some(v6));
        assert_eq!(pick_listen_address(&[v6], true, false), None);
    }

    #[test]
    fn an_empty_host_is_every_address() {
        let a = Network::Tcp.parse_address(":8080").ok();
        let Some(Address::Inet(a)) = a else {
            panic!("{a:?}");
        };
        assert!(a.ip().is_unspecified() && a.port() == 8080);
        if ipv6_available() {
            assert!(a.is_ipv6(), "dual-stack wildcard");
        }
        assert!(matches!(
            Network::Tcp4.parse_address(":1"),
            Ok(Address::Inet(SocketAddr::V4(_)))
        ));
    }

    #[test]
    fn unix_addresses() {
        assert_eq!(
            Network::Unix.parse_address("/tmp/a.sock").ok(),
            Some(Address::Path("/tmp/a.sock".into()))
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            Network::Unixgram.parse_address("@svc").ok(),
            Some(Address::Abstract("svc".into()))
        );
        assert!(Network::Unix.parse_address("a\0b").is_err());
        assert!(Network::Unix.parse_address(&"x".repeat(200)).is_err());
    }
}
