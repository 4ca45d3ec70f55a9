#[tableflip::main(flavor)]
async fn main() {}
