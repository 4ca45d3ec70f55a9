use tokio::net::UdpSocket;

#[tableflip::listener("tcp", "127.0.0.1:8080")]
static HTTP: UdpSocket;

fn main() {
    let _ = HTTP.take();
}
