//! The init function may return `anyhow::Result<()>`.

use anyhow::Context as _;
use tableflip::{Context, listener};
use tokio::net::TcpListener;

#[listener("tcp", "127.0.0.1:0")]
static HTTP: TcpListener;

#[tableflip::main]
async fn main(cx: Context) -> anyhow::Result<()> {
    let http = HTTP.take().context("taking the HTTP listener")?;
    let draining = cx.draining();
    cx.spawn(async move {
        draining.await;
        drop(http);
    });
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
