//! Metrics: what the handover measures, as `tracing` events and, with the
//! `metrics` feature, through the [`metrics`](https://docs.rs/metrics) facade (so
//! that the exporter the application installed, Prometheus or other,
//! publishes them). Names, kinds, units and labels are stable:
//!
//! | name | kind | unit | labels | recorded when |
//! |---|---|---|---|---|
//! | `tableflip_upgrades_started_total` | counter | upgrades | | an upgrade starts (by the generation serving then) |
//! | `tableflip_upgrades_succeeded_total` | counter | upgrades | | the new generation is ready (by the new generation) |
//! | `tableflip_upgrades_failed_total` | counter | upgrades | `reason`: `spawn`, `exited`, `killed`, `timeout`, `stopped`, `other` | an upgrade fails (by the generation that keeps serving) |
//! | `tableflip_upgrade_ready_seconds` | histogram | seconds | | the new generation is ready: from the start of the upgrade (supervised mode; replace mode: from the new process's start) |
//! | `tableflip_upgrade_old_gone_seconds` | histogram | seconds | | the previous generation has exited: from the new one's readiness (supervised mode: by the serving generation; replace mode: by the old generation as it exits) |
//! | `tableflip_rollbacks_total` | counter | rollbacks | | a new generation died during its probation and the previous binary replaced it (by the rollback generation in supervised mode, by the old generation in replace mode) |
//! | `tableflip_drains_total` | counter | drains | | a generation finished its drain |
//! | `tableflip_drain_seconds` | histogram | seconds | | the drain's length |
//! | `tableflip_drain_abandoned_tasks_total` | counter | tasks | | tasks still running at the drain timeout |
//! | `tableflip_drain_connections_handed_over_total` | counter | connections | | a generation finished its drain: the idle HTTP/1 connections it handed to the next generation instead of closing them (`tableflip::http`, `Server::hand_over_idle`) |
//! | `tableflip_generations_alive` | gauge | processes | | the service's generations (serving, starting, draining) change (supervised mode: sent by the supervisor; replace mode: 1 or 2, this generation and its parent) |
//!
//! Each process has its own recorder: counters start at zero in each
//! generation (as after any restart; Prometheus' `rate()` expects that).
//! In supervised mode the supervisor, which runs no application code and
//! so no exporter, sends each measurement to the generation serving then,
//! which records it. The `tracing` events have target `tableflip::metrics`,
//! level `INFO`, and fields `metric` (the name above) and `value` (and
//! `reason` for failures).

use serde::{Deserialize, Serialize};

use crate::ctl::Failure;

/// One measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "metric", rename_all = "snake_case")]
pub(crate) enum Metric {
    UpgradeStarted,
    UpgradeSucceeded {
        ready_seconds: f64,
    },
    UpgradeFailed {
        reason: Failure,
    },
    OldGenerationGone {
        seconds: f64,
    },
    RolledBack,
    Drained {
        seconds: f64,
        abandoned: u64,
        /// Absent from a generation of a build before it was added.
        #[serde(default)]
        handed_over: u64,
    },
    GenerationsAlive {
        count: u64,
    },
}

/// Logs `m` (target `tableflip::metrics`) and records it.
pub(crate) fn emit(m: &Metric) {
    log(m);
    record(m);
}

fn log(m: &Metric) {
    const T: &str = "tableflip::metrics";
    match m {
        Metric::UpgradeStarted => {
            tracing::info!(target: T, metric = "tableflip_upgrades_started_total", value = 1u64);
        }
        Metric::UpgradeSucceeded { ready_seconds } => {
            tracing::info!(target: T, metric = "tableflip_upgrades_succeeded_total", value = 1u64);
            tracing::info!(target: T, metric = "tableflip_upgrade_ready_seconds", value = ready_seconds);
        }
        Metric::UpgradeFailed { reason } => {
            tracing::info!(target: T, metric = "tableflip_upgrades_failed_total", value = 1u64, reason = reason.as_str());
        }
        Metric::OldGenerationGone { seconds } => {
            tracing::info!(target: T, metric = "tableflip_upgrade_old_gone_seconds", value = seconds);
        }
        Metric::RolledBack => {
            tracing::info!(target: T, metric = "tableflip_rollbacks_total", value = 1u64);
        }
        Metric::Drained {
            seconds,
            abandoned,
            handed_over,
        } => {
            tracing::info!(target: T, metric = "tableflip_drains_total", value = 1u64);
            tracing::info!(target: T, metric = "tableflip_drain_seconds", value = seconds);
            tracing::info!(target: T, metric = "tableflip_drain_abandoned_tasks_total", value = abandoned);
            tracing::info!(target: T, metric = "tableflip_drain_connections_handed_over_total", value = handed_over);
        }
        Metric::GenerationsAlive { count } => {
            tracing::info!(target: T, metric = "tableflip_generations_alive", value = count);
        }
    }
}

/// Records `m` through the `metrics` facade (nothing without the
/// feature).
#[cfg(feature = "metrics")]
pub(crate) fn record(m: &Metric) {
    match m {
        Metric::UpgradeStarted => {
            ::metrics::counter!("tableflip_upgrades_started_total").increment(1)
        }
        Metric::UpgradeSucceeded { ready_seconds } => {
            ::metrics::counter!("tableflip_upgrades_succeeded_total").increment(1);
            ::metrics::histogram!("tableflip_upgrade_ready_seconds").record(*ready_seconds);
        }
        Metric::UpgradeFailed { reason } => {
            ::metrics::counter!("tableflip_upgrades_failed_total", "reason" => reason.as_str())
                .increment(1);
        }
        Metric::OldGenerationGone { seconds } => {
            ::metrics::histogram!("tableflip_upgrade_old_gone_seconds").record(*seconds);
        }
        Metric::RolledBack => ::metrics::counter!("tableflip_rollbacks_total").increment(1),
        Metric::Drained {
            seconds,
            abandoned,
            handed_over,
        } => {
            ::metrics::counter!("tableflip_drains_total").increment(1);
            ::metrics::histogram!("tableflip_drain_seconds").record(*seconds);
            ::metrics::counter!("tableflip_drain_abandoned_tasks_total").increment(*abandoned);
            ::metrics::counter!("tableflip_drain_connections_handed_over_total")
                .increment(*handed_over);
        }
        Metric::GenerationsAlive { count } => {
            #[allow(clippy::cast_precision_loss)]
            ::metrics::gauge!("tableflip_generations_alive").set(*count as f64);
        }
    }
}

/// Records `m` through the `metrics` facade (nothing without the
/// feature).
#[cfg(not(feature = "metrics"))]
pub(crate) fn record(_m: &Metric) {}

/// Seconds, for the histograms.
pub(crate) fn seconds(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
