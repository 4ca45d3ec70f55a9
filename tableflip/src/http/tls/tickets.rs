//! Session-ticket keys that survive upgrades: [`TicketKeys`].

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};
use crate::state::{self, State};
use crate::upgrade::Upgrader;
use tokio_rustls::rustls;

/// The name the keys are handed over under (see [`crate::state`]).
pub(crate) const STATE_NAME: &str = "tableflip-tls-ticket-keys";

/// The default rotation period: a new key every 6 hours.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(6 * 60 * 60);

const ID_LEN: usize = 4;
const SECRET_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// The format of the keys handed over.
const FORMAT: u8 = 1;

/// TLS session-ticket keys for rustls ([`ProducesTickets`]) that the next
/// generation inherits, so that a client that resumed its TLS session
/// before an upgrade resumes it after (a short handshake, no certificate
/// signature) instead of doing a full handshake with the new process.
///
/// rustls' own ticketer (`rustls::crypto::ring::Ticketer`) makes keys that
/// cannot leave the process: every upgrade would invalidate every ticket,
/// and each client reconnecting after a deploy would pay a full handshake
/// (the server, a signature each).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use tableflip::http::tls::{TicketKeys, rustls};
/// # fn f(cx: &tableflip::Context, mut config: rustls::ServerConfig) -> tableflip::Result<()> {
/// // During init: the keys the previous generation used, or new ones;
/// // handed to the next generation at its upgrade.
/// config.ticketer = TicketKeys::handed_over(cx.upgrader())?;
/// # Ok(())
/// # }
/// ```
///
/// Tickets are encrypted with AES-256-GCM (ring) under the current key,
/// with a random nonce, and name their key by a random 4-byte id. Every
/// rotation period (default [`DEFAULT_ROTATION`], 6 h: the lifetime told
/// to clients) a new key replaces the current one, which is kept one more
/// period to decrypt the tickets it made: a ticket is accepted for one to
/// two periods. The rotation time is wall-clock time, handed over with the
/// keys, so upgrades neither shorten nor extend it.
///
/// The keys are secrets: they are handed over in a sealed memfd inherited
/// by the next generation only (never written to disk, never in the
/// environment), and live in the memory of the process. Anyone who can
/// read them can decrypt the tickets, and so resume sessions made with
/// them; forward secrecy of resumed sessions is bounded by the rotation
/// period, as with any ticket key.
///
/// [`ProducesTickets`]: rustls::server::ProducesTickets
pub struct TicketKeys {
    rotation: Duration,
    keys: RwLock<KeySet>,
    rng: SystemRandom,
}

struct Key {
    id: [u8; ID_LEN],
    secret: [u8; SECRET_LEN],
    aead: LessSafeKey,
}

struct KeySet {
    current: Key,
    previous: Option<Key>,
    /// When `current` was made (wall clock).
    made_at: SystemTime,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("TicketKeys")
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

fn failed(what: &str) -> Error {
    Error::State {
        reason: format!("TLS ticket keys: {what}"),
    }
}

impl Key {
    fn new(rng: &SystemRandom) -> Result<Key> {
        let mut id = [0u8; ID_LEN];
        let mut secret = [0u8; SECRET_LEN];
        rng.fill(&mut id)
            .and_then(|()| rng.fill(&mut secret))
            .map_err(|_| failed("the system's random number generator failed"))?;
        Key::from_parts(id, secret)
    }

    fn from_parts(id: [u8; ID_LEN], secret: [u8; SECRET_LEN]) -> Result<Key> {
        let unbound = UnboundKey::new(&AES_256_GCM, &secret)
            .map_err(|_| failed("the AES-256-GCM key cannot be made"))?;
        Ok(Key {
            id,
            secret,
            aead: LessSafeKey::new(unbound),
        })
    }
}

impl TicketKeys {
    /// New keys, rotated every `rotation` (at least 1 s), not handed over:
    /// [`handed_over`](Self::handed_over) is what a service wants.
    ///
    /// # Errors
    ///
    /// [`Error::State`] if the system's random number generator fails.
    pub fn new(rotation: Duration) -> Result<TicketKeys> {
        let rng = SystemRandom::new();
        let current = Key::new(&rng)?;
        Ok(TicketKeys {
            rotation: rotation.max(Duration::from_secs(1)),
            keys: RwLock::new(KeySet {
                current,
                previous: None,
                made_at: SystemTime::now(),
            }),
            rng,
        })
    }

    /// The keys the previous generation handed over, or new ones (first
    /// start, or a previous generation without them), registered to be
    /// handed to the next generation at each upgrade; rotated every
    /// [`DEFAULT_ROTATION`]. Call it during init, once per process, and
    /// give the result to every `ServerConfig` (its `ticketer`).
    ///
    /// # Errors
    ///
    /// [`Error::State`] if the random number generator fails. Keys handed
    /// over that cannot be read (corrupt, or from a newer format) are not
    /// an error: they are logged and replaced by new ones (clients then do
    /// a full handshake once, as without handover).
    pub fn handed_over(upgrader: &Upgrader) -> Result<Arc<TicketKeys>> {
        Self::handed_over_with(upgrader, DEFAULT_ROTATION)
    }

