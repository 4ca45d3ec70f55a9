//! The measurements: upgrade latency and the exec floor, upgrade latency
//! against the service's memory size, load during upgrades, scale
//! (listeners, open connections, many upgrades), and overhead against
//! plain tokio.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

use crate::Error;
use crate::load::{self, Mode, Outcome, Sample};
use crate::procs::{Kind, Lab, Service, Upgrade, Usage, free_port};
use crate::stats::{Summary, ms};

/// How much of everything to do.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Config {
    pub(crate) quick: bool,
    /// Upgrades per library in the latency test, and fresh starts for the
    /// floor, interleaved one by one.
    pub(crate) upgrades: usize,
    /// Upgrades per library under load.
    pub(crate) load_upgrades: usize,
    /// Clients per mode under load.
    pub(crate) load_clients: usize,
    /// Listener counts of the scale test, and upgrades at each.
    pub(crate) listener_counts: Vec<usize>,
    pub(crate) listener_upgrades: usize,
    /// Open connections of the drain test.
    pub(crate) drain_conns: usize,
    /// The client behaviours of the drain test.
    pub(crate) drain_loads: Vec<DrainLoad>,
    /// Consecutive upgrades of the generations test (tableflip).
    pub(crate) many_upgrades: usize,
    /// Fresh starts per service in the overhead test.
    pub(crate) overhead_rounds: usize,
    /// Requests sent before the "loaded" RSS reading.
    pub(crate) overhead_requests: usize,
    /// Memory sizes of the ballast test (MiB held by every generation),
    /// and upgrades (each after a fresh start) of each library at each.
    pub(crate) ballast_mib: Vec<usize>,
    pub(crate) ballast_upgrades: usize,
    /// Upgrades of each mode in the supervised-mode comparison.
    pub(crate) supervisor_upgrades: usize,
    /// Sizes of the application state handed over (MiB), and upgrades
    /// (each after a fresh start) at each.
    pub(crate) state_mib: Vec<usize>,
    pub(crate) state_upgrades: usize,
    /// Upgrades and clients of the TLS resumption section.
    pub(crate) tls_upgrades: usize,
    pub(crate) tls_clients: usize,
    /// The intermittent section: keep-alive clients idle 0.5–5 s between
    /// requests, upgrades of each library, and how long the clients run
    /// before the first upgrade.
    pub(crate) intermittent_clients: usize,
    pub(crate) intermittent_upgrades: usize,
    pub(crate) intermittent_warmup: Duration,
}

impl Config {
    /// The full run, or the quick one (`--quick`, for CI).
    pub(crate) fn new(quick: bool) -> Config {
        if quick {
            Config {
                quick,
                upgrades: 10,
                load_upgrades: 3,
                load_clients: 2,
                listener_counts: vec![1, 10, 100, 1000],
                listener_upgrades: 2,
                drain_conns: 500,
                drain_loads: vec![DrainLoad::Idle, DrainLoad::Active],
                many_upgrades: 100,
                overhead_rounds: 4,
                overhead_requests: 500,
                ballast_mib: vec![0, 256],
                ballast_upgrades: 5,
                supervisor_upgrades: 5,
                state_mib: vec![0, 100],
                state_upgrades: 3,
                tls_upgrades: 3,
                tls_clients: 20,
                intermittent_clients: 100,
                intermittent_upgrades: 2,
                intermittent_warmup: Duration::from_secs(2),
            }
        } else {
            Config {
                quick,
                upgrades: 60,
                load_upgrades: 20,
                load_clients: 4,
                listener_counts: vec![1, 10, 100, 1000],
                listener_upgrades: 20,
                drain_conns: 10_000,
                drain_loads: vec![DrainLoad::Idle, DrainLoad::Active, DrainLoad::Intermittent],
                many_upgrades: 1000,
                overhead_rounds: 20,
                overhead_requests: 5000,
                ballast_mib: vec![0, 256, 1024],
                ballast_upgrades: 20,
                supervisor_upgrades: 30,
                state_mib: vec![0, 1, 100],
                state_upgrades: 10,
                tls_upgrades: 20,
                tls_clients: 100,
                intermittent_clients: 1000,
                intermittent_upgrades: 20,
                intermittent_warmup: INTERMITTENT_IDLE.1,
            }
        }
    }
}

pub(crate) fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `GET /` over a fresh connection, synchronously: the PID that answered.
pub(crate) fn probe(addr: SocketAddr) -> Result<u32, Error> {
    let mut s = TcpStream::connect(addr).map_err(|e| Error::msg(format!("probe {addr}: {e}")))?;
    s.set_read_timeout(Some(load::REQUEST_TIMEOUT))
        .map_err(|e| Error::msg(format!("probe {addr}: {e}")))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| Error::msg(format!("probe {addr}: {e}")))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| Error::msg(format!("probe {addr}: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| Error::msg(format!("probe {addr}: unexpected answer {text:?}")))
}

/// The resource use of one generation, measured once it serves alone.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Generation {
    pub(crate) index: usize,
    pub(crate) pid: u32,
    #[serde(flatten)]
    pub(crate) usage: Usage,
}

