//! `tableflip-ctl`: asks a running tableflip service, through its control
//! socket (see `tableflip::ctl`), to upgrade, and waits for the outcome; or
//! prints its status.
//!
//! Exit status of `upgrade` (see `--help`): 0 upgraded, 1 the upgrade
//! failed, 2 usage, 3 refused, 4 joined an upgrade that was already running
//! and succeeded, 5 the service cannot be reached (or its answer cannot be
//! read), 6 no answer within `--timeout`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tableflip::ctl::{Command, Reply, Request, Status};

/// Upgrade a tableflip service and learn whether it worked, or read its
/// status, through its control socket.
#[derive(Debug, Parser)]
#[command(
    name = "tableflip-ctl",
    version,
    after_help = "Exit status of `upgrade`:\n  \
    0  the upgrade this command started succeeded: the new generation is ready\n  \
    1  the upgrade failed (the new generation exited, was killed, timed out or could not be started; or, with --wait-probation, it died during its probation and was rolled back); the old one (or the previous binary) serves on\n  \
    2  usage error\n  \
    3  refused: no upgrade was started (the service is stopping, or cannot upgrade now)\n  \
    4  an upgrade was already running; it was joined and succeeded (it may have started before your binary was in place: run again to be sure)\n  \
    5  the service cannot be reached (no socket, no such process, permission denied) or its answer cannot be read\n  \
    6  no answer within --timeout: the outcome is unknown"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start an upgrade (or join the one running) and wait for its outcome;
    /// print it as one JSON line.
    Upgrade {
        #[command(flatten)]
        target: Target,
        /// How long to wait for the outcome ("90s", "500ms", "5m").
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        timeout: Duration,
        /// Answer only once the new generation's probation is over (the
        /// service's `probation` option): a new release that crashes
        /// meanwhile is rolled back, and this exits 1 with failure
        /// `rolled_back`.
        #[arg(long)]
        wait_probation: bool,
    },
    /// Print the service's mode, state, generation, processes, uptime and
    /// last upgrade.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the status as one JSON line.
        #[arg(long)]
        json: bool,
        /// How long to wait for the answer.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
}

/// Which service.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// The control socket's path (`$RUNTIME_DIRECTORY/tableflip.sock` under
    /// systemd, or the service's `control_socket` option).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The service's PID file: the control socket is found among the
    /// process's listening Unix sockets (one whose file name starts with
    /// `tableflip`).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// The service's main process: the supervisor (supervised mode) or the
    /// serving generation (replace mode), as the PID file names it; as
    /// with --pid-file.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
}

/// Exit statuses.
mod status {
    pub(crate) const UPGRADED: u8 = 0;
    pub(crate) const FAILED: u8 = 1;
    pub(crate) const REFUSED: u8 = 3;
    pub(crate) const JOINED: u8 = 4;
    pub(crate) const UNREACHABLE: u8 = 5;
    pub(crate) const TIMEOUT: u8 = 6;
}

/// Why there is no answer.
#[derive(Debug)]
enum NoAnswer {
    Unreachable(String),
    Timeout(String),
}

