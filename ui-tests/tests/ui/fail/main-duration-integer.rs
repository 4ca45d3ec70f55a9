#[tableflip::main(drain_timeout = 30)]
async fn main() {}
