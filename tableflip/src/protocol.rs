//! The handover protocol between two generations: the parent's side
//! (encoding) and the child's (receiving and checking). The contract
//! itself is `PROTOCOL.md`, published as [`crate::handover_protocol`] (the public
//! documentation module).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::network::Network;
use crate::socket::{self, Kind, SockId};
use crate::sys;

/// The environment variable that carries the handover to the child.
pub const ENV_HANDOVER: &str = "TABLEFLIP_HANDOVER";

/// The environment variable that names the Unix socket the fds of a
/// version-2 handover come over (`<socket-fd>`). Separate from
/// [`ENV_HANDOVER`], which keeps the form every build parses: a build that
/// predates version 2, started as a subprocess of the application with
/// the environment inherited, then ignores the handover (it holds none of
/// the fds [`ENV_HANDOVER_ID`] names) instead of rejecting its form.
pub(crate) const ENV_HANDOVER_SOCKET: &str = "TABLEFLIP_HANDOVER_SOCKET";

/// The environment variable that names the pipes of the handover by
/// inode (`<parent-pipe-inode>:<ready-pipe-inode>`), so that only the
/// process that holds them takes the handover: a subprocess of the
/// application that inherits the environment (it is not edited while the
/// process may run threads) finds other fds, or none, at those numbers,
/// and ignores it. Optional: a build that predates it neither sends nor
/// checks it.
pub(crate) const ENV_HANDOVER_ID: &str = "TABLEFLIP_HANDOVER_ID";

/// Protocol version 1: the fds handed on are inherited across `exec`, at
/// the numbers the metadata names.
pub(crate) const VERSION_INHERITED: u32 = 1;

/// Protocol version 2: the child starts with the protocol's pipes and one
/// Unix socket only, and the fds handed on come over that socket
/// (`SCM_RIGHTS`) while it starts; the metadata names each by its
/// position. A parent uses it only for an executable whose ELF note says
/// it speaks it (see [`executable_speaks`]).
pub(crate) const VERSION_STREAMED: u32 = 2;

/// The newest protocol version this build speaks.
pub(crate) const VERSION: u32 = VERSION_STREAMED;

/// The owner of this crate's ELF note (see [`sys::VERSION_NOTE`]),
/// NUL-terminated as ELF notes are.
pub(crate) const NOTE_NAME: &[u8; 10] = b"tableflip\0";

/// The type of the version note within the owner's namespace.
pub(crate) const NOTE_TYPE_VERSION: u32 = 1;

/// The largest metadata a child accepts (a handover of 100 000 sockets fits).
const MAX_METADATA: usize = 16 << 20;

/// How long a child waits for its parent to send the metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata sent to the child.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Metadata {
    pub(crate) version: u32,
    #[serde(default)]
    pub(crate) parent_pid: u32,
    #[serde(default)]
    pub(crate) generation: u64,
    #[serde(default)]
    pub(crate) entries: Vec<EntryMeta>,
    /// Set when the parent is a supervisor (supervised mode): the child
    /// is one of its generations. A build that predates it ignores it
    /// (and would act as a replace-mode child; the supervisor then times
    /// its upgrade out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) supervisor: Option<SupervisorMeta>,
    /// Set when the child is a rollback: the previous binary, started
    /// because the upgrade's new generation died during its probation
    /// (what happened). Shown in the child's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rollback: Option<String>,
    /// With `rollback`: the path later upgrades start from (the child was
    /// started from an image, `/proc/…`, which names no release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) executable: Option<std::path::PathBuf>,
}

/// The supervisor that started this generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SupervisorMeta {
    /// Its PID (the service's, for the life of the service).
    pub(crate) pid: u32,
    /// The generation's end of the control channel: a Unix
    /// `SOCK_SEQPACKET` socket.
    pub(crate) control_fd: RawFd,
    /// The supervisor asks the serving generation for its connections and
    /// files before an upgrade ([`Collect`](crate::control::ToGeneration::Collect)),
    /// so a generation may hand them on. `false` (absent) from a
    /// supervisor that predates it.
    #[serde(default)]
    pub(crate) collects: bool,
}

/// The supervisor as a generation holds it.
#[derive(Debug)]
pub(crate) struct SupervisorLink {
    pub(crate) pid: u32,
    pub(crate) control: OwnedFd,
    /// See [`SupervisorMeta::collects`].
    pub(crate) collects: bool,
}

/// One fd handed on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EntryMeta {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) fd: RawFd,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) address: Option<String>,
    /// Passed by systemd's socket activation to the first generation: the
    /// socket unit decides its address, so it is matched by name alone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) activated: bool,
    /// The device and inode of a Unix socket's file, as recorded when it
    /// was bound: the file is removed at a real stop only while it is
    /// still that file. Absent from builds before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file_dev: Option<u64>,
    /// See [`file_dev`](Self::file_dev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file_ino: Option<u64>,
    /// The socket's cookie (`SO_COOKIE`, socket(7); Linux): the next
    /// generation finds the very socket this generation checked behind the
    /// fd with one system call, instead of checking its type, address and
    /// state again. Absent for files, outside Linux, and from builds before
    /// it was added (the full checks then run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cookie: Option<u64>,
}

