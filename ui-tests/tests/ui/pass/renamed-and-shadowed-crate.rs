//! The crate under another name while its own name means something else:
//! `use std as tableflip;` and `crate = "tf"`.

use std as tableflip;

use ::tableflip as tf;

#[tf::listener("tcp", "127.0.0.1:0", crate = "tf")]
static HTTP: tokio::net::TcpListener;

#[tf::main(crate = "tf")]
async fn main(cx: tf::Context) -> tableflip::io::Result<()> {
    let http = HTTP.take()?;
    cx.spawn(async move { drop(http) });
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
