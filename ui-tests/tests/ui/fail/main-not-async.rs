#[tableflip::main]
fn main(cx: tableflip::Context) -> std::io::Result<()> {
    drop(cx);
    Ok(())
}
