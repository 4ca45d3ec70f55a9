//! Hand-made handovers: `handcraft` plays the parent generation and hands
//! `svc` a handover built byte by byte — an older but valid one (it must be
//! inherited and served), or a corrupted or hostile one (`Upgrader::new`
//! must return a clear error naming the problem: never a panic, never a
//! socket used as the wrong kind, never an fd closed that was not proven to
//! be its own).
//!
//! An entry that carries a socket cookie (`SO_COOKIE`) is checked by it
//! alone: the cookie of the very socket behind the fd can only come from a
//! process that holds that socket (the previous generation, which checked
//! it), so its kind, network and address are taken from the entry. A
//! cookie that does not match, or an fd that is no socket, is refused.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");
const HANDCRAFT: &str = env!("CARGO_BIN_EXE_handcraft");

/// A handover to build: the arguments of `handcraft`.
#[derive(Debug, Default)]
struct Hand {
    args: Vec<String>,
    /// The resources handed on (not `closed` ones): their fds must still be
    /// open after a rejected handover.
    passed: Vec<String>,
    /// Version 2: the target's end of the socket must still be open after
    /// a rejected handover.
    streamed: bool,
}

impl Hand {
    fn new() -> Hand {
        Hand::default()
    }

    fn arg(mut self, opt: &str, value: &str) -> Hand {
        self.args.push(opt.to_owned());
        self.args.push(value.to_owned());
        self
    }

    /// Creates a resource (see `handcraft`'s kinds), `%name%` in templates.
    fn make(mut self, name: &str, kind: &str) -> Hand {
        if kind != "closed" {
            self.passed.push(name.to_owned());
        }
        self.arg("--make", &format!("{name}={kind}"))
    }

    /// Creates a resource sent over version 2's socket, not inherited
    /// (its number in `handcraft` means nothing to the target).
    fn make_sent(self, name: &str, kind: &str) -> Hand {
        self.arg("--make", &format!("{name}={kind}"))
    }

    /// Version 2: the socket, `%stream%`, and the packets sent over it
    /// (`POS:NAME,NAME…`, `/`-separated; see `handcraft`).
    fn stream(mut self, packets: &str) -> Hand {
        self.streamed = true;
        self.arg("--stream", packets)
    }

    /// The `TABLEFLIP_HANDOVER` value.
    fn env(self, template: &str) -> Hand {
        self.arg("--env", template)
    }

    /// Framed metadata (`<len>\n<json>`).
    fn meta(self, template: &str) -> Hand {
        self.arg("--meta", template)
    }

