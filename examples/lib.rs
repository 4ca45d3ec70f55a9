//! Runnable example services for tableflip; see the `[[example]]` targets.
//!
//! This library target is empty: the examples are the point of this package.
