//! The HTTP examples (`http_upgrader`, `axum`), driven as black boxes
//! under the examples' contract: `HTTP_ADDR`, `PID_FILE`, `GET /` →
//! `pid <N>`, `GET /slow?ms=N`, `SIGHUP` upgrades, `SIGTERM` stops. The
//! same checks drive each of them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tableflip_tests::{DEADLINE, Scratch, is_alive, serial, signal, wait_a_little, wait_until};

const HTTP_UPGRADER: &str = env!("CARGO_BIN_EXE_http_upgrader");
const AXUM: &str = env!("CARGO_BIN_EXE_axum");
const RATE_LIMIT: &str = env!("CARGO_BIN_EXE_rate_limit");

/// A started example and every generation it upgrades to; all of them are
/// SIGKILLed on drop.
struct Demo {
    first: Child,
    /// Later generations seen and not reaped yet.
    pids: Vec<u32>,
}

impl Demo {
    fn start(exe: &str, envs: &[(&str, &str)]) -> Demo {
        // Later generations are re-parented to this process when the first
        // exits, so their exit status can be read.
        nix::sys::prctl::set_child_subreaper(true)
            .unwrap_or_else(|e| panic!("cannot become a child subreaper: {e}"));
        let mut cmd = Command::new(exe);
        // These tests are about the replace mode.
        cmd.env("TABLEFLIP_MODE", "replace");
        cmd.env_remove("HTTP_ADDR")
            .env_remove("PID_FILE")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut first = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"));
        // Relay the logs of every generation (they share stderr) through the
        // test's own output, which the harness shows only on failure.
        let stderr = first.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let name = Path::new(exe)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{name}] {line}");
            }
        });
        Demo {
            first,
            pids: Vec::new(),
        }
    }

    fn first_pid(&self) -> u32 {
        self.first.id()
    }

    /// Waits for the first generation's exit status.
    fn wait_first(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.first.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => wait_a_little(),
                other => panic!("the first generation did not exit: {other:?}"),
            }
        }
    }

    /// Waits for a later generation (re-parented to this process once the
    /// first has exited) to exit, and returns its exit code.
    fn wait_later(&mut self, pid: u32) -> i32 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match waitpid(to_pid(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => wait_a_little(),
                other => {
                    self.pids.retain(|p| *p != pid);
                    match other {
                        Ok(WaitStatus::Exited(_, code)) => return code,
                        other => panic!("process {pid} did not exit normally: {other:?}"),
                    }
                }
            }
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // `pids` holds later generations not reaped yet, so none of these
        // numbers can have been reused.
        for &pid in &self.pids {
            if is_alive(pid) {
                let _ = nix::sys::signal::kill(to_pid(pid), Signal::SIGKILL);
            }
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
        for &pid in &self.pids {
            // Reaps it if it is (by now) our child; ECHILD otherwise.
            let _ = waitpid(to_pid(pid), None);
        }
    }
}

fn to_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// A free TCP port on 127.0.0.1 (free when this returns; the test binds it
/// soon after).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a probe socket: {e}"));
    let addr = l
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the probe's address: {e}"));
    addr.to_string()
}

/// The PID in a PID file, if it exists and holds one.
fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `N` of the `pid <N>` in the body.
    fn pid(&self) -> u32 {
        self.body
            .split_whitespace()
            .skip_while(|w| *w != "pid")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `pid <N>` in the reply: {self:?}"))
    }
}

/// Writes a `GET path` request on `stream`.
fn send_get(stream: &mut TcpStream, addr: &str, path: &str, close: bool) -> std::io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    stream.flush()
}

/// Reads one response (headers, then a `Content-Length` body).
fn read_reply(reader: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed in the headers".into()));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header {line:?}")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| bad(format!("no content-length in {headers:?}")))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    Ok(stream)
}

/// `GET path` on a fresh connection.
fn get(addr: &str, path: &str) -> std::io::Result<Reply> {
    let mut stream = connect(addr)?;
    send_get(&mut stream, addr, path, true)?;
    read_reply(&mut BufReader::new(stream))
}

#[test]
fn http_upgrader_slow_request_survives_an_upgrade_and_sigterm_stops_cleanly() {
    slow_request_survives_an_upgrade_and_sigterm_stops_cleanly(HTTP_UPGRADER);
}

#[test]
fn axum_slow_request_survives_an_upgrade_and_sigterm_stops_cleanly() {
    slow_request_survives_an_upgrade_and_sigterm_stops_cleanly(AXUM);
}

