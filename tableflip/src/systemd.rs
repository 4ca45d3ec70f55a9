//! systemd integration: readiness and reload notifications (`sd_notify`)
//! and socket activation (`sd_listen_fds`).
//!
//! The notification protocol is one datagram per message to the Unix
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! address), so it is written here rather than pulled in as a crate.
//!
//! Who says what, so that the default `NotifyAccess=main` works: the
//! process systemd knows as the main one sends everything. The first
//! generation sends `READY=1`. During an upgrade the *old* generation (still
//! the main process) sends `RELOADING=1` with `MONOTONIC_USEC=`, and once
//! the new one is ready, `MAINPID=<new>` and `READY=1` in one message; from
//! then on the new generation is the main process and the old one says
//! nothing more. A failed upgrade ends the reload with `READY=1` and a
//! `STATUS=` naming the failure. `STOPPING=1` marks a real stop.
//!
//! The file descriptor store (`FDSTORE=1`, `sd_notify(3)`,
//! `systemd.service(5)`'s `FileDescriptorStoreMax=`, and systemd.io's
//! "File Descriptor Store"): the listening sockets the service binds are
//! kept by systemd across restarts and crashes, under their listener's name
//! (`FDNAME=`), and come back at the next start as socket activation's do.
//! Used only when the unit enables the store: systemd 254 and later say so
//! with `$FDSTORE` (the unit's `FileDescriptorStoreMax=`); with older ones,
//! which set nothing, the unit says so itself with
//! `Environment=TABLEFLIP_FDSTORE=1`. Anything else would make systemd
//! warn in its journal at every start that the store is full.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{Error, Result};
use crate::protocol::{EntryMeta, Inherited, inspect_handed_on};
use crate::socket::{self, Kind};
use crate::sys;

/// Sends notifications to the service manager, if `$NOTIFY_SOCKET` is set.
#[derive(Debug)]
pub(crate) struct Notifier {
    target: Option<(SockAddr, String)>,
    store: Store,
}

/// What the names of this crate's sockets in systemd's fd store start with
/// (`FDNAME=tableflip.<listener>`): they come back through `LISTEN_FDS`
/// with a socket unit's, and are told apart by it. A socket unit's is used
/// whatever its address (the unit decides); a stored one only while the
/// listener's declared address is still its own.
pub(crate) const STORE_PREFIX: &str = "tableflip.";

/// The variable that turns the use of systemd's fd store on (`1`) or off
/// (`0`) whatever `$FDSTORE` says: for systemd before 254, which does not
/// set `$FDSTORE`, and to opt out.
pub const ENV_FDSTORE: &str = "TABLEFLIP_FDSTORE";

/// Whether listening sockets go to systemd's fd store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Off,
    /// `max`: the unit's `FileDescriptorStoreMax=`, when systemd said it.
    On {
        max: Option<u32>,
    },
}

impl Store {
    /// From `$FDSTORE` (systemd 254+: the unit's `FileDescriptorStoreMax=`,
    /// set only when it is not 0) and [`ENV_FDSTORE`].
    fn from_env(fdstore: Option<&OsStr>, ours: Option<&OsStr>) -> Store {
        let max = fdstore
            .and_then(OsStr::to_str)
            .and_then(|v| v.trim().parse::<u32>().ok());
        match ours.map(|v| v.to_str().unwrap_or("").trim()) {
            Some("1") => return Store::On { max },
            Some("0") => return Store::Off,
            Some("") | None => {}
            Some(other) => tracing::warn!(
                value = other,
                "ignoring {ENV_FDSTORE}: expected 1 (use the fd store) or 0 (do not)"
            ),
        }
        match max {
            Some(0) | None => Store::Off,
            Some(n) => Store::On { max: Some(n) },
        }
    }
}

