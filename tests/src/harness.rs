//! What every multi-process test holds: a deadline, the lock that
//! serialises such tests, a scratch directory, and waiting for conditions
//! (never a fixed sleep).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::process::adopt_orphans;

/// The default deadline for anything a test waits for. Generous: the suite
/// must pass on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises tests that fork, exec or send signals.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates a fresh, empty directory.
    pub fn new(tag: &str) -> Scratch {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Short: Unix socket paths must fit in 108 bytes.
        let path = PathBuf::from(format!("/tmp/tf-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Scratch { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a control file (creating or replacing it).
    pub fn write(&self, name: &str, content: &str) {
        let p = self.path.join(name);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
    }

    /// Removes a control file, if present.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path.join(name));
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polling interval for conditions with no event to wait on (process
/// states, files); always bounded by a deadline by the caller.
pub fn wait_a_little() {
    std::thread::sleep(Duration::from_millis(5));
}

/// Polls `cond` until it holds, failing with `what` after [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        wait_a_little();
    }
}

/// How many upgrades the load tests run: `TABLEFLIP_LOAD_UPGRADES`, else 20.
pub fn load_upgrades() -> usize {
    std::env::var("TABLEFLIP_LOAD_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// What a multi-process test holds while it runs: the lock that
/// serialises such tests, this process as the reaper of the generations it
/// starts (see [`adopt_orphans`]), and a scratch directory (removed when
/// the harness is dropped, after the services declared later in the test).
#[derive(Debug)]
pub struct Harness {
    /// The scratch directory: the services' control directory.
    pub ctl: Scratch,
    _serial: MutexGuard<'static, ()>,
}

impl Harness {
    /// Takes the lock, adopts orphans, creates the scratch directory.
    pub fn new(tag: &str) -> Harness {
        let serial = serial();
        adopt_orphans();
        Harness {
            ctl: Scratch::new(tag),
            _serial: serial,
        }
    }
}

/// An error's message followed by its sources, `: `-separated, as a log
/// line shows it (tableflip's errors do not repeat their source in their
/// own message).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}
