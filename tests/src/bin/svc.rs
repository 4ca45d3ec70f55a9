//! The service the integration tests drive: a small tableflip service on the
//! runtime API whose behaviour each generation reads from files in a control
//! directory, and which reports what happens as event lines on stdout.
//!
//! Environment (inherited unchanged by every generation):
//! - `TF_CTL`: the control directory (required);
//! - `TF_UPGRADE_TIMEOUT_MS`: `Options::upgrade_timeout`;
//! - `TF_PID_FILE`: `Options::pid_file`.
//! - `TF_NEW_TWICE`: call `Upgrader::new` a second time (event `new-twice`);
//! - `TF_FDS_ON_ERROR`: when `Upgrader::new` fails, list the fds still open
//!   (event `error-fds`).
//!
//! Control files, read by each generation when it starts:
//! - `listen`: lines `NAME NETWORK ADDRESS`: sockets to open (`NAME` `-`
//!   for a TCP listener opened with `Upgrader::listen`, named after its
//!   address);
//! - `init`: `ok` (default), `exit N`, `panic`, `hang`, `sigkill`, `abort`:
//!   what happens after the sockets are opened, instead of `ready()`; or
//!   `block`: event `blocked`, then wait until the file `unblock` exists,
//!   event `unblocked`, then `ready()`;
//! - `actions`: lines run in order before `ready()` (see `run_action`):
//!   `add-file NAME PATH`, `take-file NAME`, `add-conn NAME ADDR`,
//!   `take-conn-close NAME`, `take-conn-keep NAME`, `take-state NAME` (event
//!   `state-none`, or `state-taken len= bytes= fds=`), `chdir DIR`,
//!   `probe-child`, `upgrade-now`, `wait-parent`, `exhaust-fds N` (open
//!   `/dev/null` until `RLIMIT_NOFILE` is reached, then close `N` of them:
//!   event `exhausted free=N`; all are closed when the file `release-fds`
//!   appears, event `released-fds`);
//! - `prenew`: `block`: before `Upgrader::new`, event `pre-new`, then wait
//!   until the file `unblock-new` exists (a child held right after its
//!   spawn, before it has read the handover);
//! - `linger` (read when the generation's `exit()` resolves): if it exists
//!   and is empty or lists this PID, event `lingering`, then stay alive
//!   until the file `release` exists.
//!
//! Signal handlers are installed before anything is printed: `SIGHUP`
//! upgrades (each upgrade in its own task, so concurrent ones can be seen),
//! `SIGTERM` stops, `SIGUSR1` prints `stats`, `SIGUSR2` runs the actions
//! in the control file `usr2` (same syntax as `actions`).
//!
//! Main events: `start gen= has_parent= parent= cwd= exe_size=` (`cwd`: the
//! working directory as the kernel resolves it), `listening name= network=
//! addr= nonblock= cloexec= ino=` (`ino`: the socket's inode, the same in
//! every process sharing it), `ready fds= rss_kb= exe_size=`, `upgrade-ok
//! child=`, `upgrade-err kind= msg= [child=]`, `stopping`, `lingering`,
//! `exit`; `parent-exited` (action `wait-parent`); `stats fds= rss_kb=
//! fd_list=` on `SIGUSR1` (`fd_list`: `fd:target:flags,…`; the fd count
//! includes the one used to list them).
//!
//! Every event is one line: `EVENT <pid> <kind> [key=value…]`.
//!
//! With the single argument `--probe`, prints the fds it has open (besides
//! 0, 1, 2), the names of `TABLEFLIP_*`/`LISTEN_*` variables, and what an
//! `Upgrader` created then takes (`has_parent= gen= names=`), then exits:
//! used to check what a subprocess inherits.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::Duration;

use tableflip::{Error, Handover, Options, Upgrader};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::task::TaskTracker;