/// One inherited entry, checked, with its fd owned.
pub(crate) struct Inherited {
    pub(crate) meta: EntryMeta,
    pub(crate) network: Option<Network>,
    pub(crate) fd: OwnedFd,
    /// Passed by socket activation under a name systemd made up.
    pub(crate) unnamed: bool,
    /// Came back from systemd's fd store (see [`crate::systemd`]): a
    /// socket an earlier run of the service bound, not a socket unit's.
    pub(crate) from_store: bool,
    /// The socket's identity, as the checks read it (`None`: a file, or
    /// not read).
    pub(crate) id: Option<SockId>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What the child received from its parent.
pub(crate) struct Handover {
    pub(crate) parent_pid: u32,
    pub(crate) generation: u64,
    pub(crate) parent_pipe: OwnedFd,
    pub(crate) ready_pipe: OwnedFd,
    pub(crate) entries: Vec<Inherited>,
    pub(crate) supervisor: Option<SupervisorLink>,
    /// The protocol version of the handover (2: the fds came over a
    /// socket, not across `exec`).
    pub(crate) version: u32,
    /// See [`Metadata::rollback`].
    pub(crate) rollback: Option<String>,
    /// See [`Metadata::executable`].
    pub(crate) executable: Option<std::path::PathBuf>,
}

/// The value of [`ENV_HANDOVER`] for the given protocol pipes (both
/// versions: version 2 adds [`ENV_HANDOVER_SOCKET`]).
pub(crate) fn env_value(parent_fd: RawFd, ready_fd: RawFd) -> String {
    format!("{VERSION_INHERITED}:{parent_fd}:{ready_fd}")
}

/// The value of [`ENV_HANDOVER_ID`] for the protocol's fds (the two pipe
/// ends, and in version 2 the socket): their inodes.
pub(crate) fn id_value(fds: &[BorrowedFd<'_>]) -> Result<String> {
    let mut inodes = Vec::with_capacity(fds.len());
    for fd in fds {
        let st = fstat(*fd).map_err(|e| Error::io("cannot fstat a handover pipe", e))?;
        inodes.push(st.st_ino.to_string());
    }
    Ok(inodes.join(":"))
}

/// Whether the protocol's fds are those that `ENV_HANDOVER_ID` names;
/// `true` when the variable is absent (a parent built before it existed).
fn meant_for_this_process(id: Option<&OsStr>, fds: &[RawFd]) -> bool {
    let Some(id) = id else {
        return true;
    };
    let inode = |fd: RawFd| {
        sys::inspect_received(fd, |b| fstat(b).ok())
            .ok()
            .flatten()
            .map(|st| st.st_ino.to_string())
    };
    let want: Vec<&str> = id.to_str().unwrap_or("").split(':').collect();
    want.len() == fds.len()
        && want
            .iter()
            .zip(fds)
            .all(|(want, fd)| inode(*fd).is_some_and(|have| have == *want))
}

/// The newest handover protocol version the executable at `path`
/// receives, by its ELF note (see [`sys::VERSION_NOTE`]): 1 for an
/// executable without it (a build before version 2, a script that
/// `exec`s the service, a file that cannot be read: version 1 is what
/// every build receives).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn executable_speaks(path: &std::path::Path) -> u32 {
    std::fs::File::open(path)
        .ok()
        .and_then(|file| elf::version_note(&file))
        .filter(|v| *v >= VERSION_INHERITED)
        .unwrap_or(VERSION_INHERITED)
}

/// Version 1 where version 2's socket is not available.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn executable_speaks(_path: &std::path::Path) -> u32 {
    VERSION_INHERITED
}

/// Reading the version note of an ELF executable: its program headers and
/// `PT_NOTE` segments only (ELF: System V ABI, "Program Header" and "Note
/// Section"); both classes and byte orders.
mod elf {
    use std::os::unix::fs::FileExt;

    const PT_NOTE: u64 = 4;
    /// More program headers than any executable has.
    const MAX_HEADERS: usize = 256;
    /// A larger note segment is not read.
    const MAX_NOTES: usize = 64 * 1024;

    struct Reader {
        wide: bool,
        little: bool,
    }

