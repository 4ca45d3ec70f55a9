//! Two `#[listener]` statics with the same name (in different modules):
//! the program must fail at startup with an error naming the listener.

mod a {
    #[tableflip::listener("tcp", "127.0.0.1:0")]
    pub(crate) static HTTP: std::net::TcpListener;
}

mod b {
    #[tableflip::listener("tcp", "127.0.0.1:0")]
    pub(crate) static HTTP: std::net::TcpListener;
}

#[tableflip::main]
async fn main() -> std::io::Result<()> {
    let _ = (a::HTTP.take()?, b::HTTP.take()?);
    Ok(())
}
