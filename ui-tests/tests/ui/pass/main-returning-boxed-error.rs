//! The init function may return `Result<(), Box<dyn Error + Send + Sync>>`,
//! and use `?` on any error.

use tableflip::Context;

#[tableflip::main]
async fn main(cx: Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let port: u16 = "8080".parse()?;
    assert_eq!(port, 8080);
    let _ = cx.upgrader().generation();
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
