use tokio::net::TcpListener;

#[tableflip::listener("tcp", "127.0.0.1:8080", env = "HTTP_ADDR=0.0.0.0:80")]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
