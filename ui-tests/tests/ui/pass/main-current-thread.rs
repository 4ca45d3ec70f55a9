//! `flavor = "current_thread"`, with a task spawned on it.

use tableflip::Context;

#[tableflip::main(flavor = "current_thread", drain_timeout = "1s")]
async fn main(cx: Context) -> std::io::Result<()> {
    assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread
    );
    let draining = cx.draining();
    cx.spawn(draining);
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
