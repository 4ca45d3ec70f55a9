//! Talking to the test services: one request, one reply (`pid <N>`).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{DEADLINE, Scratch};

/// Connects to a TCP service, reads its whole reply.
pub fn tcp_get(addr: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sends one line (`GET`, `SLOW <ms>`: the macro services' protocol) on
/// a fresh TCP connection, returns the whole reply.
pub fn tcp_get_line(addr: &str, line: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    writeln!(s, "{line}")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// As [`tcp_get_line`], over a Unix stream socket.
pub fn unix_get_line(path: &str, line: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(DEADLINE))?;
    writeln!(s, "{line}")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects to a Unix stream service, reads its whole reply.
pub fn unix_get(path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sends a datagram to a UDP service, returns the reply.
pub fn udp_get(addr: &str) -> std::io::Result<String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1500];
    // UDP may drop: retry a few times within the deadline.
    let deadline = Instant::now() + DEADLINE;
    loop {
        s.send_to(b"ping", addr)?;
        match s.recv_from(&mut buf) {
            Ok((n, _)) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    }
}

/// Sends a datagram to a Unix datagram service, returns the reply.
pub fn unixgram_get(path: &str, scratch: &Scratch) -> std::io::Result<String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let me = scratch.path().join(format!(
        "c{}",
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let s = std::os::unix::net::UnixDatagram::bind(&me)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.send_to(b"ping", path)?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    let _ = std::fs::remove_file(&me);
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The PID in a `pid <N>` reply.
pub fn reply_pid(reply: &str) -> u32 {
    reply
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a `pid <N>` reply: {reply:?}"))
}

/// Writes `content` to `w` and flushes (helper for control sockets).
pub fn send_line(w: &mut impl Write, content: &str) -> std::io::Result<()> {
    w.write_all(content.as_bytes())?;
    w.flush()
}

/// Connects to a Linux abstract Unix stream socket (`@name` without the
/// `@`), reads its whole reply.
pub fn abstract_get(name: &str) -> std::io::Result<String> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let mut s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects a `SOCK_SEQPACKET` socket to the Unix path (succeeds while a
/// socket listens there, accepted or not).
pub fn seqpacket_connect(path: &str) -> std::io::Result<()> {
    use tableflip::socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    s.connect(&SockAddr::unix(path)?)
}

/// Whether connecting to `addr` is refused (nobody listens there any more).
pub fn tcp_refused(addr: &str) -> bool {
    matches!(
        std::net::TcpStream::connect(addr),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// A port that was free a moment ago on 127.0.0.1 (for services whose
/// address must be known before they start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
        .port()
}

/// The PID a PID file names, if it exists and holds one.
pub fn pid_file_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