impl NoAnswer {
    fn report(self) -> ExitCode {
        match self {
            NoAnswer::Unreachable(e) => {
                eprintln!("tableflip-ctl: {e}");
                ExitCode::from(status::UNREACHABLE)
            }
            NoAnswer::Timeout(e) => {
                eprintln!("tableflip-ctl: {e}");
                ExitCode::from(status::TIMEOUT)
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Upgrade {
            target,
            timeout,
            wait_probation,
        } => upgrade(&target, timeout, wait_probation),
        Cmd::Status {
            target,
            json,
            timeout,
        } => status(&target, json, timeout),
    }
}

fn upgrade(target: &Target, timeout: Duration, wait_probation: bool) -> ExitCode {
    let deadline = Instant::now() + timeout;
    let path = match socket_path(target) {
        Ok(p) => p,
        Err(e) => return e.report(),
    };
    let request = Request {
        command: Command::Upgrade,
        wait_probation,
    };
    let reply = match ask(&path, request, deadline) {
        Ok(r) => r,
        Err(e) => return e.report(),
    };
    println!("{}", line(&reply));
    match reply {
        Reply::Upgraded { joined: false, .. } => ExitCode::from(status::UPGRADED),
        Reply::Upgraded { joined: true, .. } => {
            eprintln!(
                "tableflip-ctl: an upgrade was already running and succeeded; it may have started before your binary was in place: run again to be sure"
            );
            ExitCode::from(status::JOINED)
        }
        Reply::Failed {
            failure,
            error,
            joined,
            ..
        } => {
            let which = if joined {
                "the upgrade (already running; joined)"
            } else {
                "the upgrade"
            };
            eprintln!(
                "tableflip-ctl: {which} failed ({}): {error}",
                failure.as_str()
            );
            ExitCode::from(status::FAILED)
        }
        Reply::Refused { error } => {
            eprintln!("tableflip-ctl: upgrade refused: {error}");
            ExitCode::from(status::REFUSED)
        }
        other => {
            eprintln!("tableflip-ctl: unexpected answer: {}", line(&other));
            ExitCode::from(status::UNREACHABLE)
        }
    }
}

fn status(target: &Target, json: bool, timeout: Duration) -> ExitCode {
    let deadline = Instant::now() + timeout;
    let path = match socket_path(target) {
        Ok(p) => p,
        Err(e) => return e.report(),
    };
    let request = Request {
        command: Command::Status,
        wait_probation: false,
    };
    match ask(&path, request, deadline) {
        Ok(Reply::Status(s)) => {
            if json {
                println!("{}", line(&Reply::Status(s)));
            } else {
                print!("{}", human(&s));
            }
            ExitCode::SUCCESS
        }
        Ok(Reply::Refused { error }) => {
            eprintln!("tableflip-ctl: refused: {error}");
            ExitCode::from(status::REFUSED)
        }
        Ok(other) => {
            eprintln!("tableflip-ctl: unexpected answer: {}", line(&other));
            ExitCode::from(status::UNREACHABLE)
        }
        Err(e) => e.report(),
    }
}

fn line(reply: &Reply) -> String {
    let bytes = reply.to_line();
    String::from_utf8_lossy(bytes.strip_suffix(b"\n").unwrap_or(&bytes)).into_owned()
}

/// The status, for a person.
fn human(s: &Status) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    row("mode", s.mode.clone());
    row("state", s.state.clone());
    row("generation", s.generation.to_string());
    row("pid", s.pid.to_string());
    if let Some(sup) = s.supervisor_pid {
        row("supervisor", sup.to_string());
    }
    let pids: Vec<String> = s.pids.iter().map(u32::to_string).collect();
    row("processes", pids.join(" "));
    row(
        "uptime",
        humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000)).to_string(),
    );
    match &s.last_upgrade {
        None => row("last upgrade", "none".to_owned()),
        Some(u) => {
            let ago = tableflip_now_ms().saturating_sub(u.ended_unix_ms) / 1000;
            let ago = humantime::format_duration(Duration::from_secs(ago));
            let what = if u.rolled_back {
                format!(
                    "ROLLED BACK: {} ({ago} ago)",
                    u.error.as_deref().unwrap_or("")
                )
            } else if u.ok {
                format!(
                    "succeeded: generation {} in {} ms, {ago} ago",
                    u.generation, u.duration_ms
                )
            } else {
                format!(
                    "failed ({}): {} (after {} ms, {ago} ago)",
                    u.failure.map_or("other", |f| f.as_str()),
                    u.error.as_deref().unwrap_or(""),
                    u.duration_ms
                )
            };
            row("last upgrade", what);
        }
    }
    out
}

