//! Idle HTTP/1 connections handed to the next generation when the drain
//! starts, instead of being closed (see the [`http`](super) module docs).
//!
//! The channel is a connected pair of Unix `SOCK_SEQPACKET` sockets made
//! at the start of each upgrade: the serving generation keeps one end, and
//! the other is handed on with the listeners under [`CHANNEL`] (in
//! supervised mode through the supervisor, which passes it on like any
//! connection; after that the two generations speak directly). One message
//! per packet, the first byte its kind, numbers little-endian:
//!
//! | from | packet | fds | meaning |
//! |---|---|---|---|
//! | next | `S` key (8 bytes) | – | a server now accepts on the listener `key` |
//! | next | `X` key | – | it no longer does (its own drain) |
//! | previous | `C` id (8) key (8) then the bytes read but not parsed | the connection | take this connection |
//! | next | `A` id | – | taken: the previous generation closes its copy and forgets it |
//! | next | `R` id | – | refused (its copy is closed): the previous generation serves it on, as its drain does |
//!
//! A listener's key is its socket's inode number: every generation holds
//! the same socket (`SCM_RIGHTS` and `exec` keep the open file), so both
//! sides name it alike, whatever the listener is called.
//!
//! Nothing is ever lost or served twice: the previous generation stops
//! reading a connection before it sends it, and reads it again only after
//! an `R`, or if the channel ends (`EOF`: the next generation is gone, and
//! with it every copy it had) before the answer. The next generation
//! answers `A` before it reads the connection. A packet of an unknown kind
//! is ignored (a newer build may add some).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};

use crate::sys;

/// The name the next generation's end is handed on under.
pub(crate) const CHANNEL: &str = "tableflip.http-conns";

/// The most bytes handed over with a connection (read but not parsed: at
/// most the start of the next request). A connection holding more is not
/// handed over; the drain serves it.
pub(crate) const MAX_BUFFERED: usize = 16 * 1024;

/// How long, after the drain starts, a connection waits for the next
/// generation to say that it serves the same listener (its server may start
/// just after its readiness).
pub(crate) const SERVING_WAIT: Duration = Duration::from_millis(500);

/// The most connections in flight on the channel at once (sent, not yet
/// answered). Fds in flight count against the sender's `RLIMIT_NOFILE`
/// (`ETOOMANYREFS`, unix(7)), and a request that arrives on a connection
/// in flight waits in the kernel until the next generation serves it: the
/// fewer in flight, the shorter that wait. Measured with 10 000 active
/// connections handed over (tableflip-bench, drain section): p99 latency
/// 7.05 ms with 128, 1.81 ms with 32, 1.33–1.41 ms with 16, at 55 000,
/// 40 000 and 41 000–45 000 handovers per second.
const IN_FLIGHT: usize = 16;

const SERVING: u8 = b'S';
const STOPPED: u8 = b'X';
const CONN: u8 = b'C';
const TAKEN: u8 = b'A';
const REFUSED: u8 = b'R';

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One end of the channel, non-blocking, on the tokio runtime.
#[derive(Debug)]
struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Channel> {
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        Ok(Channel {
            fd: sys::register_async(fd)?,
        })
    }

    async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| sys::send_packet(fd.get_ref().as_fd(), data, fds, true)) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    /// Sends without waiting for room (from a `Drop`); `WouldBlock` if full.
    fn try_send(&self, data: &[u8]) -> io::Result<()> {
        sys::send_packet(self.fd.get_ref().as_fd(), data, &[], true)
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| sys::recv_packet(fd.get_ref().as_fd(), buf, false)) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}

fn packet(kind: u8, numbers: &[u64], tail: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + 8 * numbers.len() + tail.len());
    p.push(kind);
    for n in numbers {
        p.extend_from_slice(&n.to_le_bytes());
    }
    p.extend_from_slice(tail);
    p
}

fn number(p: &[u8], i: usize) -> Option<u64> {
    let at = 1 + 8 * i;
    let bytes: [u8; 8] = p.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// The key of a listener: its socket's inode number.
pub(crate) fn key_of(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|s| s.st_ino)
}

/// An end of the channel, before the runtime has use for it.
#[derive(Debug, Default)]
pub(crate) enum Slot<T> {
    #[default]
    None,
    Fd(OwnedFd),
    Running(Arc<T>),
}

