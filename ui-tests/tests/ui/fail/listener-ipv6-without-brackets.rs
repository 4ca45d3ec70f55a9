use tokio::net::TcpListener;

#[tableflip::listener("tcp", "::1:8080")]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
