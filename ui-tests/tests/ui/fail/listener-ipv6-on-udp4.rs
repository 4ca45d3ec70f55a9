use tokio::net::UdpSocket;

#[tableflip::listener("udp4", "[::1]:5353")]
static DNS: UdpSocket;

fn main() {
    let _ = DNS.take();
}
