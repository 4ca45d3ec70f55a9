//! Compile-pass and compile-fail tests of the tableflip macros, run with
//! trybuild from `tests/compiletest.rs`; the cases are in `tests/ui/`.
//!
//! trybuild also *runs* each compile-pass case, and a `#[tableflip::main]`
//! program serves until it is told to stop. So every pass case calls
//! [`stop_after_init`] in its init function: the program then goes through
//! its whole lifecycle (listeners opened and taken, readiness, drain) and
//! exits 0 at once, as a service does on `SIGTERM`.

/// Asks the running `#[tableflip::main]` program to stop, as `kill -TERM`
/// would: once the init function returns, the program becomes ready,
/// drains and exits with status 0.
///
/// Call it only from the init function of a `#[tableflip::main]` program,
/// whose signal handling is installed before init runs; anywhere else,
/// `SIGTERM`'s default action ends the process.
///
/// # Panics
///
/// If the signal cannot be raised, which does not happen on Unix.
pub fn stop_after_init() {
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM)
        .unwrap_or_else(|e| panic!("cannot raise SIGTERM: {e}"));
}
