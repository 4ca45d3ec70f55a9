//! The control socket in supervised mode: the supervisor holds it and
//! answers in its own event loop (non-blocking; one short JSON line each
//! way, see [`crate::ctl`]). An `upgrade` request waits for the outcome of
//! the upgrade it started or joined; the answer is written when that
//! upgrade commits or fails.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use nix::sys::socket::{MsgFlags, getsockopt, send, sockopt::PeerCredentials};

use crate::bind::{self, ListenSpec};
use crate::ctl::{self, Command, MAX_REQUEST, REQUEST_TIMEOUT, Reply};
use crate::network::{Address, Network};
use crate::unixfile::SocketFile;

/// At most this many connections are open at once; more are answered
/// `refused` and closed.
const MAX_CLIENTS: usize = ctl::MAX_CONNECTIONS;

/// The listening socket and its file.
#[derive(Debug)]
pub(super) struct CtlSocket {
    pub(super) fd: OwnedFd,
    pub(super) file: Option<SocketFile>,
}

/// Where a connection is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Phase {
    /// Its request line is being read.
    Reading,
    /// It asked for an upgrade that has not started yet (a replacement
    /// is starting, or no generation serves yet); `probation`: it waits
    /// for the probation too.
    Pending {
        #[serde(default)]
        probation: bool,
    },
    /// It waits for the upgrade in flight (`joined`: it was running
    /// when the request came).
    InFlight {
        joined: bool,
        #[serde(default)]
        probation: bool,
    },
    /// The upgrade succeeded (`reply`); it waits for the end of the new
    /// generation's probation (which began at `since_unix_ms`).
    Probation { reply: Reply, since_unix_ms: u64 },
}

/// One connection to the control socket.
#[derive(Debug)]
pub(super) struct Client {
    /// Tells it apart while the supervisor handles several.
    pub(super) id: u64,
    pub(super) fd: OwnedFd,
    pub(super) buf: Vec<u8>,
    pub(super) phase: Phase,
    /// Until when it may take to send its request.
    pub(super) deadline: Instant,
}

/// Creates the control socket at `path` (mode 0600). A stale socket file
/// left by a crash is replaced; anything else at the path is an error.
pub(super) fn bind_socket(path: &Path) -> std::io::Result<CtlSocket> {
    let address = path.to_str().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: the control socket's path is not valid UTF-8",
                path.display()
            ),
        )
    })?;
    let spec = ListenSpec::new(ctl::LISTENER_NAME, "unix", address).mode(ctl::MODE);
    let bound = bind::bind(
        Network::Unix,
        &Address::Path(path.to_owned()),
        None,
        &spec,
        64,
        None,
    )?;
    Ok(CtlSocket {
        fd: bound.fd,
        file: bound.file,
    })
}

/// Accepts every connection waiting; returns them (each checked: another
/// user's is answered `refused` and closed) and whether accepting failed
/// (out of fds, say: the listener, still readable, is then left alone for
/// a moment instead of waking the supervisor in a loop).
pub(super) fn accept_all(listener: &CtlSocket, open: usize) -> (Vec<Client>, bool) {
    let mut new = Vec::new();
    let euid = nix::unistd::geteuid().as_raw();
    let accepting = std::os::unix::net::UnixListener::from(match listener.fd.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "supervisor: control socket: cannot accept");
            return (new, true);
        }
    });
    loop {
        // std's accept: close-on-exec; the listener is non-blocking.
        let stream = match accepting.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::warn!(error = %e, "supervisor: control socket: cannot accept; trying again in 100 ms");
                return (new, true);
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!(error = %e, "supervisor: control socket: cannot set up a connection");
            continue;
        }
        let fd = OwnedFd::from(stream);
        match getsockopt(&fd, PeerCredentials) {
            Ok(cred) if !ctl::peer_allowed(cred.uid(), euid) => {
                tracing::warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "supervisor: control socket: refused a connection from another user"
                );
                write_reply(&fd, &ctl::peer_refused(cred.uid()));
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                write_reply(
                    &fd,
                    &Reply::Refused {
                        error: format!("permission denied: cannot check the peer's user ({e})"),
                    },
                );
                continue;
            }
        }
        if open + new.len() >= MAX_CLIENTS {
            write_reply(
                &fd,
                &Reply::Refused {
                    error: format!(
                        "too many control connections (at most {MAX_CLIENTS}); try again"
                    ),
                },
            );
            continue;
        }
        new.push(Client {
            id: 0,
            fd,
            buf: Vec::new(),
            phase: Phase::Reading,
            deadline: Instant::now() + REQUEST_TIMEOUT,
        });
    }
    (new, false)
}

