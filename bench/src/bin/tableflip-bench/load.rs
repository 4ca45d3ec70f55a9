//! The load generator: raw HTTP/1.1 over tokio `TcpStream`s, so that every
//! failure is seen and counted and nothing is retried behind the
//! measurement's back.
//!
//! A request fails when the connection cannot be made, when writing the
//! request fails, when the connection ends (EOF or reset) before a whole
//! response has arrived, when the status is not 2xx, or after
//! [`REQUEST_TIMEOUT`]. Like a pooling client (hyper-util's, for one), a
//! keep-alive client checks that its idle connection is still open before
//! reusing it: one the server closed while it was idle is replaced
//! without counting a failure. Only a request actually sent on a
//! connection that then dies unanswered counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// How a client uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// One connection for many requests (`Connection: keep-alive`).
    KeepAlive,
    /// A new connection per request (`Connection: close`).
    PerRequest,
}

impl Mode {
    /// The name used in tables and plots.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::PerRequest => "connection per request",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Outcome {
    Ok,
    /// `connect` failed (refused, …).
    Connect,
    /// Writing the request failed.
    Write,
    /// EOF before a whole response.
    Eof,
    /// Reset before a whole response.
    Reset,
    /// A status other than 2xx, or an unparsable response.
    BadResponse,
    /// No response within [`REQUEST_TIMEOUT`].
    Timeout,
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// When it started, in microseconds since the run's epoch.
    pub(crate) start_us: u64,
    /// How long it took (to the failure, for a failed one).
    pub(crate) latency_us: u32,
    pub(crate) mode: Mode,
    pub(crate) outcome: Outcome,
    /// The PID that answered (0 if none).
    pub(crate) pid: u32,
}

/// A parsed response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) close: bool,
    pub(crate) pid: u32,
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => Outcome::Reset,
        UnexpectedEof => Outcome::Eof,
        _ => Outcome::Reset,
    }
}

/// Writes `request` on `stream` and reads one whole response.
pub(crate) async fn exchange(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> Result<Reply, Outcome> {
    stream
        .write_all(request)
        .await
        .map_err(|e| match classify(&e) {
            Outcome::Reset => Outcome::Write,
            o => o,
        })?;
    buf.clear();
    let mut chunk = [0u8; 1024];
    let (head_len, reply, length) = loop {
        let n = stream.read(&mut chunk).await.map_err(|e| classify(&e))?;
        if n == 0 {
            return Err(Outcome::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let (reply, length) = parse_head(&buf[..end]).ok_or(Outcome::BadResponse)?;
            break (end + 4, reply, length);
        }
        if buf.len() > 64 * 1024 {
            return Err(Outcome::BadResponse);
        }
    };
    while buf.len() < head_len + length {
        let n = stream.read(&mut chunk).await.map_err(|e| classify(&e))?;
        if n == 0 {
            return Err(Outcome::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !(200..300).contains(&reply.status) {
        return Err(Outcome::BadResponse);
    }
    Ok(reply)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Status, `Connection: close`, `x-pid`, and the body's length.
fn parse_head(head: &[u8]) -> Option<(Reply, usize)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut reply = Reply {
        status,
        close: false,
        pid: 0,
    };
    let mut length = 0;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            reply.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case(tableflip_bench::PID_HEADER) {
            reply.pid = value.parse().ok()?;
        }
    }
    Some((reply, length))
}

/// Whether the peer has closed an idle connection (what a pooling client
/// checks before reusing one).
pub(crate) fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        // EOF, an error, or bytes nobody asked for: not reusable.
        _ => true,
    }
}

/// Connects, with `TCP_NODELAY` as the services set it.
pub(crate) async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Microseconds from `epoch` to `t`.
pub(crate) fn micros_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One request on `conn` (connecting first if it is `None`), recorded.
/// Leaves `conn` open for the next request if the server keeps it.
pub(crate) async fn request(
    addr: SocketAddr,
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
    mode: Mode,
    epoch: Instant,
) -> Sample {
    if conn.as_ref().is_some_and(closed_by_peer) {
        *conn = None;
    }
    let start = Instant::now();
    let sample = |outcome: Outcome, pid: u32| Sample {
        start_us: micros_since(epoch, start),
        latency_us: micros(start.elapsed()),
        mode,
        outcome,
        pid,
    };
    let mut stream = match conn.take() {
        Some(s) => s,
        None => match connect(addr).await {
            Ok(s) => s,
            Err(_) => return sample(Outcome::Connect, 0),
        },
    };
    let request = match mode {
        Mode::KeepAlive => KEEP_ALIVE_REQUEST,
        Mode::PerRequest => CLOSE_REQUEST,
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut stream, buf, request)).await {
        Ok(Ok(reply)) => {
            if mode == Mode::KeepAlive && !reply.close {
                *conn = Some(stream);
            }
            sample(Outcome::Ok, reply.pid)
        }
        Ok(Err(outcome)) => sample(outcome, 0),
        Err(_) => sample(Outcome::Timeout, 0),
    }
}

/// A client that sends requests back to back until `stop`.
pub(crate) async fn client(
    addr: SocketAddr,
    mode: Mode,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::with_capacity(1 << 16);
    let mut conn = None;
    let mut buf = Vec::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        let s = request(addr, &mut conn, &mut buf, mode, epoch).await;
        let failed_to_connect = s.outcome == Outcome::Connect;
        samples.push(s);
        if failed_to_connect {
            // Do not spin on a refused port.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    samples
}

/// One slow request (`/slow?ms=N`) on a fresh connection: whether it was
/// answered with 200.
pub(crate) async fn slow_request(addr: SocketAddr, ms: u64) -> bool {
    let Ok(mut stream) = connect(addr).await else {
        return false;
    };
    let request = format!("GET /slow?ms={ms} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut buf = Vec::new();
    matches!(
        tokio::time::timeout(
            REQUEST_TIMEOUT + Duration::from_millis(ms),
            exchange(&mut stream, &mut buf, request.as_bytes())
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_head() {
        let (reply, length) =
            parse_head(b"HTTP/1.1 200 OK\r\nx-pid: 42\r\ncontent-length: 7\r\nConnection: close")
                .expect("parses");
        assert_eq!(
            (reply.status, reply.close, reply.pid, length),
            (200, true, 42, 7)
        );
        assert!(parse_head(b"garbage").is_none());
    }
}
