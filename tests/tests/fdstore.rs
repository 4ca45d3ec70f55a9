//! systemd's file descriptor store (`FDSTORE=1`), end to end with real
//! processes: the service's listening sockets are sent to a fake
//! `NOTIFY_SOCKET` that receives them (`SCM_RIGHTS`) and keeps a model of
//! the store ([`Notify::store`]); sockets coming back from the store are
//! passed by `systemd-socket-activate`, which names them as systemd does
//! (`LISTEN_FDNAMES`). Both process models: the supervisor sends the store's
//! messages in supervised mode, the generation that bound the socket in
//! replace mode.
//!
//! What systemd itself does with the store (what survives `systemctl
//! restart`, a crash, a stop) is measured under a real systemd as PID 1:
//! `examples/systemd/README.md`.

use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use tableflip_tests::notify::*;
use tableflip_tests::*;

const MACRO_SVC: &str = env!("CARGO_BIN_EXE_macro_svc");
const MOVED: &str = env!("CARGO_BIN_EXE_macro_svc_moved");

const NAMES: [&str; 3] = ["tableflip.TCP", "tableflip.UDP", "tableflip.UNIX"];

/// A running `macro_svc` with a fake `NOTIFY_SOCKET`.
struct Stored {
    svc: Service,
    notify: Notify,
    mode: &'static str,
    /// The process to signal: the supervisor, or the serving generation.
    main: u32,
    current: u32,
    tcp: String,
    unix: std::path::PathBuf,
}

fn start(h: &Harness, exe: &Path, mode: &'static str, env: &[(&str, &str)]) -> Stored {
    let notify = Notify::at_path(&h.ctl);
    let unix = h.ctl.path().join("u.sock");
    let mut cmd = macro_svc_cmd(exe, &h.ctl, mode);
    cmd.env("NOTIFY_SOCKET", &notify.env);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut svc = Service::spawn(cmd);
    let current = svc.wait_kind("init-done", None).pid;
    let tcp = svc
        .wait_for("TCP listening", |e| {
            e.kind == "listening" && e.pid == current && e.get("name") == "TCP"
        })
        .get("addr")
        .to_owned();
    let main = if mode == "supervised" {
        svc.first_pid()
    } else {
        current
    };
    let mut s = Stored {
        svc,
        notify,
        mode,
        main,
        current,
        tcp,
        unix,
    };
    s.until("READY=1 at the start", |n| n.has("READY"));
    s
}

impl Stored {
    /// Receives notifications up to the first that `done` accepts; returns
    /// all of them.
    fn until(&mut self, what: &str, done: impl Fn(&Notice) -> bool) -> Vec<Notice> {
        let mut seen = Vec::new();
        loop {
            let n = self.notify.next(what);
            let last = done(&n);
            seen.push(n);
            if last {
                return seen;
            }
        }
    }

    /// `SIGHUP`; waits for the new generation and for the `READY=1` that
    /// ends the reload; returns the notifications of the upgrade.
    fn upgrade(&mut self) -> Vec<Notice> {
        let old = self.current;
        signal(self.main, Signal::SIGHUP);
        let new = self
            .svc
            .wait_for("a new generation", |e| {
                e.kind == "init-done" && e.pid != old
            })
            .pid;
        let seen = self.until("READY=1 after the upgrade", |n| n.has("READY"));
        self.svc.wait_kind("draining", Some(old));
        if old == self.svc.first_pid() {
            // Replace mode's first generation is this test's child.
            let status = self.svc.wait_first();
            assert_eq!(status.code(), Some(0), "{status:?}");
        } else {
            wait_gone(old);
        }
        self.current = new;
        if self.mode == "replace" {
            self.main = new;
        }
        seen
    }

    /// `SIGTERM`; waits until every process has exited; returns the
    /// notifications of the stop.
    fn stop(mut self) -> (Vec<Notice>, Notify) {
        signal(self.main, Signal::SIGTERM);
        if self.mode == "supervised" || self.current == self.svc.first_pid() {
            let status = self.svc.wait_first();
            assert_eq!(status.code(), Some(0), "{status:?}");
        }
        self.svc.wait_all_exited();
        wait_gone(self.current);
        let mut seen = Vec::new();
        while let Some(n) = self.notify.recv(nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            seen.push(n);
        }
        (seen, self.notify)
    }
}

