#[tableflip::main(mode = "supervise")]
async fn main() {}
