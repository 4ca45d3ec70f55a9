use tokio::net::TcpListener;

#[tableflip::listener("tcp", "")]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
