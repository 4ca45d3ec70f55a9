//! As `deny-warnings-pedantic.rs`, for the other shape of the function: no
//! parameter, returning `()`, on the current-thread runtime. Also the
//! `pedantic_unit` example of this package, for clippy.
#![deny(warnings, clippy::pedantic, unused_qualifications)]

/// Metrics over UDP.
#[tableflip::listener("udp", "127.0.0.1:0")]
static METRICS: std::net::UdpSocket;

#[tableflip::main(flavor = "current_thread")]
async fn main() {
    if let Ok(metrics) = METRICS.take() {
        drop(metrics);
    }
    tableflip_ui_tests::stop_after_init();
}
