#[tableflip::main(upgrade_signal = "SIGUSR3")]
async fn main() {}
