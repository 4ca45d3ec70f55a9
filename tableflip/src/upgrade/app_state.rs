//! Application state across an upgrade: the serving generation's source,
//! called when an upgrade starts, and the next generation's read. The
//! format is in [`crate::state`].

use std::fs::File;
use std::sync::Arc;

use super::{Upgrader, lock};
use crate::error::{Error, Result};
use crate::fds::Handover;
use crate::state::{self, State};

impl Upgrader {
    /// Registers what this generation hands the next one: `source` is
    /// called once per upgrade, when the upgrade starts (before the next
    /// generation is started), and what it returns reaches the next
    /// generation's [`inherited_state`](Self::inherited_state). A second
    /// call replaces the source.
    ///
    /// The state is a snapshot: this generation goes on serving (and
    /// changing its state) until the next one is ready, and what changes
    /// after the call is not handed over. A counter or a cache loses at
    /// most what happened during the upgrade.
    ///
    /// `source` runs on the task or thread that runs the upgrade: keep it
    /// to a serialization. In supervised mode the supervisor waits for it
    /// at most 5 s (or the upgrade timeout, if shorter), then starts the
    /// next generation without it. It is also called for a rollback (the
    /// previous binary started again after the new one died during its
    /// probation), by the generation that rolls back.
    ///
    /// # Errors of the upgrade
    ///
    /// If `source` fails, or returns more than [`state::MAX_FDS`] fds, or
    /// a socket among them, the upgrade fails with [`Error::State`] (the
    /// serving generation keeps serving, with its state), and the
    /// control socket's answer says so.
    pub fn hand_over_state<F>(&self, source: F)
    where
        F: Fn() -> std::io::Result<State> + Send + Sync + 'static,
    {
        *lock(&self.inner.state_source) = Some(state::Source(Arc::new(source)));
    }

    /// The state the previous generation handed over (see
    /// [`hand_over_state`](Self::hand_over_state)), taken: a second call
    /// returns `None`. Call it during init: state not taken by readiness is
    /// closed then.
    ///
    /// `None` for the first generation, and after a generation that
    /// registered no source (or runs a build of tableflip without it).
    ///
    /// # Errors
    ///
    /// [`Error::State`] when what arrived is not what a source wrote: a
    /// wrong magic, an unknown format (a newer build handed it over), a
    /// length or checksum that does not match, fds missing. The
    /// application decides: start empty (what a cache would do) or fail
    /// its init (the upgrade then fails, and the previous generation,
    /// which still has its state, keeps serving).
    pub fn inherited_state(&self) -> Result<Option<State>> {
        let fds = &self.inner.fds;
        let Some(memfd) = fds.file::<File>(state::NAME)? else {
            return Ok(None);
        };
        let memfd = memfd.into_inner();
        let (state, count) = state::read(&memfd)?;
        let mut extra: Vec<std::os::fd::OwnedFd> = Vec::with_capacity(count);
        for i in 0..count {
            let name = state::fd_name(i);
            match fds.file::<File>(&name)? {
                Some(file) => extra.push(file.into_inner().into()),
                None => {
                    return Err(Error::State {
                        reason: format!(
                            "the state handed over is corrupt: it announces {count} fds, and {name:?} is missing"
                        ),
                    });
                }
            }
        }
        tracing::info!(
            bytes = state.bytes().len(),
            fds = count,
            "took the state the previous generation handed over"
        );
        Ok(Some(extra.into_iter().fold(state, State::with_fd)))
    }

    /// At the start of an upgrade: calls the source, if any, and registers
    /// its state to be handed on. The entries stay registered as long as
    /// the returned guards live: until the next generation has its copies.
    pub(super) fn stage_state(&self) -> Result<Vec<Handover<File>>> {
        let Some(source) = lock(&self.inner.state_source).clone() else {
            return Ok(Vec::new());
        };
        let started = std::time::Instant::now();
        let (bytes, extra) = (source.0)()
            .map_err(|e| Error::State {
                reason: format!("the application's state source failed: {e}"),
            })?
            .into_parts();
        if extra.len() > state::MAX_FDS {
            return Err(Error::State {
                reason: format!(
                    "the state has {} fds, more than {}",
                    extra.len(),
                    state::MAX_FDS
                ),
            });
        }
        let fds = &self.inner.fds;
        // What an earlier generation handed over and this one did not
        // take is replaced.
        for name in fds.names() {
            if name == state::NAME || name.starts_with(&format!("{}.fd.", state::NAME)) {
                fds.remove(&name);
            }
        }
        let memfd = state::write(&bytes, extra.len())?;
        let mut staged = Vec::with_capacity(extra.len() + 1);
        staged.push(fds.add_file(state::NAME, memfd)?);
        for (i, fd) in extra.into_iter().enumerate() {
            let name = state::fd_name(i);
            let file = fds
                .add_file(&name, File::from(fd))
                .map_err(|e| Error::State {
                    reason: format!("fd {i} of the state cannot be handed on: {e}"),
                })?;
            staged.push(file);
        }
        tracing::info!(
            bytes = bytes.len(),
            fds = staged.len() - 1,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "upgrade: state staged for the next generation"
        );
        Ok(staged)
    }
}
