//! The named fds a generation hands to the next: listeners, packet
//! sockets, connections and files.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bind::{self, ListenSpec, SetupHook};
use crate::error::{Error, Result};
use crate::network::{Address, Network};
use crate::protocol::EntryMeta;
use crate::socket::{self, Conn, File, FromFd, Kind, Listener, PacketConn};

/// How an entry holds its fd.
#[derive(Debug)]
enum Slot {
    /// The registry owns this fd (listeners and packet sockets keep their
    /// own duplicate; unclaimed inherited entries of every kind).
    Owned(OwnedFd),
    /// The application owns the fd through a [`Handover`] guard, which
    /// removes the entry (under the registry lock) before it closes the fd.
    Lent { raw: RawFd },
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    network: Option<Network>,
    address: Option<String>,
    slot: Slot,
    /// Inherited and not yet asked for by this generation.
    unclaimed: bool,
    /// A Unix socket file this generation created itself.
    created_here: bool,
    /// Passed by socket activation: matched by name, whatever the address.
    activated: bool,
    /// Identifies a lent entry, so a guard never removes a newer entry
    /// that reuses the name.
    id: u64,
}

impl Entry {
    fn raw_fd(&self) -> RawFd {
        match &self.slot {
            Slot::Owned(fd) => fd.as_raw_fd(),
            Slot::Lent { raw } => *raw,
        }
    }

    fn unix_path(&self) -> Option<PathBuf> {
        let network = self.network?;
        if !network.is_unix() {
            return None;
        }
        match network.parse_address(self.address.as_deref()?) {
            Ok(Address::Path(p)) => Some(p),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: HashMap<String, Entry>,
    /// Inherited entries replaced by a socket of the same name but another
    /// address; closed at readiness.
    stale: Vec<Entry>,
    next_id: u64,
}

/// The named sockets and files this generation holds, and will hand to the
/// next one.
///
/// Obtained from [`Upgrader::fds`](crate::Upgrader::fds). Cheap to clone;
/// all clones share one registry.
///
/// Listeners and packet sockets: the registry keeps its own duplicate of
/// each, so the application may close its handle at any time (for example
/// while draining) without affecting the next generation, and without ever
/// unlinking a Unix socket path.
///
/// Connections and files: the registry keeps no duplicate. They come wrapped
/// in a [`Handover`] guard; dropping the guard really closes the fd (and
/// stops handing it on), so a peer sees the connection close.
#[derive(Debug, Clone)]
pub struct Fds {
    pub(crate) registry: Arc<Mutex<Registry>>,
    defaults: Arc<Defaults>,
}

pub(crate) struct Defaults {
    pub(crate) backlog: u32,
    pub(crate) setup: Option<SetupHook>,
}

impl std::fmt::Debug for Defaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Defaults")
            .field("backlog", &self.backlog)
            .finish_non_exhaustive()
    }
}

/// One inherited entry, checked, with its fd owned.
pub(crate) struct Inherited {
    pub(crate) meta: EntryMeta,
    pub(crate) network: Option<Network>,
    pub(crate) fd: OwnedFd,
}

/// What the handover needs of the registry while the child is spawned.
pub(crate) struct Snapshot<'a> {
    pub(crate) _guard: MutexGuard<'a, Registry>,
    pub(crate) entries: Vec<EntryMeta>,
    pub(crate) fds: Vec<RawFd>,
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

fn convert<T: FromFd>(name: &str, fd: OwnedFd) -> Result<T> {
    socket::convert(fd)
        .map_err(|e| Error::io(format!("cannot use {name:?} as {}", T::TYPE_NAME), e))
}

fn dup(name: &str, fd: &OwnedFd) -> Result<OwnedFd> {
    // `try_clone_to_owned` duplicates with F_DUPFD_CLOEXEC.
    fd.try_clone()
        .map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))
}

impl Fds {
    pub(crate) fn new(inherited: Vec<Inherited>, backlog: u32, setup: Option<SetupHook>) -> Self {
        let mut reg = Registry::default();
        for item in inherited {
            reg.next_id += 1;
            let entry = Entry {
                kind: item.meta.kind,
                network: item.network,
                address: item.meta.address.clone(),
                slot: Slot::Owned(item.fd),
                unclaimed: true,
                created_here: false,
                activated: item.meta.activated,
                id: reg.next_id,
            };
            reg.entries.insert(item.meta.name, entry);
        }
        Fds {
            registry: Arc::new(Mutex::new(reg)),
            defaults: Arc::new(Defaults { backlog, setup }),
        }
    }