/// After an upgrade: check that the new generation answers, and read its
/// resource use.
fn settle(svc: &Service, index: usize) -> Result<Generation, Error> {
    let pid = probe(svc.addr)?;
    if pid != svc.pid {
        return Err(Error::msg(format!(
            "{}: answered by pid {pid}, expected the new generation {}",
            svc.kind.name(),
            svc.pid
        )));
    }
    Ok(Generation {
        index,
        pid,
        usage: steady_usage(svc.pid),
    })
}

/// A process's resource use once transient fds are gone: the old
/// generation has just been reaped and the probe just answered, so for a
/// moment the new one may still hold the end of its parent pipe, or the
/// probe's connection. The fewest fds over 5 readings 2 ms apart (a leak
/// shows in every reading); the last reading's memory.
fn steady_usage(pid: u32) -> Usage {
    let mut usage = Usage::of(pid);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(2));
        let again = Usage::of(pid);
        usage = Usage {
            fds: usage.fds.min(again.fds),
            ..again
        };
    }
    usage
}

/// Upgrade timings, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Timings {
    pub(crate) ready: Vec<f64>,
    pub(crate) pid_file: Vec<f64>,
    pub(crate) gone: Vec<f64>,
    /// The new generation's own code runs (ballast test only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) started: Vec<f64>,
}

impl Timings {
    pub(crate) fn push(&mut self, u: &Upgrade) {
        self.ready.push(ms(u.ready));
        if let Some(p) = u.pid_file {
            self.pid_file.push(ms(p));
        }
        self.gone.push(ms(u.gone));
        if let Some(s) = u.started {
            self.started.push(ms(s));
        }
    }
}

/// The latency test's results for one library.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LatencyResult {
    pub(crate) kind: Kind,
    pub(crate) upgrades: Timings,
    /// Fresh starts of the same binary (spawn → `READY=1`), in ms.
    pub(crate) floor: Vec<f64>,
    pub(crate) generations: Vec<Generation>,
}

/// Upgrade latency, no load: `upgrades` upgrades of each library, each
/// followed by a fresh start of the same binary (the floor), the two
/// libraries taking turns.
pub(crate) fn latency(lab: &Lab, cfg: &Config) -> Result<Vec<LatencyResult>, Error> {
    let kinds = lab.peers();
    let mut services = Vec::new();
    let mut results = Vec::new();
    for kind in kinds {
        let (svc, _) = Service::start(lab, kind, local(free_port()?), 1)?;
        results.push(LatencyResult {
            kind,
            upgrades: Timings::default(),
            floor: Vec::new(),
            generations: vec![settle(&svc, 0)?],
        });
        services.push(svc);
    }
    for done in 1..=cfg.upgrades {
        for i in round_order(services.len(), done) {
            let (svc, result) = (&mut services[i], &mut results[i]);
            let u = svc.upgrade()?;
            result.upgrades.push(&u);
            let index = result.generations.len();
            result.generations.push(settle(svc, index)?);
            let (fresh, start) = Service::start(lab, svc.kind, local(free_port()?), 1)?;
            result.floor.push(ms(start.ready));
            fresh.stop(Duration::from_secs(10))?;
        }
        if done % 10 == 0 || done == cfg.upgrades {
            eprint!(
                "\r  latency: {done}/{} upgrades of each library",
                cfg.upgrades
            );
        }
    }
    eprintln!();
    for svc in services {
        svc.stop(Duration::from_secs(10))?;
    }
    Ok(results)
}

/// The order in which `n` libraries take their turn in round `round`.
/// With a fixed order, tableflip's upgrade always came right after Go's
/// tableflip's fresh start and stop, which made it about 0.1× slower
/// against ecdysis (measured: 1.21–1.23× with Go's tableflip in the run,
/// 1.10–1.14× without). For up to three libraries the rounds go through
/// every order, in a sequence (found by search) in which, over six rounds
/// taken as a cycle, each library's turn comes right after each
/// library's (itself included) equally often; more libraries rotate.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    const THREE: [[usize; 3]; 6] = [
        [0, 1, 2],
        [2, 0, 1],
        [1, 0, 2],
        [2, 1, 0],
        [0, 2, 1],
        [1, 2, 0],
    ];
    match n {
        3 => THREE[round % THREE.len()].to_vec(),
        2 => [[0, 1], [1, 0]][round % 2].to_vec(),
        _ => (0..n).map(|i| (i + round) % n).collect(),
    }
}

/// Upgrade latency at one memory size, for one library.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct BallastResult {
    pub(crate) kind: Kind,
    /// MiB allocated and touched by every generation before readiness.
    pub(crate) ballast_mib: usize,
    pub(crate) upgrades: Timings,
    /// Fresh starts with the same ballast (spawn → `READY=1`), in ms: the
    /// exec floor at this size.
    pub(crate) floor: Vec<f64>,
    /// The same fresh starts, spawn → the service's own code runs
    /// (`BENCH_STARTED=1`), in ms.
    pub(crate) floor_started: Vec<f64>,
    /// RSS of each new generation once it serves alone, KiB.
    pub(crate) rss_kib: Vec<u64>,
}

