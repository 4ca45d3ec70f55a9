#[tableflip::main(options = "config::options")]
async fn main() {}
