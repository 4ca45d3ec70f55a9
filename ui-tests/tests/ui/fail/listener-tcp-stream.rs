use tokio::net::TcpStream;

#[tableflip::listener("tcp", "127.0.0.1:8080")]
static HTTP: TcpStream;

fn main() {
    let _ = HTTP.take();
}