/// `/proc/meminfo`'s `MemAvailable`, KiB.
fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Touches and frees `mib` MiB in the driver, so that the next process to
/// allocate as much finds guest memory the host has backed.
///
/// On a VM whose balloon device reports free memory to the host (virtio
/// free page reporting, as on the machine of BENCHMARKS.md), freed memory
/// is soon handed back to the host, and touching it again costs a host
/// fault per page: 1 GiB then takes 0.7–2.5 s instead of 0.35 s, at
/// random. Memory freed a moment ago is usually still backed. Done before
/// every fresh start and every `SIGHUP` of the ballast test, for both
/// libraries alike, this reduces that artefact in the ballast's
/// initialisation (which is inside SIGHUP → ready), without removing it:
/// see BENCHMARKS.md.
fn warm_up(mib: usize) -> Result<(), Error> {
    if mib > 0 {
        let memory = tableflip_bench::touched_memory(mib << 20).map_err(Error::msg)?;
        drop(memory);
    }
    Ok(())
}

/// Upgrade latency against the service's memory size: at each size of
/// `cfg.ballast_mib`, `cfg.ballast_upgrades` rounds; in each round, each
/// library in turn is started fresh (the exec floor at that size), upgraded
/// once, and stopped. One library's service at a time, so at most two
/// generations, twice the ballast, exist at once (or one generation and
/// the driver's [`warm_up`]).
pub(crate) fn ballast(lab: &Lab, cfg: &Config) -> Result<Vec<BallastResult>, Error> {
    let largest = cfg.ballast_mib.iter().copied().max().unwrap_or(0);
    // Two generations during an upgrade, and 1 GiB to spare.
    let needed_kib = (2 * largest as u64 + 1024) * 1024;
    match mem_available_kib() {
        Some(kib) if kib < needed_kib => {
            return Err(Error::msg(format!(
                "the ballast test needs {} MiB available (two generations of {largest} MiB, and 1 GiB to spare); \
                 MemAvailable is {} MiB",
                needed_kib / 1024,
                kib / 1024
            )));
        }
        _ => {}
    }
    let mut all = Vec::new();
    for &mib in &cfg.ballast_mib {
        let mut results: Vec<BallastResult> = lab
            .peers()
            .into_iter()
            .map(|kind| BallastResult {
                kind,
                ballast_mib: mib,
                upgrades: Timings::default(),
                floor: Vec::new(),
                floor_started: Vec::new(),
                rss_kib: Vec::new(),
            })
            .collect();
        for done in 1..=cfg.ballast_upgrades {
            for i in round_order(results.len(), done) {
                let result = &mut results[i];
                warm_up(mib)?;
                let (mut svc, start) =
                    Service::start_with(lab, result.kind, local(free_port()?), 1, Some(mib))?;
                result.floor.push(ms(start.ready));
                if let Some(s) = start.started {
                    result.floor_started.push(ms(s));
                }
                settle(&svc, 0)?;
                warm_up(mib)?;
                // A moment between the fresh generation's readiness and
                // its SIGHUP, as an upgrade would find it.
                std::thread::sleep(Duration::from_millis(50));
                let u = svc.upgrade()?;
                result.upgrades.push(&u);
                result.rss_kib.push(settle(&svc, 1)?.usage.rss_kib);
                svc.stop(Duration::from_secs(10))?;
            }
            eprint!(
                "\r  ballast {mib} MiB: {done}/{} upgrades of each library",
                cfg.ballast_upgrades
            );
        }
        eprintln!();
        all.extend(results);
    }
    Ok(all)
}

/// One upgrade under load, in microseconds since the load's epoch.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct UpgradeMark {
    pub(crate) hup_us: u64,
    pub(crate) ready_us: u64,
    pub(crate) gone_us: u64,
}

impl UpgradeMark {
    /// The upgrade `u` on the clock of the load that started at `epoch`.
    fn of(epoch: Instant, u: &Upgrade) -> UpgradeMark {
        let hup_us = load::micros_since(epoch, u.hup_at);
        UpgradeMark {
            hup_us,
            ready_us: hup_us + u64::try_from(u.ready.as_micros()).unwrap_or(0),
            gone_us: hup_us + u64::try_from(u.gone.as_micros()).unwrap_or(0),
        }
    }
}

/// Per client mode, under load.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ModeStats {
    pub(crate) mode: Mode,
    pub(crate) requests: usize,
    pub(crate) failed: usize,
    pub(crate) failures: BTreeMap<String, usize>,
    /// Latency of the successful requests, ms.
    pub(crate) latency: Summary,
}

impl ModeStats {
    fn of(mode: Mode, samples: &[Sample]) -> ModeStats {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.mode == mode).collect();
        let mut failures = BTreeMap::new();
        for s in mine.iter().filter(|s| s.outcome != Outcome::Ok) {
            *failures.entry(format!("{:?}", s.outcome)).or_insert(0) += 1;
        }
        let ok: Vec<f64> = mine
            .iter()
            .filter(|s| s.outcome == Outcome::Ok)
            .map(|s| f64::from(s.latency_us) / 1e3)
            .collect();
        ModeStats {
            mode,
            requests: mine.len(),
            failed: mine.len() - ok.len(),
            failures,
            latency: Summary::of_ms(&ok),
        }
    }
}

