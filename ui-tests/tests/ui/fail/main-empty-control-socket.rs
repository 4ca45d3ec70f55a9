#[tableflip::main(control_socket = "")]
async fn main() {}
