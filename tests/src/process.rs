//! Processes: signals, states read from `/proc`, reaping the orphaned
//! generations, executables installed for a test.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{DEADLINE, wait_a_little};

/// `pid`, started by [`Service::spawn`](crate::service::Service::spawn), has been reaped: its number may be
/// reused by any process from now on.
pub(crate) fn forget_spawned(pid: u32) {
    SPAWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p| *p != pid);
}

pub(crate) fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: Signal) {
    kill(pid_of(pid), sig).unwrap_or_else(|e| panic!("cannot send {sig} to {pid}: {e}"));
}

/// Stops `pid` (`SIGSTOP`) and waits until every one of its threads is
/// stopped: `kill` returns once the signal is queued, and a thread that
/// is woken for another reason (a message on a socket) may still run until
/// the thread that takes the signal has stopped the whole process.
pub fn stop_process(pid: u32) {
    signal(pid, Signal::SIGSTOP);
    crate::harness::wait_until("every thread is stopped", || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.filter_map(Result::ok).all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')')?.1.trim_start().chars().next())
                .is_some_and(|c| c == 'T' || c == 't')
        })
    });
}

/// Sends `sig` to `pid` unless it has exited (`ESRCH`); whether it was
/// sent. For processes that may end on their own at any moment.
pub fn signal_if_alive(pid: u32, sig: Signal) -> bool {
    match kill(pid_of(pid), sig) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => panic!("cannot send {sig} to {pid}: {e}"),
    }
}

/// The process state letter from `/proc/<pid>/stat` (`Z` for a zombie), or
/// `None` once the process is gone (reaped).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// Whether `pid` is a zombie whose exit has been reported to its parent:
/// the parent has `SIGCHLD` pending (`ShdPnd` in `/proc/<parent>/status`),
/// which holds while the parent blocks the signal (a `signalfd`) and has not
/// read it. A zombie alone is not enough: the leader of a multi-threaded
/// process shows `Z` while its other threads are still exiting, and the
/// kernel tells the parent only once the last of them is gone.
pub fn exit_reported_to_parent(pid: u32) -> bool {
    const SIGCHLD_BIT: u64 = 1 << (libc::SIGCHLD - 1);
    if proc_state(pid) != Some('Z') {
        return false;
    }
    let Some(parent) = parent_of(pid) else {
        return false;
    };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{parent}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & SIGCHLD_BIT != 0)
}

/// Whether `pid` has begun to exit (the kernel's `PF_EXITING` flag, set
/// before the process's fds are closed), is a zombie, or is gone. A process
/// whose fds have been closed by its exit is always in one of these states,
/// though not necessarily a zombie yet.
pub fn exiting_or_gone(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return true;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    state == "Z" || state == "X" || flags & PF_EXITING != 0
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z')
}