/// The load test's results for one library.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LoadResult {
    pub(crate) kind: Kind,
    pub(crate) duration_s: f64,
    pub(crate) modes: Vec<ModeStats>,
    pub(crate) upgrades: Vec<UpgradeMark>,
    pub(crate) timings: Timings,
    /// Slow requests (`/slow?ms=300`) in flight at each upgrade: answered,
    /// of how many.
    pub(crate) slow_ok: usize,
    pub(crate) slow_total: usize,
    /// Requests answered, by generation (in order).
    pub(crate) per_generation: Vec<usize>,
    #[serde(skip)]
    pub(crate) samples: Vec<Sample>,
}

/// How long the slow request in flight at each upgrade takes.
const SLOW_MS: u64 = 300;

/// Upgrades under load: keep-alive and connection-per-request clients
/// sending back to back, a slow request in flight at every upgrade.
pub(crate) fn under_load(
    lab: &Lab,
    rt: &Runtime,
    cfg: &Config,
    kind: Kind,
) -> Result<LoadResult, Error> {
    let (mut svc, _) = Service::start(lab, kind, local(free_port()?), 1)?;
    let addr = svc.addr;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for mode in [Mode::KeepAlive, Mode::PerRequest] {
        for _ in 0..cfg.load_clients {
            clients.push(rt.spawn(load::client(addr, mode, epoch, Arc::clone(&stop))));
        }
    }
    let mut marks = Vec::new();
    let mut timings = Timings::default();
    let mut slow = Vec::new();
    let mut outcome = Ok(());
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..cfg.load_upgrades {
        slow.push(rt.spawn(load::slow_request(addr, SLOW_MS)));
        // Let the slow request reach the old generation.
        std::thread::sleep(Duration::from_millis(50));
        match svc.upgrade() {
            Ok(u) => {
                timings.push(&u);
                marks.push(UpgradeMark::of(epoch, &u));
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let duration_s = epoch.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(
            rt.block_on(c)
                .map_err(|e| Error::msg(format!("load client: {e}")))?,
        );
    }
    let mut slow_ok = 0;
    let slow_total = slow.len();
    for s in slow {
        if rt.block_on(s).unwrap_or(false) {
            slow_ok += 1;
        }
    }
    outcome?;
    let generations = svc.generations.clone();
    svc.stop(Duration::from_secs(30))?;
    samples.sort_by_key(|s| s.start_us);
    let per_generation = generations
        .iter()
        .map(|(g, _)| samples.iter().filter(|s| s.pid == *g).count())
        .collect();
    Ok(LoadResult {
        kind,
        duration_s,
        modes: vec![
            ModeStats::of(Mode::KeepAlive, &samples),
            ModeStats::of(Mode::PerRequest, &samples),
        ],
        upgrades: marks,
        timings,
        slow_ok,
        slow_total,
        per_generation,
        samples,
    })
}

/// Upgrade latency with `n` listeners, for one library.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ListenersResult {
    pub(crate) kind: Kind,
    pub(crate) listeners: usize,
    pub(crate) upgrades: Timings,
    pub(crate) floor: Vec<f64>,
    /// Open fds of the last generation.
    pub(crate) fds: usize,
    /// A peer's upgrade that failed (the rest of its upgrades at this
    /// count were not run): a result, not an error of the bench.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failure: Option<String>,
}

/// Upgrade latency with 1, 10, 100, 1000 listeners. At each count the
/// libraries take turns, upgrade by upgrade and then fresh start by fresh
/// start (in the balanced order of [`round_order`]), so that a slower
/// moment of the machine weighs on each alike.
pub(crate) fn listeners(lab: &Lab, cfg: &Config) -> Result<Vec<ListenersResult>, Error> {
    let mut results = Vec::new();
    for &n in &cfg.listener_counts {
        let kinds = lab.peers();
        let mut services = Vec::new();
        let mut round: Vec<ListenersResult> = Vec::new();
        for &kind in &kinds {
            let (svc, _) = Service::start(lab, kind, local(free_port()?), n)?;
            services.push(Some(svc));
            round.push(ListenersResult {
                kind,
                listeners: n,
                upgrades: Timings::default(),
                floor: Vec::new(),
                fds: 0,
                failure: None,
            });
        }
        for r in 0..cfg.listener_upgrades {
            for i in round_order(kinds.len(), r) {
                let Some(svc) = services[i].as_mut() else {
                    continue;
                };
                match svc.upgrade() {
                    Ok(u) => round[i].upgrades.push(&u),
                    // Back-to-back upgrades are where Go's tableflip was
                    // seen to fail (BENCHMARKS.md): a peer's failure is
                    // recorded (the rest of its upgrades at this count are
                    // not run), tableflip's ends the run.
                    Err(e) if kinds[i] != Kind::Tableflip => {
                        eprintln!(
                            "\n  {} failed an upgrade at {n} listeners: {e}",
                            kinds[i].name()
                        );
                        round[i].failure = Some(e.to_string());
                        // Dropped: every generation still alive is killed.
                        services[i] = None;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for (i, svc) in services.into_iter().enumerate() {
            if let Some(svc) = svc {
                probe(svc.addr)?;
                round[i].fds = svc.usage().fds;
                svc.stop(Duration::from_secs(10))?;
            }
        }
        for r in 0..cfg.listener_upgrades {
            for i in round_order(kinds.len(), r) {
                let (fresh, start) = Service::start(lab, kinds[i], local(free_port()?), n)?;
                round[i].floor.push(ms(start.ready));
                fresh.stop(Duration::from_secs(10))?;
            }
        }
        results.extend(round);
        eprint!("\r  listeners: {n}      ");
    }
    eprintln!();
    Ok(results)
}

/// What the clients of the drain test do with their connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DrainLoad {
    /// One request answered, then silence.
    Idle,
    /// A request every 0.5 to 1.5 s (uniformly), on each connection: never
    /// idle as long as tableflip's 2 s linger.
    Active,
    /// A request every 1 to 3 s: some connections stay idle longer than
    /// the linger, the case the linger cannot make race-free.
    Intermittent,
}

impl DrainLoad {
    /// The name used in tables.
    pub(crate) fn name(self) -> &'static str {
        match self {
            DrainLoad::Idle => "idle",
            DrainLoad::Active => "active (a request every 0.5–1.5 s)",
            DrainLoad::Intermittent => "intermittent (a request every 1–3 s)",
        }
    }

    /// The shortest and longest interval between two requests.
    fn intervals(self) -> (Duration, Duration) {
        match self {
            DrainLoad::Idle => (Duration::ZERO, Duration::ZERO),
            DrainLoad::Active => (Duration::from_millis(500), Duration::from_millis(1500)),
            DrainLoad::Intermittent => (Duration::from_secs(1), Duration::from_secs(3)),
        }
    }
}

/// How an idle connection of the drain test ended the upgrade.
enum IdleEnd {
    /// Closed by the old generation (at, EOF rather than reset).
    Closed(Instant, bool),
    /// Still open when the old generation was gone.
    Open(tokio::net::TcpStream),
}

/// Draining many open connections, for one library.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct DrainResult {
    pub(crate) kind: Kind,
    pub(crate) load: DrainLoad,
    /// The connections and the upgrade's timings; with the idle load, also
    /// what became of the connections.
    #[serde(flatten)]
    pub(crate) upgrade: IdleAcross,
    /// Active: the requests during the test.
    pub(crate) requests: usize,
    pub(crate) failed: usize,
    pub(crate) failures: BTreeMap<String, usize>,
    pub(crate) latency: Summary,
}

/// Opens `n` keep-alive connections, each with one request answered.
pub(crate) async fn open_many(
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<tokio::net::TcpStream>, Error> {
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let sem = Arc::clone(&sem);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let mut stream = load::connect(addr).await.ok()?;
            let mut buf = Vec::new();
            load::exchange(
                &mut stream,
                &mut buf,
                b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
            )
            .await
            .ok()?;
            Some(stream)
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            streams.push(s);
        }
    }
    if streams.len() < n {
        return Err(Error::msg(format!(
            "could open only {} of {n} connections",
            streams.len()
        )));
    }
    Ok(streams)
}

/// A tiny deterministic generator (no dependency for this): a uniform
/// duration in `[lo, hi)` drawn from `seed`.
fn uniform(seed: u64, (lo, hi): (Duration, Duration)) -> Duration {
    let x = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let frac = (x >> 33) as f64 / f64::from(1u32 << 31);
    lo + (hi - lo).mul_f64(frac)
}

/// Upgrades with `cfg.drain_conns` connections open, used as `load` says.
pub(crate) fn drain(
    lab: &Lab,
    rt: &Runtime,
    cfg: &Config,
    kind: Kind,
    load: DrainLoad,
) -> Result<DrainResult, Error> {
    let (mut svc, _) = Service::start(lab, kind, local(free_port()?), 1)?;
    let addr = svc.addr;
    let n = cfg.drain_conns;
    let streams = rt.block_on(open_many(addr, n))?;
    let mut result = DrainResult {
        kind,
        load,
        upgrade: IdleAcross {
            connections: n,
            ..IdleAcross::default()
        },
        requests: 0,
        failed: 0,
        failures: BTreeMap::new(),
        latency: Summary::default(),
    };
    if load != DrainLoad::Idle {
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let intervals = load.intervals();
        let tasks: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, stream)| {
                let stop = Arc::clone(&stop);
                rt.spawn(async move {
                    let mut conn = Some(stream);
                    let mut buf = Vec::with_capacity(256);
                    let mut samples = Vec::new();
                    let mut seed = i as u64;
                    // Spread the first requests over one interval.
                    tokio::time::sleep(uniform(seed, (Duration::ZERO, intervals.1))).await;
                    while !stop.load(Ordering::Relaxed) {
                        samples.push(
                            load::request(addr, &mut conn, &mut buf, Mode::KeepAlive, epoch).await,
                        );
                        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                        tokio::time::sleep(uniform(seed, intervals)).await;
                    }
                    samples
                })
            })
            .collect();
        // Every connection has sent a request before the upgrade, and has
        // had time to send one after the drain ended.
        std::thread::sleep(intervals.1);
        let upgraded = svc.upgrade();
        std::thread::sleep(intervals.1 + Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        for t in tasks {
            samples.extend(rt.block_on(t).unwrap_or_default());
        }
        let u = upgraded?;
        result.upgrade.ready_ms = ms(u.ready);
        result.upgrade.gone_ms = ms(u.gone);
        let stats = ModeStats::of(Mode::KeepAlive, &samples);
        result.requests = stats.requests;
        result.failed = stats.failed;
        result.failures = stats.failures;
        result.latency = stats.latency;
    } else {
        result.upgrade = idle_across_upgrade(rt, streams, || {
            let u = svc.upgrade()?;
            Ok((u.hup_at, u.ready, u.gone, svc.pid))
        })?;
    }
    svc.stop(Duration::from_secs(30))?;
    Ok(result)
}

