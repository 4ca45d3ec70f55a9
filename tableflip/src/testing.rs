//! A stub upgrader for unit tests of code that takes an [`Upgrader`].
//!
//! The stub binds sockets plainly, never forks and never reads a handover;
//! [`Upgrader::upgrade`] returns [`Error::NotSupported`](crate::Error::NotSupported).
//! Any number of stubs may exist in one process (unlike
//! [`Upgrader::new`]), so every test can have its own.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tableflip::Error> {
//! let upg = tableflip::testing::upgrader(tableflip::Options::default())?;
//! let listener: std::net::TcpListener = upg.listen("tcp", "127.0.0.1:0")?;
//! upg.ready()?;
//! assert!(upg.upgrade().await.is_err());
//! # drop(listener);
//! # Ok(()) }
//! ```

use crate::error::Result;
use crate::options::Options;
use crate::upgrade::Upgrader;

/// Creates a stub [`Upgrader`].
///
/// # Errors
///
/// Only if the current working directory cannot be read.
pub fn upgrader(opts: Options) -> Result<Upgrader> {
    Upgrader::stub(opts)
}
