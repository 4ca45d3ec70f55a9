//! The life of one generation, as one state machine: the phases it goes
//! through, and the transitions that are the only way to change phase.
//! Each transition says what the caller must do (the effects), so that the
//! rules live here, and are tested here, rather than spread over flags.
//!
//! ```text
//!             ready           begin_upgrade         end_upgrade(Ok)
//!  Starting ─────────▶ Serving ─────────────▶ Upgrading ─────────────▶ Upgraded
//!     │                  ▲  │                   │   │ end_upgrade(Err)    │
//!     │                  │  │                   │   └──────▶ Serving      │ successor_died
//!     │ stop             │  │ stop              │ stop: waits for the     ▼
//!     ▼                  │  ▼                   │ upgrade, which ends  Serving
//!  Stopped ◀─────────────┴──────────────────────┴─ in Stopped          (replaced)
//! ```

/// Why an upgrade is refused before anything is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `stop()` was called.
    Stopped,
    /// This process handed over already, to this PID.
    AlreadyUpgraded(u32),
    /// Another upgrade runs (its child, once spawned).
    InProgress(Option<u32>),
    /// `ready()` has not succeeded yet.
    NotReady,
    /// This process is PID 1.
    Pid1,
    /// The parent generation (this PID) has not exited yet.
    ParentAlive(u32),
}

/// The phase of this generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Initialising: not ready yet.
    Starting,
    /// Ready and serving, no upgrade in flight.
    Serving,
    /// Ready; an upgrade in flight: its child once spawned, and whether a
    /// stop arrived meanwhile (the upgrade decides how the stop ends: the
    /// handover commits at the child's readiness).
    Upgrading {
        child: Option<u32>,
        stop_requested: bool,
    },
    /// Handed over to `successor`; this process drains.
    Upgraded { successor: u32 },
    /// Stopped for good: whether it had become ready, and the successor
    /// it had handed over to, if any.
    Stopped { ready: bool, successor: Option<u32> },
}

/// What a stop requires of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopEffect {
    /// Nothing: stopped already.
    Nothing,
    /// The service really stops: tell the service manager (if `ready`),
    /// remove its files, close the shared sockets; then resolve `exit()`.
    StopServing { ready: bool },
    /// A successor is in charge: only resolve `exit()`.
    ExitOnly,
    /// An upgrade is in flight: its end finishes the stop.
    UpgradeDecides,
}

/// What the end of an upgrade requires of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpgradeEnd {
    /// Stop serving (a stop arrived, and no successor took over).
    pub(crate) stop_serving: bool,
    /// Resolve `exit()`.
    pub(crate) exit: bool,
}

impl Phase {
    /// Whether `ready()` has succeeded.
    pub(crate) fn is_ready(self) -> bool {
        !matches!(self, Phase::Starting | Phase::Stopped { ready: false, .. })
    }

    /// Whether `stop()` was called.
    pub(crate) fn is_stopped(self) -> bool {
        matches!(
            self,
            Phase::Stopped { .. }
                | Phase::Upgrading {
                    stop_requested: true,
                    ..
                }
        )
    }

    /// The generation this process handed over to.
    pub(crate) fn successor(self) -> Option<u32> {
        match self {
            Phase::Upgraded { successor }
            | Phase::Stopped {
                successor: Some(successor),
                ..
            } => Some(successor),
            _ => None,
        }
    }

    /// Whether `ready()` may proceed: `Ok(true)` when it has work to do,
    /// `Ok(false)` when this generation is ready already.
    pub(crate) fn check_ready(self) -> Result<bool, Refusal> {
        match self {
            Phase::Starting => Ok(true),
            _ if self.is_stopped() => Err(Refusal::Stopped),
            _ => Ok(false),
        }
    }

    /// `ready()` succeeded.
    pub(crate) fn became_ready(&mut self) {
        if *self == Phase::Starting {
            *self = Phase::Serving;
        }
    }

    /// Starts an upgrade, or says why not (in this order: stopped, handed
    /// over, in progress, not ready, PID 1, parent alive).
    pub(crate) fn begin_upgrade(
        &mut self,
        pid1: bool,
        parent_alive: Option<u32>,
    ) -> Result<(), Refusal> {
        match *self {
            _ if self.is_stopped() => Err(Refusal::Stopped),
            Phase::Upgraded { successor } => Err(Refusal::AlreadyUpgraded(successor)),
            Phase::Upgrading { child, .. } => Err(Refusal::InProgress(child)),
            Phase::Starting => Err(Refusal::NotReady),
            _ if pid1 => Err(Refusal::Pid1),
            _ => {
                if let Some(parent) = parent_alive {
                    return Err(Refusal::ParentAlive(parent));
                }
                *self = Phase::Upgrading {
                    child: None,
                    stop_requested: false,
                };
                Ok(())
            }
        }
    }

