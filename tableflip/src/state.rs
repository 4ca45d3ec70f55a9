//! Application state handed from one generation to the next: bytes (the
//! application's own serialization) and extra fds.
//!
//! The serving generation registers a source with
//! [`Upgrader::hand_over_state`](crate::Upgrader::hand_over_state) (or
//! [`Context::hand_over_state`](crate::Context::hand_over_state)); when an
//! upgrade starts, the source is called once and what it returns is written
//! to a sealed memfd (memfd_create(2), `F_SEAL_WRITE`: fcntl(2)) that the
//! next generation inherits with the listeners. The kernel holds the bytes:
//! no pipe is pumped, whatever the size, and nothing is written to disk.
//! The next generation reads it during its init with
//! [`Upgrader::inherited_state`](crate::Upgrader::inherited_state).
//!
//! The layout of the memfd (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TFSTATE\0` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | number of extra fds |
//! | 16 | 8 | length of the bytes, `N` |
//! | 24 | 4 | CRC-32 (IEEE) of the bytes |
//! | 28 | 4 | zero |
//! | 32 | `N` | the bytes |
//!
//! Each state has a name (several parts of a program, or a library, hand
//! their own over without clashing): the memfd of the state `NAME` is
//! handed on as a file named `tableflip.state.NAME`, its extra fds as
//! `tableflip.state.NAME.fd.<i>` (see [`Fds::names`](crate::Fds::names)).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use crate::error::{Error, Result};
use crate::sys;

/// The prefix of every entry of the handover that carries state.
pub(crate) const PREFIX: &str = "tableflip.state.";

/// The entry the memfd of the state `name` is handed on under.
pub(crate) fn memfd_name(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// The entry the `i`-th extra fd of the state `name` is handed on under.
pub(crate) fn fd_name(name: &str, i: usize) -> String {
    format!("{PREFIX}{name}.fd.{i}")
}

/// The longest state name.
pub const MAX_NAME: usize = 64;

/// Checks a state name: 1 to [`MAX_NAME`] ASCII letters, digits, `-` and
/// `_` (so that the entries' names cannot be confused). Names starting
/// with `tableflip` are this crate's own (`reserved` allows them).
pub(crate) fn check_name(name: &str, reserved: bool) -> Result<()> {
    let wrong = |why: &str| {
        Err(Error::State {
            reason: format!("invalid state name {name:?}: {why}"),
        })
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return wrong(&format!("it must have 1 to {MAX_NAME} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return wrong("only ASCII letters, digits, `-` and `_` are allowed");
    }
    if !reserved && name.starts_with("tableflip") {
        return wrong("names starting with `tableflip` are reserved for the crate's own state");
    }
    Ok(())
}

const MAGIC: [u8; 8] = *b"TFSTATE\0";
const FORMAT: u32 = 1;
const HEADER: usize = 32;

/// The most extra fds a state carries (each is one entry of the handover).
pub const MAX_FDS: usize = 64;

/// State handed from one generation to the next: the application's bytes
/// and extra fds.
///
/// The bytes are the application's own serialization: version it yourself
/// (a first byte, a serde enum), since the next generation may run another
/// build. The fds are files of any kind but sockets (regular files,
/// memfds, pipes, eventfds…): hand connections and listeners on with
/// [`Fds::add_conn`](crate::Fds::add_conn) and friends, which check them.
///
/// In the generation that receives it, [`bytes`](Self::bytes) is the
/// sealed memfd itself, mapped read-only: deserializing from it copies
/// nothing, and the memory is shared with the file (released when the
/// `State` is dropped). [`into_parts`](Self::into_parts) copies it into a
/// `Vec`.
#[derive(Debug, Default)]
pub struct State {
    bytes: Bytes,
    fds: Vec<OwnedFd>,
}

#[derive(Debug)]
enum Bytes {
    Owned(Vec<u8>),
    /// The received memfd, mapped; the bytes start after the header.
    Mapped(sys::SealedMap),
}

impl Default for Bytes {
    fn default() -> Self {
        Bytes::Owned(Vec::new())
    }
}

impl State {
    /// State made of `bytes` and no fds.
    pub fn new(bytes: impl Into<Vec<u8>>) -> State {
        State {
            bytes: Bytes::Owned(bytes.into()),
            fds: Vec::new(),
        }
    }

    /// Adds an fd, handed on after those added before (at most
    /// [`MAX_FDS`]; more fail the upgrade with [`Error::State`]).
    #[must_use]
    pub fn with_fd(mut self, fd: impl Into<OwnedFd>) -> State {
        self.fds.push(fd.into());
        self
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m.get(HEADER..).unwrap_or_default(),
        }
    }

    /// The fds, in the order they were added.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// The bytes (copied, if they were received) and the fds, by value.
    pub fn into_parts(self) -> (Vec<u8>, Vec<OwnedFd>) {
        let bytes = match self.bytes {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m.get(HEADER..).unwrap_or_default().to_vec(),
        };
        (bytes, self.fds)
    }
}

/// What [`Upgrader::hand_over_state`](crate::Upgrader::hand_over_state)
/// keeps: called once per upgrade.
#[derive(Clone)]
pub(crate) struct Source(
    pub(crate) std::sync::Arc<dyn Fn() -> std::io::Result<State> + Send + Sync>,
);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Source(…)")
    }
}

fn corrupt(reason: impl Into<String>) -> Error {
    Error::State {
        reason: format!("the state handed over is corrupt: {}", reason.into()),
    }
}

