//! Graceful, zero-downtime upgrades for Rust network services.
//!
//! `kill -HUP <pid>` makes a running service start a fresh copy of its
//! (possibly replaced) binary and hand it its listening sockets. The new
//! process initialises, then signals readiness; only then does the old one
//! stop accepting, finish what it has in flight, and exit. If the new process
//! crashes, hangs or fails to initialise, the old one keeps serving.
//!
//! This is a Rust re-creation of Go's `cloudflare/tableflip`, and keeps its
//! four promises:
//!
//! 1. No old code keeps running after a successful upgrade.
//! 2. The new process has a grace period for initialisation.
//! 3. Crashing during initialisation is OK.
//! 4. Only a single upgrade is ever run in parallel.
//!
//! The runtime API is [`Upgrader`]; see its documentation for a complete
//! service. [`testing`] has a stub for unit tests.
//!
//! # How the handover works
//!
//! Sockets pass by fd inheritance across `exec`: old and new generation
//! share one kernel socket and one accept queue during the overlap, so
//! nothing queued is lost, and nothing is ever re-bound. The names and kinds
//! of the fds travel as versioned metadata (see the protocol description in
//! the source of `protocol.rs`); readiness travels back over a pipe.
//!
//! # Platform support
//!
//! Unix. Tested on Linux only; macOS compiles. `unixpacket` and abstract
//! Unix addresses (`@name`) are Linux-only.
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg(unix)]

mod bind;
mod declare;
mod error;
mod fds;
mod network;
mod options;
mod pidfile;
mod protocol;
mod service;
mod socket;
mod sys;
pub mod testing;
mod upgrader;

pub use bind::{ListenSpec, SetupHook};
pub use declare::DeclaredListener;
pub use error::{Error, Result};
pub use fds::{Fds, Handover};
pub use network::{Address, NETWORKS, Network};
pub use options::{DEFAULT_BACKLOG, DEFAULT_DRAIN_TIMEOUT, DEFAULT_UPGRADE_TIMEOUT, Options};
pub use protocol::{ENV_HANDOVER, VERSION as PROTOCOL_VERSION};
pub use service::Context;
pub use socket::{Conn, File, FromFd, Kind, Listener, PacketConn};
pub use upgrader::Upgrader;

/// Re-exported so that socket-setup hooks can name its types.
pub use socket2;

pub use tableflip_macros::{listener, main};

/// Not public API: used by the code `#[tableflip::main]` and
/// `#[tableflip::listener]` generate. Anything here may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use crate::declare::{ListenerDecl, Registration};
    pub use crate::service::{Flavor, MainConfig, run};
    pub use inventory;
    pub use tokio;

    /// `Duration::from_millis`, spelled for generated code.
    pub const fn millis(ms: u64) -> ::core::time::Duration {
        ::core::time::Duration::from_millis(ms)
    }
}
