//! Unix socket files: given their mode without a path another user could
//! redirect, removed only when they are still the file this service's
//! socket is bound to, and stale ones cleared without ever deleting a
//! live socket of another process.
//!
//! The directory of a socket file may be writable by other users (`/tmp`,
//! a group-writable run directory), who can rename, replace or symlink
//! anything in it between two system calls of ours. So:
//!
//! - the file is created with its final permissions at most: the socket's
//!   own mode is set before `bind` (Linux creates the file with it, minus
//!   the umask); a mode the umask narrowed is then widened through an
//!   `O_PATH` fd opened without following symlinks and checked to be this
//!   socket's file (by the kernel's `sock_diag`, or failing that by type,
//!   owner and link count), never by path;
//! - removal compares device and inode with the file recorded when it was
//!   bound (or that the kernel names for the socket);
//! - a stale file is first moved into a private directory, and deleted
//!   only if what was moved is the file that was probed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use socket2::{Domain, SockAddr, Socket};

use crate::network::Network;

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl FileId {
    pub(crate) fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The identity of what `path` names now (symlinks followed).
    pub(crate) fn of_path(path: &Path) -> io::Result<FileId> {
        std::fs::metadata(path).map(|m| FileId::of(&m))
    }
}

/// A Unix socket file this process is responsible for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketFile {
    /// Absolute, or relative to the start directory.
    pub(crate) path: PathBuf,
    /// The file's identity when known; removal requires it to match.
    pub(crate) id: Option<FileId>,
    /// When the file was created, when known: inode numbers are reused
    /// (a file removed and bound again often gets the same one), birth
    /// times are not.
    pub(crate) born: Option<SystemTime>,
}

impl SocketFile {
    /// The file of a socket bound at `path` (`lookup` is how to reach it
    /// from the current directory, when that differs).
    pub(crate) fn bound(path: PathBuf, lookup: &Path, fd: BorrowedFd<'_>) -> SocketFile {
        let id = identify(lookup, fd);
        let born = std::fs::symlink_metadata(lookup)
            .ok()
            .filter(|m| Some(FileId::of(m)) == id)
            .and_then(|m| m.created().ok());
        SocketFile { path, id, born }
    }

    /// Removes the file if it is still this socket's file: a socket with
    /// the recorded device, inode and birth time (or, when none was
    /// recorded, any socket, as before this check existed). The check and
    /// the unlink go through one fd of the directory, so that a directory
    /// swapped between them (for a symlink elsewhere) cannot redirect the
    /// unlink. Logged, never fatal.
    pub(crate) fn remove(&self) {
        use nix::fcntl::{OFlag, open};
        use nix::sys::stat::Mode;
        let (Some(name), dir) = (self.path.file_name(), directory_of(&self.path)) else {
            return;
        };
        let Ok(dirfd) = open(
            &dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        // The file as seen through that very directory.
        let through = Path::new("/proc/self/fd")
            .join(dirfd.as_raw_fd().to_string())
            .join(name);
        let meta = match std::fs::symlink_metadata(&through) {
            Ok(m) => m,
            // No /proc: by path (the directory could change in between).
            Err(_) => match std::fs::symlink_metadata(&self.path) {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        if !meta.file_type().is_socket() {
            return;
        }
        let same_inode = self.id.is_none_or(|id| FileId::of(&meta) == id);
        let same_birth = match (self.born, meta.created()) {
            (Some(a), Ok(b)) => a == b,
            _ => true,
        };
        if !same_inode || !same_birth {
            tracing::info!(path = %self.path.display(), "not removing the Unix socket file: it is not the one this service bound (replaced since)");
            return;
        }
        match nix::unistd::unlinkat(&dirfd, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed Unix socket file"),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove Unix socket file")
            }
        }
    }
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The inode of the file the Unix socket `fd` is bound to, as the kernel
/// knows it (Linux `sock_diag`, `UNIX_DIAG_VFS`): exact, whatever happened
/// to the path since. Only its low 32 bits (the kernel reports no more),
/// and no device: the one it reports is the super block's, which is not
/// `stat`'s `st_dev` on every file system (btrfs subvolumes). `None` when
/// the socket has no file (abstract, unbound) or the kernel cannot say (no
/// `unix_diag` support).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn bound_inode(fd: BorrowedFd<'_>) -> Option<u32> {
    diag::bound_inode(fd).ok().flatten()
}

/// No `sock_diag` here.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn bound_inode(_fd: BorrowedFd<'_>) -> Option<u32> {
    None
}

/// Whether `st_ino` is the inode `sock_diag` reported (its low 32 bits).
fn is_inode(st_ino: u64, reported: u32) -> bool {
    u32::try_from(st_ino & u64::from(u32::MAX)).is_ok_and(|low| low == reported)
}