/// What became of idle keep-alive connections across one upgrade.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct IdleAcross {
    pub(crate) connections: usize,
    pub(crate) ready_ms: f64,
    pub(crate) gone_ms: f64,
    /// Closed by the old generation: EOF, reset, and the last close (ms
    /// after the SIGHUP).
    pub(crate) closed_eof: usize,
    pub(crate) closed_reset: usize,
    pub(crate) last_close_ms: f64,
    /// Still open once the old generation was gone: answered by the new
    /// generation on the same connection (handed over), or not.
    pub(crate) carried_over: usize,
    pub(crate) carried_failed: usize,
}

impl IdleAcross {
    /// Connections handed over per second of ready → old generation gone.
    pub(crate) fn handed_over_per_s(&self) -> Option<f64> {
        let window_s = (self.gone_ms - self.ready_ms) / 1e3;
        (window_s > 0.0).then(|| self.carried_over as f64 / window_s)
    }
}

/// Watches every stream of `streams` (idle keep-alive connections, each
/// answered once) through the upgrade `upgrade` runs — it returns when
/// the SIGHUP was sent, SIGHUP → ready, SIGHUP → old generation gone, and
/// the new generation's PID — then sends a request on each connection
/// still open and counts those the new generation answers.
pub(crate) fn idle_across_upgrade(
    rt: &Runtime,
    streams: Vec<tokio::net::TcpStream>,
    upgrade: impl FnOnce() -> Result<(Instant, Duration, Duration, u32), Error>,
) -> Result<IdleAcross, Error> {
    let mut result = IdleAcross {
        connections: streams.len(),
        ..IdleAcross::default()
    };
    // Watch every connection for its end, until the upgrade is over.
    let (over, over_rx) = tokio::sync::watch::channel(false);
    let watchers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let mut over = over_rx.clone();
            rt.spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut byte = [0u8; 1];
                tokio::select! {
                    end = stream.read(&mut byte) => {
                        IdleEnd::Closed(Instant::now(), end.map(|n| n == 0).unwrap_or(false))
                    }
                    _ = over.wait_for(|o| *o) => IdleEnd::Open(stream),
                }
            })
        })
        .collect();
    let upgraded = upgrade();
    // The old generation is gone (or the upgrade failed): whatever it
    // closed, it has closed.
    let _ = over.send(true);
    let mut open = Vec::new();
    let mut closed = Vec::new();
    for w in watchers {
        match rt
            .block_on(w)
            .map_err(|e| Error::msg(format!("watcher: {e}")))?
        {
            IdleEnd::Closed(at, eof) => closed.push((at, eof)),
            IdleEnd::Open(stream) => open.push(stream),
        }
    }
    let (hup_at, ready, gone, new_pid) = upgraded?;
    result.ready_ms = ms(ready);
    result.gone_ms = ms(gone);
    for (at, eof) in closed {
        if eof {
            result.closed_eof += 1;
        } else {
            result.closed_reset += 1;
        }
        result.last_close_ms = result
            .last_close_ms
            .max(ms(at.saturating_duration_since(hup_at)));
    }
    // Those still open: is the next request answered, and by the new
    // generation, on the same connection?
    let answered = rt.block_on(async move {
        let sem = Arc::new(tokio::sync::Semaphore::new(256));
        let checks: Vec<_> = open
            .into_iter()
            .map(|mut stream| {
                let sem = Arc::clone(&sem);
                tokio::spawn(async move {
                    let _permit = sem.acquire_owned().await.ok()?;
                    let mut buf = Vec::new();
                    let reply = tokio::time::timeout(
                        Duration::from_secs(10),
                        load::exchange(
                            &mut stream,
                            &mut buf,
                            b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
                        ),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    Some(reply.pid)
                })
            })
            .collect();
        let mut by = Vec::with_capacity(checks.len());
        for c in checks {
            by.push(c.await.ok().flatten());
        }
        by
    });
    for pid in answered {
        if pid == Some(new_pid) {
            result.carried_over += 1;
        } else {
            result.carried_failed += 1;
        }
    }
    Ok(result)
}

