//! The supervised mode against the replace mode, same binary, same run:
//! upgrade latency (interleaved one by one), and the supervisor's own
//! footprint — its memory (RSS, PSS and USS from `smaps_rollup`), threads,
//! and its CPU time and context switches over an idle window.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::Error;
use crate::procs::{
    Kind, Lab, Log, Notification, STEP_TIMEOUT, Service, free_port, proc_field, signal,
};
use crate::scenarios::{Config, IdleAcross, idle_across_upgrade, open_many, probe};
use crate::stats::{Summary, ms};

/// The results of the supervised-mode scenario.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct SupervisorResult {
    pub(crate) rounds: usize,
    /// From `SIGHUP` to `READY=1` (replace: with the new `MAINPID=`;
    /// supervised: from the supervisor), ms.
    pub(crate) replace_ready: Summary,
    pub(crate) supervised_ready: Summary,
    /// From `SIGHUP` to the old generation's exit (after its drain), ms.
    pub(crate) replace_gone: Summary,
    pub(crate) supervised_gone: Summary,
    /// The supervisor after its first generation is ready, and again after
    /// the upgrades (it has re-executed itself at each).
    pub(crate) at_start: Footprint,
    pub(crate) after_upgrades: Footprint,
    /// The idle window: its length, and what the supervisor did in it.
    pub(crate) idle_seconds: f64,
    pub(crate) idle_cpu_ticks: u64,
    pub(crate) idle_context_switches: u64,
    /// Idle keep-alive connections across one upgrade of each mode (the
    /// idle-connection handover of `tableflip::http`): replace, then
    /// supervised.
    pub(crate) idle_replace: IdleAcross,
    pub(crate) idle_supervised: IdleAcross,
}

/// A process's memory from `/proc/<pid>/smaps_rollup`, KiB, and threads.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Footprint {
    pub(crate) rss_kib: u64,
    pub(crate) pss_kib: u64,
    /// Unique set size: `Private_Clean` + `Private_Dirty`, the memory
    /// that goes away with the process.
    pub(crate) uss_kib: u64,
    pub(crate) anon_kib: u64,
    pub(crate) threads: u64,
}

impl Footprint {
    fn of(pid: u32) -> Footprint {
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        Footprint {
            rss_kib: proc_field(&rollup, "Rss:"),
            pss_kib: proc_field(&rollup, "Pss:"),
            uss_kib: proc_field(&rollup, "Private_Clean:") + proc_field(&rollup, "Private_Dirty:"),
            anon_kib: proc_field(&rollup, "Anonymous:"),
            threads: proc_field(&status, "Threads:"),
        }
    }
}

