//! The ui tests of the tableflip macros: cases in `tests/ui/{pass,fail}`.
//! Refresh the expected `.stderr` files with `TRYBUILD=overwrite`.

#[test]
fn ui() {
    // trybuild runs each pass case, and shows what it printed on stderr
    // even when it passes: the programs' logs are not wanted there. The
    // cases choose their mode themselves, whatever the caller's
    // environment says.
    // SAFETY: no other thread of this test binary reads or writes the
    // environment: `ui` is its only test, and it starts no thread before
    // this line.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RUST_LOG", "error");
        std::env::remove_var(tableflip::ENV_MODE);
    }
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
