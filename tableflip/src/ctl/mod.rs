//! The control channel: a Unix stream socket on which a running service
//! answers `upgrade` and `status` requests, so that a deploy script (or
//! `systemctl reload` through `ExecReload=`) learns whether an upgrade
//! worked. `tableflip-ctl` (a package of this workspace) is its
//! command-line client; this module has the wire format, for programs that
//! speak to it themselves.
//!
//! # Where it is
//!
//! [`Options::control_socket`](crate::Options::control_socket) chooses the
//! path. By default ([`ControlSocket::Auto`]) the service has one when
//! systemd gives it a runtime directory (`RuntimeDirectory=` sets
//! `$RUNTIME_DIRECTORY`; the first one when it names several, see
//! `systemd.exec(5)`): `$RUNTIME_DIRECTORY/tableflip.sock`. The file is
//! created with mode `0600`: only the service's user (and root) may
//! connect; a peer of another user that connects anyway (a mode changed
//! later) is refused after a `SO_PEERCRED` check.
//!
//! In replace mode the socket is a listener like the service's own (named
//! [`LISTENER_NAME`]), handed from each generation to the next: the
//! generation in charge answers. In supervised mode the supervisor holds
//! it and answers.
//!
//! # Wire format
//!
//! The client connects, writes one [`Request`] as a JSON line, and reads
//! one [`Reply`] as a JSON line; then the service closes the connection.
//! Unknown fields are ignored both ways.
//!
//! ```text
//! → {"command":"upgrade"}
//! ← {"outcome":"upgraded","joined":false,"old_pid":4211,"new_pid":4388,"generation":3,"duration_ms":41}
//! → {"command":"status"}
//! ← {"outcome":"status","mode":"supervised","state":"serving",…}
//! ```
//!
//! An `upgrade` request made while an upgrade runs *joins* it: it gets
//! that upgrade's outcome, with `joined: true` (the upgrade may have
//! started from the binary that was on disk before yours: ask again to be
//! sure that yours runs). A `retry` reply comes from a generation that has
//! just handed over (replace mode): ask again, the new one answers.

use std::ffi::OsStr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub(crate) mod server;

/// The name of the control socket among a replace-mode service's
/// listeners (see [`Fds`](crate::Fds)): handed on like any listener.
pub const LISTENER_NAME: &str = "tableflip.control";

/// The file name of the control socket in the runtime directory.
pub const DEFAULT_FILE_NAME: &str = "tableflip.sock";

/// The permissions of the control socket's file.
pub const MODE: u32 = 0o600;

/// At most this many control connections are open at once; more are
/// answered `refused` at once.
pub const MAX_CONNECTIONS: usize = 64;

/// The longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 4096;

/// Where the control socket is: see [`Options::control_socket`](crate::Options::control_socket).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ControlSocket {
    /// `$RUNTIME_DIRECTORY/tableflip.sock` when systemd sets
    /// `$RUNTIME_DIRECTORY`; none otherwise. The default.
    #[default]
    Auto,
    /// At this path (a relative one is resolved against the directory the
    /// service started in).
    Path(PathBuf),
    /// No control socket.
    Off,
}

impl ControlSocket {
    /// The path to use, given the value of `$RUNTIME_DIRECTORY`.
    pub(crate) fn resolve(&self, runtime_directory: Option<&OsStr>) -> Option<PathBuf> {
        match self {
            ControlSocket::Off => None,
            ControlSocket::Path(p) => Some(p.clone()),
            ControlSocket::Auto => {
                let dirs = runtime_directory?;
                // Several directories are joined with ':'; the first.
                let first = std::env::split_paths(dirs).next()?;
                if first.as_os_str().is_empty() || !first.is_absolute() {
                    return None;
                }
                Some(first.join(DEFAULT_FILE_NAME))
            }
        }
    }
}

/// What the client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Command {
    /// Start an upgrade (or join the one running) and answer with its
    /// outcome.
    Upgrade,
    /// Answer with the service's [`Status`].
    Status,
}

/// One request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// What is asked.
    pub command: Command,
    /// `upgrade`: answer only once the new generation's probation is over
    /// (see [`Options::probation`](crate::Options::probation)), so that a
    /// rollback is the answer (`failed`, failure `rolled_back`). Default:
    /// answer at readiness.
    #[serde(default)]
    pub wait_probation: bool,
}

/// Why an upgrade did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Failure {
    /// The executable could not be started (missing, not executable…).
    Spawn,
    /// The new generation exited before it was ready.
    Exited,
    /// The new generation was killed by a signal before it was ready.
    Killed,
    /// The new generation was not ready within the upgrade timeout (it
    /// was killed).
    Timeout,
    /// The service began to stop during the upgrade.
    Stopped,
    /// The new generation became ready, then died during its probation:
    /// the previous binary serves again (a rollback).
    RolledBack,
    /// Anything else (the message says).
    Other,
}