    /// Version-1 metadata around these entries.
    fn entries(self, entries: &str) -> Hand {
        self.meta(&format!(r#"{{"version":1,"entries":[{entries}]}}"#))
    }

    /// Bytes written as they are.
    fn raw(self, template: &str) -> Hand {
        self.arg("--raw", template)
    }

    fn raw_hex(self, hex: &str) -> Hand {
        self.arg("--raw-hex", hex)
    }

    /// Closes the metadata pipe after writing.
    fn eof(mut self) -> Hand {
        self.args.push("--eof".to_owned());
        self
    }

    fn start(&self, ctl: &Scratch, envs: &[(&str, &str)]) -> Service {
        let mut cmd = Command::new(HANDCRAFT);
        // These tests are about the replace mode.
        cmd.env("TABLEFLIP_MODE", "replace");
        cmd.args(&self.args)
            .arg("--")
            .arg(SVC)
            .env("TF_CTL", ctl.path())
            .env("RUST_LOG", "debug")
            .env_remove("TABLEFLIP_HANDOVER")
            .env_remove("TABLEFLIP_HANDOVER_SOCKET")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Service::spawn(cmd)
    }
}

/// What a rejected handover produced.
#[derive(Debug)]
struct Rejected {
    kind: String,
    msg: String,
    /// The `hc-fds` placeholders: fd numbers and addresses.
    vars: HashMap<String, String>,
}

impl Rejected {
    /// Replaces `%name%` with the placeholder's value.
    fn expand(&self, template: &str) -> String {
        let mut out = template.to_owned();
        for (k, v) in &self.vars {
            out = out.replace(&format!("%{k}%"), v);
        }
        out
    }

    /// Asserts the error kind and that the message contains each of `parts`
    /// (placeholders expanded).
    fn says(&self, kind: &str, parts: &[&str]) {
        assert_eq!(self.kind, kind, "error kind; message: {}", self.msg);
        for part in parts {
            let part = self.expand(part);
            assert!(
                self.msg.contains(&part),
                "the message should name {part:?}: {}",
                self.msg
            );
        }
    }
}

/// Runs `svc` under the hand-made handover, which it must reject: an
/// `error` event, exit status 2 (not a panic's 101, not a signal), never
/// ready, and every fd it was handed still open when it gave up.
fn reject(hand: Hand) -> Rejected {
    let _serial = serial();
    let ctl = Scratch::new("hostile");
    // Asked for a listener named `web`: a wrongly accepted entry of that
    // name would be used.
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut run = hand.start(&ctl, &[("TF_FDS_ON_ERROR", "1")]);
    let fds = run.wait_kind("hc-fds", None);
    let child: u32 = run
        .wait_kind("hc-spawned", None)
        .get("child")
        .parse()
        .expect("child pid");
    let error = run.wait_kind("error", Some(child));
    let open = run.wait_kind("error-fds", Some(child));
    let exit = run.wait_kind("hc-exit", None);
    run.wait_all_exited();
    assert_eq!(
        exit.get("code"),
        "2",
        "svc must exit 2 after the error (101 would be a panic): {:#?}",
        run.lines()
    );
    assert!(
        !run.history
            .iter()
            .any(|e| e.kind == "hc-ready" || e.kind == "start" || e.kind == "listening"),
        "a rejected handover must not start: {:#?}",
        run.lines()
    );
    let open: Vec<&str> = open.get("fds").split(',').collect();
    for name in hand
        .passed
        .iter()
        .map(String::as_str)
        .chain(["parent", "ready"])
        .chain(hand.streamed.then_some("stream"))
    {
        let fd = fds.get(name);
        assert!(
            open.contains(&fd),
            "fd {fd} ({name}) was closed by the rejected handover; still open: {open:?}"
        );
    }
    Rejected {
        kind: error.get("kind").to_owned(),
        msg: error.get("msg").to_owned(),
        vars: fds.fields.clone(),
    }
}

// ---------------------------------------------------------------------------
// The environment variable.

#[test]
fn env_with_two_fields_is_malformed() {
    let r = reject(Hand::new().env("1:%parent%"));
    r.says(
        "InvalidHandover",
        &[
            "TABLEFLIP_HANDOVER=\"1:%parent%\" is malformed",
            "<version>:<parent-fd>:<ready-fd>",
        ],
    );
}

#[test]
fn env_with_four_fields_is_malformed() {
    let r = reject(Hand::new().env("1:%parent%:%ready%:9"));
    r.says(
        "InvalidHandover",
        &["\"1:%parent%:%ready%:9\" is malformed"],
    );
}

#[test]
fn empty_env_is_malformed() {
    let r = reject(Hand::new().env(""));
    r.says("InvalidHandover", &["TABLEFLIP_HANDOVER=\"\" is malformed"]);
}

#[test]
fn env_with_a_non_numeric_version() {
    let r = reject(Hand::new().env("v1:%parent%:%ready%"));
    r.says("InvalidHandover", &["the version \"v1\" is not a number"]);
}

#[test]
fn env_with_a_non_numeric_fd() {
    let r = reject(Hand::new().env("1:abc:%ready%"));
    r.says(
        "InvalidHandover",
        &["the parent fd \"abc\" is not a valid fd number"],
    );
    let r = reject(Hand::new().env("1:%parent%:4x"));
    r.says(
        "InvalidHandover",
        &["the ready fd \"4x\" is not a valid fd number"],
    );
}

#[test]
fn env_with_a_standard_stream_or_negative_fd() {
    let r = reject(Hand::new().env("1:2:%ready%"));
    r.says(
        "InvalidHandover",
        &["the parent fd \"2\" is not a valid fd number (3 or more)"],
    );
    let r = reject(Hand::new().env("1:%parent%:-1"));
    r.says(
        "InvalidHandover",
        &["the ready fd \"-1\" is not a valid fd number (3 or more)"],
    );
}

#[test]
fn env_with_equal_fds() {
    let r = reject(Hand::new().env("1:%parent%:%parent%"));
    r.says(
        "InvalidHandover",
        &["the parent and ready fds are both %parent%"],
    );
}

#[test]
fn env_with_version_zero() {
    let r = reject(Hand::new().env("0:%parent%:%ready%"));
    r.says("InvalidHandover", &["protocol version 0"]);
}

#[test]
fn env_with_a_newer_version_names_both_versions() {
    let r = reject(Hand::new().env("3:%parent%:%ready%"));
    r.says(
        "InvalidHandover",
        &["protocol version 3", "this build speaks versions 1 to 2"],
    );
}

#[test]
fn env_that_is_not_utf8() {
    // "1:\xff:3"
    let r = reject(Hand::new().arg("--env-hex", "313aff3a33"));
    r.says(
        "InvalidHandover",
        &["TABLEFLIP_HANDOVER=\"1:\\xFF:3\" is not UTF-8"],
    );
}

// ---------------------------------------------------------------------------
// The protocol's own fds.

#[test]
fn parent_fd_not_open() {
    let r = reject(Hand::new().make("gone", "closed").env("1:%gone%:%ready%"));
    r.says("InvalidHandover", &["the parent fd %gone% is not open"]);
}

#[test]
fn ready_fd_not_open() {
    let r = reject(Hand::new().make("gone", "closed").env("1:%parent%:%gone%"));
    r.says("InvalidHandover", &["the ready fd %gone% is not open"]);
}

#[test]
fn parent_fd_is_a_regular_file() {
    let r = reject(Hand::new().make("f", "file").env("1:%f%:%ready%"));
    r.says("InvalidHandover", &["the parent fd %f% is not a pipe"]);
}

#[test]
fn ready_fd_is_a_socket() {
    let r = reject(Hand::new().make("s", "udp").env("1:%parent%:%s%"));
    r.says("InvalidHandover", &["the ready fd %s% is not a pipe"]);
}

#[test]
fn parent_fd_is_the_write_end_of_a_pipe() {
    let r = reject(Hand::new().make("w", "pipe-w").env("1:%w%:%ready%"));
    r.says(
        "InvalidHandover",
        &["the parent fd %w% is the write end of a pipe"],
    );
}

#[test]
fn ready_fd_is_the_read_end_of_a_pipe() {
    let r = reject(
        Hand::new()
            .make("r", "pipe-r")
            .env("1:%parent%:%r%")
            .meta(r#"{"version":1}"#),
    );
    r.says(
        "InvalidHandover",
        &["the ready fd %r% is the read end of a pipe"],
    );
}

// ---------------------------------------------------------------------------
// The metadata.

#[test]
fn metadata_garbage_text() {
    let r = reject(Hand::new().raw("this is not a handover, just noise"));
    r.says(
        "InvalidHandover",
        &["the metadata does not start with a length line"],
    );
}

#[test]
fn metadata_garbage_bytes() {
    let r = reject(Hand::new().raw_hex(&"ff00fe01".repeat(16)));
    r.says(
        "InvalidHandover",
        &["the metadata does not start with a length line"],
    );
}

#[test]
fn metadata_length_is_not_a_number() {
    let r = reject(Hand::new().raw("12x\n{\"version\":1}"));
    r.says(
        "InvalidHandover",
        &["the metadata header \"12x\" is not a length"],
    );
    let r = reject(Hand::new().raw("-1\n{}"));
    r.says(
        "InvalidHandover",
        &["the metadata header \"-1\" is not a length"],
    );
}

#[test]
fn metadata_body_is_not_json() {
    let r = reject(Hand::new().meta("<handover version=1/>"));
    r.says("InvalidHandover", &["the metadata is not valid"]);
}

#[test]
fn metadata_truncated() {
    let body = r#"{"version":1,"entries":["#;
    let r = reject(Hand::new().raw(&format!("100\n{body}")).eof());
    r.says(
        "InvalidHandover",
        &[&format!(
            "the metadata is truncated ({} of 100 bytes)",
            body.len()
        )],
    );
}

#[test]
fn parent_closes_before_the_metadata() {
    let r = reject(Hand::new().eof());
    r.says(
        "InvalidHandover",
        &["the parent closed the pipe before sending the metadata"],
    );
}

#[test]
fn metadata_over_the_limit() {
    let r = reject(Hand::new().raw("17000000\n{\"version\":1"));
    r.says(
        "InvalidHandover",
        &["the metadata is 17000000 bytes, more than the limit of 16777216"],
    );
}

#[test]
fn metadata_longer_than_announced() {
    let r = reject(Hand::new().raw("13\n{\"version\":1}}}}"));
    r.says("InvalidHandover", &["more than the announced 13 bytes"]);
}

#[test]
fn metadata_of_a_newer_version() {
    let r = reject(Hand::new().meta(r#"{"version":3,"parent_pid":1,"entries":[]}"#));
    r.says(
        "InvalidHandover",
        &["protocol version 3", "this build speaks versions 1 to 2"],
    );
}

#[test]
fn metadata_without_a_version() {
    let r = reject(Hand::new().meta(r#"{"parent_pid":1,"generation":2,"entries":[]}"#));
    r.says(
        "InvalidHandover",
        &["the metadata is not valid", "missing field `version`"],
    );
}

// ---------------------------------------------------------------------------
// The entries.

#[test]
fn entry_with_a_closed_fd() {
    let r = reject(Hand::new().make("gone", "closed").entries(
        r#"{"name":"web","kind":"listener","fd":%gone%,"network":"tcp","address":"127.0.0.1:1"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["cannot inherit listener \"web\"", "fd %gone% is not open"],
    );
}

#[test]
fn entry_regular_file_as_a_listener() {
    let r = reject(Hand::new().make("f", "file").entries(
        r#"{"name":"web","kind":"listener","fd":%f%,"network":"tcp","address":"127.0.0.1:1"}"#,
    ));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "fd %f%: it is not a socket, expected a listener",
        ],
    );
}

#[test]
fn entry_udp_socket_as_a_tcp_listener() {
    let r = reject(Hand::new().make("u", "udp").entries(
        r#"{"name":"web","kind":"listener","fd":%u%,"network":"tcp","address":"%u.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "fd %u%: it is a UDP socket, expected a tcp listener",
        ],
    );
}

#[test]
fn entry_udp_socket_as_a_udp_listener() {
    let r = reject(Hand::new().make("u", "udp").entries(
        r#"{"name":"web","kind":"listener","fd":%u%,"network":"udp","address":"%u.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %u%: a udp socket cannot be a listener"],
    );
}

#[test]
fn entry_tcp_listener_as_a_udp_packet_socket() {
    let r = reject(Hand::new().make("l", "tcp-listener").entries(
        r#"{"name":"dns","kind":"packet","fd":%l%,"network":"udp","address":"%l.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit packet socket \"dns\"",
            "fd %l%: it is a TCP socket, expected a udp packet socket",
        ],
    );
}

#[test]
fn entry_tcp_listener_as_a_tcp_packet_socket() {
    let r = reject(Hand::new().make("l", "tcp-listener").entries(
        r#"{"name":"dns","kind":"packet","fd":%l%,"network":"tcp","address":"%l.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %l%: a tcp socket cannot be a packet socket"],
    );
}

#[test]
fn entry_connected_stream_as_a_listener() {
    let r = reject(Hand::new().make("c", "tcp-stream").entries(
        r#"{"name":"web","kind":"listener","fd":%c%,"network":"tcp","address":"%c.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %c%: it is a TCP socket that is not listening"],
    );
}

/// A socket cookie proves which socket the previous generation handed on
/// (the next generation then skips the checks of type, address and
/// state): the cookie of another socket is refused, naming it.
#[test]
fn entry_with_the_cookie_of_another_socket() {
    let r = reject(
        Hand::new()
            .make("a", "tcp-listener")
            .make("b", "tcp-listener")
            .entries(
                r#"{"name":"web","kind":"listener","fd":%a%,"network":"tcp","address":"%a.addr%","cookie":%b.cookie%}"#,
            ),
    );
    r.says(
        "InheritMismatch",
        &[
            "fd %a%: it is not the socket the previous generation handed on",
            "socket cookie %b.cookie% expected",
        ],
    );
}

/// A cookie on an entry whose fd is a file: not a socket, whatever the
/// cookie says.
#[test]
fn entry_with_a_cookie_on_a_file() {
    let r = reject(Hand::new().make("f", "file").entries(
        r#"{"name":"web","kind":"listener","fd":%f%,"network":"tcp","address":"127.0.0.1:1","cookie":12345}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %f%: it is not a socket, expected a listener"],
    );
}

/// With its own cookie, an entry that makes no sense on its own (a UDP
/// listener) is still refused.
#[test]
fn entry_with_a_cookie_and_an_impossible_kind() {
    let r = reject(Hand::new().make("u", "udp").entries(
        r#"{"name":"web","kind":"listener","fd":%u%,"network":"udp","address":"%u.addr%","cookie":%u.cookie%}"#,
    ));
    r.says("InheritMismatch", &["a udp socket cannot be a listener"]);
}

#[test]
fn entry_non_listening_socket_as_a_listener() {
    let r = reject(Hand::new().make("b", "tcp-bound").entries(
        r#"{"name":"web","kind":"listener","fd":%b%,"network":"tcp","address":"%b.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %b%: it is a TCP socket that is not listening"],
    );
}

#[test]
fn entry_unix_stream_as_a_tcp_listener() {
    let r = reject(Hand::new().make("x", "unix-stream").entries(
        r#"{"name":"web","kind":"listener","fd":%x%,"network":"tcp","address":"127.0.0.1:1"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %x%: it is a Unix stream socket, expected a tcp listener"],
    );
}

#[test]
fn entry_unix_datagram_as_a_unix_listener() {
    let r = reject(Hand::new().make("g", "unixgram").entries(
        r#"{"name":"sock","kind":"listener","fd":%g%,"network":"unix","address":"/tmp/x.sock"}"#,
    ));
    r.says(
        "InheritMismatch",
        &["fd %g%: it is a Unix datagram socket, expected a unix listener"],
    );
}

#[test]
fn entry_tcp_listener_as_a_connection() {
    let r = reject(
        Hand::new()
            .make("l", "tcp-listener")
            .entries(r#"{"name":"peer","kind":"conn","fd":%l%,"network":"tcp"}"#),
    );
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit connection \"peer\"",
            "fd %l%: it is a listening TCP socket, expected a connection",
        ],
    );
}

#[test]
fn entry_socket_as_a_file() {
    let r = reject(
        Hand::new()
            .make("c", "tcp-stream")
            .entries(r#"{"name":"log","kind":"file","fd":%c%}"#),
    );
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit file \"log\"",
            "fd %c%: it is a socket, expected a file",
        ],
    );
}

#[test]
fn entry_file_with_a_network() {
    let r = reject(
        Hand::new()
            .make("f", "file")
            .entries(r#"{"name":"log","kind":"file","fd":%f%,"network":"tcp"}"#),
    );
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit file \"log\"",
            "a file entry names a network",
        ],
    );
}

#[test]
fn entry_without_a_network() {
    let r = reject(
        Hand::new()
            .make("l", "tcp-listener")
            .entries(r#"{"name":"web","kind":"listener","fd":%l%,"address":"%l.addr%"}"#),
    );
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "the entry names no network",
        ],
    );
}

#[test]
fn entry_without_an_address() {
    let r = reject(
        Hand::new()
            .make("l", "tcp-listener")
            .entries(r#"{"name":"web","kind":"listener","fd":%l%,"network":"tcp"}"#),
    );
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "the entry names no address",
        ],
    );
}

#[test]
fn entry_with_an_unknown_network() {
    let r = reject(Hand::new().make("l", "tcp-listener").entries(
        r#"{"name":"web","kind":"listener","fd":%l%,"network":"sctp","address":"%l.addr%"}"#,
    ));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "unknown network \"sctp\"",
        ],
    );
}

#[test]
fn entry_with_an_unknown_kind() {
    let r = reject(Hand::new().make("l", "tcp-listener").entries(
        r#"{"name":"web","kind":"acceptor","fd":%l%,"network":"tcp","address":"%l.addr%"}"#,
    ));
    r.says(
        "InvalidHandover",
        &["the metadata is not valid", "unknown variant `acceptor`"],
    );
}

#[test]
fn entry_with_an_empty_name() {
    let r =
        reject(Hand::new().make("l", "tcp-listener").entries(
            r#"{"name":"","kind":"listener","fd":%l%,"network":"tcp","address":"%l.addr%"}"#,
        ));
    r.says(
        "InvalidHandover",
        &["an entry for fd %l% has an empty name"],
    );
}

#[test]
fn two_entries_with_the_same_name() {
    let r = reject(
        Hand::new()
            .make("a", "tcp-listener")
            .make("b", "tcp-listener")
            .entries(
                r#"{"name":"web","kind":"listener","fd":%a%,"network":"tcp","address":"%a.addr%"},
                   {"name":"web","kind":"listener","fd":%b%,"network":"tcp","address":"%b.addr%"}"#,
            ),
    );
    r.says("InvalidHandover", &["the name \"web\" is handed on twice"]);
}

#[test]
fn two_entries_with_the_same_fd() {
    let r = reject(Hand::new().make("a", "tcp-listener").entries(
        r#"{"name":"web","kind":"listener","fd":%a%,"network":"tcp","address":"%a.addr%"},
           {"name":"api","kind":"listener","fd":%a%,"network":"tcp","address":"%a.addr%"}"#,
    ));
    r.says(
        "InvalidHandover",
        &["fd %a% is named by more than one entry"],
    );
}

#[test]
fn entry_naming_the_protocol_pipes() {
    let r = reject(Hand::new().entries(r#"{"name":"meta","kind":"file","fd":%parent%}"#));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit file \"meta\"",
            "fd %parent% is one of the protocol's own pipes",
        ],
    );
    let r = reject(Hand::new().entries(r#"{"name":"rdy","kind":"file","fd":%ready%}"#));
    r.says(
        "InheritMismatch",
        &["fd %ready% is one of the protocol's own pipes"],
    );
}

#[test]
fn entry_naming_a_standard_stream() {
    for fd in 0..=2 {
        let r =
            reject(Hand::new().entries(&format!(r#"{{"name":"std","kind":"file","fd":{fd}}}"#)));
        r.says(
            "InheritMismatch",
            &[&format!("fd {fd} is a standard stream, not a handed-on fd")],
        );
    }
}

#[test]
fn entry_with_a_negative_fd() {
    let r = reject(Hand::new().entries(
        r#"{"name":"web","kind":"listener","fd":-1,"network":"tcp","address":"127.0.0.1:1"}"#,
    ));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "fd -1 is not a valid fd number",
        ],
    );
}

/// An fd the child opened itself (its runtime's, say) is not the parent's
/// to hand on: taking it would close it under its real owner.
#[test]
fn entry_naming_an_fd_the_child_opened_itself() {
    let r = reject(Hand::new().entries(r#"{"name":"log","kind":"file","fd":%childfd%}"#));
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit file \"log\"",
            "fd %childfd% was not inherited",
        ],
    );
}

/// A valid entry before a bad one: nothing is taken, so nothing is closed
/// (`reject` checks that every handed-on fd is still open).
#[test]
fn a_bad_entry_after_a_good_one_closes_nothing() {
    let r = reject(
        Hand::new()
            .make("l", "tcp-listener")
            .make("f", "file")
            .make("gone", "closed")
            .entries(
                r#"{"name":"web","kind":"listener","fd":%l%,"network":"tcp","address":"%l.addr%"},
                   {"name":"log","kind":"file","fd":%f%},
                   {"name":"api","kind":"listener","fd":%gone%,"network":"tcp","address":"127.0.0.1:1"}"#,
            ),
    );
    r.says(
        "InheritMismatch",
        &["cannot inherit listener \"api\"", "fd %gone% is not open"],
    );
}

// ---------------------------------------------------------------------------
// Version 2: the fds over a Unix socket, named by position.

/// Version-2 metadata around these entries.
fn v2_entries(entries: &str) -> String {
    format!(r#"{{"version":2,"entries":[{entries}]}}"#)
}

/// Version-2 metadata names fds by position: without the socket they come
/// over, it is refused (read as version 1, the positions would be fd
/// numbers that mean something else).
#[test]
fn v2_metadata_without_the_socket() {
    let r = reject(Hand::new().meta(&v2_entries("")));
    r.says(
        "InvalidHandover",
        &[
            "the metadata is of version 2",
            "TABLEFLIP_HANDOVER_SOCKET names none",
        ],
    );
}

/// And a socket with version-1 metadata.
#[test]
fn v2_socket_with_version_1_metadata() {
    let r = reject(Hand::new().stream("").entries(""));
    r.says(
        "InvalidHandover",
        &["TABLEFLIP_HANDOVER_SOCKET names a socket, but the metadata is of version 1"],
    );
}

#[test]
fn v2_socket_variable_naming_a_pipe() {
    let r = reject(
        Hand::new()
            .make("p", "pipe-r")
            .arg("--socket-env", "%p%")
            .meta(&v2_entries("")),
    );
    r.says(
        "InvalidHandover",
        &["the socket fd %p% is not a Unix SOCK_SEQPACKET socket"],
    );
}

#[test]
fn v2_socket_variable_naming_the_ready_pipe() {
    let r = reject(
        Hand::new()
            .arg("--socket-env", "%ready%")
            .meta(&v2_entries("")),
    );
    r.says(
        "InvalidHandover",
        &["TABLEFLIP_HANDOVER_SOCKET=\"%ready%\" names fd %ready%, one of the protocol's pipes"],
    );
}

#[test]
fn v2_socket_variable_that_is_no_number() {
    let r = reject(Hand::new().arg("--socket-env", "x5").meta(&v2_entries("")));
    r.says(
        "InvalidHandover",
        &["TABLEFLIP_HANDOVER_SOCKET=\"x5\": the socket fd \"x5\" is not a valid fd number"],
    );
}

/// The parent closes the socket before all the fds came: the child says
/// how many it got, and takes nothing.
#[test]
fn v2_parent_closes_the_socket_before_sending_the_fds() {
    let r = reject(
        Hand::new()
            .make_sent("a", "tcp-listener")
            .stream("")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%"}"#,
            )),
    );
    r.says(
        "InvalidHandover",
        &["the parent closed it before sending them all (0 of 1 received)"],
    );
}

#[test]
fn v2_packet_out_of_order() {
    let r = reject(
        Hand::new()
            .make_sent("a", "tcp-listener")
            .stream("1:a")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%"}"#,
            )),
    );
    r.says("InvalidHandover", &["does not start at position 0"]);
}

#[test]
fn v2_more_fds_than_the_metadata_names() {
    let r = reject(
        Hand::new()
            .make_sent("a", "tcp-listener")
            .make_sent("b", "tcp-listener")
            .stream("0:a,b")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%"}"#,
            )),
    );
    r.says(
        "InvalidHandover",
        &["a packet carries 2 fds, 1 were left to come"],
    );
}

#[test]
fn v2_entry_names_a_position_that_was_not_sent() {
    let r = reject(
        Hand::new()
            .make_sent("a", "tcp-listener")
            .make_sent("b", "file")
            .stream("0:a,b")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%"},
                   {"name":"log","kind":"file","fd":7}"#,
            )),
    );
    r.says(
        "InvalidHandover",
        &["the entry \"log\" names fd position 7, but 2 fds came over the socket"],
    );
}

#[test]
fn v2_two_entries_at_one_position() {
    let r = reject(
        Hand::new()
            .make_sent("a", "tcp-listener")
            .make_sent("b", "tcp-listener")
            .stream("0:a,b")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%"},
                   {"name":"api","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%"}"#,
            )),
    );
    r.says("InvalidHandover", &["is named by more than one entry"]);
}

