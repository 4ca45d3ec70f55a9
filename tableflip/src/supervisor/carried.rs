//! What the supervisor carries across its own `exec` into the new binary:
//! the sockets it holds, its generations (children keep their parent
//! across `exec`), and a few flags. Versioned JSON in a sealed memory
//! file whose fd, like every fd it names, survives the `exec`; the
//! variable [`ENV`] names it (`<version>:<fd>`).
//!
//! Each generation tells the supervisor the newest version its binary
//! reads, and the supervisor re-executes itself only into a binary that
//! reads the version it writes: after a downgrade across a change of
//! version it keeps running its own binary (and says so) until the
//! service restarts. A binary handed a newer version anyway refuses it and
//! exits 1 with the reason.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Backoff, Generation, Held, Requester, Role, Supervisor};
use crate::error::{Error, Result};
use crate::protocol::EntryMeta;
use crate::sys;
use crate::upgrade::launch::Executable;

/// The environment variable that names the carried state.
pub(crate) const ENV: &str = "TABLEFLIP_SUPERVISOR";

/// The newest version of the carried state this build reads and writes.
///
/// 2: the control socket and its connections, the previous binary and
/// the probation (fds a build that reads only 1 would keep open unused:
/// the supervisor does not re-execute into such a build).
pub(crate) const VERSION: u32 = 2;

