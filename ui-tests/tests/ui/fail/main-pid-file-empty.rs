#[tableflip::main(pid_file = "")]
async fn main() {}
