use tokio::net::UnixDatagram;

#[tableflip::listener("unix", "/run/svc/admin.sock")]
static ADMIN: UnixDatagram;

fn main() {
    let _ = ADMIN.take();
}
