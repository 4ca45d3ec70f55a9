//! The only module with `unsafe` code: taking ownership of inherited fds,
//! editing the process environment, the code that runs between `fork`
//! and `exec`, and `posix_spawn` with pidfds. Everything else in the crate
//! goes through the safe wrappers here (or through `nix`/`socket2`).
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};

use crate::protocol;

/// A system call's result: `-1` (or any negative value) means failure,
/// with the reason in `errno` (the C convention, [errno(3)]; std's private
/// `cvt`).
///
/// [errno(3)]: https://man7.org/linux/man-pages/man3/errno.3.html
trait MinusOne: Copy + PartialOrd + Default {}
impl MinusOne for libc::c_int {}
impl MinusOne for libc::c_long {}

fn cvt<T: MinusOne>(rc: T) -> io::Result<T> {
    if rc < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The fd numbers this process has claimed among those it received across
/// `exec` (named by a handover or by `LISTEN_FDS`), and the lock that
/// serialises inspecting and claiming them.
static CLAIMED: std::sync::Mutex<std::collections::BTreeSet<RawFd>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Why a received fd number cannot be inspected or claimed.
#[derive(Debug)]
pub(crate) enum NotReceived {
    /// Not open (or not a valid number).
    Closed(io::Error),
    /// Close-on-exec: it did not come across `exec` (every fd that did has
    /// the flag clear), so this process opened it, and it is not ours to
    /// take.
    CloseOnExec,
    /// Claimed already, in this process.
    Claimed,
}

impl std::fmt::Display for NotReceived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReceived::Closed(e) => write!(f, "is not open ({e})"),
            NotReceived::CloseOnExec => f.write_str(
                "was not inherited: it is close-on-exec, so this process opened it itself",
            ),
            NotReceived::Claimed => f.write_str("was claimed already"),
        }
    }
}

/// Checks, under the [`CLAIMED`] lock, that `fd` can be a received fd:
/// a valid number, open, not close-on-exec, not claimed before. Returns
/// its fd flags.
fn check_received(
    fd: RawFd,
    claimed: &std::collections::BTreeSet<RawFd>,
) -> Result<libc::c_int, NotReceived> {
    if fd < 0 {
        return Err(NotReceived::Closed(io::Error::from_raw_os_error(
            libc::EBADF,
        )));
    }
    if claimed.contains(&fd) {
        return Err(NotReceived::Claimed);
    }
    // SAFETY: `fcntl(F_GETFD)` only reads the fd table; on a closed or
    // invalid number it fails with EBADF and touches nothing.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }).map_err(NotReceived::Closed)?;
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(NotReceived::CloseOnExec);
    }
    Ok(flags)
}

