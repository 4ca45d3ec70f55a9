#[tableflip::main(drain_timout = "30s")]
async fn main() {}
