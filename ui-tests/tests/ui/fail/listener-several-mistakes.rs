use tokio::net::TcpListener;

#[tableflip::listener("tcp", "127.0.0.1:80800", backlog = "x", mode = 0o660, evn = "ADDR")]
static mut HTTP: TcpListener;

fn main() {
    let _ = HTTP.take();
}
