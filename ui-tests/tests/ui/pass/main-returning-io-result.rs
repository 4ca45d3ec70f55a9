//! The init function may return `Result<(), std::io::Error>`.

use tableflip::Context;

#[tableflip::main]
async fn main(cx: Context) -> Result<(), std::io::Error> {
    let _ = cx.upgrader().has_parent();
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