/// The PIDs of the processes [`Service::spawn`](crate::service::Service::spawn) started (direct children,
/// reaped through their `std::process::Child`, never by [`wait_gone`]).
pub(crate) static SPAWNED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Whether [`adopt_orphans`] was called in this test binary.
pub(crate) static ADOPTING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes this test process the reaper of its orphaned descendants (Linux
/// `PR_SET_CHILD_SUBREAPER`): an old generation whose parent has exited is
/// adopted by the test rather than by PID 1, whose reaping is slow in some
/// sandboxes and absent in containers without an init. [`wait_gone`] then
/// reaps such an orphan itself, and [`stray_children`] sees every leftover
/// descendant.
///
/// Process-wide: call it in every test of a test binary, or in none.
pub fn adopt_orphans() {
    nix::sys::prctl::set_child_subreaper(true)
        .unwrap_or_else(|e| panic!("cannot become a child subreaper: {e}"));
    ADOPTING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The parent PID of `pid`, from `/proc/<pid>/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Processes (other than those [`Service::spawn`](crate::service::Service::spawn) started and not yet
/// reaped) whose parent is this test process: with [`adopt_orphans`],
/// every descendant left behind by a service ends up here.
pub fn stray_children() -> Vec<u32> {
    let me = std::process::id();
    let spawned = SPAWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| parent_of(*pid) == Some(me) && !spawned.contains(pid))
                .filter(|pid| Some(*pid) != crate::service::undertaker_pid())
                .collect()
        })
        .unwrap_or_default()
}

/// Reaps `pid` if it is a zombie this process adopted (see
/// [`adopt_orphans`]).
pub(crate) fn reap_adopted(pid: u32) {
    if !ADOPTING.load(std::sync::atomic::Ordering::SeqCst)
        || proc_state(pid) != Some('Z')
        || parent_of(pid) != Some(std::process::id())
        || SPAWNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&pid)
    {
        return;
    }
    let _ = nix::sys::wait::waitpid(pid_of(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Waits until `pid` is gone entirely (exited and reaped: no zombie). An
/// orphan this process adopted (see [`adopt_orphans`]) is reaped here.
pub fn wait_gone(pid: u32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        reap_adopted(pid);
        if proc_state(pid).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still exists (state {:?}) after {DEADLINE:?}",
            proc_state(pid)
        );
        wait_a_little();
    }
}

/// An executable copy of `exe` at `dest` (written under a temporary name,
/// then renamed over `dest`, so a running process's binary is replaced, not
/// modified), with `extra` bytes appended: an ELF file with trailing bytes
/// still runs, and its size tells the copies apart.
pub fn install_exe(exe: &str, dest: &Path, extra: usize) {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(exe).unwrap_or_else(|e| panic!("cannot read {exe}: {e}"));
    bytes.extend(std::iter::repeat_n(0u8, extra));
    let tmp = dest.with_extension("tmp");
    std::fs::write(&tmp, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dest)
        .unwrap_or_else(|e| panic!("cannot rename over {}: {e}", dest.display()));
}

/// Writes `text` as an executable script (mode 0755) and renames it over
/// `dest` (atomically, as a deploy replaces a binary).
pub fn install_script(dest: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dest.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dest)
        .unwrap_or_else(|e| panic!("cannot rename over {}: {e}", dest.display()));
}

/// `systemd-socket-activate` on `PATH` (Debian package systemd, which
/// `.ci/run` installs).
pub fn systemd_socket_activate() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("systemd-socket-activate"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "systemd-socket-activate is not installed: apt-get install systemd (.ci/run does it)"
            )
        })
}

/// The size of a file, in bytes.
pub fn file_size(path: impl AsRef<Path>) -> u64 {
    let path = path.as_ref();
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .len()
}

/// Whether this test process itself has `fd` open on `target` without
/// close-on-exec: then every process it starts inherits it, tableflip or
/// not (test runners and shells do leak such fds).
pub fn passed_down_by_the_test_runner(fd: &str, target: &str) -> bool {
    let same = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|t| t.display().to_string() == target);
    let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("flags:"))?.to_owned();
            u32::from_str_radix(line.trim_start_matches("flags:").trim(), 8).ok()
        });
    const O_CLOEXEC: u32 = 0o2_000_000;
    same && flags.is_some_and(|f| f & O_CLOEXEC == 0)
}

/// Sockets open in `pid`.
pub fn socket_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Whether the process `pid` was started with a version-2 handover (its
/// fds over a socket): `TABLEFLIP_HANDOVER_SOCKET` in the environment it
/// was `exec`ed with (`/proc/<pid>/environ` keeps it after the process
/// removed the variable).
pub fn handed_over_by_socket(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .any(|var| var.starts_with(b"TABLEFLIP_HANDOVER_SOCKET="))
}

/// The `listen` control file of the test service for `count` TCP
/// listeners `l0`, `l1`, … on 127.0.0.1, each on a port of its own.
pub fn many_tcp_listeners(count: usize) -> String {
    (0..count)
        .map(|i| format!("l{i} tcp 127.0.0.1:0\n"))
        .collect()
}
