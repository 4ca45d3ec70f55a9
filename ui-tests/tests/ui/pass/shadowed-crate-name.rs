//! A `tableflip` name in scope that is not the crate: the generated code
//! names the crate by absolute paths (`::tableflip::…`), so it still works.

use std as tableflip;

#[::tableflip::listener("tcp", "127.0.0.1:0")]
static HTTP: tokio::net::TcpListener;

#[::tableflip::main(drain_timeout = "1s")]
async fn main(cx: ::tableflip::Context) -> tableflip::io::Result<()> {
    let http = HTTP.take()?;
    cx.spawn(async move { drop(http) });
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