/// The fds that came over the socket get the same checks as inherited
/// ones: a cookie that is not the socket's is refused, naming it.
#[test]
fn v2_sent_socket_with_the_cookie_of_another() {
    let r = reject(
        Hand::new()
            .make_sent("a", "tcp-listener")
            .make("b", "tcp-listener")
            .stream("0:a")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%a.addr%","cookie":%b.cookie%}"#,
            )),
    );
    r.says(
        "InheritMismatch",
        &[
            "cannot inherit listener \"web\"",
            "socket cookie %b.cookie% expected",
        ],
    );
}

/// Without a cookie, a sent fd is checked in full: a UDP socket is not a
/// TCP listener.
#[test]
fn v2_sent_udp_socket_as_a_tcp_listener() {
    let r = reject(
        Hand::new()
            .make_sent("u", "udp")
            .stream("0:u")
            .meta(&v2_entries(
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%u.addr%"}"#,
            )),
    );
    r.says("InheritMismatch", &["cannot inherit listener \"web\""]);
}

// ---------------------------------------------------------------------------
// Valid hand-made handovers.

/// Runs `svc` under a valid hand-made handover of the listener `web` (and
/// an unclaimed file `log`) described by `meta`; checks that it inherits
/// the very socket, becomes ready, serves on it, and stops cleanly.
fn inherit_by_hand(meta: &str, generation: &str) {
    inherit_by_hand_with(
        Hand::new()
            .make("web", "tcp-listener")
            .make("log", "file")
            .meta(meta),
        generation,
    );
}

