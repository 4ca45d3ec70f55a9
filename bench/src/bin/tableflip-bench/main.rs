//! The benchmark driver: measures tableflip against Cloudflare's ecdysis
//! (and plain tokio for overhead) in one run, on this machine, and prints
//! the results with ratios.
//!
//! ```text
//! cargo run --release -p tableflip-bench                # full run (~6 min), results in bench/results/
//! cargo run --release -p tableflip-bench -- --quick     # smoke run (~1 min), results in $TMPDIR
//! cargo run --release -p tableflip-bench -- --help
//! ```
//!
//! Run through `cargo run`, the driver first builds the three service
//! binaries of this package (`cargo build --bins`, the xtask pattern), with
//! the same profile, and the Go peer (`bench/go/`, Go's tableflip) with the
//! `go` found on `PATH` when there is one, so one command is enough. See
//! `BENCHMARKS.md` at the workspace root for the method.

mod elf;
mod load;
mod pidfile;
mod plot;
mod procs;
mod report;
mod scenarios;
mod stats;
mod supervisor;
mod tls;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use procs::{Kind, Lab, Reaper};
use report::{Machine, Report};
use scenarios::Config;

/// The driver's error: a message saying what failed.
#[derive(Debug)]
pub(crate) struct Error(String);

impl Error {
    /// An error with this message.
    pub(crate) fn msg(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

const USAGE: &str = "\
usage: tableflip-bench [--quick] [--out DIR] [--run-dir DIR] [--only SECTIONS]

  --quick         a smoke run (well under a minute), for CI
  --out DIR       where to write results.md, results.json and the SVG plots
                  (default: bench/results for a full run, $TMPDIR/tableflip-bench-quick
                  for --quick)
  --run-dir DIR   where the services' PID files and sockets go (default:
                  /dev/shm, tmpfs; a directory on a disk shows what fsync costs)
  --only SECTIONS comma-separated subset of: latency, pidfile, ballast, load, listeners,
                  drain, intermittent, generations, overhead, supervisor, state,
                  tls (default: all)

Go's tableflip is the third peer when `go` (on PATH) and the Debian package
golang-github-cloudflare-tableflip-dev are installed; otherwise it is
skipped with a message.";

const SECTIONS: [&str; 12] = [
    "latency",
    "pidfile",
    "ballast",
    "load",
    "listeners",
    "drain",
    "intermittent",
    "generations",
    "overhead",
    "supervisor",
    "state",
    "tls",
];

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    only: Vec<String>,
    /// Where the services' PID files and sockets go (default: a new
    /// directory in /dev/shm, tmpfs, as /run would be).
    run_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Args>, Error> {
    let mut args = Args {
        quick: false,
        out: None,
        only: SECTIONS.iter().map(|s| (*s).to_owned()).collect(),
        run_dir: None,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--quick") => args.quick = true,
            Some("--run-dir") => {
                let dir = it
                    .next()
                    .ok_or_else(|| Error::msg("--run-dir needs a directory"))?;
                args.run_dir = Some(dir.into());
            }
            Some("--out") => {
                let dir = it
                    .next()
                    .ok_or_else(|| Error::msg("--out needs a directory"))?;
                args.out = Some(dir.into());
            }
            Some("--only") => {
                let list = it
                    .next()
                    .and_then(|s| s.into_string().ok())
                    .ok_or_else(|| Error::msg("--only needs a list of sections"))?;
                args.only = list.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = args.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    return Err(Error::msg(format!(
                        "unknown section `{bad}`; expected some of {}",
                        SECTIONS.join(", ")
                    )));
                }
            }
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => {
                return Err(Error::msg(format!("unexpected argument {arg:?}\n{USAGE}")));
            }
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntableflip-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the service binaries when run through cargo; returns the
/// directory that holds them.
fn build_services() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::msg(format!("cannot find the driver's executable: {e}")))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::msg("the driver's executable has no directory"))?
        .to_owned();
    if let Some(cargo) = std::env::var_os("CARGO") {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "tableflip-bench",
            "--manifest-path",
        ])
        .arg(&manifest);
        // The variables `cargo run` set for this driver describe this
        // package; a build script that watches one (ring's watches
        // CARGO_MANIFEST_DIR) would see it change between `cargo run` and
        // this build, and everything that depends on it would be rebuilt
        // at every run, twice.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .iter()
            .any(|p| name.starts_with(p))
            {
                cmd.env_remove(name);
            }
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        eprintln!("building the service binaries: {cmd:?}");
        let status = cmd
            .status()
            .map_err(|e| Error::msg(format!("cannot run cargo: {e}")))?;
        if !status.success() {
            return Err(Error::msg(format!(
                "building the services failed: {status}"
            )));
        }
    }
    let binaries = [Kind::Tableflip, Kind::Ecdysis, Kind::Tokio].map(Kind::binary);
    for binary in binaries.into_iter().chain([tls::TLS_BINARY]) {
        if !dir.join(binary).is_file() {
            return Err(Error::msg(format!(
                "{binary} is missing from {}; run the driver with `cargo run --release -p tableflip-bench`, \
                 or build first with `cargo build --release -p tableflip-bench --bins`",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// Where Debian's Go packages put their sources (`GOPATH` layout).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// The import path of Go's tableflip.
const GO_TABLEFLIP: &str = "github.com/cloudflare/tableflip";

/// Builds the Go peer (`bench/go/bench-go-tableflip`) into `bin_dir` with
/// the `go` found on `PATH`, in GOPATH mode against the Debian package of
/// Go's tableflip (no network). Returns `Ok(false)` after one message when
/// Go or the package is missing: the rest of the bench runs without it.
fn build_go(bin_dir: &Path) -> Result<bool, Error> {
    let skip = |why: String| {
        eprintln!(
            "Go's tableflip skipped: {why} (install them with `apt-get install golang-go golang-github-cloudflare-tableflip-dev`)"
        );
        Ok(false)
    };
    let Some(go) = find_on_path("go") else {
        return skip("`go` was not found on PATH".into());
    };
    // The user's GOPATH first, then Debian's.
    let mut gopath: Vec<PathBuf> = std::env::var_os("GOPATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    gopath.push(PathBuf::from(DEBIAN_GOPATH));
    if !gopath.iter().any(|p| {
        p.join("src")
            .join(GO_TABLEFLIP)
            .join("upgrader.go")
            .is_file()
    }) {
        return skip(format!(
            "{GO_TABLEFLIP} is not in GOPATH {} (Debian package golang-github-cloudflare-tableflip-dev)",
            std::env::join_paths(&gopath)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/bench-go-tableflip");
    if !source.join("main.go").is_file() {
        return skip(format!(
            "its source {} is not here (the driver runs outside its repository)",
            source.display()
        ));
    }
    let gopath = std::env::join_paths(&gopath)
        .map_err(|e| Error::msg(format!("cannot build GOPATH: {e}")))?;
    let out = bin_dir.join(Kind::GoTableflip.binary());
    let mut cmd = std::process::Command::new(&go);
    cmd.arg("build")
        .arg("-o")
        .arg(&out)
        .arg(".")
        .current_dir(&source)
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOFLAGS", "")
        .env("GOPROXY", "off");
    // Go needs a build cache; without HOME or GOCACHE, one next to the binary.
    if std::env::var_os("GOCACHE").is_none() && std::env::var_os("HOME").is_none() {
        cmd.env("GOCACHE", bin_dir.join("go-build-cache"));
    }
    eprintln!("building Go's tableflip service: {cmd:?}");
    let output = cmd
        .output()
        .map_err(|e| Error::msg(format!("cannot run {}: {e}", go.display())))?;
    if !output.status.success() {
        return Err(Error::msg(format!(
            "building the Go service in {} failed ({}):\n{}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    Ok(true)
}

/// The first executable file called `name` in a directory of `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Raises the soft fd limit to the hard one (the drain test holds 10 000
/// connections in the driver and in the service, which inherits it).
fn raise_fd_limit() -> Result<u64, Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| Error::msg(format!("getrlimit: {e}")))?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| Error::msg(format!("setrlimit: {e}")))?;
    Ok(hard)
}

fn run() -> Result<(), Error> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let started = Instant::now();
    let bin_dir = build_services()?;
    let go = build_go(&bin_dir)?;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; measure with `cargo run --release`");
    }
    let mut machine = Machine::describe();
    let cfg = Config::new(args.quick);
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            std::env::temp_dir().join("tableflip-bench-quick")
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
        }
    });
    std::fs::create_dir_all(&out)
        .map_err(|e| Error::msg(format!("cannot create {}: {e}", out.display())))?;
    let fd_limit = raise_fd_limit()?;
    let needed = cfg.drain_conns as u64 + 1000;
    if args.only.iter().any(|s| s == "drain") && fd_limit < needed {
        return Err(Error::msg(format!(
            "the drain test needs {needed} fds; the hard limit is {fd_limit} (raise it with ulimit -Hn)"
        )));
    }
    let needed = cfg.intermittent_clients as u64 + 1000;
    if args.only.iter().any(|s| s == "intermittent") && fd_limit < needed {
        return Err(Error::msg(format!(
            "the intermittent test needs {needed} fds; the hard limit is {fd_limit} (raise it with ulimit -Hn)"
        )));
    }
    // PID files and sockets on tmpfs when there is one, as /run would be.
    let shm = Path::new("/dev/shm");
    let base = match &args.run_dir {
        Some(dir) => dir.clone(),
        None if shm.is_dir() => shm.to_owned(),
        None => std::env::temp_dir(),
    };
    let run_dir = base.join(format!("tableflip-bench-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| Error::msg(format!("cannot create {}: {e}", run_dir.display())))?;

    // From here on the reaper thread owns every child's exit status.
    let reaper = Reaper::start()?;
    let lab = Lab::new(bin_dir, run_dir.clone(), reaper, go);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::msg(format!("cannot start the tokio runtime: {e}")))?;

    let mut report = Report {
        config: Some(cfg.clone()),
        ..Report::default()
    };
    let on = |s: &str| args.only.iter().any(|o| o == s);
    eprintln!(
        "tableflip-bench: {} run; services in {}",
        if cfg.quick { "quick" } else { "full" },
        run_dir.display()
    );
    if on("latency") {
        eprintln!("upgrade latency and exec floor");
        report.latency = scenarios::latency(&lab, &cfg)?;
        plot::latency_cdf(&report.latency, &out.join("upgrade_latency.svg"))?;
    }
    if on("pidfile") {
        eprintln!("readiness and the PID file's filesystem");
        report.pid_file = pidfile::pid_file(&lab, &cfg)?;
    }
    if on("ballast") {
        eprintln!(
            "upgrade latency against memory size: {:?} MiB",
            cfg.ballast_mib
        );
        report.ballast = scenarios::ballast(&lab, &cfg)?;
    }
    if on("load") {
        for kind in lab.peers() {
            eprintln!("under load: {}", kind.name());
            report
                .load
                .push(scenarios::under_load(&lab, &rt, &cfg, kind)?);
        }
        plot::around_upgrades(&report.load, &out.join("load_around_upgrades.svg"))?;
        plot::timeline(&report.load, &out.join("load_timeline.svg"))?;
    }
    if on("listeners") {
        eprintln!("scale: listeners");
        report.listeners = scenarios::listeners(&lab, &cfg)?;
    }
    if on("drain") {
        for &load in &cfg.drain_loads {
            for kind in lab.peers() {
                eprintln!(
                    "scale: drain {} connections, {}: {}",
                    cfg.drain_conns,
                    load.name(),
                    kind.name()
                );
                report
                    .drain
                    .push(scenarios::drain(&lab, &rt, &cfg, kind, load)?);
            }
        }
    }
    if on("intermittent") {
        for kind in lab.peers() {
            eprintln!(
                "intermittent clients: {} keep-alive clients idle 0.5–5 s between requests, {} upgrades: {}",
                cfg.intermittent_clients,
                cfg.intermittent_upgrades,
                kind.name()
            );
            report
                .intermittent
                .push(scenarios::intermittent(&lab, &rt, &cfg, kind)?);
        }
        plot::intermittent(&report.intermittent, &out.join("intermittent.svg"))?;
    }
    if on("generations") {
        eprintln!("scale: {} consecutive upgrades", cfg.many_upgrades);
        report.many.push(scenarios::many_upgrades(
            &lab,
            Kind::Tableflip,
            cfg.many_upgrades,
        )?);
        // ecdysis needs at least 0.5 s per upgrade (see BENCHMARKS.md):
        // its series is the latency test's, when that ran.
        let mut series: Vec<(&str, &[scenarios::Generation])> =
            vec![("tableflip", &report.many[0].generations)];
        if let Some(ec) = report.latency.iter().find(|l| l.kind == Kind::Ecdysis) {
            series.push(("ecdysis (latency test)", &ec.generations));
        }
        if let Some(go) = report.latency.iter().find(|l| l.kind == Kind::GoTableflip) {
            series.push(("Go tableflip (latency test)", &go.generations));
        }
        plot::generations(&series, &out.join("generations.svg"))?;
    }
    if on("overhead") {
        eprintln!("overhead against plain tokio");
        report.overhead = scenarios::overhead(&lab, &rt, &cfg)?;
    }
    if on("supervisor") {
        eprintln!("supervised mode against replace mode");
        report.supervisor = Some(supervisor::supervisor(&lab, &rt, &cfg)?);
    }
    if on("state") {
        eprintln!("application state handed over: {:?} MiB", cfg.state_mib);
        report.state = scenarios::state(&lab, &cfg)?;
    }
    if on("tls") {
        eprintln!(
            "TLS resumption across upgrades: {} clients, {} upgrades",
            cfg.tls_clients, cfg.tls_upgrades
        );
        report.tls = tls::tls(&lab, &cfg)?;
    }
    // The peers' generations of the latency test, as table rows too.
    for peer in report.latency.iter().filter(|l| l.kind != Kind::Tableflip) {
        report.many.push(scenarios::ManyResult {
            kind: peer.kind,
            upgrades: peer.upgrades.ready.len(),
            timings: peer.upgrades.clone(),
            generations: peer.generations.clone(),
        });
    }
    machine.load_after = report::loadavg();
    report.machine = Some(machine);
    report.seconds = started.elapsed().as_secs_f64();

    let markdown = report.markdown();
    let write = |name: &str, content: &str| {
        std::fs::write(out.join(name), content)
            .map_err(|e| Error::msg(format!("cannot write {}: {e}", out.join(name).display())))
    };
    write("results.md", &markdown)?;
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::msg(format!("cannot encode the results: {e}")))?;
    write("results.json", &json)?;
    println!("\n{markdown}");
    eprintln!(
        "results written to {} in {:.0} s",
        out.display(),
        report.seconds
    );
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(())
}