/// `exe` serves, a request in flight on the old generation completes
/// across an upgrade (with `Connection: close`), every request during the
/// upgrade succeeds, a new PID serves afterwards, and `SIGTERM` stops it
/// cleanly (exit 0, PID file removed, nothing listens).
fn slow_request_survives_an_upgrade_and_sigterm_stops_cleanly(exe: &str) {
    let _serial = serial();
    let scratch = Scratch::new("http");
    let pid_file: PathBuf = scratch.path().join("http.pid");
    let addr = free_addr();
    let pid_file_str = pid_file.to_string_lossy().into_owned();
    let mut demo = Demo::start(exe, &[("HTTP_ADDR", &addr), ("PID_FILE", &pid_file_str)]);
    let first = demo.first_pid();

    wait_until("the PID file names the first generation", || {
        read_pid(&pid_file) == Some(first)
    });
    let reply = get(&addr, "/").expect("the first generation serves");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.pid(), first);

    // A keep-alive connection the first generation has served once: the
    // slow request sent on it can only be answered by the first generation.
    let mut slow = connect(&addr).expect("connect");
    send_get(&mut slow, &addr, "/", false).expect("send");
    let mut slow_reader = BufReader::new(slow.try_clone().expect("clone"));
    let reply = read_reply(&mut slow_reader).expect("first reply on the slow connection");
    assert_eq!(reply.pid(), first);
    send_get(&mut slow, &addr, "/slow?ms=1500", true).expect("send the slow request");
    let slow_reply = std::thread::spawn(move || read_reply(&mut slow_reader));

    signal(first, Signal::SIGHUP);
    wait_until("the PID file names a new generation", || {
        read_pid(&pid_file).is_some_and(|p| p != first)
    });
    let second = read_pid(&pid_file).expect("the new PID");
    demo.pids.push(second);

    // Until the first generation has stopped accepting, it may still take a
    // new connection: every attempt must succeed, and soon the new
    // generation answers.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = get(&addr, "/").expect("no request fails during the upgrade");
        assert_eq!(reply.status, 200, "{reply:?}");
        if reply.pid() == second {
            break;
        }
        assert_eq!(reply.pid(), first, "{reply:?}");
        assert!(
            Instant::now() < deadline,
            "the new generation never answered"
        );
        wait_a_little();
    }

    let reply = slow_reply
        .join()
        .expect("the slow reader thread")
        .expect("the slow request completes across the upgrade");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.pid(),
        first,
        "the old generation finishes its request"
    );
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");

    let status = demo.wait_first();
    assert!(
        status.success(),
        "the old generation exits 0 after draining: {status:?}"
    );
    assert_eq!(read_pid(&pid_file), Some(second));

    // A request in flight at the stop: the PID file names the process
    // until it exits (a process manager reading it during the drain must
    // find the process to wait for), then goes.
    let mut slow = connect(&addr).expect("connect");
    send_get(&mut slow, &addr, "/", false).expect("send");
    let mut slow_reader = BufReader::new(slow.try_clone().expect("clone"));
    read_reply(&mut slow_reader).expect("first reply on the slow connection");
    send_get(&mut slow, &addr, "/slow?ms=3000", true).expect("send the slow request");
    let slow_reply = std::thread::spawn(move || read_reply(&mut slow_reader));
    signal(second, Signal::SIGTERM);
    wait_until("the stopping service stops listening", || {
        connect(&addr).is_err()
    });
    assert_eq!(
        read_pid(&pid_file),
        Some(second),
        "the PID file names the draining process"
    );
    let reply = slow_reply
        .join()
        .expect("the slow reader thread")
        .expect("the request in flight at the stop completes");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(demo.wait_later(second), 0, "SIGTERM stops gracefully");
    assert!(!pid_file.exists(), "a stopped service removes its PID file");
    assert!(connect(&addr).is_err(), "nothing listens after the stop");
}

#[test]
fn http_upgrader_a_second_sigterm_exits_at_once() {
    a_second_sigterm_exits_at_once(HTTP_UPGRADER);
}

#[test]
fn axum_a_second_sigterm_exits_at_once() {
    a_second_sigterm_exits_at_once(AXUM);
}

