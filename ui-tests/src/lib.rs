//! Placeholder library: the ui tests live in `tests/`.
