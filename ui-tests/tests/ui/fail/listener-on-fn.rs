#[tableflip::listener("tcp", "127.0.0.1:8080")]
fn http() -> std::net::TcpListener {
    todo!()
}

fn main() {}
