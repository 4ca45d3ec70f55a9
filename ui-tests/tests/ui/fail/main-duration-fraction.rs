#[tableflip::main(upgrade_timeout = "1.5s")]
async fn main() {}