fn tableflip_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends `command`, returns the answer. A `retry` answer (a generation
/// that has just handed over) is asked again until the deadline.
fn ask(path: &Path, request: Request, deadline: Instant) -> Result<Reply, NoAnswer> {
    let mut pause = Duration::from_millis(20);
    loop {
        match ask_once(path, request, deadline)? {
            Reply::Retry { error } => {
                if Instant::now() + pause >= deadline {
                    return Err(NoAnswer::Timeout(format!(
                        "no answer in time: the last one said: {error}"
                    )));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            reply => return Ok(reply),
        }
    }
}

fn ask_once(path: &Path, request: Request, deadline: Instant) -> Result<Reply, NoAnswer> {
    let shown = path.display();
    let mut stream = connect(path, deadline).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return NoAnswer::Timeout(format!(
                "cannot connect to {shown} in time: the service does not accept (stuck, or its backlog is full)"
            ));
        }
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => " (is the service running, with a control socket?)",
            std::io::ErrorKind::PermissionDenied => {
                " (the socket is the service's user's only: run as that user or root)"
            }
            std::io::ErrorKind::ConnectionRefused => {
                " (nothing listens on it: a stale file, or not a socket?)"
            }
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                " (the service does not accept: stuck, or its backlog is full)"
            }
            _ => "",
        };
        NoAnswer::Unreachable(format!("cannot connect to {shown}: {e}{hint}"))
    })?;
    let mut line = serde_json::to_vec(&request)
        .map_err(|e| NoAnswer::Unreachable(format!("cannot encode the request: {e}")))?;
    line.push(b'\n');
    // A service that refuses (a peer of another user) answers at once and
    // closes: the write may fail, and the answer is still there to read.
    let sent = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    if let Err(e) = sent {
        let mut early = Vec::new();
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)));
        let _ = reader.read_until(b'\n', &mut early);
        return serde_json::from_slice(&early).map_err(|_| {
            NoAnswer::Unreachable(format!("cannot send the request to {shown}: {e}"))
        });
    }
    let mut answer = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NoAnswer::Timeout(format!(
                "no answer from {shown} in time; the upgrade may still be running (see `tableflip-ctl status`)"
            )));
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| NoAnswer::Unreachable(format!("{shown}: {e}")))?;
        match reader.read_until(b'\n', &mut answer) {
            Ok(0) if answer.is_empty() => {
                return Err(NoAnswer::Unreachable(format!(
                    "{shown} closed the connection without an answer"
                )));
            }
            Ok(_) if answer.ends_with(b"\n") => break,
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(NoAnswer::Unreachable(format!(
                    "cannot read the answer from {shown}: {e}"
                )));
            }
        }
    }
    serde_json::from_slice(&answer).map_err(|e| {
        NoAnswer::Unreachable(format!(
            "{shown} answered something that is not a tableflip reply ({e}): {}",
            String::from_utf8_lossy(&answer).trim()
        ))
    })
}

/// Connects to `path`, giving up at `deadline` (a service that does not
/// accept, its backlog full, would block a plain `connect` for ever).
fn connect(path: &Path, deadline: Instant) -> std::io::Result<UnixStream> {
    let addr = socket2::SockAddr::unix(path)?;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // A Unix stream connect waits for room in the backlog up to the send
    // timeout (unix(7); net/unix/af_unix.c), then fails with EAGAIN.
    let left = deadline.saturating_duration_since(Instant::now());
    socket.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
    socket.connect(&addr)?;
    socket.set_write_timeout(None)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// The control socket named by `target`.
fn socket_path(target: &Target) -> Result<PathBuf, NoAnswer> {
    if let Some(p) = &target.socket {
        return Ok(p.clone());
    }
    let pid = match (&target.pid_file, target.pid) {
        (_, Some(pid)) => pid,
        (Some(file), None) => read_pid_file(file)?,
        (None, None) => {
            return Err(NoAnswer::Unreachable(
                "one of --socket, --pid-file or --pid is required".to_owned(),
            ));
        }
    };
    find_control_socket(pid)
}

fn read_pid_file(file: &Path) -> Result<u32, NoAnswer> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| NoAnswer::Unreachable(format!("cannot read {}: {e}", file.display())))?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            NoAnswer::Unreachable(format!(
                "{} does not hold a PID: {:?}",
                file.display(),
                text.trim()
            ))
        })
}

