#[tableflip::main(drain_timeout = "3d")]
async fn main() {}
