use tableflip::Context;

#[tableflip::main]
async fn main(cx: Context, name: &'static str) -> std::io::Result<()> {
    drop((cx, name));
    Ok(())
}