impl<T> Slot<T> {
    /// The running side, started from the fd on first use (on the
    /// current tokio runtime).
    fn get_or_start(
        &mut self,
        start: impl FnOnce(OwnedFd) -> io::Result<Arc<T>>,
    ) -> Option<Arc<T>> {
        match std::mem::take(self) {
            Slot::None => None,
            Slot::Running(r) => {
                *self = Slot::Running(Arc::clone(&r));
                Some(r)
            }
            Slot::Fd(fd) => match start(fd) {
                Ok(r) => {
                    *self = Slot::Running(Arc::clone(&r));
                    Some(r)
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "the channel for handing idle connections over cannot be used; the drain closes them instead"
                    );
                    None
                }
            },
        }
    }
}

/// The channel's ends an [`Upgrader`](crate::Upgrader) holds.
#[derive(Debug, Default)]
pub(crate) struct Ends {
    /// This process's end of the pair made for the upgrade in flight.
    pub(crate) staged: Option<OwnedFd>,
    /// To the generation that took over (once it has).
    pub(crate) successor: Slot<Successor>,
    /// From the generation this one replaced.
    pub(crate) predecessor: Slot<Predecessor>,
    /// Whether a server of this process hands its idle connections over:
    /// without one, an upgrade makes no channel.
    pub(crate) hands_over: bool,
}

/// This generation's side of the channel to the generation that replaced
/// it: where idle connections go when the drain starts.
#[derive(Debug)]
pub(crate) struct Successor {
    channel: Channel,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Connections the next generation took.
    handed: std::sync::atomic::AtomicU64,
    state: Mutex<SuccessorState>,
    /// Bumped at every change of `state`.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct SuccessorState {
    serving: HashSet<u64>,
    waiting: HashMap<u64, oneshot::Sender<bool>>,
    next_id: u64,
    closed: bool,
}

impl Successor {
    pub(crate) fn start(slot: &mut Slot<Successor>) -> Option<Arc<Successor>> {
        slot.get_or_start(|fd| {
            let this = Arc::new(Successor {
                channel: Channel::new(fd)?,
                in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
                handed: std::sync::atomic::AtomicU64::new(0),
                state: Mutex::new(SuccessorState::default()),
                changed: watch::Sender::new(0),
            });
            tokio::spawn(Arc::clone(&this).read());
            Ok(this)
        })
    }

