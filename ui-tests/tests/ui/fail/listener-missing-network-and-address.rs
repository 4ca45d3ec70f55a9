use tokio::net::TcpListener;

#[tableflip::listener]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
