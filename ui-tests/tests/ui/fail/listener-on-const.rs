#[tableflip::listener("tcp", "127.0.0.1:8080")]
const HTTP: &str = "127.0.0.1:8080";

fn main() {}
