#[tableflip::main(upgrade_timeout = "10s", drain_timeout = "5s", upgrade_timeout = "20s")]
async fn main() {}