    /// Returns the listener handed on under the name `"{network}:{address}"`,
    /// or creates it. Go tableflip's `Fds.Listen`.
    ///
    /// # Errors
    ///
    /// An unknown network, an invalid address, a type that cannot serve the
    /// network (e.g. `UnixListener` for `tcp`), a bind failure, or a tokio
    /// type requested outside a runtime.
    pub fn listen<T: Listener>(&self, network: &str, address: &str) -> Result<T> {
        self.listen_with(&ListenSpec::new(
            format!("{network}:{address}"),
            network,
            address,
        ))
    }

    /// Returns the listener handed on under `spec.name`, or creates it as
    /// `spec` says.
    ///
    /// An inherited socket of that name is used only when its network and
    /// address match `spec` (the address as configured, or the socket's
    /// actual address, so `127.0.0.1:0` is inherited with the port the first
    /// generation got). Otherwise a fresh socket is bound and the inherited
    /// one is closed at readiness.
    ///
    /// # Errors
    ///
    /// As [`listen`](Self::listen); also [`Error::DuplicateName`] when the
    /// name is already used by this generation for something else.
    pub fn listen_with<T: Listener>(&self, spec: &ListenSpec) -> Result<T> {
        self.open(spec, Kind::Listener)
    }

    /// Returns the packet socket handed on under `"{network}:{address}"`, or
    /// creates it. Go tableflip's `Fds.ListenPacket`.
    ///
    /// # Errors
    ///
    /// As [`listen`](Self::listen).
    pub fn listen_packet<T: PacketConn>(&self, network: &str, address: &str) -> Result<T> {
        self.listen_packet_with(&ListenSpec::new(
            format!("{network}:{address}"),
            network,
            address,
        ))
    }

    /// Returns the packet socket handed on under `spec.name`, or creates it.
    ///
    /// # Errors
    ///
    /// As [`listen_with`](Self::listen_with).
    pub fn listen_packet_with<T: PacketConn>(&self, spec: &ListenSpec) -> Result<T> {
        self.open(spec, Kind::Packet)
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

    /// Finds the inherited socket for `spec`, or binds one; returns a
    /// duplicate for the caller and whether it was inherited.
    pub(crate) fn open_fd(
        &self,
        spec: &ListenSpec,
        network: Network,
        kind: Kind,
    ) -> Result<(OwnedFd, bool)> {
        let address = network.parse_address(&spec.address)?;
        let mut reg = lock(&self.registry);
        if let Some(entry) = reg.entries.get_mut(&spec.name) {
            if entry.activated {
                return take_activated(entry, spec, network, kind);
            }
            let matches = entry.kind == kind
                && entry.network == Some(network)
                && address_matches(entry, &spec.address, &address);
            match (&entry.slot, matches) {
                (Slot::Owned(fd), true) => {
                    if entry.unclaimed {
                        tracing::debug!(name = %spec.name, %network, address = %spec.address, "inherited");
                    }
                    let inherited = entry.unclaimed;
                    entry.unclaimed = false;
                    return Ok((dup(&spec.name, fd)?, inherited));
                }
                _ if entry.unclaimed => {
                    tracing::info!(
                        name = %spec.name,
                        inherited = ?entry.address,
                        configured = %spec.address,
                        "address changed since the previous generation; binding afresh, the old socket closes at readiness"
                    );
                    if let Some(old) = reg.entries.remove(&spec.name) {
                        reg.stale.push(old);
                    }
                }
                _ => {
                    return Err(Error::DuplicateName {
                        name: spec.name.clone(),
                        what: entry.kind.describe(),
                    });
                }
            }
        }
        let backlog = spec.backlog.unwrap_or(self.defaults.backlog);
        let setup = spec.setup.as_ref().or(self.defaults.setup.as_ref());
        let fd = bind::bind(network, &address, spec, backlog, setup).map_err(|source| {
            Error::Listen {
                name: spec.name.clone(),
                network: network.to_string(),
                address: spec.address.clone(),
                source,
            }
        })?;
        // Record the real address, so that port 0 is handed on as the port
        // the kernel picked.
        let recorded = match (&address, socket2::SockRef::from(&fd).local_addr()) {
            (Address::Inet(_), Ok(local)) => local
                .as_socket()
                .map_or_else(|| spec.address.clone(), |a| a.to_string()),
            _ => spec.address.clone(),
        };
        tracing::debug!(name = %spec.name, %network, address = %recorded, "bound");
        let handle = dup(&spec.name, &fd)?;
        reg.next_id += 1;
        let id = reg.next_id;
        reg.entries.insert(
            spec.name.clone(),
            Entry {
                kind,
                network: Some(network),
                address: Some(recorded),
                slot: Slot::Owned(fd),
                unclaimed: false,
                created_here: true,
                activated: false,
                id,
            },
        );
        Ok((handle, false))
    }

    /// The listener handed on (or opened in this generation) under `name`,
    /// without creating one. Returns `Ok(None)` when there is none.
    ///
    /// # Errors
    ///
    /// When the entry is not a listener, its network cannot be served by `T`,
    /// or duplicating the fd fails.
    pub fn listener<T: Listener>(&self, name: &str) -> Result<Option<T>> {
        self.lookup_shared(name, Kind::Listener)
    }

    /// The packet socket handed on (or opened) under `name`, without creating
    /// one.
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
        let Slot::Owned(fd) = &entry.slot else {
            return Ok(None);
        };
        let fd = dup(name, fd)?;
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
        self.lookup_lent(name, Kind::Conn)
    }

