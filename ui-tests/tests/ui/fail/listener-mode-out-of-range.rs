use tokio::net::UnixListener;

#[tableflip::listener("unix", "/run/svc/admin.sock", mode = 0o17777)]
static ADMIN: UnixListener;

fn main() {
    let _ = ADMIN.take();
}
