//! The channel of each upgrade on which idle HTTP connections are handed
//! to the next generation ([`crate::http::handoff`]): made when the
//! upgrade starts, put to use when the next generation takes over.

use std::sync::Arc;

use super::{Upgrader, lock};
use crate::fds::Handover;
use crate::http::handoff::{self, Predecessor, Slot, Successor};
use crate::sys;

impl Upgrader {
    /// At the start of an upgrade: makes the channel, and registers the
    /// next generation's end to be handed on with the rest (as long as the
    /// guard lives: until the next generation has its copy). Without it
    /// (no fd left), the drain closes idle connections as before.
    pub(super) fn stage_http_conns(&self) -> Option<Handover<socket2::Socket>> {
        let (mine, theirs) = match sys::seqpacket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "upgrade: no channel to hand idle connections over; the drain closes them"
                );
                return None;
            }
        };
        let guard = match self
            .inner
            .fds
            .add_conn(handoff::CHANNEL, socket2::Socket::from(theirs))
        {
            Ok(guard) => guard,
            Err(e) => {
                tracing::warn!(
                    error = %crate::report::chain(&e),
                    "upgrade: no channel to hand idle connections over; the drain closes them"
                );
                return None;
            }
        };
        lock(&self.inner.http_conns).staged = Some(mine);
        Some(guard)
    }

    /// The next generation has taken over: idle connections go to it.
    pub(super) fn commit_http_conns(&self) {
        let mut ends = lock(&self.inner.http_conns);
        if let Some(fd) = ends.staged.take() {
            ends.successor = Slot::Fd(fd);
        }
    }

    /// The channel to the generation that took over, if any (started on
    /// the current tokio runtime on first use).
    pub(crate) fn http_successor(&self) -> Option<Arc<Successor>> {
        Successor::start(&mut lock(&self.inner.http_conns).successor)
    }

    /// The channel from the generation this one replaced, if any.
    pub(crate) fn http_predecessor(&self) -> Option<Arc<Predecessor>> {
        Predecessor::start(&mut lock(&self.inner.http_conns).predecessor)
    }
}