    /// The upgrade in flight has spawned `pid`.
    pub(crate) fn spawned(&mut self, pid: u32) {
        if let Phase::Upgrading { child, .. } = self {
            *child = Some(pid);
        }
    }

    /// The upgrade in flight ended: `Some(successor)` when its child
    /// became ready and took over, `None` when it failed (or was dropped).
    pub(crate) fn end_upgrade(&mut self, successor: Option<u32>) -> UpgradeEnd {
        let Phase::Upgrading { stop_requested, .. } = *self else {
            return UpgradeEnd {
                stop_serving: false,
                exit: false,
            };
        };
        let (next, end) = match (successor, stop_requested) {
            (Some(successor), false) => (
                Phase::Upgraded { successor },
                UpgradeEnd {
                    stop_serving: false,
                    exit: true,
                },
            ),
            // Committed before the stop could cancel it: the successor
            // is in charge; this process only exits.
            (Some(successor), true) => (
                Phase::Stopped {
                    ready: true,
                    successor: Some(successor),
                },
                UpgradeEnd {
                    stop_serving: false,
                    exit: true,
                },
            ),
            (None, false) => (
                Phase::Serving,
                UpgradeEnd {
                    stop_serving: false,
                    exit: false,
                },
            ),
            (None, true) => (
                Phase::Stopped {
                    ready: true,
                    successor: None,
                },
                UpgradeEnd {
                    stop_serving: true,
                    exit: true,
                },
            ),
        };
        *self = next;
        end
    }

    /// `stop()`.
    pub(crate) fn stop(&mut self) -> StopEffect {
        let (next, effect) = match *self {
            Phase::Starting => (
                Phase::Stopped {
                    ready: false,
                    successor: None,
                },
                StopEffect::StopServing { ready: false },
            ),
            Phase::Serving => (
                Phase::Stopped {
                    ready: true,
                    successor: None,
                },
                StopEffect::StopServing { ready: true },
            ),
            Phase::Upgrading {
                child,
                stop_requested: false,
            } => (
                Phase::Upgrading {
                    child,
                    stop_requested: true,
                },
                StopEffect::UpgradeDecides,
            ),
            Phase::Upgraded { successor } => (
                Phase::Stopped {
                    ready: true,
                    successor: Some(successor),
                },
                StopEffect::ExitOnly,
            ),
            Phase::Upgrading { .. } | Phase::Stopped { .. } => (*self, StopEffect::Nothing),
        };
        *self = next;
        effect
    }

    /// The successor `pid` died after it took over: this process, which
    /// still holds the sockets, takes the service back (to start a
    /// replacement) unless it was stopped, or `pid` is not its successor.
    pub(crate) fn successor_died(&mut self, pid: u32) -> bool {
        if *self == (Phase::Upgraded { successor: pid }) {
            *self = Phase::Serving;
            return true;
        }
        false
    }