fn claimed() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<RawFd>> {
    CLAIMED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` on `fd`, an fd number this process received across `exec`
/// (see [`claim_received`]), borrowed for the call only, so that it can be
/// inspected before anything takes ownership of it.
///
/// # Errors
///
/// [`NotReceived`] when the number cannot be a received fd.
pub(crate) fn inspect_received<R>(
    fd: RawFd,
    f: impl FnOnce(BorrowedFd<'_>) -> R,
) -> Result<R, NotReceived> {
    let claimed = claimed();
    check_received(fd, &claimed)?;
    // SAFETY: `fd` is open (checked above) and unclaimed, and stays so
    // while the borrow lives: the borrow cannot leave `f`, and the lock
    // held meanwhile keeps this crate from claiming (and so from closing)
    // any received fd. The number is not close-on-exec, so it was not
    // opened by std, tokio or this crate, whose fds all are: it is one of
    // the fds the parent (or systemd) passed across `exec`, which nobody
    // in this process owns until claimed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(f(borrowed))
}

/// Takes ownership of `fd`, an fd number named by the handover or by
/// `LISTEN_FDS`: once per number and process, only if it is open and not
/// close-on-exec (as every fd that came across `exec` is, and no fd this
/// process opened through std, tokio or this crate is). The fd is made
/// close-on-exec, so that no subprocess inherits it.
///
/// # Errors
///
/// [`NotReceived`] when the number cannot be a received fd, or was
/// claimed already; `Closed` also when close-on-exec cannot be set.
pub(crate) fn claim_received(fd: RawFd) -> Result<OwnedFd, NotReceived> {
    let mut claimed = claimed();
    let flags = check_received(fd, &claimed)?;
    claim_checked(fd, flags, &mut claimed)
}

/// Takes ownership of `fd`, checked by [`check_received`] (which read
/// `flags`) under the same hold of the lock `claimed` guards, and makes
/// it close-on-exec.
fn claim_checked(
    fd: RawFd,
    flags: libc::c_int,
    claimed: &mut std::collections::BTreeSet<RawFd>,
) -> Result<OwnedFd, NotReceived> {
    claimed.insert(fd);
    // SAFETY: the fd is open, was passed across `exec` (not close-on-exec:
    // nothing in this process opened it through std, tokio or this crate),
    // and has not been claimed before (checked by the caller under the
    // lock it still holds): no other `OwnedFd` of this crate owns it, so
    // this one is the only owner and its drop the only close.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // The flags were read under the same lock hold, and nothing but this
    // crate changes a received fd's flags: set close-on-exec without
    // reading them again.
    fcntl(
        owned.as_fd(),
        FcntlArg::F_SETFD(FdFlag::from_bits_retain(flags) | FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| NotReceived::Closed(e.into()))?;
    Ok(owned)
}

/// The fds received across `exec`, locked for inspecting and then claiming
/// many at once (a handover of thousands of listeners): each fd is checked
/// once, when inspected, and claimed under the same hold of the lock
/// without being checked again. As [`inspect_received`] and
/// [`claim_received`], one fd at a time.
pub(crate) struct ReceivedFds {
    claimed: std::sync::MutexGuard<'static, std::collections::BTreeSet<RawFd>>,
    /// The fds inspected under this hold of the lock, with their fd flags.
    inspected: std::collections::HashMap<RawFd, libc::c_int>,
}

impl std::fmt::Debug for ReceivedFds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedFds")
            .field("inspected", &self.inspected.len())
            .finish_non_exhaustive()
    }
}

impl ReceivedFds {
    /// Locks the received fds (the lock [`inspect_received`] and
    /// [`claim_received`] take: do not call them while this lives).
    pub(crate) fn lock() -> ReceivedFds {
        ReceivedFds {
            claimed: claimed(),
            inspected: std::collections::HashMap::new(),
        }
    }

    /// As [`inspect_received`].
    pub(crate) fn inspect<R>(
        &mut self,
        fd: RawFd,
        f: impl FnOnce(BorrowedFd<'_>) -> R,
    ) -> Result<R, NotReceived> {
        let flags = check_received(fd, &self.claimed)?;
        self.inspected.insert(fd, flags);
        // SAFETY: as in `inspect_received`: `fd` is open and unclaimed
        // (checked above), and stays so while the borrow lives, which
        // cannot leave `f`; the lock is held meanwhile (by `self`).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        Ok(f(borrowed))
    }

    /// As [`claim_received`]; an fd [`inspect`](Self::inspect)ed under
    /// this hold of the lock is not checked again.
    pub(crate) fn claim(&mut self, fd: RawFd) -> Result<OwnedFd, NotReceived> {
        let flags = match self.inspected.remove(&fd) {
            Some(flags) if !self.claimed.contains(&fd) => flags,
            _ => check_received(fd, &self.claimed)?,
        };
        claim_checked(fd, flags, &mut self.claimed)
    }
}

/// The path `execve` was called with to start this program (the
/// auxiliary vector's `AT_EXECFN`, [getauxval(3)]): the path that named
/// the executable, symlinks and all, whatever `argv[0]` says. `None`
/// where unknown.
///
/// [getauxval(3)]: https://man7.org/linux/man-pages/man3/getauxval.3.html
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn exec_fn() -> Option<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: `getauxval` only reads the auxiliary vector the kernel
    // passed; it returns 0 for an entry that is absent.
    let addr = unsafe { libc::getauxval(libc::AT_EXECFN) };
    if addr == 0 {
        return None;
    }
    // SAFETY: a non-zero `AT_EXECFN` is the address of the NUL-terminated
    // file name the kernel copied onto the initial stack at `execve`
    // (fs/exec.c); that memory stays mapped and is never freed for the
    // life of the process. The bytes are copied out at once.
    let name = unsafe { std::ffi::CStr::from_ptr(addr as *const libc::c_char) };
    Some(OsStr::from_bytes(name.to_bytes()).to_owned())
}

/// `AT_EXECFN` exists on Linux only.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn exec_fn() -> Option<std::ffi::OsString> {
    None
}

/// The lowest number of an fd that is handed to the next generation: the
/// child rejects the standard streams (0 to 2), where `pipe`, `dup` and
/// `socket` put new fds if the application closed them (a daemon closing
/// its stdin).
const FIRST_HANDED_ON: libc::c_int = 3;

/// A duplicate of `fd`, close-on-exec, numbered 3 or more (see
/// [`FIRST_HANDED_ON`]).
pub(crate) fn dup_handed_on(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(
        fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(FIRST_HANDED_ON)).map(|new| {
            // SAFETY: the kernel just created `new` for this call; nothing
            // else in the process knows the number.
            unsafe { OwnedFd::from_raw_fd(new) }
        })?,
    )
}

/// Grows this process's fd table to hold at least `count` fds, by placing
/// a duplicate of a pipe made for the purpose at number `count - 1` or above (`F_DUPFD_CLOEXEC`, [fcntl(2)])
/// and closing it: the kernel never shrinks the table. Best effort:
/// nothing happens past the soft `RLIMIT_NOFILE` (`EINVAL`) or without
/// memory. Why: growing the table of a process with several threads
/// waits for an RCU grace period (`expand_fdtable` in the kernel's
/// fs/file.c calls `synchronize_rcu` when the table is shared): measured
/// on a 2-core VM, a generation taking over 1000 connections in a burst
/// stalled for 8–24 ms two or three times (each doubling of its table
/// past 256), and the first upgrade of a service with 1000 listeners
/// (copying each) by as much. Done while the process has one thread, it
/// costs no wait: 6–9 µs for 16 384 fds here.
///
/// [fcntl(2)]: https://man7.org/linux/man-pages/man2/fcntl.2.html
pub(crate) fn reserve_fd_table(count: usize) {
    let Ok(at) = libc::c_int::try_from(count.saturating_sub(1)) else {
        return;
    };
    // A pipe of its own (not a standard stream: closing a copy of an fd
    // would release the process's POSIX record locks on that file).
    let Ok((r, _w)) = pipe_cloexec() else {
        return;
    };
    if let Ok(new) = fcntl(r.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(at)) {
        // SAFETY: the kernel just created `new` for this call; nothing
        // else in the process knows the number. Dropping it closes it.
        drop(unsafe { OwnedFd::from_raw_fd(new) });
    }
}

/// `fd` itself if it is numbered 3 or more; else a duplicate that is (and
/// `fd` is closed).
pub(crate) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    if fd.as_raw_fd() >= FIRST_HANDED_ON {
        return Ok(fd);
    }
    dup_handed_on(fd.as_fd())
}

/// The local address of the socket the fd number `fd` refers to, now
/// ([getsockname(2)], which only reads: the number need not be the
/// caller's). `None` when the number is not open or not a socket
/// (`ENOTSOCK`).
///
/// [getsockname(2)]: https://man7.org/linux/man-pages/man2/getsockname.2.html
pub(crate) fn local_addr_of_number(fd: RawFd) -> Option<socket2::SockAddr> {
    // SAFETY: `try_init` hands the closure a zeroed `sockaddr_storage` and
    // its size; `getsockname` writes at most that many bytes into it and
    // sets the length it wrote, or fails (a closed number, a file) and
    // writes nothing: what `try_init` requires of the closure.
    let got = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            cvt(libc::getsockname(fd, storage.cast(), len)).map(drop)
        })
    };
    got.ok().map(|((), addr)| addr)
}

/// The socket cookie of the socket the fd number `fd` refers to, now
/// (`getsockopt(SO_COOKIE)`, Linux 4.12 and later, socket(7)): a 64-bit
/// number the kernel gives each socket, unique among all the sockets
/// created since boot and never reused. It reads only: the number need
/// not be the caller's. `Err(ENOTSOCK)` when the number is a file,
/// `Err(EBADF)` when it is not open, `Err(ENOPROTOOPT)` on a kernel
/// without socket cookies.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn socket_cookie_of_number(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: `getsockopt` writes at most `len` bytes (the size of
    // `cookie`) into `cookie` and the size it wrote into `len`, both valid
    // for writes; on a closed number or a file it fails and writes nothing.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    })?;
    if usize::try_from(len).ok() != Some(std::mem::size_of::<u64>()) {
        return Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT));
    }
    Ok(cookie)
}

/// No socket cookies outside Linux: the callers identify sockets by inode
/// and address instead.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn socket_cookie_of_number(_fd: RawFd) -> io::Result<u64> {
    Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT))
}

/// Exchanges the files named `a` and `b` atomically (`renameat2` with
/// `RENAME_EXCHANGE`, rename(2), Linux 3.15 and glibc 2.28): both must
/// exist. Fails (`EINVAL`, `ENOSYS`) where the filesystem or the kernel
/// cannot.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn rename_exchange(a: &std::path::Path, b: &std::path::Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE).map_err(io::Error::from)
}

/// `rename_exchange` where it is not available: always fails.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn rename_exchange(_a: &std::path::Path, _b: &std::path::Path) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Whether the fd number `fd` refers, now, to a socket, and its inode if
/// so ([fstat(2)], which only reads: the number need not be the caller's).
///
/// [fstat(2)]: https://man7.org/linux/man-pages/man2/fstat.2.html
pub(crate) fn socket_inode_of_number(fd: RawFd) -> Option<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fstat` writes a `struct stat` into the buffer it is given
    // (valid for writes of that size) and reads only the fd table; on a
    // closed or invalid number it fails and writes nothing.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: `fstat` succeeded, so it initialised the whole buffer.
    let st = unsafe { st.assume_init() };
    // `ino_t` is 64 bits here, narrower on some platforms.
    #[allow(clippy::useless_conversion)]
    let ino = u64::from(st.st_ino);
    (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(ino)
}

/// Duplicates whatever the fd number `fd` refers to now into a new,
/// close-on-exec fd of the caller's (`F_DUPFD_CLOEXEC`, [fcntl(2)]).
///
/// [fcntl(2)]: https://man7.org/linux/man-pages/man2/fcntl.2.html
/// Used on numbers the application
/// owns: the duplicate is the caller's to check (it cannot change once
/// made), and the original is not touched.
pub(crate) fn dup_number(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` reads the fd table and creates a new
    // fd; on a closed or invalid number it fails with EBADF and creates
    // nothing. It never affects the fd it duplicates.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FIRST_HANDED_ON) })?;
    // SAFETY: the kernel just created `new` for this call; nothing else in
    // the process knows the number.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// [write(2)] that never raises `SIGPIPE`, whatever the application did
/// with the signal's disposition: a reader that is gone gives `EPIPE`,
/// nothing more. (A write to a pipe without readers sends `SIGPIPE` to
/// the writing thread; it is blocked for the call, and the one this write
/// raised is taken back before the mask is restored.)
///
/// [write(2)]: https://man7.org/linux/man-pages/man2/write.2.html
pub(crate) fn write_no_sigpipe(fd: BorrowedFd<'_>, buf: &[u8]) -> nix::Result<usize> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let old = pipe.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    let already_pending = pending_sigpipe();
    let result = nix::unistd::write(fd, buf);
    if result == Err(nix::errno::Errno::EPIPE) && !already_pending {
        take_pending_sigpipe();
    }
    // Restores exactly the mask there was.
    let _ = old.thread_set_mask();
    result
}

/// Whether a `SIGPIPE` is pending for this thread or the process.
fn pending_sigpipe() -> bool {
    // SAFETY: `sigpending` fills the set it is given; the set is a plain
    // value initialised by `sigemptyset` first.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigpending(&mut set) == 0 && libc::sigismember(&set, libc::SIGPIPE) == 1
    }
}

/// Takes the pending `SIGPIPE` (blocked in this thread) that a write
/// just raised.
fn take_pending_sigpipe() {
    use nix::sys::signal::{SigSet, Signal};
    if !pending_sigpipe() {
        return;
    }
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    // Returns at once: the signal is pending.
    let _ = pipe.wait();
}

/// A pipe whose two ends are close-on-exec: `(read end, write end)`.
///
/// Both numbered 3 or more: they are handed to the next generation.
#[cfg(not(any(target_os = "macos", target_os = "ios")))]
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// A pipe whose two ends are close-on-exec: `(read end, write end)`.
///
/// Apple platforms have no `pipe2`: the flag is set right after `pipe`. A
/// process spawned by another thread in that instant could inherit the
/// ends; only a concurrent `fork` without `exec` is affected, since `exec`
/// is what the flag is about.
#[cfg(any(target_os = "macos", target_os = "ios"))]
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe()?;
    set_cloexec(r.as_fd())?;
    set_cloexec(w.as_fd())?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// Writes as much of `data` into the empty pipe `fd` as it can hold
/// without blocking, after growing the pipe to fit `data` where the
/// platform allows (Linux: up to `/proc/sys/fs/pipe-max-size`, 1 MiB by
/// default). Returns how many bytes were written; `fd` is left blocking.
pub(crate) fn prefill_pipe(fd: BorrowedFd<'_>, data: &[u8]) -> usize {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Ok(size) = nix::libc::c_int::try_from(data.len()) {
        // Best effort: a smaller pipe only means more for the writer thread.
        let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(size));
    }
    let Ok(flags) = fcntl(fd, FcntlArg::F_GETFL).map(OFlag::from_bits_retain) else {
        return 0;
    };
    if fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).is_err() {
        return 0;
    }
    let mut written = 0;
    while written < data.len() {
        // The read end is still open here (the child does not exist yet):
        // no SIGPIPE possible.
        match nix::unistd::write(fd, &data[written..]) {
            Ok(n) => written += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    // Blocking again for the writer thread (which also copes with a
    // non-blocking pipe, should this fail).
    let _ = fcntl(fd, FcntlArg::F_SETFL(flags));
    written
}

/// Marks `fd` close-on-exec.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD)?);
    if !flags.contains(FdFlag::FD_CLOEXEC) {
        fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
    }
    Ok(())
}

/// Puts the open file description behind `fd` into non-blocking mode.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Whether this process runs exactly one thread, the calling one (Linux:
/// the `Threads:` line of `/proc/self/status`). `false` wherever that
/// cannot be proven.
pub(crate) fn single_threaded() -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .is_some_and(|n| n.trim() == "1")
        })
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        false
    }
}

/// A process started from an image rather than a release path (the
/// supervisor re-executed through `/proc/<pid>/exe`, a rollback through
/// `/proc/self/exe` or `/proc/self/fd/<n>`) is named by the kernel after
/// that path's last component (`exe`, `7`): `ps`, `top` and `systemctl
/// status` would show that. It takes the name of its `argv[0]` instead
/// (the first 15 bytes, the kernel's limit). Linux only; best effort.
pub(crate) fn name_after_argv0_if_started_from_proc() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let from_proc = exec_fn().is_some_and(|p| p.as_bytes().starts_with(b"/proc/"));
        if !from_proc {
            return;
        }
        let Some(argv0) = std::env::args_os().next() else {
            return;
        };
        let base = std::path::Path::new(&argv0)
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let short: Vec<u8> = base.into_iter().take(15).filter(|b| *b != 0).collect();
        if let Ok(name) = std::ffi::CString::new(short) {
            if !name.as_bytes().is_empty() {
                let _ = nix::sys::prctl::set_name(&name);
            }
        }
    }
}

