#[tableflip::listener("tcp", "127.0.0.1:8080")]
struct Http;

fn main() {}
