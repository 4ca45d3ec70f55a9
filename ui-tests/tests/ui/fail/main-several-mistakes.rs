#[tableflip::main(
    drain_timeout = "30",
    flavor = "single",
    worker_threads = 0,
    crate = 1,
    pidfile = "svc.pid"
)]
fn main(args: Vec<String>) {
    drop(args);
}
