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
//! Two process models ([`Mode`]): in **supervised** mode (the default of
//! `#[tableflip::main]` on Linux) the process that was started stays, at
//! the same PID, as a small supervisor that holds the sockets and starts
//! each generation as its child, which is what systemd, container inits
//! and process supervisors expect; in **replace** mode (Go tableflip's
//! model) each generation starts the next, and the PID changes at every
//! upgrade. `TABLEFLIP_MODE=supervised|replace` chooses at deploy time.
//!
//! Most services use the two attribute macros: [`#[tableflip::main]`](macro@main)
//! on `async fn main(cx: Context)` and [`#[listener]`](macro@listener) on
//! `static NAME: TcpListener;` declarations. Underneath is the runtime API,
//! [`Upgrader`], usable on its own (see its documentation for a complete
//! service). [`testing`] has a stub for unit tests.
//!
//! # How the handover works
//!
//! Sockets pass to the new generation as fds (over a Unix socket while it
//! starts, or inherited across `exec` by a build that predates that): old
//! and new generation share one kernel socket and one accept queue during
//! the overlap, so nothing queued is lost, and nothing is ever re-bound. The names and kinds
//! of the fds travel as versioned metadata (the contract between versions:
//! [`handover_protocol`]); readiness travels back over a pipe.
//!
//! # Cargo features
//!
//! None is on by default.
//!
//! - `http`: `http::Server`, hyper and axum (any tower
//!   service) served over HTTP/1.1 and HTTP/2 with a drain that fails no
//!   request, on TCP and Unix listeners.
//! - `tls` (includes `http`): HTTPS, `http::tls::TlsListener` (rustls 0.23
//!   through tokio-rustls, with rustls's `ring` crypto provider; HTTP/2 by
//!   ALPN); the rustls it is built with is re-exported as
//!   `http::tls::rustls`.
//! - `metrics`: upgrade, drain and generation measurements through the
//!   [`metrics`](https://docs.rs/metrics) facade (the [metrics module](crate::metrics)
//!   module names them).
//!
//! # Platform support
//!
//! Unix. Tested on Linux only; macOS compiles. Supervised mode,
//! `unixpacket` and abstract Unix addresses (`@name`) are Linux-only.
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg(unix)]

mod bind;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod control;
pub mod ctl;
mod declare;
mod error;
mod fds;
#[cfg(feature = "http")]
pub mod http;
pub mod metrics;
mod mode;
mod network;
mod options;
mod pidfile;
mod protocol;

/// The handover protocol: what one generation gives the next, and how the
/// next answers; a contract between versions of this crate.
#[doc = include_str!("../PROTOCOL.md")]
pub mod handover_protocol {}
mod report;
mod service;
mod socket;
pub mod state;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod supervisor;
mod sys;
mod systemd;
pub mod testing;
mod unixfile;
mod upgrade;

pub use bind::{ListenSpec, SetupHook};
pub use declare::DeclaredListener;
pub use error::{Error, Result};
pub use fds::{Fds, Handover};
pub use mode::{ENV_MODE, Mode};
pub use network::Network;
pub use options::{
    DEFAULT_BACKLOG, DEFAULT_DRAIN_TIMEOUT, DEFAULT_UPGRADE_TIMEOUT, Options, UpgradeSignal,
};
pub use protocol::ENV_HANDOVER;
pub use service::Context;
pub use state::State;
pub use systemd::ENV_FDSTORE;

