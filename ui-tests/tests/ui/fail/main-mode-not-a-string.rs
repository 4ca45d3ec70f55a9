#[tableflip::main(mode = supervised)]
async fn main() {}
