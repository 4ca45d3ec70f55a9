#[tableflip::main]
async fn main() -> u32 {
    0
}
