//! A generation of a supervised service, as its upgrader sees it: it
//! reports its sockets and its readiness to the supervisor, asks the
//! supervisor for upgrades, and drains when the supervisor says so (or
//! when the supervisor is gone).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{Inner, Upgrader, lock};
use crate::control::{self, Received, ToGeneration, ToSupervisor};
use crate::error::{Error, Result};
use crate::protocol::SupervisorLink;
use crate::report::chain;
use crate::sys;

type Answer = std::result::Result<(u32, u64), String>;

/// The supervisor, from a generation.
#[derive(Debug)]
pub(super) struct Supervised {
    pub(super) pid: u32,
    control: Arc<OwnedFd>,
    next_id: AtomicU64,
    /// Upgrade requests waiting for their answer.
    waiting: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Answer>>>,
}

impl Supervised {
    pub(super) fn new(link: SupervisorLink) -> Supervised {
        Supervised {
            pid: link.pid,
            control: Arc::new(link.control),
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    fn send(&self, msg: &ToSupervisor, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        control::send(self.control.as_fd(), msg, fds, false)
    }

    fn answer(&self, id: u64, answer: Answer) {
        if let Some(tx) = lock(&self.waiting).remove(&id) {
            let _ = tx.send(answer);
        }
    }

    fn fail_all(&self, why: &str) {
        for (_, tx) in lock(&self.waiting).drain() {
            let _ = tx.send(Err(why.to_owned()));
        }
    }
}

/// Starts the thread that reads the supervisor's messages.
pub(super) fn watch(inner: &Arc<Inner>) -> Result<()> {
    let Some(sup) = &inner.supervised else {
        return Ok(());
    };
    let control = Arc::clone(&sup.control);
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let pid = sup.pid;
    std::thread::Builder::new()
        .name("tableflip-control".into())
        .spawn(move || read_messages(&control, &weak, pid))
        .map(|_| ())
        .map_err(|e| {
            Error::io(
                "cannot start the thread that reads the supervisor's messages",
                e,
            )
        })
}

fn read_messages(control: &OwnedFd, weak: &Weak<Inner>, pid: u32) {
    let mut buf = Vec::new();
    loop {
        let received = control::recv::<ToGeneration>(control.as_fd(), &mut buf);
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let upgrader = Upgrader { inner };
        let Some(sup) = &upgrader.inner.supervised else {
            return;
        };
        match received {
            Ok(Some(Received::Message(msg, _))) => match msg {
                ToGeneration::Drain { successor } => {
                    match successor {
                        Some(next) => {
                            tracing::info!(
                                successor_pid = next,
                                "the supervisor says a new generation (pid {next}) has taken over: draining"
                            );
                            #[cfg(feature = "http")]
                            upgrader.commit_kept_http_conns();
                        }
                        None => tracing::info!("the supervisor says the service stops: draining"),
                    }
                    upgrader.stop();
                }
                ToGeneration::Upgraded {
                    id,
                    pid: new,
                    generation,
                } => sup.answer(id, Ok((new, generation))),
                ToGeneration::UpgradeFailed { id, error } => sup.answer(id, Err(error)),
                ToGeneration::Metric { metric } => crate::metrics::record(&metric),
                ToGeneration::Collect { id } => {
                    match upgrader.hand_on_to_supervisor(sup, id) {
                        Ok(()) => {}
                        Err(e @ Error::State { .. }) => {
                            tracing::error!(error = %chain(&e), "upgrade: the application state cannot be handed over; the upgrade fails");
                        }
                        // The supervisor goes on without them when the
                        // answer does not come.
                        Err(e) => {
                            tracing::warn!(error = %chain(&e), "upgrade: cannot hand this generation's connections and files to the supervisor; the next generation starts without them");
                        }
                    }
                }
            },
            Ok(Some(Received::Unknown(what))) => {
                tracing::debug!(message = %what, "ignoring a message from the supervisor that this build does not understand");
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "dropped a message from the supervisor");
            }
            Ok(None) | Err(_) => {
                if !upgrader.is_exiting() {
                    tracing::warn!(
                        supervisor_pid = pid,
                        "the supervisor (pid {pid}) has exited: this generation drains and exits, so that the service can be started again"
                    );
                }
                sup.fail_all("the supervisor has exited");
                upgrader.stop();
                return;
            }
        }
    }
}

impl Upgrader {
    /// The supervisor's PID, in a generation of a supervised service
    /// (see [`Mode::Supervised`](crate::Mode::Supervised)): the process to
    /// signal, which stays for the life of the service. `None` in replace
    /// mode.
    pub fn supervisor_pid(&self) -> Option<u32> {
        self.inner.supervised.as_ref().map(|s| s.pid)
    }