/// The shortest and longest idle time of an intermittent client between
/// two requests.
pub(crate) const INTERMITTENT_IDLE: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(5));

/// The pause after an upgrade has completed (old generation gone) before
/// the next `SIGHUP`: uniform in this range, so that the upgrades fall at
/// every phase of the clients' idle times.
const INTERMITTENT_GAP: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_millis(2000));

/// The intermittent section's results for one library.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct IntermittentResult {
    pub(crate) kind: Kind,
    pub(crate) clients: usize,
    pub(crate) duration_s: f64,
    pub(crate) stats: ModeStats,
    /// Failed requests sent while two generations were alive (SIGHUP →
    /// old generation gone), of `stats.failed`.
    pub(crate) failed_during_upgrades: usize,
    pub(crate) upgrades: Vec<UpgradeMark>,
    pub(crate) timings: Timings,
    #[serde(skip)]
    pub(crate) samples: Vec<Sample>,
}

/// Keep-alive clients that each send a request, stay idle 0.5–5 s
/// ([`INTERMITTENT_IDLE`], uniformly), and repeat, on the same connection
/// while the server keeps it (a connection closed while idle is replaced,
/// as a pooling client does: see `load`), across
/// `cfg.intermittent_upgrades` upgrades of `kind`.
pub(crate) fn intermittent(
    lab: &Lab,
    rt: &Runtime,
    cfg: &Config,
    kind: Kind,
) -> Result<IntermittentResult, Error> {
    let (mut svc, _) = Service::start(lab, kind, local(free_port()?), 1)?;
    let addr = svc.addr;
    let epoch = Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..cfg.intermittent_clients)
        .map(|i| {
            let mut stopped = stopped.clone();
            rt.spawn(async move {
                let mut conn = None;
                let mut buf = Vec::with_capacity(256);
                let mut samples = Vec::new();
                let mut seed = (i as u64) ^ 0x5DEE_CE66_D1CE_4E5B;
                // Spread the first requests over one longest idle time.
                let mut pause = uniform(seed, (Duration::ZERO, INTERMITTENT_IDLE.1));
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stopped.changed() => break,
                    }
                    samples.push(
                        load::request(addr, &mut conn, &mut buf, Mode::KeepAlive, epoch).await,
                    );
                    seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    pause = uniform(seed, INTERMITTENT_IDLE);
                }
                samples
            })
        })
        .collect();
    std::thread::sleep(cfg.intermittent_warmup);
    let mut marks = Vec::new();
    let mut timings = Timings::default();
    let mut outcome = Ok(());
    for i in 0..cfg.intermittent_upgrades {
        match svc.upgrade() {
            Ok(u) => {
                timings.push(&u);
                marks.push(UpgradeMark::of(epoch, &u));
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
        std::thread::sleep(uniform(0xB5AD_4ECE_DA1C_E2A9 ^ i as u64, INTERMITTENT_GAP));
    }
    let _ = stop.send(true);
    let duration_s = epoch.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(
            rt.block_on(c)
                .map_err(|e| Error::msg(format!("intermittent client: {e}")))?,
        );
    }
    outcome?;
    svc.stop(Duration::from_secs(30))?;
    samples.sort_by_key(|s| s.start_us);
    let failed_during_upgrades = samples
        .iter()
        .filter(|s| s.outcome != Outcome::Ok)
        .filter(|s| {
            marks
                .iter()
                .any(|m| s.start_us >= m.hup_us && s.start_us <= m.gone_us)
        })
        .count();
    Ok(IntermittentResult {
        kind,
        clients: cfg.intermittent_clients,
        duration_s,
        stats: ModeStats::of(Mode::KeepAlive, &samples),
        failed_during_upgrades,
        upgrades: marks,
        timings,
        samples,
    })
}

