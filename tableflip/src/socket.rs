//! The Rust types tableflip hands out, and the checks that an fd really is
//! what its name says.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::stat::{SFlag, fstat};
use serde::{Deserialize, Serialize};

use crate::network::Network;
use crate::sys;

/// What an entry of the handover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub(crate) enum Kind {
    /// A listening stream socket (`tcp*`, `unix`, `unixpacket`).
    Listener,
    /// A packet socket (`udp*`, `unixgram`).
    Packet,
    /// A connected socket.
    Conn,
    /// Any other file.
    File,
}

impl Kind {
    /// A human name, as used in error messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Packet => "packet socket",
            Kind::Conn => "connection",
            Kind::File => "file",
        }
    }
}

mod private {
    pub trait Sealed {}
}

/// A type an inherited or freshly created fd can be turned into.
///
/// Implemented for the `std`, `tokio` and `socket2` socket types and for
/// files; sealed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a socket type tableflip can hand out",
    label = "not a socket type",
    note = "use `TcpListener`, `UdpSocket`, `UnixListener` or `UnixDatagram` (of tokio or std), or `tableflip::socket2::Socket`"
)]
pub trait FromFd: Sized + private::Sealed {
    /// The type's name, for error messages.
    #[doc(hidden)]
    const TYPE_NAME: &'static str;
    /// Whether the type is a tokio type (converting needs a runtime).
    #[doc(hidden)]
    const TOKIO: bool;
    /// Whether a socket of `network` can be used as this type.
    #[doc(hidden)]
    fn serves(network: Network) -> bool;
    /// Wraps the fd (already non-blocking and close-on-exec).
    #[doc(hidden)]
    fn from_fd(fd: OwnedFd) -> io::Result<Self>;
}

/// A listening socket type: `TcpListener` and `UnixListener` of `std` and
/// `tokio`, or `socket2::Socket` for any network (the only choice for
/// `unixpacket`).
pub trait Listener: FromFd {}

/// A packet socket type: `UdpSocket` and `UnixDatagram` of `std` and `tokio`,
/// or `socket2::Socket`.
pub trait PacketConn: FromFd {}

/// A connected socket type: `TcpStream` and `UnixStream` of `std` and
/// `tokio`, or `socket2::Socket`.
pub trait Conn: FromFd + AsFd {}

/// A file type: `std::fs::File` or `tokio::fs::File`.
pub trait File: FromFd + AsFd {}

fn is_inet(n: Network) -> bool {
    !n.is_unix()
}

macro_rules! impl_from_fd {
    ($marker:ident, $ty:ty, tokio: $tokio:expr, serves: $serves:expr, from: $from:expr) => {
        impl private::Sealed for $ty {}
        impl FromFd for $ty {
            const TYPE_NAME: &'static str = stringify!($ty);
            const TOKIO: bool = $tokio;
            fn serves(network: Network) -> bool {
                let f: fn(Network) -> bool = $serves;
                f(network)
            }
            fn from_fd(fd: OwnedFd) -> io::Result<Self> {
                let f: fn(OwnedFd) -> io::Result<Self> = $from;
                f(fd)
            }
        }
        impl $marker for $ty {}
    };
}

impl_from_fd!(Listener, std::net::TcpListener, tokio: false,
    serves: |n| is_inet(n) && n.is_stream(), from: |fd| Ok(fd.into()));
impl_from_fd!(Listener, std::os::unix::net::UnixListener, tokio: false,
    serves: |n| n == Network::Unix, from: |fd| Ok(fd.into()));
impl_from_fd!(Listener, tokio::net::TcpListener, tokio: true,
    serves: |n| is_inet(n) && n.is_stream(),
    from: |fd| tokio::net::TcpListener::from_std(fd.into()));
impl_from_fd!(Listener, tokio::net::UnixListener, tokio: true,
    serves: |n| n == Network::Unix,
    from: |fd| tokio::net::UnixListener::from_std(fd.into()));

impl_from_fd!(PacketConn, std::net::UdpSocket, tokio: false,
    serves: |n| is_inet(n) && !n.is_stream(), from: |fd| Ok(fd.into()));
impl_from_fd!(PacketConn, std::os::unix::net::UnixDatagram, tokio: false,
    serves: |n| n == Network::Unixgram, from: |fd| Ok(fd.into()));
impl_from_fd!(PacketConn, tokio::net::UdpSocket, tokio: true,
    serves: |n| is_inet(n) && !n.is_stream(),
    from: |fd| tokio::net::UdpSocket::from_std(fd.into()));
