//! The HTTP contract shared by the benchmark's three services, so that they
//! differ only in how they start, hand over and drain.
//!
//! - `GET /` answers `200` with the body `pid <N>\n` and the header
//!   `x-pid: <N>`, `N` being the PID of the process that served it;
//! - `GET /slow?ms=N` waits `N` milliseconds (at most [`MAX_SLOW`]), then
//!   answers the same;
//! - anything else answers `404`.
//!
//! Every service reads its configuration from the environment:
//!
//! - `BENCH_ADDR`: the address of the main listener (`host:port`);
//! - `PID_FILE`: where to write the PID once ready (optional);
//! - `NOTIFY_SOCKET`: where to send systemd-style readiness notifications
//!   (optional);
//! - `BENCH_LISTENERS`: how many listeners to serve in all (default 1);
//!   the extra ones are [`extra_listeners`];
//! - `BENCH_BALLAST_MIB`: how many MiB of memory to allocate and touch
//!   before becoming ready (default 0), see [`hold_ballast`];
//! - `BENCH_ANNOUNCE_START`: when set, the service tells `NOTIFY_SOCKET`
//!   as soon as its own code runs, see [`announce_start`].

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};

/// The longest wait `GET /slow?ms=N` accepts.
pub const MAX_SLOW: Duration = Duration::from_secs(60);

/// The response header that names the serving PID.
pub const PID_HEADER: &str = "x-pid";

/// The address of the main listener used when `BENCH_ADDR` is not set.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// Answers one request of the contract.
pub async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let pid = std::process::id();
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => reply(StatusCode::OK, pid, format!("pid {pid}\n")),
        (&Method::GET, "/slow") => match slow_ms(req.uri().query()) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                reply(StatusCode::OK, pid, format!("pid {pid}\n"))
            }
            None => reply(
                StatusCode::BAD_REQUEST,
                pid,
                "expected /slow?ms=N\n".to_owned(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, pid, "not found\n".to_owned()),
    };
    Ok(response)
}

fn reply(status: StatusCode, pid: u32, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(PID_HEADER, HeaderValue::from(pid));
    response
}

/// The wait that `/slow?ms=N` asks for, if valid.
fn slow_ms(query: Option<&str>) -> Option<Duration> {
    let ms = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_millis(ms)).filter(|d| *d <= MAX_SLOW)
}

/// The tableflip services' options: the PID file comes from `PID_FILE`.
pub fn tableflip_options() -> tableflip::Options {
    match std::env::var_os("PID_FILE") {
        Some(path) => tableflip::Options::new().pid_file(path),
        None => tableflip::Options::new(),
    }
}

/// Serves the contract on `listener` with `tableflip::http::Server` until
/// the drain (the tableflip services). Idle connections are handed to the
/// next generation at the drain, unless `BENCH_HAND_OVER=off`
/// (`Server::hand_over_idle(false)`: the drain of before issue 18, for a
/// before/after in one build).
pub fn serve_tableflip<L: tableflip::http::Accept>(cx: &tableflip::Context, listener: L) {
    let hand_over = std::env::var("BENCH_HAND_OVER").as_deref() != Ok("off");
    let server = tableflip::http::Server::new().hand_over_idle(hand_over);
    let serve_cx = cx.clone();
    cx.spawn(async move {
        server
            .serve(&serve_cx, listener, hyper::service::service_fn(handle))
            .await;
    });
}

/// The main listener's address: `BENCH_ADDR`, or [`DEFAULT_ADDR`].
pub fn main_addr() -> String {
    std::env::var("BENCH_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned())
}

/// The extra listeners a service must serve besides the main one: with
/// `BENCH_LISTENERS=N`, `N - 1` of them, on `127.1.x.y` at the main
/// listener's port (distinct loopback addresses, one port: no port
/// allocation, and fixed addresses, which ecdysis needs to match inherited
/// sockets). Each comes with a name for libraries that name sockets.
///
/// # Errors
///
/// When `BENCH_LISTENERS` or the main address cannot be parsed.
pub fn extra_listeners() -> Result<Vec<(String, SocketAddr)>, String> {
    let count: usize = match std::env::var("BENCH_LISTENERS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("BENCH_LISTENERS={v:?}: expected a number"))?,
        Err(_) => 1,
    };
    let main: SocketAddr = main_addr()
        .parse()
        .map_err(|e| format!("BENCH_ADDR: {e}"))?;
    Ok((1..count)
        .map(|i| {
            let [_, _, hi, lo] = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
            let ip = Ipv4Addr::new(127, 1, hi, lo);
            (
                format!("EXTRA_{i}"),
                SocketAddr::V4(SocketAddrV4::new(ip, main.port())),
            )
        })
        .collect())
}

/// The page size the ballast is touched at: one write per 4 KiB.
const PAGE: usize = 4096;

/// The ballast, held for the life of the process.
static BALLAST: OnceLock<Vec<u8>> = OnceLock::new();

/// With `BENCH_BALLAST_MIB=N` (N > 0), allocates N MiB, writes to every
/// 4 KiB page of it, and keeps it for the life of the process: the process
/// then really has N MiB more resident (anonymous, private) memory, as a
/// service with a large heap has. Every generation allocates its own (it is
/// a new process). Returns the number of bytes held; 0 when unset or 0.
///
/// # Errors
///
/// When `BENCH_BALLAST_MIB` is not a whole number, is too large to
/// address, or cannot be allocated; or when called twice.
pub fn hold_ballast() -> Result<usize, String> {
    let bytes = ballast_bytes(std::env::var_os("BENCH_BALLAST_MIB").as_deref())?;
    if bytes == 0 {
        return Ok(0);
    }
    BALLAST
        .set(touched_memory(bytes)?)
        .map_err(|_| "hold_ballast called twice".to_owned())?;
    Ok(bytes)
}

/// The ballast's size in bytes, from the value of `BENCH_BALLAST_MIB`.
fn ballast_bytes(value: Option<&std::ffi::OsStr>) -> Result<usize, String> {
    let Some(value) = value else {
        return Ok(0);
    };
    let mib: usize = value
        .to_str()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            format!("BENCH_BALLAST_MIB={value:?}: expected a whole number of MiB (e.g. 256)")
        })?;
    mib.checked_mul(1 << 20)
        .filter(|b| isize::try_from(*b).is_ok())
        .ok_or_else(|| format!("BENCH_BALLAST_MIB={mib}: too large to address"))
}

