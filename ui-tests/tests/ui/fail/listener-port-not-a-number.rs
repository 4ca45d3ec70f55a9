use tokio::net::TcpListener;

#[tableflip::listener("tcp", "localhost:http")]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