impl_from_fd!(PacketConn, tokio::net::UnixDatagram, tokio: true,
    serves: |n| n == Network::Unixgram,
    from: |fd| tokio::net::UnixDatagram::from_std(fd.into()));

impl_from_fd!(Conn, std::net::TcpStream, tokio: false,
    serves: |n| is_inet(n) && n.is_stream(), from: |fd| Ok(fd.into()));
impl_from_fd!(Conn, std::os::unix::net::UnixStream, tokio: false,
    serves: |n| n == Network::Unix, from: |fd| Ok(fd.into()));
impl_from_fd!(Conn, tokio::net::TcpStream, tokio: true,
    serves: |n| is_inet(n) && n.is_stream(),
    from: |fd| tokio::net::TcpStream::from_std(fd.into()));
impl_from_fd!(Conn, tokio::net::UnixStream, tokio: true,
    serves: |n| n == Network::Unix,
    from: |fd| tokio::net::UnixStream::from_std(fd.into()));

impl_from_fd!(File, std::fs::File, tokio: false,
    serves: |_| false, from: |fd| Ok(fd.into()));
impl_from_fd!(File, tokio::fs::File, tokio: false,
    serves: |_| false, from: |fd| Ok(tokio::fs::File::from_std(fd.into())));

// `socket2::Socket` serves every network, in every role.
impl private::Sealed for socket2::Socket {}
impl FromFd for socket2::Socket {
    const TYPE_NAME: &'static str = "socket2::Socket";
    const TOKIO: bool = false;
    fn serves(_: Network) -> bool {
        true
    }
    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(fd.into())
    }
}
impl Listener for socket2::Socket {}
impl PacketConn for socket2::Socket {}
impl Conn for socket2::Socket {}

/// Converts `fd` into `T`, making sure it is non-blocking and close-on-exec
/// first (tokio requires non-blocking fds).
pub(crate) fn convert<T: FromFd>(fd: OwnedFd) -> io::Result<T> {
    sys::set_nonblocking(fd.as_fd())?;
    sys::set_cloexec(fd.as_fd())?;
    T::from_fd(fd)
}

/// As [`convert`], for an fd this process made close-on-exec itself (a
/// socket it bound with `SOCK_CLOEXEC`, a received fd it claimed, a
/// duplicate made with `F_DUPFD_CLOEXEC`): the flag is this process's
/// alone, so only non-blocking mode is checked (it belongs to the open
/// file description, which another process may share).
pub(crate) fn convert_own<T: FromFd>(fd: OwnedFd) -> io::Result<T> {
    sys::set_nonblocking(fd.as_fd())?;
    T::from_fd(fd)
}

/// Checks that `fd` is what an entry of `kind` on `network` must be.
/// Returns a description of the mismatch.
pub(crate) fn check_fd(
    fd: BorrowedFd<'_>,
    kind: Kind,
    network: Option<Network>,
) -> Result<(), String> {
    check_fd_id(fd, kind, network).map(|_| ())
}

/// Checks that an entry of socket `kind` on `network` makes sense on its
/// own, before any socket is compared with it; returns the network.
pub(crate) fn check_shape(kind: Kind, network: Option<Network>) -> Result<Network, String> {
    let Some(network) = network else {
        return Err("its entry names no network".to_owned());
    };
    if kind == Kind::Listener && !network.is_stream() {
        return Err(format!("a {network} socket cannot be a listener"));
    }
    if kind == Kind::Packet && network.is_stream() {
        return Err(format!("a {network} socket cannot be a packet socket"));
    }
    Ok(network)
}

