//! A Unix datagram socket standing in for systemd's `NOTIFY_SOCKET`, which
//! reads the sender of each notification (`SCM_CREDENTIALS`), and a model
//! of the rules systemd applies to what it receives.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt};

use crate::harness::{DEADLINE, Scratch};

/// One notification: its `KEY=value` lines, and who sent it.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The sending process, from `SCM_CREDENTIALS`.
    pub sender: u32,
    /// The lines, in order.
    pub fields: Vec<(String, String)>,
    pub raw: String,
    /// The inodes of the fds attached (`SCM_RIGHTS`): for a socket, the
    /// same number in every process that has it.
    pub fd_inodes: Vec<u64>,
}

impl Notice {
    /// Parses one datagram.
    pub fn parse(sender: u32, raw: &str) -> Notice {
        let fields = raw
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l
                    .split_once('=')
                    .unwrap_or_else(|| panic!("not a KEY=value line: {l:?} in {raw:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        Notice {
            sender,
            fields,
            raw: raw.to_owned(),
            fd_inodes: Vec::new(),
        }
    }

    /// A field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether it has the field.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// `sender: KEY=value …`, with the values that vary from run to run
    /// (`STATUS`, `MONOTONIC_USEC`) elided: checked one by one instead.
    pub fn summary(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| match k.as_str() {
                "STATUS" | "MONOTONIC_USEC" => format!("{k}=…"),
                _ => format!("{k}={v}"),
            })
            .collect();
        format!("{}: {}", self.sender, fields.join(" "))
    }
}

/// What a field of a notification must be.
#[derive(Debug)]
pub enum Want {
    Is(String),
    Contains(String),
    /// A number within these bounds (inclusive).
    Within(u64, u64),
}

/// Exactly this value.
pub fn is(v: impl ToString) -> Want {
    Want::Is(v.to_string())
}

/// A value that contains this.
pub fn contains(v: impl ToString) -> Want {
    Want::Contains(v.to_string())
}

/// Checks that `n` was sent by `sender` and has exactly the fields `want`,
/// in this order, with matching values.
pub fn expect(n: &Notice, sender: u32, want: &[(&str, Want)]) {
    assert_eq!(
        n.sender, sender,
        "notification {:?} should come from pid {sender}",
        n.raw
    );
    let keys: Vec<&str> = n.fields.iter().map(|(k, _)| k.as_str()).collect();
    let want_keys: Vec<&str> = want.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, want_keys, "the fields of {:?}", n.raw);
    for (key, w) in want {
        let v = n.get(key).unwrap_or_default();
        match w {
            Want::Is(x) => assert_eq!(v, x, "{key} in {:?}", n.raw),
            Want::Contains(x) => {
                assert!(v.contains(x.as_str()), "{key} in {:?} lacks {x:?}", n.raw)
            }
            Want::Within(lo, hi) => {
                let num: u64 = v
                    .parse()
                    .unwrap_or_else(|_| panic!("{key} in {:?} is not a number", n.raw));
                assert!(
                    (*lo..=*hi).contains(&num),
                    "{key}={num} in {:?} should be within [{lo}, {hi}]",
                    n.raw
                );
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds: the clock `MONOTONIC_USEC=` is read
/// from (system-wide, so the test's reading brackets the service's).
/// `CLOCK_MONOTONIC` in microseconds.
pub fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|e| panic!("clock_gettime: {e}"));
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0) / 1_000
}

/// A Unix datagram socket standing in for systemd's notification socket.
#[derive(Debug)]
pub struct Notify {
    /// The socket.
    pub sock: UnixDatagram,
    /// The value of `NOTIFY_SOCKET` that names it.
    pub env: String,
    /// Every notification received so far, in order.
    pub log: Vec<Notice>,
    /// A model of systemd's fd store: what `FDSTORE=1` put there, under
    /// its `FDNAME=`, less what `FDSTOREREMOVE=1` took out.
    pub store: Vec<(String, std::os::fd::OwnedFd)>,
}

impl Notify {
    /// Bound to a path in `dir`.
    pub fn at_path(dir: &Scratch) -> Notify {
        Self::at_path_named(dir, "notify")
    }

    /// Bound to the file `name` in `dir`.
    pub fn at_path_named(dir: &Scratch, name: &str) -> Notify {
        let path = dir.path().join(name);
        let sock = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        Self::with(sock, path.display().to_string())
    }

    /// Bound to a Linux abstract address (`NOTIFY_SOCKET=@name`).
    pub fn at_abstract(tag: &str) -> Notify {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tf-notify-{}-{tag}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .unwrap_or_else(|e| panic!("abstract address {name}: {e}"));
        let sock =
            UnixDatagram::bind_addr(&addr).unwrap_or_else(|e| panic!("cannot bind @{name}: {e}"));
        Self::with(sock, format!("@{name}"))
    }

