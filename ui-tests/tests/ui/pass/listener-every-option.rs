//! Every option of `#[listener]`: `env`, `backlog`, `mode` and `crate`.

use std::os::unix::fs::PermissionsExt;

use tableflip::{Context, listener};
use tokio::net::UnixListener;

#[listener(
    "unix",
    "/tmp/tableflip-ui-tests-listener-every-option.sock",
    env = "TABLEFLIP_UI_TESTS_UNSET_VARIABLE",
    backlog = 16,
    mode = 0o600,
    crate = "::tableflip"
)]
static ADMIN: UnixListener;

#[tableflip::main]
async fn main(_cx: Context) -> std::io::Result<()> {
    let admin = ADMIN.take()?;
    let path = "/tmp/tableflip-ui-tests-listener-every-option.sock";
    assert_eq!(ADMIN.name(), "ADMIN");
    assert_eq!(ADMIN.network(), "unix");
    assert_eq!(ADMIN.address(), path);
    assert_eq!(admin.local_addr()?.as_pathname(), Some(path.as_ref()));
    let mode = std::fs::metadata(path)?.permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
