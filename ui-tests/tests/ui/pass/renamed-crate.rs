//! The crate under another name, `crate = "tf"` on both attributes.
//! (A dependency renamed in Cargo.toml is tested by the
//! `tableflip-ui-tests-renamed` package: Cargo does not allow one package
//! under two names in one target.)

use ::tableflip as tf;

#[tf::listener("tcp", "127.0.0.1:0", crate = "tf")]
static HTTP: tokio::net::TcpListener;

#[tf::main(crate = "tf", drain_timeout = "1s")]
async fn main(cx: tf::Context) -> Result<(), tf::Error> {
    let http = HTTP.take()?;
    cx.spawn(async move { drop(http) });
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
