//! Procedural macros for [tableflip](https://docs.rs/tableflip):
//! `#[tableflip::main]` and `#[tableflip::listener]`.
//!
//! Do not depend on this crate directly: use the macros through the
//! `tableflip` facade, which re-exports them and provides the runtime the
//! generated code calls into. The documentation with examples is on the
//! re-exports, `tableflip::main` and `tableflip::listener`.
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

mod args;
mod listener;
mod main_fn;

use proc_macro::TokenStream;

/// Turns `async fn main(cx: tableflip::Context) -> Result<(), E>` into a
/// program that can upgrade itself with `kill -HUP`. See
/// `tableflip::main` for the options and the generated lifecycle.
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    main_fn::expand(attr.into(), item.into()).into()
}

/// Declares a listener on `static NAME: T;`, opened at startup (inherited
/// from the previous generation under the name `NAME`, or bound). See
/// `tableflip::listener` for the networks, options and checks.
#[proc_macro_attribute]
pub fn listener(attr: TokenStream, item: TokenStream) -> TokenStream {
    listener::expand(attr.into(), item.into()).into()
}
