#[tableflip::main(crate = "table flip")]
async fn main() {}