fn stored_names(notices: &[Notice]) -> Vec<String> {
    let mut names: Vec<String> = notices
        .iter()
        .filter(|n| n.get("FDSTORE") == Some("1"))
        .map(|n| n.get("FDNAME").unwrap_or("(none)").to_owned())
        .collect();
    names.sort();
    names
}

/// The names removed (`FDSTOREREMOVE=1`), sorted, each once. The service
/// also removes a name right before it stores a socket under it, in case
/// the store held another.
fn removed_names(notices: &[Notice]) -> Vec<String> {
    let mut names: Vec<String> = notices
        .iter()
        .filter(|n| n.get("FDSTOREREMOVE") == Some("1"))
        .map(|n| n.get("FDNAME").unwrap_or("(none)").to_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Each `FDSTORE=1` comes after an `FDSTOREREMOVE=1` of its name: the
/// store never holds two sockets under one name.
fn assert_removed_before_stored(notices: &[Notice]) {
    for (i, n) in notices.iter().enumerate() {
        if n.get("FDSTORE") != Some("1") {
            continue;
        }
        let name = n.get("FDNAME");
        assert!(
            notices[..i]
                .iter()
                .any(|m| m.has("FDSTOREREMOVE") && m.get("FDNAME") == name),
            "{name:?} stored without being removed first: {notices:?}"
        );
    }
}

/// The names in the model store, sorted.
fn in_store(notify: &Notify) -> Vec<String> {
    let mut names: Vec<String> = notify.store.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names
}

/// The local address of a socket in the model store, as the service
/// prints it.
fn local_addr(notify: &Notify, name: &str) -> String {
    let (_, fd) = notify
        .store
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} is not in the store"));
    let addr = socket2::SockRef::from(fd)
        .local_addr()
        .unwrap_or_else(|e| panic!("getsockname of {name}: {e}"));
    if let Some(inet) = addr.as_socket() {
        return inet.to_string();
    }
    addr.as_pathname()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("{addr:?}"))
}

/// Each listening socket goes to the store once, under its listener's name
/// (with the crate's prefix), before `READY=1`: the very socket the service
/// serves on. Upgrades add nothing (the sockets are the same); the stop
/// removes nothing (a restart brings them back), and the Unix socket's
/// file stays for the next start.
fn each_listener_once(mode: &'static str) {
    let h = Harness::new(&format!("fdstore-once-{mode}"));
    let mut s = start(&h, Path::new(MACRO_SVC), mode, &[("FDSTORE", "8")]);
    let at_start = s.notify.log.clone();
    assert_eq!(stored_names(&at_start), NAMES, "{:?}", s.notify.summaries());
    assert_removed_before_stored(&at_start);
    assert_eq!(in_store(&s.notify), NAMES);
    for n in at_start.iter().filter(|n| n.has("FDSTORE")) {
        assert_eq!(n.fd_inodes.len(), 1, "one fd per name: {:?}", n.raw);
        assert_eq!(n.sender, s.main, "sent by the main process: {:?}", n.raw);
    }
    assert_eq!(local_addr(&s.notify, "tableflip.TCP"), s.tcp);
    assert_eq!(
        local_addr(&s.notify, "tableflip.UNIX"),
        s.unix.display().to_string()
    );
    for _ in 0..2 {
        let seen = s.upgrade();
        assert!(stored_names(&seen).is_empty(), "nothing new: {seen:?}");
        assert!(removed_names(&seen).is_empty(), "nothing removed: {seen:?}");
    }
    let unix = s.unix.clone();
    let (seen, notify) = s.stop();
    // Everything sent has arrived: the senders are gone.
    assert!(removed_names(&seen).is_empty(), "{seen:?}");
    assert!(stored_names(&seen).is_empty(), "{seen:?}");
    assert_eq!(notify.store.len(), 3, "the store holds the three sockets");
    assert!(
        unix.exists(),
        "the Unix socket's file stays with the stored socket"
    );
}