    /// Whether this generation still owns its files when the upgrader is
    /// dropped (no stop, no successor), and whether it was ready.
    pub(crate) fn owns_files(self) -> Option<bool> {
        match self {
            Phase::Starting => Some(false),
            Phase::Serving | Phase::Upgrading { .. } => Some(true),
            Phase::Upgraded { .. } | Phase::Stopped { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> Phase {
        let mut p = Phase::Starting;
        assert_eq!(p.check_ready(), Ok(true));
        p.became_ready();
        assert_eq!(p, Phase::Serving);
        p
    }

    fn upgrading() -> Phase {
        let mut p = serving();
        assert_eq!(p.begin_upgrade(false, None), Ok(()));
        p.spawned(42);
        assert_eq!(
            p,
            Phase::Upgrading {
                child: Some(42),
                stop_requested: false
            }
        );
        p
    }

    #[test]
    fn ready_once_then_idempotent_and_refused_after_stop() {
        let mut p = serving();
        assert_eq!(p.check_ready(), Ok(false), "ready twice is a no-op");
        assert!(p.is_ready());
        assert_eq!(p.stop(), StopEffect::StopServing { ready: true });
        assert_eq!(p.check_ready(), Err(Refusal::Stopped));
    }

    #[test]
    fn every_refusal_of_an_upgrade() {
        // Before ready.
        let mut p = Phase::Starting;
        assert_eq!(p.begin_upgrade(false, None), Err(Refusal::NotReady));
        // Parent alive, PID 1.
        let mut p2 = serving();
        assert_eq!(
            p2.begin_upgrade(false, Some(7)),
            Err(Refusal::ParentAlive(7))
        );
        assert_eq!(p2.begin_upgrade(true, None), Err(Refusal::Pid1));
        assert_eq!(p2, Phase::Serving, "a refusal changes nothing");
        // In progress, before and after the spawn.
        let mut p3 = serving();
        assert_eq!(p3.begin_upgrade(false, None), Ok(()));
        assert_eq!(
            p3.begin_upgrade(false, None),
            Err(Refusal::InProgress(None))
        );
        p3.spawned(9);
        assert_eq!(
            p3.begin_upgrade(false, None),
            Err(Refusal::InProgress(Some(9)))
        );
        // After success.
        p3.end_upgrade(Some(9));
        assert_eq!(
            p3.begin_upgrade(false, None),
            Err(Refusal::AlreadyUpgraded(9))
        );
        // After stop (whatever else holds).
        assert_eq!(p.stop(), StopEffect::StopServing { ready: false });
        assert_eq!(p.begin_upgrade(true, Some(1)), Err(Refusal::Stopped));
        let mut p4 = serving();
        p4.stop();
        assert_eq!(p4.begin_upgrade(false, None), Err(Refusal::Stopped));
    }

    #[test]
    fn an_upgrade_ends_in_a_successor_or_back_to_serving() {
        let mut ok = upgrading();
        assert_eq!(
            ok.end_upgrade(Some(42)),
            UpgradeEnd {
                stop_serving: false,
                exit: true
            }
        );
        assert_eq!(ok, Phase::Upgraded { successor: 42 });
        assert_eq!(ok.successor(), Some(42));
        assert!(ok.is_ready() && !ok.is_stopped());

        let mut failed = upgrading();
        assert_eq!(
            failed.end_upgrade(None),
            UpgradeEnd {
                stop_serving: false,
                exit: false
            }
        );
        assert_eq!(failed, Phase::Serving);
        assert_eq!(failed.begin_upgrade(false, None), Ok(()), "and may retry");
    }

    #[test]
    fn a_stop_during_an_upgrade_is_finished_by_the_upgrade() {
        // Committed first: the successor stays in charge, this one exits.
        let mut committed = upgrading();
        assert_eq!(committed.stop(), StopEffect::UpgradeDecides);
        assert!(committed.is_stopped());
        assert_eq!(committed.stop(), StopEffect::Nothing, "idempotent");
        assert_eq!(
            committed.end_upgrade(Some(42)),
            UpgradeEnd {
                stop_serving: false,
                exit: true
            }
        );
        assert_eq!(
            committed,
            Phase::Stopped {
                ready: true,
                successor: Some(42)
            }
        );
        // Cancelled: the service really stops.
        let mut cancelled = upgrading();
        cancelled.stop();
        assert_eq!(
            cancelled.end_upgrade(None),
            UpgradeEnd {
                stop_serving: true,
                exit: true
            }
        );
        assert_eq!(
            cancelled,
            Phase::Stopped {
                ready: true,
                successor: None
            }
        );
    }

    #[test]
    fn a_stop_after_the_handover_only_exits() {
        let mut p = upgrading();
        p.end_upgrade(Some(42));
        assert_eq!(p.stop(), StopEffect::ExitOnly);
        assert_eq!(p.successor(), Some(42));
        assert_eq!(p.owns_files(), None);
        assert!(!p.successor_died(42), "a stopped service is not revived");
    }

    #[test]
    fn a_dead_successor_is_taken_back_once() {
        let mut p = upgrading();
        p.end_upgrade(Some(42));
        assert!(!p.successor_died(41), "not its successor");
        assert!(p.successor_died(42));
        assert_eq!(p, Phase::Serving);
        assert!(!p.successor_died(42));
        assert_eq!(p.begin_upgrade(false, None), Ok(()), "the replacement");
    }

    #[test]
    fn who_owns_the_files_when_the_upgrader_goes() {
        assert_eq!(Phase::Starting.owns_files(), Some(false));
        assert_eq!(serving().owns_files(), Some(true));
        assert_eq!(upgrading().owns_files(), Some(true));
        let mut stopped = serving();
        stopped.stop();
        assert_eq!(stopped.owns_files(), None);
    }
}
