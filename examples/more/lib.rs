//! Runnable example services for tableflip, besides the demo (which has
//! a package of its own, so that `cargo run --example http` builds only
//! what it uses); see the `[[example]]` targets.
//!
//! This library target is empty: the examples are the point of this package.
