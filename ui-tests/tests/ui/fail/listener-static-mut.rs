use tokio::net::TcpListener;

#[tableflip::listener("tcp", "127.0.0.1:8080")]
static mut HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
