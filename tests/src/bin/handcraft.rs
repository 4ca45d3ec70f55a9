//! Plays the parent generation by hand: builds a handover (pipes, sockets,
//! files, the `TABLEFLIP_HANDOVER` variable and the metadata bytes) exactly
//! as a test describes it — valid, older, corrupted or hostile — then runs a
//! target (the `svc` test service) and reports what happened.
//!
//! ```text
//! handcraft [OPTIONS] -- TARGET [ARGS…]
//!   --make NAME=KIND     create a resource, handed on at its fd number
//!   --env TEMPLATE       the value of TABLEFLIP_HANDOVER
//!                        (default `1:%parent%:%ready%`)
//!   --env-hex HEX        the same, as raw bytes (for non-UTF-8 values)
//!   --meta TEMPLATE      metadata JSON, framed as `<length>\n<json>`
//!   --raw TEMPLATE       bytes written to the parent pipe as they are
//!   --raw-hex HEX        the same, as raw bytes
//!   --eof                close the parent pipe after writing (default: keep
//!                        it open until the target exits, like a live parent)
//!   --stream PACKETS     protocol version 2: a Unix SOCK_SEQPACKET pair,
//!                        `%stream%` the target's end (named by
//!                        TABLEFLIP_HANDOVER_SOCKET); once the target runs,
//!                        sends the packets, then closes this end. PACKETS:
//!                        `/`-separated, each `POS:NAME,NAME…` (the position
//!                        written as the packet's 4 bytes, then those
//!                        resources' fds); the resources named there are
//!                        sent, not inherited
//!   --socket-env TEMPLATE
//!                        the value of TABLEFLIP_HANDOVER_SOCKET (default
//!                        with --stream: `%stream%`; without, unset)
//!   --id TEMPLATE        the value of TABLEFLIP_HANDOVER_ID (default unset;
//!                        `%parent.ino%`, `%ready.ino%`, `%stream.ino%` are
//!                        the protocol fds' inodes)
//! ```
//!
//! Kinds: `tcp-listener`, `tcp-bound` (bound, not listening), `tcp-stream`
//! (connected), `udp`, `unix-listener` (bound to a path in the temporary
//! directory, its address), `unix-stream` (one end of a connected pair),
//! `unixgram`, `file` (a regular file), `pipe-r` / `pipe-w` (read / write end
//! of a pipe), `closed` (an fd number that is open in neither process;
//! nothing is handed on).
//!
//! In templates, `%NAME%` is the fd number of a resource, `%NAME.addr%` its
//! address, `%NAME.cookie%` a socket's cookie (`SO_COOKIE`), `%parent%` / `%ready%` the protocol pipes' fds (read end of the
//! metadata pipe, write end of the readiness pipe), `%pid%` this process and
//! `%childfd%` the lowest fd number the target does not inherit: the first
//! fd the target opens itself lands there.
//!
//! Events on stdout (the target shares it), `EVENT <pid> <kind> key=value…`:
//! `hc-fds` (every placeholder's value) before the target starts,
//! `hc-spawned child=<pid>`, `hc-ready` when the readiness byte arrives (or
//! `hc-ready-eof` when the pipe closes without it), and last
//! `hc-exit code=<n>` or `hc-exit signal=<n>`.
//!
//! Only the protocol pipes' child ends and the resources are made
//! inheritable (their `FD_CLOEXEC` is cleared); everything else this process
//! holds stays close-on-exec.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};

/// An fd number that is open in neither process (checked here; the target
/// would have to open a thousand fds to reach it).
const CLOSED_FD: RawFd = 1000;

fn event(kind: &str, fields: &str) {
    let line = format!("EVENT {} {kind} {fields}\n", std::process::id());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn fail(msg: &str) -> ! {
    event("hc-error", &format!("msg={msg:?}"));
    std::process::exit(70);
}

fn hex(s: &str) -> Vec<u8> {
    if s.len() % 2 != 0 {
        fail(&format!("odd-length hex {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| fail(&format!("bad hex {s:?}")))
        })
        .collect()
}

fn is_open(fd: RawFd) -> bool {
    std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists()
}

/// Whether this process's `fd` is open and will survive `exec`.
fn inheritable(fd: RawFd) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & i64::from(libc::O_CLOEXEC) == 0)
}

