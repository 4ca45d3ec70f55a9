#[tableflip::listener("udp", "127.0.0.1:5353")]
static DNS;

fn main() {
    let _ = DNS.take();
}