    fn with(sock: UnixDatagram, env: String) -> Notify {
        setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true)
            .unwrap_or_else(|e| panic!("SO_PASSCRED: {e}"));
        Notify {
            sock,
            env,
            log: Vec::new(),
            store: Vec::new(),
        }
    }

    /// Receives one notification: waits up to the socket's read timeout,
    /// or not at all with `MSG_DONTWAIT`. `None` when there is none.
    pub fn recv(&mut self, flags: MsgFlags) -> Option<Notice> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!(UnixCredentials, [std::os::fd::RawFd; 16]);
        let (len, sender, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let flags = flags | MsgFlags::MSG_CMSG_CLOEXEC;
            match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(msg) => {
                    let mut sender = None;
                    let mut fds: Vec<OwnedFd> = Vec::new();
                    for c in msg.cmsgs().unwrap_or_else(|e| panic!("control data: {e}")) {
                        match c {
                            ControlMessageOwned::ScmCredentials(cred) => {
                                sender = Some(u32::try_from(cred.pid()).unwrap_or(0));
                            }
                            ControlMessageOwned::ScmRights(raw) => {
                                // SAFETY: the kernel has just installed these
                                // fds in this process for this message;
                                // nothing else owns them.
                                #[allow(unsafe_code)]
                                fds.extend(
                                    raw.into_iter()
                                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                                );
                            }
                            _ => {}
                        }
                    }
                    assert!(
                        !msg.flags.contains(MsgFlags::MSG_CTRUNC),
                        "control data cut short: more fds than expected"
                    );
                    let sender = sender.unwrap_or_else(|| panic!("no SCM_CREDENTIALS"));
                    break (msg.bytes, sender, fds);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return None,
                Err(e) => panic!("recvmsg on the notify socket: {e}"),
            }
        };
        let raw = String::from_utf8(buf[..len].to_vec())
            .unwrap_or_else(|e| panic!("a notification is not UTF-8: {e}"));
        let mut n = Notice::parse(sender, &raw);
        n.fd_inodes = fds
            .iter()
            .map(|fd| nix::sys::stat::fstat(fd).map_or(0, |s| s.st_ino))
            .collect();
        eprintln!("[notify] from pid {sender}: {raw:?} fds={:?}", n.fd_inodes);
        // As systemd does with the store's messages (sd_notify(3)).
        let name = n.get("FDNAME").unwrap_or("stored").to_owned();
        if n.get("FDSTOREREMOVE") == Some("1") {
            self.store.retain(|(stored, _)| *stored != name);
        }
        if n.get("FDSTORE") == Some("1") {
            self.store
                .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        }
        self.log.push(n.clone());
        Some(n)
    }

    /// The next notification, within [`DEADLINE`].
    pub fn next(&mut self, what: &str) -> Notice {
        self.sock
            .set_read_timeout(Some(DEADLINE))
            .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
        self.recv(MsgFlags::empty()).unwrap_or_else(|| {
            panic!(
                "no notification ({what}) within {DEADLINE:?}; received: {:#?}",
                self.summaries()
            )
        })
    }

    /// Checks that nothing more was sent. Called once the senders are gone
    /// (a datagram is queued here by the time `sendto` returns), so this is
    /// exact, not a guess.
    pub fn assert_quiet(&mut self, when: &str) {
        if let Some(n) = self.recv(MsgFlags::MSG_DONTWAIT) {
            panic!("unexpected notification {when}: {:?}", n.summary());
        }
    }

    /// Every notification so far, summarised.
    pub fn summaries(&self) -> Vec<String> {
        self.log.iter().map(Notice::summary).collect()
    }
}

/// Replays `log` as systemd would for a service whose main process is
/// first `first`, with `NotifyAccess=main` and `Type=notify-reload`
/// (`Type=notify` is the same without the reload pairing). Panics on
/// anything systemd would reject or misread:
///
/// - a message from a PID other than the main one (rejected by
///   `NotifyAccess=main`); `MAINPID=` moves the main PID;
/// - `RELOADING=1` without a numeric `MONOTONIC_USEC=`, or while not
///   running (before the first `READY=1`, during another reload);
/// - `READY=1` other than the first one that does not end a reload;
/// - `MAINPID=` anywhere but in the `READY=1` that ends a reload (or the
///   first `READY=1`, naming the sender itself);
/// - anything after `STOPPING=1`.
///
/// Returns the main PID at the end.
pub fn systemd_view(log: &[Notice], first: u32) -> u32 {
    #[derive(Debug, PartialEq)]
    enum State {
        Starting,
        Running,
        Reloading,
        Stopping,
    }
    let mut main = first;
    let mut state = State::Starting;
    for n in log {
        let line = n.summary();
        assert_eq!(
            n.sender, main,
            "{line}: sent by a process that is not the main one ({main}): NotifyAccess=main rejects it"
        );
        assert_ne!(state, State::Stopping, "{line}: a message after STOPPING=1");
        if n.has("STOPPING") {
            assert!(
                !n.has("READY") && !n.has("RELOADING") && !n.has("MAINPID"),
                "{line}"
            );
            state = State::Stopping;
        } else if n.has("RELOADING") {
            assert_eq!(state, State::Running, "{line}: RELOADING=1 while {state:?}");
            assert!(
                n.get("MONOTONIC_USEC")
                    .is_some_and(|v| v.parse::<u64>().is_ok_and(|u| u > 0)),
                "{line}: RELOADING=1 needs a numeric MONOTONIC_USEC"
            );
            assert!(!n.has("READY") && !n.has("MAINPID"), "{line}");
            state = State::Reloading;
        } else if n.has("READY") {
            match state {
                State::Starting => {
                    assert_eq!(n.get("MAINPID"), Some(main.to_string().as_str()), "{line}");
                }
                State::Reloading => {
                    if let Some(pid) = n.get("MAINPID") {
                        main = pid
                            .parse()
                            .unwrap_or_else(|_| panic!("{line}: MAINPID is not a pid"));
                    }
                }
                _ => panic!("{line}: READY=1 while {state:?} (not ending a reload)"),
            }
            state = State::Running;
        } else {
            panic!("{line}: neither READY, RELOADING nor STOPPING");
        }
    }
    main
}
