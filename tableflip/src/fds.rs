//! The named fds a generation hands to the next: listeners, packet
//! sockets, connections and files.
//!
//! # Who holds which fd
//!
//! A listener (or packet socket) costs one fd while the service runs: the
//! application's. The registry keeps only its number and what it must
//! still be (the socket's inode and address), and makes its own copy when
//! it needs one: at an upgrade, when it duplicates the number and checks
//! that the duplicate is still that socket. So a service with a thousand
//! listeners holds a thousand fds, not two thousand; and a number the
//! application closed and reused for something else is never handed on.
//! The copy is kept after a successful upgrade (the sockets then outlive
//! the application's handles while it drains, for a replacement of a
//! successor that dies) and dropped after a failed one.
//!
//! A connection or file is handed out in a [`Handover`] guard, and the
//! registry keeps a copy of its own: what is handed on is exactly what was
//! registered, whatever the application does with the value in the guard.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bind::{self, ListenSpec, SetupHook};
use crate::error::{Error, Result};
use crate::network::{Address, Network};
use crate::protocol::{EntryMeta, Inherited};
use crate::socket::{self, Conn, CopyIs, File, FromFd, Kind, Listener, PacketConn, SockId};
use crate::sys;
use crate::unixfile::FileId;
use crate::unixfile::SocketFile;

/// How an entry holds its fd.
#[derive(Debug)]
enum Slot {
    /// The registry holds the fd; the application none (an inherited entry
    /// not claimed yet), or one of its own (a connection or file in a
    /// guard; a listener after the application asked for a second handle).
    Owned(OwnedFd),
    /// The application holds the only fd.
    Lent(Lent),
    /// The application's fd, and the registry's copy (made for an
    /// upgrade).
    Shared { own: OwnedFd, lent: Lent },
}

/// An fd number the application owns, and what it must still be.
#[derive(Debug, Clone)]
struct Lent {
    raw: RawFd,
    id: SockId,
}

impl Lent {
    fn of(fd: &OwnedFd) -> std::io::Result<Lent> {
        Ok(Lent {
            raw: fd.as_raw_fd(),
            id: SockId::of(fd.as_fd())?,
        })
    }

    /// A copy of the application's fd, if the number still refers to the
    /// socket it was lent as (`Ok(None)`: closed, or reused for something
    /// else). The number is duplicated first and the duplicate checked, so
    /// nothing can change between check and use.
    fn copy(&self) -> std::io::Result<Option<OwnedFd>> {
        // Looked at first without duplicating: closing a duplicate of a
        // file that took the number would drop this process's record locks
        // on it (fcntl(2)), and keeping it open would keep, say, a pipe's
        // end open.
        if !self.alive() {
            return Ok(None);
        }
        let dup = match sys::dup_number(self.raw) {
            Ok(dup) => dup,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBADF) => return Ok(None),
            // EMFILE and the like say nothing about the socket.
            Err(e) => return Err(e),
        };
        // The same socket, unless the number changed between the look and
        // the duplicate (another thread closed and reused it).
        match self.id.check_copy(dup.as_fd()) {
            CopyIs::Same => Ok(Some(dup)),
            CopyIs::OtherSocket => Ok(None),
            CopyIs::NotASocket => {
                // Never close a duplicate of what may be a file (see above).
                std::mem::forget(dup);
                Ok(None)
            }
        }
    }

    /// Whether the number still refers to this socket, looked at without
    /// duplicating it.
    fn alive(&self) -> bool {
        self.id.looks_like(self.raw)
    }
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    network: Option<Network>,
    address: Option<String>,
    slot: Slot,
    /// Inherited and not yet asked for by this generation.
    unclaimed: bool,
    /// Created by this generation (a fresh bind).
    created_here: bool,
    /// Passed by socket activation: matched by name, whatever the address.
    activated: bool,
    /// Passed by socket activation under a name systemd made up (no
    /// `FileDescriptorName=`): matched by address instead.
    unnamed: bool,
    /// A connection or file the application holds in a guard.
    guarded: bool,
    /// Set by a snapshot when the socket was in blocking mode: the next
    /// generation makes it non-blocking (the flag belongs to the open file
    /// description, which both processes share), so a failed upgrade puts
    /// it back.
    was_blocking: bool,
    /// The Unix socket file this entry's socket is bound to.
    file: Option<SocketFile>,
    /// Identifies the entry, so a guard never removes a newer entry that
    /// reuses the name.
    id: u64,
    /// The identity of the socket in `Slot::Owned`, when the handover's
    /// checks read it: lending it then reads nothing again.
    owned_id: Option<SockId>,
}

impl Entry {
    fn new(kind: Kind, network: Option<Network>, address: Option<String>, slot: Slot) -> Entry {
        Entry {
            kind,
            network,
            address,
            slot,
            unclaimed: false,
            created_here: false,
            activated: false,
            unnamed: false,
            guarded: false,
            was_blocking: false,
            file: None,
            id: 0,
            owned_id: None,
        }
    }

    /// The registry's own fd, if it has one.
    fn borrowed_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.slot {
            Slot::Owned(fd) | Slot::Shared { own: fd, .. } => Some(fd.as_fd()),
            Slot::Lent(_) => None,
        }
    }

    /// The fd to hand to the next generation, if the entry still has one.
    fn raw_fd(&self) -> Option<RawFd> {
        match &self.slot {
            Slot::Owned(fd) | Slot::Shared { own: fd, .. } => Some(fd.as_raw_fd()),
            Slot::Lent(_) => None,
        }
    }

    /// The socket cookie to send with the entry (see
    /// [`EntryMeta::cookie`]): known already when the application holds
    /// the socket or when it was inherited with one; read otherwise.
    fn cookie(&self) -> Option<u64> {
        if self.kind == Kind::File {
            return None;
        }
        match &self.slot {
            Slot::Shared { lent, .. } | Slot::Lent(lent) => lent.id.cookie(),
            Slot::Owned(fd) => self
                .owned_id
                .as_ref()
                .and_then(SockId::cookie)
                .or_else(|| sys::socket_cookie_of_number(fd.as_raw_fd()).ok()),
        }
    }

    fn resolved(&self) -> Option<Address> {
        self.network?.parse_address(self.address.as_deref()?).ok()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: HashMap<String, Entry>,
    /// Inherited entries replaced by a socket of the same name but another
    /// address; closed at readiness.
    stale: Vec<(String, Entry)>,
    next_id: u64,
    /// A generation of a supervised service whose supervisor predates
    /// collecting connections and files: only listening sockets go from
    /// one generation to the next.
    listeners_only: bool,
}

impl Registry {
    fn insert(&mut self, name: String, mut entry: Entry) -> u64 {
        self.next_id += 1;
        entry.id = self.next_id;
        self.entries.insert(name, entry);
        self.next_id
    }
}