/// The Rust types tableflip hands out: the traits that say which socket
/// and file types each call accepts (`TcpListener`, `UdpSocket`,
/// `UnixListener`, `UnixDatagram`, `TcpStream`, `UnixStream` of std and
/// tokio, `socket2::Socket`, `std::fs::File`, `tokio::fs::File`). Sealed:
/// they name, they are not to be implemented.
///
/// # std types are non-blocking
///
/// Every socket comes out non-blocking and close-on-exec, std types
/// included: tokio needs non-blocking sockets, and the flag belongs to the
/// open file description, which every generation shares (an inherited
/// socket is the same socket). A program that serves a std listener from a
/// blocking accept loop calls `set_nonblocking(false)` itself, and treats
/// `EAGAIN` (`WouldBlock`) as "try again": while an upgrade runs, the next
/// generation makes the socket non-blocking again. After a failed upgrade
/// the library puts a socket that was blocking back in blocking mode; in
/// supervised mode only listening sockets (a connection handed on with
/// [`Fds::add_conn`] stays non-blocking if the new generation made it so
/// and then failed).
pub mod types {
    pub use crate::socket::{Conn, File, FromFd, Listener, PacketConn};
}
pub use upgrade::Upgrader;

/// Re-exported so that socket-setup hooks can name its types.
pub use socket2;