fn set_inheritable(fd: impl AsFd) {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFD)
        .map(FdFlag::from_bits_retain)
        .unwrap_or_else(|e| fail(&format!("F_GETFD: {e}")));
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(flags - FdFlag::FD_CLOEXEC))
        .unwrap_or_else(|e| fail(&format!("F_SETFD: {e}")));
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap_or_else(|e| fail(&format!("pipe2: {e}")))
}

/// What this process keeps alive for the target's sake: peers of connected
/// sockets, the other ends of pipes, the listener a stream connected to.
#[derive(Default)]
struct Keep(Vec<OwnedFd>);

/// Creates one resource; returns the fd to hand on (`None` for `closed`)
/// and its address, if it has one.
fn make(kind: &str, keep: &mut Keep) -> (Option<OwnedFd>, Option<String>) {
    let io = |what: &str, e: std::io::Error| -> ! { fail(&format!("{what}: {e}")) };
    match kind {
        "tcp-listener" => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| io("bind", e));
            let addr = l.local_addr().map(|a| a.to_string()).ok();
            (Some(l.into()), addr)
        }
        "tcp-bound" => {
            use tableflip::socket2::{Domain, Socket, Type};
            let s =
                Socket::new(Domain::IPV4, Type::STREAM, None).unwrap_or_else(|e| io("socket", e));
            let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
            s.bind(&any.into()).unwrap_or_else(|e| io("bind", e));
            let addr = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.to_string());
            (Some(s.into()), addr)
        }
        "tcp-stream" => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| io("bind", e));
            let addr = l.local_addr().unwrap_or_else(|e| io("local_addr", e));
            let c = TcpStream::connect(addr).unwrap_or_else(|e| io("connect", e));
            let (server, _) = l.accept().unwrap_or_else(|e| io("accept", e));
            keep.0.push(l.into());
            keep.0.push(server.into());
            let local = c.local_addr().map(|a| a.to_string()).ok();
            (Some(c.into()), local)
        }
        "udp" => {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| io("bind", e));
            let addr = s.local_addr().map(|a| a.to_string()).ok();
            (Some(s.into()), addr)
        }
        "unix-listener" => {
            // Bound to a path of its own, which the handover's metadata may
            // then misname.
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "hc-{}-{}.sock",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            let _ = std::fs::remove_file(&path);
            let l = std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| io("bind", e));
            (Some(l.into()), Some(path.display().to_string()))
        }
        "unix-stream" => {
            let (a, b) = UnixStream::pair().unwrap_or_else(|e| io("socketpair", e));
            keep.0.push(b.into());
            (Some(a.into()), None)
        }
        "unixgram" => {
            let s = UnixDatagram::unbound().unwrap_or_else(|e| io("socket", e));
            (Some(s.into()), None)
        }
        "file" => {
            // A regular file of our own (opened read-only, close-on-exec).
            let exe = std::env::current_exe().unwrap_or_else(|e| io("current_exe", e));
            let f = std::fs::File::open(exe).unwrap_or_else(|e| io("open", e));
            (Some(f.into()), None)
        }
        memfd if memfd.starts_with("memfd:") || memfd.starts_with("memfd-unsealed:") => {
            // A memory file holding the bytes given in hex (the
            // application state's carrier), sealed against any change as
            // tableflip seals it, unless `memfd-unsealed`.
            use nix::fcntl::SealFlag;
            use nix::sys::memfd::{MFdFlags, memfd_create};
            let (kind, data) = memfd.split_once(':').unwrap_or_default();
            let fd = memfd_create(
                c"handcraft",
                MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
            )
            .unwrap_or_else(|e| io("memfd_create", e.into()));
            let mut f = std::fs::File::from(fd);
            f.write_all(&hex(data)).unwrap_or_else(|e| io("write", e));
            if kind == "memfd" {
                let seals = SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SEAL;
                fcntl(&f, FcntlArg::F_ADD_SEALS(seals))
                    .unwrap_or_else(|e| io("F_ADD_SEALS", e.into()));
            }
            (Some(f.into()), None)
        }
        "pipe-r" => {
            let (r, w) = pipe();
            keep.0.push(w);
            (Some(r), None)
        }
        "pipe-w" => {
            let (r, w) = pipe();
            keep.0.push(r);
            (Some(w), None)
        }
        "closed" => (None, None),
        other => fail(&format!("unknown kind {other:?}")),
    }
}