/// How long this process has existed, in milliseconds (Linux: its start
/// time in `/proc/self/stat` against `/proc/uptime`, so an `exec` does
/// not reset it). `None` where that cannot be read.
pub(crate) fn process_uptime_ms() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command name, which may hold spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 1..];
        // Field 22 (starttime) is the 20th after the name.
        let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|h| u64::try_from(h).ok())
            .filter(|h| *h > 0)?;
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        let boot_s: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        let started_ms = ticks.saturating_mul(1000) / hz;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let now_ms = (boot_s * 1000.0) as u64;
        Some(now_ms.saturating_sub(started_ms))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        None
    }
}

/// Whether the open file description behind `fd` is non-blocking.
pub(crate) fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?).contains(OFlag::O_NONBLOCK))
}

/// Puts the open file description behind `fd` into blocking mode.
pub(crate) fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    if flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Removes the variables `keys` from the process environment, if this
/// process provably runs a single thread; otherwise leaves the environment
/// alone (another thread could be reading it: `getenv` in C code is not
/// synchronised with Rust's environment lock). Returns whether they were
/// removed.
///
/// Nothing depends on the removal for correctness: the next generation's
/// environment is built from a filtered copy, and a subprocess that sees
/// the handover variable ignores it (it names pipes the subprocess does
/// not hold). It only keeps the environment tidy for the application.
pub(crate) fn remove_env(keys: &[&str]) -> bool {
    if keys.iter().all(|k| std::env::var_os(k).is_none()) {
        return true;
    }
    if !single_threaded() {
        return false;
    }
    for key in keys {
        // SAFETY: `remove_var` is unsound only when another thread reads
        // or writes the environment at the same moment. This process has
        // exactly one thread (checked just above), the caller's, which is
        // busy here; only this thread could start another, and it does
        // not do so during the call.
        unsafe { std::env::remove_var(OsStr::new(key)) };
    }
    true
}

