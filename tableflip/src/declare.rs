//! Listeners declared with `#[tableflip::listener]`: collected at startup,
//! opened (inherited or bound) before the init function runs, taken once.

use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use crate::bind::ListenSpec;
use crate::error::{Error, Result};
use crate::fds::Fds;
use crate::network::Network;
use crate::socket::{self, FromFd, Kind};

/// The state of one declared listener.
#[derive(Debug)]
enum Slot {
    /// Not opened yet (before startup, or in a program without
    /// `#[tableflip::main]`).
    Pending,
    /// Opened at startup: the fd and the address it was opened with.
    Open(OwnedFd, String),
    /// Taken by the program; the address it was opened with.
    Taken(String),
}

/// The non-generic part of a declared listener, registered with
/// `inventory`. Not public API: used by generated code.
#[doc(hidden)]
#[derive(Debug)]
pub struct ListenerDecl {
    name: &'static str,
    network: &'static str,
    address: &'static str,
    env: Option<&'static str>,
    backlog: Option<u32>,
    mode: Option<u32>,
    type_name: &'static str,
    serves: fn(Network) -> bool,
    slot: Mutex<Slot>,
}

/// A registration submitted by `#[tableflip::listener]`. Not public API.
#[doc(hidden)]
#[derive(Debug)]
pub struct Registration {
    /// Returns the declaration (a function, so the registration is a
    /// constant whatever the static's type).
    pub decl: fn() -> &'static ListenerDecl,
}

inventory::collect!(Registration);

/// A listener declared with `#[tableflip::listener]` on a
/// `static NAME: T;`.
///
/// The socket is opened when the program starts (inherited from the
/// previous generation under the name `NAME`, or bound afresh), before the
/// init function runs; [`take`](Self::take) hands it to the program, once.
#[derive(Debug)]
pub struct DeclaredListener<T> {
    decl: ListenerDecl,
    _type: PhantomData<fn() -> T>,
}

/// Not public API: what `#[tableflip::listener]` expands to (through
/// `__private`). `serves` is `__private::serves::<T>`, whose `T: FromFd`
/// bound is where an unsupported type is reported.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub const fn declared_listener<T>(
    name: &'static str,
    network: &'static str,
    address: &'static str,
    env: Option<&'static str>,
    backlog: Option<u32>,
    mode: Option<u32>,
    type_name: &'static str,
    serves: fn(Network) -> bool,
) -> DeclaredListener<T> {
    DeclaredListener {
        decl: ListenerDecl {
            name,
            network,
            address,
            env,
            backlog,
            mode,
            type_name,
            serves,
            slot: Mutex::new(Slot::Pending),
        },
        _type: PhantomData,
    }
}

/// Not public API: the declaration of a declared listener, for its
/// inventory registration.
#[doc(hidden)]
pub fn declaration<T>(listener: &'static DeclaredListener<T>) -> &'static ListenerDecl {
    &listener.decl
}

impl<T: FromFd> DeclaredListener<T> {
    /// The listener's name: the static's identifier, under which the socket
    /// is handed to the next generation.
    pub fn name(&self) -> &'static str {
        self.decl.name
    }

    /// The network, as declared (`"tcp"`, `"unix"`, …).
    pub fn network(&self) -> &'static str {
        self.decl.network
    }

    /// The address as declared in the source.
    pub fn declared_address(&self) -> &'static str {
        self.decl.address
    }

    /// The address in effect: once the socket is open (and after
    /// [`take`](Self::take)), its real address (the port the kernel picked
    /// for port 0, the address of the socket unit under socket
    /// activation); before, the declared one with the `env` override
    /// applied.
    pub fn address(&self) -> String {
        match &*self.decl.lock() {
            Slot::Open(_, address) | Slot::Taken(address) => address.clone(),
            Slot::Pending => self.decl.effective_address().0,
        }
    }

    /// Takes the socket, once.
    ///
    /// # Errors
    ///
    /// A second call, a call before the program's startup opened the socket
    /// (that is, without `#[tableflip::main]`: use [`open`](Self::open)
    /// then), or a tokio type requested outside a runtime.
    pub fn take(&self) -> Result<T> {
        let name = self.decl.name;
        if T::TOKIO && tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime {
                name: name.to_owned(),
            });
        }
        let mut slot = self.decl.lock();
        match std::mem::replace(&mut *slot, Slot::Pending) {
            Slot::Open(fd, address) => {
                *slot = Slot::Taken(address);
                // Opened by the registry: close-on-exec already.
                socket::convert_own(fd).map_err(|e| {
                    Error::io(format!("cannot use listener {name} as {}", T::TYPE_NAME), e)
                })
            }
            Slot::Taken(address) => {
                *slot = Slot::Taken(address);
                Err(Error::ListenerTaken {
                    name: name.to_owned(),
                })
            }
            Slot::Pending => Err(Error::ListenerNotOpen {
                name: name.to_owned(),
            }),
        }
    }

    /// Opens the socket through `fds` (inherited or bound), for programs
    /// that use declared listeners without `#[tableflip::main]`. Does
    /// nothing if it is open already.
    ///
    /// # Errors
    ///
    /// As [`Fds::listen_with`].
    pub fn open(&'static self, fds: &Fds) -> Result<()> {
        self.decl.open(fds).map(|_| ())
    }
}

