#[tableflip::main(flavor = "current-thread")]
async fn main() {}