    /// As [`handed_over`](Self::handed_over), with new keys (if any) rotated
    /// every `rotation`; keys handed over keep their own period.
    ///
    /// # Errors
    ///
    /// As [`handed_over`](Self::handed_over).
    pub fn handed_over_with(upgrader: &Upgrader, rotation: Duration) -> Result<Arc<TicketKeys>> {
        let inherited = upgrader
            .take_state(STATE_NAME)
            .and_then(|state| state.map(|s| TicketKeys::decode(s.bytes())).transpose())
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the TLS ticket keys handed over cannot be read; new keys (clients do a full handshake once)");
                None
            });
        let keys = match inherited {
            Some(keys) => {
                tracing::info!(
                    "TLS ticket keys taken over from the previous generation: tickets it issued stay valid"
                );
                keys
            }
            None => TicketKeys::new(rotation)?,
        };
        let keys = Arc::new(keys);
        let source = Arc::clone(&keys);
        upgrader.register_state(
            STATE_NAME,
            state::Source(Arc::new(move || Ok(State::new(source.encode())))),
        );
        Ok(keys)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a new current key if the current one is older than the
    /// rotation period (or from the future: the clock went back).
    fn rotate_if_due(&self) {
        let due = |set: &KeySet| match SystemTime::now().duration_since(set.made_at) {
            Ok(age) => age >= self.rotation,
            Err(_) => true,
        };
        if !due(&self.read()) {
            return;
        }
        let mut set = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if !due(&set) {
            return;
        }
        // The current key issued tickets for one period after it was
        // made (the first ticket after that rotates it): two periods on,
        // they have all outlived their lifetime, and it is not kept.
        let stale = match SystemTime::now().duration_since(set.made_at) {
            Ok(age) => age >= self.rotation.saturating_mul(2),
            Err(_) => false,
        };
        match Key::new(&self.rng) {
            Ok(key) => {
                let old = std::mem::replace(&mut set.current, key);
                set.previous = (!stale).then_some(old);
                set.made_at = SystemTime::now();
                tracing::info!("TLS ticket key rotated");
            }
            // Keep the current key one more time rather than stop issuing
            // tickets.
            Err(e) => tracing::warn!(error = %e, "cannot rotate the TLS ticket key"),
        }
    }

    /// The keys, as handed over: format, rotation (s), made at (s since
    /// the epoch), current id and secret, then 0 or 1 and the previous id
    /// and secret.
    fn encode(&self) -> Vec<u8> {
        let set = self.read();
        let mut out = Vec::with_capacity(1 + 8 + 8 + 2 * (1 + ID_LEN + SECRET_LEN));
        out.push(FORMAT);
        out.extend_from_slice(&self.rotation.as_secs().to_le_bytes());
        let made = set
            .made_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        out.extend_from_slice(&made.to_le_bytes());
        out.extend_from_slice(&set.current.id);
        out.extend_from_slice(&set.current.secret);
        match &set.previous {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.id);
                out.extend_from_slice(&p.secret);
            }
            None => out.push(0),
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<TicketKeys> {
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            if rest.len() < n {
                return Err(failed("the keys handed over are truncated"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let format = take(1)?[0];
        if format != FORMAT {
            return Err(failed(&format!(
                "the keys handed over have format {format}; this build reads {FORMAT}"
            )));
        }
        let u64_at = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        };
        let rotation = Duration::from_secs(u64_at(take(8)?).max(1));
        let made_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(u64_at(take(8)?)))
            .ok_or_else(|| failed("the keys handed over were made at an impossible time"))?;
        let read_key = |id: &[u8], secret: &[u8]| -> Result<Key> {
            let mut i = [0u8; ID_LEN];
            let mut s = [0u8; SECRET_LEN];
            i.copy_from_slice(id);
            s.copy_from_slice(secret);
            Key::from_parts(i, s)
        };
        let current = {
            let id = take(ID_LEN)?.to_vec();
            let secret = take(SECRET_LEN)?.to_vec();
            read_key(&id, &secret)?
        };
        let previous = match take(1)?[0] {
            0 => None,
            1 => {
                let id = take(ID_LEN)?.to_vec();
                let secret = take(SECRET_LEN)?.to_vec();
                Some(read_key(&id, &secret)?)
            }
            other => return Err(failed(&format!("bad previous-key flag {other}"))),
        };
        if !rest.is_empty() {
            return Err(failed("the keys handed over have trailing bytes"));
        }
        Ok(TicketKeys {
            rotation,
            keys: RwLock::new(KeySet {
                current,
                previous,
                made_at,
            }),
            rng: SystemRandom::new(),
        })
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotation.as_secs()).unwrap_or(u32::MAX)
    }