impl Notifier {
    /// A notifier for the `NOTIFY_SOCKET` of `env` (the environment the
    /// service was started with, which the next generation gets too).
    pub(crate) fn from_env(env: &[(OsString, OsString)]) -> Notifier {
        let value = env
            .iter()
            .find(|(k, _)| k == OsStr::new("NOTIFY_SOCKET"))
            .map(|(_, v)| v.clone());
        let target = value.and_then(|v| match notify_addr(&v) {
            Ok(addr) => Some((addr, v.to_string_lossy().into_owned())),
            Err(e) => {
                tracing::warn!(notify_socket = ?v, error = %e, "ignoring NOTIFY_SOCKET");
                None
            }
        });
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == OsStr::new(name))
                .map(|(_, v)| v.as_os_str())
        };
        let store = match &target {
            Some(_) => Store::from_env(var("FDSTORE"), var(ENV_FDSTORE)),
            None => Store::Off,
        };
        if store == Store::Off && target.is_some() {
            tracing::debug!(
                "systemd's fd store is not used: the unit does not enable it (FileDescriptorStoreMax=; with systemd before 254 also Environment={ENV_FDSTORE}=1)"
            );
        }
        Notifier { target, store }
    }

    /// A notifier that sends nothing.
    pub(crate) fn none() -> Notifier {
        Notifier {
            target: None,
            store: Store::Off,
        }
    }

    /// Whether listening sockets go to systemd's fd store.
    pub(crate) fn stores(&self) -> bool {
        matches!(self.store, Store::On { .. })
    }

    /// The unit's `FileDescriptorStoreMax=`, when systemd said it.
    pub(crate) fn store_max(&self) -> Option<u32> {
        match self.store {
            Store::On { max } => max,
            Store::Off => None,
        }
    }

    /// Puts `fd` in systemd's fd store for the listener `name` (`FDSTORE=1`,
    /// `FDNAME=tableflip.<name>`); whether it was sent. A name systemd
    /// would refuse is logged and not sent.
    pub(crate) fn store_fd(&self, name: &str, fd: BorrowedFd<'_>) -> bool {
        if !self.stores() {
            return false;
        }
        let fdname = format!("{STORE_PREFIX}{name}");
        if let Err(why) = check_fdname(&fdname) {
            tracing::warn!(
                listener = name,
                "not kept in systemd's fd store: as FDNAME={fdname:?} the name {why}"
            );
            return false;
        }
        let message = Message::new().line("FDSTORE", "1").line("FDNAME", &fdname);
        self.send_with(&message, &[fd])
    }

    /// Removes what systemd's fd store holds for the listener `name`
    /// (`FDSTOREREMOVE=1`, `FDNAME=tableflip.<name>`); nothing if it holds
    /// nothing.
    pub(crate) fn unstore_fd(&self, name: &str) {
        let fdname = format!("{STORE_PREFIX}{name}");
        if !self.stores() || check_fdname(&fdname).is_err() {
            return;
        }
        let message = Message::new()
            .line("FDSTOREREMOVE", "1")
            .line("FDNAME", &fdname);
        self.send_with(&message, &[]);
    }

    /// Tells the service manager what happened. Failures are logged, never
    /// fatal: the service works without its manager hearing from it.
    pub(crate) fn notify(&self, notice: &Notice<'_>) {
        if self.target.is_some() {
            self.send(&notice.message());
        }
    }

    fn send(&self, message: &Message) {
        self.send_with(message, &[]);
    }

    /// Sends `message` with `fds` attached (`SCM_RIGHTS`); whether it went.
    fn send_with(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> bool {
        let Some((addr, shown)) = &self.target else {
            return false;
        };
        let message = message.text.as_str();
        let sent = Socket::new(Domain::UNIX, Type::DGRAM, None).and_then(|s| {
            if fds.is_empty() {
                s.send_to(message.as_bytes(), addr).map(|_| ())
            } else {
                s.connect(addr)?;
                sys::send_packet(s.as_fd(), message.as_bytes(), fds, false)
            }
        });
        match sent {
            Ok(()) => {
                tracing::debug!(notify_socket = %shown, message = %message.replace('\n', " "), fds = fds.len(), "notified the service manager");
                true
            }
            Err(e) => {
                tracing::warn!(notify_socket = %shown, error = %e, "cannot notify the service manager");
                false
            }
        }
    }
}