    impl Reader {
        fn u16(&self, b: &[u8], at: usize) -> Option<u64> {
            let b: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
            Some(u64::from(if self.little {
                u16::from_le_bytes(b)
            } else {
                u16::from_be_bytes(b)
            }))
        }
        fn u32(&self, b: &[u8], at: usize) -> Option<u64> {
            let b: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
            Some(u64::from(if self.little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }))
        }
        fn u64(&self, b: &[u8], at: usize) -> Option<u64> {
            let b: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
            Some(if self.little {
                u64::from_le_bytes(b)
            } else {
                u64::from_be_bytes(b)
            })
        }
    }

    fn read_at(file: &std::fs::File, len: usize, offset: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// The description of the `tableflip` version note, if the file is an
    /// ELF file that has one.
    pub(super) fn version_note(file: &std::fs::File) -> Option<u32> {
        let header = read_at(file, 64, 0)?;
        if header.get(..4)? != b"\x7fELF" {
            return None;
        }
        let r = Reader {
            wide: *header.get(4)? == 2,
            little: *header.get(5)? == 1,
        };
        let (phoff, phentsize, phnum) = if r.wide {
            (
                r.u64(&header, 0x20)?,
                r.u16(&header, 0x36)?,
                r.u16(&header, 0x38)?,
            )
        } else {
            (
                r.u32(&header, 0x1c)?,
                r.u16(&header, 0x2a)?,
                r.u16(&header, 0x2c)?,
            )
        };
        let (phentsize, phnum) = (
            usize::try_from(phentsize).ok()?,
            usize::try_from(phnum).ok()?,
        );
        if phnum > MAX_HEADERS || phentsize < if r.wide { 56 } else { 32 } {
            return None;
        }
        let table = read_at(file, phentsize * phnum, phoff)?;
        for ph in table.chunks_exact(phentsize) {
            if r.u32(ph, 0)? != PT_NOTE {
                continue;
            }
            let (offset, size, align) = if r.wide {
                (r.u64(ph, 8)?, r.u64(ph, 32)?, r.u64(ph, 48)?)
            } else {
                (r.u32(ph, 4)?, r.u32(ph, 16)?, r.u32(ph, 28)?)
            };
            let size = usize::try_from(size).ok().filter(|s| *s <= MAX_NOTES)?;
            let notes = read_at(file, size, offset)?;
            if let Some(v) = find_note(&r, &notes, if align == 8 { 8 } else { 4 }) {
                return Some(v);
            }
        }
        None
    }

    /// Walks the notes of one segment (entries padded to `align`).
    fn find_note(r: &Reader, notes: &[u8], align: usize) -> Option<u32> {
        let pad = |n: usize| n.checked_add(align - 1).map(|n| n & !(align - 1));
        let mut at: usize = 0;
        while at.checked_add(12).is_some_and(|end| end <= notes.len()) {
            let namesz = usize::try_from(r.u32(notes, at)?).ok()?;
            let descsz = usize::try_from(r.u32(notes, at + 4)?).ok()?;
            let note_type = r.u32(notes, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at.checked_add(pad(namesz)?)?;
            let next = desc_at.checked_add(pad(descsz)?)?;
            let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
            if name == super::NOTE_NAME
                && note_type == u64::from(super::NOTE_TYPE_VERSION)
                && descsz == 4
            {
                // Written little-endian whatever the file's byte order.
                let desc: [u8; 4] = notes.get(desc_at..desc_at + 4)?.try_into().ok()?;
                return Some(u32::from_le_bytes(desc));
            }
            if next > notes.len() {
                return None;
            }
            at = next;
        }
        None
    }
}

/// Encodes the metadata as the parent writes it.
pub(crate) fn encode(meta: &Metadata) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(meta).map_err(|e| Error::Encode {
        reason: e.to_string(),
    })?;
    let mut out = format!("{}\n", json.len()).into_bytes();
    out.extend_from_slice(&json);
    Ok(out)
}

/// The protocol's fds, as [`ENV_HANDOVER`] and [`ENV_HANDOVER_SOCKET`]
/// name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EnvFds {
    parent: RawFd,
    ready: RawFd,
    /// Version 2: the Unix socket the fds come over.
    stream: Option<RawFd>,
}

impl EnvFds {
    fn all(&self) -> Vec<RawFd> {
        let mut fds = vec![self.parent, self.ready];
        fds.extend(self.stream);
        fds
    }
}

fn parse_env(value: &str, socket: Option<&str>) -> Result<EnvFds> {
    let parts: Vec<&str> = value.split(':').collect();
    let [version, parent, ready] = parts.as_slice() else {
        return Err(Error::handover(format!(
            "{ENV_HANDOVER}={value:?} is malformed; expected `<version>:<parent-fd>:<ready-fd>`"
        )));
    };
    let version: u32 = version.parse().map_err(|_| {
        Error::handover(format!(
            "{ENV_HANDOVER}={value:?}: the version {version:?} is not a number"
        ))
    })?;
    check_version(version)?;
    let fd = |var: &str, value: &str, what: &str, s: &str| -> Result<RawFd> {
        match s.parse::<RawFd>() {
            Ok(fd) if fd > 2 => Ok(fd),
            _ => Err(Error::handover(format!(
                "{var}={value:?}: the {what} fd {s:?} is not a valid fd number (3 or more)"
            ))),
        }
    };
    let parent = fd(ENV_HANDOVER, value, "parent", parent)?;
    let ready = fd(ENV_HANDOVER, value, "ready", ready)?;
    if parent == ready {
        return Err(Error::handover(format!(
            "{ENV_HANDOVER}={value:?}: the parent and ready fds are both {parent}"
        )));
    }
    let stream = match socket {
        None => None,
        Some(s) => {
            let stream = fd(ENV_HANDOVER_SOCKET, s, "socket", s)?;
            if stream == parent || stream == ready {
                return Err(Error::handover(format!(
                    "{ENV_HANDOVER_SOCKET}={s:?} names fd {stream}, one of the protocol's pipes"
                )));
            }
            Some(stream)
        }
    };
    Ok(EnvFds {
        parent,
        ready,
        stream,
    })
}

