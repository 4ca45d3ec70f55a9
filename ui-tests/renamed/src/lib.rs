//! A library that depends on tableflip only under the name `tf` and
//! declares a listener with `crate = "tf"`; `src/bin/renamed.rs` is a
//! service with `#[tf::main(crate = "tf")]`. They only need to compile.

/// A listener declared in a library, with the crate renamed.
#[tf::listener("tcp", "127.0.0.1:0", env = "RENAMED_ADDR", crate = "tf")]
pub static RENAMED: std::net::TcpListener;
