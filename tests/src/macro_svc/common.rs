//! The behaviour shared by the macro-based test services (`macro_svc`,
//! `macro_svc_moved`): they differ only in their listener declarations.
//!
//! Environment: `TF_CTL` (control directory; its `init` file says what the
//! init function does: `ok`, `err`, `err-env` (an `io::Error` around
//! `VarError::NotPresent`), `panic`, `hang`, `hang-task` (a task that never
//! ends, then hang), `block` (until an `unblock` file appears),
//! `block-stop` (the same, then `SIGTERM` to itself before returning),
//! `exit N`; a `hand-on` file: see [`hand_on`]; a `usr2-upgrade` file:
//! see [`usr2_upgrades`]; an `app-sighup` file: see [`app_sighup`]),
//! `MS_PID_FILE`, `MS_UPGRADE_TIMEOUT_MS`, `MS_DRAIN_MS`,
//! `MS_STOP_DELAY_MS`, `MS_UPGRADE_SIGNAL` (read by [`options`]); an
//! `app-state` file: see [`state`]. Events: `EVENT <pid> <kind> key=value…` on stdout:
//! `start gen= has_parent=`, `listening name= addr=` for each listener
//! (for the Unix one, `addr` is the declared address and `local` the path
//! the socket is really bound to, which differs when systemd passed it),
//! `address name= addr=` (what the TCP declaration reports after `take`),
//! `second-take msg=`, `hanging`, `blocked`, `orphaned` (with an `orphan`
//! file in the control directory: a background `sleep` left behind),
//! `init-done`, `slow ms=` (a
//! `SLOW` request was read and is being served), `draining` (after an
//! upgrade or a stop: this generation has stopped accepting).
//!
//! Protocol on the TCP and Unix listeners: the client sends one line,
//! `GET` or `SLOW <ms>`, and gets `pid <N>\n` (after `<ms>` for SLOW).
//! UDP: any datagram is answered with `pid <N>`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use tableflip::{Context, DeclaredListener};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

pub(crate) fn event(kind: &str, fields: &str) {
    let line = format!("EVENT {} {kind} {fields}\n", std::process::id());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// `Options` computed at run time, as `#[tableflip::main(options = …)]`
/// allows.
/// The recorder's snapshotter, with `MS_METRICS=1`.
static METRICS: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
    std::sync::OnceLock::new();

/// What `METRICS` requests have read so far (the debugging recorder's
/// snapshots drain what they read).
static SEEN: std::sync::Mutex<Option<serde_json::Map<String, serde_json::Value>>> =
    std::sync::Mutex::new(None);

/// `METRICS` requests: every metric recorded in this process, as one JSON
/// object line: `name` or `name{label=value}` → counter total, gauge
/// value, or number of histogram samples.
fn metrics_line() -> String {
    use metrics_util::debugging::DebugValue;
    let Some(s) = METRICS.get() else {
        return "{}\n".to_owned();
    };
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = seen.get_or_insert_with(serde_json::Map::new);
    for (key, _, _, value) in s.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        let before = out
            .get(&name)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        #[allow(clippy::cast_precision_loss)]
        let v = match value {
            DebugValue::Counter(c) => before + c as f64,
            // A gauge read again without a new value reads 0: kept.
            DebugValue::Gauge(g) if g.into_inner() == 0.0 && out.contains_key(&name) => before,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => before + h.len() as f64,
        };
        out.insert(name, serde_json::json!(v));
    }
    format!("{}\n", serde_json::Value::Object(out.clone()))
}

pub(crate) fn options() -> tableflip::Options {
    if std::env::var_os("MS_METRICS").is_some() && METRICS.get().is_none() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let _ = METRICS.set(recorder.snapshotter());
        let _ = recorder.install();
    }
    let ms = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok());
    let mut opts = tableflip::Options::new();
    if let Some(path) = std::env::var_os("MS_PID_FILE") {
        opts = opts.pid_file(path);
    }
    if let Some(ms) = ms("MS_UPGRADE_TIMEOUT_MS") {
        opts = opts.upgrade_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = ms("MS_DRAIN_MS") {
        opts = opts.drain_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = ms("MS_PROBATION_MS") {
        opts = opts.probation(Duration::from_millis(ms));
    }
    if let Some(ms) = ms("MS_STOP_DELAY_MS") {
        opts = opts.stop_delay(Duration::from_millis(ms));
    }
    if let Some(signal) = std::env::var("MS_UPGRADE_SIGNAL")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        opts = opts.upgrade_signal(signal);
    }
    opts
}