fn expand(template: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('%') {
            Some(end) if vars.contains_key(&after[..end]) => {
                out.push_str(&vars[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('%');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A connected pair of Unix `SOCK_SEQPACKET` sockets, close-on-exec.
struct UnixSeqpacket;

impl UnixSeqpacket {
    fn pair() -> (OwnedFd, OwnedFd) {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap_or_else(|e| fail(&format!("socketpair: {e}")))
    }
}

/// Sends one packet with `fds` attached (`SCM_RIGHTS`); the target may
/// have exited already (then the error is reported as an event).
fn send_packet(socket: &OwnedFd, data: &[u8], fds: &[RawFd]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(data)];
    let cmsgs = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    if let Err(e) = sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        event("hc-send-failed", &format!("error={e:?}"));
    }
}

enum Payload {
    Meta(String),
    Raw(String),
    RawHex(String),
}

enum EnvValue {
    Template(String),
    Hex(String),
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut makes: Vec<(String, String)> = Vec::new();
    let mut env_value = EnvValue::Template("1:%parent%:%ready%".to_owned());
    let mut payload: Option<Payload> = None;
    let mut eof = false;
    let mut stream: Option<String> = None;
    let mut socket_env: Option<String> = None;
    let mut id_env: Option<String> = None;
    let mut target: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--make" => {
                let v = value();
                let Some((name, kind)) = v.split_once('=') else {
                    fail(&format!("--make {v:?}: expected NAME=KIND"));
                };
                makes.push((name.to_owned(), kind.to_owned()));
            }
            "--env" => env_value = EnvValue::Template(value()),
            "--env-hex" => env_value = EnvValue::Hex(value()),
            "--meta" => payload = Some(Payload::Meta(value())),
            "--raw" => payload = Some(Payload::Raw(value())),
            "--raw-hex" => payload = Some(Payload::RawHex(value())),
            "--eof" => eof = true,
            "--stream" => stream = Some(value()),
            "--socket-env" => socket_env = Some(value()),
            "--id" => id_env = Some(value()),
            "--" => {
                target = args.by_ref().collect();
                break;
            }
            other => fail(&format!("unknown option {other:?}")),
        }
    }
    if target.is_empty() {
        fail("no target after `--`");
    }
    if is_open(CLOSED_FD) {
        fail(&format!("fd {CLOSED_FD} is open here"));
    }

    // The protocol pipes: the target reads metadata from `parent_r` and
    // writes readiness to `ready_w`; this process holds the other ends.
    let (parent_r, parent_w) = pipe();
    let (ready_r, ready_w) = pipe();
    let mut keep = Keep::default();
    let mut passed: Vec<OwnedFd> = Vec::new();
    let mut vars = BTreeMap::new();
    vars.insert("parent".to_owned(), parent_r.as_raw_fd().to_string());
    vars.insert("ready".to_owned(), ready_w.as_raw_fd().to_string());
    vars.insert("pid".to_owned(), std::process::id().to_string());
    let ino = |fd: &OwnedFd| {
        nix::sys::stat::fstat(fd)
            .map(|st| st.st_ino.to_string())
            .unwrap_or_else(|e| fail(&format!("fstat: {e}")))
    };
    vars.insert("parent.ino".to_owned(), ino(&parent_r));
    vars.insert("ready.ino".to_owned(), ino(&ready_w));
    // Version 2's socket, and the packets to send over it.
    let streamed_names: Vec<String> = stream
        .iter()
        .flat_map(|spec| spec.split('/'))
        .filter_map(|packet| packet.split_once(':'))
        .flat_map(|(_, names)| names.split(','))
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    let socket_pair = stream.as_ref().map(|_| {
        let (a, b) = UnixSeqpacket::pair();
        vars.insert("stream".to_owned(), b.as_raw_fd().to_string());
        vars.insert("stream.ino".to_owned(), ino(&b));
        (a, b)
    });
    let mut sent: BTreeMap<String, OwnedFd> = BTreeMap::new();
    for (name, kind) in &makes {
        let (fd, addr) = make(kind, &mut keep);
        let number = fd.as_ref().map_or(CLOSED_FD, AsRawFd::as_raw_fd);
        vars.insert(name.clone(), number.to_string());
        if let Some(addr) = addr {
            vars.insert(format!("{name}.addr"), addr);
        }
        if let Some(cookie) = fd
            .as_ref()
            .and_then(|fd| socket2::SockRef::from(fd).cookie().ok())
        {
            vars.insert(format!("{name}.cookie"), cookie.to_string());
        }
        match fd {
            Some(fd) if streamed_names.contains(name) => {
                sent.insert(name.clone(), fd);
            }
            fd => passed.extend(fd),
        }
    }
    let (stream_mine, stream_theirs) = match socket_pair {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    for fd in passed
        .iter()
        .chain([&parent_r, &ready_w])
        .chain(stream_theirs.as_ref())
    {
        set_inheritable(fd);
    }
    let childfd = (3..)
        .find(|&fd| !inheritable(fd))
        .unwrap_or_else(|| fail("no free fd"));
    vars.insert("childfd".to_owned(), childfd.to_string());
    let fields: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    event("hc-fds", &fields.join(" "));

    let env: OsString = match &env_value {
        EnvValue::Template(t) => expand(t, &vars).into(),
        EnvValue::Hex(h) => OsString::from_vec(hex(h)),
    };
    let bytes: Vec<u8> = match &payload {
        None => Vec::new(),
        Some(Payload::Meta(t)) => {
            let json = expand(t, &vars);
            format!("{}\n{json}", json.len()).into_bytes()
        }
        Some(Payload::Raw(t)) => expand(t, &vars).into_bytes(),
        Some(Payload::RawHex(h)) => hex(h),
    };

    let mut cmd = Command::new(&target[0]);
    cmd.args(&target[1..]).env("TABLEFLIP_HANDOVER", env);
    let socket_env = socket_env.or_else(|| stream.as_ref().map(|_| "%stream%".to_owned()));
    match &socket_env {
        Some(t) => cmd.env("TABLEFLIP_HANDOVER_SOCKET", expand(t, &vars)),
        None => cmd.env_remove("TABLEFLIP_HANDOVER_SOCKET"),
    };
    match &id_env {
        Some(t) => cmd.env("TABLEFLIP_HANDOVER_ID", expand(t, &vars)),
        None => cmd.env_remove("TABLEFLIP_HANDOVER_ID"),
    };
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {:?}: {e}", target[0])));
    event("hc-spawned", &format!("child={}", child.id()));
    // The target's ends and the resources now live in the target only.
    drop((parent_r, ready_w, passed, stream_theirs));
    if let (Some(socket), Some(spec)) = (stream_mine, &stream) {
        for packet in spec.split('/').filter(|p| !p.is_empty()) {
            let (pos, names) = packet.split_once(':').unwrap_or_else(|| {
                fail(&format!("--stream packet {packet:?}: expected POS:NAMES"))
            });
            let pos: u32 = pos
                .parse()
                .unwrap_or_else(|_| fail(&format!("--stream position {pos:?}")));
            let fds: Vec<RawFd> = names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| {
                    sent.get(n)
                        .map(AsRawFd::as_raw_fd)
                        .unwrap_or_else(|| fail(&format!("--stream names {n:?}, not made")))
                })
                .collect();
            send_packet(&socket, &pos.to_le_bytes(), &fds);
        }
        drop((socket, sent));
    }

    // Writes in a thread: a target that stops reading must not block us.
    let writer = std::thread::spawn(move || {
        let mut pipe = std::fs::File::from(parent_w);
        let _ = pipe.write_all(&bytes);
        if eof {
            drop(pipe);
            None
        } else {
            Some(pipe)
        }
    });
    let reader = std::thread::spawn(move || {
        let mut pipe = std::fs::File::from(ready_r);
        let mut byte = [0u8; 1];
        match pipe.read(&mut byte) {
            Ok(1) => event("hc-ready", ""),
            other => event("hc-ready-eof", &format!("result={other:?}")),
        }
    });
    let status = child.wait().unwrap_or_else(|e| fail(&format!("wait: {e}")));
    let _ = reader.join();
    drop(writer.join());
    drop(keep);
    match (status.code(), status.signal()) {
        (Some(code), _) => event("hc-exit", &format!("code={code}")),
        (None, Some(sig)) => event("hc-exit", &format!("signal={sig}")),
        _ => event("hc-exit", "unknown=true"),
    }
}