fn check_version(version: u32) -> Result<()> {
    if version == 0 {
        return Err(Error::handover(
            "protocol version 0 does not exist (versions start at 1)",
        ));
    }
    if version > VERSION {
        let speaks = if VERSION == 1 {
            "version 1".to_owned()
        } else {
            format!("versions 1 to {VERSION}")
        };
        return Err(Error::handover(format!(
            "protocol version {version} is newer than this build understands \
             (this build speaks {speaks}); the parent was built with a newer tableflip"
        )));
    }
    Ok(())
}

/// Runs `f` on `fd`, a number the parent (or systemd) says it handed on,
/// borrowed for the call, after checking that it is open and really came
/// across `exec` (see [`sys::inspect_received`]): a close-on-exec fd was
/// opened by this process, and is not the parent's to hand on. The error
/// starts with `fd <n>`.
pub(crate) fn inspect_handed_on<R>(
    fd: RawFd,
    f: impl FnOnce(BorrowedFd<'_>) -> Result<R, String>,
) -> Result<R, String> {
    if fd < 0 {
        return Err(format!("fd {fd} is not a valid fd number"));
    }
    sys::inspect_received(fd, f).map_err(|e| format!("fd {fd} {e}"))?
}

/// As [`inspect_handed_on`], with the received fds locked by the caller.
fn inspect_handed_on_locked<R>(
    received: &mut sys::ReceivedFds,
    fd: RawFd,
    f: impl FnOnce(BorrowedFd<'_>) -> Result<R, String>,
) -> Result<R, String> {
    if fd < 0 {
        return Err(format!("fd {fd} is not a valid fd number"));
    }
    received
        .inspect(fd, f)
        .map_err(|e| format!("fd {fd} {e}"))?
}

/// Checks that `fd` is an inherited pipe end of the right direction
/// (`readable`: the read end).
fn check_pipe(fd: RawFd, what: &str, readable: bool) -> Result<()> {
    inspect_handed_on(fd, |borrowed| {
        let st = fstat(borrowed).map_err(|e| format!("fd {fd}: cannot fstat it: {e}"))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
            return Err(format!("fd {fd} is not a pipe"));
        }
        let mode = fcntl(borrowed, FcntlArg::F_GETFL)
            .map(|f| OFlag::from_bits_retain(f) & OFlag::O_ACCMODE)
            .map_err(|e| format!("fd {fd}: cannot read its flags: {e}"))?;
        let (wrong, end, expected) = if readable {
            (OFlag::O_WRONLY, "write", "read")
        } else {
            (OFlag::O_RDONLY, "read", "write")
        };
        if mode == wrong {
            return Err(format!(
                "fd {fd} is the {end} end of a pipe, expected the {expected} end"
            ));
        }
        Ok(())
    })
    .map_err(|e| Error::handover(format!("the {what} {e}")))
}

/// Reads the handover, if this process was started by a tableflip parent.
///
/// Removes [`ENV_HANDOVER`] and [`ENV_HANDOVER_ID`] from the environment
/// when that is safe (see [`sys::remove_env`]). Every fd is checked while
/// only borrowed; ownership is taken only once the whole handover is valid,
/// so a hostile handover never closes an fd that belongs to someone else.
/// A handover whose [`ENV_HANDOVER_ID`] names pipes this process does not
/// hold was meant for another process (the application's parent, whose
/// environment a subprocess inherited): it is ignored.
pub(crate) fn receive() -> Result<Option<Handover>> {
    // The note that tells a parent this build receives version 2 stays in
    // the executable because it is read here.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    std::hint::black_box(&sys::VERSION_NOTE);
    let value = std::env::var_os(ENV_HANDOVER);
    let id = std::env::var_os(ENV_HANDOVER_ID);
    let socket = std::env::var_os(ENV_HANDOVER_SOCKET);
    sys::remove_env(&[ENV_HANDOVER, ENV_HANDOVER_ID, ENV_HANDOVER_SOCKET]);
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value
        .into_string()
        .map_err(|v: OsString| Error::handover(format!("{ENV_HANDOVER}={v:?} is not UTF-8")))?;
    // A socket variable beside an id of two pipes is a stale copy (passed
    // on by a build that predates version 2 from an environment it could
    // not clean): the handover is of version 1.
    let pipes_only = id
        .as_deref()
        .and_then(OsStr::to_str)
        .is_some_and(|id| id.split(':').count() == 2);
    if pipes_only && socket.is_some() {
        tracing::debug!(
            "{ENV_HANDOVER_SOCKET} in the environment beside a version-1 {ENV_HANDOVER_ID}: stale, ignored"
        );
    }
    let socket = socket
        .filter(|_| !pipes_only)
        .map(|v| {
            v.into_string().map_err(|v: OsString| {
                Error::handover(format!("{ENV_HANDOVER_SOCKET}={v:?} is not UTF-8"))
            })
        })
        .transpose()?;
    let env = parse_env(&value, socket.as_deref())?;
    if !meant_for_this_process(id.as_deref(), &env.all()) {
        tracing::debug!(
            "{ENV_HANDOVER} in the environment names fds this process does not hold: it was meant for another process; ignored"
        );
        return Ok(None);
    }
    // One deadline for the metadata and the fds.
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    let (parent_fd, ready_fd) = (env.parent, env.ready);
    check_pipe(parent_fd, "parent", true)?;
    check_pipe(ready_fd, "ready", false)?;
    if let Some(stream) = env.stream {
        inspect_handed_on(stream, |b| check_seqpacket(b, stream))
            .map_err(|e| Error::handover(format!("the socket {e}")))?;
    }
    let raw = sys::inspect_received(parent_fd, |pipe| read_metadata(pipe, deadline))
        .map_err(|e| Error::handover(format!("the parent fd {parent_fd} {e}")))??;
    let mut meta: Metadata = serde_json::from_slice(&raw)
        .map_err(|e| Error::handover(format!("the metadata is not valid: {e}")))?;
    check_version(meta.version)?;
    match (meta.version, env.stream) {
        (VERSION_STREAMED, None) => {
            return Err(Error::handover(format!(
                "the metadata is of version 2, whose fds come over a socket, but {ENV_HANDOVER_SOCKET} names none"
            )));
        }
        (VERSION_INHERITED, Some(_)) => {
            return Err(Error::handover(format!(
                "{ENV_HANDOVER_SOCKET} names a socket, but the metadata is of version 1 (fds inherited)"
            )));
        }
        _ => {}
    }
    let protocol_fds = env.all();
    let mut received = sys::ReceivedFds::lock();
    // Every fd is checked (borrowed) before any is taken.
    let (mut source, checked) = match env.stream {
        // Version 1: the entries' fds came across `exec`. They are
        // inspected, then claimed, under one hold of the lock on received
        // fds: each is checked once (a handover may carry thousands).
        None => {
            let checked = check_all(
                &mut received,
                &meta.entries,
                meta.supervisor.as_ref(),
                &protocol_fds,
            )?;
            (None, checked)
        }
        // Version 2: they come over the socket, in the order the metadata
        // gives by position.
        Some(stream) => {
            let count = meta.entries.len() + usize::from(meta.supervisor.is_some());
            let fds = received
                .inspect(stream, |sock| receive_fds(sock, count, deadline))
                .map_err(|e| Error::handover(format!("the socket fd {stream} {e}")))??;
            let position = |pos: RawFd, what: &dyn Fn() -> String| {
                usize::try_from(pos)
                    .ok()
                    .and_then(|i| fds.get(i))
                    .map(AsRawFd::as_raw_fd)
                    .ok_or_else(|| {
                        Error::handover(format!(
                            "{} names fd position {pos}, but {count} fds came over the socket",
                            what()
                        ))
                    })
            };
            for e in &mut meta.entries {
                e.fd = position(e.fd, &|| format!("the entry {:?}", e.name))?;
            }
            if let Some(sup) = &mut meta.supervisor {
                sup.control_fd = position(sup.control_fd, &|| "the control socket".to_owned())?;
            }
            let mut streamed = Streamed(fds.into_iter().map(|fd| (fd.as_raw_fd(), fd)).collect());
            let checked = check_all(
                &mut streamed,
                &meta.entries,
                meta.supervisor.as_ref(),
                &protocol_fds,
            )?;
            (Some(streamed), checked)
        }
    };

    // Everything is valid: take ownership, the protocol's fds first.
    let mut take = |fd: RawFd, what: &str| {
        received
            .claim(fd)
            .map_err(|e| Error::handover(format!("cannot take the {what}: fd {fd} {e}")))
    };
    let parent_pipe = take(parent_fd, "parent")?;
    let ready_pipe = take(ready_fd, "ready")?;
    if let Some(stream) = env.stream {
        // Its work is done (fds that came and that no entry names, if
        // any, close with `source`).
        drop(take(stream, "socket")?);
    }
    let (entries, supervisor) = match &mut source {
        None => claim_all(&mut received, meta.entries, meta.supervisor, checked)?,
        Some(streamed) => claim_all(streamed, meta.entries, meta.supervisor, checked)?,
    };
    drop(received);
    Ok(Some(Handover {
        parent_pid: meta.parent_pid,
        generation: meta.generation,
        parent_pipe,
        ready_pipe,
        entries,
        supervisor,
        version: meta.version,
        rollback: meta.rollback,
        executable: meta.executable,
    }))
}

/// Where a handover's fds are checked and taken from: the fds received
/// across `exec` (version 1), or those that came over the socket
/// (version 2).
trait FdSource {
    /// Runs `f` on `fd`, borrowed; the error starts with `fd <n>`.
    fn inspect<R>(
        &mut self,
        fd: RawFd,
        f: impl FnOnce(BorrowedFd<'_>) -> Result<R, String>,
    ) -> Result<R, String>;
    /// Takes ownership of `fd` (close-on-exec); the error says why not.
    fn claim(&mut self, fd: RawFd) -> Result<OwnedFd, String>;
}

impl FdSource for sys::ReceivedFds {
    fn inspect<R>(
        &mut self,
        fd: RawFd,
        f: impl FnOnce(BorrowedFd<'_>) -> Result<R, String>,
    ) -> Result<R, String> {
        inspect_handed_on_locked(self, fd, f)
    }

    fn claim(&mut self, fd: RawFd) -> Result<OwnedFd, String> {
        sys::ReceivedFds::claim(self, fd).map_err(|e| e.to_string())
    }
}

/// The fds that came over a version-2 handover's socket, by number
/// (owned, close-on-exec: `MSG_CMSG_CLOEXEC`).
struct Streamed(std::collections::HashMap<RawFd, OwnedFd>);

impl FdSource for Streamed {
    fn inspect<R>(
        &mut self,
        fd: RawFd,
        f: impl FnOnce(BorrowedFd<'_>) -> Result<R, String>,
    ) -> Result<R, String> {
        match self.0.get(&fd) {
            Some(owned) => f(owned.as_fd()),
            None => Err(format!("fd {fd} did not come over the socket")),
        }
    }

    fn claim(&mut self, fd: RawFd) -> Result<OwnedFd, String> {
        self.0
            .remove(&fd)
            .ok_or_else(|| "was taken already".to_owned())
    }
}

/// What [`check_all`] found of each entry: its network and its socket's
/// identity.
type Checked = Vec<(Option<Network>, Option<SockId>)>;

/// Checks the entries and the supervisor's control socket with their fds
/// only borrowed.
fn check_all<S: FdSource>(
    source: &mut S,
    entries: &[EntryMeta],
    supervisor: Option<&SupervisorMeta>,
    protocol_fds: &[RawFd],
) -> Result<Checked> {
    let mut protocol_fds = protocol_fds.to_vec();
    if let Some(sup) = supervisor {
        check_control(source, sup.control_fd, &protocol_fds)?;
        protocol_fds.push(sup.control_fd);
    }
    check_entries(source, entries, &protocol_fds)
}

/// Takes the fds [`check_all`] checked.
fn claim_all<S: FdSource>(
    source: &mut S,
    entries: Vec<EntryMeta>,
    supervisor: Option<SupervisorMeta>,
    checked: Checked,
) -> Result<(Vec<Inherited>, Option<SupervisorLink>)> {
    let mut take = |fd: RawFd, what: &dyn Fn() -> String| {
        source
            .claim(fd)
            .map_err(|e| Error::handover(format!("cannot take the {}: fd {fd} {e}", what())))
    };
    let supervisor = match supervisor {
        Some(sup) => Some(SupervisorLink {
            pid: sup.pid,
            control: take(sup.control_fd, &|| "control socket".to_owned())?,
            collects: sup.collects,
        }),
        None => None,
    };
    let mut taken = Vec::with_capacity(checked.len());
    for (meta, (network, id)) in entries.into_iter().zip(checked) {
        let fd = take(meta.fd, &|| {
            format!("{} {:?}", meta.kind.describe(), meta.name)
        })?;
        if meta.kind != Kind::File {
            sys::set_nonblocking(fd.as_fd()).map_err(|e| {
                Error::handover(format!("cannot make fd {} non-blocking: {e}", meta.fd))
            })?;
        }
        taken.push(Inherited {
            meta,
            network,
            fd,
            unnamed: false,
            from_store: false,
            id,
        });
    }
    Ok((taken, supervisor))
}

/// Whether `sock` (fd `fd`) is a Unix `SOCK_SEQPACKET` socket.
fn check_seqpacket(sock: BorrowedFd<'_>, fd: RawFd) -> Result<(), String> {
    let sock = socket2::SockRef::from(&sock);
    match (sock.r#type(), sock.local_addr().map(|a| a.is_unix())) {
        (Ok(socket2::Type::SEQPACKET), Ok(true)) => Ok(()),
        _ => Err(format!("fd {fd} is not a Unix SOCK_SEQPACKET socket")),
    }
}

/// Receives the `count` fds of a version-2 handover from its socket: each
/// packet starts with the position of its first fd (32 bits, little
/// endian), positions running on from 0 without a gap. Within the
/// metadata's deadline; the error says how far it got.
fn receive_fds(
    sock: BorrowedFd<'_>,
    count: usize,
    deadline: std::time::Instant,
) -> Result<Vec<OwnedFd>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(count);
    let mut buf = [0u8; 16];
    let fail = |got: usize, why: String| {
        Error::handover(format!(
            "the fds over the socket fd {}: {why} ({got} of {count} received)",
            sock.as_raw_fd()
        ))
    };
    while fds.len() < count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(fail(
                fds.len(),
                format!("not all came within {METADATA_TIMEOUT:?}"),
            ));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut pfd = [PollFd::new(sock, PollFlags::POLLIN)];
        match poll(&mut pfd, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(fail(fds.len(), format!("cannot poll it: {e}"))),
        }
        // Not waiting in `recvmsg` itself: another holder of this end
        // could take the packet `poll` saw.
        let (len, got) = match sys::recv_packet(sock, &mut buf, true) {
            Ok(Some(packet)) => packet,
            Ok(None) => {
                return Err(fail(
                    fds.len(),
                    "the parent closed it before sending them all".to_owned(),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(fail(fds.len(), format!("cannot read it: {e}"))),
        };
        let first = buf
            .get(..4)
            .filter(|_| len == 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes);
        if first.and_then(|f| usize::try_from(f).ok()) != Some(fds.len()) {
            return Err(fail(
                fds.len(),
                format!(
                    "a packet of {len} bytes does not start at position {}",
                    fds.len()
                ),
            ));
        }
        if got.is_empty() || fds.len() + got.len() > count {
            return Err(fail(
                fds.len(),
                format!(
                    "a packet carries {} fds, {} were left to come",
                    got.len(),
                    count - fds.len()
                ),
            ));
        }
        fds.extend(got);
    }
    Ok(fds)
}

/// Checks that `fd` is an inherited Unix `SOCK_SEQPACKET` socket, other
/// than the protocol's pipes: the control channel of a supervised
/// generation.
fn check_control<S: FdSource>(source: &mut S, fd: RawFd, protocol_fds: &[RawFd]) -> Result<()> {
    if fd <= 2 || protocol_fds.contains(&fd) {
        return Err(Error::handover(format!(
            "the control fd {fd} is a standard stream or one of the protocol's pipes"
        )));
    }
    source
        .inspect(fd, |borrowed| check_seqpacket(borrowed, fd))
        .map_err(|e| Error::handover(format!("the control {e}")))
}

fn read_metadata(pipe: BorrowedFd<'_>, deadline: std::time::Instant) -> Result<Vec<u8>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut reader = PipeReader(pipe);
    let mut header = Vec::new();
    let mut body = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let mut expected: Option<usize> = None;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pipe, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => {
                return Err(Error::handover(format!(
                    "no metadata from the parent within {METADATA_TIMEOUT:?}"
                )));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Error::handover(format!(
                    "cannot poll the parent fd {}: {e}",
                    pipe.as_raw_fd()
                )));
            }
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                return Err(Error::handover(format!(
                    "cannot read the metadata from the parent fd {}: {e}",
                    pipe.as_raw_fd()
                )));
            }
        };
        if n == 0 {
            return Err(Error::handover(match expected {
                None => "the parent closed the pipe before sending the metadata".to_owned(),
                Some(len) => format!("the metadata is truncated ({} of {len} bytes)", body.len()),
            }));
        }
        let mut chunk = &buf[..n];
        if expected.is_none() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    header.extend_from_slice(&chunk[..i]);
                    chunk = &chunk[i + 1..];
                    let len = std::str::from_utf8(&header)
                        .ok()
                        .and_then(|s| s.parse::<usize>().ok())
                        .ok_or_else(|| {
                            Error::handover(format!(
                                "the metadata header {:?} is not a length",
                                String::from_utf8_lossy(&header)
                            ))
                        })?;
                    if len > MAX_METADATA {
                        return Err(Error::handover(format!(
                            "the metadata is {len} bytes, more than the limit of {MAX_METADATA}"
                        )));
                    }
                    expected = Some(len);
                }
                None => {
                    header.extend_from_slice(chunk);
                    if header.len() > 20 {
                        return Err(Error::handover(
                            "the metadata does not start with a length line",
                        ));
                    }
                    continue;
                }
            }
        }
        body.extend_from_slice(chunk);
        if let Some(len) = expected {
            if body.len() > len {
                return Err(Error::handover(format!(
                    "the parent sent more than the announced {len} bytes of metadata"
                )));
            }
            if body.len() == len {
                return Ok(body);
            }
        }
    }
}

