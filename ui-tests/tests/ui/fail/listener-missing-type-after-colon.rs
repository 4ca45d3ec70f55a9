#[tableflip::listener("unix", "/run/svc/admin.sock")]
static ADMIN: ;

fn main() {
    let _ = ADMIN.take();
}