/// Arranges for `fds` to survive the `exec` of `cmd`: after `fork`, in the
/// child only, their close-on-exec flag is cleared. The parent's fd table is
/// not touched, so no other child the program spawns can inherit them.
pub(crate) fn inherit_across_exec(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    let hook = move || -> io::Result<()> {
        for &fd in &fds {
            // SAFETY (async-signal-safety): between fork and exec only
            // async-signal-safe functions may run; `fcntl` is one, and the
            // loop neither allocates nor takes locks (`fds` was built before
            // the fork).
            let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
            // SAFETY: as above; clearing FD_CLOEXEC changes the child's fd
            // table only.
            cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) })?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only calls
    // async-signal-safe functions (see above); it captures nothing that
    // needs a lock or the allocator.
    unsafe { cmd.pre_exec(hook) };
}

/// Whether [`spawn_inheriting`] can be used here: glibc 2.29 or later
/// (`posix_spawn_file_actions_adddup2(fd, fd)` clears close-on-exec, and
/// `posix_spawn_file_actions_addchdir_np` exists) and a kernel with
/// `pidfd_open` (5.3). Checked once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fast_spawn() -> Option<AddChdir> {
    static FAST: std::sync::OnceLock<Option<AddChdir>> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| {
        // Escape hatch (and how the tests and the benchmark exercise the
        // fork path on a system that has everything).
        if std::env::var_os(SPAWN_WITH_FORK).is_some_and(|v| !v.is_empty()) {
            return None;
        }
        // SAFETY: `gnu_get_libc_version` returns a pointer to a static,
        // NUL-terminated string owned by glibc.
        let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        let mut parts = version
            .to_str()
            .ok()?
            .split('.')
            .map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next()??, parts.next()??);
        if (major, minor) < (2, 29) {
            return None;
        }
        // Looked up at run time rather than linked, so that binaries still
        // start on a glibc older than 2.29 (and then use fork).
        // SAFETY: `dlsym` with RTLD_DEFAULT and a NUL-terminated name only
        // searches the loaded objects; a null result means "absent".
        let sym = unsafe {
            libc::dlsym(
                libc::RTLD_DEFAULT,
                c"posix_spawn_file_actions_addchdir_np".as_ptr(),
            )
        };
        if sym.is_null() {
            return None;
        }
        // SAFETY: the symbol is glibc's `posix_spawn_file_actions_addchdir_np`,
        // whose C signature is exactly `AddChdir`.
        let addchdir = unsafe { std::mem::transmute::<*mut libc::c_void, AddChdir>(sym) };
        // A pidfd of this very process: fails with ENOSYS before Linux 5.3.
        pidfd_open(std::process::id()).ok()?;
        Some(addchdir)
    })
}

