//! The init function may return `()`, written out.

#[tableflip::main]
async fn main() -> () {
    tableflip_ui_tests::stop_after_init();
}