impl Failure {
    /// How `tableflip-ctl` and the logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Spawn => "spawn",
            Failure::Exited => "exited",
            Failure::Killed => "killed",
            Failure::Timeout => "timeout",
            Failure::Stopped => "stopped",
            Failure::RolledBack => "rolled_back",
            Failure::Other => "other",
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reply {
    /// The upgrade succeeded: the new generation is ready and serves.
    Upgraded {
        /// It was already running when the request came.
        joined: bool,
        /// The generation that served before (replace mode: the process
        /// that answers; supervised mode: the previous generation).
        old_pid: u32,
        /// The new generation's process.
        new_pid: u32,
        /// The new generation's number.
        generation: u64,
        /// From the start of the upgrade to the new generation's
        /// readiness, in milliseconds.
        duration_ms: u64,
        /// With `wait_probation`: how long the new generation served
        /// before this answer, in milliseconds (the whole probation, or
        /// less when it was cut short: a stop, a newer upgrade, or in
        /// replace mode the old generation's exit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probation_ms: Option<u64>,
    },
    /// The upgrade failed; the generation that served keeps serving.
    Failed {
        /// It was already running when the request came.
        joined: bool,
        /// Which kind of failure.
        failure: Failure,
        /// What the service logged.
        error: String,
        /// The new generation's process, when one was started.
        new_pid: Option<u32>,
        /// From the start of the upgrade to its failure, in milliseconds.
        duration_ms: u64,
    },
    /// No upgrade was started: the service is stopping, is not ready yet,
    /// or cannot upgrade (the message says why).
    Refused {
        /// Why.
        error: String,
    },
    /// The process that answered has handed over to a new generation:
    /// ask again (the new one answers).
    Retry {
        /// Why.
        error: String,
    },
    /// The answer to `status`.
    Status(Box<Status>),
    /// The request was not understood.
    BadRequest {
        /// Why.
        error: String,
    },
}

/// The service as the control channel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `"replace"` or `"supervised"`.
    pub mode: String,
    /// `"starting"`, `"serving"`, `"upgrading"`, `"stopping"` (during
    /// `stop_delay`: `"stopping (lame duck)"`).
    pub state: String,
    /// The serving generation's number.
    pub generation: u64,
    /// The serving generation's process.
    pub pid: u32,
    /// The supervisor's process (supervised mode).
    pub supervisor_pid: Option<u32>,
    /// Every process of the service: supervisor, serving, starting and
    /// draining generations.
    pub pids: Vec<u32>,
    /// Since the process that answers started, in milliseconds: the
    /// supervisor (the service's life) or, in replace mode, the serving
    /// generation.
    pub uptime_ms: u64,
    /// The newest upgrade's outcome, if any upgrade ran (in replace mode:
    /// the one this generation ran, else the one that started it).
    pub last_upgrade: Option<LastUpgrade>,
}

/// The newest upgrade, for [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpgrade {
    /// It succeeded.
    pub ok: bool,
    /// The failure's kind, when it failed.
    pub failure: Option<Failure>,
    /// The error, when it failed.
    pub error: Option<String>,
    /// The generation it started.
    pub generation: u64,
    /// In milliseconds, from its start to its end.
    pub duration_ms: u64,
    /// When it ended: milliseconds since the Unix epoch.
    pub ended_unix_ms: u64,
    /// Its new generation died during its probation and the previous
    /// binary was started instead (see
    /// [`Options::probation`](crate::Options::probation)); `error` says
    /// what happened.
    #[serde(default)]
    pub rolled_back: bool,
}

impl LastUpgrade {
    /// The record of an upgrade's outcome `reply` (`Upgraded` or `Failed`).
    pub(crate) fn of(reply: &Reply, generation: u64) -> Option<LastUpgrade> {
        let ended_unix_ms = unix_ms();
        match reply {
            Reply::Upgraded {
                generation,
                duration_ms,
                ..
            } => Some(LastUpgrade {
                ok: true,
                failure: None,
                error: None,
                generation: *generation,
                duration_ms: *duration_ms,
                ended_unix_ms,
                rolled_back: false,
            }),
            Reply::Failed {
                failure,
                error,
                duration_ms,
                ..
            } => Some(LastUpgrade {
                ok: false,
                failure: Some(*failure),
                error: Some(error.clone()),
                generation,
                duration_ms: *duration_ms,
                ended_unix_ms,
                rolled_back: false,
            }),
            _ => None,
        }
    }
}

