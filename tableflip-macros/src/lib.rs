//! Procedural macros for [tableflip](https://docs.rs/tableflip).
//!
//! Do not depend on this crate directly: use the macros through the
//! `tableflip` facade, which re-exports them and provides the runtime that the
//! generated code calls into.
//!
//! The attribute macros (`#[tableflip::main]`, `#[tableflip::listener]`) are
//! not implemented yet; until they are, use `tableflip::Upgrader` directly.
