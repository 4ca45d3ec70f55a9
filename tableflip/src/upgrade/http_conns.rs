//! The channel of each upgrade on which idle HTTP connections are handed
//! to the next generation ([`crate::http::handoff`]): made when the
//! upgrade starts, put to use when the next generation takes over.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{Upgrader, lock};
use crate::fds::Handover;
use crate::http::handoff::{self, Predecessor, Slot, Successor};
use crate::sys;

/// The channel made for one upgrade: the next generation's end, registered
/// to be handed on as long as this lives, and this process's.
pub(super) struct Staged {
    _theirs: Handover<socket2::Socket>,
    mine: Option<OwnedFd>,
}

impl Upgrader {
    /// At the start of an upgrade: makes the channel, if a server of this
    /// process hands idle connections over. Without it (none does, or no
    /// fd left), the drain closes idle connections as before.
    pub(super) fn stage_http_conns(&self) -> Option<Staged> {
        if !lock(&self.inner.http_conns).hands_over {
            return None;
        }
        let warn = |e: &dyn std::fmt::Display| {
            tracing::warn!(
                error = %e,
                "upgrade: no channel to hand idle connections over; the drain closes them"
            );
        };
        let (mine, theirs) = match sys::seqpacket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                warn(&e);
                return None;
            }
        };
        match self
            .inner
            .fds
            .add_conn(handoff::CHANNEL, socket2::Socket::from(theirs))
        {
            Ok(guard) => Some(Staged {
                _theirs: guard,
                mine: Some(mine),
            }),
            Err(e) => {
                warn(&crate::report::chain(&e));
                None
            }
        }
    }

    /// Replace mode: the next generation has taken over; idle connections
    /// go to it. (Without this, a failed upgrade's channel closes with
    /// `staged`.)
    pub(super) fn commit_http_conns(&self, staged: Option<&mut Staged>) {
        if let Some(fd) = staged.and_then(|s| s.mine.take()) {
            lock(&self.inner.http_conns).successor = Slot::Fd(fd);
        }
    }

    /// Supervised mode: keeps this process's end until the supervisor says
    /// whether the next generation took over (a later upgrade's replaces
    /// it); the next generation's end is closed with `staged`, sent.
    pub(super) fn keep_http_conns(&self, staged: Option<Staged>) {
        if let Some(fd) = staged.and_then(|mut s| s.mine.take()) {
            lock(&self.inner.http_conns).staged = Some(fd);
        }
    }

    /// Supervised mode: the next generation has taken over.
    pub(super) fn commit_kept_http_conns(&self) {
        let mut ends = lock(&self.inner.http_conns);
        if let Some(fd) = ends.staged.take() {
            ends.successor = Slot::Fd(fd);
        }
    }

    /// At readiness: the channel from the previous generation starts being
    /// read, on the tokio runtime current here (it closes when the previous
    /// generation exits). Without a runtime, it is closed: nothing could
    /// serve what comes on it.
    pub(super) fn start_http_predecessor(&self) {
        let mut ends = lock(&self.inner.http_conns);
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = Predecessor::start(&mut ends.predecessor);
        } else {
            ends.predecessor = Slot::None;
        }
    }

    /// Once the parent has exited: its channel is closed (its reader
    /// sees the end at once; waited for up to 1 s).
    pub(super) async fn http_predecessor_closed(&self) {
        let running = {
            let mut ends = lock(&self.inner.http_conns);
            match &ends.predecessor {
                Slot::Running(p) => Some(Arc::clone(p)),
                _ => {
                    ends.predecessor = Slot::None;
                    None
                }
            }
        };
        if let Some(p) = running {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), p.closed()).await;
        }
    }

    /// How many idle HTTP connections this process handed to the
    /// generation that took over.
    pub(crate) fn http_conns_handed_over(&self) -> u64 {
        match &lock(&self.inner.http_conns).successor {
            Slot::Running(s) => s.handed_over(),
            _ => 0,
        }
    }

    /// A server of this process hands its idle connections over: the next
    /// upgrade makes a channel for them.
    pub(crate) fn hand_http_conns_over(&self) {
        lock(&self.inner.http_conns).hands_over = true;
    }

    /// The channel to the generation that took over, if any (started on
    /// the current tokio runtime on first use).
    pub(crate) fn http_successor(&self) -> Option<Arc<Successor>> {
        Successor::start(&mut lock(&self.inner.http_conns).successor)
    }

    /// The channel from the generation this one replaced, if any (started
    /// on the current tokio runtime on first use: a server may start
    /// before readiness).
    pub(crate) fn http_predecessor(&self) -> Option<Arc<Predecessor>> {
        Predecessor::start(&mut lock(&self.inner.http_conns).predecessor)
    }
}
