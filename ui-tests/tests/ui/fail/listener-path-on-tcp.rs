use tokio::net::TcpListener;

#[tableflip::listener("tcp", "/run/svc/http.sock")]
static HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