/// What reading a connection gave.
pub(super) enum Read {
    /// Not a whole line yet.
    More,
    /// Its request.
    Request(ctl::Request),
    /// Answer this and close.
    Answer(Reply),
    /// It went away.
    Gone,
}

/// Reads what `client` sent.
pub(super) fn read(client: &mut Client) -> Read {
    let mut chunk = [0u8; 512];
    loop {
        match nix::unistd::read(&client.fd, &mut chunk) {
            // The end of the request without a newline: it is the request.
            Ok(0) if !client.buf.is_empty() => {
                return match ctl::parse_request(&client.buf) {
                    Ok(r) => Read::Request(r),
                    Err(reply) => Read::Answer(reply),
                };
            }
            Ok(0) => {
                return Read::Answer(Reply::BadRequest {
                    error: "no request (the connection was closed before one came)".to_owned(),
                });
            }
            Ok(n) => {
                client.buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = client.buf.iter().position(|b| *b == b'\n') {
                    return match ctl::parse_request(&client.buf[..end]) {
                        Ok(r) => Read::Request(r),
                        Err(reply) => Read::Answer(reply),
                    };
                }
                if client.buf.len() > MAX_REQUEST {
                    return Read::Answer(Reply::BadRequest {
                        error: format!("the request is longer than {MAX_REQUEST} bytes"),
                    });
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => return Read::More,
            Err(_) => return Read::Gone,
        }
    }
}

/// Writes `reply` without waiting (it is one short line into an empty
/// socket buffer); a client that is gone is not an error.
pub(super) fn write_reply(fd: &OwnedFd, reply: &Reply) {
    let line = reply.to_line();
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    match send(fd.as_raw_fd(), &line, flags) {
        Ok(n) if n == line.len() => {}
        Ok(_) | Err(_) => {
            tracing::debug!("supervisor: control socket: the answer could not be written whole");
        }
    }
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

/// The kind of a failed upgrade, from what the supervisor says of the new
/// generation (`reason`, the start of which the supervisor writes itself)
/// and whether it ever started (`pid` 0: it did not).
pub(super) fn failure_of(pid: u32, reason: &str, stopping: bool) -> ctl::Failure {
    use ctl::Failure;
    if reason.starts_with("was not started") {
        // Before any spawn (the application state could not be handed
        // over): the serving generation's doing.
        Failure::Other
    } else if pid == 0 {
        Failure::Spawn
    } else if stopping {
        Failure::Stopped
    } else if reason.starts_with("was not ready within") {
        Failure::Timeout
    } else if reason.starts_with("exited") {
        Failure::Exited
    } else if reason.starts_with("was killed by") {
        Failure::Killed
    } else {
        Failure::Other
    }
}

impl super::Supervisor {
    /// After a re-exec: the control socket the new binary's options ask
    /// for (the carried one if its path is the same; a socket file no
    /// longer asked for is removed).
    pub(super) fn resume_ctl(&mut self) {
        let wanted = self.ctl_path();
        let carried = self
            .ctl
            .as_ref()
            .map(|c| c.file.as_ref().map(|f| f.path.clone()));
        if carried.is_some() && carried.clone().flatten() == wanted {
            return;
        }
        if let Some(old) = self.ctl.take() {
            tracing::info!(
                "supervisor: the control socket moved or is gone in the new binary's options"
            );
            if let Some(file) = old.file {
                file.remove();
            }
        }
        if let Some(path) = wanted {
            match bind_socket(&path) {
                Ok(c) => {
                    tracing::info!(path = %path.display(), "supervisor: control socket: answering upgrade and status requests");
                    self.ctl = Some(c);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "supervisor: cannot create the control socket; upgrades are asked for by signal only until the service restarts")
                }
            }
        }
    }

    /// Accepts the control socket's waiting connections.
    pub(super) fn accept_clients(&mut self) {
        let Some(listener) = &self.ctl else {
            return;
        };
        let (new, failed) = accept_all(listener, self.clients.len());
        for mut c in new {
            self.client_id = self.client_id.wrapping_add(1);
            c.id = self.client_id;
            self.clients.push(c);
        }
        if failed {
            self.ctl_paused_until = Some(Instant::now() + std::time::Duration::from_millis(100));
        }
    }

    /// Reads what connection `id` sent; acts on a whole request.
    pub(super) fn read_client(&mut self, id: u64) {
        let Some(c) = self.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        match read(c) {
            Read::More => {}
            Read::Gone => self.clients.retain(|c| c.id != id),
            Read::Answer(reply) => self.answer_client(id, &reply),
            Read::Request(r) if r.command == Command::Status => {
                let status = Reply::Status(Box::new(self.ctl_status()));
                self.answer_client(id, &status);
            }
            Read::Request(r) => self.ctl_upgrade(id, r.wait_probation),
        }
    }

    /// `upgrade` from connection `id`: joins the upgrade in flight, or
    /// asks for one (it starts now, or once the generation starting is
    /// done).
    fn ctl_upgrade(&mut self, id: u64, probation: bool) {
        if self.stop_deadline.is_some() || self.lame_duck_until.is_some() {
            let refused = Reply::Refused {
                error: "the service is stopping".to_owned(),
            };
            self.answer_client(id, &refused);
            return;
        }
        let joined = self.upgrade_started.is_some();
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == id) {
            c.phase = if joined {
                Phase::InFlight {
                    joined: true,
                    probation,
                }
            } else {
                Phase::Pending { probation }
            };
        }
        if joined {
            tracing::info!(
                "supervisor: control socket: upgrade requested; an upgrade is running: the request joins it"
            );
        } else {
            tracing::info!("supervisor: control socket: upgrade requested");
            self.request_upgrade(None);
        }
    }

    /// An upgrade starts: the connections that asked for one wait for it.
    pub(super) fn ctl_upgrade_started(&mut self) {
        self.upgrade_from = self.serving().map(|g| g.pid);
        for c in &mut self.clients {
            if let Phase::Pending { probation } = c.phase {
                c.phase = Phase::InFlight {
                    joined: false,
                    probation,
                };
            }
        }
    }

    /// The upgrade in flight has ended with `reply`: every connection that
    /// waits for it gets it.
    pub(super) fn ctl_upgrade_ended(&mut self, reply: &Reply, generation: u64) {
        self.last_upgrade = ctl::LastUpgrade::of(reply, generation);
        self.upgrade_from = None;
        let waiting: Vec<(u64, bool, bool)> = self
            .clients
            .iter()
            .filter_map(|c| match c.phase {
                Phase::InFlight { joined, probation } => Some((c.id, joined, probation)),
                _ => None,
            })
            .collect();
        let on_probation = matches!(reply, Reply::Upgraded { .. }) && self.probation.is_some();
        for (id, joined, probation) in waiting {
            let r = if joined {
                reply.clone().joined()
            } else {
                reply.clone()
            };
            if probation && on_probation {
                if let Some(c) = self.clients.iter_mut().find(|c| c.id == id) {
                    c.phase = Phase::Probation {
                        reply: r,
                        since_unix_ms: ctl::unix_ms(),
                    };
                }
                continue;
            }
            self.answer_client(id, &r);
        }
    }

    /// The service stops: no upgrade will start; one in flight is
    /// abandoned (`in_flight`).
    pub(super) fn ctl_stopping(&mut self, in_flight: bool) {
        let refused = Reply::Refused {
            error: "the service is stopping".to_owned(),
        };
        self.ctl_probation_over(None);
        for id in self.client_ids(|c| matches!(c.phase, Phase::Pending { .. })) {
            self.answer_client(id, &refused);
        }
        if in_flight
            && self
                .clients
                .iter()
                .any(|c| matches!(c.phase, Phase::InFlight { .. }))
        {
            let failed = Reply::Failed {
                joined: false,
                failure: ctl::Failure::Stopped,
                error: "the service began to stop during the upgrade".to_owned(),
                new_pid: None,
                duration_ms: self
                    .upgrade_started
                    .map_or(0, |t| super::millis(t.elapsed())),
            };
            let generation = self.generation;
            self.ctl_upgrade_ended(&failed, generation);
        }
    }

    /// The probation that connections wait for is over: served (`None`,
    /// or cut short), or ended by the rollback of generation `pid`
    /// (`what`).
    pub(super) fn ctl_probation_over(&mut self, rollback: Option<(u32, String)>) {
        let waiting: Vec<(u64, Reply, u64)> = self
            .clients
            .iter()
            .filter_map(|c| match &c.phase {
                Phase::Probation {
                    reply,
                    since_unix_ms,
                } => Some((c.id, reply.clone(), *since_unix_ms)),
                _ => None,
            })
            .collect();
        for (id, reply, since) in waiting {
            let joined = matches!(reply, Reply::Upgraded { joined: true, .. });
            let answer = match &rollback {
                Some((pid, what)) => Reply::rolled_back(*pid, what.clone(), joined),
                None => reply.after_probation(ctl::unix_ms().saturating_sub(since)),
            };
            self.answer_client(id, &answer);
        }
    }

    /// Connections that did not send their request in time are answered
    /// and closed.
    pub(super) fn ctl_timeouts(&mut self, now: Instant) {
        for id in self.client_ids(|c| c.phase == Phase::Reading && c.deadline <= now) {
            let r = Reply::BadRequest {
                error: format!("no request within {REQUEST_TIMEOUT:?}"),
            };
            self.answer_client(id, &r);
        }
    }

    /// The connections that `pred` picks (by id: answering one removes it).
    fn client_ids(&self, pred: impl Fn(&Client) -> bool) -> Vec<u64> {
        self.clients
            .iter()
            .filter(|c| pred(c))
            .map(|c| c.id)
            .collect()
    }

    fn answer_client(&mut self, id: u64, reply: &Reply) {
        if let Some(i) = self.clients.iter().position(|c| c.id == id) {
            let c = self.clients.remove(i);
            write_reply(&c.fd, reply);
        }
    }

    fn ctl_status(&self) -> ctl::Status {
        let serving = self.serving();
        let state = if self.stop_deadline.is_some() {
            "stopping"
        } else if self.lame_duck_until.is_some() {
            "stopping (lame duck)"
        } else if self.upgrade_started.is_some() {
            "upgrading"
        } else if serving.is_some() {
            "serving"
        } else {
            "starting"
        };
        let me = std::process::id();
        let mut pids = vec![me];
        pids.extend(self.gens.iter().map(|g| g.pid));
        ctl::Status {
            mode: "supervised".to_owned(),
            state: state.to_owned(),
            generation: serving.map_or(0, |g| g.number),
            pid: serving.map_or(0, |g| g.pid),
            supervisor_pid: Some(me),
            pids,
            uptime_ms: crate::sys::process_uptime_ms().unwrap_or(0),
            last_upgrade: self.last_upgrade.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_named_from_the_supervisors_reasons() {
        use ctl::Failure;
        assert_eq!(
            failure_of(0, "could not be started: x", false),
            Failure::Spawn
        );
        assert_eq!(
            failure_of(5, "was not ready within 1s; it was killed", false),
            Failure::Timeout
        );
        assert_eq!(
            failure_of(5, "exited with status 1", false),
            Failure::Exited
        );
        assert_eq!(
            failure_of(5, "was killed by SIGSEGV", false),
            Failure::Killed
        );
        assert_eq!(
            failure_of(5, "exited with status 1", true),
            Failure::Stopped
        );
        assert_eq!(
            failure_of(
                5,
                "it sent 2 socket descriptions with 1 fds; it was killed",
                false
            ),
            Failure::Other
        );
    }
}