/// Turns `async fn main(cx: Context) -> Result<(), E>` into a service that
/// upgrades itself on `SIGHUP` without refusing a connection.
///
/// ```no_run
/// use tableflip::{Context, listener};
/// use tokio::net::TcpListener;
///
/// /// Public HTTP endpoint, handed from each generation to the next.
/// #[listener("tcp", "127.0.0.1:8080", env = "HTTP_ADDR")]
/// static HTTP: TcpListener;
///
/// #[tableflip::main(drain_timeout = "30s")]
/// async fn main(cx: Context) -> std::io::Result<()> {
///     let listener = HTTP.take()?; // inherited from the old process, or bound now
///     let draining = cx.draining();
///     cx.spawn(async move {
///         tokio::select! {
///             () = draining => {} // stop accepting; `listener` is dropped
///             () = async {
///                 while let Ok((_conn, _peer)) = listener.accept().await {
///                     // serve the connection …
///                 }
///             } => {}
///         }
///     });
///     Ok(()) // init done: readiness is signalled here
/// }
/// ```
///
/// # What the generated program does
///
/// 1. creates the [`Upgrader`], taking whatever a parent generation handed
///    on. In [supervised mode](Mode::Supervised) the process started by the
///    user (or systemd) becomes the supervisor here and never goes further:
///    it runs none of the steps below, and each generation it starts (a
///    child, running the same program) does;
/// 2. builds the tokio runtime (`flavor`, `worker_threads`);
/// 3. opens every [`#[listener]`](macro@listener): inherited by name, or
///    bound (a name inherited with another address than configured now is
///    bound afresh; the old socket closes at readiness). A failure is
///    reported, naming the listener and address, before any user code runs;
/// 4. handles signals: `SIGHUP` upgrades (the outcome is logged with the
///    child's PID and duration, or the error); `SIGTERM`/`SIGINT` stop
///    gracefully (after `stop_delay`, if set), and a second one exits at
///    once (status 130; with `stop_delay`, a second one ends the delay
///    and a third exits);
/// 5. runs the function's body (the init function) with a [`Context`];
/// 6. when it returns `Ok`: readiness ([`Upgrader::ready`]: unclaimed
///    inherited sockets closed, PID file written, parent told). When it
///    returns `Err` or panics: the error is logged and the process exits
///    with status 1, so a parent generation keeps serving;
/// 7. waits until it must exit: a successful upgrade, or a stop;
/// 8. drains: [`Context::draining`] resolves, the tasks started with
///    [`Context::spawn`] get up to `drain_timeout` to finish (the number
///    abandoned is logged), then the process exits 0.
///
/// Logs go through `tracing`; if the program installs no subscriber, one
/// writing to stderr is installed (filtered by `RUST_LOG`, default `info`,
/// with `target=level` directives such as `info,tableflip=debug`; install
/// your own subscriber for span or field filters).
///
/// # The function
///
/// `async`, not generic, taking one [`Context`] or nothing, returning
/// `Result<(), E>` with `E: Debug` (`std::io::Error`, `anyhow::Error`,
/// `Box<dyn Error + Send + Sync>`…) or `()`.
///
/// # Options
///
/// | option | meaning | example |
/// |---|---|---|
/// | `upgrade_timeout` | how long a new generation may take to be ready (default 60 s) | `upgrade_timeout = "10s"` |
/// | `drain_timeout` | how long the drain waits for spawned tasks (default 30 s) | `drain_timeout = "500ms"` |
/// | `upgrade_signal` | the signal that upgrades: `"SIGHUP"` (default), `"SIGUSR1"`, `"SIGUSR2"` or `"none"`; the others are the application's to handle; see [`Options::upgrade_signal`] | `upgrade_signal = "SIGUSR2"` |
/// | `stop_delay` | a lame-duck stop: how long the service keeps accepting after the first `SIGTERM`/`SIGINT` before it drains (default 0); see [`Options::stop_delay`] | `stop_delay = "5s"` |
/// | `pid_file` | the PID file, replaced atomically at readiness | `pid_file = "/run/svc.pid"` |
/// | `control_socket` | where `tableflip-ctl` reaches the service (default `$RUNTIME_DIRECTORY/tableflip.sock` when systemd sets it; `"none"`: no control socket); see [`Options::control_socket`] and [`ctl`] | `control_socket = "/run/svc/tableflip.sock"` |
/// | `probation` | after an upgrade, how long a crash of the new generation rolls back to the previous binary (default: the drain timeout; `"0s"`: never); see [`Options::probation`] | `probation = "1m"` |
/// | `mode` | `"supervised"` (default on Linux; replace elsewhere) or `"replace"`: see [`Mode`]; `TABLEFLIP_MODE` in the environment wins | `mode = "replace"` |
/// | `flavor` | `"multi_thread"` (default) or `"current_thread"` | `flavor = "current_thread"` |
/// | `worker_threads` | worker threads of the multi-thread runtime | `worker_threads = 4` |
/// | `options` | a `fn() -> Options` computing the options at run time (from CLI flags, a config file…); the options written in the attribute override its fields | `options = config::options` |
/// | `crate` | the path to this crate, when renamed | `crate = "tf"` |
///
/// Durations are written `"500ms"`, `"30s"`, `"2m"`, `"1h"` and checked at
/// compile time, as is every option.
///
/// ```no_run
/// fn options() -> tableflip::Options {
///     match std::env::var_os("PID_FILE") {
///         Some(path) => tableflip::Options::new().pid_file(path),
///         None => tableflip::Options::new(),
///     }
/// }
///
/// #[tableflip::main(options = options, upgrade_timeout = "10s", flavor = "current_thread")]
/// async fn main() {}
/// ```
///
/// # Equivalent code without the macro
///
/// ```no_run
/// use tableflip::{Context, Options, Upgrader};
/// use tokio::signal::unix::{SignalKind, signal};
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let upg = Upgrader::new(Options::default())?; // before any thread starts
///     let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
///     rt.block_on(async {
///         let mut hup = signal(SignalKind::hangup())?;
///         let mut term = signal(SignalKind::terminate())?;
///         let cx = Context::new(upg.clone());
///         let listener: tokio::net::TcpListener = upg.listen("tcp", "127.0.0.1:8080")?;
///         // … the init function: start serving on `listener` with cx.spawn …
///         # drop(listener);
///         upg.ready()?;
///         let exit = upg.exit();
///         tokio::pin!(exit);
///         loop {
///             tokio::select! {
///                 _ = hup.recv() => { let _ = upg.upgrade().await; }
///                 _ = term.recv() => upg.stop(),
///                 () = &mut exit => break,
///             }
///         }
///         cx.drain(std::time::Duration::from_secs(30)).await;
///         Ok(())
///     })
/// }
/// ```
pub use tableflip_macros::main;

