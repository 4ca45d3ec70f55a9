//! The init function may return `()`, written or not.

use tableflip::Context;

#[tableflip::main]
async fn main(cx: Context) {
    assert!(!cx.is_draining());
    tableflip_ui_tests::stop_after_init();
}
