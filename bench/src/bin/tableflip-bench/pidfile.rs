//! Readiness and the PID file's filesystem: the same tableflip service
//! upgraded with its PID file on tmpfs (the run directory, as /run is) and
//! on a disk-backed directory, taking turns. The new generation writes the
//! PID file before it tells its parent it is ready, so what the disk costs
//! there is on the path to readiness.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;
use crate::procs::{Kind, Lab, Service, free_port};
use crate::scenarios::{Config, Timings, local};
use crate::stats::Summary;

/// Upgrades with the PID file on one filesystem.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PidFileResult {
    /// The directory that held the PID file.
    pub(crate) dir: PathBuf,
    /// Its filesystem (`statfs`'s type: tmpfs, ext4, …).
    pub(crate) fs: String,
    pub(crate) upgrades: Timings,
}

/// A directory on a disk-backed filesystem for the PID file: the
/// temporary directory, else /var/tmp; `None` when both are tmpfs.
fn disk_dir() -> Option<(PathBuf, String)> {
    [std::env::temp_dir(), PathBuf::from("/var/tmp")]
        .into_iter()
        .find_map(|d| {
            let fs = fs_name(&d)?;
            (fs != "tmpfs").then_some((d, fs))
        })
}

/// The filesystem type of `dir`, by name where known.
fn fs_name(dir: &Path) -> Option<String> {
    use nix::sys::statfs::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC, statfs,
    };
    let t = statfs(dir).ok()?.filesystem_type();
    Some(
        match t {
            TMPFS_MAGIC => "tmpfs",
            // ext2, ext3 and ext4 share the magic.
            EXT4_SUPER_MAGIC => "ext4",
            XFS_SUPER_MAGIC => "xfs",
            BTRFS_SUPER_MAGIC => "btrfs",
            _ => return Some(format!("{:#x}", t.0)),
        }
        .to_owned(),
    )
}

/// `cfg.upgrades` upgrades of tableflip with the PID file in the run
/// directory and as many with it on a disk-backed directory, taking
/// turns. Empty (with a message) when no disk-backed directory is found.
pub(crate) fn pid_file(lab: &Lab, cfg: &Config) -> Result<Vec<PidFileResult>, Error> {
    let Some((disk, disk_fs)) = disk_dir() else {
        eprintln!("  pidfile: skipped: the temporary directory and /var/tmp are both tmpfs");
        return Ok(Vec::new());
    };
    let dir = disk.join(format!("tableflip-bench-pid-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::msg(format!("cannot create {}: {e}", dir.display())))?;
    let result = run(lab, cfg, &dir, disk_fs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(lab: &Lab, cfg: &Config, disk: &Path, disk_fs: String) -> Result<Vec<PidFileResult>, Error> {
    let (on_tmpfs, _) = Service::start(lab, Kind::Tableflip, local(free_port()?), 1)?;
    let disk_file = disk.join("svc.pid");
    let (on_disk, _) = Service::start_env(
        lab,
        Kind::Tableflip,
        local(free_port()?),
        1,
        None,
        &[("PID_FILE", disk_file.display().to_string())],
    )?;
    let mut services = [on_tmpfs, on_disk];
    let mut results = [
        PidFileResult {
            dir: lab.run_dir.clone(),
            fs: fs_name(&lab.run_dir).unwrap_or_else(|| "unknown".to_owned()),
            upgrades: Timings::default(),
        },
        PidFileResult {
            dir: disk.to_owned(),
            fs: disk_fs,
            upgrades: Timings::default(),
        },
    ];
    for done in 1..=cfg.upgrades {
        let order = if done % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let u = services[i].upgrade()?;
            results[i].upgrades.push(&u);
        }
        if done % 10 == 0 || done == cfg.upgrades {
            eprint!("\r  pidfile: {done}/{} upgrades of each", cfg.upgrades);
        }
    }
    eprintln!();
    for svc in services {
        svc.stop(Duration::from_secs(10))?;
    }
    Ok(results.to_vec())
}

/// The difference of the medians of SIGHUP → ready, disk − tmpfs, in ms,
/// with both figures.
pub(crate) fn difference(results: &[PidFileResult]) -> Option<(f64, f64, String)> {
    let [tmpfs, disk] = results else {
        return None;
    };
    let (t, d) = (
        Summary::of_ms(&tmpfs.upgrades.ready).p50,
        Summary::of_ms(&disk.upgrades.ready).p50,
    );
    Some((t, d, disk.fs.clone()))
}

/// The section's table.
pub(crate) fn table(results: &[PidFileResult], out: &mut String) {
    if results.is_empty() {
        return;
    }
    let n = results[0].upgrades.ready.len();
    let _ = writeln!(
        out,
        "### Readiness and the PID file's filesystem: tableflip ({n} upgrades on each, taking turns; ms)\n"
    );
    let _ = writeln!(
        out,
        "| PID file in | filesystem | SIGHUP → ready median | p90 | SIGHUP → PID file names the new generation, median |\n|---|---|---|---|---|"
    );
    for r in results {
        let ready = Summary::of_ms(&r.upgrades.ready);
        // Watched in the run directory only.
        let pid = if r.upgrades.pid_file.is_empty() {
            "–".to_owned()
        } else {
            format!("{:.2}", Summary::of_ms(&r.upgrades.pid_file).p50)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {pid} |",
            r.dir.display(),
            r.fs,
            ready.p50,
            ready.p90,
        );
    }
    let _ = writeln!(out);
}
