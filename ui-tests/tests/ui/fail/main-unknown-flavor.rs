#[tableflip::main(flavor = "single")]
async fn main() {}
