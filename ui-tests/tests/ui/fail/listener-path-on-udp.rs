use tokio::net::UdpSocket;

#[tableflip::listener("udp", "./metrics.sock")]
static METRICS: UdpSocket;

fn main() {
    let _ = METRICS.take();
}