/// The named sockets and files this generation holds, and will hand to the
/// next one.
///
/// Obtained from [`Upgrader::fds`](crate::Upgrader::fds). Cheap to clone;
/// all clones share one registry.
///
/// Listeners and packet sockets: the application's handle is the only fd
/// while the service runs; the registry duplicates it for an upgrade (and
/// keeps that copy after a successful one, while the application drains
/// and drops its handles). Closing the application's handle before an
/// upgrade stops handing the socket on.
///
/// Connections and files come wrapped in a [`Handover`] guard; dropping the
/// guard stops handing the value on and really closes it, so a peer sees
/// the connection close.
#[derive(Debug, Clone)]
pub struct Fds {
    pub(crate) registry: Arc<Mutex<Registry>>,
    defaults: Arc<Defaults>,
}

pub(crate) struct Defaults {
    pub(crate) backlog: u32,
    pub(crate) setup: Option<SetupHook>,
    /// Relative Unix socket paths are resolved against it.
    pub(crate) start_dir: PathBuf,
}

impl std::fmt::Debug for Defaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Defaults")
            .field("backlog", &self.backlog)
            .field("start_dir", &self.start_dir)
            .finish_non_exhaustive()
    }
}

/// What the handover needs of the registry while the child is spawned.
pub(crate) struct Snapshot<'a> {
    pub(crate) _guard: MutexGuard<'a, Registry>,
    pub(crate) entries: Vec<EntryMeta>,
    pub(crate) fds: Vec<RawFd>,
}

impl Snapshot<'_> {
    /// The listeners and packet sockets of the snapshot with their fds,
    /// borrowed from the locked registry (what a supervised generation
    /// reports to its supervisor).
    pub(crate) fn sockets(&self) -> Vec<(&EntryMeta, BorrowedFd<'_>)> {
        self.of_kinds(&[Kind::Listener, Kind::Packet])
    }

    /// The connections and files of the snapshot with their fds (what a
    /// supervised generation hands its supervisor for the next one).
    pub(crate) fn handed_on(&self) -> Vec<(&EntryMeta, BorrowedFd<'_>)> {
        self.of_kinds(&[Kind::Conn, Kind::File])
    }

    /// The fds of `entries` (this snapshot's, taken out of it), in their
    /// order, borrowed from the locked registry (what a version-2 handover
    /// sends over its socket).
    pub(crate) fn fds_of(&self, entries: &[EntryMeta]) -> Vec<BorrowedFd<'_>> {
        entries
            .iter()
            .filter_map(|m| self._guard.entries.get(&m.name)?.borrowed_fd())
            .collect()
    }

    fn of_kinds(&self, kinds: &[Kind]) -> Vec<(&EntryMeta, BorrowedFd<'_>)> {
        self.entries
            .iter()
            .filter(|m| kinds.contains(&m.kind))
            .filter_map(|m| {
                let fd = self._guard.entries.get(&m.name)?.borrowed_fd()?;
                Some((m, fd))
            })
            .collect()
    }
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // The registry's invariants hold between statements, so a panic while
    // it was locked leaves it usable.
    registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check_runtime<T: FromFd>(name: &str) -> Result<()> {
    if T::TOKIO && tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Converts an fd of the registry, or a duplicate of one: close-on-exec
/// already (see [`socket::convert_own`]).
fn convert<T: FromFd>(name: &str, fd: OwnedFd) -> Result<T> {
    socket::convert_own(fd)
        .map_err(|e| Error::io(format!("cannot use {name:?} as {}", T::TYPE_NAME), e))
}

fn dup(name: &str, fd: &OwnedFd) -> Result<OwnedFd> {
    sys::dup_handed_on(fd.as_fd())
        .map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))
}

/// Hands the application the registry's fd of an entry it owns alone,
/// keeping its number and identity (the entry becomes lent).
fn lend(name: &str, entry: &mut Entry) -> Result<OwnedFd> {
    let Slot::Owned(fd) = &entry.slot else {
        return Err(Error::DuplicateName {
            name: name.to_owned(),
            what: entry.kind.describe(),
        });
    };
    let lent = match entry.owned_id.take() {
        // Read by the handover's checks, with the fd owned ever since.
        Some(id) => Lent {
            raw: fd.as_raw_fd(),
            id,
        },
        None => Lent::of(fd).map_err(|e| Error::io(format!("cannot inspect {name:?}"), e))?,
    };
    let Slot::Owned(fd) = std::mem::replace(&mut entry.slot, Slot::Lent(lent)) else {
        unreachable!("checked above");
    };
    Ok(fd)
}

/// The largest Unix socket path `bind` takes (`sun_path` less its NUL).
const MAX_UNIX_PATH: usize = 107;

impl Fds {
    pub(crate) fn new(inherited: Vec<Inherited>, defaults: Defaults) -> Self {
        let mut reg = Registry::default();
        reg.entries.reserve(inherited.len());
        for item in inherited {
            let mut entry = Entry::new(
                item.meta.kind,
                item.network,
                item.meta.address.clone(),
                Slot::Owned(item.fd),
            );
            entry.unclaimed = true;
            entry.owned_id = item.id;
            entry.activated = item.meta.activated;
            entry.unnamed = item.unnamed;
            if !item.meta.activated && item.network.is_some_and(Network::is_unix) {
                entry.file = inherited_file(&entry, &item.meta, &defaults.start_dir);
            }
            reg.insert(item.meta.name, entry);
        }
        Fds {
            registry: Arc::new(Mutex::new(reg)),
            defaults: Arc::new(defaults),
        }
    }

    /// Returns the listener handed on under the name `"{network}:{address}"`,
    /// or creates it. Go tableflip's `Fds.Listen`.
    ///
    /// A second call with the same non-zero address is refused with
    /// [`Error::AlreadyListening`] (one socket per address; keep the one
    /// you have). Port 0 means "any free port", so each call with port 0
    /// gets a socket of its own (named `"{network}:{address}"`, then
    /// `"…#2"`, `"…#3"`…), and the next generation inherits them in the
    /// same order.
    ///
    /// # Errors
    ///
    /// An unknown network, an invalid address, a type that cannot serve the
    /// network (e.g. `UnixListener` for `tcp`), a bind failure, a second
    /// claim of the same address, or a tokio type requested outside a
    /// runtime.
    pub fn listen<T: Listener>(&self, network: &str, address: &str) -> Result<T> {
        let name = self.default_name(network, address);
        self.listen_with(&ListenSpec::new(name, network, address))
    }