    /// Supervised mode: tells the supervisor which sockets this generation
    /// serves on, then that it is ready (which commits the handover).
    pub(super) fn report_ready(&self, sup: &Supervised) -> Result<()> {
        let failed = |e| {
            Error::io(
                "cannot tell the supervisor that this generation is ready",
                e,
            )
        };
        {
            let snapshot = self.inner.fds.snapshot()?;
            let sockets = snapshot.sockets();
            for chunk in sockets.chunks(sys::MAX_FDS_PER_PACKET) {
                let entries = chunk.iter().map(|(m, _)| (*m).clone()).collect();
                let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
                sup.send(&ToSupervisor::Listeners { entries }, &fds)
                    .map_err(failed)?;
            }
        }
        // Back to one fd per listener: the supervisor holds the copies.
        self.inner.fds.release_copies();
        sup.send(
            &ToSupervisor::Ready {
                pid: std::process::id(),
                state_version: crate::supervisor::STATE_VERSION,
                hands_on: true,
            },
            &[],
        )
        .map_err(failed)
    }

    /// Supervised mode, before an upgrade: sends the supervisor the
    /// connections and files this generation hands on, for the next one.
    /// Runs on the thread that reads the supervisor's messages, so a busy
    /// or stuck runtime does not hold the upgrade up.
    fn hand_on_to_supervisor(&self, sup: &Supervised, id: u64) -> Result<()> {
        let failed = |e| Error::io("cannot send connections and files to the supervisor", e);
        // The application's state first: if it cannot be handed over, the
        // upgrade fails (the supervisor is told) rather than losing it.
        if self.has_state_sources() {
            // The sources may take longer than the collect timeout: the
            // supervisor is told to wait for them (up to the upgrade
            // timeout) rather than start the next generation without them.
            sup.send(
                &ToSupervisor::HandedOn {
                    id,
                    entries: Vec::new(),
                    done: false,
                    error: None,
                    state: true,
                },
                &[],
            )
            .map_err(failed)?;
        }
        // The channel idle HTTP connections are handed over on, sent
        // with the rest; the supervisor passes it to the next generation.
        #[cfg(feature = "http")]
        let conns = self.stage_http_conns();
        let staged = self.stage_state();
        let state_error = staged.as_ref().err().map(|e| chain(e));
        let sent = (|| {
            if staged.is_err() {
                return Ok(());
            }
            let snapshot = self.inner.fds.snapshot()?;
            let handed = snapshot.handed_on();
            for chunk in handed.chunks(sys::MAX_FDS_PER_PACKET) {
                let entries = chunk.iter().map(|(m, _)| (*m).clone()).collect();
                let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
                sup.send(
                    &ToSupervisor::HandedOn {
                        id,
                        entries,
                        done: false,
                        error: None,
                        state: false,
                    },
                    &fds,
                )
                .map_err(failed)?;
            }
            if !handed.is_empty() {
                tracing::info!(
                    handed_on = handed.len(),
                    "upgrade: connections and files sent to the supervisor for the next generation"
                );
            }
            Ok(())
        })();
        // The copies made of the listeners are not needed: the supervisor
        // holds its own.
        self.inner.fds.release_copies();
        #[cfg(feature = "http")]
        self.keep_http_conns(conns);
        let staged = staged.map(drop);
        let done = sup
            .send(
                &ToSupervisor::HandedOn {
                    id,
                    entries: Vec::new(),
                    done: true,
                    error: state_error,
                    state: false,
                },
                &[],
            )
            .map_err(failed);
        staged.and(sent).and(done)
    }

    /// Supervised mode: asks the supervisor for an upgrade, without
    /// waiting for it (what `SIGHUP` to a generation does).
    pub(crate) fn ask_supervisor_to_upgrade(&self) -> Result<()> {
        let Some(sup) = &self.inner.supervised else {
            return Err(Error::NotSupported);
        };
        sup.send(&ToSupervisor::Upgrade { id: 0 }, &[])
            .map_err(|e| Error::io("cannot ask the supervisor for an upgrade", e))
    }

    /// Supervised mode's [`upgrade`](Self::upgrade): the supervisor runs
    /// it; this resolves with the new generation's PID.
    pub(super) async fn upgrade_through_supervisor(&self, sup: &Supervised) -> Result<u32> {
        if !self.is_ready() {
            return Err(Error::NotReady);
        }
        if self.is_exiting() {
            return Err(Error::Stopped);
        }
        let id = sup.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&sup.waiting).insert(id, tx);
        if let Err(e) = sup.send(&ToSupervisor::Upgrade { id }, &[]) {
            lock(&sup.waiting).remove(&id);
            return Err(Error::io("cannot ask the supervisor for an upgrade", e));
        }
        match rx.await {
            Ok(Ok((pid, generation))) => {
                tracing::info!(
                    child_pid = pid,
                    generation,
                    "upgrade: the supervisor's new generation is ready"
                );
                Ok(pid)
            }
            Ok(Err(reason)) => Err(Error::UpgradeFailed { reason }),
            Err(_) => Err(Error::UpgradeFailed {
                reason: "the supervisor did not answer".to_owned(),
            }),
        }
    }
}
