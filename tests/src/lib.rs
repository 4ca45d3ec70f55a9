//! Shared helpers for the integration tests: start the `svc` test service,
//! read the events every generation prints, send signals, wait for
//! observable states with deadlines (never fixed sleeps).
//!
//! - [`harness`]: the per-test [`Harness`] (lock, reaper, scratch
//!   directory), deadlines and waits;
//! - [`service`]: a running service, its events, logs and end;
//! - [`process`]: signals and process states;
//! - [`net`]: requests to the services;
//! - [`notify`]: a fake `NOTIFY_SOCKET` and a model of systemd's rules;
//! - [`http1`]: a minimal HTTP/1.1 client;
//! - [`ctl`]: `tableflip-ctl` and the test service with a control socket.

pub mod ctl;
pub mod harness;
pub mod http1;
pub mod net;
pub mod notify;
pub mod process;
pub mod service;

pub use ctl::*;
pub use harness::*;
pub use net::*;
pub use process::*;
pub use service::*;
