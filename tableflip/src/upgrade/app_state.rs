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
    /// Registers the state `name` that this generation hands the next
    /// one: `source` is called once per upgrade, when the upgrade starts
    /// (before the next generation is started), and what it returns
    /// reaches the next generation's
    /// [`inherited_state(name)`](Self::inherited_state). Registering a
    /// name again replaces its source. Several names (a cache, a library's
    /// keys) are handed over side by side.
    ///
    /// The state is a snapshot: this generation goes on serving (and
    /// changing its state) until the next one is ready, and what changes
    /// after the call is not handed over. A counter or a cache loses at
    /// most what happened during the upgrade.
    ///
    /// `source` runs on the task or thread that runs the upgrade: keep it
    /// to a serialization. In supervised mode it runs on the thread that
    /// reads the supervisor's messages (which wait meanwhile), and the
    /// supervisor waits for it up to the upgrade timeout: if it has not
    /// returned by then, the upgrade fails. In replace mode it is also called for
    /// a rollback (the previous binary started again after the new one
    /// died during its probation), by the old generation, which rolls
    /// back. A generation the supervisor starts without an upgrade (a
    /// supervised rollback, or the replacement of a generation that died)
    /// starts without state: the generation that had it is gone.
    ///
    /// # Errors
    ///
    /// [`Error::State`] if `name` is not 1 to [`state::MAX_NAME`] ASCII
    /// letters, digits, `-` and `_`, or starts with `tableflip` (the
    /// crate's own).
    ///
    /// # Errors of the upgrade
    ///
    /// If `source` fails or panics, or returns more than [`state::MAX_FDS`] fds, or
    /// a socket among them, the upgrade fails with [`Error::State`] (the
    /// serving generation keeps serving, with its state), and the
    /// control socket's answer says so.
    pub fn hand_over_state<F>(&self, name: &str, source: F) -> Result<()>
    where
        F: Fn() -> std::io::Result<State> + Send + Sync + 'static,
    {
        state::check_name(name, false)?;
        self.register_state(name, state::Source(Arc::new(source)));
        Ok(())
    }

    /// As [`hand_over_state`](Self::hand_over_state), for the crate's own
    /// states (names starting with `tableflip`).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn register_state(&self, name: &str, source: state::Source) {
        lock(&self.inner.state_sources).insert(name.to_owned(), source);
    }

    /// The state `name` the previous generation handed over (see
    /// [`hand_over_state`](Self::hand_over_state)), taken: a second call
    /// returns `None`. Call it during init: state not taken by readiness is
    /// closed then.
    ///
    /// `None` for the first generation, and after a generation that
    /// registered no source of that name (or runs a build of tableflip
    /// without state handover).
    ///
    /// # Errors
    ///
    /// [`Error::State`] for a name [`hand_over_state`](Self::hand_over_state)
    /// refuses, or when what arrived is not what a source wrote: a wrong
    /// magic, an unknown format (a newer build handed it over), a length
    /// or checksum that does not match, a memfd that is not sealed, fds
    /// missing. The application decides: start empty (what a cache would
    /// do) or fail its init (the upgrade then fails, and the previous
    /// generation, which still has its state, keeps serving).
    pub fn inherited_state(&self, name: &str) -> Result<Option<State>> {
        state::check_name(name, false)?;
        self.take_state(name)
    }

    /// As [`inherited_state`](Self::inherited_state), for the crate's own
    /// states.
    pub(crate) fn take_state(&self, name: &str) -> Result<Option<State>> {
        let fds = &self.inner.fds;
        let Some(memfd) = fds.file::<File>(&state::memfd_name(name))? else {
            return Ok(None);
        };
        let memfd = memfd.into_inner();
        let (state, count) = state::read(&memfd)?;
        let mut extra: Vec<std::os::fd::OwnedFd> = Vec::with_capacity(count);
        for i in 0..count {
            let entry = state::fd_name(name, i);
            match fds.file::<File>(&entry)? {
                Some(file) => extra.push(file.into_inner().into()),
                None => {
                    return Err(Error::State {
                        reason: format!(
                            "the state handed over is corrupt: it announces {count} fds, and {entry:?} is missing"
                        ),
                    });
                }
            }
        }
        tracing::info!(
            state = name,
            bytes = state.bytes().len(),
            fds = count,
            "took the state the previous generation handed over"
        );
        Ok(Some(extra.into_iter().fold(state, State::with_fd)))
    }

    /// Whether a state source is registered.
    pub(super) fn has_state_sources(&self) -> bool {
        !lock(&self.inner.state_sources).is_empty()
    }

    /// At the start of an upgrade: calls every source, and registers their
    /// states to be handed on. The entries stay registered as long as the
    /// returned guards live: until the next generation has its copies.
    pub(super) fn stage_state(&self) -> Result<Vec<Handover<File>>> {
        // Nothing to stage is the common case: no walk of the registry on
        // the upgrade path. (No state entry is left from before: what an
        // earlier generation handed over and this one did not take was
        // closed at readiness, and what an earlier upgrade staged is
        // unregistered when its guards drop.)
        if !self.has_state_sources() {
            return Ok(Vec::new());
        }
        let fds = &self.inner.fds;
        let sources: Vec<(String, state::Source)> = lock(&self.inner.state_sources)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let mut staged = Vec::new();
        for (name, source) in sources {
            let started = std::time::Instant::now();
            // A panicking source fails the upgrade like a failing one: it
            // runs on the task that runs upgrades, or (supervised) on the
            // thread that reads the supervisor's messages, neither of
            // which may die.
            let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (source.0)()))
                .map_err(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Error::State {
                        reason: format!("the source of the state {name:?} panicked: {what}"),
                    }
                })?;
            let (bytes, extra) = called
                .map_err(|e| Error::State {
                    reason: format!("the source of the state {name:?} failed: {e}"),
                })?
                .into_parts();
            if extra.len() > state::MAX_FDS {
                return Err(Error::State {
                    reason: format!(
                        "the state {name:?} has {} fds, more than {}",
                        extra.len(),
                        state::MAX_FDS
                    ),
                });
            }
            let memfd = state::write(&bytes, extra.len())?;
            staged.push(fds.add_file(&state::memfd_name(&name), memfd)?);
            let count = extra.len();
            for (i, fd) in extra.into_iter().enumerate() {
                let file = fds
                    .add_file(&state::fd_name(&name, i), File::from(fd))
                    .map_err(|e| Error::State {
                        reason: format!("fd {i} of the state {name:?} cannot be handed on: {e}"),
                    })?;
                staged.push(file);
            }
            tracing::info!(
                state = %name,
                bytes = bytes.len(),
                fds = count,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "upgrade: state staged for the next generation"
            );
        }
        Ok(staged)
    }
}