fn event(kind: &str, fields: &str) {
    let line = format!("EVENT {} {kind} {fields}\n", std::process::id());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::AlreadyCreated { .. } => "AlreadyCreated",
        Error::InvalidHandover { .. } => "InvalidHandover",
        Error::InheritMismatch { .. } => "InheritMismatch",
        Error::UnknownNetwork { .. } => "UnknownNetwork",
        Error::InvalidAddress { .. } => "InvalidAddress",
        Error::WrongType { .. } => "WrongType",
        Error::Listen { .. } => "Listen",
        Error::DuplicateName { .. } => "DuplicateName",
        Error::NoRuntime { .. } => "NoRuntime",
        Error::NotReady => "NotReady",
        Error::ParentAlive { .. } => "ParentAlive",
        Error::UpgradeInProgress { .. } => "UpgradeInProgress",
        Error::AlreadyUpgraded { .. } => "AlreadyUpgraded",
        Error::Stopped => "Stopped",
        Error::Spawn { .. } => "Spawn",
        Error::ChildExited { .. } => "ChildExited",
        Error::ChildKilled { .. } => "ChildKilled",
        Error::Timeout { .. } => "Timeout",
        Error::PidFile { .. } => "PidFile",
        Error::NotSupported => "NotSupported",
        Error::Pid1 => "Pid1",
        Error::AlreadyListening { .. } => "AlreadyListening",
        Error::StartDirectory { .. } => "StartDirectory",
        Error::SocketActivation { .. } => "SocketActivation",
        Error::State { .. } => "State",
        _ => "Other",
    }
}

/// Prints `upgrade-ok child=<pid>`, or `upgrade-err kind=… msg=…` with
/// `child=<pid>` when the error names the child process.
fn report_upgrade(result: Result<u32, Error>) {
    match result {
        Ok(pid) => event("upgrade-ok", &format!("child={pid}")),
        Err(e) => {
            let child = match &e {
                Error::ChildExited { pid, .. }
                | Error::ChildKilled { pid, .. }
                | Error::Timeout { pid, .. } => format!(" child={pid}"),
                Error::UpgradeInProgress {
                    child_pid: Some(child_pid),
                } => format!(" child={child_pid}"),
                _ => String::new(),
            };
            event(
                "upgrade-err",
                &format!("kind={} msg={}{child}", error_kind(&e), quote(&text(&e))),
            );
        }
    }
}

/// An error's message and its sources, as a log line shows them.
fn text(e: &(dyn std::error::Error + 'static)) -> String {
    tableflip_tests::error_text(e)
}

fn quote(s: &str) -> String {
    format!("{:?}", s)
}

fn ctl(name: &str) -> Option<String> {
    let dir = std::env::var_os("TF_CTL")?;
    std::fs::read_to_string(PathBuf::from(dir).join(name)).ok()
}

fn open_fds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds
}

/// `fd:target:flags,…` for every open fd (`flags` as in
/// `/proc/self/fdinfo`, octal; the listing's own fd shows an empty target:
/// it is closed by the time targets are read).
fn fd_list() -> String {
    open_fds()
        .into_iter()
        .map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|info| {
                    let line = info.lines().find(|l| l.starts_with("flags:"))?;
                    Some(line.trim_start_matches("flags:").trim().to_owned())
                })
                .unwrap_or_default();
            format!("{fd}:{target}:{flags}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn probe() {
    // The directory listing itself opens one fd; report it too, so the
    // caller can subtract it (it is the highest number).
    let fds: Vec<String> = open_fds()
        .into_iter()
        .filter(|fd| *fd > 2)
        .map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("{fd}:{target}")
        })
        .collect();
    let vars: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("TABLEFLIP") || k.starts_with("LISTEN_"))
        .collect();
    // A tableflip program, as a subprocess: whatever its environment
    // holds, it must not take a handover or sockets meant for its parent.
    let took = match Upgrader::new(Options::default()) {
        Ok(u) => format!(
            "has_parent={} gen={} names={}",
            u.has_parent(),
            u.generation(),
            u.fds().names().join(",")
        ),
        Err(e) => format!("upgrader-error={}", quote(&text(&e))),
    };
    println!("fds={} vars={} {took}", fds.join(","), vars.join(","));
}

fn nonblocking(fd: impl AsFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map(|f| nix::fcntl::OFlag::from_bits_retain(f).contains(nix::fcntl::OFlag::O_NONBLOCK))
        .unwrap_or(false)
}

