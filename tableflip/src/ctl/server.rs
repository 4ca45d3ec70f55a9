//! The control socket in replace mode: served by each generation on its
//! tokio runtime once it is ready, until it exits.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{
    Command, MAX_REQUEST, REQUEST_TIMEOUT, Reply, parse_request, peer_allowed, peer_refused,
};
use crate::error::Error;
use crate::report::chain;
use crate::upgrade::Upgrader;

/// Accepts control connections until the generation exits (after a
/// handover or a stop). Each connection is answered in a task of its own,
/// tracked so that the process does not exit before its answer is written
/// (see [`Upgrader::ctl_settled`]).
pub(crate) async fn serve(upgrader: Upgrader, listener: UnixListener) {
    let exit = upgrader.exit();
    tokio::pin!(exit);
    let tasks = upgrader.ctl_tasks().clone();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(super::MAX_CONNECTIONS));
    let mut stopping = false;
    loop {
        tokio::select! {
            () = &mut exit, if !stopping => {
                if upgrader.successor_pid().is_some() {
                    // Handed over: the new generation answers.
                    break;
                }
                // A stop: answered ("stopping", the status) while the
                // process drains, until it exits.
                stopping = true;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match std::sync::Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        let upgrader = upgrader.clone();
                        tasks.spawn(async move {
                            answer(upgrader, stream).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        tasks.spawn(refuse_busy(stream));
                    }
                },
                Err(e) => {
                    // Out of fds, say: the next accept may work.
                    tracing::warn!(error = %e, "control socket: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::debug!("control socket: no longer answering (this generation exits)");
}

/// More connections than [`super::MAX_CONNECTIONS`]: refused at once.
async fn refuse_busy(mut stream: UnixStream) {
    let reply = Reply::Refused {
        error: format!(
            "too many control connections (at most {}); try again",
            super::MAX_CONNECTIONS
        ),
    };
    let _ = stream.write_all(&reply.to_line()).await;
    let _ = stream.shutdown().await;
}

async fn answer(upgrader: Upgrader, stream: UnixStream) {
    let euid = nix::unistd::geteuid().as_raw();
    let reply = match stream.peer_cred() {
        Ok(cred) if !peer_allowed(cred.uid(), euid) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "control socket: refused a connection from another user"
            );
            Some(peer_refused(cred.uid()))
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot learn who connected; refused");
            Some(Reply::Refused {
                error: format!("permission denied: cannot check the peer's user ({e})"),
            })
        }
    };
    let (read, mut write) = stream.into_split();
    let reply = match reply {
        Some(r) => r,
        None => match read_request(read).await {
            Ok(r) if r.command == Command::Status => Reply::Status(Box::new(upgrader.ctl_status())),
            Ok(r) => {
                let reply = upgrade(&upgrader).await;
                if r.wait_probation {
                    upgrader.ctl_after_probation(reply).await
                } else {
                    reply
                }
            }
            Err(r) => r,
        },
    };
    if let Err(e) = write.write_all(&reply.to_line()).await {
        tracing::debug!(error = %e, "control socket: the client left before the answer");
    }
    let _ = write.shutdown().await;
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<super::Request, Reply> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let got = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    match got {
        Err(_) => Err(Reply::BadRequest {
            error: format!("no request within {REQUEST_TIMEOUT:?}"),
        }),
        Ok(Err(e)) => Err(Reply::BadRequest {
            error: format!("cannot read the request: {e}"),
        }),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => Err(Reply::BadRequest {
            error: format!("the request is longer than {MAX_REQUEST} bytes"),
        }),
        Ok(Ok(_)) => parse_request(&line),
    }
}

use tokio::io::AsyncReadExt as _;

/// `upgrade`: runs an upgrade, or joins the one running, and answers with
/// its outcome.
async fn upgrade(upgrader: &Upgrader) -> Reply {
    let asked = std::time::Instant::now();
    let mut outcomes = upgrader.ctl_outcomes();
    let seen = outcomes.borrow().0;
    if let Some(r) = handed_over(upgrader) {
        return r;
    }
    if !upgrader.upgrading() && upgrader.has_parent() && !upgrader.parent_exited() {
        // The previous generation still drains: one upgrade at a time
        // per service. Its drain timeout bounds the wait.
        tracing::info!(
            parent_pid = upgrader.parent_pid(),
            "control socket: upgrade requested; it starts once the previous generation has finished draining"
        );
        let exit = upgrader.exit();
        tokio::select! {
            () = upgrader.wait_for_parent() => {}
            () = exit => {}
        }
        if let Some(r) = handed_over(upgrader) {
            return r;
        }
    }
    tracing::info!("control socket: upgrade requested");
    match upgrader.upgrade_reporting().await {
        (_, Some(reply)) => reply,
        (Err(Error::UpgradeInProgress { .. }), None) => {
            tracing::info!("control socket: an upgrade is running; the request joins it");
            // An upgrade that started after this request (a SIGHUP's, while
            // this one waited for the previous generation) is this one's
            // too: it starts the binary that was there when it was asked.
            let joined = upgrader.upgrade_started_before(asked);
            match outcomes.wait_for(|(n, _)| *n > seen).await {
                Ok(o) => match o.1.clone() {
                    Some(r) if joined => r.joined(),
                    Some(r) => r,
                    None => Reply::Refused {
                        error: "the upgrade ended without an outcome".to_owned(),
                    },
                },
                Err(_) => Reply::Refused {
                    error: "the service is exiting".to_owned(),
                },
            }
        }
        (Err(Error::AlreadyUpgraded { child_pid }), None) => Reply::Retry {
            error: format!("this generation has handed over to pid {child_pid}; ask again"),
        },
        (Err(Error::Stopped), None) => Reply::Refused {
            error: "the service is stopping".to_owned(),
        },
        (Err(e), None) => Reply::Refused { error: chain(&e) },
        (Ok(pid), None) => Reply::Refused {
            error: format!("the upgrade to pid {pid} ended without an outcome"),
        },
    }
}

/// The reply of a generation that is exiting: `retry` after a handover,
/// `refused` when the service stops.
fn handed_over(upgrader: &Upgrader) -> Option<Reply> {
    if !upgrader.is_exiting() {
        return None;
    }
    Some(match upgrader.successor_pid() {
        Some(pid) => Reply::Retry {
            error: format!("this generation has handed over to pid {pid}; ask again"),
        },
        None => Reply::Refused {
            error: "the service is stopping".to_owned(),
        },
    })
}
