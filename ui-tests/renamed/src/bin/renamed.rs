//! A service whose only name for tableflip is `tf`.

use tableflip_ui_tests_renamed::RENAMED;

/// A local listener too, with an absolute path to the renamed crate.
#[tf::listener("unix", "@tableflip-ui-tests-renamed", crate = "::tf")]
static LOCAL: std::os::unix::net::UnixListener;

fn options() -> tf::Options {
    tf::Options::default()
}

#[tf::main(crate = "tf", drain_timeout = "1s", options = options)]
async fn main(cx: tf::Context) -> Result<(), tf::Error> {
    let renamed = RENAMED.take()?;
    let local = LOCAL.take()?;
    cx.spawn(async move { drop((renamed, local)) });
    Ok(())
}