/// Finds, among the listening Unix sockets that process `pid` holds (its
/// `/proc/<pid>/fd` links `socket:[inode]`, matched against
/// `/proc/net/unix`), the one whose file name starts with `tableflip`.
fn find_control_socket(pid: u32) -> Result<PathBuf, NoAnswer> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such process".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (run as the service's user or root, or pass --socket)".to_owned()
            }
            _ => e.to_string(),
        };
        NoAnswer::Unreachable(format!("cannot look at the fds of pid {pid}: {why}"))
    })?;
    let mut inodes = std::collections::HashSet::new();
    for entry in entries.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(ino) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                inodes.insert(ino);
            }
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix"))
        .or_else(|_| std::fs::read_to_string("/proc/net/unix"))
        .map_err(|e| NoAnswer::Unreachable(format!("cannot read /proc/net/unix: {e}")))?;
    let listening = unix_listeners(&table, &inodes);
    let found: Vec<&PathBuf> = listening
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tableflip"))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let seen: Vec<String> = listening.iter().map(|p| p.display().to_string()).collect();
            Err(NoAnswer::Unreachable(format!(
                "pid {pid} has no control socket whose file name starts with `tableflip` (its listening Unix sockets: {}); pass --socket",
                if seen.is_empty() {
                    "none".to_owned()
                } else {
                    seen.join(", ")
                }
            )))
        }
        many => {
            let seen: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            Err(NoAnswer::Unreachable(format!(
                "pid {pid} has several candidate control sockets ({}); pass --socket",
                seen.join(", ")
            )))
        }
    }
}

/// The paths of the listening Unix sockets in `/proc/net/unix` (`table`)
/// whose inode is in `inodes`. Columns: `Num RefCount Protocol Flags Type
/// St Inode Path`; a listening socket has flag `__SO_ACCEPTCON`
/// (`00010000`), see `unix(7)` and the kernel's `af_unix.c`.
fn unix_listeners(table: &str, inodes: &std::collections::HashSet<u64>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for row in table.lines().skip(1) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let (Some(flags), Some(inode), Some(path)) = (cols.get(3), cols.get(6), cols.get(7)) else {
            continue;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & 0x0001_0000 != 0);
        let ours = inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i));
        if listening && ours && path.starts_with('/') {
            let p = PathBuf::from(path);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_the_kernels_table() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/app/tableflip.sock\n\
            0000000000000000: 00000002 00000000 00000000 0001 03 101 /run/app/tableflip.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 102 /run/app/http.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 103 @abstract\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 104 /run/other/tableflip.sock\n";
        let inodes: std::collections::HashSet<u64> = [100, 101, 102, 103].into_iter().collect();
        assert_eq!(
            unix_listeners(table, &inodes),
            vec![
                PathBuf::from("/run/app/tableflip.sock"),
                PathBuf::from("/run/app/http.sock")
            ]
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["tableflip-ctl", "upgrade"]).is_err());
        assert!(
            Cli::try_parse_from(["tableflip-ctl", "upgrade", "--pid", "1", "--socket", "/x"])
                .is_err()
        );
        let ok = Cli::try_parse_from([
            "tableflip-ctl",
            "upgrade",
            "--socket",
            "/x",
            "--timeout",
            "90s",
        ]);
        assert!(matches!(
            ok.map(|c| c.command),
            Ok(Cmd::Upgrade { timeout, .. }) if timeout == Duration::from_secs(90)
        ));
    }
}