impl LastUpgrade {
    /// The record of a rollback: the upgrade to `generation` was undone
    /// (`what` happened).
    pub(crate) fn rolled_back(generation: u64, what: String) -> LastUpgrade {
        LastUpgrade {
            ok: false,
            failure: Some(Failure::RolledBack),
            error: Some(what),
            generation,
            duration_ms: 0,
            ended_unix_ms: unix_ms(),
            rolled_back: true,
        }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Reply {
    /// The reply as one line (JSON and `\n`).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Serializing these types cannot fail; say so if it ever does.
            format!(r#"{{"outcome":"bad_request","error":"cannot encode the reply: {e}"}}"#)
                .into_bytes()
        });
        line.push(b'\n');
        line
    }

    /// `Upgraded` with the probation served so far.
    pub(crate) fn after_probation(mut self, served_ms: u64) -> Reply {
        if let Reply::Upgraded { probation_ms, .. } = &mut self {
            *probation_ms = Some(served_ms);
        }
        self
    }

    /// The answer to a request that waited for the probation of the
    /// generation `new_pid`, rolled back (`what`).
    pub(crate) fn rolled_back(new_pid: u32, what: String, joined: bool) -> Reply {
        Reply::Failed {
            joined,
            failure: Failure::RolledBack,
            error: what,
            new_pid: Some(new_pid),
            duration_ms: 0,
        }
    }

    /// `joined` set, for an outcome handed to a request that joined.
    pub(crate) fn joined(mut self) -> Reply {
        match &mut self {
            Reply::Upgraded { joined, .. } | Reply::Failed { joined, .. } => *joined = true,
            _ => {}
        }
        self
    }
}

/// Parses one request line.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    let text = std::str::from_utf8(line).map_err(|_| Reply::BadRequest {
        error: "the request is not UTF-8".to_owned(),
    })?;
    serde_json::from_str(text.trim()).map_err(|e| Reply::BadRequest {
        error: format!(
            "not a request ({e}); expected {{\"command\":\"upgrade\"}} or {{\"command\":\"status\"}}"
        ),
    })
}

/// Whether a peer with user id `uid` may use the control socket of a
/// process running as `euid`: the same user, or root.
pub(crate) fn peer_allowed(uid: u32, euid: u32) -> bool {
    uid == euid || uid == 0
}

/// The refusal for a peer of another user.
pub(crate) fn peer_refused(uid: u32) -> Reply {
    Reply::Refused {
        error: format!("permission denied: user {uid} is neither the service's user nor root"),
    }
}

/// How long a client has to send its request line.
pub(crate) const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_directory_gives_the_default_path() {
        let auto = ControlSocket::Auto;
        assert_eq!(auto.resolve(None), None);
        assert_eq!(
            auto.resolve(Some(OsStr::new("/run/app"))),
            Some(PathBuf::from("/run/app/tableflip.sock"))
        );
        assert_eq!(
            auto.resolve(Some(OsStr::new("/run/a:/run/b"))),
            Some(PathBuf::from("/run/a/tableflip.sock"))
        );
        assert_eq!(auto.resolve(Some(OsStr::new(""))), None);
        assert_eq!(auto.resolve(Some(OsStr::new("relative"))), None);
        assert_eq!(
            ControlSocket::Off.resolve(Some(OsStr::new("/run/app"))),
            None
        );
        let p = ControlSocket::Path("/x/y.sock".into());
        assert_eq!(p.resolve(None), Some(PathBuf::from("/x/y.sock")));
    }

    #[test]
    fn requests_and_replies_round_trip() {
        assert_eq!(
            parse_request(br#"{"command":"upgrade","extra":1}"#),
            Ok(Request {
                command: Command::Upgrade,
                wait_probation: false,
            })
        );
        assert!(
            parse_request(br#"{"command":"upgrade","wait_probation":true}"#)
                .is_ok_and(|r| r.wait_probation)
        );
        assert!(matches!(
            parse_request(b"upgrade"),
            Err(Reply::BadRequest { .. })
        ));
        assert!(matches!(
            parse_request(&[0xff, 0xfe]),
            Err(Reply::BadRequest { .. })
        ));
        let r = Reply::Failed {
            joined: false,
            failure: Failure::Timeout,
            error: "x".into(),
            new_pid: Some(3),
            duration_ms: 5,
        };
        let line = r.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        let back: Reply = serde_json::from_slice(&line)
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, r);
        assert!(matches!(back.joined(), Reply::Failed { joined: true, .. }));
        assert!(peer_allowed(1000, 1000) && peer_allowed(0, 1000) && !peer_allowed(1001, 1000));
    }
}
