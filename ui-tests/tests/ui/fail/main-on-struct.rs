#[tableflip::main]
struct Main;