/// The identity (as `stat` reports it) of the file a socket was just bound
/// to at `path`: the file at `path`, if the kernel says the socket is bound
/// to that inode, or, where it cannot say, if it looks like a fresh socket
/// file of ours (a socket, owned by this user, one link).
pub(crate) fn identify(path: &Path, fd: BorrowedFd<'_>) -> Option<FileId> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_socket() {
        return None;
    }
    let ours = match bound_inode(fd) {
        Some(reported) => is_inode(meta.ino(), reported),
        None => looks_fresh(&meta),
    };
    ours.then(|| FileId::of(&meta))
}

fn looks_fresh(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_socket()
        && meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.nlink() == 1
}

/// Gives the socket file at `path`, just bound by `fd` and identified as
/// `id`, exactly the permissions `mode`, without operating on a path that
/// another user could redirect.
pub(crate) fn set_mode(
    path: &Path,
    fd: BorrowedFd<'_>,
    id: Option<FileId>,
    mode: u32,
) -> io::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, fstat};
    let refuse = |why: &str| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: not setting the mode of the socket file: {why}",
                path.display()
            ),
        )
    };
    // An fd on whatever is at `path` now; a symlink is opened as itself.
    let file = open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = fstat(file.as_fd())?;
    let is_socket = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFSOCK;
    if !is_socket {
        return Err(refuse("the path no longer names a socket (replaced)"));
    }
    let found = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    let replaced = || refuse("the path names another socket than the one just bound (replaced)");
    if id.is_some_and(|expected| expected != found) {
        return Err(replaced());
    }
    match bound_inode(fd) {
        Some(reported) if !is_inode(found.ino, reported) => return Err(replaced()),
        Some(_) => {}
        None if id.is_none() => {
            let meta = std::fs::symlink_metadata(path)?;
            if FileId::of(&meta) != found || !looks_fresh(&meta) {
                return Err(refuse("cannot prove it is the socket just bound"));
            }
        }
        None => {}
    }
    if st.st_mode & 0o7777 == mode {
        return Ok(());
    }
    chmod_fd(file.as_fd(), mode)
}

/// `chmod` of the inode an `O_PATH` fd refers to: through
/// `/proc/self/fd/N`, which names exactly that inode (`fchmod` refuses
/// `O_PATH` fds).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        std::fs::Permissions::from_mode(mode),
    )
}

/// Elsewhere: by path, after the checks above (a short window remains).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn chmod_fd(_fd: BorrowedFd<'_>, _mode: u32) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// A Unix socket file left behind by a process that crashed is removed, so
/// that binding works again. Returns `Ok(true)` when it was removed,
/// `Ok(false)` when somebody listens on it, a socket is bound to it (one
/// bound a moment ago refuses connections until it listens), or it
/// changed meanwhile; an error when the path is not a socket.
///
/// Race-free against a second instance starting at the same moment: the
/// file is moved into a private directory first, and deleted only if what
/// was moved is the very file that was probed; anything else is moved
/// back, untouched.
pub(crate) fn remove_stale(path: &Path, network: Network) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        // Gone meanwhile: binding again may work.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
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
    let probed = FileId::of(&meta);
    if alive(path, network)? || bound(probed) {
        return Ok(false);
    }
    // Inode numbers are reused at once (a file removed and a socket bound
    // again often get the same one): the birth time tells them apart.
    let born = meta.created().ok();
    let is_probed = |m: &std::fs::Metadata| FileId::of(m) == probed && m.created().ok() == born;
    let Some(dir) = private_dir(path) else {
        // No private directory here: compare, then unlink (a window of two
        // system calls remains).
        return match std::fs::symlink_metadata(path) {
            Ok(now) if is_probed(&now) => {
                std::fs::remove_file(path)?;
                log_removed(path);
                Ok(true)
            }
            _ => Ok(false),
        };
    };
    let moved = dir.path.join("stale");
    let result = match std::fs::rename(path, &moved) {
        Ok(()) => match std::fs::symlink_metadata(&moved) {
            Ok(m) if is_probed(&m) => {
                std::fs::remove_file(&moved)?;
                log_removed(path);
                Ok(true)
            }
            _ => {
                // Another process put its file there after the probe: give
                // it back.
                if let Err(e) = rename_noreplace(&moved, path) {
                    tracing::error!(path = %path.display(), kept = %moved.display(), error = %e, "cannot move another process's socket file back");
                    std::mem::forget(dir);
                    return Ok(false);
                }
                Ok(false)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    };
    drop(dir);
    result
}

fn log_removed(path: &Path) {
    tracing::info!(path = %path.display(), "removed a stale Unix socket file left by an earlier run");
}

/// Whether a live socket is bound to the file `file`, as far as the
/// kernel can tell (Linux `sock_diag`, by inode: a match of the low 32
/// bits counts, erring towards "bound, keep it"; elsewhere, or without it,
/// `false`: the connection probe decides alone).
fn bound(file: FileId) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        diag::any_bound_to(file).unwrap_or(false)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = file;
        false
    }
}