/// As [`inherit_by_hand`], the handover built by `hand`.
fn inherit_by_hand_with(hand: Hand, generation: &str) {
    let _serial = serial();
    let ctl = Scratch::new("v1");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut run = hand.start(&ctl, &[]);
    let fds = run.wait_kind("hc-fds", None);
    let addr = fds.get("web.addr").to_owned();
    let parent = run.first_pid();
    let child = spawned_child(&mut run, parent);
    let start = run.wait_kind("start", Some(child));
    assert_eq!(start.get("has_parent"), "true", "{}", start.line);
    assert_eq!(start.get("parent"), parent.to_string(), "{}", start.line);
    assert_eq!(start.get("gen"), generation, "{}", start.line);
    let listening = run.wait_kind("listening", Some(child));
    assert_eq!(
        listening.get("addr"),
        addr,
        "the hand-made listener is inherited, not bound afresh"
    );
    assert_eq!(listening.get("nonblock"), "true", "{}", listening.line);
    assert_eq!(listening.get("cloexec"), "true", "{}", listening.line);
    run.wait_kind("ready", Some(child));
    run.wait_kind("hc-ready", Some(parent));
    assert_eq!(
        reply_pid(&tcp_get(&addr).expect("svc serves on the inherited socket")),
        child
    );
    signal(child, Signal::SIGTERM);
    run.wait_kind("exit", Some(child));
    let exit = run.wait_kind("hc-exit", Some(parent));
    assert_eq!(exit.get("code"), "0", "{}", exit.line);
    run.wait_all_exited();
    assert!(
        !run.history.iter().any(|e| e.kind == "error"),
        "{:#?}",
        run.lines()
    );
}

