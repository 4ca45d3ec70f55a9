//! The one error type of the runtime.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in tableflip, each variant naming what it
/// concerns (a listener, a child process, a file).
///
/// The enum is `#[non_exhaustive]`: match on the variants you handle and keep
/// a catch-all arm.
///
/// An error caused by another one (an OS error) returns it from
/// [`source()`](std::error::Error::source) and does not repeat it in its
/// own message, as the API guidelines ask: print the whole chain (`{:#}`
/// with `anyhow`, or by walking `source()`), as tableflip's own log lines
/// do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`Upgrader::new`](crate::Upgrader::new) was called a second time in
    /// this process.
    #[error(
        "an Upgrader already exists in this process (pid {pid}); create one per process and clone it"
    )]
    AlreadyCreated {
        /// This process.
        pid: u32,
    },

    /// The handover from the parent generation is malformed or hostile.
    #[error("invalid handover from the parent process: {reason}")]
    InvalidHandover {
        /// What is wrong, naming the fd or entry concerned.
        reason: String,
    },

    /// An inherited fd is not what its entry in the handover claims.
    #[error("cannot inherit {what} {name:?}: {reason}")]
    InheritMismatch {
        /// `listener`, `packet socket`, `connection` or `file`.
        what: &'static str,
        /// The name under which it was handed over.
        name: String,
        /// The mismatch, e.g. `fd 7 is a UDP socket, expected a TCP listener`.
        reason: String,
    },

    /// The sockets passed by systemd's socket activation (`LISTEN_FDS`) are
    /// not usable.
    #[error("socket activation: {reason}")]
    SocketActivation {
        /// What is wrong, naming the socket (`FileDescriptorName=`) or fd.
        reason: String,
    },

    /// A network name that tableflip does not know.
    #[error(
        "unknown network {network:?}; expected one of tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket"
    )]
    UnknownNetwork {
        /// The network as given.
        network: String,
    },

    /// An address that cannot be valid for its network.
    #[error("invalid address {address:?} for network {network}: {reason}")]
    InvalidAddress {
        /// The network the address was given for.
        network: String,
        /// The address as given.
        address: String,
        /// Why it is invalid.
        reason: String,
    },

    /// The requested Rust type cannot serve the socket of that network.
    #[error("{name:?}: a {network} socket cannot be used as {type_name}")]
    WrongType {
        /// The listener's name.
        name: String,
        /// The network.
        network: String,
        /// The requested type.
        type_name: &'static str,
    },

    /// Creating, binding or configuring a fresh socket failed.
    #[error("cannot listen on {network} {address} (listener {name:?})")]
    Listen {
        /// The listener's name.
        name: String,
        /// The network.
        network: String,
        /// The address.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Two different sockets or files were registered under one name.
    #[error("the name {name:?} is already in use for another {what}")]
    DuplicateName {
        /// The name.
        name: String,
        /// What already holds it.
        what: &'static str,
    },

    /// This generation already listens on that address (under the name
    /// `by`): a second socket on the same address is refused rather than
    /// handed out twice. Port 0 is exempt: it asks for a new port each
    /// time.
    #[error(
        "cannot listen on {network} {address} (listener {name:?}): this generation already listens there (listener {by:?}); use that socket, or port 0 for another one"
    )]
    AlreadyListening {
        /// The listener asked for.
        name: String,
        /// The network.
        network: String,
        /// The address.
        address: String,
        /// The listener that already has it.
        by: String,
    },

    /// A tokio socket type was requested outside a tokio runtime.
    #[error("{name:?}: converting to a tokio type needs a running tokio runtime with I/O enabled")]
    NoRuntime {
        /// The listener's name.
        name: String,
    },

    /// `upgrade()` called before `ready()`.
    #[error("cannot upgrade: this process is not ready yet (call ready() after initialisation)")]
    NotReady,

    /// `upgrade()` called while this process's own parent is still running.
    #[error("cannot upgrade: the parent process (pid {parent_pid}) has not exited yet")]
    ParentAlive {
        /// The parent generation's PID.
        parent_pid: u32,
    },

    /// `upgrade()` called while another upgrade runs.
    #[error("cannot upgrade: an upgrade is already in progress{}", child_pid.map(|p| format!(" (child pid {p})")).unwrap_or_default())]
    UpgradeInProgress {
        /// The child being started; `None` while it is being spawned.
        child_pid: Option<u32>,
    },

    /// `upgrade()` called after a successful upgrade.
    #[error("cannot upgrade: this process already handed over to pid {child_pid}")]
    AlreadyUpgraded {
        /// The successor.
        child_pid: u32,
    },

    /// The upgrader was stopped (before or during the operation).
    #[error("the upgrader was stopped")]
    Stopped,

    /// No path names this program's executable (see
    /// [`Options::executable`](crate::Options::executable)).
    #[error("cannot tell which executable to start: {reason}; set Options::executable")]
    NoExecutable {
        /// Why.
        reason: String,
    },

    /// A declared listener was taken already.
    #[error("listener {name} was taken already: take() hands the socket out once")]
    ListenerTaken {
        /// The listener's name.
        name: String,
    },

    /// A declared listener is not open: declared listeners are opened by
    /// `#[tableflip::main]` at startup, or by `DeclaredListener::open`.
    #[error(
        "listener {name} is not open: declared listeners are opened by #[tableflip::main] at startup (or DeclaredListener::open)"
    )]
    ListenerNotOpen {
        /// The listener's name.
        name: String,
    },

    /// A second handle of a socket was asked for after the application
    /// closed the one it had.
    #[error(
        "{name:?}: the application closed the handle it had; the socket is no longer handed on"
    )]
    HandleClosed {
        /// The socket's name.
        name: String,
    },

    /// The handover metadata could not be encoded (never expected).
    #[error("cannot encode the handover metadata: {reason}")]
    Encode {
        /// Why.
        reason: String,
    },

    /// The executable for the next generation could not be found or started.
    #[error("cannot start {path}", path = path.display())]
    Spawn {
        /// The executable.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The directory the service started in, where the next generation
    /// starts too, is gone (or is no longer a directory).
    #[error("cannot start the next generation in {path}, the directory the service started in", path = path.display())]
    StartDirectory {
        /// The directory, as it was named when the service started.
        path: PathBuf,
        /// What is wrong with it, naming the missing component.
        #[source]
        source: io::Error,
    },

    /// The new generation exited before it was ready.
    #[error("the new process (pid {pid}) exited{} before it was ready", code.map(|c| format!(" with status {c}")).unwrap_or_default())]
    ChildExited {
        /// The child's PID.
        pid: u32,
        /// Its exit status; `None` if the system reported neither a status
        /// nor a signal.
        code: Option<i32>,
    },

    /// The new generation was killed by a signal before it was ready.
    #[error("the new process (pid {pid}) was killed by {} before it was ready", signal_name(*signal))]
    ChildKilled {
        /// The child's PID.
        pid: u32,
        /// The signal number.
        signal: i32,
    },

    /// The new generation was not ready within the upgrade timeout; it was
    /// killed and reaped.
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; it was killed")]
    Timeout {
        /// The child's PID.
        pid: u32,
        /// The configured timeout.
        timeout: Duration,
    },

    /// Writing the PID file failed.
    #[error("cannot use the PID file {path}", path = path.display())]
    PidFile {
        /// The PID file's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The upgrade could not be carried out because `upgrade()` is not
    /// supported by this upgrader (the [`testing`](crate::testing) stub).
    #[error("upgrades are not supported by the testing stub upgrader")]
    NotSupported,

    /// This process is PID 1 (a container started without an init): when
    /// it exited after handing over, the kernel would end the whole PID
    /// namespace, the new generation with it. Refused before anything is
    /// started.
    #[error(
        "this process is PID 1 (a container without an init): in replace mode the old generation's exit would end the container; run in supervised mode (TABLEFLIP_MODE=supervised), whose process stays for the life of the service, or under an init that keeps running until every process has exited (not tini or dumb-init, which exit with their child)"
    )]
    Pid1,

    /// `TABLEFLIP_MODE` names no process model.
    #[error("TABLEFLIP_MODE={value:?} is not a process model; expected `supervised` or `replace`")]
    Mode {
        /// The value found.
        value: String,
    },

    /// Application state could not be handed over (see
    /// [`Upgrader::hand_over_state`](crate::Upgrader::hand_over_state)), or
    /// what was handed over cannot be read
    /// ([`Upgrader::inherited_state`](crate::Upgrader::inherited_state)).
    #[error("state handover: {reason}")]
    State {
        /// What is wrong.
        reason: String,
    },

    /// Supervised mode cannot run here, or the supervisor failed.
    #[error("supervised mode: {reason}")]
    Supervisor {
        /// What is wrong, and what to do about it.
        reason: String,
    },

    /// The supervisor ran the upgrade this generation asked for, and it
    /// failed; the generation that asked keeps serving.
    #[error("the supervisor's upgrade failed: {reason}")]
    UpgradeFailed {
        /// The supervisor's account of the failure.
        reason: String,
    },

    /// Any other I/O error, with what was being done.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn handover(reason: impl Into<String>) -> Self {
        Error::InvalidHandover {
            reason: reason.into(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        let kind = match &err {
            Error::Listen { source, .. }
            | Error::Spawn { source, .. }
            | Error::StartDirectory { source, .. } => source.kind(),
            Error::NoExecutable { .. } => io::ErrorKind::NotFound,
            Error::Io { source, .. } | Error::PidFile { source, .. } => source.kind(),
            Error::InvalidAddress { .. } | Error::UnknownNetwork { .. } => {
                io::ErrorKind::InvalidInput
            }
            Error::Timeout { .. } => io::ErrorKind::TimedOut,
            Error::NotSupported | Error::Pid1 => io::ErrorKind::Unsupported,
            Error::Mode { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, err)
    }
}

/// `Result` with tableflip's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `signal 6 (SIGABRT)`, or `signal 70` for a number without a name.
fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(s) => format!("signal {signal} ({})", s.as_str()),
        Err(_) => format!("signal {signal}"),
    }
}