    /// Takes the file handed on under `name`; as [`conn`](Self::conn).
    ///
    /// # Errors
    ///
    /// As [`listener`](Self::listener).
    pub fn file<T: File>(&self, name: &str) -> Result<Option<Handover<T>>> {
        self.lookup_lent(name, Kind::File)
    }

    fn lookup_lent<T: FromFd + AsFd>(&self, name: &str, kind: Kind) -> Result<Option<Handover<T>>> {
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
        if !matches!(entry.slot, Slot::Owned(_)) {
            return Err(Error::DuplicateName {
                name: name.to_owned(),
                what: "connection or file already taken",
            });
        }
        let raw = entry.raw_fd();
        let Slot::Owned(fd) = std::mem::replace(&mut entry.slot, Slot::Lent { raw }) else {
            return Ok(None);
        };
        entry.unclaimed = false;
        let id = entry.id;
        match socket::convert::<T>(fd) {
            Ok(value) => Ok(Some(Handover {
                value: Some(value),
                registry: Arc::clone(&self.registry),
                name: name.to_owned(),
                id,
            })),
            Err(e) => {
                // The fd was consumed by the failed conversion: forget it.
                reg.entries.remove(name);
                Err(Error::io(
                    format!("cannot use {name:?} as {}", T::TYPE_NAME),
                    e,
                ))
            }
        }
    }

    /// Hands `listener` on to the next generation under `name`. The registry
    /// keeps a duplicate; `listener` stays the caller's.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] if `name` is taken; an error if the socket is
    /// not a listening socket of a supported network.
    pub fn add_listener<T: Listener + AsFd>(&self, name: &str, listener: &T) -> Result<()> {
        self.add_shared(name, listener.as_fd().try_clone_to_owned(), Kind::Listener)
    }

    /// Hands `socket` on to the next generation under `name`; as
    /// [`add_listener`](Self::add_listener).
    ///
    /// # Errors
    ///
    /// As [`add_listener`](Self::add_listener).
    pub fn add_packet_conn<T: PacketConn + AsFd>(&self, name: &str, socket: &T) -> Result<()> {
        self.add_shared(name, socket.as_fd().try_clone_to_owned(), Kind::Packet)
    }

    fn add_shared(&self, name: &str, fd: std::io::Result<OwnedFd>, kind: Kind) -> Result<()> {
        let fd = fd.map_err(|e| Error::io(format!("cannot duplicate the fd of {name:?}"), e))?;
        let (network, address) = describe_socket(name, fd.as_fd(), kind)?;
        self.insert(name, kind, Some(network), Some(address), Slot::Owned(fd))
            .map(|_| ())
    }