/// The version-1 metadata exactly as the first release writes it (field
/// order and all), written out by hand: never produced by the crate's
/// encoder, so a change of the format shows here.
#[test]
fn version_one_handover_written_by_hand_is_inherited() {
    inherit_by_hand(
        concat!(
            r#"{"version":1,"parent_pid":%pid%,"generation":2,"entries":["#,
            r#"{"name":"web","kind":"listener","fd":%web%,"network":"tcp","address":"%web.addr%"},"#,
            r#"{"name":"log","kind":"file","fd":%log%}]}"#,
        ),
        "2",
    );
}

/// Version 2 written by hand: the listener and the file come over the
/// socket in two packets, named by their positions; the child inherits the
/// very socket.
#[test]
fn version_two_handover_written_by_hand_is_inherited() {
    inherit_by_hand_with(
        Hand::new()
            .make_sent("web", "tcp-listener")
            .make_sent("log", "file")
            .stream("0:web/1:log")
            .meta(concat!(
                r#"{"version":2,"parent_pid":%pid%,"generation":5,"entries":["#,
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%web.addr%","cookie":%web.cookie%},"#,
                r#"{"name":"log","kind":"file","fd":1}]}"#,
            )),
        "5",
    );
}

/// A `TABLEFLIP_HANDOVER_SOCKET` beside a `TABLEFLIP_HANDOVER_ID` that names
/// two pipes is a stale copy (a build before version 2 passes on the
/// environment it inherited): the handover is version 1 and is taken,
/// not ignored as meant for another process.
#[test]
fn a_stale_socket_variable_beside_a_version_1_id_is_ignored() {
    inherit_by_hand_with(
        Hand::new()
            .make("web", "tcp-listener")
            .make("log", "file")
            .arg("--socket-env", "999")
            .arg("--id", "%parent.ino%:%ready.ino%")
            .meta(concat!(
                r#"{"version":1,"parent_pid":%pid%,"generation":3,"entries":["#,
                r#"{"name":"web","kind":"listener","fd":%web%,"network":"tcp","address":"%web.addr%"},"#,
                r#"{"name":"log","kind":"file","fd":%log%}]}"#,
            )),
        "3",
    );
}