    /// Returns the listener handed on under `spec.name`, or creates it as
    /// `spec` says.
    ///
    /// An inherited socket of that name is used only when its network and
    /// address match `spec` (the address as configured, or the socket's
    /// actual address, so `127.0.0.1:0` is inherited with the port the first
    /// generation got). Otherwise a fresh socket is bound and the inherited
    /// one is closed at readiness. A socket passed by systemd's socket
    /// activation is used when its name is `spec.name`, or when systemd
    /// gave it no name of its own (no `FileDescriptorName=`) and its
    /// address is `spec`'s.
    ///
    /// # Errors
    ///
    /// As [`listen`](Self::listen); also [`Error::DuplicateName`] when the
    /// name is already used by this generation, and
    /// [`Error::AlreadyListening`] when this generation already listens on
    /// that (non-zero) address under another name.
    pub fn listen_with<T: Listener>(&self, spec: &ListenSpec) -> Result<T> {
        self.open(spec, Kind::Listener)
    }

    /// Returns the packet socket handed on under `"{network}:{address}"`, or
    /// creates it. Go tableflip's `Fds.ListenPacket`. Same rules as
    /// [`listen`](Self::listen).
    ///
    /// # Errors
    ///
    /// As [`listen`](Self::listen).
    pub fn listen_packet<T: PacketConn>(&self, network: &str, address: &str) -> Result<T> {
        let name = self.default_name(network, address);
        self.listen_packet_with(&ListenSpec::new(name, network, address))
    }

    /// Returns the packet socket handed on under `spec.name`, or creates it.
    ///
    /// # Errors
    ///
    /// As [`listen_with`](Self::listen_with).
    pub fn listen_packet_with<T: PacketConn>(&self, spec: &ListenSpec) -> Result<T> {
        self.open(spec, Kind::Packet)
    }

    /// `"{network}:{address}"`; for port 0, the first such name that this
    /// generation has not claimed yet (`…#2`, `…#3`…).
    fn default_name(&self, network: &str, address: &str) -> String {
        let base = format!("{network}:{address}");
        let port_zero = network
            .parse::<Network>()
            .ok()
            .and_then(|n| n.parse_address(address).ok())
            .is_some_and(|a| matches!(a, Address::Inet(a) if a.port() == 0));
        if !port_zero {
            return base;
        }
        let reg = lock(&self.registry);
        let mut name = base.clone();
        let mut n = 1;
        while reg.entries.get(&name).is_some_and(|e| !e.unclaimed) {
            n += 1;
            name = format!("{base}#{n}");
        }
        name
    }

    fn open<T: FromFd>(&self, spec: &ListenSpec, kind: Kind) -> Result<T> {
        let network: Network = spec.network.parse()?;
        if !T::serves(network) {
            return Err(Error::WrongType {
                name: spec.name.clone(),
                network: network.to_string(),
                type_name: T::TYPE_NAME,
            });
        }
        let wanted_kind = if network.is_stream() {
            Kind::Listener
        } else {
            Kind::Packet
        };
        if wanted_kind != kind {
            return Err(Error::WrongType {
                name: spec.name.clone(),
                network: network.to_string(),
                type_name: T::TYPE_NAME,
            });
        }
        check_runtime::<T>(&spec.name)?;
        let (fd, _) = self.open_fd(spec, network, kind)?;
        convert(&spec.name, fd)
    }

