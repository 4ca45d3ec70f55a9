//! The init function may take no `Context`.

#[tableflip::main]
async fn main() -> std::io::Result<()> {
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