/// Whether somebody listens on the socket file at `path`.
fn alive(path: &Path, network: Network) -> io::Result<bool> {
    let probe = Socket::new(Domain::UNIX, network.socket_type(), None)?;
    // Non-blocking: a blocking connect to a live listener whose accept
    // queue is full (a wedged or stopped process) would wait for room,
    // possibly forever. `EAGAIN` then means, like success, "alive".
    probe.set_nonblocking(true)?;
    Ok(!matches!(
        probe.connect(&SockAddr::unix(path)?),
        Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED)
    ))
}

/// A directory only this user can enter, next to `path` (same file
/// system, so a rename between them is atomic); removed on drop.
struct PrivateDir {
    path: PathBuf,
}

fn private_dir(next_to: &Path) -> Option<PrivateDir> {
    let parent = match next_to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // mkdtemp creates it with mode 0700 and an unpredictable name.
    nix::unistd::mkdtemp(&parent.join(".tableflip-XXXXXX"))
        .ok()
        .map(|path| PrivateDir { path })
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// `rename` that fails if `to` exists (Linux `renameat2`), or a plain
/// `link` + `unlink` elsewhere, which also never replaces.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)
            .map_err(io::Error::from)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        std::fs::hard_link(from, to)?;
        std::fs::remove_file(from)
    }
}

/// `sock_diag(7)` for Unix sockets: which file a socket is bound to.
#[cfg(any(target_os = "linux", target_os = "android"))]
mod diag {
    use std::io::{self, Read, Write};
    use std::os::fd::BorrowedFd;

    use socket2::{Domain, Protocol, Socket, Type};

    use super::FileId;

    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const UDIAG_SHOW_VFS: u32 = 0x2;
    const UNIX_DIAG_VFS: u16 = 1;

    /// `Ok(None)`: the kernel answered, and the socket has no file.
    pub(super) fn bound_inode(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
        let ino = nix::sys::stat::fstat(fd)?.st_ino;
        let ino = u32::try_from(ino).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let nl = request(NLM_F_REQUEST, ino)?;
        let mut buf = [0u8; 1024];
        let n = (&nl).read(&mut buf)?;
        let msg = buf
            .get(..n)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
        match parse(msg)? {
            Reply::Socket { ino: got, file } if got == ino => Ok(file),
            _ => Err(io::Error::from(io::ErrorKind::InvalidData)),
        }
    }

