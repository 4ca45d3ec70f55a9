use tokio::net::TcpListener;

#[tableflip::listener("tcp", "127.0.0.1:8080", backlog = "x")]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
