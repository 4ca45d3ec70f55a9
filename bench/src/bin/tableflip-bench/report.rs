//! The results, as markdown tables (printed, and written to
//! `results.md`) and JSON (`results.json`).

use std::fmt::Write as _;

use crate::procs::Kind;
use crate::scenarios::{
    BallastResult, Config, DrainLoad, DrainResult, IntermittentResult, LatencyResult,
    ListenersResult, LoadResult, ManyResult, OverheadResult, StateResult,
};
use crate::stats::Summary;
use crate::supervisor::SupervisorResult;

/// Where the run happened.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory: String,
    pub(crate) kernel: String,
    pub(crate) rustc: String,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
}

impl Machine {
    /// Reads `/proc` and asks `rustc -V` (before the reaper starts).
    pub(crate) fn describe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let memory = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or_else(
                || "unknown".into(),
                |kib| format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0),
            );
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let rustc = std::process::Command::new(rustc)
            .arg("-V")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu,
            cores,
            memory,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            rustc,
            load_before: loadavg(),
            load_after: String::new(),
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything one run measured.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Option<Machine>,
    pub(crate) config: Option<Config>,
    pub(crate) seconds: f64,
    pub(crate) latency: Vec<LatencyResult>,
    pub(crate) pid_file: Vec<crate::pidfile::PidFileResult>,
    pub(crate) ballast: Vec<BallastResult>,
    pub(crate) load: Vec<LoadResult>,
    pub(crate) listeners: Vec<ListenersResult>,
    pub(crate) drain: Vec<DrainResult>,
    pub(crate) intermittent: Vec<IntermittentResult>,
    pub(crate) many: Vec<ManyResult>,
    pub(crate) overhead: Vec<OverheadResult>,
    pub(crate) supervisor: Option<SupervisorResult>,
    pub(crate) state: Vec<StateResult>,
    pub(crate) tls: Vec<crate::tls::TlsResult>,
}

/// The libraries tableflip is compared with, each in its own tables.
const PEERS: [Kind; 2] = [Kind::Ecdysis, Kind::GoTableflip];

fn f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a / b < 0.1 {
        format!("{:.3}×", a / b)
    } else if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

/// ` (3 Eof, 1 Reset)`, or nothing when there was no failure.
fn failure_kinds(failures: &std::collections::BTreeMap<String, usize>) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let kinds: Vec<String> = failures.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!(" ({})", kinds.join(", "))
}

fn yes(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

fn kib_to_mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    Summary::of_ms(&v).p50
}

impl Report {
    fn latency_of(&self, kind: Kind) -> Option<&LatencyResult> {
        self.latency.iter().find(|r| r.kind == kind)
    }

    fn overhead_of(&self, kind: Kind) -> Option<&OverheadResult> {
        self.overhead.iter().find(|r| r.kind == kind)
    }