/// Set (non-empty), the next generation is started by fork and exec even
/// where `posix_spawn` could be used.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const SPAWN_WITH_FORK: &str = "TABLEFLIP_SPAWN_WITH_FORK";

#[cfg(all(target_os = "linux", target_env = "gnu"))]
type AddChdir =
    unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const libc::c_char) -> libc::c_int;

/// A pidfd for `pid` ([pidfd_open(2)], Linux 5.3): readable once the
/// process has exited.
///
/// [pidfd_open(2)]: https://man7.org/linux/man-pages/man2/pidfd_open.2.html
#[cfg(target_os = "linux")]
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: `pidfd_open(pid, 0)` takes plain integers and returns a new
    // fd (close-on-exec, as the kernel always makes pidfds) or -1.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process a pidfd refers to ([pidfd_send_signal(2)],
/// Linux 5.1): never to another process that reused its PID.
///
/// [pidfd_send_signal(2)]: https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html
#[cfg(target_os = "linux")]
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `pidfd_send_signal(pidfd, sig, NULL, 0)` takes an fd, a
    // signal number, a null `siginfo` (allowed: the kernel fills in one as
    // `kill` would) and no flags; it reads nothing through pointers.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(|_| ())
}

/// A pidfd for the child `pid`, registered with the tokio reactor:
/// readable once the process has exited. Must run inside a tokio runtime.
#[cfg(target_os = "linux")]
pub(crate) fn watch_process(pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: an `OwnedFd` owns one open fd, `as_raw_fd` always returns
    // that same fd, and it is closed only when the `AsyncFd` drops it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)
}