#[test]
fn supervised_each_listener_goes_to_the_store_once() {
    each_listener_once("supervised");
}

#[test]
fn replace_each_listener_goes_to_the_store_once() {
    each_listener_once("replace");
}

/// Nothing is sent to the store unless the unit enables it: `$FDSTORE`
/// (systemd 254+), or `TABLEFLIP_FDSTORE=1` for older systemd;
/// `TABLEFLIP_FDSTORE=0` opts out. Without the store, the stop removes the
/// Unix socket's file as before.
#[test]
fn the_store_is_used_only_when_the_unit_enables_it() {
    let cases: [(&[(&str, &str)], bool); 4] = [
        (&[], false),
        (&[("FDSTORE", "0")], false),
        (&[("FDSTORE", "8"), ("TABLEFLIP_FDSTORE", "0")], false),
        (&[("TABLEFLIP_FDSTORE", "1")], true),
    ];
    for (i, (env, used)) in cases.into_iter().enumerate() {
        let h = Harness::new(&format!("fdstore-enable-{i}"));
        let s = start(&h, Path::new(MACRO_SVC), "supervised", env);
        let at_start = s.notify.log.clone();
        let want: Vec<String> = if used {
            NAMES.iter().map(|n| (*n).to_owned()).collect()
        } else {
            Vec::new()
        };
        assert_eq!(stored_names(&at_start), want, "{env:?}");
        let unix = s.unix.clone();
        let (seen, _) = s.stop();
        assert!(removed_names(&seen).is_empty(), "{env:?}: {seen:?}");
        assert_eq!(unix.exists(), used, "{env:?}: the Unix socket's file");
    }
}

/// A release that moves a listener to another address: the old socket is
/// removed from the store (`FDSTOREREMOVE=1`) before the new one is put
/// there under the same name; the others are left alone.
fn a_moved_listener_is_swapped(mode: &'static str) {
    let h = Harness::new(&format!("fdstore-moved-{mode}"));
    let exe = h.ctl.path().join("app");
    install_exe(MACRO_SVC, &exe, 0);
    let mut s = start(
        &h,
        &exe,
        mode,
        &[("FDSTORE", "8"), ("MS_TCP_MOVED", "127.0.0.2:0")],
    );
    let old_tcp = s.tcp.clone();
    install_exe(MOVED, &exe, 1);
    let mut seen = s.upgrade();
    if stored_names(&seen).is_empty() {
        // Replace mode: the new generation sends once it is ready, while
        // its parent announces it; the two may arrive in either order.
        seen.extend(s.until("the moved socket stored", |n| n.has("FDSTORE")));
    }
    assert_eq!(removed_names(&seen), ["tableflip.TCP"], "{seen:?}");
    assert_eq!(stored_names(&seen), ["tableflip.TCP"], "{seen:?}");
    assert_removed_before_stored(&seen);
    let moved = local_addr(&s.notify, "tableflip.TCP");
    assert!(moved.starts_with("127.0.0.2:"), "{moved}");
    assert_ne!(moved, old_tcp);
    assert_eq!(in_store(&s.notify), NAMES, "{:?}", s.notify.summaries());
    let (seen, _) = s.stop();
    assert!(removed_names(&seen).is_empty(), "{seen:?}");
}

#[test]
fn supervised_a_moved_listener_is_swapped_in_the_store() {
    a_moved_listener_is_swapped("supervised");
}

#[test]
fn replace_a_moved_listener_is_swapped_in_the_store() {
    a_moved_listener_is_swapped("replace");
}