/// `bytes` of memory, every page of it written once: resident until the
/// returned `Vec` is dropped.
///
/// The memory is the spare capacity of a `Vec` (reserved with
/// `try_reserve_exact`, so a size the system refuses is an error rather
/// than an abort), written page by page: the kernel faults in one zeroed
/// page per write, and nothing writes the rest of each page again.
///
/// # Errors
///
/// When the memory cannot be reserved.
pub fn touched_memory(bytes: usize) -> Result<Vec<u8>, String> {
    let mut ballast: Vec<u8> = Vec::new();
    ballast.try_reserve_exact(bytes).map_err(|e| {
        format!(
            "BENCH_BALLAST_MIB: cannot allocate {} MiB: {e}",
            bytes >> 20
        )
    })?;
    for page in ballast.spare_capacity_mut().chunks_mut(PAGE) {
        page[0].write(1);
    }
    // Keep the writes and the allocation observable.
    std::hint::black_box(&mut ballast);
    Ok(ballast)
}

/// With `BENCH_ANNOUNCE_START` set, sends `BENCH_STARTED=1` and
/// `MAINPID=<pid>` to `NOTIFY_SOCKET`: called first thing by each service,
/// it tells the driver when the process (a new generation, or a fresh
/// start) runs its own code, after the spawn and exec and before the
/// ballast, so that the spawn's cost can be seen apart from the
/// initialisation's. Not a systemd message; only the driver reads it.
pub fn announce_start() {
    if std::env::var_os("BENCH_ANNOUNCE_START").is_some() {
        sd_notify(&format!("BENCH_STARTED=1\nMAINPID={}", std::process::id()));
    }
}

/// Sends one systemd-style notification (`READY=1`…) to `NOTIFY_SOCKET`, if
/// set: what a plain service that speaks systemd's protocol does (the
/// `sd-notify` crate is these few lines). Errors are ignored, as systemd's
/// own `sd_notify` lets the caller do.
pub fn sd_notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = socket.send_to(message.as_bytes(), path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_parses_its_query() {
        assert_eq!(slow_ms(Some("ms=250")), Some(Duration::from_millis(250)));
        assert_eq!(slow_ms(Some("a=1&ms=0")), Some(Duration::ZERO));
        assert_eq!(slow_ms(Some("ms=x")), None);
        assert_eq!(slow_ms(Some("ms=600000")), None);
        assert_eq!(slow_ms(None), None);
    }

    #[test]
    fn ballast_size_parses() {
        let os = |v: &str| Some(std::ffi::OsString::from(v));
        assert_eq!(ballast_bytes(None), Ok(0));
        assert_eq!(ballast_bytes(os("0").as_deref()), Ok(0));
        assert_eq!(ballast_bytes(os(" 256 ").as_deref()), Ok(256 << 20));
        for bad in ["x", "-1", "1.5", "", "99999999999999999999"] {
            let e = ballast_bytes(os(bad).as_deref()).unwrap_err();
            assert!(e.starts_with("BENCH_BALLAST_MIB="), "{e}");
        }
        assert!(ballast_bytes(os("17592186044416").as_deref()).is_err());
    }

    #[test]
    fn ballast_is_resident() {
        fn rss_kib() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        }
        let before = rss_kib();
        let ballast = touched_memory(32 << 20).unwrap();
        let after = rss_kib();
        assert!(after >= before + 31 * 1024, "{before} → {after} KiB");
        drop(ballast);
    }
}