/// CPU time (utime + stime, clock ticks) and context switches
/// (voluntary + involuntary) of `pid` so far.
fn activity(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    let cpu = num(11) + num(12);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let switches = proc_field(&status, "voluntary_ctxt_switches:")
        + proc_field(&status, "nonvoluntary_ctxt_switches:");
    (cpu, switches)
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

/// A supervised service: the supervisor (the bench's child) and its
/// notifications.
struct Supervised {
    pid: u32,
    addr: std::net::SocketAddr,
    notify: Arc<Log<Notification>>,
    stop: Arc<AtomicBool>,
    lab: Lab,
    started: Instant,
    log: std::path::PathBuf,
}

impl Supervised {
    fn start(lab: &Lab, dir: &Path) -> Result<Supervised, Error> {
        let addr = crate::scenarios::local(free_port()?);
        let stop = Arc::new(AtomicBool::new(false));
        let notify_path = dir.join("notify.sock");
        let notify = crate::procs::listen_notify(&notify_path, Arc::clone(&stop))?;
        let log_path = dir.join("log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::msg(format!("cannot create {}: {e}", log_path.display())))?;
        let exe = lab.bin_dir.join(Kind::Tableflip.binary());
        let mark = notify.mark();
        let started = Instant::now();
        let child = Command::new(&exe)
            .env("TABLEFLIP_MODE", "supervised")
            .env("BENCH_ADDR", addr.to_string())
            .env("NOTIFY_SOCKET", &notify_path)
            .env("PID_FILE", dir.join("pid"))
            .env_remove("RUST_LOG")
            .env_remove("BENCH_BALLAST_MIB")
            .env_remove("BENCH_ANNOUNCE_START")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::msg(format!("cannot start {}: {e}", exe.display())))?;
        let s = Supervised {
            pid: child.id(),
            addr,
            notify,
            stop,
            lab: lab.clone(),
            started,
            log: log_path,
        };
        // The reaper thread collects it.
        drop(child);
        s.notify
            .wait(mark, started + STEP_TIMEOUT, |n| n.ready)
            .ok_or_else(|| s.failure("the supervised service never became ready"))?;
        Ok(s)
    }

    /// `SIGHUP` to the supervisor; waits for `READY=1` and for the old
    /// generation's exit. Returns both durations.
    fn upgrade(&self) -> Result<(Duration, Duration), Error> {
        self.upgrade_timed()
            .map(|(_, ready, gone, _)| (ready, gone))
    }

    /// As [`upgrade`](Self::upgrade); also returns when the SIGHUP was
    /// sent and the new generation's PID.
    fn upgrade_timed(&self) -> Result<(Instant, Duration, Duration, u32), Error> {
        let old = probe(self.addr)?;
        let mark = self.notify.mark();
        let hup_at = Instant::now();
        signal(self.pid, Signal::SIGHUP)?;
        let deadline = hup_at + STEP_TIMEOUT;
        let ready = self
            .notify
            .wait(mark, deadline, |n| n.ready)
            .ok_or_else(|| self.failure("no READY=1 after SIGHUP"))?;
        while !gone(old) {
            if Instant::now() > deadline {
                return Err(self.failure(&format!("the old generation {old} did not exit")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let gone_at = Instant::now();
        let now = probe(self.addr)?;
        if now == old {
            return Err(self.failure(&format!("still answered by {old} after the upgrade")));
        }
        Ok((hup_at, ready.at - hup_at, gone_at - hup_at, now))
    }

    fn stop(self) -> Result<(), Error> {
        let at = Instant::now();
        signal(self.pid, Signal::SIGTERM)?;
        let exit = self
            .lab
            .reaper
            .wait_exit(self.pid, self.started, at + STEP_TIMEOUT)
            .ok_or_else(|| self.failure("the supervisor did not exit after SIGTERM"))?;
        if exit.status != "exit 0" {
            return Err(self.failure(&format!("the supervisor ended with {}", exit.status)));
        }
        Ok(())
    }

    fn failure(&self, what: &str) -> Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::msg(format!(
            "tableflip (supervised): {what}; log {}:\n{}",
            self.log.display(),
            tail.join("\n")
        ))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if !self.lab.reaper.exited(self.pid, self.started) {
            // Its generations see the supervisor go and stop.
            let _ = signal(self.pid, Signal::SIGKILL);
        }
    }
}

/// Runs the scenario: `rounds` upgrades of each mode, interleaved, each
/// on a service of its own that has just started (the supervised one
/// lives on for the footprint readings).
pub(crate) fn supervisor(
    lab: &Lab,
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
) -> Result<SupervisorResult, Error> {
    let rounds = cfg.supervisor_upgrades;
    let dir = lab.run_dir.join("supervised");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::msg(format!("cannot create {}: {e}", dir.display())))?;
    let sup = Supervised::start(lab, &dir)?;
    let at_start = Footprint::of(sup.pid);
    let (mut r_ready, mut r_gone, mut s_ready, mut s_gone) = (vec![], vec![], vec![], vec![]);
    let mut replace = Service::start(
        lab,
        Kind::Tableflip,
        crate::scenarios::local(free_port()?),
        1,
    )?
    .0;
    for _ in 0..rounds {
        let up = replace.upgrade()?;
        r_ready.push(ms(up.ready));
        r_gone.push(ms(up.gone));
        let (ready, gone) = sup.upgrade()?;
        s_ready.push(ms(ready));
        s_gone.push(ms(gone));
    }
    // Idle keep-alive connections across one more upgrade of each.
    let n = cfg.drain_conns / 10;
    let streams = rt.block_on(open_many(replace.addr, n))?;
    let idle_replace = idle_across_upgrade(rt, streams, || {
        let u = replace.upgrade()?;
        Ok((u.hup_at, u.ready, u.gone, replace.pid))
    })?;
    let streams = rt.block_on(open_many(sup.addr, n))?;
    let idle_supervised = idle_across_upgrade(rt, streams, || sup.upgrade_timed())?;
    replace.stop(STEP_TIMEOUT)?;
    let after_upgrades = Footprint::of(sup.pid);
    let idle = if cfg.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let before = activity(sup.pid);
    // The supervisor is left alone: what it does meanwhile is the point.
    std::thread::sleep(idle);
    let after = activity(sup.pid);
    sup.stop()?;
    Ok(SupervisorResult {
        rounds,
        replace_ready: Summary::of_ms(&r_ready),
        supervised_ready: Summary::of_ms(&s_ready),
        replace_gone: Summary::of_ms(&r_gone),
        supervised_gone: Summary::of_ms(&s_gone),
        at_start,
        after_upgrades,
        idle_seconds: idle.as_secs_f64(),
        idle_cpu_ticks: after.0.saturating_sub(before.0),
        idle_context_switches: after.1.saturating_sub(before.1),
        idle_replace,
        idle_supervised,
    })
}