    /// Whether any Unix socket (of this network namespace) is bound to the
    /// file `file`: a socket file without one is stale, whatever a
    /// connection attempt says (a socket bound a moment ago, not yet
    /// listening, refuses connections too).
    pub(super) fn any_bound_to(file: FileId) -> io::Result<bool> {
        let wanted = u32::try_from(file.ino & u64::from(u32::MAX))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        const NLM_F_DUMP: u16 = 0x300;
        let nl = request(NLM_F_REQUEST | NLM_F_DUMP, 0)?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = (&nl).read(&mut buf)?;
            let mut rest = buf
                .get(..n)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
            if rest.is_empty() {
                return Ok(false);
            }
            while rest.len() >= 16 {
                let len = u32_at(rest, 0)
                    .and_then(|l| usize::try_from(l).ok())
                    .filter(|l| *l >= 16 && *l <= rest.len())
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
                match parse(&rest[..len])? {
                    Reply::Done => return Ok(false),
                    Reply::Socket { file: Some(f), .. } if f == wanted => return Ok(true),
                    Reply::Socket { .. } => {}
                }
                rest = &rest[((len + 3) & !3).min(rest.len())..];
            }
        }
    }

    /// Sends a `SOCK_DIAG_BY_FAMILY` request for Unix sockets (`ino` 0
    /// with `NLM_F_DUMP`: all of them), asking for their files.
    fn request(flags: u16, ino: u32) -> io::Result<Socket> {
        let nl = Socket::new(
            Domain::from(nix::libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(NETLINK_SOCK_DIAG)),
        )?;
        nl.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        // struct nlmsghdr, then struct unix_diag_req (linux/unix_diag.h).
        let mut req = Vec::with_capacity(40);
        req.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
        req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
        req.extend_from_slice(&flags.to_ne_bytes()); // nlmsg_flags
        req.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
        req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        req.push(u8::try_from(nix::libc::AF_UNIX).unwrap_or(1)); // sdiag_family
        req.push(0); // sdiag_protocol
        req.extend_from_slice(&0u16.to_ne_bytes()); // pad
        req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
        req.extend_from_slice(&ino.to_ne_bytes()); // udiag_ino
        req.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes()); // udiag_show
        req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_cookie: any
        req.extend_from_slice(&u32::MAX.to_ne_bytes());
        (&nl).write_all(&req)?;
        Ok(nl)
    }

    enum Reply {
        /// A socket (its sockfs inode) and the inode of its file.
        Socket {
            ino: u32,
            file: Option<u32>,
        },
        Done,
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// One netlink message: a socket and its file, or the end of a dump.
    fn parse(msg: &[u8]) -> io::Result<Reply> {
        const NLMSG_DONE: u16 = 3;
        let bad = || io::Error::from(io::ErrorKind::InvalidData);
        let len = usize::try_from(u32_at(msg, 0).ok_or_else(bad)?).map_err(|_| bad())?;
        let kind = u16_at(msg, 4).ok_or_else(bad)?;
        let msg = msg.get(..len).ok_or_else(bad)?;
        match kind {
            NLMSG_DONE => return Ok(Reply::Done),
            NLMSG_ERROR => return Err(io::Error::from(io::ErrorKind::Unsupported)),
            SOCK_DIAG_BY_FAMILY => {}
            _ => return Err(bad()),
        }
        // struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
        let ino = u32_at(msg, 16 + 4).ok_or_else(bad)?;
        let mut at = 16 + 16;
        while let (Some(alen), Some(atype)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
            let alen = usize::from(alen);
            if alen < 4 {
                break;
            }
            if atype == UNIX_DIAG_VFS {
                // struct unix_diag_vfs: udiag_vfs_ino (the inode, cut to
                // 32 bits), udiag_vfs_dev (the super block's device, not
                // comparable with `st_dev` everywhere: unused).
                let vino = u32_at(msg, at + 4).ok_or_else(bad)?;
                return Ok(Reply::Socket {
                    ino,
                    file: Some(vino),
                });
            }
            at += (alen + 3) & !3;
        }
        Ok(Reply::Socket { ino, file: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tf-ux-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(std::fs::create_dir_all(&dir).is_ok());
        dir
    }

    #[test]
    fn the_kernel_names_the_bound_file() {
        let dir = scratch("diag");
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).ok();
        let Some(listener) = listener else {
            panic!("cannot bind {}", path.display());
        };
        let expected = FileId::of_path(&path).ok();
        assert_eq!(identify(&path, listener.as_fd()), expected);
        // Moved away and replaced by another file: the kernel still names
        // the original.
        if let Some(kernel) = bound_inode(listener.as_fd()) {
            assert!(expected.is_some_and(|e| is_inode(e.ino, kernel)));
            assert!(std::fs::rename(&path, dir.join("moved")).is_ok());
            assert!(std::fs::write(&path, "x").is_ok());
            assert_eq!(bound_inode(listener.as_fd()), Some(kernel));
            assert_eq!(identify(&path, listener.as_fd()), None);
            let refused = set_mode(&path, listener.as_fd(), None, 0o666);
            assert!(refused.is_err(), "a replaced path is refused");
            let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
            assert_ne!(mode.ok(), Some(0o666));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_kernel_tells_a_bound_file_from_a_stale_one() {
        let dir = scratch("bound");
        let path = dir.join("s.sock");
        let socket = Socket::new(Domain::UNIX, socket2::Type::STREAM, None);
        let Ok(socket) = socket else {
            panic!("socket");
        };
        assert!(
            socket
                .bind(&SockAddr::unix(&path).unwrap_or_else(|_| unreachable!()))
                .is_ok()
        );
        let id = FileId::of_path(&path).ok();
        let Some(id) = id else {
            panic!("stat");
        };
        if bound_inode(socket.as_fd()).is_some() {
            // Bound, not listening: refuses connections, yet not stale.
            assert!(diag::any_bound_to(id).unwrap_or(false));
            drop(socket);
            assert!(!diag::any_bound_to(id).unwrap_or(true));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_the_recorded_file_is_removed() {
        let dir = scratch("remove");
        let path = dir.join("s.sock");
        let first = std::os::unix::net::UnixListener::bind(&path).ok();
        let file = first
            .as_ref()
            .map(|l| SocketFile::bound(path.clone(), &path, l.as_fd()));
        let Some(file) = file else {
            panic!("cannot bind {}", path.display());
        };
        drop(first);
        assert!(std::fs::remove_file(&path).is_ok());
        let second = std::os::unix::net::UnixListener::bind(&path).ok();
        file.remove();
        assert!(path.exists(), "another socket at the same path is kept");
        let own = second
            .as_ref()
            .map(|l| SocketFile::bound(path.clone(), &path, l.as_fd()));
        let Some(own) = own else {
            panic!("cannot bind {} again", path.display());
        };
        own.remove();
        assert!(!path.exists(), "its own file is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