#[cfg(feature = "http")]
/// `fd` registered with the tokio reactor for reading and writing (it
/// must be non-blocking). Must run inside a tokio runtime.
pub(crate) fn register_async(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` owns one open fd, `as_raw_fd` always returns
    // that same fd, and it is closed only when the `AsyncFd` drops it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            fd,
            tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
        )
    }
    .map_err(io::Error::from)
}

/// No pidfds here (`spawn_inheriting` never starts a process off Linux).
#[cfg(not(target_os = "linux"))]
pub(crate) fn watch_process(_pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// What the next generation is started with.
pub(crate) struct SpawnSpec<'a> {
    pub(crate) exe: &'a std::path::Path,
    /// `argv`, `argv[0]` included.
    pub(crate) argv: &'a [std::ffi::OsString],
    pub(crate) env: &'a [(std::ffi::OsString, std::ffi::OsString)],
    pub(crate) cwd: &'a std::path::Path,
    /// Fds the child inherits at the same numbers (close-on-exec here).
    pub(crate) inherit: &'a [RawFd],
}

/// Starts the next generation with [posix_spawn(3)] (no `fork`: glibc uses
/// `clone(CLONE_VM | CLONE_VFORK)`, whose cost does not grow with this
/// process's memory, unlike `fork`'s page-table copy), and returns its PID
/// (watch it with [`watch_process`]). `None` when this system lacks what it needs
/// (see `fast_spawn`): the caller then uses `std::process::Command`.
///
/// In the child: every fd of `inherit` stays open across `exec` (a
/// `dup2(fd, fd)` file action clears its close-on-exec flag, in the child
/// only), the working directory is `cwd`, the signal mask is empty,
/// `SIGPIPE` has its default action (as `std::process::Command` does), and
/// the child leads a process group of its own (it rejoins its parent's
/// once it is ready).
///
/// [posix_spawn(3)]: https://man7.org/linux/man-pages/man3/posix_spawn.3.html
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn spawn_inheriting(spec: &SpawnSpec<'_>) -> Option<io::Result<u32>> {
    let addchdir = fast_spawn()?;
    Some(posix_spawn(spec, addchdir))
}

/// `spawn_inheriting` where it is not available.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn spawn_inheriting(_spec: &SpawnSpec<'_>) -> Option<io::Result<u32>> {
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn posix_spawn(spec: &SpawnSpec<'_>, addchdir: AddChdir) -> io::Result<u32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    let cstring = |bytes: &[u8], what: &str| {
        CString::new(bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} contains a NUL byte"),
            )
        })
    };
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    };
    let path = cstring(spec.exe.as_os_str().as_bytes(), "the executable's path")?;
    let cwd = cstring(spec.cwd.as_os_str().as_bytes(), "the working directory")?;
    let argv = spec
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv, "an environment variable")
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(std::ptr::null_mut());

    let mut actions = FileActions::new()?;
    for &fd in spec.inherit {
        // SAFETY: `actions` was initialised by `FileActions::new`; the call
        // only records the action.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut actions.0, fd, fd) })?;
    }
    // SAFETY: as above; `addchdir` is glibc's function (see `fast_spawn`),
    // and it copies the NUL-terminated path.
    check(unsafe { addchdir(&mut actions.0, cwd.as_ptr()) })?;
    let mut attr = SpawnAttr::new()?;
    // SAFETY: `sigemptyset`/`sigaddset` initialise and fill local sets;
    // the `posix_spawnattr_*` calls record them in the initialised `attr`.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let mut default: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut default);
        libc::sigaddset(&mut default, libc::SIGPIPE);
        check(libc::posix_spawnattr_setsigmask(&mut attr.0, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &default))?;
        // A process group of its own (its PID): what it starts during its
        // initialisation dies with it if the upgrade fails.
        check(libc::posix_spawnattr_setpgroup(&mut attr.0, 0))?;
        let flags = libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF
            | libc::POSIX_SPAWN_SETPGROUP;
        check(libc::posix_spawnattr_setflags(
            &mut attr.0,
            libc::c_short::try_from(flags).unwrap_or(0),
        ))?;
    }
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: `path`, the strings of
    // `argv`/`envp` and the two null-terminated pointer arrays live until
    // it returns; `actions` and `attr` are initialised. posix_spawn does not
    // keep them.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attr.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    })?;
    u32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))
}

/// `posix_spawn_file_actions_t`, destroyed on drop.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct FileActions(libc::posix_spawn_file_actions_t);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: zeroed memory is a valid argument for `_init`, which
        // initialises it; it is used only after `_init` succeeded.
        let mut actions = FileActions(unsafe { std::mem::zeroed() });
        // SAFETY: see above.
        match unsafe { libc::posix_spawn_file_actions_init(&mut actions.0) } {
            0 => Ok(actions),
            rc => {
                // Not initialised: must not be destroyed.
                std::mem::forget(actions);
                Err(io::Error::from_raw_os_error(rc))
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised by `new` (an uninitialised one is forgotten).
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// `posix_spawnattr_t`, destroyed on drop.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct SpawnAttr(libc::posix_spawnattr_t);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl SpawnAttr {
    fn new() -> io::Result<SpawnAttr> {
        // SAFETY: zeroed memory is a valid argument for `_init`, which
        // initialises it; it is used only after `_init` succeeded.
        let mut attr = SpawnAttr(unsafe { std::mem::zeroed() });
        // SAFETY: see above.
        match unsafe { libc::posix_spawnattr_init(&mut attr.0) } {
            0 => Ok(attr),
            rc => {
                std::mem::forget(attr);
                Err(io::Error::from_raw_os_error(rc))
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised by `new` (an uninitialised one is forgotten).
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// The ELF note by which an executable says which handover protocol
/// versions it receives: owner [`protocol::NOTE_NAME`], type
/// [`protocol::NOTE_TYPE_VERSION`], and as its description the newest
/// version, a 32-bit little-endian number (`PROTOCOL.md`, "Which version
/// the parent uses"). The `.note` prefix makes its section `SHT_NOTE`,
/// which linkers place in a `PT_NOTE` segment (read from the program
/// headers, which `strip` keeps).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[repr(C, align(4))]
#[derive(Debug)]
pub(crate) struct VersionNote {
    namesz: u32,
    descsz: u32,
    note_type: u32,
    name: [u8; 12],
    desc: [u8; 4],
}

/// This build's note. [`protocol::receive`] reads it (so every executable
/// that can receive a handover carries it, whatever the linker drops).
///
/// SAFETY of `link_section`: the section holds this one read-only static
/// and nothing else of this crate; its name is this crate's own, so no
/// other item's layout or meaning depends on it.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[used]
#[unsafe(link_section = ".note.tableflip")]
pub(crate) static VERSION_NOTE: VersionNote = VersionNote {
    namesz: protocol::NOTE_NAME.len() as u32,
    descsz: 4,
    note_type: protocol::NOTE_TYPE_VERSION,
    name: *b"tableflip\0\0\0",
    desc: protocol::VERSION.to_le_bytes(),
};

/// A connected pair of Unix `SOCK_SEQPACKET` sockets, both close-on-exec
/// and numbered 3 or more: the control channel between the supervisor and
/// a generation (one message per packet, peer close seen as EOF).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((above_stdio(a)?, above_stdio(b)?))
}

/// The most fds one control packet carries (the kernel's `SCM_MAX_FD` is
/// 253).
pub(crate) const MAX_FDS_PER_PACKET: usize = 64;

/// Sends one packet, with `fds` attached (`SCM_RIGHTS`, [unix(7)]); never
/// raises `SIGPIPE` (`MSG_NOSIGNAL`). With `dont_wait`, fails with
/// `WouldBlock` instead of waiting for room.
///
/// [unix(7)]: https://man7.org/linux/man-pages/man7/unix.7.html
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn send_packet(
    socket: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    dont_wait: bool,
) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if dont_wait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let iov = [io::IoSlice::new(data)];
    loop {
        match sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsgs, flags, None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(io::Error::other("the packet was cut short")),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one packet into `buf`: its length and the fds attached (owned,
/// close-on-exec). `Ok(None)` at EOF (the peer closed its end). On a
/// non-blocking socket, or with `dont_wait` (`MSG_DONTWAIT`), with nothing
/// to read, fails with `WouldBlock`.
///
/// # Errors
///
/// Also when the packet or its fds were cut short (`MSG_TRUNC`,
/// `MSG_CTRUNC`), with `InvalidData`: the fds that did arrive are closed,
/// and the socket can be read on.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn recv_packet(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    dont_wait: bool,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    // Room for the most a packet can carry (`SCM_MAX_FD`): a version-2
    // handover sends that many.
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let (len, raw_fds, truncated) = loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        let flags = if dont_wait {
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::MSG_CMSG_CLOEXEC
        };
        match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(received) = c {
                            fds.extend(received);
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        // SAFETY: the kernel has just installed each of these fds in this
        // process's table for this message (SCM_RIGHTS), close-on-exec
        // (MSG_CMSG_CLOEXEC); nothing else knows their numbers, so each
        // `OwnedFd` is its fd's only owner.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if truncated {
        // `InvalidData`: this packet is lost (its fds closed), the
        // channel is fine.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a control packet, or the fds attached to it, was cut short (out of fds?)",
        ));
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((len, fds)))
}

/// Clears the close-on-exec flag of `fd`, so that it survives this
/// process's own `exec` (the supervisor re-executing itself).
pub(crate) fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD)?);
    fcntl(fd, FcntlArg::F_SETFD(flags - FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// A sealed, close-on-exec memory file holding `data` ([memfd_create(2)]),
/// numbered 3 or more: what the supervisor carries across its own `exec`.
/// Sealed against any change, so the reader can tell it from any other fd
/// (only a memfd has seals).
///
/// [memfd_create(2)]: https://man7.org/linux/man-pages/man2/memfd_create.2.html
/// `parts` are written one after the other (the application state's
/// header, then its bytes, without joining them in memory first).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn sealed_memfd(name: &std::ffi::CStr, parts: &[&[u8]]) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let fd = above_stdio(fd)?;
    for part in parts {
        let mut rest = *part;
        while !rest.is_empty() {
            match nix::unistd::write(&fd, rest) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => rest = &rest[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let seals = nix::fcntl::SealFlag::F_SEAL_SEAL
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_WRITE;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(fd)
}

/// Checks that `fd` is a memory file sealed against writes and against
/// shrinking ([memfd_create(2)], "File sealing"): its contents can never
/// change again, and it can never become shorter.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn check_sealed(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::SealFlag;
    let not_sealed = || io::Error::new(io::ErrorKind::InvalidData, "not a sealed memory file");
    // EINVAL: a file that cannot have seals at all (a regular file, a
    // pipe, a device).
    let seals = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => SealFlag::from_bits_retain(bits),
        Err(nix::errno::Errno::EINVAL) => return Err(not_sealed()),
        Err(e) => return Err(e.into()),
    };
    if !seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK) {
        return Err(not_sealed());
    }
    Ok(())
}

/// The whole of a sealed memory file, mapped read-only ([mmap(2)]): its
/// pages are shared with the file, not copied.
///
/// [mmap(2)]: https://man7.org/linux/man-pages/man2/mmap.2.html
#[derive(Debug)]
pub(crate) struct SealedMap {
    /// The mapping's start; `None` for an empty file (nothing is mapped).
    ptr: Option<std::ptr::NonNull<libc::c_void>>,
    len: usize,
}

// SAFETY: the mapping is read-only memory that nothing can change (see
// `map_sealed_memfd`); sharing or sending a pointer to it across threads
// is as sound as sharing a `&[u8]`.
unsafe impl Send for SealedMap {}
// SAFETY: as for `Send`.
unsafe impl Sync for SealedMap {}

impl std::ops::Deref for SealedMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self.ptr {
            // SAFETY: `ptr` is the start of a live mapping of `len`
            // readable bytes (unmapped only in `drop`), whose contents
            // never change (`map_sealed_memfd` checked the seals, which
            // cannot be removed) and whose file cannot shrink under it (no
            // SIGBUS): it is valid as a `&[u8]` for as long as `self`.
            Some(ptr) => unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), self.len) },
            None => &[],
        }
    }
}

impl Drop for SealedMap {
    fn drop(&mut self) {
        if let Some(ptr) = self.ptr {
            // SAFETY: `ptr` and `len` are exactly what `mmap` returned and
            // was asked for; no slice borrowed from `self` outlives it.
            unsafe { libc::munmap(ptr.as_ptr(), self.len) };
        }
    }
}

/// Maps the whole of `fd` read-only, after checking that it is a memory
/// file sealed against writes and shrinking (so that the mapping can be
/// read as an immutable `&[u8]`), and no larger than `limit`. The pages
/// are faulted in at once (`MAP_POPULATE`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn map_sealed_memfd(fd: BorrowedFd<'_>, limit: usize) -> io::Result<SealedMap> {
    check_sealed(fd)?;
    let size = nix::sys::stat::fstat(fd)?.st_size;
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {limit} accepted"),
        ));
    }
    if len == 0 {
        return Ok(SealedMap { ptr: None, len });
    }
    // SAFETY: a new mapping chosen by the kernel (no address given), of a
    // file this process holds open; nothing else in the process is
    // touched. The result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(SealedMap {
        ptr: std::ptr::NonNull::new(ptr),
        len,
    })
}

/// Reads the whole of a memory file made by [`sealed_memfd`], from its
/// start, after checking that it is one (sealed against writes), and no
/// larger than `limit`.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn read_sealed_memfd(fd: BorrowedFd<'_>, limit: usize) -> io::Result<Vec<u8>> {
    check_sealed(fd)?;
    let size = nix::sys::stat::fstat(fd)?.st_size;
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if size > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{size} bytes, more than the {limit} accepted"),
        ));
    }
    let mut out = vec![0u8; size];
    let mut at = 0;
    while at < size {
        let offset = libc::off_t::try_from(at).unwrap_or(libc::off_t::MAX);
        match nix::sys::uio::pread(fd, &mut out[at..], offset) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.truncate(at);
    Ok(out)
}

/// Replaces this process's program with `exe` ([execve(2)]), keeping its
/// PID, its signal mask and pending signals, and every fd that is not
/// close-on-exec. Returns only on failure. Unlike
/// `std::process::Command::exec`, it leaves the signal mask alone: the
/// supervisor's blocked signals stay pending across the `exec` instead of
/// killing it in between.
///
/// [execve(2)]: https://man7.org/linux/man-pages/man2/execve.2.html
pub(crate) fn exec_in_place(
    exe: &std::path::Path,
    argv: &[std::ffi::OsString],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "an argument or variable contains a NUL byte",
            )
        })
    };
    let built = (|| -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let path = cstring(exe.as_os_str().as_bytes())?;
        let args = argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let vars = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(&kv)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok((path, args, vars))
    })();
    match built {
        Ok((path, args, vars)) => match nix::unistd::execve(&path, &args, &vars) {
            Ok(never) => match never {},
            Err(e) => e.into(),
        },
        Err(e) => e,
    }
}