    /// Hands `conn` on to the next generation under `name`. The guard owns
    /// the connection; dropping it closes the connection and stops handing
    /// it on.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] if `name` is taken; an error if `conn` is not
    /// a connected socket of a supported network.
    pub fn add_conn<T: Conn>(&self, name: &str, conn: T) -> Result<Handover<T>> {
        let fd = conn.as_fd();
        let raw = fd.as_raw_fd();
        let (network, address) = describe_socket(name, fd, Kind::Conn)?;
        let id = self.insert(
            name,
            Kind::Conn,
            Some(network),
            Some(address),
            Slot::Lent { raw },
        )?;
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
    /// socket.
    pub fn add_file<T: File>(&self, name: &str, file: T) -> Result<Handover<T>> {
        let raw = file.as_fd().as_raw_fd();
        socket::check_fd(file.as_fd(), Kind::File, None)
            .map_err(|r| mismatch(name, Kind::File, r))?;
        let id = self.insert(name, Kind::File, None, None, Slot::Lent { raw })?;
        Ok(Handover {
            value: Some(file),
            registry: Arc::clone(&self.registry),
            name: name.to_owned(),
            id,
        })
    }

    fn insert(
        &self,
        name: &str,
        kind: Kind,
        network: Option<Network>,
        address: Option<String>,
        slot: Slot,
    ) -> Result<u64> {
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
                reg.stale.push(old);
            }
        }
        reg.next_id += 1;
        let id = reg.next_id;
        reg.entries.insert(
            name.to_owned(),
            Entry {
                kind,
                network,
                address,
                slot,
                unclaimed: false,
                created_here: false,
                activated: false,
                id,
            },
        );
        Ok(id)
    }

    /// Stops handing `name` on. A listener or packet socket held by the
    /// registry is closed (the application's own handles stay open).
    /// Returns whether there was such an entry.
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
    /// Returns the Unix socket paths that may be removed.
    pub(crate) fn close_unclaimed(&self) -> Vec<PathBuf> {
        let mut reg = lock(&self.registry);
        let names: Vec<String> = reg
            .entries
            .iter()
            .filter(|(_, e)| e.unclaimed)
            .map(|(n, _)| n.clone())
            .collect();
        let mut closed: Vec<Entry> = std::mem::take(&mut reg.stale);
        for name in names {
            if let Some(entry) = reg.entries.remove(&name) {
                tracing::info!(name = %name, kind = entry.kind.describe(), "closing inherited fd nobody claimed");
                closed.push(entry);
            }
        }
        let in_use: Vec<PathBuf> = reg.entries.values().filter_map(Entry::unix_path).collect();
        closed
            .iter()
            // The file of a socket systemd passed belongs to its socket unit.
            .filter(|e| !e.activated)
            .filter_map(Entry::unix_path)
            .filter(|p| !in_use.contains(p))
            .collect()
        // `closed` drops here, closing the fds.
    }

    /// Closes the registry's own handles of listeners and packet sockets:
    /// after a real stop nobody will accept on them any more, and a socket
    /// kept open would let clients connect into a queue nobody serves. The
    /// application's handles stay open until it drops them.
    pub(crate) fn close_shared(&self) {
        let mut reg = lock(&self.registry);
        reg.entries.retain(|_, e| {
            !(matches!(e.kind, Kind::Listener | Kind::Packet) && matches!(e.slot, Slot::Owned(_)))
        });
        reg.stale.clear();
    }

    /// The Unix socket paths this generation is responsible for removing
    /// when the service really stops.
    pub(crate) fn owned_unix_paths(&self, ready: bool) -> Vec<PathBuf> {
        lock(&self.registry)
            .entries
            .values()
            .filter(|e| ready || e.created_here)
            // The file of a socket systemd passed belongs to its socket unit.
            .filter(|e| !e.activated)
            .filter(|e| matches!(e.kind, Kind::Listener | Kind::Packet))
            .filter_map(Entry::unix_path)
            .collect()
    }

    /// Locks the registry and describes every entry for the next
    /// generation. The lock is held until the snapshot is dropped, so no fd
    /// named in it can be closed while the child is spawned.
    pub(crate) fn snapshot(&self) -> Snapshot<'_> {
        let guard = lock(&self.registry);
        let mut entries = Vec::with_capacity(guard.entries.len());
        let mut fds = Vec::with_capacity(guard.entries.len());
        let mut names: Vec<&String> = guard.entries.keys().collect();
        names.sort();
        for name in names {
            let Some(e) = guard.entries.get(name) else {
                continue;
            };
            entries.push(EntryMeta {
                name: name.clone(),
                kind: e.kind,
                fd: e.raw_fd(),
                network: e.network.map(|n| n.to_string()),
                address: e.address.clone(),
                activated: e.activated,
            });
            fds.push(e.raw_fd());
        }
        Snapshot {
            _guard: guard,
            entries,
            fds,
        }
    }
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

