#[tableflip::main]
async fn main(args: Vec<String>) -> std::io::Result<()> {
    drop(args);
    Ok(())
}
