//! The only module with `unsafe` code: taking ownership of inherited fds,
//! editing the process environment, and the code that runs between `fork`
//! and `exec`. Everything else in the crate goes through the safe wrappers
//! here (or through `nix`/`socket2`).
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};

/// Takes ownership of `fd`, an fd number named by the handover or by
/// `LISTEN_FDS`, after checking that it is open.
///
/// The caller guarantees that nothing else in this process owns `fd`: the
/// handover parser rejects duplicate fd numbers and the protocol's own fds,
/// and every number is taken at most once, before any other code of the
/// process could have opened or closed it.
pub(crate) fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fcntl(F_GETFD)` only reads the fd table; on a closed or
    // invalid fd it fails with EBADF and touches nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above) and, per this function's
    // contract, owned by nobody else in the process, so wrapping it in an
    // `OwnedFd` (which closes it on drop) cannot double-close.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd())?;
    Ok(owned)
}

/// Borrows `fd`, an fd number named by an inherited handover, after
/// checking that it is open, so it can be inspected before anything takes
/// ownership of it.
///
/// The borrow is only used during `Upgrader::new`, while the handover is
/// checked: nothing in this crate closes an inherited fd before the checks
/// end, and the program has not been handed any of these numbers.
pub(crate) fn borrow_inherited(fd: RawFd) -> io::Result<BorrowedFd<'static>> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fcntl(F_GETFD)` only reads the fd table; an invalid fd fails
    // with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above) and, as documented, stays open
    // for as long as the borrow is used: the handover checks run before any
    // code closes or takes ownership of an inherited fd.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// A pipe whose two ends are close-on-exec: `(read end, write end)`.
#[cfg(not(any(target_os = "macos", target_os = "ios")))]
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
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
    Ok((r, w))
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

/// Removes a variable from the process environment.
///
/// tableflip removes its protocol variables once, when the `Upgrader` is
/// created, which the docs ask to do at startup.
pub(crate) fn remove_env(key: &str) {
    if std::env::var_os(key).is_none() {
        return;
    }
    // SAFETY: `remove_var` is unsound only when another thread reads or
    // writes the environment at the same moment. It runs once per process,
    // from `Upgrader::new` (and socket activation), which the documentation
    // requires to be called at startup, before the program starts threads
    // that touch the environment; `#[tableflip::main]` does so before it
    // builds the tokio runtime. Rust's own `env::var` calls take the
    // standard library's environment lock, which `remove_var` takes too.
    unsafe { std::env::remove_var(OsStr::new(key)) };
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
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above; clearing FD_CLOEXEC changes the child's fd
            // table only.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only calls
    // async-signal-safe functions (see above); it captures nothing that
    // needs a lock or the allocator.
    unsafe { cmd.pre_exec(hook) };
}
