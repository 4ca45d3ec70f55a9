//! Every option of `#[tableflip::main]`, with `flavor = "multi_thread"`.

use std::time::Duration;

use tableflip::Context;

mod config {
    /// The options computed at run time; the attribute's own options
    /// override its fields.
    pub fn options() -> tableflip::Options {
        tableflip::Options::new()
            .upgrade_timeout(std::time::Duration::from_secs(1))
            .backlog(64)
    }
}

#[tableflip::main(
    upgrade_timeout = "2m",
    drain_timeout = "500ms",
    stop_delay = "2s",
    probation = "90s",
    control_socket = "none",
    upgrade_signal = "SIGUSR2",
    pid_file = "/tmp/tableflip-ui-tests-main-every-option.pid",
    flavor = "multi_thread",
    mode = "replace",
    worker_threads = 2,
    options = config::options,
    crate = "::tableflip"
)]
async fn main(cx: Context) -> std::io::Result<()> {
    let opts = cx.upgrader().options();
    assert_eq!(opts.get_upgrade_timeout(), Duration::from_secs(120));
    assert_eq!(opts.get_drain_timeout(), Duration::from_millis(500));
    assert_eq!(opts.get_stop_delay(), Duration::from_secs(2));
    assert_eq!(opts.get_probation(), Duration::from_secs(90));
    assert_eq!(
        opts.get_control_socket(),
        &tableflip::ctl::ControlSocket::Off
    );
    assert_eq!(opts.get_upgrade_signal(), tableflip::UpgradeSignal::Usr2);
    assert_eq!(
        opts.get_pid_file(),
        Some("/tmp/tableflip-ui-tests-main-every-option.pid".as_ref())
    );
    assert_eq!(opts.get_backlog(), 64);
    assert_eq!(opts.get_mode(), tableflip::Mode::Replace);
    assert_eq!(cx.upgrader().supervisor_pid(), None);
    let runtime = tokio::runtime::Handle::current();
    assert_eq!(
        runtime.runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    assert_eq!(runtime.metrics().num_workers(), 2);
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