/// Many consecutive upgrades of one library: the resource use of every
/// generation.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ManyResult {
    pub(crate) kind: Kind,
    pub(crate) upgrades: usize,
    pub(crate) timings: Timings,
    pub(crate) generations: Vec<Generation>,
}

/// `count` consecutive upgrades.
pub(crate) fn many_upgrades(lab: &Lab, kind: Kind, count: usize) -> Result<ManyResult, Error> {
    let (mut svc, _) = Service::start(lab, kind, local(free_port()?), 1)?;
    let mut generations = vec![settle(&svc, 0)?];
    let mut timings = Timings::default();
    for i in 1..=count {
        timings.push(&svc.upgrade()?);
        generations.push(settle(&svc, i)?);
        if i % 50 == 0 {
            eprint!("\r  generations: {i}/{count} upgrades ({})", kind.name());
        }
    }
    eprintln!();
    svc.stop(Duration::from_secs(10))?;
    Ok(ManyResult {
        kind,
        upgrades: count,
        timings,
        generations,
    })
}

/// Overhead of one service kind.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct OverheadResult {
    pub(crate) kind: Kind,
    /// spawn → `READY=1`, ms.
    pub(crate) startup: Vec<f64>,
    /// Right after readiness.
    pub(crate) at_ready: Vec<Usage>,
    /// After `overhead_requests` keep-alive requests.
    pub(crate) loaded: Vec<Usage>,
    /// The binary's file size, and what of it is loaded (`PT_LOAD`).
    pub(crate) file_bytes: u64,
    pub(crate) loaded_bytes: u64,
}