/// What the service manager is told, and when (see the module's
/// documentation for who sends what).
#[derive(Debug)]
pub(crate) enum Notice<'a> {
    /// The first generation is ready: `READY=1`, `MAINPID=` (itself).
    Ready { generation: u64, pid: u32 },
    /// An upgrade starts: `RELOADING=1` with `MONOTONIC_USEC=`.
    Reloading { next: u64 },
    /// The new generation is ready and in charge, said by the old one (the
    /// main process until then): `MAINPID=` and `READY=1`.
    HandedOver {
        generation: u64,
        pid: u32,
        from: u32,
        elapsed_ms: u64,
    },
    /// The upgrade failed; `READY=1` ends the reload (the protocol has no
    /// way to fail one), `STATUS=` says why.
    UpgradeFailed {
        generation: u64,
        pid: u32,
        error: &'a crate::error::Error,
    },
    /// A real stop: `STOPPING=1`.
    Stopping,
    /// A lame-duck stop begins: `STOPPING=1`, and a `STATUS=` saying the
    /// service accepts for `delay` more before it drains.
    LameDuck { delay: std::time::Duration },
    /// Supervised mode: generation `generation` (`pid`) serves, after
    /// `note` (its start, an upgrade, a replacement); said by the
    /// supervisor, the main process for the life of the service:
    /// `READY=1` (which also ends a reload) and `STATUS=`.
    Serving {
        generation: u64,
        pid: u32,
        note: &'a str,
    },
    /// Supervised mode: an upgrade failed; `READY=1` ends the reload,
    /// `STATUS=` says why.
    UpgradeFailedText {
        generation: u64,
        pid: u32,
        error: &'a str,
    },
    /// A line for `systemctl status` alone: `STATUS=`.
    Status { text: &'a str },
}

impl Notice<'_> {
    fn message(&self) -> Message {
        match self {
            Notice::Ready { generation, pid } => Message::new()
                .ready()
                .main_pid(*pid)
                .status(&format!("serving: generation {generation}, pid {pid}")),
            Notice::Reloading { next } => Message::new()
                .reloading()
                .status(&format!("upgrading: starting generation {next}")),
            Notice::HandedOver {
                generation,
                pid,
                from,
                elapsed_ms,
            } => Message::new().main_pid(*pid).ready().status(&format!(
                "serving: generation {generation}, pid {pid} (upgraded from pid {from} in {elapsed_ms} ms)"
            )),
            Notice::UpgradeFailed {
                generation,
                pid,
                error,
            } => Message::new().ready().status(&format!(
                "serving: generation {generation}, pid {pid}; the last upgrade failed: {}",
                crate::report::chain(*error)
            )),
            Notice::Stopping => Message::new().stopping().status("stopping"),
            Notice::LameDuck { delay } => Message::new().stopping().status(&format!(
                "stopping: still accepting for {} ms (stop_delay), then draining",
                delay.as_millis()
            )),
            Notice::Serving {
                generation,
                pid,
                note,
            } => Message::new().ready().status(&format!(
                "serving: generation {generation}, pid {pid} ({note}); supervisor pid {}",
                std::process::id()
            )),
            Notice::UpgradeFailedText {
                generation,
                pid,
                error,
            } => Message::new().ready().status(&format!(
                "serving: generation {generation}, pid {pid}; the last upgrade failed: {error}"
            )),
            Notice::Status { text } => Message::new().status(text),
        }
    }
}

/// One notification: `KEY=value` lines, built only through the methods
/// below, so that the keys are fixed and no value can add a line of its
/// own (a newline in a path or an error message would otherwise inject,
/// say, `STOPPING=1`).
#[derive(Debug, Default)]
struct Message {
    text: String,
}

impl Message {
    fn new() -> Message {
        Message::default()
    }

    fn line(mut self, key: &str, value: &str) -> Message {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(key);
        self.text.push('=');
        // sd_notify(3): one assignment per line; control characters
        // (newlines above all) become spaces.
        self.text
            .extend(value.chars().map(|c| if c.is_control() { ' ' } else { c }));
        self
    }