    /// Finds the inherited socket for `spec`, or binds one; returns the
    /// application's fd (the registry keeps its number) and whether it was
    /// inherited.
    pub(crate) fn open_fd(
        &self,
        spec: &ListenSpec,
        network: Network,
        kind: Kind,
    ) -> Result<(OwnedFd, bool)> {
        let parsed = network.parse_address(&spec.address)?;
        let (address, bind_address) = self.resolve_unix(network, &spec.address, parsed)?;
        let listen_error = |source| Error::Listen {
            name: spec.name.clone(),
            network: network.to_string(),
            address: spec.address.clone(),
            source,
        };
        let (backlog, setup) = {
            let mut reg = lock(&self.registry);
            if let Some(found) = self.claim_existing(&mut reg, spec, network, kind, &address)? {
                return Ok(found);
            }
            if let Some(key) = unnamed_activated(&reg, network, kind, &address) {
                if let Some(mut entry) = reg.entries.remove(&key) {
                    tracing::info!(listener = %spec.name, passed_as = %key, address = ?entry.address, "using the socket systemd passed without a name: its address is this listener's");
                    entry.unnamed = false;
                    let fd = lend(&spec.name, &mut entry)?;
                    entry.unclaimed = false;
                    reg.insert(spec.name.clone(), entry);
                    return Ok((fd, true));
                }
            }
            if let Some(other) = listening_on(&reg, network, &address) {
                return Err(Error::AlreadyListening {
                    name: spec.name.clone(),
                    network: network.to_string(),
                    address: spec.address.clone(),
                    by: other,
                });
            }
            (
                spec.backlog.unwrap_or(self.defaults.backlog),
                spec.setup.clone().or_else(|| self.defaults.setup.clone()),
            )
        };
        // Bound without the registry locked: a socket-setup hook may call
        // back into the registry.
        let file_path = match &address {
            Address::Path(p) => Some(p.as_path()),
            _ => None,
        };
        let bound = bind::bind(
            network,
            &bind_address,
            file_path,
            spec,
            backlog,
            setup.as_ref(),
        )
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                let reg = lock(&self.registry);
                if let Some(why) = explain_in_use(&reg, network, &address) {
                    return listen_error(std::io::Error::new(e.kind(), why));
                }
            }
            listen_error(e)
        })?;
        // Record the real address, so that port 0 is handed on as the port
        // the kernel picked.
        let recorded = match (&address, socket2::SockRef::from(&bound.fd).local_addr()) {
            (Address::Inet(_), Ok(local)) => local
                .as_socket()
                .map_or_else(|| address.to_string(), |a| a.to_string()),
            _ => address.to_string(),
        };
        tracing::debug!(name = %spec.name, %network, address = %recorded, "bound");
        let lent = Lent::of(&bound.fd)
            .map_err(|e| Error::io(format!("cannot inspect {:?}", spec.name), e))?;
        let mut entry = Entry::new(kind, Some(network), Some(recorded), Slot::Lent(lent));
        entry.created_here = true;
        entry.file = bound.file;
        let mut reg = lock(&self.registry);
        if reg.entries.contains_key(&spec.name) {
            // Claimed by another thread while this one was binding.
            if let Some(file) = &entry.file {
                file.remove();
            }
            return Err(Error::DuplicateName {
                name: spec.name.clone(),
                what: kind.describe(),
            });
        }
        reg.insert(spec.name.clone(), entry);
        Ok((bound.fd, false))
    }

    /// A relative Unix path, resolved once against the start directory:
    /// `(address to record and match, address to bind)`. The two differ
    /// only when the absolute path is too long to bind and the process is
    /// still in its start directory.
    fn resolve_unix(
        &self,
        network: Network,
        given: &str,
        parsed: Address,
    ) -> Result<(Address, Address)> {
        let Address::Path(rel) = &parsed else {
            return Ok((parsed.clone(), parsed));
        };
        if rel.is_absolute() {
            return Ok((parsed.clone(), parsed));
        }
        let abs = self.defaults.start_dir.join(rel);
        if abs.as_os_str().len() <= MAX_UNIX_PATH {
            return Ok((Address::Path(abs.clone()), Address::Path(abs)));
        }
        let in_start_dir = matches!(
            (FileId::of_path(Path::new(".")), FileId::of_path(&self.defaults.start_dir)),
            (Ok(a), Ok(b)) if a == b
        );
        if in_start_dir {
            return Ok((Address::Path(abs), parsed));
        }
        Err(Error::InvalidAddress {
            network: network.to_string(),
            address: given.to_owned(),
            reason: format!(
                "relative to the start directory it is {}, longer than {MAX_UNIX_PATH} bytes, and the process has left that directory",
                abs.display()
            ),
        })
    }

    /// The entry already registered under `spec.name`, claimed for the
    /// caller if it fits `spec`. `Ok(None)`: nothing usable (a stale
    /// inherited entry is moved aside), bind afresh.
    fn claim_existing(
        &self,
        reg: &mut Registry,
        spec: &ListenSpec,
        network: Network,
        kind: Kind,
        address: &Address,
    ) -> Result<Option<(OwnedFd, bool)>> {
        let Some(entry) = reg.entries.get_mut(&spec.name) else {
            return Ok(None);
        };
        if entry.activated {
            return take_activated(entry, spec, network, kind).map(Some);
        }
        let matches = entry.kind == kind
            && entry.network == Some(network)
            && address_matches(entry, &spec.address, address);
        if matches && entry.unclaimed {
            tracing::debug!(name = %spec.name, %network, address = %spec.address, "inherited");
            let fd = lend(&spec.name, entry)?;
            entry.unclaimed = false;
            return Ok(Some((fd, true)));
        }
        if matches {
            return Err(Error::AlreadyListening {
                name: spec.name.clone(),
                network: network.to_string(),
                address: spec.address.clone(),
                by: spec.name.clone(),
            });
        }
        if !entry.unclaimed {
            return Err(Error::DuplicateName {
                name: spec.name.clone(),
                what: entry.kind.describe(),
            });
        }
        tracing::info!(
            name = %spec.name,
            inherited = ?entry.address,
            configured = %spec.address,
            "address changed since the previous generation; binding afresh, the old socket closes at readiness"
        );
        if let Some(old) = reg.entries.remove(&spec.name) {
            reg.stale.push((spec.name.clone(), old));
        }
        Ok(None)
    }

    /// The listener handed on (or opened in this generation) under `name`,
    /// without creating one. Returns `Ok(None)` when there is none.
    ///
    /// An inherited listener nobody has claimed is handed over as it is
    /// (it then costs one fd); asking again for one the application
    /// already holds gives another handle, and the registry then keeps a
    /// copy of its own.
    ///
    /// # Errors
    ///
    /// When the entry is not a listener, its network cannot be served by `T`,
    /// the application closed the handle it had, or duplicating the fd
    /// fails.
    pub fn listener<T: Listener>(&self, name: &str) -> Result<Option<T>> {
        self.lookup_shared(name, Kind::Listener)
    }

    /// The packet socket handed on (or opened) under `name`, without creating
    /// one; as [`listener`](Self::listener).
    ///
    /// # Errors
    ///
    /// As [`listener`](Self::listener).
    pub fn packet_conn<T: PacketConn>(&self, name: &str) -> Result<Option<T>> {
        self.lookup_shared(name, Kind::Packet)
    }

    fn lookup_shared<T: FromFd>(&self, name: &str, kind: Kind) -> Result<Option<T>> {
        check_runtime::<T>(name)?;
        let mut reg = lock(&self.registry);
        let Some(entry) = reg.entries.get_mut(name) else {
            return Ok(None);
        };
        check_entry::<T>(name, entry, kind)?;
        let fd = match &entry.slot {
            Slot::Owned(_) if entry.unclaimed => lend(name, entry)?,
            Slot::Owned(own) | Slot::Shared { own, .. } => dup(name, own)?,
            Slot::Lent(lent) => {
                let copy = lent
                    .copy()
                    .map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))?;
                let Some(own) = copy else {
                    return Err(Error::HandleClosed {
                        name: name.to_owned(),
                    });
                };
                let handle = dup(name, &own)?;
                entry.slot = Slot::Shared {
                    own,
                    lent: lent.clone(),
                };
                handle
            }
        };
        entry.unclaimed = false;
        drop(reg);
        convert(name, fd).map(Some)
    }

    /// Takes the connection handed on under `name`. It stays registered (and
    /// is handed on at the next upgrade) until the returned guard is dropped,
    /// which closes it.
    ///
    /// # Errors
    ///
    /// As [`listener`](Self::listener).
    pub fn conn<T: Conn>(&self, name: &str) -> Result<Option<Handover<T>>> {
        self.lookup_guarded(name, Kind::Conn)
    }

    /// Takes the file handed on under `name`; as [`conn`](Self::conn).
    ///
    /// # Errors
    ///
    /// As [`listener`](Self::listener).
    pub fn file<T: File>(&self, name: &str) -> Result<Option<Handover<T>>> {
        self.lookup_guarded(name, Kind::File)
    }

    fn lookup_guarded<T: FromFd + AsFd>(
        &self,
        name: &str,
        kind: Kind,
    ) -> Result<Option<Handover<T>>> {
        check_runtime::<T>(name)?;
        let mut reg = lock(&self.registry);
        let Some(entry) = reg.entries.get_mut(name) else {
            return Ok(None);
        };
        if kind == Kind::File {
            if entry.kind != Kind::File {
                return Err(mismatch(
                    name,
                    kind,
                    format!("it was handed on as a {}", entry.kind.describe()),
                ));
            }
        } else {
            check_entry::<T>(name, entry, kind)?;
        }
        let Slot::Owned(own) = &entry.slot else {
            return Err(mismatch(name, kind, "it is a shared socket".to_owned()));
        };
        if entry.guarded {
            return Err(Error::DuplicateName {
                name: name.to_owned(),
                what: "connection or file already taken",
            });
        }
        let fd = dup(name, own)?;
        entry.guarded = true;
        entry.unclaimed = false;
        let id = entry.id;
        drop(reg);
        let value = socket::convert::<T>(fd)
            .map_err(|e| Error::io(format!("cannot use {name:?} as {}", T::TYPE_NAME), e))?;
        Ok(Some(Handover {
            value: Some(value),
            registry: Arc::clone(&self.registry),
            name: name.to_owned(),
            id,
        }))
    }

    /// Hands `listener` on to the next generation under `name`. The
    /// registry keeps its number, not an fd of its own (see
    /// [`Fds`]): closing `listener` stops handing it on.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] if `name` is taken; an error if the socket is
    /// not a listening socket of a supported network.
    pub fn add_listener<T: Listener + AsFd>(&self, name: &str, listener: &T) -> Result<()> {
        self.add_shared(name, listener.as_fd(), Kind::Listener)
    }

    /// Hands `socket` on to the next generation under `name`; as
    /// [`add_listener`](Self::add_listener).
    ///
    /// # Errors
    ///
    /// As [`add_listener`](Self::add_listener).
    pub fn add_packet_conn<T: PacketConn + AsFd>(&self, name: &str, socket: &T) -> Result<()> {
        self.add_shared(name, socket.as_fd(), Kind::Packet)
    }

    fn add_shared(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>, kind: Kind) -> Result<()> {
        let (network, address) = socket::inspect(fd, kind).map_err(|r| mismatch(name, kind, r))?;
        let lent = Lent {
            raw: fd.as_raw_fd(),
            id: SockId::of(fd).map_err(|e| Error::io(format!("cannot inspect {name:?}"), e))?,
        };
        let entry = Entry::new(kind, Some(network), Some(address), Slot::Lent(lent));
        self.insert(name, entry).map(|_| ())
    }

    /// Hands `conn` on to the next generation under `name`. The guard owns
    /// the connection; dropping it closes the connection and stops handing
    /// it on.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] if `name` is taken; an error if `conn` is not
    /// a connected socket of a supported network; [`Error::Supervisor`] in
    /// a generation of a supervised service whose supervisor runs an older
    /// build of tableflip, which hands on listening sockets only
    /// (restarting the service replaces the supervisor too).
    pub fn add_conn<T: Conn>(&self, name: &str, conn: T) -> Result<Handover<T>> {
        self.check_handed_on(name, "connection")?;
        let (network, address) =
            socket::inspect(conn.as_fd(), Kind::Conn).map_err(|r| mismatch(name, Kind::Conn, r))?;
        let own = sys::dup_handed_on(conn.as_fd())
            .map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))?;
        let mut entry = Entry::new(Kind::Conn, Some(network), Some(address), Slot::Owned(own));
        entry.guarded = true;
        let id = self.insert(name, entry)?;
        Ok(Handover {
            value: Some(conn),
            registry: Arc::clone(&self.registry),
            name: name.to_owned(),
            id,
        })
    }

    /// Hands `file` on to the next generation under `name`; as
    /// [`add_conn`](Self::add_conn).
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] if `name` is taken; an error if `file` is a
    /// socket; [`Error::Supervisor`] as for `add_conn`.
    pub fn add_file<T: File>(&self, name: &str, file: T) -> Result<Handover<T>> {
        self.check_handed_on(name, "file")?;
        socket::check_fd(file.as_fd(), Kind::File, None)
            .map_err(|r| mismatch(name, Kind::File, r))?;
        let own = sys::dup_handed_on(file.as_fd())
            .map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))?;
        let mut entry = Entry::new(Kind::File, None, None, Slot::Owned(own));
        entry.guarded = true;
        let id = self.insert(name, entry)?;
        Ok(Handover {
            value: Some(file),
            registry: Arc::clone(&self.registry),
            name: name.to_owned(),
            id,
        })
    }

    /// Marks this process as a generation of a supervised service whose
    /// supervisor collects connections and files before an upgrade, or
    /// not (`collects`).
    pub(crate) fn set_supervised(&self, collects: bool) {
        lock(&self.registry).listeners_only = !collects;
    }

    /// Connections and files are handed on in replace mode, and through a
    /// supervisor that collects them.
    fn check_handed_on(&self, name: &str, what: &str) -> Result<()> {
        if lock(&self.registry).listeners_only {
            return Err(Error::Supervisor {
                reason: format!(
                    "the {what} {name:?} cannot be handed on: the supervisor that started this generation runs an older tableflip, which hands on listening sockets only; restart the service (its supervisor then runs this binary), or run in replace mode (TABLEFLIP_MODE=replace, or #[tableflip::main(mode = \"replace\")])"
                ),
            });
        }
        Ok(())
    }

    fn insert(&self, name: &str, entry: Entry) -> Result<u64> {
        let mut reg = lock(&self.registry);
        if let Some(existing) = reg.entries.get(name) {
            if !existing.unclaimed {
                return Err(Error::DuplicateName {
                    name: name.to_owned(),
                    what: existing.kind.describe(),
                });
            }
            // An unclaimed inherited entry is replaced by what the
            // application hands on now.
            if let Some(old) = reg.entries.remove(name) {
                reg.stale.push((name.to_owned(), old));
            }
        }
        Ok(reg.insert(name.to_owned(), entry))
    }

    /// Stops handing `name` on. A listener or packet socket the registry
    /// holds a copy of is closed (the application's own handles stay
    /// open). Returns whether there was such an entry.
    pub fn remove(&self, name: &str) -> bool {
        lock(&self.registry).entries.remove(name).is_some()
    }

    /// The names currently registered, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.registry).entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// Closes inherited entries nobody claimed, and stale replaced ones.
    /// Returns the Unix socket files to remove once the handover has
    /// committed (until then the previous generation still serves on them),
    /// and the names of the listeners and packet sockets closed.
    pub(crate) fn close_unclaimed(&self) -> (Vec<SocketFile>, Vec<String>) {
        let mut reg = lock(&self.registry);
        let names: Vec<String> = reg
            .entries
            .iter()
            .filter(|(_, e)| e.unclaimed)
            .map(|(n, _)| n.clone())
            .collect();
        let mut closed: Vec<(String, Entry)> = std::mem::take(&mut reg.stale);
        for name in names {
            if let Some(entry) = reg.entries.remove(&name) {
                if entry.unnamed {
                    tracing::warn!(passed_as = %name, address = ?entry.address, "closing a socket systemd passed without a name that matches no listener's address; name it after its listener with FileDescriptorName= in the socket unit");
                } else {
                    tracing::info!(name = %name, kind = entry.kind.describe(), "closing inherited fd nobody claimed");
                }
                closed.push((name, entry));
            }
        }
        let in_use: Vec<&Path> = reg
            .entries
            .values()
            .filter_map(|e| e.file.as_ref().map(|f| f.path.as_path()))
            .collect();
        let files = closed
            .iter()
            .filter_map(|(_, e)| e.file.clone())
            .filter(|f| !in_use.contains(&f.path.as_path()))
            .collect();
        let names = closed
            .iter()
            .filter(|(_, e)| matches!(e.kind, Kind::Listener | Kind::Packet) && !e.activated)
            .map(|(n, _)| n.clone())
            .collect();
        (files, names)
        // `closed` drops here, closing the fds.
    }

    /// The listeners and packet sockets this generation bound itself, each
    /// with a copy of its fd: what goes to systemd's fd store (replace
    /// mode). Sockets the application has closed are left out.
    pub(crate) fn created_sockets(&self) -> Vec<(String, OwnedFd)> {
        self.socket_copies(|_, e| e.created_here)
    }

    /// The listeners and packet sockets named in `names` that are neither
    /// bound here nor a socket unit's (inherited ones, which may have come
    /// from systemd's fd store), each with a copy of its fd.
    pub(crate) fn stored_sockets(&self, names: &[String]) -> Vec<(String, OwnedFd)> {
        self.socket_copies(|name, e| !e.created_here && !e.activated && names.contains(name))
    }

    fn socket_copies(&self, pick: impl Fn(&String, &Entry) -> bool) -> Vec<(String, OwnedFd)> {
        let reg = lock(&self.registry);
        let mut out: Vec<(String, OwnedFd)> = reg
            .entries
            .iter()
            .filter(|(n, e)| matches!(e.kind, Kind::Listener | Kind::Packet) && pick(n, e))
            .filter_map(|(name, e)| {
                let fd = match &e.slot {
                    Slot::Owned(fd) | Slot::Shared { own: fd, .. } => fd.try_clone().ok(),
                    Slot::Lent(lent) => lent.copy().ok().flatten(),
                }?;
                Some((name.clone(), fd))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The activated sockets systemd passed without a name of ours that
    /// nothing has claimed: `(how systemd named it, its network and
    /// address)`.
    pub(crate) fn unclaimed_unnamed(&self) -> Vec<(String, String)> {
        let reg = lock(&self.registry);
        let mut out: Vec<(String, String)> = reg
            .entries
            .iter()
            .filter(|(_, e)| e.unnamed && e.unclaimed)
            .map(|(n, e)| {
                let network = e.network.map_or("?", Network::as_str);
                let address = e.address.as_deref().unwrap_or("?");
                (
                    n.split('#').next().unwrap_or(n).to_owned(),
                    format!("{network} {address}"),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Closes the registry's own handles of listeners and packet sockets:
    /// after a real stop nobody will accept on them any more, and a socket
    /// kept open would let clients connect into a queue nobody serves. The
    /// application's handles stay open until it drops them.
    pub(crate) fn close_shared(&self) {
        let mut reg = lock(&self.registry);
        reg.entries
            .retain(|_, e| !matches!(e.kind, Kind::Listener | Kind::Packet));
        reg.stale.clear();
    }

    /// The Unix socket files this generation is responsible for removing
    /// when the service really stops: those of every socket once it is
    /// ready, only those it created itself before; none once ready when
    /// systemd's fd store keeps the sockets (`stored`: the next start
    /// serves on them again).
    pub(crate) fn owned_unix_files(&self, ready: bool, stored: bool) -> Vec<SocketFile> {
        if ready && stored {
            return Vec::new();
        }
        lock(&self.registry)
            .entries
            .iter()
            // The control socket's file goes at the exit: the service
            // answers on it while it drains.
            .filter(|(name, _)| name.as_str() != crate::ctl::LISTENER_NAME)
            .map(|(_, e)| e)
            .filter(|e| ready || e.created_here)
            // The file of a socket systemd passed belongs to its socket unit.
            .filter(|e| !e.activated)
            .filter(|e| matches!(e.kind, Kind::Listener | Kind::Packet))
            .filter_map(|e| e.file.clone())
            .collect()
    }

    /// The control socket's file, if this generation serves one and owns
    /// its file (see [`owned_unix_files`](Self::owned_unix_files)).
    pub(crate) fn control_socket_file(&self, ready: bool) -> Option<SocketFile> {
        let reg = lock(&self.registry);
        let e = reg.entries.get(crate::ctl::LISTENER_NAME)?;
        if !(ready || e.created_here) || e.activated {
            return None;
        }
        e.file.clone()
    }

    /// How many fds the registry holds: about what a handover would carry.
    pub(crate) fn count(&self) -> usize {
        lock(&self.registry).entries.len()
    }

    /// Locks the registry and describes every entry for the next
    /// generation. The lock is held until the snapshot is dropped, so no fd
    /// named in it can be closed while the child is spawned.
    ///
    /// Each socket the application holds is duplicated now, and the copy
    /// checked to still be that socket (the registry keeps the copy: see
    /// [`release_copies`](Self::release_copies)); one the application has
    /// closed is no longer handed on.
    pub(crate) fn snapshot(&self) -> Result<Snapshot<'_>> {
        let mut guard = lock(&self.registry);
        let reg = &mut *guard;
        let mut closed = Vec::new();
        for (name, entry) in &mut reg.entries {
            if let Slot::Lent(lent) = &entry.slot {
                let copy = lent
                    .copy()
                    .map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))?;
                match copy {
                    Some(own) => {
                        entry.slot = Slot::Shared {
                            own,
                            lent: lent.clone(),
                        };
                    }
                    None => closed.push(name.clone()),
                }
            }
        }
        for name in closed {
            tracing::info!(name = %name, "the application closed this socket; it is no longer handed on");
            reg.entries.remove(&name);
        }
        for entry in reg.entries.values_mut() {
            if let Some(fd) = entry.borrowed_fd() {
                entry.was_blocking =
                    entry.kind != Kind::File && sys::is_nonblocking(fd).is_ok_and(|nb| !nb);
            }
        }
        let mut names: Vec<&String> = reg.entries.keys().collect();
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        let mut fds = Vec::with_capacity(names.len());
        for name in names {
            let Some(e) = reg.entries.get(name) else {
                continue;
            };
            let Some(fd) = e.raw_fd() else {
                continue;
            };
            entries.push(EntryMeta {
                name: name.clone(),
                kind: e.kind,
                fd,
                network: e.network.map(|n| n.to_string()),
                address: e.address.clone(),
                activated: e.activated,
                file_dev: e.file.as_ref().and_then(|f| f.id).map(|id| id.dev),
                file_ino: e.file.as_ref().and_then(|f| f.id).map(|id| id.ino),
                cookie: e.cookie(),
            });
            fds.push(fd);
        }
        Ok(Snapshot {
            _guard: guard,
            entries,
            fds,
        })
    }

    /// After a failed upgrade: drops the copies [`snapshot`](Self::snapshot)
    /// made of the sockets the application still holds, so the service is
    /// back to one fd per listener, and puts sockets that were in blocking
    /// mode back in it.
    pub(crate) fn release_copies(&self) {
        let mut reg = lock(&self.registry);
        // Closed by the application meanwhile: no longer handed on (a
        // copy kept would let clients connect into a queue nobody serves).
        let gone: Vec<String> = reg
            .entries
            .iter()
            .filter(|(_, e)| matches!(&e.slot, Slot::Shared { lent, .. } if !lent.alive()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            tracing::info!(name = %name, "the application closed this socket; it is no longer handed on");
            reg.entries.remove(&name);
        }
        for entry in reg.entries.values_mut() {
            if std::mem::take(&mut entry.was_blocking) {
                if let Some(fd) = entry.borrowed_fd() {
                    if let Err(e) = sys::set_blocking(fd) {
                        tracing::debug!(error = %e, "cannot make a socket blocking again");
                    }
                }
            }
            if let Slot::Shared { lent, .. } = &entry.slot {
                entry.slot = Slot::Lent(lent.clone());
            }
        }
    }
}

/// The file an inherited Unix socket is bound to: its path from the socket
/// itself (never from the metadata, which could name any file), its
/// identity from the kernel, else as the parent recorded it.
fn inherited_file(entry: &Entry, meta: &EntryMeta, start_dir: &Path) -> Option<SocketFile> {
    let fd = match &entry.slot {
        Slot::Owned(fd) => fd.as_fd(),
        _ => return None,
    };
    socket_file(fd, meta, start_dir)
}

/// The file of the Unix socket `fd`, handed on as `meta`: its path as the
/// socket reports it (relative ones against `start_dir`), identified by
/// the kernel where it can, else as the entry recorded it. `None` for an
/// abstract or unnamed socket.
pub(crate) fn socket_file(
    fd: BorrowedFd<'_>,
    meta: &EntryMeta,
    start_dir: &Path,
) -> Option<SocketFile> {
    let path = start_dir.join(socket::unix_path(fd)?);
    let mut file = SocketFile::bound(path.clone(), &path, fd);
    if file.id.is_none() {
        // No word from the kernel: as the parent recorded it.
        file.id = match (meta.file_dev, meta.file_ino) {
            (Some(dev), Some(ino)) => Some(FileId { dev, ino }),
            _ => None,
        };
    }
    Some(file)
}

fn mismatch(name: &str, kind: Kind, reason: String) -> Error {
    Error::InheritMismatch {
        what: kind.describe(),
        name: name.to_owned(),
        reason,
    }
}

fn check_entry<T: FromFd>(name: &str, entry: &Entry, kind: Kind) -> Result<()> {
    if entry.kind != kind {
        return Err(mismatch(
            name,
            kind,
            format!("it was handed on as a {}", entry.kind.describe()),
        ));
    }
    if let Some(network) = entry.network {
        if !T::serves(network) {
            return Err(Error::WrongType {
                name: name.to_owned(),
                network: network.to_string(),
                type_name: T::TYPE_NAME,
            });
        }
    }
    Ok(())
}

/// Whether two networks' sockets are of one kind: same family (Unix or
/// IP) and type (stream, datagram, seqpacket).
fn same_family(a: Network, b: Network) -> bool {
    a.is_unix() == b.is_unix() && a.socket_type() == b.socket_type()
}

/// A socket passed by systemd under the listener's name: the socket unit
/// decides the address, so only the kind of socket must agree.
fn take_activated(
    entry: &mut Entry,
    spec: &ListenSpec,
    network: Network,
    kind: Kind,
) -> Result<(OwnedFd, bool)> {
    let have = entry.network.map_or("?", Network::as_str);
    if entry.kind != kind || !entry.network.is_some_and(|n| same_family(n, network)) {
        return Err(Error::InheritMismatch {
            what: kind.describe(),
            name: spec.name.clone(),
            reason: format!(
                "the socket systemd passed under this name is a {have} {}, but the listener is declared {network}",
                entry.kind.describe()
            ),
        });
    }
    if !entry.unclaimed {
        return Err(Error::DuplicateName {
            name: spec.name.clone(),
            what: entry.kind.describe(),
        });
    }
    if entry.address.as_deref() != Some(spec.address.as_str()) {
        tracing::info!(
            name = %spec.name,
            address = ?entry.address,
            declared = %spec.address,
            "using the socket systemd passed; its socket unit sets the address"
        );
    }
    let fd = lend(&spec.name, entry)?;
    entry.unclaimed = false;
    Ok((fd, true))
}

/// The key of an unclaimed activated socket that systemd passed without a
/// name of ours, of the right kind, bound to `address`.
fn unnamed_activated(
    reg: &Registry,
    network: Network,
    kind: Kind,
    address: &Address,
) -> Option<String> {
    let mut keys: Vec<&String> = reg
        .entries
        .iter()
        .filter(|(_, e)| e.unnamed && e.unclaimed && e.kind == kind)
        .filter(|(_, e)| e.network.is_some_and(|n| same_family(n, network)))
        .filter(|(_, e)| {
            e.resolved()
                .is_some_and(|have| same_address(&have, address))
        })
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    keys.first().map(|k| (*k).clone())
}

/// Two addresses that name the same socket address: equal, or both the
/// wildcard address of one port (`0.0.0.0:80` and `[::]:80`: systemd's
/// `ListenStream=80` binds the dual-stack wildcard).
fn same_address(a: &Address, b: &Address) -> bool {
    match (a, b) {
        (Address::Inet(x), Address::Inet(y)) => {
            x == y || (x.port() == y.port() && x.ip().is_unspecified() && y.ip().is_unspecified())
        }
        _ => a == b,
    }
}

/// Two IP socket addresses that the kernel will not bind both (for
/// sockets without `SO_REUSEPORT`): one port, and the same IP or a
/// wildcard on either side.
fn overlapping(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The name of a claimed entry of this generation already on `address`
/// (same family and type); never for port 0, which asks for a new port
/// each time.
fn listening_on(reg: &Registry, network: Network, address: &Address) -> Option<String> {
    if matches!(address, Address::Inet(a) if a.port() == 0) {
        return None;
    }
    let mut names: Vec<&String> = reg
        .entries
        .iter()
        .filter(|(_, e)| !e.unclaimed && matches!(e.kind, Kind::Listener | Kind::Packet))
        .filter(|(_, e)| e.network.is_some_and(|n| same_family(n, network)))
        .filter(|(_, e)| e.resolved().is_some_and(|have| have == *address))
        .map(|(n, _)| n)
        .collect();
    names.sort();
    names.first().map(|n| (*n).clone())
}

/// Why binding `address` failed with "address in use", when an entry of
/// the registry is the reason.
fn explain_in_use(reg: &Registry, network: Network, address: &Address) -> Option<String> {
    let all = reg
        .entries
        .iter()
        .map(|(n, e)| (n.as_str(), e))
        .chain(reg.stale.iter().map(|(n, e)| (n.as_str(), e)));
    for (name, e) in all {
        if !e.network.is_some_and(|n| same_family(n, network)) {
            continue;
        }
        let Some(have) = e.resolved() else {
            continue;
        };
        let clash = match (&have, address) {
            (Address::Inet(h), Address::Inet(w)) => overlapping(h, w),
            (h, w) => h == w,
        };
        if !clash {
            continue;
        }
        let name = name.split('#').next().unwrap_or(name);
        if e.activated {
            return Some(format!(
                "systemd passed a socket on {have} (as {name:?}) that no listener claimed; name it after the listener it is for with FileDescriptorName= in its socket unit (or --fdname= for systemd-socket-activate)"
            ));
        }
        if !e.created_here {
            let port = match &have {
                Address::Inet(h) => format!("port {}", h.port()),
                other => other.to_string(),
            };
            return Some(format!(
                "{port} is still held by the socket the previous generation handed over on {have} (listener {name:?}), which stays open until that generation exits. A listener cannot move to an overlapping address on the same port with an upgrade: restart the service instead, or have both releases set SO_REUSEPORT (Options::socket_setup)"
            ));
        }
        return Some(format!(
            "this generation already listens on {have} (listener {name:?})"
        ));
    }
    None
}

fn address_matches(entry: &Entry, configured: &str, resolved: &Address) -> bool {
    if entry.address.as_deref() == Some(configured) {
        return true;
    }
    match (entry.resolved(), resolved) {
        // Port 0 asks for any port: the one already picked matches.
        (Some(Address::Inet(have)), Address::Inet(want)) => {
            have == *want || (want.port() == 0 && have.ip() == want.ip())
        }
        (Some(have), want) => have == *want,
        _ => false,
    }
}

/// A connection or file registered for handover, owned by the application.
///
/// Dereferences to the wrapped value. Dropping the guard stops handing the
/// value on and then closes it, so a connection really closes (Go
/// tableflip's issue #74). [`into_inner`](Self::into_inner) stops handing it
/// on and returns the value.
///
/// The registry keeps a copy of the fd that was registered, and that is
/// what the next generation gets: replacing the value through
/// `DerefMut` (`std::mem::replace`) changes what this process uses, never
/// what is handed on.
#[derive(Debug)]
pub struct Handover<T: AsFd> {
    value: Option<T>,
    registry: Arc<Mutex<Registry>>,
    name: String,
    id: u64,
}

impl<T: AsFd> Handover<T> {
    /// The name it is handed on under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops handing the value on and returns it.
    pub fn into_inner(mut self) -> T {
        self.unregister();
        match self.value.take() {
            Some(v) => v,
            // `value` is `Some` from construction until drop or here.
            None => unreachable!("Handover value already taken"),
        }
    }

    fn unregister(&self) {
        unregister(&mut lock(&self.registry), &self.name, self.id);
    }
}

fn unregister(reg: &mut Registry, name: &str, id: u64) {
    if reg.entries.get(name).is_some_and(|e| e.id == id) {
        reg.entries.remove(name);
    }
}

impl<T: AsFd> std::ops::Deref for Handover<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.value {
            Some(v) => v,
            None => unreachable!("Handover value already taken"),
        }
    }
}

impl<T: AsFd> std::ops::DerefMut for Handover<T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.value {
            Some(v) => v,
            None => unreachable!("Handover value already taken"),
        }
    }
}

impl<T: AsFd> Drop for Handover<T> {
    fn drop(&mut self) {
        if self.value.is_none() {
            return;
        }
        // The registry's copy first, then the application's: the
        // connection really closes (unless a next generation has it).
        self.unregister();
        drop(self.value.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds() -> Fds {
        Fds::new(
            Vec::new(),
            Defaults {
                backlog: 16,
                setup: None,
                start_dir: PathBuf::from("/"),
            },
        )
    }

    fn dev_null() -> std::fs::File {
        match std::fs::File::open("/dev/null") {
            Ok(f) => f,
            Err(e) => panic!("cannot open /dev/null: {e}"),
        }
    }

    #[test]
    fn a_supervisor_that_does_not_collect_makes_handing_on_an_error_naming_why() {
        let fds = fds();
        fds.set_supervised(false);
        match fds.add_file("state", dev_null()) {
            Err(Error::Supervisor { reason }) => {
                assert!(reason.contains("\"state\""), "{reason}");
                assert!(reason.contains("older tableflip"), "{reason}");
                assert!(reason.contains("TABLEFLIP_MODE=replace"), "{reason}");
            }
            other => panic!("expected Error::Supervisor, got {other:?}"),
        }
        assert!(fds.names().is_empty(), "nothing registered");
    }

    #[test]
    fn a_supervisor_that_collects_lets_files_be_handed_on() {
        let fds = fds();
        fds.set_supervised(true);
        let kept = fds.add_file("state", dev_null());
        assert!(kept.is_ok(), "{kept:?}");
        let snapshot = fds.snapshot();
        let Ok(snapshot) = snapshot else {
            panic!("no snapshot");
        };
        let handed: Vec<&str> = snapshot
            .handed_on()
            .iter()
            .map(|(m, _)| m.name.as_str())
            .collect();
        assert_eq!(handed, ["state"]);
        assert!(snapshot.sockets().is_empty());
    }

    /// The snapshot sends each socket's cookie (the next generation's one
    /// check of it), read when the application took the socket; a file
    /// has none. A socket the application closed is not handed on, and a
    /// number reused by another socket is not mistaken for it.
    #[test]
    fn the_snapshot_sends_socket_cookies_and_drops_closed_sockets() {
        let fds = fds();
        let spec = crate::ListenSpec::new("web", "tcp", "127.0.0.1:0");
        let listener = match fds.listen_with::<std::net::TcpListener>(&spec) {
            Ok(l) => l,
            Err(e) => panic!("cannot listen: {e}"),
        };
        let cookie = socket2::SockRef::from(&listener).cookie().ok();
        assert!(cookie.is_some(), "this kernel reads socket cookies");
        let kept = fds.add_file("state", dev_null());
        assert!(kept.is_ok(), "{kept:?}");
        {
            let Ok(snapshot) = fds.snapshot() else {
                panic!("no snapshot");
            };
            let mut sent: Vec<(&str, Option<u64>)> = snapshot
                .entries
                .iter()
                .map(|m| (m.name.as_str(), m.cookie))
                .collect();
            sent.sort_unstable();
            assert_eq!(sent, [("state", None), ("web", cookie)]);
        }
        fds.release_copies();
        // Closed, and its number most likely taken by another socket (the
        // lowest free number; another test thread may take it first).
        drop(listener);
        let _other = match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => panic!("cannot bind: {e}"),
        };
        let Ok(snapshot) = fds.snapshot() else {
            panic!("no snapshot");
        };
        let names: Vec<&str> = snapshot.entries.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["state"]);
    }
}