/// As [`check_fd`]; returns the socket's identity (`None` for a file),
/// read by the same system calls as the checks (a handover of thousands
/// of listeners makes one pass over each fd).
pub(crate) fn check_fd_id(
    fd: BorrowedFd<'_>,
    kind: Kind,
    network: Option<Network>,
) -> Result<Option<SockId>, String> {
    let st = fstat(fd).map_err(|e| format!("fstat failed: {e}"))?;
    let is_socket = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK;
    if kind == Kind::File {
        return if is_socket {
            Err("it is a socket, expected a file".to_owned())
        } else {
            Ok(None)
        };
    }
    if !is_socket {
        return Err(format!(
            "it is not a socket, expected a {}",
            kind.describe()
        ));
    }
    let network = check_shape(kind, network)?;
    let sock = socket2::SockRef::from(&fd);
    let ty = sock
        .r#type()
        .map_err(|e| format!("cannot read its socket type: {e}"))?;
    // The family from the local address (one call for both: the address
    // is needed below, and as the socket's identity).
    let local = sock
        .local_addr()
        .map_err(|e| format!("cannot read its address: {e}"))?;
    let unix = socket_is_unix(&local)?;
    let actual = socket_kind_name(unix, ty);
    let expected_ty = network.socket_type();
    if unix != network.is_unix() || ty != expected_ty {
        return Err(format!(
            "it is a {actual}, expected a {network} {}",
            kind.describe()
        ));
    }
    if let Some(listening) = is_listening(&sock) {
        match kind {
            Kind::Listener if !listening => {
                return Err(format!("it is a {actual} that is not listening"));
            }
            Kind::Conn | Kind::Packet if listening => {
                return Err(format!(
                    "it is a listening {actual}, expected a {}",
                    kind.describe()
                ));
            }
            _ => {}
        }
    }
    if !network.is_unix() {
        let v6 = local.is_ipv6();
        match network {
            Network::Tcp4 | Network::Udp4 if v6 => {
                return Err(format!("it is an IPv6 socket, expected {network}"));
            }
            Network::Tcp6 | Network::Udp6 if !v6 => {
                return Err(format!("it is an IPv4 socket, expected {network}"));
            }
            _ => {}
        }
    }
    Ok(Some(SockId::Inode {
        ino: st.st_ino,
        local: Some(local),
    }))
}

fn socket_kind_name(unix: bool, ty: socket2::Type) -> &'static str {
    match (unix, ty) {
        (false, socket2::Type::STREAM) => "TCP socket",
        (false, socket2::Type::DGRAM) => "UDP socket",
        (true, socket2::Type::STREAM) => "Unix stream socket",
        (true, socket2::Type::DGRAM) => "Unix datagram socket",
        (true, socket2::Type::SEQPACKET) => "Unix seqpacket socket",
        _ => "socket of another type",
    }
}