/// Declares a listening socket on `static NAME: T;`, handed from each
/// generation to the next under the name `NAME`.
///
/// ```no_run
/// use tableflip::listener;
///
/// #[listener("tcp", "0.0.0.0:443", env = "HTTPS_ADDR", backlog = 4096)]
/// static HTTPS: tokio::net::TcpListener;
///
/// #[listener("udp6", "[::1]:5353")]
/// static DNS: tokio::net::UdpSocket;
///
/// #[listener("unix", "/run/svc/admin.sock", mode = 0o660)]
/// static ADMIN: tokio::net::UnixListener;
///
/// #[listener("unixgram", "@svc-metrics")] // Linux abstract address
/// static METRICS: std::os::unix::net::UnixDatagram;
///
/// #[tableflip::main]
/// async fn main() -> std::io::Result<()> {
///     let https = HTTPS.take()?;
///     # drop(https);
///     Ok(())
/// }
/// ```
///
/// The socket is opened by [`#[tableflip::main]`](macro@main) at startup,
/// before the init function runs (a bind failure is reported then, naming
/// the listener and address). [`DeclaredListener::take`] hands it to the
/// program, once; [`DeclaredListener::name`] and
/// [`DeclaredListener::address`] tell what it is.
///
/// # Networks and types
///
/// | network | address | types |
/// |---|---|---|
/// | `tcp`, `tcp4`, `tcp6` | `host:port`, `[v6]:port`, `:port` | `TcpListener` (tokio or std) |
/// | `udp`, `udp4`, `udp6` | as tcp | `UdpSocket` (tokio or std) |
/// | `unix` | a path, or `@name` (Linux abstract) | `UnixListener` (tokio or std) |
/// | `unixgram` | as unix | `UnixDatagram` (tokio or std) |
/// | `unixpacket` (Linux) | as unix | [`socket2::Socket`] |
///
/// `socket2::Socket` serves every network. Port 0 binds any free port, and
/// the next generation inherits the same port.
///
/// # Options
///
/// | option | meaning |
/// |---|---|
/// | `env = "VAR"` | the address can be overridden at startup from `$VAR` |
/// | `backlog = N` | the `listen(2)` backlog of a fresh socket (default 1024) |
/// | `mode = 0o660` | the permissions of a fresh Unix socket file |
/// | `crate = "path"` | the path to this crate, when renamed |
///
/// # Compile-time checks
///
/// An unknown network (with a suggestion), an address that cannot be valid
/// for the network (no port, a port over 65535, an empty address, a path on
/// an IP network, an IPv6 address without brackets, an address of the wrong
/// IP version), a type that cannot serve the network, `static mut`, a
/// missing type, an initializer, generics, an item other than a static, and
/// unknown, duplicate or mistyped options are compile errors, spanned on the
/// offending token.
///
/// # Listeners declared in a library
///
/// Declarations are collected with `inventory`. The linker drops those of
/// a library crate that the binary never references: if a library declares
/// listeners, write `use that_library as _;` in the binary. Two listeners
/// with the same name make the program fail at startup with a clear error.
///
/// # Equivalent code without the macro
///
/// ```no_run
/// # fn main() -> Result<(), tableflip::Error> {
/// # let upgrader = tableflip::Upgrader::new(tableflip::Options::default())?;
/// let addr = std::env::var("HTTPS_ADDR").unwrap_or_else(|_| "0.0.0.0:443".into());
/// let spec = tableflip::ListenSpec::new("HTTPS", "tcp", addr).backlog(4096);
/// let https: std::net::TcpListener = upgrader.listen_with(&spec)?;
/// # drop(https); Ok(()) }
/// ```
pub use tableflip_macros::listener;

// The README's Rust examples are compiled as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme_examples {}

/// Not public API: used by the code `#[tableflip::main]` and
/// `#[tableflip::listener]` generate. Anything here may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use crate::declare::{ListenerDecl, Registration, declaration, declared_listener, serves};
    pub use crate::service::{Flavor, MainConfig, run};
    pub use inventory;
    pub use tokio;

    /// How the init function's error is logged (see `report.rs`).
    pub mod report {
        pub use crate::report::{
            Report, ViaBoxedError, ViaDebug, ViaDisplay, ViaError, ViaNothing,
        };
    }

    /// `Duration::from_millis`, spelled for generated code.
    pub const fn millis(ms: u64) -> ::core::time::Duration {
        ::core::time::Duration::from_millis(ms)
    }
}
