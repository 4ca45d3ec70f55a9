#[tableflip::main]
async fn main(self) -> std::io::Result<()> {
    Ok(())
}
