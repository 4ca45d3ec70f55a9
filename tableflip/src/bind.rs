//! Creating fresh sockets: what happens when no previous generation handed
//! a socket on under the requested name.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use socket2::{Domain, SockAddr, Socket};

use crate::network::{Address, Network};

/// A hook that configures a freshly created socket before it is bound
/// (socket options such as `SO_REUSEPORT`, buffer sizes, `TCP_FASTOPEN`…).
///
/// It is called only for sockets created by this process, never for
/// inherited ones (they already carry the options their creator set).
pub type SetupHook = Arc<dyn Fn(&Socket, &ListenSpec) -> io::Result<()> + Send + Sync>;

/// Everything needed to find an inherited socket by name or to create it.
///
/// # Unix socket files
///
/// When a fresh Unix socket is bound to a path where a file exists:
///
/// - a socket file nobody listens on (left by a run that crashed) is
///   removed and the path bound again;
/// - a socket somebody listens on (even one whose accept queue is full)
///   is left alone, and binding fails with "address in use", naming the
///   path;
/// - anything else (a regular file, a directory, a symlink) is never
///   removed: binding fails with "`<path>` exists and is not a socket".
///
/// The file is removed when the service stops for good (never at an
/// upgrade, and never for a socket systemd passed). [`mode`](Self::mode)
/// is applied right after `bind`: for a moment the file has the umask's
/// permissions (for a stream socket harmless, since nobody can connect
/// before `listen`).
///
/// # Examples
///
/// ```no_run
/// # fn main() -> Result<(), tableflip::Error> {
/// use tableflip::{ListenSpec, Options, Upgrader};
///
/// let upg = Upgrader::new(Options::default())?;
/// let spec = ListenSpec::new("HTTP", "tcp", "127.0.0.1:8080").backlog(4096);
/// let listener: std::net::TcpListener = upg.fds().listen_with(&spec)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ListenSpec {
    /// The name under which the socket is handed to the next generation.
    pub name: String,
    /// The network, as in Go: `tcp`, `tcp4`, `tcp6`, `udp`, `udp4`, `udp6`,
    /// `unix`, `unixgram`, `unixpacket`.
    pub network: String,
    /// The address: `host:port` for IP networks, a path or `@name` (Linux
    /// abstract address) for Unix networks.
    pub address: String,
    /// The `listen(2)` backlog of a fresh stream socket; `None` uses
    /// [`Options::backlog`](crate::Options::backlog).
    pub backlog: Option<u32>,
    /// Permissions of a fresh Unix socket file (e.g. `0o660`); `None` leaves
    /// them to the umask.
    pub mode: Option<u32>,
    /// A hook run on the fresh socket before `bind`; `None` uses
    /// [`Options::socket_setup`](crate::Options::socket_setup).
    pub setup: Option<SetupHook>,
}

impl ListenSpec {
    /// A spec with the given name, network and address and default options.
    pub fn new(
        name: impl Into<String>,
        network: impl Into<String>,
        address: impl Into<String>,
    ) -> Self {
        ListenSpec {
            name: name.into(),
            network: network.into(),
            address: address.into(),
            backlog: None,
            mode: None,
            setup: None,
        }
    }

    /// Sets the backlog.
    #[must_use]
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = Some(backlog);
        self
    }

    /// Sets the permissions of the Unix socket file.
    #[must_use]
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Sets the socket-setup hook.
    #[must_use]
    pub fn setup(
        mut self,
        hook: impl Fn(&Socket, &ListenSpec) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.setup = Some(Arc::new(hook));
        self
    }
}

impl std::fmt::Debug for ListenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenSpec")
            .field("name", &self.name)
            .field("network", &self.network)
            .field("address", &self.address)
            .field("backlog", &self.backlog)
            .field("mode", &self.mode.map(|m| format!("{m:#o}")))
            .field("setup", &self.setup.as_ref().map(|_| "Fn"))
            .finish()
    }
}

pub(crate) fn sock_addr(address: &Address) -> io::Result<SockAddr> {
    match address {
        Address::Inet(a) => Ok(SockAddr::from(*a)),
        Address::Path(p) => SockAddr::unix(p),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Address::Abstract(name) => {
            use std::os::unix::ffi::OsStrExt;
            // socket2 reads a leading NUL byte as an abstract address.
            let mut bytes = vec![0u8];
            bytes.extend_from_slice(name.as_bytes());
            SockAddr::unix(std::ffi::OsStr::from_bytes(&bytes))
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Address::Abstract(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "abstract Unix addresses exist only on Linux",
        )),
    }
}

/// Creates, configures, binds and (for stream networks) listens.
pub(crate) fn bind(
    network: Network,
    address: &Address,
    spec: &ListenSpec,
    backlog: u32,
    setup: Option<&SetupHook>,
) -> io::Result<OwnedFd> {
    let addr = sock_addr(address)?;
    let domain = match address {
        Address::Inet(a) if a.is_ipv6() => Domain::IPV6,
        Address::Inet(_) => Domain::IPV4,
        _ => Domain::UNIX,
    };
    // socket2 creates sockets close-on-exec.
    let socket = Socket::new(domain, network.socket_type(), None)?;
    socket.set_nonblocking(true)?;
    if !network.is_unix() {
        if network.is_stream() {
            socket.set_reuse_address(true)?;
        }
        if domain == Domain::IPV6 {
            let v6only = matches!(network, Network::Tcp6 | Network::Udp6);
            socket.set_only_v6(v6only)?;
        }
    }
    if let Some(hook) = setup {
        hook(&socket, spec)?;
    }
    match socket.bind(&addr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let Address::Path(path) = address else {
                return Err(e);
            };
            if !remove_stale_socket(path, network)? {
                return Err(e);
            }
            socket.bind(&addr)?;
        }
        Err(e) => return Err(e),
    }
    if let (Some(mode), Address::Path(path)) = (spec.mode, address) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    if network.is_stream() {
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        socket.listen(backlog)?;
    }
    Ok(socket.into())
}

/// A Unix socket file left behind by a process that crashed is removed, so
/// that binding works again; a socket somebody still listens on, and
/// anything that is not a socket, are left alone.
fn remove_stale_socket(path: &Path, network: Network) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(false),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to remove it",
                path.display()
            ),
        ));
    }
    let probe = Socket::new(Domain::UNIX, network.socket_type(), None)?;
    // Non-blocking: a blocking connect to a live listener whose accept
    // queue is full (a wedged or stopped process) would wait for room,
    // possibly forever. `EAGAIN` then means, like success, "alive".
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => {
            tracing::info!(path = %path.display(), "removing stale Unix socket file left by an earlier run");
            std::fs::remove_file(path)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Removes the Unix socket file at `path`, if it still is a socket.
pub(crate) fn unlink_socket(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove Unix socket file");
            } else {
                tracing::debug!(path = %path.display(), "removed Unix socket file");
            }
        }
        _ => {}
    }
}