/// The memfd's header for `bytes` and `fds` extra fds.
fn header(bytes: &[u8], fds: usize) -> Result<[u8; HEADER]> {
    let fds = u32::try_from(fds).map_err(|_| Error::State {
        reason: "too many fds".to_owned(),
    })?;
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    header[12..16].copy_from_slice(&fds.to_le_bytes());
    header[16..24].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    Ok(header)
}

/// Writes `bytes` (and the header announcing `fds` extra fds) into a new
/// sealed memfd.
pub(crate) fn write(bytes: &[u8], fds: usize) -> Result<File> {
    let header = header(bytes, fds)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        sys::sealed_memfd(c"tableflip-state", &[&header, bytes])
            .map(File::from)
            .map_err(|e| Error::io("state handover: cannot write a sealed memfd", e))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = header;
        Err(Error::NotSupported)
    }
}

/// Reads what [`write`] wrote, mapped: the state (without its extra fds)
/// and how many extra fds come with it.
pub(crate) fn read(file: &File) -> Result<(State, usize)> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let map = sys::map_sealed_memfd(file.as_fd(), usize::MAX).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            corrupt(e.to_string())
        } else {
            Error::io("state handover: cannot map the memfd", e)
        }
    })?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    return {
        let _ = file;
        Err(Error::NotSupported)
    };
    let size = map.len() as u64;
    if map.len() < HEADER {
        return Err(corrupt(format!(
            "{size} bytes, shorter than its {HEADER}-byte header"
        )));
    }
    let header = &map[..HEADER];
    if header[..8] != MAGIC {
        return Err(corrupt("it does not start with the magic bytes TFSTATE"));
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let format = word(8);
    if format != FORMAT {
        return Err(Error::State {
            reason: format!(
                "the state handed over has format {format}; this build reads format {FORMAT} (an upgrade from a newer tableflip)"
            ),
        });
    }
    let fds = word(12) as usize;
    if fds > MAX_FDS {
        return Err(corrupt(format!(
            "it announces {fds} fds, more than {MAX_FDS}"
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len);
    if Some(size) != len.checked_add(HEADER as u64) {
        return Err(corrupt(format!(
            "its header announces {len} bytes, the memfd holds {}",
            size - HEADER as u64
        )));
    }
    if crc32fast::hash(&map[HEADER..]) != word(24) {
        return Err(corrupt("its checksum does not match its bytes"));
    }
    let state = State {
        bytes: Bytes::Mapped(map),
        fds: Vec::new(),
    };
    Ok((state, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_is_read_back() {
        for size in [0usize, 1, 4096, 1 << 20] {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let file = write(&bytes, 3).expect("write");
            let (back, fds) = read(&file).expect("read");
            assert_eq!(back.bytes(), bytes, "size {size}");
            assert_eq!(fds, 3);
        }
    }

    #[test]
    fn state_names_are_checked() {
        for good in ["a", "cache", "rate-limiter_2", &"x".repeat(MAX_NAME)] {
            assert!(check_name(good, false).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "1 to 64"),
            (&"x".repeat(MAX_NAME + 1) as &str, "1 to 64"),
            ("a.fd.0", "only ASCII"),
            ("caf\u{e9}", "only ASCII"),
            ("a b", "only ASCII"),
            ("tableflip-tls", "reserved"),
        ] {
            match check_name(bad, false) {
                Err(Error::State { reason }) => assert!(reason.contains(says), "{bad}: {reason}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(check_name("tableflip-tls", true).is_ok());
    }

    #[test]
    fn the_memfd_is_sealed() {
        use std::io::Write;
        let mut file = write(b"sealed", 0).expect("write");
        assert!(
            file.write_all(b"x").is_err(),
            "a sealed memfd refuses writes"
        );
        assert!(file.set_len(1).is_err(), "and a new size");
    }

    #[test]
    fn a_memfd_without_seals_is_refused() {
        let file = File::from(
            nix::sys::memfd::memfd_create(c"unsealed", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .expect("memfd"),
        );
        match read(&file) {
            Err(Error::State { reason }) => {
                assert!(reason.contains("not a sealed memory file"), "{reason}");
            }
            other => panic!("expected a state error, got {other:?}"),
        }
    }

    fn raw(bytes: &[u8]) -> File {
        File::from(sys::sealed_memfd(c"test", &[bytes]).expect("memfd"))
    }

    #[test]
    fn corruption_is_an_error_that_names_it() {
        let good = {
            let mut all = header(b"hello", 0).expect("header").to_vec();
            all.extend_from_slice(b"hello");
            all
        };
        let reason = |bytes: &[u8]| match read(&raw(bytes)) {
            Err(Error::State { reason }) => reason,
            other => panic!("expected a state error, got {other:?}"),
        };
        assert!(reason(&good[..10]).contains("shorter than its 32-byte header"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(reason(&magic).contains("magic"));
        let mut format = good.clone();
        format[8] = 9;
        assert!(reason(&format).contains("format 9"));
        let mut flipped = good.clone();
        flipped[HEADER + 1] ^= 1;
        assert!(reason(&flipped).contains("checksum"));
        assert!(reason(&good[..HEADER + 4]).contains("announces 5 bytes, the memfd holds 4"));
        let mut fds = good.clone();
        fds[12] = 200;
        assert!(reason(&fds).contains("200 fds"));
        let mut huge = good;
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(reason(&huge).contains("announces"));
    }
}