/// A socket passed by systemd under the listener's name: the socket unit
/// decides the address, so only the kind of socket must agree.
fn take_activated(
    entry: &mut Entry,
    spec: &ListenSpec,
    network: Network,
    kind: Kind,
) -> Result<(OwnedFd, bool)> {
    let have = entry.network.map_or("?", Network::as_str);
    let same_family = entry.network.is_some_and(|n| {
        n.is_unix() == network.is_unix() && n.socket_type() == network.socket_type()
    });
    if entry.kind != kind || !same_family {
        return Err(Error::InheritMismatch {
            what: kind.describe(),
            name: spec.name.clone(),
            reason: format!(
                "the socket systemd passed under this name is a {have} {}, but the listener is declared {network}",
                entry.kind.describe()
            ),
        });
    }
    let Slot::Owned(fd) = &entry.slot else {
        return Err(Error::DuplicateName {
            name: spec.name.clone(),
            what: entry.kind.describe(),
        });
    };
    if entry.unclaimed && entry.address.as_deref() != Some(spec.address.as_str()) {
        tracing::info!(
            name = %spec.name,
            address = ?entry.address,
            declared = %spec.address,
            "using the socket systemd passed; its socket unit sets the address"
        );
    }
    let inherited = entry.unclaimed;
    entry.unclaimed = false;
    Ok((dup(&spec.name, fd)?, inherited))
}

fn address_matches(entry: &Entry, configured: &str, resolved: &Address) -> bool {
    if entry.address.as_deref() == Some(configured) {
        return true;
    }
    let (Some(network), Some(recorded)) = (entry.network, entry.address.as_deref()) else {
        return false;
    };
    match (network.parse_address(recorded), resolved) {
        // Port 0 asks for any port: the one already picked matches.
        (Ok(Address::Inet(have)), Address::Inet(want)) => {
            have == *want || (want.port() == 0 && have.ip() == want.ip())
        }
        (Ok(have), want) => have == *want,
        _ => false,
    }
}

/// Works out the network and address of a socket the application hands on.
pub(crate) fn describe_socket(
    name: &str,
    fd: BorrowedFd<'_>,
    kind: Kind,
) -> Result<(Network, String)> {
    let sock = socket2::SockRef::from(&fd);
    let bad = |reason: String| mismatch(name, kind, reason);
    let ty = sock
        .r#type()
        .map_err(|e| bad(format!("it is not a socket ({e})")))?;
    let local = sock
        .local_addr()
        .map_err(|e| bad(format!("cannot read its address: {e}")))?;
    let (network, address) = if let Some(inet) = local.as_socket() {
        let network = match (ty, inet.is_ipv6()) {
            (socket2::Type::STREAM, false) => Network::Tcp4,
            (socket2::Type::STREAM, true) => Network::Tcp6,
            (socket2::Type::DGRAM, false) => Network::Udp4,
            (socket2::Type::DGRAM, true) => Network::Udp6,
            _ => return Err(bad("unsupported IP socket type".to_owned())),
        };
        // Record the generic network: a dual-stack v6 socket is `tcp`.
        let generic = match network {
            Network::Tcp4 | Network::Tcp6 => Network::Tcp,
            _ => Network::Udp,
        };
        (generic, inet.to_string())
    } else if local.is_unix() {
        let network = match ty {
            socket2::Type::STREAM => Network::Unix,
            socket2::Type::DGRAM => Network::Unixgram,
            socket2::Type::SEQPACKET => Network::Unixpacket,
            _ => return Err(bad("unsupported Unix socket type".to_owned())),
        };
        let address = if let Some(path) = local.as_pathname() {
            path.display().to_string()
        } else {
            abstract_name(&local).map_or_else(|| "@".to_owned(), |n| format!("@{n}"))
        };
        (network, address)
    } else {
        return Err(bad("unsupported address family".to_owned()));
    };
    socket::check_fd(fd.as_fd(), kind, Some(network)).map_err(bad)?;
    Ok((network, address))
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

/// A connection or file registered for handover, owned by the application.
///
/// Dereferences to the wrapped value. Dropping the guard stops handing the
/// value on and then closes it, so a connection really closes (Go
/// tableflip's issue #74). [`into_inner`](Self::into_inner) stops handing it
/// on and returns the value.
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
        // Close the fd while the registry is locked: an upgrade snapshots
        // the registry under the same lock, so it never passes a number that
        // was just closed (and possibly reused).
        let mut reg = lock(&self.registry);
        unregister(&mut reg, &self.name, self.id);
        drop(self.value.take());
        drop(reg);
    }
}
