//! Watching the successor while this generation drains, and replacing it
//! if it dies after it took over (this process still holds the sockets).

use std::os::unix::process::ExitStatusExt;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::child::Child;
use super::{Inner, MAX_REPLACEMENTS, Upgrader, lock};
use crate::error::Error;
use crate::report::chain;

/// Waits for the successor `pid` (ready, in charge) to end while this
/// process still lives, and replaces it if it died.
///
/// A successor that exits with status 0 was stopped on purpose; one that
/// dies otherwise (a crash, `SIGKILL`, an error exit) right after taking
/// over would leave the sockets unserved, although this process still
/// holds them: the same executable is started again and inherits them
/// (connections meanwhile wait in the listen backlog). Not after
/// [`Upgrader::stop`], and at most [`MAX_REPLACEMENTS`] times.
pub(super) async fn watch_successor(inner: Weak<Inner>, mut child: Child, pid: u32) {
    // Until it exits; then it is forgotten before it is reaped, so that
    // its PID is never signalled once it may name another process.
    let forget = |inner: &Weak<Inner>| {
        if let Some(inner) = inner.upgrade() {
            let mut successor = lock(&inner.successor);
            if successor.as_ref().is_some_and(|(p, _)| *p == pid) {
                *successor = None;
            }
        }
    };
    let status = match child.exited().await {
        Ok(true) => {
            forget(&inner);
            child.wait().await
        }
        Ok(false) => child.wait().await,
        Err(e) => Err(e),
    };
    forget(&inner);
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let upgrader = Upgrader { inner };
    let died = match &status {
        Ok(s) if s.success() => None,
        Ok(s) => Some(match (s.code(), s.signal()) {
            (_, Some(signal)) => format!("killed by signal {signal}"),
            (Some(code), None) => format!("exited with status {code}"),
            (None, None) => "ended".to_owned(),
        }),
        Err(e) => {
            tracing::debug!(child_pid = pid, error = %e, "cannot wait for the new generation");
            None
        }
    };
    let Some(how) = died else {
        tracing::info!(child_pid = pid, "the new generation has exited");
        return;
    };
    {
        let mut phase = upgrader.phase();
        if phase.is_stopped() || phase.successor() != Some(pid) {
            tracing::info!(
                child_pid = pid,
                how,
                "the new generation has ended; this process is stopping"
            );
            return;
        }
        if upgrader.inner.replacements.fetch_add(1, Ordering::SeqCst) >= MAX_REPLACEMENTS {
            tracing::error!(
                child_pid = pid,
                how,
                "the new generation died after it took over, and {MAX_REPLACEMENTS} replacements died already; nothing serves the sockets any more"
            );
            return;
        }
        phase.successor_died(pid);
    }
    let probation = upgrader.inner.opts.get_probation();
    let took_over = lock(&upgrader.inner.successor_ready_at).take();
    if let Some(after) = took_over.map(|t| t.elapsed()).filter(|e| *e < probation) {
        let what = format!(
            "generation {} (pid {pid}) {how} {} ms after it took over, within its probation ({probation:?}); rolled back to the previous binary",
            upgrader.inner.generation.saturating_add(1),
            after.as_millis()
        );
        tracing::error!(
            child_pid = pid,
            how,
            after_ms = after.as_millis() as u64,
            probation = ?probation,
            "ROLLBACK: the new generation died during its probation; starting the previous binary (this process's) in its place, not the one on disk"
        );
        *lock(&upgrader.inner.rolling_back) = Some(what.clone());
        upgrader.inner.rollbacks.send_replace(Some((pid, what)));
    }
    upgrader.inner.replacing.send_replace(true);
    replace_successor(upgrader, pid, how).await;
}

/// Starts a replacement for the successor `pid` that died (`how`), retrying
/// a few times. Boxed: the upgrade it runs spawns [`watch_successor`]
/// again, and the explicit `Send` breaks that cycle for the compiler.
fn replace_successor(
    upgrader: Upgrader,
    pid: u32,
    how: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        tracing::error!(
            child_pid = pid,
            how,
            "the new generation died after it took over; this process still holds the sockets and starts a replacement"
        );
        let mut delay = Duration::from_millis(100);
        loop {
            match upgrader.upgrade().await {
                Ok(_) => break,
                Err(
                    Error::Stopped
                    | Error::AlreadyUpgraded { .. }
                    | Error::UpgradeInProgress { .. },
                ) => break,
                Err(e) => {
                    if upgrader.inner.replacements.fetch_add(1, Ordering::SeqCst)
                        >= MAX_REPLACEMENTS
                    {
                        tracing::error!(error = %chain(&e), "the replacement failed too; nothing serves the sockets any more");
                        break;
                    }
                    tracing::warn!(error = %chain(&e), retry_in_ms = delay.as_millis() as u64, "the replacement failed; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = upgrader.inner.stop.cancelled() => break,
                    }
                    delay *= 2;
                }
            }
        }
        upgrader.inner.replacing.send_replace(false);
    })
}
