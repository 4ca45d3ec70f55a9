//! State that survives upgrades: a per-key rate limiter and a request
//! counter, handed from each generation to the next with
//! `Context::hand_over_state` / `Context::inherited_state`, so that a
//! deploy neither resets the counter nor gives every client a fresh
//! allowance.
//!
//! ```text
//! cargo run --release -p tableflip-examples-more --example rate_limit
//! curl -H 'x-api-key: alice' http://127.0.0.1:8080/   # request 1 of alice: 9 tokens left; pid <N>
//! kill -HUP <N>                                         # the new generation has alice's bucket
//! curl -H 'x-api-key: alice' http://127.0.0.1:8080/   # request 2 of alice: 8 tokens left; pid <M>
//! ```
//!
//! - `HTTP_ADDR`: the address (default `127.0.0.1:8080`); `PID_FILE`: as
//!   in the other examples.
//! - `GET /` with an `x-api-key` header: each key has a bucket of 10
//!   tokens refilled at 1 per second; a request takes one, or gets `429`.
//!   The answer is one line: `request <n> of <key>: <t> tokens left; pid <N>`.
//!   `GET /stats`: `served <total> keys <count>; pid <N>`.
//!
//! The pattern, for any cache or counter:
//!
//! 1. During init, read what the previous generation handed over
//!    (`inherited_state`): `None` on a first start. The bytes are this
//!    application's own format, versioned (`Saved::version`): a generation
//!    that cannot read them (corrupt, or written by a newer build) logs it
//!    and starts empty — for a cache or a rate limiter that is the safe
//!    choice; state that must not be lost would fail its init instead, and
//!    the upgrade would fail with the old generation still serving.
//! 2. Register a source (`hand_over_state`) that serializes a snapshot. It
//!    runs when an upgrade starts, while this generation still serves: what
//!    changes between the snapshot and the new generation's readiness (a
//!    few milliseconds) is not handed over. Times cross processes as wall
//!    clock (`SystemTime`), never `Instant`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tableflip::{Context, Options, listener};
use tokio::net::TcpListener;

#[listener("tcp", "127.0.0.1:8080", env = "HTTP_ADDR")]
static HTTP: TcpListener;

/// Tokens per key, and how many come back per second.
const BURST: f64 = 10.0;
const REFILL_PER_SECOND: f64 = 1.0;

/// The name the state is handed over under.
const STATE: &str = "rate-limiter";

/// The format of the state handed over; bump `VERSION` when it changes.
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    version: u32,
    served: u64,
    buckets: HashMap<String, Bucket>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was computed: milliseconds since the Unix epoch.
    at_ms: u64,
    /// Requests this key made.
    requests: u64,
}

#[derive(Debug, Default)]
struct Limiter {
    served: AtomicU64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Limiter {
    /// The limiter the previous generation handed over, or an empty one.
    fn restore(cx: &Context) -> Limiter {
        let saved = match cx.inherited_state(STATE) {
            Ok(Some(state)) => match serde_json::from_slice::<Saved>(state.bytes()) {
                Ok(saved) if saved.version == VERSION => saved,
                Ok(saved) => {
                    tracing::warn!(
                        version = saved.version,
                        "state of an unknown version; starting empty"
                    );
                    Saved::default()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable state; starting empty");
                    Saved::default()
                }
            },
            Ok(None) => Saved::default(),
            Err(e) => {
                tracing::warn!(error = %e, "state handover failed; starting empty");
                Saved::default()
            }
        };
        tracing::info!(
            served = saved.served,
            keys = saved.buckets.len(),
            "rate limiter restored"
        );
        Limiter {
            served: AtomicU64::new(saved.served),
            buckets: Mutex::new(saved.buckets),
        }
    }

    /// The snapshot handed to the next generation.
    fn snapshot(&self) -> std::io::Result<tableflip::State> {
        let saved = Saved {
            version: VERSION,
            served: self.served.load(Ordering::Relaxed),
            buckets: self
                .buckets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        Ok(tableflip::State::new(bytes))
    }

    /// Takes a token for `key`: its bucket after the request, or `None`
    /// when it has none left.
    fn take(&self, key: &str) -> Option<Bucket> {
        let now = now_ms();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: BURST,
            at_ms: now,
            requests: 0,
        });
        let elapsed = Duration::from_millis(now.saturating_sub(bucket.at_ms)).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * REFILL_PER_SECOND).min(BURST);
        bucket.at_ms = now;
        if bucket.tokens < 1.0 {
            return None;
        }
        bucket.tokens -= 1.0;
        bucket.requests += 1;
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(*bucket)
    }
}

fn options() -> Options {
    match std::env::var_os("PID_FILE") {
        Some(path) => Options::new().pid_file(path),
        None => Options::new(),
    }
}

async fn limited(State(limiter): State<Arc<Limiter>>, headers: HeaderMap) -> (StatusCode, String) {
    let pid = std::process::id();
    let Some(key) = headers.get("x-api-key").and_then(|k| k.to_str().ok()) else {
        return (
            StatusCode::UNAUTHORIZED,
            format!("no x-api-key header; pid {pid}\n"),
        );
    };
    match limiter.take(key) {
        Some(b) => (
            StatusCode::OK,
            format!(
                "request {} of {key}: {} tokens left; pid {pid}\n",
                b.requests,
                b.tokens.floor()
            ),
        ),
        None => (
            StatusCode::TOO_MANY_REQUESTS,
            format!("{key}: no tokens left; pid {pid}\n"),
        ),
    }
}

async fn stats(State(limiter): State<Arc<Limiter>>) -> String {
    let keys = limiter
        .buckets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    format!(
        "served {} keys {keys}; pid {}\n",
        limiter.served.load(Ordering::Relaxed),
        std::process::id()
    )
}

#[tableflip::main(options = options, drain_timeout = "30s")]
async fn main(cx: Context) -> std::io::Result<()> {
    let limiter = Arc::new(Limiter::restore(&cx));
    let snapshot = Arc::clone(&limiter);
    cx.hand_over_state(STATE, move || snapshot.snapshot())
        .map_err(std::io::Error::other)?;

    let app = Router::new()
        .route("/", get(limited))
        .route("/stats", get(stats))
        .with_state(limiter);
    let listener = HTTP.take()?;
    tracing::info!(address = %HTTP.address(), pid = std::process::id(), "serving HTTP (rate limiter)");
    let serving = cx.clone();
    cx.spawn(async move {
        tableflip::http::Server::new()
            .serve_tower(&serving, listener, app)
            .await;
    });
    Ok(())
}
