fn options() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

#[tableflip::main(options = options)]
async fn main() {}