/// Whether a socket whose local address is `local` is a Unix socket (the
/// address family of `getsockname(2)` is the socket's domain, bound or
/// not).
fn socket_is_unix(local: &socket2::SockAddr) -> Result<bool, String> {
    let domain = local.domain();
    if domain == socket2::Domain::UNIX {
        Ok(true)
    } else if domain == socket2::Domain::IPV4 || domain == socket2::Domain::IPV6 {
        Ok(false)
    } else {
        Err("it is a socket of an unsupported address family".to_owned())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn is_listening(sock: &socket2::SockRef<'_>) -> Option<bool> {
    sock.is_listener().ok()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn is_listening(_: &socket2::SockRef<'_>) -> Option<bool> {
    None
}

/// Works out the network and address of a socket (the generic network: a
/// TCP socket, IPv4 or IPv6, is `tcp`), and checks that it is what an
/// entry of `kind` must be. Returns why not.
pub(crate) fn inspect(fd: BorrowedFd<'_>, kind: Kind) -> Result<(Network, String), String> {
    let sock = socket2::SockRef::from(&fd);
    let ty = sock
        .r#type()
        .map_err(|e| format!("it is not a socket ({e})"))?;
    let local = sock
        .local_addr()
        .map_err(|e| format!("cannot read its address: {e}"))?;
    let (network, address) = if let Some(inet) = local.as_socket() {
        let network = match ty {
            socket2::Type::STREAM => Network::Tcp,
            socket2::Type::DGRAM => Network::Udp,
            _ => return Err("unsupported IP socket type".to_owned()),
        };
        (network, inet.to_string())
    } else if local.is_unix() {
        let network = match ty {
            socket2::Type::STREAM => Network::Unix,
            socket2::Type::DGRAM => Network::Unixgram,
            socket2::Type::SEQPACKET => Network::Unixpacket,
            _ => return Err("unsupported Unix socket type".to_owned()),
        };
        (network, unix_address(&local))
    } else {
        return Err("unsupported address family".to_owned());
    };
    check_fd(fd, kind, Some(network))?;
    Ok((network, address))
}

/// A Unix socket's address as tableflip writes it: its path, or `@name`
/// for an abstract one (`@` alone when unbound).
fn unix_address(local: &socket2::SockAddr) -> String {
    if let Some(path) = local.as_pathname() {
        path.display().to_string()
    } else {
        abstract_name(local).map_or_else(|| "@".to_owned(), |n| format!("@{n}"))
    }
}

/// The address a socket is bound to, as [`inspect`] reports it, read with
/// one system call and no check (for a socket the registry opened and
/// checked).
pub(crate) fn bound_address(fd: BorrowedFd<'_>) -> Option<String> {
    let local = socket2::SockRef::from(&fd).local_addr().ok()?;
    if let Some(inet) = local.as_socket() {
        Some(inet.to_string())
    } else if local.is_unix() {
        Some(unix_address(&local))
    } else {
        None
    }
}

/// The path a Unix socket is bound to (`None` for an abstract or unbound
/// one, or another family).
pub(crate) fn unix_path(fd: BorrowedFd<'_>) -> Option<std::path::PathBuf> {
    socket2::SockRef::from(&fd)
        .local_addr()
        .ok()?
        .as_pathname()
        .map(std::path::Path::to_owned)
}

/// What a socket is, to tell whether an fd number still refers to the
/// socket it referred to.
///
/// On Linux, its socket cookie (`SO_COOKIE`, socket(7)): unique among the
/// sockets created since boot, never reused, and one system call to read.
/// Elsewhere (or on a kernel without cookies), its inode (unique among
/// live sockets) and its local address (against the rare reuse of an
/// inode number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SockId {
    Cookie(u64),
    Inode {
        ino: u64,
        local: Option<socket2::SockAddr>,
    },
}

/// What [`SockId::check_copy`] found behind a duplicated number.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CopyIs {
    /// The socket itself.
    Same,
    /// Another socket: the duplicate may be closed.
    OtherSocket,
    /// Not a socket, or unknown: the duplicate must not be closed (closing
    /// a duplicate of a file drops this process's record locks on it,
    /// fcntl(2)).
    NotASocket,
}

impl SockId {
    /// Reads the identity of the socket `fd`: its cookie where the kernel
    /// has them (one call), its inode and address otherwise.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<SockId> {
        match sys::socket_cookie_of_number(fd.as_raw_fd()) {
            Ok(cookie) => Ok(SockId::Cookie(cookie)),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOPROTOOPT) => {
                let ino = fstat(fd)?.st_ino;
                let local = socket2::SockRef::from(&fd).local_addr().ok();
                Ok(SockId::Inode { ino, local })
            }
            Err(e) => Err(e),
        }
    }

    /// The cookie, when the identity is one.
    pub(crate) fn cookie(&self) -> Option<u64> {
        match self {
            SockId::Cookie(c) => Some(*c),
            SockId::Inode { .. } => None,
        }
    }

    /// Whether the fd number `raw` (not necessarily this process's own:
    /// only read, never duplicated) looks like this socket now: a cheap
    /// look before duplicating it, which [`check_copy`](Self::check_copy)
    /// confirms.
    pub(crate) fn looks_like(&self, raw: RawFd) -> bool {
        match self {
            SockId::Cookie(c) => sys::socket_cookie_of_number(raw).ok() == Some(*c),
            SockId::Inode {
                local: Some(local), ..
            } => sys::local_addr_of_number(raw).as_ref() == Some(local),
            SockId::Inode { ino, local: None } => sys::socket_inode_of_number(raw) == Some(*ino),
        }
    }

    /// What the duplicate `dup` of a number that [`looks_like`](Self::looks_like)
    /// this socket refers to (another thread may have closed and reused
    /// the number in between).
    pub(crate) fn check_copy(&self, dup: BorrowedFd<'_>) -> CopyIs {
        match self {
            SockId::Cookie(c) => match sys::socket_cookie_of_number(dup.as_raw_fd()) {
                Ok(got) if got == *c => CopyIs::Same,
                Ok(_) => CopyIs::OtherSocket,
                Err(_) => CopyIs::NotASocket,
            },
            SockId::Inode { ino, local } => {
                let Some(got) = sys::socket_inode_of_number(dup.as_raw_fd()) else {
                    return CopyIs::NotASocket;
                };
                // With an address, it was compared by `looks_like`; the
                // inode (unique among live sockets) says the number did
                // not change since.
                let same = match local {
                    Some(_) => got == *ino,
                    None => SockId::of(dup).ok().as_ref() == Some(self),
                };
                if same {
                    CopyIs::Same
                } else {
                    CopyIs::OtherSocket
                }
            }
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_name(addr: &socket2::SockAddr) -> Option<String> {
    addr.as_abstract_namespace()
        .map(|n| String::from_utf8_lossy(n).into_owned())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_name(_: &socket2::SockAddr) -> Option<String> {
    None
}
