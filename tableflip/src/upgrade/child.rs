//! The next generation's process, as the generation that started it sees
//! it: started by `posix_spawn` and watched through a pidfd where the
//! system allows (see `sys::spawn_inheriting`), or by tokio's `Command`
//! (fork and exec) elsewhere. Either way it leads a process group of its
//! own until it is ready (it then rejoins its parent's), so that killing
//! it for a failed upgrade also kills what it started meanwhile.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// A child process: its PID, how to wait for it, how to kill it.
#[derive(Debug)]
pub(crate) struct Child(Kind);

#[derive(Debug)]
enum Kind {
    /// Watched through a pidfd, reaped with `waitpid(pid)`.
    Pidfd {
        pid: u32,
        pidfd: AsyncFd<OwnedFd>,
        status: Option<ExitStatus>,
    },
    Tokio(tokio::process::Child),
}

impl Child {
    /// The child `pid`, just started by `posix_spawn`, watched through a
    /// pidfd. Needs a tokio runtime (the pidfd is watched by its reactor).
    /// If it cannot be watched, it is killed and reaped at once: a child
    /// nobody watches would be left behind.
    pub(crate) fn spawned(pid: u32) -> io::Result<Child> {
        match crate::sys::watch_process(pid) {
            Ok(pidfd) => Ok(Child(Kind::Pidfd {
                pid,
                pidfd,
                status: None,
            })),
            Err(e) => {
                let _ = nix::sys::signal::kill(pid_of(pid), nix::sys::signal::Signal::SIGKILL);
                let _ = reap(pid, false);
                Err(e)
            }
        }
    }

    /// A child started by tokio.
    pub(crate) fn from_tokio(child: tokio::process::Child) -> Child {
        Child(Kind::Tokio(child))
    }

    /// How it was started, for the log.
    pub(crate) fn how(&self) -> &'static str {
        match &self.0 {
            Kind::Pidfd { .. } => "posix_spawn",
            Kind::Tokio(_) => "fork",
        }
    }

    /// Its PID (0 if tokio no longer knows it, which cannot happen before
    /// it has been reaped).
    pub(crate) fn id(&self) -> u32 {
        match &self.0 {
            Kind::Pidfd { pid, .. } => *pid,
            Kind::Tokio(c) => c.id().unwrap_or(0),
        }
    }

    /// Its exit status if it has exited (reaping it), without waiting.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match &mut self.0 {
            Kind::Pidfd { pid, status, .. } => {
                if status.is_none() {
                    *status = reap(*pid, true)?;
                }
                Ok(*status)
            }
            Kind::Tokio(c) => c.try_wait(),
        }
    }

    /// Waits until it has exited, without reaping it (its PID stays its
    /// own until [`wait`](Self::wait)). `Ok(false)` when that cannot be
    /// told apart from reaping (a child tokio started: tokio reaps as it
    /// reports the exit).
    pub(crate) async fn exited(&mut self) -> io::Result<bool> {
        match &mut self.0 {
            Kind::Pidfd { pidfd, status, .. } => {
                if status.is_none() {
                    // Readable once the process has exited.
                    let mut ready = pidfd.readable().await?;
                    ready.retain_ready();
                }
                Ok(true)
            }
            Kind::Tokio(_) => Ok(false),
        }
    }

    /// Waits until it exits, and reaps it.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Kind::Tokio(c) = &mut self.0 {
            return c.wait().await;
        }
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            let Kind::Pidfd { pidfd, .. } = &self.0 else {
                unreachable!("checked above");
            };
            // Readable once the process has exited.
            let mut ready = pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    /// Sends `SIGKILL` to it and to its process group (what it started
    /// during its initialisation), without waiting.
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        let reaped = match &self.0 {
            Kind::Pidfd { status, .. } => status.is_some(),
            Kind::Tokio(c) => c.id().is_none(),
        };
        if !reaped {
            // Not reaped yet, so its PID, which is also its group's ID, is
            // still its own: the group cannot be another one. (ESRCH: the
            // group is empty, or the child has left it for its parent's.)
            let _ = nix::sys::signal::killpg(pid_of(self.id()), nix::sys::signal::Signal::SIGKILL);
        }
        match &mut self.0 {
            Kind::Pidfd { pid, status, .. } => {
                if status.is_some() {
                    return Ok(());
                }
                nix::sys::signal::kill(pid_of(*pid), nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            }
            Kind::Tokio(c) => c.start_kill(),
        }
    }

    /// A handle that signals this very process, and never another one
    /// that reused its PID once it is gone (a pidfd; Linux 5.3 and later).
    pub(crate) fn signaller(&self) -> Option<Signaller> {
        #[cfg(target_os = "linux")]
        {
            let fd = match &self.0 {
                Kind::Pidfd { pidfd, .. } => pidfd.get_ref().try_clone().ok()?,
                // Opened while the child is ours and not reaped: it can only
                // be this process.
                Kind::Tokio(c) => crate::sys::pidfd_open(c.id()?).ok()?,
            };
            Some(Signaller {
                pidfd: std::sync::Arc::new(fd),
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// Kills it (and its group) and reaps it in the background, on a
    /// thread of its own: never blocking the caller (a runtime thread, a
    /// drop), never leaving a zombie while this process lives.
    pub(crate) fn kill_and_forget(mut self) {
        let pid = self.id();
        if let Err(e) = self.start_kill() {
            tracing::debug!(child_pid = pid, error = %e, "cannot kill the new process");
        }
        let spawned = std::thread::Builder::new()
            .name("tableflip-reaper".into())
            .spawn(move || {
                // Blocking is fine here: this thread does nothing else.
                let _ = reap(pid, false);
            });
        if let Err(e) = spawned {
            tracing::warn!(child_pid = pid, error = %e, "cannot start a thread to reap the new process");
        }
    }

    /// Sends it `SIGKILL` and waits until it is reaped.
    pub(crate) async fn kill(&mut self) -> io::Result<()> {
        self.start_kill()?;
        self.wait().await.map(|_| ())
    }
}

/// Signals one process through its pidfd (see [`Child::signaller`]).
#[derive(Debug, Clone)]
pub(crate) struct Signaller {
    #[cfg(target_os = "linux")]
    pidfd: std::sync::Arc<OwnedFd>,
    /// There are no pidfds elsewhere: no signaller either.
    #[cfg(not(target_os = "linux"))]
    never: std::convert::Infallible,
}

impl Signaller {
    /// Sends `signal`; `ESRCH` once the process has exited.
    pub(crate) fn send(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsFd;
            crate::sys::pidfd_send_signal(self.pidfd.as_fd(), signal as i32)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = signal;
            match self.never {}
        }
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// `waitpid(pid)`: the exit status once the process has exited (it is
/// then reaped), `None` while it runs (with `nohang`).
fn reap(pid: u32, nohang: bool) -> io::Result<Option<ExitStatus>> {
    let flags = nohang.then_some(WaitPidFlag::WNOHANG);
    loop {
        return match waitpid(pid_of(pid), flags) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::from_raw((code & 0xff) << 8))),
            Ok(WaitStatus::Signaled(_, signal, core)) => Ok(Some(ExitStatus::from_raw(
                (signal as i32) | if core { 0x80 } else { 0 },
            ))),
            Ok(_) => Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => Err(io::Error::from(e)),
        };
    }
}
