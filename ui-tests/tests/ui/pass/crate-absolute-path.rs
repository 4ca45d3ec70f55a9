//! `crate = "::tableflip"`: an absolute path, unaffected by a local item
//! named `tableflip`.

mod tableflip {}

#[::tableflip::listener("tcp", "127.0.0.1:0", crate = "::tableflip")]
static HTTP: tokio::net::TcpListener;

#[::tableflip::main(crate = "::tableflip")]
async fn main() -> Result<(), ::tableflip::Error> {
    drop(HTTP.take()?);
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
