#[tableflip::main]
async fn main<E: std::fmt::Debug>(cx: tableflip::Context) -> Result<(), E> {
    drop(cx);
    Ok(())
}
