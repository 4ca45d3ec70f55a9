//! The next generation's process, as the generation that started it sees
//! it: started by `posix_spawn` and watched through a pidfd where the
//! system allows (see `sys::spawn_inheriting`), or by tokio's `Command`
//! (fork and exec) elsewhere.

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

    /// Sends it `SIGKILL`, without waiting.
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Kind::Pidfd { pid, status, .. } => {
                if status.is_some() {
                    return Ok(());
                }
                // Not reaped yet, so the PID cannot name another process.
                nix::sys::signal::kill(pid_of(*pid), nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            }
            Kind::Tokio(c) => c.start_kill(),
        }
    }

    /// Sends it `SIGKILL` and waits until it is reaped.
    pub(crate) async fn kill(&mut self) -> io::Result<()> {
        self.start_kill()?;
        self.wait().await.map(|_| ())
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
