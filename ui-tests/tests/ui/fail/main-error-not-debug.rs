struct Failure;

#[tableflip::main]
async fn main() -> Result<(), Failure> {
    Err(Failure)
}