impl ListenerDecl {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The address to use, and the variable it came from if overridden.
    fn effective_address(&self) -> (String, Option<&'static str>) {
        if let Some(var) = self.env {
            if let Some(value) = std::env::var_os(var) {
                if let Some(value) = value.to_str().filter(|v| !v.is_empty()) {
                    return (value.to_owned(), Some(var));
                }
            }
        }
        (self.address.to_owned(), None)
    }

    /// Opens the socket; returns whether it was inherited and its real
    /// address, or `None` if it was open already.
    pub(crate) fn open(&self, fds: &Fds) -> Result<Option<(bool, String)>> {
        let mut slot = self.lock();
        if !matches!(*slot, Slot::Pending) {
            return Ok(None);
        }
        let network: Network = self.network.parse()?;
        if !(self.serves)(network) {
            return Err(Error::WrongType {
                name: self.name.to_owned(),
                network: network.to_string(),
                type_name: self.type_name,
            });
        }
        let (address, from_env) = self.effective_address();
        if let Some(var) = from_env {
            network.parse_address(&address).map_err(|e| match e {
                Error::InvalidAddress { reason, .. } => Error::InvalidAddress {
                    network: network.to_string(),
                    address: address.clone(),
                    reason: format!("{reason} (from ${var}, for listener {})", self.name),
                },
                other => other,
            })?;
        }
        let mut spec = ListenSpec::new(self.name, self.network, address.clone());
        spec.backlog = self.backlog;
        spec.mode = self.mode;
        let kind = if network.is_stream() {
            Kind::Listener
        } else {
            Kind::Packet
        };
        let (fd, inherited) = fds.open_fd(&spec, network, kind)?;
        // Opened by the registry, which checked it (bound here, or
        // inherited and checked): only its address is read.
        let actual = socket::bound_address(fd.as_fd()).unwrap_or(address);
        *slot = Slot::Open(fd, actual.clone());
        Ok(Some((inherited, actual)))
    }
}

/// Not public API: whether `T` serves `network`, as a function pointer for
/// [`declared_listener`].
#[doc(hidden)]
pub fn serves<T: FromFd>(network: Network) -> bool {
    T::serves(network)
}

/// Every declared listener in the program, in link order.
pub(crate) fn declared() -> Vec<&'static ListenerDecl> {
    inventory::iter::<Registration>
        .into_iter()
        .map(|r| (r.decl)())
        .collect()
}

/// Opens every declared listener, after checking that no two share a name.
pub(crate) fn open_all(fds: &Fds) -> Result<()> {
    let decls = declared();
    let mut seen = std::collections::HashSet::new();
    for d in &decls {
        if !seen.insert(d.name) {
            return Err(Error::DuplicateName {
                name: d.name.to_owned(),
                what: "listener declared twice (two #[listener] statics with this name in different modules or crates)",
            });
        }
    }
    for d in &decls {
        match d.open(fds)? {
            Some((true, address)) => {
                tracing::info!(listener = d.name, network = d.network, %address, "inherited listener")
            }
            Some((false, address)) => {
                tracing::info!(listener = d.name, network = d.network, %address, "bound listener")
            }
            None => {}
        }
    }
    // Sockets systemd passed without a name that no listener's address
    // matched: the unit and the program disagree, and binding instead
    // would fight the socket unit for the address.
    let unmatched = fds.unclaimed_unnamed();
    if !unmatched.is_empty() {
        let sockets: Vec<String> = unmatched
            .iter()
            .map(|(name, what)| format!("{what} (passed as {name:?})"))
            .collect();
        let listeners: Vec<String> = decls
            .iter()
            .map(|d| format!("{} ({} {})", d.name, d.network, d.effective_address().0))
            .collect();
        return Err(Error::SocketActivation {
            reason: format!(
                "systemd passed {} that match no listener by name or address; set FileDescriptorName= in the socket unit to the name of the listener each is for (one of: {}), or --fdname= for systemd-socket-activate",
                sockets.join(", "),
                listeners.join(", ")
            ),
        });
    }
    Ok(())
}
