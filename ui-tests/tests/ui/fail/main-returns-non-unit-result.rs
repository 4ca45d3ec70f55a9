#[tableflip::main]
async fn main() -> std::io::Result<u16> {
    Ok(8080)
}
