//! Creating fresh sockets: what happens when no previous generation handed
//! a socket on under the requested name.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use socket2::{Domain, SockAddr, Socket};

use crate::network::{Address, Network};
use crate::unixfile::{self, SocketFile};

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
/// A relative path is resolved once, against the directory the service
/// started in, when the socket is bound: an application that changes
/// directory later (during its initialisation, say) still has its socket
/// where it expects it, and the same path is handed to the next
/// generation.
///
/// When a fresh Unix socket is bound to a path where a file exists:
///
/// - a socket file nobody listens on (left by a run that crashed) is
///   removed and the path bound again. The stale file is moved into a
///   private directory and deleted only if it is the very file found
///   stale, so two instances starting at once never delete each other's
///   live socket;
/// - a socket somebody listens on (even one whose accept queue is full)
///   is left alone, and binding fails with "address in use", naming the
///   path;
/// - anything else (a regular file, a directory, a symlink) is never
///   removed: binding fails with "`<path>` exists and is not a socket".
///
/// [`mode`](Self::mode): on Linux the file is created with at most these
/// permissions (the socket's own mode is set before `bind`; the umask can
/// only narrow it), and a mode the umask narrowed is then set exactly,
/// through an fd opened without following symlinks and checked to be this
/// socket's file (device and inode, from the kernel's `sock_diag(7)` where
/// available). No path that another user could swap for a symlink is ever
/// `chmod`ed. On other systems the mode is set after `bind`.
///
/// The file is removed when the service stops for good (never at an
/// upgrade, and never for a socket systemd passed), and only if it still
/// is the file this socket was bound to (same device and inode): a file
/// another process has put at the path since is left alone.
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
    pub(crate) name: String,
    pub(crate) network: String,
    pub(crate) address: String,
    pub(crate) backlog: Option<u32>,
    pub(crate) mode: Option<u32>,
    pub(crate) setup: Option<SetupHook>,
}

impl ListenSpec {
    /// A spec with the given name, network and address and default options.
    ///
    /// - `name`: under which the socket is handed to the next generation;
    /// - `network`, as in Go: `tcp`, `tcp4`, `tcp6`, `udp`, `udp4`, `udp6`,
    ///   `unix`, `unixgram`, `unixpacket`;
    /// - `address`: `host:port` for IP networks (a host name is resolved
    ///   as Go's `net.Listen` does: its first IPv4 address, else its first
    ///   one; an empty host is every address), a path or `@name` (Linux
    ///   abstract address) for Unix networks.
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

    /// The name under which the socket is handed to the next generation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network (`tcp`, `unix`…), as given.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The address, as given.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sets the `listen(2)` backlog of a fresh stream socket. Default:
    /// [`Options::backlog`](crate::Options::backlog).
    #[must_use]
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = Some(backlog);
        self
    }

    /// Sets the permissions of a fresh Unix socket file (e.g. `0o660`; see
    /// "Unix socket files" above). Default: the umask decides.
    #[must_use]
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Sets the hook run on the fresh socket before `bind`. Default:
    /// [`Options::socket_setup`](crate::Options::socket_setup).
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

/// A freshly bound socket, and the Unix socket file it created.
pub(crate) struct Bound {
    pub(crate) fd: OwnedFd,
    pub(crate) file: Option<SocketFile>,
}

/// Creates, configures, binds and (for stream networks) listens.
///
/// `address` is what to bind; for a Unix path that is relative (a path too
/// long to bind in absolute form, bound from the start directory),
/// `file_path` is its absolute form, recorded for removal.
pub(crate) fn bind(
    network: Network,
    address: &Address,
    file_path: Option<&Path>,
    spec: &ListenSpec,
    backlog: u32,
    setup: Option<&SetupHook>,
) -> io::Result<Bound> {
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
    let path = match address {
        Address::Path(p) => Some(p.as_path()),
        _ => None,
    };
    if let (Some(mode), Some(_)) = (spec.mode, path) {
        // Linux creates the socket file with the socket's own mode (less
        // the umask): set it first, so the file is never more open than
        // asked, not even for an instant.
        nix::sys::stat::fchmod(
            socket.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(mode & 0o777),
        )?;
    }
    if let Some(hook) = setup {
        hook(&socket, spec)?;
        // The registry hands its sockets out as close-on-exec without
        // looking again (`socket::convert_own`): whatever the hook did.
        socket.set_cloexec(true)?;
    }
    match socket.bind(&addr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let Some(p) = path else {
                return Err(e);
            };
            if !unixfile::remove_stale(p, network)? {
                return Err(e);
            }
            socket.bind(&addr)?;
        }
        Err(e) => return Err(e),
    }
    let file =
        path.map(|p| SocketFile::bound(file_path.unwrap_or(p).to_owned(), p, socket.as_fd()));
    if let (Some(mode), Some(p), Some(file)) = (spec.mode, path, &file) {
        if let Err(e) = unixfile::set_mode(p, socket.as_fd(), file.id, mode) {
            // Never leave a socket file behind that was not configured as
            // asked: nobody can connect to it before `listen` anyway.
            file.remove();
            return Err(e);
        }
    }
    if network.is_stream() {
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        socket.listen(backlog)?;
    }
    Ok(Bound {
        fd: socket.into(),
        file,
    })
}