/// A second `SIGTERM` during `exe`'s drain exits at once, with a failure
/// status (the examples' contract does not fix which: the runtime API
/// example exits 1, `#[tableflip::main]` 130), cutting the request in
/// flight.
fn a_second_sigterm_exits_at_once(exe: &str) {
    let _serial = serial();
    let scratch = Scratch::new("http2");
    let pid_file: PathBuf = scratch.path().join("http.pid");
    let addr = free_addr();
    let pid_file_str = pid_file.to_string_lossy().into_owned();
    let mut demo = Demo::start(exe, &[("HTTP_ADDR", &addr), ("PID_FILE", &pid_file_str)]);
    let first = demo.first_pid();
    wait_until("the PID file is written", || {
        read_pid(&pid_file) == Some(first)
    });

    // A request that would hold the drain for a minute.
    let mut slow = connect(&addr).expect("connect");
    send_get(&mut slow, &addr, "/", false).expect("send");
    let mut reader = BufReader::new(slow.try_clone().expect("clone"));
    read_reply(&mut reader).expect("first reply");
    send_get(&mut slow, &addr, "/slow?ms=60000", true).expect("send");

    signal(first, Signal::SIGTERM);
    // The graceful stop has begun once nothing listens.
    wait_until("the stopping service stops listening", || {
        connect(&addr).is_err()
    });
    signal(first, Signal::SIGTERM);
    let status = demo.wait_first();
    assert!(
        status.code().is_some_and(|code| code != 0),
        "an exit with a failure status, not a signal: {status:?}"
    );
    assert!(
        read_reply(&mut reader).is_err(),
        "the request in flight is cut off"
    );
}

#[test]
fn http_upgrader_an_invalid_address_is_reported() {
    an_invalid_address_is_reported(HTTP_UPGRADER);
}

#[test]
fn axum_an_invalid_address_is_reported() {
    an_invalid_address_is_reported(AXUM);
}

/// `exe` started with an `HTTP_ADDR` that is no address fails at once
/// (status 1), naming it.
fn an_invalid_address_is_reported(exe: &str) {
    let _serial = serial();
    let out = Command::new(exe)
        .env("TABLEFLIP_MODE", "replace")
        .env("HTTP_ADDR", "not-an-address")
        .env_remove("PID_FILE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid address \"not-an-address\""),
        "the error names the address: {stderr}"
    );
}

/// `GET path` with an `x-api-key: key` header, on a fresh connection.
fn get_as(addr: &str, path: &str, key: &str) -> std::io::Result<Reply> {
    let mut stream = connect(addr)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    read_reply(&mut BufReader::new(stream))
}

/// The `rate_limit` example: its counter and its buckets survive upgrades
/// (the state handover): the new generation goes on counting where the old
/// one stopped, and a key that spent its tokens stays limited across the
/// upgrade instead of getting a fresh allowance.
#[test]
fn rate_limit_state_survives_upgrades() {
    let _serial = serial();
    let scratch = Scratch::new("rate");
    let pid_file: PathBuf = scratch.path().join("rate.pid");
    let addr = free_addr();
    let pid_file_str = pid_file.to_string_lossy().into_owned();
    let mut demo = Demo::start(
        RATE_LIMIT,
        &[("HTTP_ADDR", &addr), ("PID_FILE", &pid_file_str)],
    );
    let first = demo.first_pid();
    wait_until("the PID file names the first generation", || {
        read_pid(&pid_file) == Some(first)
    });
    // Alice spends her 10 tokens (the refill, 1 per second, may give
    // back one or two on a slow machine): then she is limited.
    let mut alice = 0;
    loop {
        let reply = get_as(&addr, "/", "alice").expect("request");
        if reply.status == 429 {
            break;
        }
        assert_eq!(reply.status, 200, "{reply:?}");
        alice += 1;
        assert!(alice < 30, "never limited: {reply:?}");
    }
    let reply = get_as(&addr, "/", "bob").expect("request");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.starts_with("request 1 of bob"), "{reply:?}");

    signal(first, Signal::SIGHUP);
    wait_until("the PID file names the second generation", || {
        read_pid(&pid_file).is_some_and(|p| p != first)
    });
    let second = read_pid(&pid_file).unwrap_or_else(|| panic!("no PID file"));
    demo.pids.push(second);
    assert_eq!(demo.wait_first().code(), Some(0));

    // The counter goes on: every request the first generation counted.
    let stats = get(&addr, "/stats").expect("stats");
    assert_eq!(stats.pid(), second);
    assert!(
        stats
            .body
            .starts_with(&format!("served {} keys 2", alice + 1)),
        "{stats:?}"
    );
    // Bob's bucket is his old one: request 2, not a fresh request 1.
    let reply = get_as(&addr, "/", "bob").expect("request");
    assert_eq!(reply.pid(), second);
    assert!(reply.body.starts_with("request 2 of bob"), "{reply:?}");
    // Alice has at most the tokens the refill gave back since she ran
    // out: far fewer than a fresh bucket's 10.
    let mut after = 0;
    while get_as(&addr, "/", "alice").expect("request").status == 200 {
        after += 1;
        assert!(after < 10, "Alice got a fresh allowance after the upgrade");
    }
    signal(second, Signal::SIGTERM);
    assert_eq!(demo.wait_later(second), 0);
}