    /// The report as markdown.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        if let (Some(m), Some(c)) = (&self.machine, &self.config) {
            let _ = writeln!(
                out,
                "Machine: {} × {}, {}, Linux {}, {}. Mode: {}; {:.0} s. Load average before: {}, after: {}.\n",
                m.cores,
                m.cpu,
                m.memory,
                m.kernel,
                m.rustc,
                if c.quick { "--quick" } else { "full" },
                self.seconds,
                m.load_before,
                m.load_after
            );
        }
        self.targets(&mut out);
        for peer in PEERS {
            self.latency_table(&mut out, peer);
        }
        crate::pidfile::table(&self.pid_file, &mut out);
        for peer in PEERS {
            self.ballast_table(&mut out, peer);
        }
        self.load_table(&mut out);
        for peer in PEERS {
            self.listeners_table(&mut out, peer);
        }
        self.drain_table(&mut out);
        self.intermittent_table(&mut out);
        self.many_table(&mut out);
        self.overhead_table(&mut out);
        self.supervisor_table(&mut out);
        self.state_table(&mut out);
        self.tls_table(&mut out);
        out
    }

    fn targets(&self, out: &mut String) {
        let _ = writeln!(out, "### Targets\n");
        let _ = writeln!(out, "| target | measured | |\n|---|---|---|");
        if let (Some(tf), Some(ec)) = (
            self.latency_of(Kind::Tableflip),
            self.latency_of(Kind::Ecdysis),
        ) {
            let (t, e) = (
                Summary::of_ms(&tf.upgrades.ready).p50,
                Summary::of_ms(&ec.upgrades.ready).p50,
            );
            let _ = writeln!(
                out,
                "| upgrade latency (SIGHUP → new generation ready), median ≤ 0.7× ecdysis | {} ms vs {} ms: {} | {} |",
                f(t),
                f(e),
                ratio(t, e),
                yes(t <= 0.7 * e)
            );
            let (tg, eg) = (
                Summary::of_ms(&tf.upgrades.gone).p50,
                Summary::of_ms(&ec.upgrades.gone).p50,
            );
            let _ = writeln!(
                out,
                "| upgrade latency (SIGHUP → old generation gone), median ≤ 0.7× ecdysis | {} ms vs {} ms: {} | {} |",
                f(tg),
                f(eg),
                ratio(tg, eg),
                yes(tg <= 0.7 * eg)
            );
            let floor = Summary::of_ms(&tf.floor).p50;
            let _ = writeln!(
                out,
                "| upgrade (SIGHUP → ready) within 2 ms of the exec floor (fresh start → ready), medians | {} ms vs {} ms: +{} ms | {} |",
                f(t),
                f(floor),
                f(t - floor),
                yes(t - floor <= 2.0)
            );
        }
        if let Some((tmpfs, disk, fs)) = crate::pidfile::difference(&self.pid_file) {
            let _ = writeln!(
                out,
                "| readiness with the PID file on a disk-backed directory ({fs}) within 0.3 ms of tmpfs (SIGHUP → ready, medians) | {} ms vs {} ms: {:+.2} ms | {} |",
                f(disk),
                f(tmpfs),
                disk - tmpfs,
                yes(disk - tmpfs <= 0.3)
            );
        }
        if !self.load.is_empty() {
            let failed = |k: Kind| {
                let load: usize = self
                    .load
                    .iter()
                    .filter(|l| l.kind == k)
                    .flat_map(|l| &l.modes)
                    .map(|m| m.failed)
                    .sum();
                let drain: usize = self
                    .drain
                    .iter()
                    .filter(|d| d.kind == k && d.load == DrainLoad::Active)
                    .map(|d| d.failed)
                    .sum();
                load + drain
            };
            let (t, e) = (failed(Kind::Tableflip), failed(Kind::Ecdysis));
            let _ = writeln!(
                out,
                "| zero failed requests where the peer fails (load test + active drain) | tableflip {t}, ecdysis {e} | {} |",
                yes(t == 0)
            );
            let intermittent = |k: Kind| {
                self.drain
                    .iter()
                    .find(|d| d.kind == k && d.load == DrainLoad::Intermittent)
                    .map(|d| d.failed)
            };
            if let (Some(t), Some(e)) = (intermittent(Kind::Tableflip), intermittent(Kind::Ecdysis))
            {
                let _ = writeln!(
                    out,
                    "| (outside the target) clients idle longer than the 2 s linger: intermittent drain | tableflip {t}, ecdysis {e} | see the note |"
                );
            }
        }
        if !self.intermittent.is_empty() {
            let each: Vec<String> = self
                .intermittent
                .iter()
                .map(|r| format!("{} {}", r.kind.name(), r.stats.failed))
                .collect();
            let _ = writeln!(
                out,
                "| (outside the target) intermittent keep-alive clients, idle 0.5–5 s, across {} upgrades: failed requests | {} | see the note |",
                self.intermittent[0].upgrades.len(),
                each.join(", ")
            );
        }
        if let (Some(tf), Some(tk)) = (
            self.overhead_of(Kind::Tableflip),
            self.overhead_of(Kind::Tokio),
        ) {
            let rss = |r: &OverheadResult| median_of(r.loaded.iter().map(|u| u.rss_kib as f64));
            let d = kib_to_mib(rss(tf) - rss(tk));
            let _ = writeln!(
                out,
                "| RSS overhead against plain tokio < 1 MiB (medians, after load) | {:+.2} MiB | {} |",
                d,
                yes(d < 1.0)
            );
        }
        if let Some(m) = self.many.iter().find(|m| m.kind == Kind::Tableflip) {
            if let (Some(first), Some(last)) = (m.generations.first(), m.generations.last()) {
                let max = m.generations.iter().map(|g| g.usage.fds).max().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "| no growth in fds over {} upgrades | generation 1: {} fds, generation {}: {} (max {}) | {} |",
                    m.upgrades,
                    first.usage.fds,
                    last.index + 1,
                    last.usage.fds,
                    max,
                    yes(last.usage.fds <= first.usage.fds && max <= first.usage.fds)
                );
            }
        }
        if let Some(s) = &self.supervisor {
            let (sup, rep) = (s.supervised_ready.p50, s.replace_ready.p50);
            let _ = writeln!(
                out,
                "| supervised mode: an upgrade no slower than replace mode (SIGHUP → ready, medians, same run) | {} ms vs {} ms: {} | {} |",
                f(sup),
                f(rep),
                ratio(sup, rep),
                yes(sup <= rep)
            );
            let m = s.after_upgrades;
            let _ = writeln!(
                out,
                "| supervisor under 1.5 MiB RSS (after {} upgrades) | RSS {:.2} MiB, of which its own (USS) {:.2} MiB, PSS {:.2} MiB | {} |",
                s.rounds,
                kib_to_mib(m.rss_kib as f64),
                kib_to_mib(m.uss_kib as f64),
                kib_to_mib(m.pss_kib as f64),
                if m.rss_kib < 1536 {
                    "yes"
                } else if m.uss_kib < 1536 {
                    "USS yes, RSS no: see the note"
                } else {
                    "no"
                }
            );
            let _ = writeln!(
                out,
                "| supervisor: no wake-ups when idle | {} context switches, {} CPU ticks in {:.0} s | {} |",
                s.idle_context_switches,
                s.idle_cpu_ticks,
                s.idle_seconds,
                yes(s.idle_context_switches == 0 && s.idle_cpu_ticks == 0)
            );
        }
        out.push('\n');
    }

    fn supervisor_table(&self, out: &mut String) {
        let Some(s) = &self.supervisor else {
            return;
        };
        let _ = writeln!(
            out,
            "### Supervised mode against replace mode ({} upgrades each, interleaved; the same binary)\n",
            s.rounds
        );
        let _ = writeln!(
            out,
            "| ms from SIGHUP | p50 | p90 | max |\n|---|---|---|---|"
        );
        for (name, v) in [
            ("replace: new generation ready", &s.replace_ready),
            ("supervised: new generation ready", &s.supervised_ready),
            ("replace: old generation gone", &s.replace_gone),
            ("supervised: old generation gone", &s.supervised_gone),
        ] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                f(v.p50),
                f(v.p90),
                f(v.max)
            );
        }
        let _ = writeln!(
            out,
            "\n| idle keep-alive connections across one upgrade | connections | SIGHUP → ready ms | SIGHUP → old gone ms | closed by the old generation | handed over (next request answered by the new generation on the same connection) | not answered by the new one | handed over per second of ready → gone |\n|---|---|---|---|---|---|---|---|"
        );
        for (name, i) in [
            ("replace mode", &s.idle_replace),
            ("supervised mode", &s.idle_supervised),
        ] {
            let rate = i
                .handed_over_per_s()
                .map_or_else(|| "–".to_owned(), |r| format!("{r:.0}"));
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {rate} |",
                i.connections,
                f(i.ready_ms),
                f(i.gone_ms),
                i.closed_eof + i.closed_reset,
                i.carried_over,
                i.carried_failed
            );
        }
        let _ = writeln!(
            out,
            "\n| the supervisor | RSS KiB | PSS KiB | USS KiB | anonymous KiB | threads |\n|---|---|---|---|---|---|"
        );
        for (name, m) in [
            ("first generation ready", s.at_start),
            ("after the upgrades (re-executed at each)", s.after_upgrades),
        ] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} |",
                m.rss_kib, m.pss_kib, m.uss_kib, m.anon_kib, m.threads
            );
        }
        let _ = writeln!(
            out,
            "\nIdle for {:.0} s: {} context switches, {} CPU ticks.\n",
            s.idle_seconds, s.idle_context_switches, s.idle_cpu_ticks
        );
    }

    fn latency_table(&self, out: &mut String, peer: Kind) {
        let (Some(tf), Some(ec)) = (self.latency_of(Kind::Tableflip), self.latency_of(peer)) else {
            return;
        };
        let _ = writeln!(
            out,
            "### Upgrade latency, no load: tableflip and {} ({} upgrades each, interleaved)\n",
            peer.name(),
            tf.upgrades.ready.len()
        );
        let _ = writeln!(
            out,
            "| measure (ms) | tableflip min | median | p90 | max | {} min | median | p90 | max | ratio of medians |\n|---|---|---|---|---|---|---|---|---|---|",
            peer.name()
        );
        let rows: [(&str, &Vec<f64>, &Vec<f64>); 4] = [
            (
                "SIGHUP → new generation ready (NOTIFY_SOCKET `READY=1`, `MAINPID=new`)",
                &tf.upgrades.ready,
                &ec.upgrades.ready,
            ),
            (
                "SIGHUP → PID file names the new generation (cross-check)",
                &tf.upgrades.pid_file,
                &ec.upgrades.pid_file,
            ),
            (
                "SIGHUP → old generation gone (reaped)",
                &tf.upgrades.gone,
                &ec.upgrades.gone,
            ),
            (
                "exec floor: fresh start of the same binary → ready",
                &tf.floor,
                &ec.floor,
            ),
        ];
        for (name, a, b) in rows {
            let (a, b) = (Summary::of_ms(a), Summary::of_ms(b));
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f(a.min),
                f(a.p50),
                f(a.p90),
                f(a.max),
                f(b.min),
                f(b.p50),
                f(b.p90),
                f(b.max),
                ratio(a.p50, b.p50)
            );
        }
        let over = |r: &LatencyResult| {
            Summary::of_ms(&r.upgrades.ready).p50 - Summary::of_ms(&r.floor).p50
        };
        let _ = writeln!(
            out,
            "| handover cost: median ready − median floor | | {} | | | | {} | | | |\n",
            f(over(tf)),
            f(over(ec))
        );
    }

    fn tls_table(&self, out: &mut String) {
        let Some(first) = self.tls.first() else {
            return;
        };
        let _ = writeln!(
            out,
            "### TLS session resumption across upgrades ({} upgrades; after each, {} clients with tickets from earlier generations reconnect at once)\n",
            first.upgrades, first.clients
        );
        let _ = writeln!(
            out,
            "| certificate key | ticket keys | reconnects resumed | failed | new generation's CPU in its first second: median (ms) | p90 | max | storm: every client answered, median (ms) |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &self.tls {
            let cpu = Summary::of_ms(&r.first_second_cpu_ms);
            let storm = Summary::of_ms(&r.storm_ms);
            #[allow(clippy::cast_precision_loss)]
            let share = if r.reconnects == 0 {
                0.0
            } else {
                100.0 * r.resumed as f64 / r.reconnects as f64
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} of {} ({share:.1} %) | {} | {} | {} | {} | {} |",
                r.key,
                r.tickets,
                r.resumed,
                r.reconnects,
                r.failed,
                f(cpu.p50),
                f(cpu.p90),
                f(cpu.max),
                f(storm.p50)
            );
        }
        out.push('\n');
    }

    fn state_table(&self, out: &mut String) {
        let Some(first) = self.state.first() else {
            return;
        };
        let _ = writeln!(
            out,
            "### Application state handed over (tableflip, replace mode; {} rounds at each size: started fresh, upgraded once, stopped)\n",
            first.upgrades.ready.len()
        );
        let _ = writeln!(
            out,
            "| state MiB | SIGHUP → ready: median (ms) | p90 | max | SIGHUP → old gone: median (ms) | new generation RSS (MiB) | its peak RSS, VmHWM (MiB) |\n|---|---|---|---|---|---|---|"
        );
        for r in &self.state {
            let ready = Summary::of_ms(&r.upgrades.ready);
            let gone = Summary::of_ms(&r.upgrades.gone);
            let mib = |v: &[u64]| kib_to_mib(median_of(v.iter().map(|&k| k as f64)));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.state_mib,
                f(ready.p50),
                f(ready.p90),
                f(ready.max),
                f(gone.p50),
                f(mib(&r.new_rss_kib)),
                f(mib(&r.new_hwm_kib))
            );
        }
        out.push('\n');
    }

    fn ballast_table(&self, out: &mut String, peer: Kind) {
        let Some(first) = self.ballast.first() else {
            return;
        };
        if !self.ballast.iter().any(|b| b.kind == peer) {
            return;
        }
        let _ = writeln!(
            out,
            "### Upgrade latency against the service's memory size: tableflip and {} ({} rounds at each size: each library started fresh, upgraded once, stopped; interleaved)\n",
            peer.name(),
            first.upgrades.ready.len()
        );
        let _ = writeln!(
            out,
            "| ballast MiB | measure (ms) | tableflip median | p90 | max | {} median | p90 | max | ratio of medians |\n|---|---|---|---|---|---|---|---|---|",
            peer.name()
        );
        let mut sizes: Vec<usize> = self.ballast.iter().map(|b| b.ballast_mib).collect();
        sizes.dedup();
        let p50 = |v: &[f64]| Summary::of_ms(v).p50;
        for mib in sizes {
            let get = |k: Kind| {
                self.ballast
                    .iter()
                    .find(|b| b.ballast_mib == mib && b.kind == k)
            };
            let (Some(t), Some(e)) = (get(Kind::Tableflip), get(peer)) else {
                continue;
            };
            let row = |out: &mut String, name: &str, a: &[f64], b: &[f64]| {
                let (a, b) = (Summary::of_ms(a), Summary::of_ms(b));
                let _ = writeln!(
                    out,
                    "| {mib} | {name} | {} | {} | {} | {} | {} | {} | {} |",
                    f(a.p50),
                    f(a.p90),
                    f(a.max),
                    f(b.p50),
                    f(b.p90),
                    f(b.max),
                    ratio(a.p50, b.p50)
                );
            };
            let difference = |out: &mut String, name: &str, a: f64, b: f64| {
                let _ = writeln!(out, "| {mib} | {name} | {} | | | {} | | | |", f(a), f(b));
            };
            row(
                out,
                "SIGHUP → new generation ready",
                &t.upgrades.ready,
                &e.upgrades.ready,
            );
            row(
                out,
                "SIGHUP → old generation gone",
                &t.upgrades.gone,
                &e.upgrades.gone,
            );
            row(out, "exec floor: fresh start → ready", &t.floor, &e.floor);
            difference(
                out,
                "handover cost: median ready − median floor",
                p50(&t.upgrades.ready) - p50(&t.floor),
                p50(&e.upgrades.ready) - p50(&e.floor),
            );
            row(
                out,
                "SIGHUP → new generation's own code runs (spawn + exec, before its ballast)",
                &t.upgrades.started,
                &e.upgrades.started,
            );
            row(
                out,
                "fresh start → own code runs",
                &t.floor_started,
                &e.floor_started,
            );
            difference(
                out,
                "spawn cost: median SIGHUP → code runs − median fresh start → code runs",
                p50(&t.upgrades.started) - p50(&t.floor_started),
                p50(&e.upgrades.started) - p50(&e.floor_started),
            );
            let rss =
                |r: &BallastResult| kib_to_mib(median_of(r.rss_kib.iter().map(|&k| k as f64)));
            let _ = writeln!(
                out,
                "| {mib} | RSS of the new generation, MiB (median) | {:.1} | | | {:.1} | | | |",
                rss(t),
                rss(e)
            );
        }
        out.push('\n');
    }

    fn load_table(&self, out: &mut String) {
        if self.load.is_empty() {
            return;
        }
        let _ = writeln!(out, "### Under load during upgrades\n");
        let _ = writeln!(
            out,
            "| library | upgrades | client mode | requests | failed | p50 ms | p99 ms | max ms | slow requests in flight, answered | SIGHUP → ready (median ms) | SIGHUP → old gone (median ms) |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for l in &self.load {
            for (i, m) in l.modes.iter().enumerate() {
                let failures = if m.failures.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        m.failures
                            .iter()
                            .map(|(k, v)| format!("{v} {k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let (slow, ready, gone) = if i == 0 {
                    (
                        format!("{} of {}", l.slow_ok, l.slow_total),
                        f(Summary::of_ms(&l.timings.ready).p50),
                        f(Summary::of_ms(&l.timings.gone).p50),
                    )
                } else {
                    ("(same run)".into(), String::new(), String::new())
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} |",
                    l.kind.name(),
                    l.upgrades.len(),
                    m.mode.name(),
                    m.requests,
                    m.failed,
                    failures,
                    f(m.latency.p50),
                    f(m.latency.p99),
                    f(m.latency.max),
                    slow,
                    ready,
                    gone
                );
            }
        }
        out.push('\n');
    }

    fn listeners_table(&self, out: &mut String, peer: Kind) {
        if !self.listeners.iter().any(|l| l.kind == peer) {
            return;
        }
        let n = self.listeners[0].upgrades.ready.len();
        let _ = writeln!(
            out,
            "### Scale: inherited listeners, tableflip and {} ({n} upgrades and {n} fresh starts at each count; medians, ms)\n",
            peer.name()
        );
        let _ = writeln!(
            out,
            "| listeners | tableflip ready | {p} ready | ratio | tableflip floor | tableflip ready − floor | tableflip old gone | {p} old gone | fds (tableflip / {p}) |\n|---|---|---|---|---|---|---|---|---|",
            p = peer.name()
        );
        let counts: Vec<usize> = {
            let mut c: Vec<usize> = self.listeners.iter().map(|l| l.listeners).collect();
            c.dedup();
            c
        };
        for count in counts {
            let get = |k: Kind| {
                self.listeners
                    .iter()
                    .find(|l| l.listeners == count && l.kind == k)
            };
            let (Some(t), Some(e)) = (get(Kind::Tableflip), get(peer)) else {
                continue;
            };
            let p = |v: &Vec<f64>| Summary::of_ms(v).p50;
            let _ = writeln!(
                out,
                "| {count} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                f(p(&t.upgrades.ready)),
                f(p(&e.upgrades.ready)),
                ratio(p(&t.upgrades.ready), p(&e.upgrades.ready)),
                f(p(&t.floor)),
                f(p(&t.upgrades.ready) - p(&t.floor)),
                f(p(&t.upgrades.gone)),
                f(p(&e.upgrades.gone)),
                t.fds,
                e.fds
            );
        }
        for l in self.listeners.iter().filter(|l| l.kind == peer) {
            if let Some(failure) = &l.failure {
                let first_line = failure.lines().next().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\n{} failed an upgrade at {} listeners (its figures there cover the upgrades before): {first_line}",
                    peer.name(),
                    l.listeners
                );
            }
        }
        out.push('\n');
    }

    fn drain_table(&self, out: &mut String) {
        if self.drain.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "### Scale: draining {} open connections\n",
            self.drain[0].upgrade.connections
        );
        let _ = writeln!(
            out,
            "| library | connections | SIGHUP → ready ms | SIGHUP → old gone ms | requests | failed | p50 / p99 / max ms | idle: closed by the old generation (FIN / RST), last close ms; handed to the new one (its next request answered there), per second of ready → gone |\n|---|---|---|---|---|---|---|---|"
        );
        for d in &self.drain {
            let (requests, failed, lat, closes) = if d.load != DrainLoad::Idle {
                let failures = if d.failures.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        d.failures
                            .iter()
                            .map(|(k, v)| format!("{v} {k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                (
                    d.requests.to_string(),
                    format!("{}{failures}", d.failed),
                    format!(
                        "{} / {} / {}",
                        f(d.latency.p50),
                        f(d.latency.p99),
                        f(d.latency.max)
                    ),
                    "–".to_owned(),
                )
            } else {
                ("–".into(), "–".into(), "–".into(), idle_ends(d))
            };
            let _ = writeln!(
                out,
                "| {} | {} {} | {} | {} | {} | {} | {} | {} |",
                d.kind.name(),
                d.upgrade.connections,
                d.load.name(),
                f(d.upgrade.ready_ms),
                f(d.upgrade.gone_ms),
                requests,
                failed,
                lat,
                closes
            );
        }
        out.push('\n');
    }

    fn intermittent_table(&self, out: &mut String) {
        let Some(first) = self.intermittent.first() else {
            return;
        };
        let _ = writeln!(
            out,
            "### Intermittent clients across upgrades ({} keep-alive clients, each idle 0.5–5 s between requests)\n",
            first.clients
        );
        let _ = writeln!(
            out,
            "| library | upgrades | requests | failed | of which sent during an upgrade (SIGHUP → old gone) | p50 ms | p99 ms | max ms | SIGHUP → ready (median ms) | SIGHUP → old gone: median / max ms |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.intermittent {
            let m = &r.stats;
            let gone = Summary::of_ms(&r.timings.gone);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} / {} |",
                r.kind.name(),
                r.upgrades.len(),
                m.requests,
                m.failed,
                failure_kinds(&m.failures),
                r.failed_during_upgrades,
                f(m.latency.p50),
                f(m.latency.p99),
                f(m.latency.max),
                f(Summary::of_ms(&r.timings.ready).p50),
                f(gone.p50),
                f(gone.max)
            );
        }
        let _ = writeln!(
            out,
            "\n| library | SIGHUP → old generation gone, each upgrade in order (ms) |\n|---|---|"
        );
        for r in &self.intermittent {
            let each: Vec<String> = r.timings.gone.iter().map(|&g| f(g)).collect();
            let _ = writeln!(out, "| {} | {} |", r.kind.name(), each.join(", "));
        }
        out.push('\n');
    }

    fn many_table(&self, out: &mut String) {
        if self.many.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "### Scale: consecutive upgrades, first generation against the newest\n"
        );
        let _ = writeln!(
            out,
            "| library | upgrades | fds first → newest (max) | RSS MiB first → newest (max) | threads first → newest | SIGHUP → ready median / p90 / max ms | SIGHUP → old gone median ms |\n|---|---|---|---|---|---|---|"
        );
        for m in &self.many {
            let (Some(first), Some(last)) = (m.generations.first(), m.generations.last()) else {
                continue;
            };
            let max_fds = m.generations.iter().map(|g| g.usage.fds).max().unwrap_or(0);
            let max_rss = m
                .generations
                .iter()
                .map(|g| g.usage.rss_kib)
                .max()
                .unwrap_or(0);
            let r = Summary::of_ms(&m.timings.ready);
            let _ = writeln!(
                out,
                "| {} | {} | {} → {} ({}) | {:.2} → {:.2} ({:.2}) | {} → {} | {} / {} / {} | {} |",
                m.kind.name(),
                m.upgrades,
                first.usage.fds,
                last.usage.fds,
                max_fds,
                kib_to_mib(first.usage.rss_kib as f64),
                kib_to_mib(last.usage.rss_kib as f64),
                kib_to_mib(max_rss as f64),
                first.usage.threads,
                last.usage.threads,
                f(r.p50),
                f(r.p90),
                f(r.max),
                f(Summary::of_ms(&m.timings.gone).p50)
            );
        }
        out.push('\n');
    }

    fn overhead_table(&self, out: &mut String) {
        let Some(base) = self.overhead_of(Kind::Tokio) else {
            return;
        };
        let _ = writeln!(
            out,
            "### Overhead against plain tokio ({} fresh starts each, medians)\n",
            base.startup.len()
        );
        let _ = writeln!(
            out,
            "| service | startup (spawn → ready) ms | RSS at ready MiB | RSS after {} requests MiB | of which anonymous / file-backed MiB | Δ RSS vs tokio MiB | threads | fds | binary (file) MiB | binary (loaded, PT_LOAD) MiB | Δ loaded vs tokio MiB |\n|---|---|---|---|---|---|---|---|---|---|---|",
            self.config.as_ref().map_or(0, |c| c.overhead_requests)
        );
        let med = |v: &[crate::procs::Usage], f: fn(&crate::procs::Usage) -> f64| {
            median_of(v.iter().map(f))
        };
        let base_rss = med(&base.loaded, |u| u.rss_kib as f64);
        for r in &self.overhead {
            let rss_loaded = med(&r.loaded, |u| u.rss_kib as f64);
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} | {:.2} / {:.2} | {:+.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:+.2} |",
                r.kind.name(),
                f(Summary::of_ms(&r.startup).p50),
                kib_to_mib(med(&r.at_ready, |u| u.rss_kib as f64)),
                kib_to_mib(rss_loaded),
                kib_to_mib(med(&r.loaded, |u| u.rss_anon_kib as f64)),
                kib_to_mib(med(&r.loaded, |u| u.rss_file_kib as f64)),
                kib_to_mib(rss_loaded - base_rss),
                med(&r.loaded, |u| u.threads as f64),
                med(&r.loaded, |u| u.fds as f64),
                r.file_bytes as f64 / 1048576.0,
                r.loaded_bytes as f64 / 1048576.0,
                (r.loaded_bytes as f64 - base.loaded_bytes as f64) / 1048576.0,
            );
        }
        out.push('\n');
    }
}

/// The idle drain's outcome: closes, and connections handed over.
fn idle_ends(d: &crate::scenarios::DrainResult) -> String {
    let d = &d.upgrade;
    let mut out = if d.closed_eof + d.closed_reset > 0 {
        format!(
            "closed {} / {}, last {} ms",
            d.closed_eof,
            d.closed_reset,
            f(d.last_close_ms)
        )
    } else {
        "none closed".to_owned()
    };
    if d.carried_over + d.carried_failed > 0 {
        let rate = d
            .handed_over_per_s()
            .map_or_else(String::new, |r| format!(", {r:.0}/s"));
        out.push_str(&format!("; handed over {}{rate}", d.carried_over));
        if d.carried_failed > 0 {
            out.push_str(&format!(
                " (**{} open but not answered**)",
                d.carried_failed
            ));
        }
    }
    out
}
