use tokio::net::UnixListener;

#[tableflip::listener("unix", "/run/svc/admin.sock", mode = "660")]
static ADMIN: UnixListener;

fn main() {
    let _ = ADMIN.take();
}