/// The largest state accepted.
const MAX_STATE: usize = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    version: u32,
    generation: u64,
    #[serde(default)]
    announced: bool,
    #[serde(default)]
    upgrade_wanted: bool,
    /// What systemd's fd store holds for the service, as far as the
    /// supervisor knows: listener names and socket inodes.
    #[serde(default)]
    stored: Vec<(String, u64)>,
    /// Generations waiting for the outcome of an upgrade asked for during
    /// the one that just committed.
    #[serde(default)]
    requesters: Vec<Requester>,
    #[serde(default)]
    held: Vec<EntryMeta>,
    #[serde(default)]
    generations: Vec<SavedGeneration>,
    /// The path the generations start from (absolute, or relative to the
    /// start directory): the re-executed supervisor was started through
    /// `/proc/<pid>/exe`, which says nothing about it.
    #[serde(default)]
    executable: Option<std::path::PathBuf>,
    /// The control socket, if any.
    #[serde(default)]
    ctl: Option<SavedCtl>,
    /// Its connections (reading their request, or waiting for an upgrade
    /// that has not started).
    #[serde(default)]
    ctl_clients: Vec<SavedClient>,
    /// The newest upgrade's outcome, for `status`.
    #[serde(default)]
    last_upgrade: Option<crate::ctl::LastUpgrade>,
    /// The binary that served before the last upgrade, open (rollback).
    #[serde(default)]
    previous_exe_fd: Option<RawFd>,
    /// The generation on probation and the milliseconds left of it.
    #[serde(default)]
    probation: Option<(u32, u64)>,
    /// A rollback happened (what).
    #[serde(default)]
    rolled_back: Option<String>,
    /// How long ago the last upgrade committed, in milliseconds, while its
    /// old generation has not exited.
    #[serde(default)]
    committed_ms_ago: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedCtl {
    fd: RawFd,
    path: std::path::PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedClient {
    fd: RawFd,
    #[serde(default)]
    buf: Vec<u8>,
    phase: super::ctl::Phase,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedGeneration {
    pid: u32,
    number: u64,
    draining: bool,
    #[serde(default)]
    control_fd: Option<RawFd>,
    parent_pipe_fd: RawFd,
    /// It answers `Collect` (absent: it is not asked).
    #[serde(default)]
    hands_on: bool,
}

/// The state, as read back by the new binary.
#[derive(Debug)]
pub(crate) struct State {
    saved: Saved,
}

/// Takes the carried state from the environment, if this process is a
/// supervisor that just re-executed itself; the variable is removed.
pub(crate) fn take_from_env() -> Option<Result<State>> {
    let value = std::env::var_os(ENV)?;
    sys::remove_env(&[ENV]);
    Some(read(value.to_str().unwrap_or("")))
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Supervisor {
        reason: format!(
            "the state carried across exec is unusable: {}",
            reason.into()
        ),
    }
}

fn read(value: &str) -> Result<State> {
    let (version, fd) = value
        .split_once(':')
        .and_then(|(v, f)| Some((v.parse::<u32>().ok()?, f.parse::<RawFd>().ok()?)))
        .ok_or_else(|| bad(format!("{ENV}={value:?} is not `<version>:<fd>`")))?;
    if version == 0 {
        return Err(bad("version 0 does not exist"));
    }
    if version > VERSION {
        return Err(bad(format!(
            "version {version}; this build reads versions 1 to {VERSION} (the previous binary had a newer tableflip: restart the service to downgrade)"
        )));
    }
    if fd < 0 {
        return Err(bad(format!("{fd} is not a file descriptor")));
    }
    if fd <= 2 {
        return Err(bad(format!("fd {fd} is a standard stream")));
    }
    let file = sys::claim_received(fd).map_err(|e| bad(format!("fd {fd} {e}")))?;
    let bytes = sys::read_sealed_memfd(file.as_fd(), MAX_STATE)
        .map_err(|e| bad(format!("fd {fd}: {e}")))?;
    let saved: Saved =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid: {e}")))?;
    if saved.version == 0 || saved.version > VERSION {
        return Err(bad(format!("version {}", saved.version)));
    }
    Ok(State { saved })
}

impl State {
    /// Puts the carried state into `s`, taking ownership of every fd it
    /// names.
    pub(super) fn restore(self, s: &mut Supervisor) -> Result<()> {
        let claim = |fd: RawFd, what: &str| {
            sys::claim_received(fd).map_err(|e| bad(format!("the {what}: fd {fd} {e}")))
        };
        let saved = self.saved;
        if let Some(path) = saved.executable {
            s.launch.exe = Executable::Path {
                path,
                from: "the path the supervisor carried across its exec",
            };
        }
        s.generation = saved.generation;
        s.announced = saved.announced;
        s.upgrade_wanted = saved.upgrade_wanted;
        s.stored = saved.stored;
        // Only those whose generation is still there (checked below, as
        // the generations are restored).
        let requesters = saved.requesters;
        s.backoff = Backoff::default();
        s.last_upgrade = saved.last_upgrade;
        if let Some(fd) = saved.previous_exe_fd {
            s.previous_exe = Some(claim(fd, "previous binary")?);
        }
        s.probation = saved.probation.map(|(pid, left)| {
            (
                pid,
                std::time::Instant::now() + std::time::Duration::from_millis(left),
            )
        });
        s.rolled_back = saved.rolled_back;
        s.committed_at = saved.committed_ms_ago.and_then(|ms| {
            std::time::Instant::now().checked_sub(std::time::Duration::from_millis(ms))
        });
        if let Some(c) = saved.ctl {
            let fd = claim(c.fd, "control socket")?;
            let file = crate::unixfile::SocketFile::bound(c.path.clone(), &c.path, fd.as_fd());
            s.ctl = Some(super::ctl::CtlSocket {
                fd,
                file: Some(file),
            });
        }
        for c in saved.ctl_clients {
            let fd = claim(c.fd, "control-socket connection")?;
            s.client_id = s.client_id.wrapping_add(1);
            s.clients.push(super::ctl::Client {
                id: s.client_id,
                fd,
                buf: c.buf,
                phase: c.phase,
                deadline: std::time::Instant::now() + crate::ctl::REQUEST_TIMEOUT,
            });
        }
        for meta in saved.held {
            let fd = claim(meta.fd, &format!("socket {:?}", meta.name))?;
            s.held.push(Held { meta, fd });
        }
        for g in saved.generations {
            let control = match g.control_fd {
                Some(fd) => {
                    let c = claim(fd, "control socket")?;
                    sys::set_nonblocking(c.as_fd())
                        .map_err(|e| bad(format!("cannot set up a control socket: {e}")))?;
                    Some(c)
                }
                None => None,
            };
            let parent_pipe = claim(g.parent_pipe_fd, "parent pipe")?;
            if !is_child(g.pid) {
                tracing::warn!(
                    pid = g.pid,
                    "supervisor: a generation named in the carried state is not a child of this process; forgotten"
                );
                continue;
            }
            s.gens.push(Generation {
                pid: g.pid,
                number: g.number,
                role: if g.draining {
                    Role::Draining
                } else {
                    Role::Serving
                },
                control,
                parent_pipe: Arc::new(parent_pipe),
                ready_pipe: None,
                received: Vec::new(),
                exe: std::path::PathBuf::new(),
                started: std::time::Instant::now(),
                killed_because: None,
                hands_on: g.hands_on,
            });
        }
        s.requesters = requesters
            .into_iter()
            .filter(|r| s.gens.iter().any(|g| g.pid == r.pid))
            .collect();
        Ok(())
    }
}

/// Whether `pid` is a child of this process, exited or not (it is not
/// reaped here: `waitid` with `WNOWAIT`).
fn is_child(pid: u32) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    // 0 and negative numbers name process groups to `kill` and `waitid`,
    // never a child; 1 is init and this process is not its parent.
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 1 || pid == std::process::id() {
        return false;
    }
    // Only a positive answer counts: `Ok` means the PID is an unreaped
    // child (running, or exited and waiting for us).
    waitid(
        Id::Pid(nix::unistd::Pid::from_raw(raw)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    )
    .is_ok()
}

/// The state written out, ready for the `exec`.
pub(super) struct Outgoing {
    file: OwnedFd,
}

/// Every fd the new binary must find open: the sockets held, each
/// generation's control socket and parent pipe (the state file aside).
fn carried_fds(s: &Supervisor) -> Vec<BorrowedFd<'_>> {
    let mut fds: Vec<BorrowedFd<'_>> = s.held.iter().map(|h| h.fd.as_fd()).collect();
    for g in &s.gens {
        if matches!(g.role, Role::Starting { .. }) {
            continue;
        }
        fds.extend(g.control.as_ref().map(AsFd::as_fd));
        fds.push(g.parent_pipe.as_fd());
    }
    fds.extend(s.ctl.as_ref().map(|c| c.fd.as_fd()));
    fds.extend(s.previous_exe.as_ref().map(AsFd::as_fd));
    fds.extend(s.clients.iter().map(|c| c.fd.as_fd()));
    fds
}

impl Outgoing {
    /// Writes the state of `s` into a sealed memory file.
    pub(super) fn capture(s: &Supervisor) -> std::io::Result<Outgoing> {
        let held: Vec<EntryMeta> = s
            .held
            .iter()
            .map(|h| {
                let mut meta = h.meta.clone();
                meta.fd = h.fd.as_raw_fd();
                meta
            })
            .collect();
        let mut generations = Vec::new();
        for g in &s.gens {
            let draining = match g.role {
                Role::Serving => false,
                Role::Draining => true,
                // Never at an exec: it follows a commit, with nothing
                // else starting.
                Role::Starting { .. } => continue,
            };
            generations.push(SavedGeneration {
                pid: g.pid,
                number: g.number,
                draining,
                control_fd: g.control.as_ref().map(AsRawFd::as_raw_fd),
                parent_pipe_fd: g.parent_pipe.as_raw_fd(),
                hands_on: g.hands_on,
            });
        }
        let executable = match &s.launch.exe {
            Executable::Path { path, .. } => Some(path.clone()),
            Executable::Unknown { .. } => None,
        };
        let saved = Saved {
            version: VERSION,
            generation: s.generation,
            announced: s.announced,
            upgrade_wanted: s.upgrade_wanted,
            stored: s.stored.clone(),
            requesters: s.requesters.clone(),
            held,
            generations,
            executable,
            ctl: s.ctl.as_ref().map(|c| SavedCtl {
                fd: c.fd.as_raw_fd(),
                path: c.file.as_ref().map(|f| f.path.clone()).unwrap_or_default(),
            }),
            ctl_clients: s
                .clients
                .iter()
                .map(|c| SavedClient {
                    fd: c.fd.as_raw_fd(),
                    buf: c.buf.clone(),
                    phase: c.phase.clone(),
                })
                .collect(),
            last_upgrade: s.last_upgrade.clone(),
            previous_exe_fd: s.previous_exe.as_ref().map(AsRawFd::as_raw_fd),
            probation: s.probation.map(|(pid, until)| {
                let left = until.saturating_duration_since(std::time::Instant::now());
                (pid, super::millis(left))
            }),
            rolled_back: s.rolled_back.clone(),
            committed_ms_ago: s.committed_at.map(|t| super::millis(t.elapsed())),
        };
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        let file = sys::sealed_memfd(c"tableflip-supervisor", &[&bytes])?;
        Ok(Outgoing { file })
    }

    /// The value of [`ENV`].
    pub(super) fn env_value(&self) -> String {
        format!("{VERSION}:{}", self.file.as_raw_fd())
    }

    /// Re-executes this process with the state of `s`; returns only on
    /// failure, with every fd close-on-exec again.
    pub(super) fn exec(
        &self,
        s: &Supervisor,
        exe: &std::path::Path,
        argv: &[std::ffi::OsString],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
    ) -> std::io::Error {
        let mut fds = carried_fds(s);
        fds.push(self.file.as_fd());
        let cleared = fds.iter().try_for_each(|fd| sys::clear_cloexec(*fd));
        let error = match cleared {
            Ok(()) => sys::exec_in_place(exe, argv, env),
            Err(e) => e,
        };
        for fd in fds {
            let _ = sys::set_cloexec(fd);
        }
        error
    }
}