    /// `id || nonce || AES-256-GCM(plain, aad = id)`.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let set = self.read();
        let key = &set.current;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < ID_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (id, rest) = cipher.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        // Keys are erased on time even when no ticket is issued (the
        // lifetime is enforced by key rotation only: rustls does not
        // check it for TLS 1.2).
        self.rotate_if_due();
        let set = self.read();
        let key = std::iter::once(&set.current)
            .chain(set.previous.as_ref())
            .find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(key.id), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn a_ticket_is_read_back_by_the_keys_handed_over_and_by_no_others() {
        let keys = TicketKeys::new(DEFAULT_ROTATION).expect("keys");
        let ticket = keys.encrypt(b"session state").expect("encrypt");
        assert_eq!(
            keys.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        let next = TicketKeys::decode(&keys.encode()).expect("decode");
        assert_eq!(
            next.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(next.lifetime(), 6 * 60 * 60);
        let stranger = TicketKeys::new(DEFAULT_ROTATION).expect("keys");
        assert_eq!(stranger.decrypt(&ticket), None);
        // Tampered: any byte flipped.
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x40;
            assert_eq!(keys.decrypt(&bad), None, "byte {i}");
        }
        assert_eq!(keys.decrypt(&ticket[..10]), None);
        assert!(!format!("{keys:?}").contains("secret"));
    }

    #[test]
    fn rotation_keeps_the_previous_key_one_period() {
        let keys = TicketKeys::new(Duration::from_secs(10)).expect("keys");
        let old = keys.encrypt(b"a").expect("encrypt");
        // As if the current key were a period old.
        keys.keys.write().expect("lock").made_at = SystemTime::now() - Duration::from_secs(15);
        let new = keys.encrypt(b"b").expect("encrypt");
        assert_ne!(old[..ID_LEN], new[..ID_LEN], "a new key");
        assert_eq!(
            keys.decrypt(&old).as_deref(),
            Some(&b"a"[..]),
            "the previous key still reads"
        );
        // Handed over with both keys.
        let next = TicketKeys::decode(&keys.encode()).expect("decode");
        assert_eq!(next.decrypt(&old).as_deref(), Some(&b"a"[..]));
        assert_eq!(next.decrypt(&new).as_deref(), Some(&b"b"[..]));
        // Another period: the oldest key is gone.
        keys.keys.write().expect("lock").made_at = SystemTime::now() - Duration::from_secs(15);
        let _ = keys.encrypt(b"c");
        assert_eq!(keys.decrypt(&old), None);
        assert_eq!(keys.decrypt(&new).as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn keys_expire_without_new_tickets() {
        let keys = TicketKeys::new(Duration::from_secs(10)).expect("keys");
        let ticket = keys.encrypt(b"a").expect("encrypt");
        // One to two periods on, with no ticket issued since: still read.
        keys.keys.write().expect("lock").made_at = SystemTime::now() - Duration::from_secs(15);
        assert_eq!(keys.decrypt(&ticket).as_deref(), Some(&b"a"[..]));
        // Two periods after its key was made (it was made before), a
        // ticket is refused, whether a ticket is asked for first or not.
        let idle = TicketKeys::new(Duration::from_secs(10)).expect("keys");
        let old = idle.encrypt(b"b").expect("encrypt");
        idle.keys.write().expect("lock").made_at = SystemTime::now() - Duration::from_secs(25);
        assert_eq!(idle.decrypt(&old), None, "decrypt alone");
        let busy = TicketKeys::new(Duration::from_secs(10)).expect("keys");
        let old = busy.encrypt(b"c").expect("encrypt");
        busy.keys.write().expect("lock").made_at = SystemTime::now() - Duration::from_secs(25);
        let _ = busy.encrypt(b"d");
        assert_eq!(busy.decrypt(&old), None, "after a new ticket");
    }

    #[test]
    fn an_impossible_time_is_refused_not_a_panic() {
        let keys = TicketKeys::new(DEFAULT_ROTATION).expect("keys");
        let mut bad = keys.encode();
        bad[9..17].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(TicketKeys::decode(&bad).is_err());
    }

    #[test]
    fn damaged_keys_are_refused() {
        let keys = TicketKeys::new(DEFAULT_ROTATION).expect("keys");
        let good = keys.encode();
        assert!(TicketKeys::decode(&good[..good.len() - 1]).is_err());
        let mut format = good.clone();
        format[0] = 9;
        assert!(TicketKeys::decode(&format).is_err());
        let mut trailing = good;
        trailing.push(0);
        assert!(TicketKeys::decode(&trailing).is_err());
    }
}
