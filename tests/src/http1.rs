//! A small HTTP/1.1 client for the load tests: raw `TcpStream`s, so that
//! every failure (refused, reset, EOF before a whole response, a status
//! other than 200) is seen and counted, nothing retried behind the test's
//! back.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::{DEADLINE, reply_pid};

/// One client's results.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub failures: Vec<String>,
    /// Requests answered, by serving pid.
    pub by_pid: BTreeMap<u32, u64>,
    pub latencies_us: Vec<u64>,
}

/// A parsed response: status, whether the server asked to close, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub close: bool,
    pub body: String,
}

pub fn read_reply<R: std::io::Read>(reader: &mut BufReader<R>) -> std::io::Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "EOF before the status line",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0usize;
    let mut close = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "EOF in the headers",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let (name, value) = (
            name.trim().to_ascii_lowercase(),
            value.trim().to_ascii_lowercase(),
        );
        if name == "content-length" {
            length = value
                .parse()
                .map_err(|_| std::io::Error::other("bad content-length"))?;
        } else if name == "connection" && value == "close" {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Reply {
        status,
        close,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub fn connect(addr: &str) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

pub fn request(
    conn: &mut BufReader<TcpStream>,
    path: &str,
    keep_alive: bool,
) -> std::io::Result<Reply> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        conn.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n\r\n"
    )?;
    read_reply(conn)
}

pub fn record(
    tally: &mut Tally,
    started: Instant,
    result: std::io::Result<Reply>,
    what: &str,
) -> bool {
    match result {
        Ok(reply) if reply.status == 200 => {
            tally.ok += 1;
            *tally.by_pid.entry(reply_pid(&reply.body)).or_default() += 1;
            tally
                .latencies_us
                .push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            !reply.close
        }
        Ok(reply) => {
            tally
                .failures
                .push(format!("{what}: status {}", reply.status));
            false
        }
        Err(e) => {
            tally.failures.push(format!("{what}: {e}"));
            false
        }
    }
}

/// A keep-alive client: one connection for as long as the server keeps it
/// open (it reconnects after `Connection: close`).
pub fn keep_alive_client(addr: String, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let c = match conn.take() {
            Some(c) => c,
            None => match connect(&addr) {
                Ok(c) => c,
                Err(e) => {
                    tally.failures.push(format!("keep-alive connect: {e}"));
                    continue;
                }
            },
        };
        let mut c = c;
        let result = request(&mut c, "/", true);
        if record(&mut tally, started, result, "keep-alive request") {
            conn = Some(c);
        }
    }
    tally
}

/// A connection-per-request client.
pub fn per_request_client(addr: String, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = connect(&addr).and_then(|mut c| request(&mut c, "/", false));
        record(&mut tally, started, result, "per-request request");
    }
    tally
}