struct PipeReader<'a>(BorrowedFd<'a>);

impl Read for PipeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(nix::unistd::read(self.0, buf)?)
    }
}

/// Validates every entry with its fd only borrowed; returns, for each in
/// order, its network and its socket's identity.
fn check_entries<S: FdSource>(
    source: &mut S,
    entries: &[EntryMeta],
    protocol_fds: &[RawFd],
) -> Result<Checked> {
    let mut names = std::collections::HashSet::new();
    let mut fds = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let what = e.kind.describe();
        let bad = |reason: String| Error::InheritMismatch {
            what,
            name: e.name.clone(),
            reason,
        };
        if e.name.is_empty() {
            return Err(Error::handover(format!(
                "an entry for fd {} has an empty name",
                e.fd
            )));
        }
        if !names.insert(e.name.as_str()) {
            return Err(Error::handover(format!(
                "the name {:?} is handed on twice",
                e.name
            )));
        }
        if e.fd < 0 {
            return Err(bad(format!("fd {} is not a valid fd number", e.fd)));
        }
        if e.fd <= 2 {
            return Err(bad(format!(
                "fd {} is a standard stream, not a handed-on fd",
                e.fd
            )));
        }
        if protocol_fds.contains(&e.fd) {
            return Err(bad(format!(
                "fd {} is one of the protocol's own pipes",
                e.fd
            )));
        }
        if !fds.insert(e.fd) {
            return Err(Error::handover(format!(
                "fd {} is named by more than one entry",
                e.fd
            )));
        }
        let network = match (&e.network, e.kind) {
            (None, Kind::File) => None,
            (Some(_), Kind::File) => return Err(bad("a file entry names a network".to_owned())),
            (None, _) => return Err(bad("the entry names no network".to_owned())),
            (Some(n), _) => Some(n.parse::<Network>().map_err(|err| bad(err.to_string()))?),
        };
        if matches!(e.kind, Kind::Listener | Kind::Packet) && e.address.is_none() {
            return Err(bad("the entry names no address".to_owned()));
        }
        let id = source
            .inspect(e.fd, |fd| {
                check_handed_on(fd, e, network).map_err(|r| format!("fd {}: {r}", e.fd))
            })
            .map_err(bad)?;
        out.push((network, id));
    }
    Ok(out)
}