/// `nonblock=… cloexec=… ino=…` of an fd: its flags, and the inode of the
/// open file (for a socket, the kernel socket: the same number in two
/// processes proves they share one socket).
fn fd_info(fd: impl AsFd) -> String {
    let fd = fd.as_fd();
    let ino = nix::sys::stat::fstat(fd).map(|s| s.st_ino).unwrap_or(0);
    format!(
        "nonblock={} cloexec={} ino={ino}",
        nonblocking(fd),
        cloexec(fd)
    )
}

fn cloexec(fd: impl AsFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map(|f| nix::fcntl::FdFlag::from_bits_retain(f).contains(nix::fcntl::FdFlag::FD_CLOEXEC))
        .unwrap_or(false)
}

/// Kept alive for the life of the generation.
#[derive(Default)]
struct Held {
    conns: Vec<Handover<std::net::TcpStream>>,
    files: Vec<Handover<std::fs::File>>,
    extra: Vec<std::fs::File>,
    children: Vec<std::process::Child>,
    ballast: Vec<Vec<u8>>,
}

async fn open_listeners(upg: &Upgrader) -> Result<(), Error> {
    let Some(spec) = ctl("listen") else {
        return Ok(());
    };
    for line in spec.lines().filter(|l| !l.trim().is_empty()) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (name, network, address, mode) = match parts.as_slice() {
            [n, net, a] => (n, net, a, None),
            [n, net, a, m] => (n, net, a, u32::from_str_radix(m, 8).ok()),
            _ => {
                event("bad-ctl", &format!("line={}", quote(line)));
                continue;
            }
        };
        let mut spec = tableflip::ListenSpec::new(*name, *network, *address);
        if let Some(mode) = mode {
            spec = spec.mode(mode);
        }
        match *network {
            // A std listener in blocking mode, served by a thread's
            // blocking accept loop (events `accepted`, `accept-err`).
            "stdtcp" => {
                let spec = tableflip::ListenSpec::new(*name, "tcp", *address);
                let l: std::net::TcpListener = upg.listen_with(&spec)?;
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let _ = l.set_nonblocking(false);
                event(
                    "listening",
                    &format!("name={name} network={network} addr={addr} {}", fd_info(&l)),
                );
                std::thread::spawn(move || {
                    loop {
                        match l.accept() {
                            Ok((mut s, _)) => {
                                event("accepted", "");
                                let _ = s.write_all(&reply());
                            }
                            Err(e) => {
                                event("accept-err", &format!("msg={}", quote(&text(&e))));
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                });
            }
            // `-`: the listener Go's API opens, named after its address.
            "tcp" | "tcp4" | "tcp6" if *name == "-" => {
                let l: tokio::net::TcpListener = upg.listen(network, address)?;
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                event(
                    "listening",
                    &format!("name={name} network={network} addr={addr} {}", fd_info(&l)),
                );
                let exit = upg.exit();
                TRACKER.spawn(async move {
                    tokio::select! {
                        () = serve_tcp(l) => {}
                        () = exit => {}
                    }
                });
            }
            "tcp" | "tcp4" | "tcp6" => {
                let l: tokio::net::TcpListener = upg.listen_with(&spec)?;
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                event(
                    "listening",
                    &format!("name={name} network={network} addr={addr} {}", fd_info(&l)),
                );
                let exit = upg.exit();
                TRACKER.spawn(async move {
                    tokio::select! {
                        () = serve_tcp(l) => {}
                        () = exit => {}
                    }
                });
            }
            "unix" => {
                let l: tokio::net::UnixListener = upg.listen_with(&spec)?;
                event(
                    "listening",
                    &format!(
                        "name={name} network={network} addr={address} {}",
                        fd_info(&l)
                    ),
                );
                let exit = upg.exit();
                TRACKER.spawn(async move {
                    tokio::select! {
                        () = serve_unix(l) => {}
                        () = exit => {}
                    }
                });
            }
            "udp" | "udp4" | "udp6" => {
                let s: tokio::net::UdpSocket = upg.listen_packet_with(&spec)?;
                let addr = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                event(
                    "listening",
                    &format!("name={name} network={network} addr={addr} {}", fd_info(&s)),
                );
                let exit = upg.exit();
                TRACKER.spawn(async move {
                    tokio::select! {
                        () = serve_udp(s) => {}
                        () = exit => {}
                    }
                });
            }
            "unixgram" => {
                let s: tokio::net::UnixDatagram = upg.listen_packet_with(&spec)?;
                event(
                    "listening",
                    &format!(
                        "name={name} network={network} addr={address} {}",
                        fd_info(&s)
                    ),
                );
                let exit = upg.exit();
                TRACKER.spawn(async move {
                    tokio::select! {
                        () = serve_unixgram(s) => {}
                        () = exit => {}
                    }
                });
            }
            "unixpacket" => {
                let s: tableflip::socket2::Socket = upg.listen_with(&spec)?;
                event(
                    "listening",
                    &format!(
                        "name={name} network={network} addr={address} {}",
                        fd_info(&s)
                    ),
                );
                std::mem::forget(s);
            }
            other => event("bad-ctl", &format!("network={other}")),
        }
    }
    Ok(())
}

fn reply() -> Vec<u8> {
    format!("pid {}\n", std::process::id()).into_bytes()
}

async fn serve_tcp(l: tokio::net::TcpListener) {
    loop {
        match l.accept().await {
            Ok((mut s, _)) => {
                TRACKER.spawn(async move {
                    let _ = s.write_all(&reply()).await;
                    let _ = s.shutdown().await;
                });
            }
            // EMFILE (action `exhaust-fds`): retry rather than stop serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve_unix(l: tokio::net::UnixListener) {
    loop {
        match l.accept().await {
            Ok((mut s, _)) => {
                TRACKER.spawn(async move {
                    let _ = s.write_all(&reply()).await;
                    let _ = s.shutdown().await;
                });
            }
            // EMFILE (action `exhaust-fds`): retry rather than stop serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve_udp(s: tokio::net::UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((_, from)) = s.recv_from(&mut buf).await {
        let _ = s.send_to(&reply(), from).await;
    }
}

async fn serve_unixgram(s: tokio::net::UnixDatagram) {
    let mut buf = [0u8; 1500];
    while let Ok((_, from)) = s.recv_from(&mut buf).await {
        if let Some(path) = from.as_pathname() {
            let _ = s.send_to(&reply(), path).await;
        }
    }
}

async fn run_action(upg: &Upgrader, held: &mut Held, line: &str) {
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        ["add-file", name, path] => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path);
            match file
                .map_err(|e| e.to_string())
                .and_then(|f| upg.fds().add_file(name, f).map_err(|e| e.to_string()))
            {
                Ok(h) => {
                    event("added-file", &format!("name={name}"));
                    held.files.push(h);
                }
                Err(e) => event("action-err", &format!("action=add-file msg={}", quote(&e))),
            }
        }
        // The state the previous generation handed over.
        ["take-state", name] => match upg.inherited_state(name) {
            Ok(None) => event("state-none", ""),
            Ok(Some(state)) => event(
                "state-taken",
                &format!(
                    "len={} bytes={} fds={}",
                    state.bytes().len(),
                    quote(&String::from_utf8_lossy(state.bytes())),
                    state.fds().len()
                ),
            ),
            Err(e) => event(
                "action-err",
                &format!(
                    "action=take-state kind={} msg={}",
                    error_kind(&e),
                    quote(&text(&e))
                ),
            ),
        },
        ["take-file", name] => match upg.fds().file::<std::fs::File>(name) {
            Ok(Some(mut f)) => {
                let _ = writeln!(*f, "written by {}", std::process::id());
                let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                event(
                    "took-file",
                    &format!("name={name} path={} {}", quote(&path), fd_info(&*f)),
                );
            }
            Ok(None) => event("took-file", &format!("name={name} missing=true")),
            Err(e) => event(
                "action-err",
                &format!(
                    "action=take-file kind={} msg={}",
                    error_kind(&e),
                    quote(&text(&e))
                ),
            ),
        },
        ["add-conn", name, addr] => match std::net::TcpStream::connect(addr) {
            Ok(c) => match upg.fds().add_conn(name, c) {
                Ok(h) => {
                    event("added-conn", &format!("name={name}"));
                    held.conns.push(h);
                }
                Err(e) => event(
                    "action-err",
                    &format!("action=add-conn msg={}", quote(&text(&e))),
                ),
            },
            Err(e) => event(
                "action-err",
                &format!("action=add-conn msg={}", quote(&text(&e))),
            ),
        },
        // Writes a line on the inherited connection, then drops it: the
        // peer must see EOF (it really closes).
        ["take-conn-close", name] => match upg.fds().conn::<std::net::TcpStream>(name) {
            Ok(Some(mut c)) => {
                // The fd as inherited, before this test service changes it.
                let info = fd_info(&*c);
                let _ = c.set_nonblocking(false);
                let _ = writeln!(*c, "hello from {}", std::process::id());
                drop(c);
                event("closed-conn", &format!("name={name} {info}"));
            }
            Ok(None) => event("closed-conn", &format!("name={name} missing=true")),
            Err(e) => event(
                "action-err",
                &format!(
                    "action=take-conn kind={} msg={}",
                    error_kind(&e),
                    quote(&text(&e))
                ),
            ),
        },
        // Takes the inherited connection and keeps it (handed on again).
        ["take-conn-keep", name] => match upg.fds().conn::<std::net::TcpStream>(name) {
            Ok(Some(mut c)) => {
                let info = fd_info(&*c);
                let _ = c.set_nonblocking(false);
                let _ = writeln!(*c, "kept by {}", std::process::id());
                event("kept-conn", &format!("name={name} {info}"));
                held.conns.push(c);
            }
            Ok(None) => event("kept-conn", &format!("name={name} missing=true")),
            Err(e) => event(
                "action-err",
                &format!(
                    "action=take-conn kind={} msg={}",
                    error_kind(&e),
                    quote(&text(&e))
                ),
            ),
        },
        // Changes the working directory (after `Upgrader::new` recorded the
        // initial one): a relative PID file must still land in the initial
        // one, and the next generation must still start there.
        ["chdir", dir] => match std::env::set_current_dir(dir) {
            Ok(()) => event("chdir", &format!("dir={}", quote(dir))),
            Err(e) => event(
                "action-err",
                &format!("action=chdir msg={}", quote(&text(&e))),
            ),
        },
        // Replaces the value in the guard of file NAME by PATH opened
        // anew, closes the original, and opens PATH once more (likely at
        // the original's fd number): what is handed on must still be the
        // file that was registered.
        ["swap-file", name, path] => {
            let Some(guard) = held.files.iter_mut().find(|f| f.name() == *name) else {
                event(
                    "action-err",
                    &format!("action=swap-file msg={}", quote("no such file")),
                );
                return;
            };
            match std::fs::File::open(path) {
                Ok(other) => {
                    let original = std::mem::replace(&mut **guard, other);
                    drop(original);
                    if let Ok(again) = std::fs::File::open(path) {
                        held.extra.push(again);
                    }
                    event("swapped-file", &format!("name={name}"));
                }
                Err(e) => event(
                    "action-err",
                    &format!("action=swap-file msg={}", quote(&text(&e))),
                ),
            }
        }
        // The application restores SIGPIPE's default action (fatal).
        ["default-sigpipe"] => {
            // SAFETY (test service): installing the default disposition
            // runs no handler code.
            #[allow(unsafe_code)]
            let restored = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGPIPE,
                    nix::sys::signal::SigHandler::SigDfl,
                )
            };
            event("default-sigpipe", &format!("ok={}", restored.is_ok()));
        }
        // A process this generation starts (event `grandchild pid=`).
        ["spawn-grandchild"] => match std::process::Command::new("sleep").arg("600").spawn() {
            Ok(child) => {
                event("grandchild", &format!("pid={}", child.id()));
                held.children.push(child);
            }
            Err(e) => event(
                "action-err",
                &format!("action=spawn-grandchild msg={}", quote(&text(&e))),
            ),
        },
        // Drops privileges (root tests).
        ["setuid", uid] => {
            let uid = nix::unistd::Uid::from_raw(uid.parse().unwrap_or(65534));
            let gid = nix::unistd::Gid::from_raw(uid.as_raw());
            let done = nix::unistd::setresgid(gid, gid, gid)
                .and_then(|()| nix::unistd::setresuid(uid, uid, uid));
            event("setuid", &format!("ok={}", done.is_ok()));
        }
        // An upgrade given up (its future dropped) when the control file
        // NAME appears; runs in a task of its own.
        ["upgrade-until", name] => {
            let (u, name) = (upg.clone(), (*name).to_owned());
            TRACKER.spawn(async move {
                tokio::select! {
                    result = u.upgrade() => report_upgrade(result),
                    () = wait_for_ctl_file(&name) => event("upgrade-cancelled", ""),
                }
            });
        }
        // MB megabytes of resident memory, kept.
        ["ballast", mb] => {
            let mb: usize = mb.parse().unwrap_or(0);
            let mut v = vec![0u8; mb << 20];
            for page in v.chunks_mut(4096) {
                page[0] = 1;
            }
            held.ballast.push(v);
            event("ballast", &format!("mb={mb}"));
        }
        ["probe-child"] => {
            let exe = std::env::current_exe().unwrap_or_default();
            match tokio::process::Command::new(exe)
                .arg("--probe")
                .output()
                .await
            {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    event("probe", text.trim());
                }
                Err(e) => event(
                    "action-err",
                    &format!("action=probe msg={}", quote(&text(&e))),
                ),
            }
        }
        ["upgrade-now"] => report_upgrade(upg.upgrade().await),
        ["wait-parent"] => {
            let u = upg.clone();
            tokio::spawn(async move {
                u.wait_for_parent().await;
                event("parent-exited", "");
            });
        }
        ["exhaust-fds", free] => {
            let free: usize = free.parse().unwrap_or(0);
            let mut files = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                files.push(f);
            }
            let opened = files.len();
            files.truncate(opened.saturating_sub(free));
            event("exhausted", &format!("free={free} opened={opened}"));
            tokio::spawn(async move {
                wait_for_ctl_file("release-fds").await;
                drop(files);
                event("released-fds", "");
            });
        }
        _ => event("bad-ctl", &format!("action={}", quote(line))),
    }
}

