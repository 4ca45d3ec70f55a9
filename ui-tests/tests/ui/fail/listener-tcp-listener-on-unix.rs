#[tableflip::listener("unix", "/run/svc/admin.sock")]
static ADMIN: std::net::TcpListener;

fn main() {
    let _ = ADMIN.take();
}