/// Fresh starts of each service, interleaved: startup time and RSS.
pub(crate) fn overhead(
    lab: &Lab,
    rt: &Runtime,
    cfg: &Config,
) -> Result<Vec<OverheadResult>, Error> {
    let mut kinds = vec![Kind::Tokio, Kind::Tableflip, Kind::Ecdysis];
    if lab.go {
        kinds.push(Kind::GoTableflip);
    }
    let mut results: Vec<OverheadResult> = kinds
        .iter()
        .map(|&kind| {
            let path = lab.bin_dir.join(kind.binary());
            let (file_bytes, loaded_bytes) = crate::elf::sizes(&path)?;
            Ok(OverheadResult {
                kind,
                startup: Vec::new(),
                at_ready: Vec::new(),
                loaded: Vec::new(),
                file_bytes,
                loaded_bytes,
            })
        })
        .collect::<Result<_, Error>>()?;
    for _ in 0..cfg.overhead_rounds {
        for result in &mut results {
            let (svc, start) = Service::start(lab, result.kind, local(free_port()?), 1)?;
            result.startup.push(ms(start.ready));
            result.at_ready.push(svc.usage());
            let addr = svc.addr;
            let requests = cfg.overhead_requests;
            let failed = rt.block_on(async move {
                let mut conn = None;
                let mut buf = Vec::new();
                let epoch = Instant::now();
                let mut failed = 0;
                for _ in 0..requests {
                    let s = load::request(addr, &mut conn, &mut buf, Mode::KeepAlive, epoch).await;
                    if s.outcome != Outcome::Ok {
                        failed += 1;
                    }
                }
                failed
            });
            if failed > 0 {
                return Err(Error::msg(format!(
                    "{}: {failed} requests failed without any upgrade",
                    result.kind.name()
                )));
            }
            result.loaded.push(svc.usage());
            svc.stop(Duration::from_secs(10))?;
        }
    }
    Ok(results)
}

/// Application state handed over at one size (tableflip, replace mode).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct StateResult {
    /// MiB each generation hands over (0: no state source at all).
    pub(crate) state_mib: usize,
    pub(crate) upgrades: Timings,
    /// Peak RSS (`VmHWM`) of each new generation once it serves alone:
    /// what it built for its own state, plus the copy it read, KiB.
    pub(crate) new_hwm_kib: Vec<u64>,
    /// RSS of each new generation once it serves alone, KiB.
    pub(crate) new_rss_kib: Vec<u64>,
}

/// The application state's cost: at each size of `cfg.state_mib`,
/// `cfg.state_upgrades` rounds of a fresh tableflip service that builds
/// that much state, is upgraded once (the old generation hands the state
/// over, the new one reads and checks it before its readiness), and is
/// stopped.
pub(crate) fn state(lab: &Lab, cfg: &Config) -> Result<Vec<StateResult>, Error> {
    let mut all = Vec::new();
    for &mib in &cfg.state_mib {
        let mut result = StateResult {
            state_mib: mib,
            upgrades: Timings::default(),
            new_hwm_kib: Vec::new(),
            new_rss_kib: Vec::new(),
        };
        for done in 1..=cfg.state_upgrades {
            let env = [("BENCH_STATE_MIB", mib.to_string())];
            let (mut svc, _) =
                Service::start_env(lab, Kind::Tableflip, local(free_port()?), 1, None, &env)?;
            settle(&svc, 0)?;
            let u = svc.upgrade()?;
            result.upgrades.push(&u);
            let g = settle(&svc, 1)?;
            result.new_rss_kib.push(g.usage.rss_kib);
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", svc.pid)).unwrap_or_default();
            result
                .new_hwm_kib
                .push(crate::procs::proc_field(&status, "VmHWM:"));
            svc.stop(Duration::from_secs(10))?;
            eprint!(
                "\r  state {mib} MiB: {done}/{} upgrades",
                cfg.state_upgrades
            );
        }
        eprintln!();
        all.push(result);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn every_library_follows_every_library_as_often() {
        for n in [2, 3] {
            let rounds = 6 * 5;
            let seq: Vec<usize> = (1..=rounds).flat_map(|r| round_order(n, r)).collect();
            // follows[a][b]: how often a's turn came right after b's,
            // across round boundaries and from the last round to the
            // first (the rounds taken as a cycle).
            let mut follows = vec![vec![0usize; n]; n];
            for (i, &a) in seq.iter().enumerate() {
                let b = seq[(i + seq.len() - 1) % seq.len()];
                follows[a][b] += 1;
            }
            let each = seq.len() / (n * n);
            assert!(
                follows.iter().flatten().all(|&c| c == each),
                "{n} libraries: {follows:?}"
            );
            for r in 1..=rounds {
                let mut order = round_order(n, r);
                order.sort_unstable();
                assert_eq!(order, (0..n).collect::<Vec<_>>());
            }
        }
        assert_eq!(round_order(1, 7), vec![0]);
        assert_eq!(round_order(4, 1), vec![1, 2, 3, 0]);
    }
}