/// Polls until the control file `name` exists (the test creates it when
/// the service may go on).
async fn wait_for_ctl_file(name: &str) {
    while ctl(name).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn exe_size() -> u64 {
    std::fs::metadata("/proc/self/exe")
        .map(|m| m.len())
        .unwrap_or(0)
}

/// With `TF_FDS_ON_ERROR=1`, after `Upgrader::new` failed: prints the fds
/// still open (`error-fds fds=3,4,…`), so a test can check that a rejected
/// handover closed none of them.
fn report_fds_on_error() {
    if std::env::var_os("TF_FDS_ON_ERROR").is_some() {
        let fds: Vec<String> = open_fds().iter().map(i32::to_string).collect();
        event("error-fds", &format!("fds={}", fds.join(",")));
    }
}

/// With `TF_NEW_TWICE=1`, after `Upgrader::new` succeeded: calls it again
/// and prints the outcome (`new-twice kind=… msg=…`).
fn new_twice() {
    if std::env::var_os("TF_NEW_TWICE").is_some() {
        match Upgrader::new(Options::default()) {
            Ok(_) => event("new-twice", "kind=Ok"),
            Err(e) => event(
                "new-twice",
                &format!("kind={} msg={}", error_kind(&e), quote(&text(&e))),
            ),
        }
    }
}

fn main() {
    // The probe runs before any runtime exists, so that the only fd it
    // opens itself is the one listing `/proc/self/fd`.
    if std::env::args().nth(1).as_deref() == Some("--probe") {
        probe();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    runtime.block_on(svc_main());
}

async fn svc_main() {
    // Signal handlers first: a SIGHUP or SIGTERM that a test sends as soon
    // as it sees an event must never meet the default (fatal) disposition.
    let (Ok(mut hup), Ok(mut term), Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        event("error", "msg=\"cannot install signal handlers\"");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut opts = Options::new();
    if let Some(ms) = std::env::var("TF_UPGRADE_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        opts = opts.upgrade_timeout(Duration::from_millis(ms));
    }
    if let Some(path) = std::env::var_os("TF_PID_FILE") {
        opts = opts.pid_file(path);
    }
    if ctl("prenew").is_some_and(|v| v.trim() == "block") {
        event("pre-new", "");
        wait_for_ctl_file("unblock-new").await;
    }
    let upg = match Upgrader::new(opts) {
        Ok(u) => u,
        Err(e) => {
            event(
                "error",
                &format!("kind={} msg={}", error_kind(&e), quote(&text(&e))),
            );
            report_fds_on_error();
            std::process::exit(2);
        }
    };
    new_twice();
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    event(
        "start",
        &format!(
            "gen={} has_parent={} parent={} cwd={} exe_size={}",
            upg.generation(),
            upg.has_parent(),
            upg.parent_pid().unwrap_or(0),
            quote(&cwd),
            exe_size()
        ),
    );
    if let Err(e) = open_listeners(&upg).await {
        event(
            "error",
            &format!("kind={} msg={}", error_kind(&e), quote(&text(&e))),
        );
        std::process::exit(2);
    }
    let mut held = Held::default();
    for line in ctl("actions")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        run_action(&upg, &mut held, line).await;
    }
    match ctl("init").unwrap_or_default().trim() {
        "" | "ok" => {}
        "panic" => panic!("init panicked on purpose"),
        "hang" => {
            event("hanging", "");
            std::future::pending::<()>().await;
        }
        "block" => {
            event("blocked", "");
            wait_for_ctl_file("unblock").await;
            event("unblocked", "");
        }
        "sigkill" => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        "abort" => std::process::abort(),
        other => {
            let code = other
                .strip_prefix("exit ")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            event("init-exit", &format!("code={code}"));
            std::process::exit(code);
        }
    }
    if let Err(e) = upg.ready() {
        event(
            "ready-err",
            &format!("kind={} msg={}", error_kind(&e), quote(&text(&e))),
        );
        std::process::exit(3);
    }
    event(
        "ready",
        &format!(
            "fds={} rss_kb={} exe_size={}",
            open_fds().len(),
            rss_kb(),
            exe_size()
        ),
    );

    let exit = upg.exit();
    tokio::pin!(exit);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // Each upgrade runs in its own task, so that a second SIGHUP
                // during an upgrade shows the concurrent refusal.
                let u = upg.clone();
                // Tracked: the drain waits for it, so an upgrade cancelled
                // by a stop still reports before this process exits.
                TRACKER.spawn(async move { report_upgrade(u.upgrade().await) });
            }
            _ = usr1.recv() => {
                event(
                    "stats",
                    &format!("fds={} rss_kb={} fd_list={}", open_fds().len(), rss_kb(), fd_list()),
                );
            }
            _ = usr2.recv() => {
                for line in ctl("usr2").unwrap_or_default().lines().filter(|l| !l.trim().is_empty()) {
                    run_action(&upg, &mut held, line).await;
                }
            }
            _ = term.recv() => {
                event("stopping", "");
                upg.stop();
            }
            () = &mut exit => break,
        }
    }
    if ctl("linger").is_some_and(|pids| {
        let me = std::process::id().to_string();
        pids.trim().is_empty() || pids.split_whitespace().any(|p| p == me)
    }) {
        // The old generation stays alive after its exit resolved, until the
        // test allows it to go: its child sees a live parent meanwhile.
        event("lingering", "");
        wait_for_ctl_file("release").await;
    }
    drop(held);
    // Drain: the accept loops have stopped (exit resolved); finish replies.
    TRACKER.close();
    TRACKER.wait().await;
    // A successor that died after taking over may be being replaced.
    upg.settled().await;
    event("exit", "");
}

/// Tracks the reply tasks, so the drain can wait for them.
static TRACKER: std::sync::LazyLock<TaskTracker> = std::sync::LazyLock::new(TaskTracker::new);