/// A version-2 handover with its `TABLEFLIP_HANDOVER_ID` (the two pipes'
/// inodes and the socket's) is taken.
#[test]
fn version_two_handover_with_its_id_is_inherited() {
    inherit_by_hand_with(
        Hand::new()
            .make_sent("web", "tcp-listener")
            .make_sent("log", "file")
            .stream("0:web,log")
            .arg("--id", "%parent.ino%:%ready.ino%:%stream.ino%")
            .meta(concat!(
                r#"{"version":2,"parent_pid":%pid%,"generation":4,"entries":["#,
                r#"{"name":"web","kind":"listener","fd":0,"network":"tcp","address":"%web.addr%"},"#,
                r#"{"name":"log","kind":"file","fd":1}]}"#,
            )),
        "4",
    );
}

/// Fields a later version-1 build might add are ignored; fields the first
/// release always writes but that are optional may be missing.
#[test]
fn version_one_handover_with_unknown_fields_is_inherited() {
    inherit_by_hand(
        concat!(
            r#"{"version":1,"parent_pid":%pid%,"generation":7,"sent_at":"2031-01-01T00:00:00Z","#,
            r#""features":["zerocopy",{"x":[1,2,null]}],"entries":["#,
            r#"{"name":"web","kind":"listener","fd":%web%,"network":"tcp","address":"%web.addr%","#,
            r#""backlog":4096,"owner":{"uid":0}},"#,
            r#"{"name":"log","kind":"file","fd":%log%,"mode":"append"}],"checksum":null}"#,
        ),
        "7",
    );
}