    /// `READY=1`: startup, or a reload, is complete.
    fn ready(self) -> Message {
        self.line("READY", "1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (systemd 253's
    /// `Type=notify-reload` requires both).
    fn reloading(self) -> Message {
        let usec = monotonic_usec().to_string();
        self.line("RELOADING", "1").line("MONOTONIC_USEC", &usec)
    }

    /// `STOPPING=1`: the service is stopping for good.
    fn stopping(self) -> Message {
        self.line("STOPPING", "1")
    }

    /// `MAINPID=`: the service's main process is now `pid`.
    fn main_pid(self, pid: u32) -> Message {
        self.line("MAINPID", &pid.to_string())
    }

    /// `STATUS=`: a line of text for `systemctl status`.
    fn status(self, text: &str) -> Message {
        self.line("STATUS", text)
    }

    #[cfg(test)]
    fn text(&self) -> &str {
        &self.text
    }
}

/// Whether systemd accepts `name` as an `FDNAME=` (`sd_pid_notify_with_fds(3)`):
/// 1 to 255 ASCII characters, none of them a control character or `:`.
fn check_fdname(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 255 {
        return Err("is longer than 255 bytes");
    }
    if !name.is_ascii() {
        return Err("is not ASCII");
    }
    if name.chars().any(|c| c.is_ascii_control() || c == ':') {
        return Err("holds a control character or `:`");
    }
    Ok(())
}

fn notify_addr(value: &OsStr) -> std::io::Result<SockAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SockAddr::unix(value),
        Some(b'@') if bytes.len() > 1 => {
            // socket2 reads a leading NUL byte as an abstract address.
            let mut abstract_name = vec![0u8];
            abstract_name.extend_from_slice(&bytes[1..]);
            SockAddr::unix(OsStr::from_bytes(&abstract_name))
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected an absolute path or @name",
        )),
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
pub(crate) fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
        }
        Err(_) => 0,
    }
}