/// Checks the fd of the entry `e`: by the socket cookie the previous
/// generation sent, when it sent one and this kernel has them (the socket
/// the previous generation checked, so its kind, network and address are
/// what the entry says: one system call for a handover of thousands of
/// listeners); by the full checks of [`socket::check_fd_id`] otherwise.
fn check_handed_on(
    fd: BorrowedFd<'_>,
    e: &EntryMeta,
    network: Option<Network>,
) -> Result<Option<SockId>, String> {
    let Some(cookie) = e.cookie.filter(|_| e.kind != Kind::File) else {
        return socket::check_fd_id(fd, e.kind, network);
    };
    socket::check_shape(e.kind, network)?;
    match sys::socket_cookie_of_number(fd.as_raw_fd()) {
        Ok(got) if got == cookie => Ok(Some(SockId::Cookie(cookie))),
        Ok(_) => Err(format!(
            "it is not the socket the previous generation handed on (socket cookie {cookie} expected)"
        )),
        Err(err) if err.raw_os_error() == Some(nix::libc::ENOPROTOOPT) => {
            socket::check_fd_id(fd, e.kind, network)
        }
        Err(err) if err.raw_os_error() == Some(nix::libc::ENOTSOCK) => Err(format!(
            "it is not a socket, expected a {}",
            e.kind.describe()
        )),
        Err(err) => Err(format!("cannot read its socket cookie: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_value_round_trips() {
        let parsed = parse_env(&env_value(7, 8), None).ok();
        assert_eq!(
            parsed.map(|e| (e.parent, e.ready, e.stream)),
            Some((7, 8, None))
        );
        let parsed = parse_env(&env_value(7, 8), Some("9")).ok();
        assert_eq!(
            parsed.map(|e| (e.parent, e.ready, e.stream)),
            Some((7, 8, Some(9)))
        );
        for bad in ["", "x", "2", "7", "8", "-1", "9:1"] {
            assert!(
                parse_env(&env_value(7, 8), Some(bad)).is_err(),
                "socket {bad:?}"
            );
        }
    }

    /// This crate's own test binary carries the note (the library is linked
    /// in, and `receive` refers to it), so a parent starts it with
    /// version 2; a file that is no ELF executable, or none at all, gets
    /// version 1.
    #[test]
    fn the_version_note_is_found_in_executables_that_have_it() {
        let me = std::env::current_exe().unwrap_or_default();
        assert_eq!(executable_speaks(&me), VERSION);
        let dir = std::env::temp_dir().join(format!("tf-note-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let script = dir.join("wrapper.sh");
        let _ = std::fs::write(&script, "#!/bin/sh\nexec true\n");
        assert_eq!(executable_speaks(&script), VERSION_INHERITED);
        assert_eq!(executable_speaks(&dir.join("absent")), VERSION_INHERITED);
        // An ELF file without the note: the first 64 KiB of this one with
        // its program headers pointing past the end.
        let mut bytes = std::fs::read(&me).unwrap_or_default();
        bytes.truncate(64);
        let _ = std::fs::write(dir.join("cut"), &bytes);
        assert_eq!(executable_speaks(&dir.join("cut")), VERSION_INHERITED);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn env_value_rejects_garbage() {
        for bad in [
            "", "1", "1:2", "1:3:3", "1:x:4", "0:3:4", "1:3:4:5", "1:-1:4", "1:1:4", "3:3:4",
            "2:3:4:5",
        ] {
            let err = parse_env(bad, None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("invalid handover"), "{bad:?} gave {err:?}");
        }
        let err = parse_env("9:3:4", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("version 9"), "{err}");
    }

    /// The version-1 metadata exactly as the first release writes it, plus
    /// a field a later release might add: it must parse forever.
    #[test]
    fn version_one_metadata_parses() {
        let v1 = r#"{"version":1,"parent_pid":10,"generation":2,"entries":[
            {"name":"HTTP","kind":"listener","fd":5,"network":"tcp","address":"127.0.0.1:8080"},
            {"name":"f","kind":"file","fd":6,"future_field":true}],"also_future":[1,2]}"#;
        let meta: Option<Metadata> = serde_json::from_str(v1).ok();
        let meta = meta.map(|m| (m.version, m.parent_pid, m.generation, m.entries.len()));
        assert_eq!(meta, Some((1, 10, 2, 2)));
        let minimal: Option<Metadata> = serde_json::from_str(r#"{"version":1}"#).ok();
        assert!(minimal.is_some_and(|m| m.entries.is_empty()));
    }

    #[test]
    fn encode_prefixes_the_length() {
        let meta = Metadata {
            version: VERSION,
            parent_pid: 1,
            generation: 1,
            entries: vec![],
            supervisor: None,
            rollback: None,
            executable: None,
        };
        let bytes = encode(&meta).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let (len, json) = text.split_once('\n').unwrap_or_default();
        assert_eq!(len.parse::<usize>().ok(), Some(json.len()));
    }
}