/// The smallest valid version-1 metadata: no entries, defaults for the rest.
#[test]
fn minimal_version_one_handover_binds_afresh() {
    let _serial = serial();
    let ctl = Scratch::new("v1min");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut run = Hand::new().meta(r#"{"version":1}"#).start(&ctl, &[]);
    let parent = run.first_pid();
    let child = spawned_child(&mut run, parent);
    let start = run.wait_kind("start", Some(child));
    assert_eq!(start.get("has_parent"), "true", "{}", start.line);
    let addr = run
        .wait_kind("listening", Some(child))
        .get("addr")
        .to_owned();
    run.wait_kind("hc-ready", Some(parent));
    assert_eq!(reply_pid(&tcp_get(&addr).expect("serves")), child);
    signal(child, Signal::SIGTERM);
    let exit = run.wait_kind("hc-exit", Some(parent));
    assert_eq!(exit.get("code"), "0", "{}", exit.line);
    run.wait_all_exited();
}

// ---------------------------------------------------------------------------
// One upgrader per process; the testing stub.

#[test]
fn a_second_upgrader_in_one_process_is_refused() {
    let _serial = serial();
    let ctl = Scratch::new("twice");
    let mut svc = Service::start(SVC, &ctl, &[("TF_NEW_TWICE", "1")]);
    let pid = svc.first_pid();
    let twice = svc.wait_kind("new-twice", Some(pid));
    assert_eq!(twice.get("kind"), "AlreadyCreated", "{}", twice.line);
    assert!(
        twice.get("msg").contains(&format!(
            "an Upgrader already exists in this process (pid {pid})"
        )),
        "{}",
        twice.line
    );
    // The first one is unaffected.
    svc.wait_kind("ready", Some(pid));
    signal(pid, Signal::SIGTERM);
    svc.wait_kind("exit", Some(pid));
    assert!(svc.wait_first().success());
    svc.wait_all_exited();
}

#[tokio::test]
async fn testing_stubs_bind_plainly_and_refuse_to_upgrade() {
    let stubs: Vec<tableflip::Upgrader> = (0..3)
        .map(|_| tableflip::testing::upgrader(tableflip::Options::default()).expect("stub"))
        .collect();
    let mut listeners = Vec::new();
    for (i, stub) in stubs.iter().enumerate() {
        assert!(!stub.has_parent());
        let l: tokio::net::TcpListener = stub.listen("tcp", "127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        // The very listener answers.
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        assert!(
            client.is_ok() && accepted.is_ok(),
            "stub {i} listener serves"
        );
        stub.ready().expect("ready");
        match stub.upgrade().await {
            Err(tableflip::Error::NotSupported) => {}
            other => panic!("stub {i}: upgrade gave {other:?}, expected NotSupported"),
        }
        listeners.push((l, addr));
    }
    // Three stubs, three distinct sockets, none handed anywhere.
    let mut ports: Vec<u16> = listeners.iter().map(|(_, a)| a.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    for stub in &stubs {
        stub.stop();
        tokio::time::timeout(DEADLINE, stub.exit())
            .await
            .expect("a stopped stub's exit() resolves");
    }
}

// ---------------------------------------------------------------------------
// Values that must not be trusted.

/// A handover that claims generation `u64::MAX`: the service starts, and
/// its upgrade (the next generation's number computed from it) neither
/// panics (debug builds used to: "attempt to add with overflow") nor
/// fails.
#[test]
fn generation_u64_max_never_overflows() {
    let h = Harness::new("genmax");
    let ctl = &h.ctl;
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut run = Hand::new()
        .make("web", "tcp-listener")
        .meta(concat!(
            r#"{"version":1,"parent_pid":%pid%,"generation":18446744073709551615,"entries":["#,
            r#"{"name":"web","kind":"listener","fd":%web%,"network":"tcp","address":"%web.addr%"}]}"#,
        ))
        .eof()
        .start(ctl, &[]);
    let parent = run.first_pid();
    let child = spawned_child(&mut run, parent);
    let start = run.wait_kind("start", Some(child));
    assert_eq!(start.get("gen"), "18446744073709551615", "{}", start.line);
    run.wait_kind("ready", Some(child));
    let grandchild = run.upgrade(child);
    let next = run.wait_kind("start", Some(grandchild));
    assert_eq!(next.get("gen"), "18446744073709551615", "{}", next.line);
    run.wait_kind("exit", Some(child));
    wait_gone(child);
    run.stop(grandchild);
}

/// Hostile metadata names a victim's socket file as the address of an
/// inherited Unix listener that the service does not claim: closing it at
/// readiness removes (at most) the file that socket is really bound to,
/// never the path the metadata names. (The path used to come from the
/// metadata.)
#[test]
fn metadata_cannot_name_a_socket_file_for_removal() {
    let h = Harness::new("victim");
    let ctl = &h.ctl;
    let victim_path = ctl.path().join("victim.sock");
    let victim = std::os::unix::net::UnixListener::bind(&victim_path).expect("bind the victim");
    drop(victim);
    assert!(victim_path.exists(), "a socket file nobody listens on");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut run = Hand::new()
        .make("u", "unix-listener")
        .meta(&format!(
            concat!(
                r#"{{"version":1,"parent_pid":%pid%,"generation":2,"entries":["#,
                r#"{{"name":"admin","kind":"listener","fd":%u%,"network":"unix","address":"{}"}}]}}"#,
            ),
            victim_path.display()
        ))
        .start(ctl, &[]);
    let parent = run.first_pid();
    let child = spawned_child(&mut run, parent);
    run.wait_kind("ready", Some(child));
    run.wait_kind("hc-ready", Some(parent));
    assert!(
        victim_path.exists(),
        "the file the metadata named was removed"
    );
    signal(child, Signal::SIGTERM);
    run.wait_kind("exit", Some(child));
    run.wait_all_exited();
}

// ---------------------------------------------------------------------------
// Random and mutated handovers.

mod fuzz {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    use super::*;

    /// The kinds of resources a case may hand on.
    const KINDS: &[&str] = &[
        "tcp-listener",
        "tcp-bound",
        "tcp-stream",
        "udp",
        "unix-listener",
        "unix-stream",
        "unixgram",
        "file",
        "pipe-r",
        "pipe-w",
        "closed",
    ];

    /// One entry of the metadata, as a JSON template over resources
    /// `r0`…`r{n-1}`.
    fn entry(n: usize) -> impl Strategy<Value = String> {
        let name = prop_oneof![
            3 => Just("web".to_owned()),
            3 => (0..9u8).prop_map(|i| format!("n{i}")),
            1 => Just(String::new()),
            1 => "[a-z\\\\\"\\u{0}-\\u{7f}]{0,12}",
        ];
        let kind = prop_oneof![
            Just("listener"),
            Just("packet"),
            Just("conn"),
            Just("file"),
            Just("bogus"),
        ];
        let fd = prop_oneof![
            8 => (0..n.max(1)).prop_map(|i| format!("%r{i}%")),
            1 => Just("%parent%".to_owned()),
            1 => Just("%ready%".to_owned()),
            1 => Just("%childfd%".to_owned()),
            1 => any::<i32>().prop_map(|v| v.to_string()),
            1 => Just("\"7\"".to_owned()),
        ];
        let network = prop_oneof![
            Just(None),
            Just(Some("tcp")),
            Just(Some("udp")),
            Just(Some("unix")),
            Just(Some("unixgram")),
            Just(Some("unixpacket")),
            Just(Some("tcp6")),
            Just(Some("carrier-pigeon")),
        ];
        let address = prop_oneof![
            Just(None),
            (0..n.max(1)).prop_map(|i| Some(format!("%r{i}.addr%"))),
            Just(Some("127.0.0.1:1".to_owned())),
            Just(Some("/tmp/tableflip-fuzz-victim.sock".to_owned())),
            "[ -~]{0,20}".prop_map(Some),
        ];
        (name, kind, fd, network, address).prop_map(|(name, kind, fd, network, address)| {
            let mut e = format!(
                r#"{{"name":{},"kind":"{kind}","fd":{fd}"#,
                serde_json::Value::String(name)
            );
            if let Some(n) = network {
                e.push_str(&format!(r#","network":"{n}""#));
            }
            if let Some(a) = address {
                e.push_str(&format!(r#","address":{}"#, serde_json::Value::String(a)));
            }
            e.push('}');
            e
        })
    }

    /// A whole case: the resources, then framed metadata (maybe mutated).
    fn case() -> impl Strategy<Value = (Vec<&'static str>, String, Option<(usize, u8)>, bool)> {
        prop::collection::vec(prop::sample::select(KINDS), 0..4).prop_flat_map(|kinds| {
            let n = kinds.len();
            let version = prop_oneof![12 => Just(1u64), 1 => Just(0), 1 => Just(2), 1 => any::<u64>()];
            let meta = (
                version,
                any::<u32>(),
                any::<u64>(),
                prop::collection::vec(entry(n), 0..4),
                any::<bool>(),
            )
                .prop_map(|(v, pid, generation, entries, extra)| {
                    let extra = if extra { r#","future":[1,{"x":null}]"# } else { "" };
                    format!(
                        r#"{{"version":{v},"parent_pid":{pid},"generation":{generation},"entries":[{}]{extra}}}"#,
                        entries.join(",")
                    )
                });
            // A printable byte written over one position, sometimes.
            let mutation = prop::option::weighted(0.2, (any::<usize>(), 0x20u8..0x7f));
            (Just(kinds), meta, mutation, prop::bool::weighted(0.3))
        })
    }

    /// Runs one case through `handcraft` and `svc`: whatever the input,
    /// `svc` either rejects it (an `error` event, exit status 2, every fd
    /// it was handed still open) or accepts it (ready, then stops cleanly
    /// on SIGTERM); never a panic, a signal, or a hang.
    fn run_case(kinds: &[&str], meta: &str, mutation: Option<(usize, u8)>, truncate: bool) {
        let ctl = Scratch::new("fuzz");
        ctl.write("listen", "web tcp 127.0.0.1:0\n");
        let mut hand = Hand::new();
        for (i, kind) in kinds.iter().enumerate() {
            hand = hand.make(&format!("r{i}"), kind);
        }
        let mut meta = meta.as_bytes().to_vec();
        if let Some((at, byte)) = mutation {
            let at = at % meta.len().max(1);
            if let Some(b) = meta.get_mut(at) {
                *b = byte;
            }
        }
        if truncate && mutation.is_some() {
            let keep = meta.len() / 2;
            meta.truncate(keep);
        }
        let meta = String::from_utf8(meta).unwrap_or_default();
        let hand = if truncate {
            // The header announces the whole; the body is cut short.
            hand.raw(&format!("{}\n{meta}", meta.len() * 2 + 1))
        } else {
            hand.meta(&meta)
        }
        .eof();
        let mut run = hand.start(&ctl, &[("TF_FDS_ON_ERROR", "1"), ("RUST_LOG", "warn")]);
        let fds = run.wait_kind("hc-fds", None);
        let child: u32 = run
            .wait_kind("hc-spawned", None)
            .get("child")
            .parse()
            .expect("child pid");
        let outcome = run.wait_for("the outcome", |e| {
            (e.pid == child && (e.kind == "error" || e.kind == "ready")) || e.kind == "hc-exit"
        });
        let context =
            |run: &Service| format!("kinds {kinds:?}, metadata {meta:?}: {:#?}", run.lines());
        match outcome.kind.as_str() {
            "error" => {
                let open = run.wait_kind("error-fds", Some(child));
                let open: Vec<&str> = open.get("fds").split(',').collect();
                for name in (0..kinds.len())
                    .filter(|i| kinds[*i] != "closed")
                    .map(|i| format!("r{i}"))
                    .chain(["parent".to_owned(), "ready".to_owned()])
                {
                    let fd = fds.get(&name);
                    assert!(
                        open.contains(&fd),
                        "fd {fd} ({name}) was closed; {}",
                        context(&run)
                    );
                }
                let exit = run.wait_kind("hc-exit", None);
                assert_eq!(exit.get("code"), "2", "{}", context(&run));
            }
            "ready" => {
                signal(child, Signal::SIGTERM);
                let exit = run.wait_kind("hc-exit", None);
                assert_eq!(exit.get("code"), "0", "{}", context(&run));
            }
            _ => panic!(
                "svc died without a word: {}; {}",
                outcome.line,
                context(&run)
            ),
        }
        run.wait_all_exited();
    }

    /// Random and mutated metadata over resources of every kind, through
    /// the real child path. A fixed seed and 96 cases keep it bounded and
    /// repeatable; `TABLEFLIP_FUZZ_CASES` runs more.
    #[test]
    fn random_and_mutated_handovers_never_panic_close_or_hang() {
        let _serial = serial();
        adopt_orphans();
        let cases = std::env::var("TABLEFLIP_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(96);
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
        let result = runner.run(&case(), |(kinds, meta, mutation, truncate)| {
            run_case(&kinds, &meta, mutation, truncate);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}

/// The application state's memfd as `tableflip::state` documents it,
/// built byte by byte: magic, format, fd count, length, CRC-32, padding,
/// bytes; as hex for `handcraft`.
fn state_hex(magic: &[u8; 8], format: u32, fds: u32, bytes: &[u8], crc: u32) -> String {
    let mut all = Vec::new();
    all.extend_from_slice(magic);
    all.extend_from_slice(&format.to_le_bytes());
    all.extend_from_slice(&fds.to_le_bytes());
    all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    all.extend_from_slice(&crc.to_le_bytes());
    all.extend_from_slice(&[0; 4]);
    all.extend_from_slice(bytes);
    all.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hands `svc` a state memfd holding `hex` (and a listener), runs its
/// `take-state` action, and returns the event it printed (`state-taken`
/// or `action-err`). The service goes on to readiness either way: what
/// to do about a corrupt state is the application's call.
fn take_handcrafted_state(hex: &str) -> Event {
    take_handcrafted_state_in("memfd", hex)
}

/// As [`take_handcrafted_state`], in a memfd of `kind` (`handcraft`'s).
fn take_handcrafted_state_in(kind: &str, hex: &str) -> Event {
    let _serial = serial();
    let ctl = Scratch::new("state");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    ctl.write("actions", "take-state app\n");
    let hand = Hand::new()
        .make("web", "tcp-listener")
        .make("state", &format!("{kind}:{hex}"))
        .entries(concat!(
            r#"{"name":"web","kind":"listener","fd":%web%,"network":"tcp","address":"%web.addr%"},"#,
            r#"{"name":"tableflip.state.app","kind":"file","fd":%state%}"#
        ));
    let mut run = hand.start(&ctl, &[]);
    let parent = run.first_pid();
    let child = spawned_child(&mut run, parent);
    let said = run.wait_for("the state taken, or the error", |e| {
        e.pid == child && (e.kind == "state-taken" || e.kind == "action-err")
    });
    run.wait_kind("ready", Some(child));
    signal(child, Signal::SIGTERM);
    run.wait_kind("hc-exit", Some(parent));
    run.wait_all_exited();
    said
}

/// A state written by hand to the documented layout is read back: the
/// format is a contract between builds, not an accident of the encoder.
#[test]
fn state_written_by_hand_to_the_documented_layout_is_taken() {
    let bytes = b"counter=42";
    let said = take_handcrafted_state(&state_hex(
        b"TFSTATE\0",
        1,
        0,
        bytes,
        crc32fast::hash(bytes),
    ));
    assert_eq!(said.kind, "state-taken", "{}", said.line);
    assert_eq!(said.get("len"), "10", "{}", said.line);
    assert!(said.line.contains("counter=42"), "{}", said.line);
}

/// Corrupt state: each kind of damage is an error of kind `State` that
/// names it (never a panic, never bytes that were not handed over).
#[test]
fn corrupt_state_is_an_error_naming_the_damage() {
    let bytes = b"counter=42";
    let crc = crc32fast::hash(bytes);
    for (hex, says) in [
        (
            state_hex(b"TFSTATE\0", 1, 0, bytes, crc ^ 1),
            "checksum does not match",
        ),
        (state_hex(b"NOTSTATE", 1, 0, bytes, crc), "magic bytes"),
        (state_hex(b"TFSTATE\0", 7, 0, bytes, crc), "format 7"),
        (
            state_hex(b"TFSTATE\0", 1, 2, bytes, crc),
            "announces 2 fds, and \"tableflip.state.app.fd.0\" is missing",
        ),
        ("00".repeat(5), "shorter than its 32-byte header"),
    ] {
        let said = take_handcrafted_state(&hex);
        assert_eq!(said.kind, "action-err", "{says}: {}", said.line);
        assert_eq!(said.get("kind"), "State", "{}", said.line);
        assert!(said.get("msg").contains(says), "{says}: {}", said.line);
    }
    // A valid state in a memfd that is not sealed: it could change under
    // the mapping that reads it, so it is refused.
    let said =
        take_handcrafted_state_in("memfd-unsealed", &state_hex(b"TFSTATE\0", 1, 0, bytes, crc));
    assert_eq!(said.get("kind"), "State", "{}", said.line);
    assert!(
        said.get("msg").contains("not a sealed memory file"),
        "{}",
        said.line
    );
}

/// The target `handcraft` (`parent`) started: its `hc-spawned` event.
fn spawned_child(run: &mut Service, parent: u32) -> u32 {
    run.wait_kind("hc-spawned", Some(parent))
        .get("child")
        .parse()
        .expect("child pid")
}