/// The variables of socket activation, removed from the environment of
/// this process and of the next generations: they describe fds passed to
/// the first process only.
pub(crate) const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Listeners whose stored socket a socket unit's replaced at this start
/// (see [`listen_fds`]): removed from the store by the first
/// [`take_superseded`] caller that sends the store's messages.
static SUPERSEDED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The listeners whose stored socket was closed at this start because a
/// socket unit passes one of the same name, or the store had two: their
/// entries in the store are to be removed (and the socket kept, if it is
/// stored, stored again). Empty after the first call.
pub(crate) fn take_superseded() -> Vec<String> {
    std::mem::take(
        &mut *SUPERSEDED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// The first fd passed by socket activation.
const SD_LISTEN_FDS_START: RawFd = 3;

/// Takes the sockets passed by systemd's socket activation, if they are
/// meant for this process. Each becomes an inherited entry named by
/// `FileDescriptorName=` (systemd's default name is the socket unit's).
pub(crate) fn listen_fds() -> Result<Vec<Inherited>> {
    let var = |k: &str| std::env::var_os(k);
    let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    sys::remove_env(&LISTEN_VARS);
    let Some(count) = count else {
        return Ok(Vec::new());
    };
    let bad = |reason: String| Error::SocketActivation { reason };
    let count = count
        .to_str()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("LISTEN_FDS={count:?} is not a number of fds")))?;
    let me = std::process::id();
    match pid
        .as_deref()
        .and_then(OsStr::to_str)
        .map(str::parse::<u32>)
    {
        Some(Ok(p)) if p == me => {}
        Some(Ok(p)) => {
            // A subprocess of a service that received them sees them too.
            tracing::debug!(
                listen_pid = p,
                pid = me,
                "ignoring LISTEN_FDS: they were passed to another process"
            );
            return Ok(Vec::new());
        }
        // As sd_listen_fds(3): without LISTEN_PID the fds are not ours.
        None => {
            tracing::warn!("ignoring LISTEN_FDS: LISTEN_PID is not set");
            return Ok(Vec::new());
        }
        Some(Err(_)) => return Err(bad(format!("LISTEN_PID={pid:?} is not a process id"))),
    }
    let names: Vec<String> = match &names {
        Some(n) => n.to_string_lossy().split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); usize::from(count)],
    };
    if names.len() != usize::from(count) {
        return Err(bad(format!(
            "LISTEN_FDNAMES names {} fds but LISTEN_FDS={count}",
            names.len()
        )));
    }
    // Check every fd while borrowed; take them only once all are valid.
    let mut checked = Vec::with_capacity(names.len());
    let mut superseded = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let fd = SD_LISTEN_FDS_START + RawFd::from(u16::try_from(i).unwrap_or(u16::MAX));
        let (kind, network, address) = inspect_handed_on(fd, |borrowed| {
            let kind = match socket2::SockRef::from(&borrowed).r#type() {
                Ok(Type::DGRAM) => Kind::Packet,
                Ok(_) => Kind::Listener,
                Err(e) => return Err(format!("fd {fd} is not a socket ({e})")),
            };
            let (network, address) = socket::inspect(borrowed, kind).map_err(|e| {
                format!("fd {fd}: {e}; a socket unit with Accept=yes is not supported")
            })?;
            Ok((kind, network, address))
        })
        .map_err(|reason| bad(format!("{name:?} (fd {fd}): {reason}")))?;
        let stored = name.strip_prefix(STORE_PREFIX).filter(|n| !n.is_empty());
        let unnamed = stored.is_none() && is_default_name(name);
        // Sockets named by systemd's defaults (one name for every socket
        // of a unit) are told apart by position; they are matched to
        // listeners by address.
        let key = match stored {
            Some(listener) => listener.to_owned(),
            None if unnamed => format!("{name}#{i}"),
            None => name.clone(),
        };
        let same = checked
            .iter()
            .position(|(n, ..): &(String, _, _, _, _, _, _)| *n == key);
        if let Some(j) = same {
            // A socket unit's beats what an earlier run kept in the fd
            // store under the same listener name (a socket unit added
            // since). Two stored under one name (a removal systemd did not
            // take): the first, the newest, is kept; the store is put
            // right at the first sync. Two of a socket unit's are a
            // mistake.
            match (checked[j].6, stored.is_some()) {
                (false, true) | (true, true) => {
                    superseded.push((key, fd));
                    continue;
                }
                (true, false) => {
                    let (old, old_fd, ..) = checked.remove(j);
                    superseded.push((old, old_fd));
                }
                _ => {
                    return Err(bad(format!(
                        "two sockets are named {name:?}; give each a FileDescriptorName= of its own (the name of the listener it is for)"
                    )));
                }
            }
        }
        checked.push((key, fd, kind, network, address, unnamed, stored.is_some()));
    }
    for (name, fd) in superseded {
        tracing::warn!(listener = %name, fd, "closing a socket systemd's fd store kept for this listener: a socket unit passes one of the same name now, or the store had two");
        drop(sys::claim_received(fd));
        SUPERSEDED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name);
    }
    let mut out = Vec::with_capacity(checked.len());
    for (name, fd, kind, network, address, unnamed, from_store) in checked {
        let owned =
            sys::claim_received(fd).map_err(|e| bad(format!("{name:?} (fd {fd}): fd {fd} {e}")))?;
        sys::set_nonblocking(owned.as_fd()).map_err(|e| bad(format!("{name:?} (fd {fd}): {e}")))?;
        if from_store {
            tracing::info!(listener = %name, fd, %network, %address, "back from systemd's fd store");
        } else {
            tracing::info!(name = %name, fd, %network, %address, "socket-activated");
        }
        out.push(Inherited {
            meta: EntryMeta {
                name,
                kind,
                fd,
                network: Some(network.to_string()),
                address: Some(address),
                // A stored socket is the service's own, as one a previous
                // generation handed on: used only while the listener's
                // address is still its own.
                activated: !from_store,
                file_dev: None,
                file_ino: None,
                cookie: None,
            },
            network: Some(network),
            fd: owned,
            unnamed,
            from_store,
            id: None,
        });
    }
    Ok(out)
}