/// What the store gives back at the next start (here passed by
/// `systemd-socket-activate` under the name the store keeps it by) is
/// served on, not bound again or sent again; when the release declares
/// another address for it, the stored socket is replaced, in the store
/// too.
fn back_from_the_store(mode: &'static str) {
    let h = Harness::new(&format!("fdstore-back-{mode}"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    for (declared, kept) in [(addr.clone(), true), ("127.0.0.2:0".to_owned(), false)] {
        let (s, client) = start_activated(
            &h,
            mode,
            &[&addr],
            "tableflip.TCP",
            Some(&declared),
            &kept.to_string(),
        );
        let gen1 = s.current;
        let at_start = s.notify.log.clone();
        if kept {
            assert_eq!(s.tcp, addr, "the stored socket serves");
            assert_eq!(
                stored_names(&at_start),
                ["tableflip.UDP", "tableflip.UNIX"],
                "the stored one is not sent again: {at_start:?}"
            );
            assert!(
                !removed_names(&at_start).contains(&"tableflip.TCP".to_owned()),
                "the stored one stays: {at_start:?}"
            );
            assert_removed_before_stored(&at_start);
            // The connection made before the service ran is answered.
            let reply = request(client, "GET");
            assert_eq!(reply_pid(&reply), gen1, "{reply}");
        } else {
            assert!(s.tcp.starts_with("127.0.0.2:"), "rebound: {}", s.tcp);
            assert!(
                removed_names(&at_start).contains(&"tableflip.TCP".to_owned()),
                "{at_start:?}"
            );
            assert_eq!(stored_names(&at_start), NAMES, "{at_start:?}");
            assert_removed_before_stored(&at_start);
            assert!(
                local_addr(&s.notify, "tableflip.TCP").starts_with("127.0.0.2:"),
                "the new socket is stored"
            );
            drop(client);
        }
        let (seen, _) = s.stop();
        assert!(removed_names(&seen).is_empty(), "{seen:?}");
    }
}

#[test]
fn supervised_sockets_back_from_the_store_are_served_or_replaced() {
    back_from_the_store("supervised");
}

#[test]
fn replace_sockets_back_from_the_store_are_served_or_replaced() {
    back_from_the_store("replace");
}

/// A socket unit added since the store kept a socket for a listener: both
/// come through `LISTEN_FDS` under the listener's name. The socket unit's
/// is served on (socket units decide); the stored one is closed and removed
/// from the store, and the service starts normally.
fn a_socket_unit_wins(mode: &'static str) {
    let h = Harness::new(&format!("fdstore-unit-{mode}"));
    let unit_addr = format!("127.0.0.1:{}", free_port());
    let stored_addr = format!("127.0.0.1:{}", free_port());
    let (s, client) = start_activated(
        &h,
        mode,
        &[&unit_addr, &stored_addr],
        "TCP:tableflip.TCP",
        None,
        "unit",
    );
    let gen1 = s.current;
    assert_eq!(s.tcp, unit_addr, "the socket unit's socket serves");
    let at_start = s.notify.log.clone();
    assert!(
        removed_names(&at_start).contains(&"tableflip.TCP".to_owned()),
        "the stored one is removed: {at_start:?}"
    );
    assert_eq!(
        stored_names(&at_start),
        ["tableflip.UDP", "tableflip.UNIX"],
        "a socket unit's socket is not stored: {at_start:?}"
    );
    let reply = request(client, "GET");
    assert_eq!(reply_pid(&reply), gen1, "{reply}");
    let (seen, _) = s.stop();
    assert!(removed_names(&seen).is_empty(), "{seen:?}");
}

#[test]
fn supervised_a_socket_unit_wins_over_a_stored_socket_of_the_same_name() {
    a_socket_unit_wins("supervised");
}

#[test]
fn replace_a_socket_unit_wins_over_a_stored_socket_of_the_same_name() {
    a_socket_unit_wins("replace");
}

/// Two sockets under one name in the store (a removal systemd did not
/// take, say from a generation that was not the main process yet): the
/// service starts, serves on the first (systemd passes the newest first),
/// closes the other, and puts the store right: the name removed, the kept
/// socket stored again.
fn two_stored_under_one_name(mode: &'static str) {
    let h = Harness::new(&format!("fdstore-two-{mode}"));
    let newest = format!("127.0.0.1:{}", free_port());
    let oldest = format!("127.0.0.1:{}", free_port());
    let (s, client) = start_activated(
        &h,
        mode,
        &[&newest, &oldest],
        "tableflip.TCP:tableflip.TCP",
        Some(&newest),
        "two",
    );
    let gen1 = s.current;
    assert_eq!(s.tcp, newest, "the newest stored socket serves");
    let at_start = s.notify.log.clone();
    assert!(
        removed_names(&at_start).contains(&"tableflip.TCP".to_owned()),
        "{at_start:?}"
    );
    assert_eq!(stored_names(&at_start), NAMES, "{at_start:?}");
    assert_removed_before_stored(&at_start);
    assert_eq!(local_addr(&s.notify, "tableflip.TCP"), newest);
    let reply = request(client, "GET");
    assert_eq!(reply_pid(&reply), gen1, "{reply}");
    let (seen, _) = s.stop();
    assert!(removed_names(&seen).is_empty(), "{seen:?}");
}

#[test]
fn supervised_two_sockets_stored_under_one_name_are_put_right() {
    two_stored_under_one_name("supervised");
}

#[test]
fn replace_two_sockets_stored_under_one_name_are_put_right() {
    two_stored_under_one_name("replace");
}

/// Starts `macro_svc` under `systemd-socket-activate`, which passes a
/// socket for each of `listen` named as `fdnames` says (as systemd passes
/// the store's sockets and a socket unit's), with a fake `NOTIFY_SOCKET`
/// (the file `tag` in the scratch directory) and the store enabled;
/// `declared` is the TCP listener's declared address (`MS_TCP`). Returns
/// the service once it is ready, and the connection whose arrival started
/// it (to the first address).
fn start_activated(
    h: &Harness,
    mode: &'static str,
    listen: &[&str],
    fdnames: &str,
    declared: Option<&str>,
    tag: &str,
) -> (Stored, std::net::TcpStream) {
    let notify = Notify::at_path_named(&h.ctl, &format!("notify-{tag}"));
    let unix = h.ctl.path().join(format!("u-{tag}.sock"));
    let mut cmd = Command::new(systemd_socket_activate());
    for l in listen {
        cmd.arg(format!("--listen={l}"));
    }
    cmd.arg(format!("--fdname={fdnames}"))
        .arg(format!("--setenv=TF_CTL={}", h.ctl.path().display()))
        .arg(format!("--setenv=TABLEFLIP_MODE={mode}"))
        .arg(format!("--setenv=MS_UNIX={}", unix.display()))
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.env))
        .arg("--setenv=FDSTORE=8")
        .arg("--setenv=RUST_LOG=info");
    if let Some(addr) = declared {
        cmd.arg(format!("--setenv=MS_TCP={addr}"));
    }
    cmd.arg(MACRO_SVC).stdin(Stdio::null());
    let mut svc = Service::spawn(cmd);
    // systemd-socket-activate starts the service at the first connection.
    let client = connect_when_listening(listen[0]);
    let gen1 = svc.wait_kind("init-done", None).pid;
    let tcp = svc
        .wait_for("TCP listening", |e| {
            e.kind == "listening" && e.pid == gen1 && e.get("name") == "TCP"
        })
        .get("addr")
        .to_owned();
    let mut s = Stored {
        main: if mode == "supervised" {
            svc.first_pid()
        } else {
            gen1
        },
        svc,
        notify,
        mode,
        current: gen1,
        tcp,
        unix,
    };
    s.until("READY=1", |n| n.has("READY"));
    (s, client)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Connects to `addr` as soon as something listens there.
fn connect_when_listening(addr: &str) -> std::net::TcpStream {
    let mut last = None;
    let found = {
        let mut got = None;
        wait_until("something listens", || {
            match std::net::TcpStream::connect(addr) {
                Ok(c) => got = Some(c),
                Err(e) => last = Some(e),
            }
            got.is_some()
        });
        got
    };
    found.unwrap_or_else(|| panic!("nothing listens on {addr}: {last:?}"))
}

fn request(mut s: std::net::TcpStream, line: &str) -> String {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    writeln!(s, "{line}").expect("write the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the reply");
    out
}
