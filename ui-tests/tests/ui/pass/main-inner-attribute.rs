//! An inner attribute as the first line of `main` applies to its body, as
//! in any function (the attribute used to be moved to the generated outer
//! function, where rustc rejects it).

#[tableflip::main]
async fn main() -> std::io::Result<()> {
    #![allow(clippy::let_unit_value, unused_variables)]
    let unused = ();
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