/// Whether systemd made the name up: `unknown` when nothing named the fd
/// (`sd_listen_fds_with_names(3)`; `systemd-socket-activate` without
/// `--fdname`), or the socket unit's own name, the default of
/// `FileDescriptorName=` (`systemd.socket(5)`).
fn is_default_name(name: &str) -> bool {
    name == "unknown" || name.ends_with(".socket")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_addresses() {
        assert!(notify_addr(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(notify_addr(OsStr::new("@sd-notify")).is_ok());
        for bad in ["", "relative", "@"] {
            assert!(notify_addr(OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_cannot_add_lines() {
        let m = Message::new()
            .ready()
            .status("cannot start /srv/x\nSTOPPING=1\r\0end");
        assert_eq!(
            m.text(),
            "READY=1\nSTATUS=cannot start /srv/x STOPPING=1  end"
        );
        assert_eq!(m.text().lines().count(), 2);
        let r = Message::new().reloading();
        assert!(r.text().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }

    #[test]
    fn the_store_is_used_only_when_the_unit_enables_it() {
        let os = |v: &'static str| Some(OsStr::new(v));
        assert_eq!(Store::from_env(None, None), Store::Off);
        assert_eq!(Store::from_env(os("0"), None), Store::Off);
        assert_eq!(Store::from_env(os("16"), None), Store::On { max: Some(16) });
        assert_eq!(Store::from_env(os("16"), os("0")), Store::Off);
        assert_eq!(Store::from_env(None, os("1")), Store::On { max: None });
        assert_eq!(Store::from_env(os("garbage"), None), Store::Off);
        // An unknown value of ours is ignored (with a warning).
        assert_eq!(
            Store::from_env(os("4"), os("yes")),
            Store::On { max: Some(4) }
        );
    }

    #[test]
    fn fd_names_systemd_refuses_are_caught() {
        assert!(check_fdname("tableflip.TCP").is_ok());
        assert!(check_fdname(&"x".repeat(255)).is_ok());
        for bad in ["", "a:b", "tab\there", "é", &"x".repeat(256)] {
            assert!(check_fdname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stored_sockets_are_sent_with_their_names_and_removed_by_name() {
        use std::os::unix::net::UnixDatagram;
        let dir = std::env::temp_dir().join(format!("tf-fdstore-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(std::fs::create_dir(&dir).is_ok());
        let path = dir.join("notify");
        let Ok(manager) = UnixDatagram::bind(&path) else {
            panic!("cannot bind the fake notify socket");
        };
        let env = vec![
            (
                OsString::from("NOTIFY_SOCKET"),
                path.clone().into_os_string(),
            ),
            (OsString::from("FDSTORE"), OsString::from("4")),
        ];
        let notifier = Notifier::from_env(&env);
        assert!(notifier.stores());
        assert_eq!(notifier.store_max(), Some(4));
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            panic!("cannot bind a listener");
        };
        assert!(notifier.store_fd("web", listener.as_fd()));
        notifier.unstore_fd("web");
        // A name systemd would refuse is not sent.
        assert!(!notifier.store_fd("a:b", listener.as_fd()));

        let mut buf = vec![0u8; 256];
        let Ok((len, fds)) =
            sys::recv_packet(manager.as_fd(), &mut buf, false).map(|r| r.unwrap_or_default())
        else {
            panic!("nothing received");
        };
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=tableflip.web");
        assert_eq!(fds.len(), 1);
        let ino = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd).map(|s| s.st_ino).ok();
        assert_eq!(
            ino(fds[0].as_fd()),
            ino(listener.as_fd()),
            "the same socket"
        );
        let Ok((len, fds)) =
            sys::recv_packet(manager.as_fd(), &mut buf, false).map(|r| r.unwrap_or_default())
        else {
            panic!("nothing received");
        };
        assert_eq!(&buf[..len], b"FDSTOREREMOVE=1\nFDNAME=tableflip.web");
        assert!(fds.is_empty());
        assert!(manager.set_nonblocking(true).is_ok());
        assert!(
            sys::recv_packet(manager.as_fd(), &mut buf, false).is_err(),
            "nothing more was sent"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn monotonic_clock_moves() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }
}