/// A `crash-if-size` file (a size in bytes): a generation whose binary has
/// that size aborts once it is ready and the test has created `crash-now`
/// (a release that crashes right after it took over: after the test saw
/// the upgrade succeed); a binary of another size serves on.
fn crash_if_size(cx: &Context) {
    let dir = std::env::var_os("TF_CTL").map(PathBuf::from);
    let size = dir
        .and_then(|d| std::fs::read_to_string(d.join("crash-if-size")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mine = std::fs::metadata("/proc/self/exe").map(|m| m.len()).ok();
    if size.is_none() || size != mine {
        return;
    }
    let upgrader = cx.upgrader().clone();
    tokio::spawn(async move {
        let now = std::env::var_os("TF_CTL").map(|d| PathBuf::from(d).join("crash-now"));
        while !upgrader.is_ready() || !now.as_ref().is_some_and(|p| p.exists()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        event("crashing", "");
        std::process::abort();
    });
}

fn reply() -> String {
    format!("pid {}\n", std::process::id())
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: S) {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    if stream.read_line(&mut line).await.is_err() {
        return;
    }
    if line.trim() == "METRICS" {
        let _ = stream.get_mut().write_all(metrics_line().as_bytes()).await;
        return;
    }
    if let Some(ms) = line
        .trim()
        .strip_prefix("SLOW ")
        .and_then(|m| m.parse().ok())
    {
        // The request is in this generation's hands now.
        event("slow", &format!("ms={ms}"));
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let _ = stream.get_mut().write_all(reply().as_bytes()).await;
    let _ = stream.get_mut().shutdown().await;
}

/// Says `blocked`, then waits until the test creates `unblock` in the
/// control directory.
async fn wait_unblocked() {
    event("blocked", "");
    let unblock = std::env::var_os("TF_CTL").map(|d| PathBuf::from(d).join("unblock"));
    while !unblock.as_ref().is_some_and(|p| p.exists()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// With a `hand-on` file in the control directory (`ADDR PATH`): a
/// connection named `peer` and a file named `state` go from generation to
/// generation. The first generation connects to `ADDR` and opens `PATH`
/// (events `added-conn`, `added-file`); each next one takes them over,
/// writes `gen <N> pid <PID>` to the connection (event `took-conn`), and
/// reports the file's inode (event `took-file ino=`). Both are handed on
/// again until the generation drains.
fn hand_on(cx: &Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(spec) = std::env::var_os("TF_CTL")
        .and_then(|d| std::fs::read_to_string(PathBuf::from(d).join("hand-on")).ok())
    else {
        return Ok(());
    };
    let (addr, path) = spec
        .trim()
        .split_once(' ')
        .ok_or("hand-on: expected `ADDR PATH`")?;
    let upg = cx.upgrader();
    let fds = upg.fds();
    let conn = match fds.conn::<std::net::TcpStream>("peer")? {
        Some(mut conn) => {
            let line = format!("gen {} pid {}\n", upg.generation(), std::process::id());
            conn.write_all(line.as_bytes())?;
            event("took-conn", "");
            conn
        }
        None => {
            let conn = fds.add_conn("peer", std::net::TcpStream::connect(addr)?)?;
            event("added-conn", "");
            conn
        }
    };
    let file = match fds.file::<std::fs::File>("state")? {
        Some(file) => {
            use std::os::unix::fs::MetadataExt;
            event("took-file", &format!("ino={}", file.metadata()?.ino()));
            file
        }
        None => {
            let file = fds.add_file("state", std::fs::File::open(path)?)?;
            event("added-file", "");
            file
        }
    };
    let d = cx.draining();
    cx.spawn(async move {
        d.await;
        drop((conn, file));
    });
    Ok(())
}

/// With an `app-state` file in the control directory: the generation takes the
/// state handed over (event `state-none`; `state-taken len= crc= fds=
/// extra=` with the extra fds' contents joined by `|`; or `state-error
/// msg=`), then registers what it hands over, as the file says now:
/// `SIZE FDS` (SIZE bytes of a pattern seeded by the PID and FDS memfds
/// holding `fd <i> of <pid>`; event `state-offered len= crc= fds=` each
/// time the source is called), `fail` (the source fails), `panic` (the
/// source panics) or `slow MS` (the source prints `state-slow`, takes MS
/// milliseconds, and hands over `slow`). A second
/// state, `ms-second`, is handed over beside it: `second of <pid>` (event
/// `second-state text=` in the next generation).
fn state(cx: &Context) -> std::io::Result<()> {
    let Some(spec) = std::env::var_os("TF_CTL")
        .and_then(|d| std::fs::read_to_string(PathBuf::from(d).join("app-state")).ok())
    else {
        return Ok(());
    };
    match cx.inherited_state("ms") {
        Ok(None) => event("state-none", ""),
        Ok(Some(state)) => {
            let (bytes, fds) = state.into_parts();
            let mut extra = Vec::new();
            for fd in fds {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)?;
                extra.push(text);
            }
            event(
                "state-taken",
                &format!(
                    "len={} crc={} fds={} extra={:?}",
                    bytes.len(),
                    crc32fast::hash(&bytes),
                    extra.len(),
                    extra.join("|")
                ),
            );
        }
        Err(e) => event("state-error", &format!("msg={:?}", e.to_string())),
    }
    // A second state, side by side with the first: `second of <pid>`.
    if let Some(second) = cx
        .inherited_state("ms-second")
        .map_err(std::io::Error::other)?
    {
        let text = String::from_utf8_lossy(second.bytes()).into_owned();
        event("second-state", &format!("text={text:?}"));
    }
    let second = format!("second of {}", std::process::id());
    cx.hand_over_state("ms-second", move || {
        Ok(tableflip::State::new(second.as_bytes()))
    })
    .map_err(std::io::Error::other)?;
    let spec = spec.trim().to_owned();
    if spec == "fail" {
        cx.hand_over_state("ms", || Err(std::io::Error::other("no state today")))?;
        return Ok(());
    }
    if spec == "panic" {
        cx.hand_over_state("ms", || panic!("the state source panics"))?;
        return Ok(());
    }
    if let Some(ms) = spec
        .strip_prefix("slow ")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        cx.hand_over_state("ms", move || {
            event("state-slow", "");
            std::thread::sleep(Duration::from_millis(ms));
            Ok(tableflip::State::new(&b"slow"[..]))
        })?;
        return Ok(());
    }
    let (size, fds) = spec
        .split_once(' ')
        .and_then(|(s, f)| Some((s.parse::<usize>().ok()?, f.parse::<usize>().ok()?)))
        .ok_or_else(|| std::io::Error::other("state: expected `SIZE FDS` or `fail`"))?;
    let pid = std::process::id();
    let bytes: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        (0..size)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(pid) as u8)
            .collect(),
    );
    cx.hand_over_state("ms", move || {
        let mut state = tableflip::State::new(bytes.as_slice());
        for i in 0..fds {
            let fd =
                nix::sys::memfd::memfd_create(c"ms-extra", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                    .map_err(std::io::Error::from)?;
            let mut file = std::fs::File::from(fd);
            write!(file, "fd {i} of {pid}")?;
            std::io::Seek::rewind(&mut file)?;
            state = state.with_fd(file);
        }
        event(
            "state-offered",
            &format!(
                "len={} crc={} fds={fds}",
                bytes.len(),
                crc32fast::hash(&bytes)
            ),
        );
        Ok(state)
    })?;
    Ok(())
}

/// With a `usr2-upgrade` file in the control directory: each `SIGUSR2`
/// (which the supervisor forwards to the serving generation) calls
/// `Upgrader::upgrade` in a task the drain waits for: event `upgrade-asked`,
/// then `upgrade-result ok=true child=PID` or `ok=false msg=…`.
fn usr2_upgrades(cx: &Context) -> std::io::Result<()> {
    let wanted =
        std::env::var_os("TF_CTL").is_some_and(|d| PathBuf::from(d).join("usr2-upgrade").exists());
    if !wanted {
        return Ok(());
    }
    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?;
    let c = cx.clone();
    cx.spawn(async move {
        let draining = c.draining();
        tokio::pin!(draining);
        loop {
            tokio::select! {
                () = &mut draining => break,
                got = usr2.recv() => {
                    if got.is_none() {
                        break;
                    }
                    let upg = c.upgrader().clone();
                    event("upgrade-asked", "");
                    c.spawn(async move {
                        match upg.upgrade().await {
                            Ok(pid) => event("upgrade-result", &format!("ok=true child={pid}")),
                            Err(e) => event("upgrade-result", &format!("ok=false msg={:?}", e.to_string())),
                        }
                    });
                }
            }
        }
    });
    Ok(())
}

/// With an `app-sighup` file in the control directory: the application
/// handles `SIGHUP` itself (as a service whose upgrade signal is another
/// one would, to reopen its logs), printing `app-sighup` each time.
fn app_sighup(cx: &Context) -> std::io::Result<()> {
    let wanted =
        std::env::var_os("TF_CTL").is_some_and(|d| PathBuf::from(d).join("app-sighup").exists());
    if !wanted {
        return Ok(());
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let d = cx.draining();
    cx.spawn(async move {
        tokio::pin!(d);
        loop {
            tokio::select! {
                () = &mut d => break,
                got = hup.recv() => {
                    if got.is_none() {
                        break;
                    }
                    event("app-sighup", "");
                }
            }
        }
    });
    Ok(())
}

/// The init function: take every listener, serve, then do what `init`
/// says.
pub(crate) async fn init(
    cx: Context,
    tcp: &'static DeclaredListener<tokio::net::TcpListener>,
    udp: &'static DeclaredListener<tokio::net::UdpSocket>,
    unix: &'static DeclaredListener<tokio::net::UnixListener>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let upg = cx.upgrader();
    event(
        "start",
        &format!("gen={} has_parent={}", upg.generation(), upg.has_parent()),
    );
    let tcp_l = tcp.take()?;
    event(
        "listening",
        &format!("name={} addr={}", tcp.name(), tcp_l.local_addr()?),
    );
    let udp_s = udp.take()?;
    event(
        "listening",
        &format!("name={} addr={}", udp.name(), udp_s.local_addr()?),
    );
    let unix_l = unix.take()?;
    let unix_local = unix_l
        .local_addr()?
        .as_pathname()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    event(
        "listening",
        &format!(
            "name={} addr={} local={unix_local}",
            unix.name(),
            unix.address()
        ),
    );
    if let Err(e) = tcp.take() {
        event("second-take", &format!("msg={:?}", e.to_string()));
    }
    // What the declaration reports once its socket is taken.
    event(
        "address",
        &format!("name={} addr={}", tcp.name(), tcp.address()),
    );

    let (c, d) = (cx.clone(), cx.draining());
    cx.spawn(async move {
        tokio::select! {
            () = d => {}
            () = async {
                while let Ok((s, _)) = tcp_l.accept().await {
                    c.spawn(answer(s));
                }
            } => {}
        }
    });
    let (c, d) = (cx.clone(), cx.draining());
    cx.spawn(async move {
        tokio::select! {
            () = d => {}
            () = async {
                while let Ok((s, _)) = unix_l.accept().await {
                    c.spawn(answer(s));
                }
            } => {}
        }
    });
    let d = cx.draining();
    cx.spawn(async move {
        let mut buf = [0u8; 1500];
        tokio::select! {
            () = d => {}
            () = async {
                while let Ok((_, from)) = udp_s.recv_from(&mut buf).await {
                    let _ = udp_s.send_to(reply().as_bytes(), from).await;
                }
            } => {}
        }
    });

    let what = std::env::var_os("TF_CTL")
        .and_then(|d| std::fs::read_to_string(PathBuf::from(d).join("init")).ok())
        .unwrap_or_default();
    match what.trim() {
        "" | "ok" => {}
        "err" => return Err("init failed on purpose".into()),
        // An error whose Debug form says nothing a user can read.
        "err-env" => return Err(std::io::Error::other(std::env::VarError::NotPresent).into()),
        // A task that ignores the drain, then an init that never returns.
        "hang-task" => {
            cx.spawn(std::future::pending::<()>());
            event("hanging", "");
            std::future::pending::<()>().await;
        }
        "panic" => panic!("init panicked on purpose"),
        // Killed by a signal (SIGABRT) during its initialisation.
        "abort" => std::process::abort(),
        "hang" => {
            event("hanging", "");
            std::future::pending::<()>().await;
        }
        // Waits until the test creates `unblock` in the control directory.
        "block" => wait_unblocked().await,
        // The same, then asks to stop as `kill -TERM` would, and returns:
        // the generation becomes ready, drains and exits 0 at once.
        "block-stop" => {
            wait_unblocked().await;
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM)?;
        }
        other => {
            let code = other
                .strip_prefix("exit ")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            std::process::exit(code);
        }
    }
    // A `hand-on` file (`ADDR PATH`): hand a connection and a file on
    // across upgrades.
    hand_on(&cx)?;
    // An `app-state` file: application state across upgrades.
    state(&cx)?;
    // An `orphan` file in the control directory: leave a process behind
    // that outlives its parent (a shell that starts `sleep` in the
    // background and exits), as a service's scripts do; whoever is PID 1
    // (or the nearest subreaper) must reap it.
    let orphan = std::env::var_os("TF_CTL").map(|d| PathBuf::from(d).join("orphan"));
    if orphan.is_some_and(|p| p.exists()) {
        let _ = std::process::Command::new("sh")
            .args(["-c", "sleep 0.5 &"])
            .status();
        event("orphaned", "");
    }
    usr2_upgrades(&cx)?;
    app_sighup(&cx)?;
    crash_if_size(&cx);
    event("init-done", "");
    // Not tracked by the drain: it only reports that the drain started.
    let draining = cx.draining();
    tokio::spawn(async move {
        draining.await;
        event("draining", "");
    });
    Ok(())
}
