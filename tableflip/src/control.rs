//! The control channel between the supervisor and each generation it
//! starts (supervised mode): a connected pair of Unix `SOCK_SEQPACKET`
//! sockets, one JSON message per packet, listening sockets attached with
//! `SCM_RIGHTS`. It is private to one build pair's runtime (both ends are
//! this crate), but versioned like the handover: unknown fields are
//! ignored, and an unknown message is logged and skipped.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::protocol::EntryMeta;
use crate::sys;

/// The largest control packet (a chunk of listener metadata fits easily).
pub(crate) const MAX_PACKET: usize = 256 * 1024;

/// From a generation to its supervisor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToSupervisor {
    /// Sockets the generation serves on, with their fds attached in the
    /// same order. Sent in chunks before [`Ready`](Self::Ready); each
    /// entry's `fd` is the generation's own number (informative only).
    Listeners { entries: Vec<EntryMeta> },
    /// The generation is initialised; the listeners sent before this are
    /// every socket it serves on (those it was handed and did not claim are
    /// gone from the set). This commits the handover.
    Ready {
        pid: u32,
        /// The newest version of the supervisor's carried state that the
        /// generation's binary reads: the supervisor re-executes itself
        /// into that binary only if it can read what it would carry. 0
        /// (absent) from a binary that cannot.
        #[serde(default)]
        state_version: u32,
        /// The generation answers [`ToGeneration::Collect`]. `false`
        /// (absent) from a binary that predates it: it is not asked.
        #[serde(default)]
        hands_on: bool,
    },
    /// The answer to [`ToGeneration::Collect`]: connections and files the
    /// generation hands on, with their fds attached in the same order, in
    /// as many packets as the fds need; the last one has `done` set (and
    /// may carry none). `id`: the request's.
    HandedOn {
        id: u64,
        entries: Vec<EntryMeta>,
        done: bool,
        /// With `done`: the generation cannot hand its application state
        /// over (why); the upgrade fails. Absent from a build that
        /// predates it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The generation is calling its application-state sources: the
        /// supervisor waits for them up to the upgrade timeout (not the
        /// shorter collect timeout), and fails the upgrade if they do not
        /// finish. Absent from a build that predates it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        state: bool,
    },
    /// A request to upgrade the service (the generation got `SIGHUP`, or
    /// its code called `Upgrader::upgrade`). `id` 0 wants no answer.
    Upgrade { id: u64 },
}

/// From the supervisor to one generation.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToGeneration {
    /// Stop accepting, finish what is in flight, exit: a newer generation
    /// has taken over (`successor`), or the service stops (none).
    Drain { successor: Option<u32> },
    /// Upgrade `id` succeeded: generation `generation`, `pid`, serves.
    Upgraded { id: u64, pid: u32, generation: u64 },
    /// Upgrade `id` failed, or was refused; the asker keeps serving.
    UpgradeFailed { id: u64, error: String },
    /// An upgrade starts: send the connections and files to hand on to the
    /// next generation ([`ToSupervisor::HandedOn`], with this `id`: an
    /// answer to an earlier request that timed out is told apart).
    Collect { id: u64 },
    /// A measurement for the generation to record through the `metrics`
    /// facade (the supervisor has no exporter; see [`crate::metrics`]).
    Metric { metric: crate::metrics::Metric },
}

/// Sends `message` with `fds` attached.
pub(crate) fn send<M: Serialize>(
    socket: BorrowedFd<'_>,
    message: &M,
    fds: &[BorrowedFd<'_>],
    dont_wait: bool,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    sys::send_packet(socket, &bytes, fds, dont_wait)
}

/// A message received, with the fds attached to it.
pub(crate) enum Received<M> {
    Message(M, Vec<OwnedFd>),
    /// A packet this build does not understand (a newer peer); its fds
    /// are closed.
    Unknown(String),
}

/// Receives one message: `Ok(None)` at EOF.
pub(crate) fn recv<M: for<'de> Deserialize<'de>>(
    socket: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Received<M>>> {
    if buf.len() < MAX_PACKET {
        // Zeroed by the allocator (fresh pages from the kernel for this
        // size), not by writing: only the pages a packet fills become
        // resident, where `resize` would touch all 256 KiB.
        *buf = vec![0; MAX_PACKET];
    }
    let Some((len, fds)) = sys::recv_packet(socket.as_fd(), buf, false)? else {
        return Ok(None);
    };
    let bytes = &buf[..len];
    Ok(Some(match serde_json::from_slice(bytes) {
        Ok(m) => Received::Message(m, fds),
        Err(e) => Received::Unknown(format!(
            "{e}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_over_a_socket_pair_with_fds() {
        let Ok((a, b)) = sys::seqpacket_pair() else {
            panic!("no socket pair");
        };
        let Ok((r, _w)) = sys::pipe_cloexec() else {
            panic!("no pipe");
        };
        let msg = ToSupervisor::Upgrade { id: 7 };
        assert!(send(a.as_fd(), &msg, &[r.as_fd()], false).is_ok());
        let mut buf = Vec::new();
        match recv::<ToSupervisor>(b.as_fd(), &mut buf) {
            Ok(Some(Received::Message(ToSupervisor::Upgrade { id: 7 }, fds))) => {
                assert_eq!(fds.len(), 1);
            }
            _ => panic!("wrong message"),
        }
        drop(a);
        assert!(matches!(
            recv::<ToSupervisor>(b.as_fd(), &mut buf),
            Ok(None)
        ));
    }

    #[test]
    fn unknown_messages_are_reported_not_fatal() {
        let Ok((a, b)) = sys::seqpacket_pair() else {
            panic!("no socket pair");
        };
        assert!(sys::send_packet(a.as_fd(), br#"{"type":"from_the_future"}"#, &[], false).is_ok());
        let mut buf = Vec::new();
        assert!(matches!(
            recv::<ToGeneration>(b.as_fd(), &mut buf),
            Ok(Some(Received::Unknown(_)))
        ));
    }

    #[test]
    fn a_ready_without_a_state_version_reads_as_zero() {
        // What a binary that cannot read the supervisor's state sends.
        let old: ToSupervisor = match serde_json::from_str(r#"{"type":"ready","pid":42}"#) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(
            old,
            ToSupervisor::Ready {
                pid: 42,
                state_version: 0,
                hands_on: false
            }
        ));
    }
}