    async fn read(self: Arc<Self>) {
        let mut buf = [0u8; 64];
        loop {
            let packet = match self.channel.recv(&mut buf).await {
                Ok(Some((len, _fds))) => &buf[..len],
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                // The other generation closed its end with packets of this
                // one unread (it exited): the channel's normal end.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => {
                    tracing::debug!(error = %e, "connection handover channel failed");
                    break;
                }
            };
            let Some(n) = number(packet, 0) else {
                continue;
            };
            let mut state = lock(&self.state);
            match packet.first() {
                Some(&SERVING) => {
                    state.serving.insert(n);
                }
                Some(&STOPPED) => {
                    state.serving.remove(&n);
                }
                Some(&TAKEN) => {
                    if let Some(w) = state.waiting.remove(&n) {
                        let _ = w.send(true);
                    }
                }
                Some(&REFUSED) => {
                    if let Some(w) = state.waiting.remove(&n) {
                        let _ = w.send(false);
                    }
                }
                _ => {}
            }
            drop(state);
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        let mut state = lock(&self.state);
        state.closed = true;
        state.serving.clear();
        // Each waiting connection's copy in the next generation is closed:
        // the process is gone, or its end of the channel with it.
        for (_, w) in state.waiting.drain() {
            let _ = w.send(false);
        }
        drop(state);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until the next generation serves `key` (true), or the channel
    /// ends or `until` passes (false).
    pub(crate) async fn wait_serving(&self, key: u64, until: Instant) -> bool {
        let mut changed = self.changed.subscribe();
        loop {
            {
                let state = lock(&self.state);
                if state.serving.contains(&key) {
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            let deadline = tokio::time::Instant::from_std(until);
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// Hands the connection `conn` (accepted on the listener `key`) over,
    /// with `bytes` read from it but not parsed. True once the next
    /// generation has it (this process must then close its copy without
    /// reading or writing); false if it refused or is gone (this process
    /// still owns it, nothing was read from it).
    /// `turn`: one of the [`IN_FLIGHT`] places, taken with
    /// [`turn`](Self::turn) (taken here if `None`).
    pub(crate) async fn hand_over(
        &self,
        key: u64,
        conn: BorrowedFd<'_>,
        bytes: &[u8],
        turn: Option<Turn>,
    ) -> bool {
        if bytes.len() > MAX_BUFFERED {
            return false;
        }
        let _turn = match turn {
            Some(t) => t,
            None => match self.turn().await {
                Some(t) => t,
                None => return false,
            },
        };
        let (answer, answered) = oneshot::channel();
        let id = {
            let mut state = lock(&self.state);
            if state.closed || !state.serving.contains(&key) {
                return false;
            }
            state.next_id += 1;
            let id = state.next_id;
            state.waiting.insert(id, answer);
            id
        };
        if let Err(e) = self
            .channel
            .send(&packet(CONN, &[id, key], bytes), &[conn])
            .await
        {
            tracing::debug!(error = %e, "cannot hand a connection over");
            lock(&self.state).waiting.remove(&id);
            return false;
        }
        let taken = answered.await.unwrap_or(false);
        if taken {
            self.handed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        taken
    }

    /// Waits for a place among the connections in flight on the channel:
    /// a connection waits for it while it is still served here, so that a
    /// request it gets meanwhile is answered at once.
    pub(crate) async fn turn(&self) -> Option<Turn> {
        Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .ok()
            .map(Turn)
    }

    /// How many connections the next generation took.
    pub(crate) fn handed_over(&self) -> u64 {
        self.handed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A place among the connections in flight on the channel (held, never
/// read).
#[derive(Debug)]
pub(crate) struct Turn(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// A connection the previous generation handed over.
#[derive(Debug)]
pub(crate) struct Handed {
    pub(crate) fd: OwnedFd,
    /// Read from it but not parsed: served first.
    pub(crate) bytes: Bytes,
}

/// This generation's side of the channel from the generation it replaced.
#[derive(Debug)]
pub(crate) struct Predecessor {
    /// `None` once the previous generation is gone (the fd is closed then).
    channel: Mutex<Option<Arc<Channel>>>,
    routes: Mutex<HashMap<u64, mpsc::UnboundedSender<Handed>>>,
    /// Set once the channel is closed.
    closed: watch::Sender<bool>,
}

impl Predecessor {
    pub(crate) fn start(slot: &mut Slot<Predecessor>) -> Option<Arc<Predecessor>> {
        slot.get_or_start(|fd| {
            let channel = Arc::new(Channel::new(fd)?);
            let this = Arc::new(Predecessor {
                channel: Mutex::new(Some(Arc::clone(&channel))),
                routes: Mutex::new(HashMap::new()),
                closed: watch::Sender::new(false),
            });
            tokio::spawn(Arc::clone(&this).read(channel));
            Ok(this)
        })
    }

    /// Takes the connections handed over for the listener `key`, until the
    /// returned route is dropped. `None` if another server takes them.
    pub(crate) async fn route(self: &Arc<Self>, key: u64) -> Option<Route> {
        let channel = lock(&self.channel).clone()?;
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut routes = lock(&self.routes);
            if routes.get(&key).is_some_and(|r| !r.is_closed()) {
                return None;
            }
            routes.insert(key, tx);
        }
        if let Err(e) = channel.send(&packet(SERVING, &[key], &[]), &[]).await {
            tracing::debug!(error = %e, "the previous generation cannot be told this one serves");
        }
        Some(Route {
            from: Arc::clone(self),
            key,
            conns: rx,
        })
    }

    async fn read(self: Arc<Self>, channel: Arc<Channel>) {
        self.read_until_closed(&channel).await;
        // The previous generation is gone: its end is closed, and so is
        // this one (a route sending at this moment holds it a moment
        // longer).
        lock(&self.channel).take();
        drop(channel);
        self.closed.send_replace(true);
    }

    /// Resolves once the channel is closed.
    pub(crate) async fn closed(&self) {
        let mut closed = self.closed.subscribe();
        let _ = closed.wait_for(|c| *c).await;
    }

    async fn read_until_closed(&self, channel: &Channel) {
        let mut buf = vec![0u8; 17 + MAX_BUFFERED];
        loop {
            let (len, mut fds) = match channel.recv(&mut buf).await {
                Ok(Some(got)) => got,
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                // The other generation closed its end with packets of this
                // one unread (it exited): the channel's normal end.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => {
                    tracing::debug!(error = %e, "connection handover channel failed");
                    break;
                }
            };
            let packet = &buf[..len];
            if packet.first() != Some(&CONN) {
                continue;
            }
            let (Some(id), Some(key)) = (number(packet, 0), number(packet, 1)) else {
                continue;
            };
            let (Some(fd), true) = (fds.pop(), fds.is_empty()) else {
                // Not what the previous generation sends: refused, and
                // whatever came is closed.
                let _ = channel.send(&packet_id(REFUSED, id), &[]).await;
                continue;
            };
            let route = lock(&self.routes)
                .get(&key)
                .filter(|r| !r.is_closed())
                .cloned();
            let Some(route) = route else {
                drop(fd);
                let _ = channel.send(&packet_id(REFUSED, id), &[]).await;
                continue;
            };
            // Taken before it is read: from the answer on, the previous
            // generation no longer touches it.
            let _ = channel.send(&packet_id(TAKEN, id), &[]).await;
            let bytes = Bytes::copy_from_slice(&packet[17..]);
            if route.send(Handed { fd, bytes }).is_err() {
                tracing::debug!(
                    "a connection handed over arrived as its server stopped; it is closed"
                );
            }
        }
    }
}

fn packet_id(kind: u8, id: u64) -> Vec<u8> {
    packet(kind, &[id], &[])
}

/// Connections handed over for one listener; see [`Predecessor::route`].
#[derive(Debug)]
pub(crate) struct Route {
    from: Arc<Predecessor>,
    key: u64,
    pub(crate) conns: mpsc::UnboundedReceiver<Handed>,
}

impl Drop for Route {
    fn drop(&mut self) {
        lock(&self.from.routes).remove(&self.key);
        // Best effort: connections sent meanwhile are refused anyway.
        if let Some(channel) = lock(&self.from.channel).clone() {
            let _ = channel.try_send(&packet(STOPPED, &[self.key], &[]));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Both sides of a channel, in one process.
    fn pair() -> (Arc<Successor>, Arc<Predecessor>) {
        let (a, b) = sys::seqpacket_pair().expect("socket pair");
        let next = Successor::start(&mut Slot::Fd(a)).expect("successor side");
        let previous = Predecessor::start(&mut Slot::Fd(b)).expect("predecessor side");
        (next, previous)
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_connection_taken_arrives_with_its_bytes_on_the_same_socket() {
        let (next, previous) = pair();
        let mut route = previous.route(7).await.expect("route");
        assert!(next.wait_serving(7, deadline()).await);
        let (ours, mut client) = UnixStream::pair().expect("connection");
        assert!(
            next.hand_over(7, ours.as_fd(), b"GET / HT", None).await,
            "taken"
        );
        drop(ours);
        let handed = route.conns.recv().await.expect("handed over");
        assert_eq!(&handed.bytes[..], b"GET / HT");
        let mut theirs = UnixStream::from(handed.fd);
        theirs.write_all(b"pong").expect("write");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"pong", "the same connection");
    }

    #[tokio::test]
    async fn a_connection_for_a_listener_not_served_is_refused_and_stays_ours() {
        let (next, previous) = pair();
        let _route = previous.route(7).await.expect("route");
        assert!(next.wait_serving(7, deadline()).await);
        // As if the next generation had said it serves 8, then stopped
        // before the connection arrived.
        lock(&next.state).serving.insert(8);
        let (ours, mut client) = UnixStream::pair().expect("connection");
        assert!(!next.hand_over(8, ours.as_fd(), b"", None).await, "refused");
        (&ours).write_all(b"still ours").expect("write");
        let mut got = [0u8; 10];
        client.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"still ours");
    }

    #[tokio::test]
    async fn a_next_generation_gone_takes_nothing() {
        let (next, previous) = pair();
        let route = previous.route(7).await.expect("route");
        assert!(next.wait_serving(7, deadline()).await);
        drop(route);
        wait_stopped(&next, 7).await;
        let (ours, _client) = UnixStream::pair().expect("connection");
        assert!(
            !next.hand_over(7, ours.as_fd(), b"", None).await,
            "no longer served"
        );
        // The channel's other end closed: everything waiting is answered.
        let (a, b) = sys::seqpacket_pair().expect("socket pair");
        let next = Successor::start(&mut Slot::Fd(a)).expect("successor side");
        lock(&next.state).serving.insert(7);
        drop(b);
        assert!(!next.wait_serving(9, deadline()).await, "the channel ended");
        assert!(!next.hand_over(7, ours.as_fd(), b"", None).await);
    }

    async fn wait_stopped(next: &Successor, key: u64) {
        let mut changed = next.changed.subscribe();
        while lock(&next.state).serving.contains(&key) {
            tokio::time::timeout(Duration::from_secs(10), changed.changed())
                .await
                .expect("the stop arrives")
                .expect("channel");
        }
    }

    #[test]
    fn packets_carry_their_numbers() {
        let p = packet(CONN, &[7, u64::MAX], b"GET");
        assert_eq!(p[0], CONN);
        assert_eq!(number(&p, 0), Some(7));
        assert_eq!(number(&p, 1), Some(u64::MAX));
        assert_eq!(&p[17..], b"GET");
        assert_eq!(number(&p, 2), None, "a number past the end");
        assert_eq!(number(&[SERVING, 1, 2], 0), None, "a short packet");
    }
}
