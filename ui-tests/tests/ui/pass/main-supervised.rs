//! `mode = "supervised"`: the body runs in a generation, a child of the
//! supervisor that the program started as.

use tableflip::Context;

#[tableflip::main(mode = "supervised")]
async fn main(cx: Context) -> std::io::Result<()> {
    let opts = cx.upgrader().options();
    assert_eq!(opts.get_mode(), tableflip::Mode::Supervised);
    let supervisor = cx.upgrader().supervisor_pid();
    assert_eq!(supervisor, Some(std::os::unix::process::parent_id()));
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
