//! The service lifecycle that `#[tableflip::main]` generates: runtime,
//! upgrader, declared listeners, signals, init, readiness, drain.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::options::Options;
use crate::report::chain;
use crate::upgrade::Upgrader;

/// What the init function of a `#[tableflip::main]` service gets: the
/// upgrader, task tracking for the drain, and the drain signal.
///
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Context {
    upgrader: Upgrader,
    tracker: TaskTracker,
    draining: CancellationToken,
}

impl Context {
    /// A context for `upgrader`, for programs that drive the lifecycle
    /// themselves (and for tests, with the [`testing`](crate::testing)
    /// stub).
    pub fn new(upgrader: Upgrader) -> Context {
        Context {
            upgrader,
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
        }
    }

    /// Spawns a task that the drain waits for (up to the drain timeout).
    /// Servers, and anything that must finish before the process exits,
    /// are spawned here.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, as [`tokio::spawn`].
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(future)
    }

    /// A future that resolves when the process starts draining: after a
    /// successful upgrade, or on `SIGTERM`/`SIGINT`. Servers then stop
    /// accepting, drop their listener (closing only this process's handle:
    /// the new generation keeps the socket), and finish in-flight work.
    /// Independent of `self`; usable in `select!`.
    ///
    /// This is the signal for custom protocols (see `examples/tcp_echo.rs`
    /// for the drain pattern), and for connections an application owns,
    /// such as WebSockets it wants to close when the drain starts (behind
    /// `tableflip::http::Server`, each request also carries it as a
    /// `tableflip::http::Drain` in its extensions, for handlers).
    ///
    /// For HTTP, `tableflip::http::Server` (feature `http`) is the lossless
    /// way: it serves hyper services and axum `Router`s (`serve_tower`),
    /// and its drain fails no
    /// request. Do not pass this future as the graceful-shutdown signal of
    /// axum (`serve(…).with_graceful_shutdown`) or of hyper-util: that
    /// shutdown closes idle keep-alive connections, racing the client's
    /// next request on them, and connections accepted just before the
    /// drain, before their first request is read. Requests fail during
    /// upgrades under load (measured with axum: 8 of about 28 000 over 4
    /// upgrades, 30 over 15).
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        self.draining.clone().cancelled_owned()
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// A token cancelled when the drain starts, for code that wants a
    /// [`CancellationToken`] rather than a future.
    pub fn draining_token(&self) -> CancellationToken {
        self.draining.child_token()
    }

    /// The upgrader: trigger an upgrade from code, hand more sockets or
    /// files to the next generation, find out whether there is a parent.
    pub fn upgrader(&self) -> &Upgrader {
        &self.upgrader
    }

    /// Registers the state `name` this generation hands the next one at
    /// each upgrade: [`Upgrader::hand_over_state`], where the details are.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// # fn init(cx: &tableflip::Context) -> tableflip::Result<()> {
    /// // A counter that survives upgrades: 8 bytes, little-endian.
    /// let start = match cx.inherited_state("served")? {
    ///     Some(state) => {
    ///         let bytes: [u8; 8] = state.bytes().try_into().unwrap_or_default();
    ///         u64::from_le_bytes(bytes)
    ///     }
    ///     None => 0,
    /// };
    /// let served = Arc::new(AtomicU64::new(start));
    /// let snapshot = Arc::clone(&served);
    /// cx.hand_over_state("served", move || {
    ///     let value = snapshot.load(Ordering::Relaxed);
    ///     Ok(tableflip::State::new(value.to_le_bytes()))
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::State`](crate::Error::State) for an invalid name.
    pub fn hand_over_state<F>(&self, name: &str, source: F) -> crate::Result<()>
    where
        F: Fn() -> std::io::Result<crate::State> + Send + Sync + 'static,
    {
        self.upgrader.hand_over_state(name, source)
    }

    /// The state `name` the previous generation handed over, taken
    /// (`None` for the first generation, or after one that handed nothing
    /// over under that name): [`Upgrader::inherited_state`], where the
    /// errors are.
    ///
    /// # Errors
    ///
    /// [`Error::State`](crate::Error::State) for an invalid name, or when
    /// what arrived is corrupt.
    pub fn inherited_state(&self, name: &str) -> crate::Result<Option<crate::State>> {
        self.upgrader.inherited_state(name)
    }

    /// How many tasks spawned with [`spawn`](Self::spawn) are still
    /// running.
    pub fn tasks(&self) -> usize {
        self.tracker.len()
    }

    /// Starts the drain (what happens after a successful upgrade or a stop)
    /// and waits up to `timeout` for the spawned tasks. Returns how many
    /// were still running when the timeout passed.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.draining.cancel();
        self.tracker.close();
        match tokio::time::timeout(timeout, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

/// The runtime flavour of a `#[tableflip::main]` service.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// tokio's multi-thread runtime.
    MultiThread,
    /// tokio's current-thread runtime.
    CurrentThread,
}

/// The mode of a `#[tableflip::main]` program that chooses none:
/// supervised where the supervisor exists (Linux), else replace.
#[cfg(any(target_os = "linux", target_os = "android"))]
const DEFAULT_MAIN_MODE: crate::Mode = crate::Mode::Supervised;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const DEFAULT_MAIN_MODE: crate::Mode = crate::Mode::Replace;

/// What `#[tableflip::main]`'s attribute says. Not public API.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct MainConfig {
    pub flavor: Flavor,
    pub worker_threads: Option<usize>,
    pub upgrade_timeout: Option<Duration>,
    pub drain_timeout: Option<Duration>,
    pub stop_delay: Option<Duration>,
    pub probation: Option<Duration>,
    pub upgrade_signal: Option<crate::UpgradeSignal>,
    pub pid_file: Option<&'static str>,
    pub options: Option<fn() -> Options>,
    pub mode: Option<crate::Mode>,
    /// `Some(None)`: `control_socket = "none"`.
    pub control_socket: Option<Option<&'static str>>,
}

impl MainConfig {
    /// The defaults: multi-thread runtime, default options.
    pub const fn new() -> Self {
        MainConfig {
            flavor: Flavor::MultiThread,
            worker_threads: None,
            upgrade_timeout: None,
            drain_timeout: None,
            stop_delay: None,
            probation: None,
            upgrade_signal: None,
            pid_file: None,
            options: None,
            mode: None,
            control_socket: None,
        }
    }

    fn build_options(&self) -> Options {
        let mut opts = self.options.map_or_else(Options::default, |f| f());
        if let Some(t) = self.upgrade_timeout {
            opts.upgrade_timeout = t;
        }
        if let Some(t) = self.drain_timeout {
            opts.drain_timeout = t;
        }
        if let Some(t) = self.stop_delay {
            opts.stop_delay = t;
        }
        if let Some(t) = self.probation {
            opts.probation = Some(t);
        }
        if let Some(s) = self.upgrade_signal {
            opts.upgrade_signal = s;
        }
        if let Some(p) = self.pid_file {
            opts.pid_file = Some(p.into());
        }
        if let Some(m) = self.mode {
            opts.mode = Some(m);
        }
        match self.control_socket {
            Some(Some(path)) => opts = opts.control_socket(path),
            Some(None) => opts = opts.no_control_socket(),
            None => {}
        }
        if opts.mode.is_none() {
            opts.mode = Some(DEFAULT_MAIN_MODE);
        }
        opts
    }
}

impl Default for MainConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs a `tracing` subscriber writing to stderr if the program has
/// none, so that a newcomer sees tableflip's log lines.
///
/// `RUST_LOG` filters with `target=level` directives (`debug`,
/// `info,tableflip=debug`…; `info` when unset). It is parsed as
/// [`tracing_subscriber::filter::Targets`] rather than `EnvFilter`: that
/// keeps the regex engine out of every service's binary (about 0.6 MiB of
/// resident code), at the price of span and field filters. A program that
/// wants those installs its own subscriber.
fn default_subscriber() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    if tracing::dispatcher::has_been_set() {
        return;
    }
    let info = || tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
    let mut bad = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse().unwrap_or_else(|e| {
            bad = Some(format!("{spec:?}: {e}"));
            info()
        }),
        _ => info(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
    if let Some(bad) = bad {
        tracing::warn!("RUST_LOG not understood ({bad}); logging at info");
    }
}

/// How long the init function may run before a warning says that the
/// service is not ready until it returns.
const SLOW_INIT_WARNING: Duration = Duration::from_secs(5);

/// Runs a service: what `#[tableflip::main]` expands to. Not public API.
///
/// Steps, in order: runtime, upgrader, declared listeners, signals, init,
/// readiness, wait for the exit, drain. `init`'s error is the text to log
/// (the generated code renders the application's error type).
#[doc(hidden)]
pub fn run<F, Fut>(config: MainConfig, init: F) -> ExitCode
where
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    default_subscriber();
    let opts = config.build_options();
    let drain_timeout = opts.drain_timeout;
    // The upgrader takes the handover and tidies the environment, which it
    // can do only before the runtime starts threads.
    let upgrader = match Upgrader::new(opts) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = match config.flavor {
        Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    };
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        pid = std::process::id(),
        generation = upgrader.generation(),
        parent_pid = upgrader.parent_pid(),
        "starting"
    );
    let cx = Context::new(upgrader.clone());
    let outcome = runtime.block_on(async {
        // Signals first: SIGHUP's default action would kill the process.
        let signals = Signals::install(upgrader.options().get_upgrade_signal())?;
        if let Err(e) = crate::declare::open_all(upgrader.fds()) {
            tracing::error!(error = %chain(&e), "cannot open the declared listeners");
            return Err(());
        }
        Ok(signals)
    });
    let Ok(mut signals) = outcome else {
        upgrader.stop();
        return ExitCode::FAILURE;
    };
    let started = Instant::now();
    let init_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(run_init(init(cx.clone()), &mut signals))
    }));
    match init_result {
        Ok(Init::Done(Ok(()))) => {}
        Ok(Init::Done(Err(e))) => {
            tracing::error!(error = %e, "initialisation failed; exiting (a parent generation keeps serving)");
            return ExitCode::FAILURE;
        }
        Ok(Init::Stopped(signal)) => {
            return runtime.block_on(stop_during_init(
                &upgrader,
                &cx,
                signals,
                signal,
                drain_timeout,
            ));
        }
        Err(_) => {
            tracing::error!("initialisation panicked; exiting (a parent generation keeps serving)");
            return ExitCode::FAILURE;
        }
    }
    // In the runtime's context: the control socket is served on it.
    let ready = {
        let _context = runtime.enter();
        upgrader.ready()
    };
    if let Err(e) = ready {
        tracing::error!(error = %chain(&e), "cannot signal readiness; exiting (a parent generation keeps serving)");
        return ExitCode::FAILURE;
    }
    tracing::debug!(
        init_ms = started.elapsed().as_millis() as u64,
        "initialised"
    );
    runtime.block_on(lifecycle(upgrader, cx, signals, drain_timeout))
}

/// How the init function ended.
enum Init {
    /// It returned.
    Done(Result<(), String>),
    /// A stop signal (named) arrived first; the function was dropped.
    Stopped(&'static str),
}

/// Runs the init function until it returns or a stop signal arrives
/// (`SIGHUP` meanwhile stays pending, for the lifecycle). Warns once if it
/// runs for [`SLOW_INIT_WARNING`]: a server awaited in `main` never lets
/// the service become ready.
async fn run_init(init: impl Future<Output = Result<(), String>>, signals: &mut Signals) -> Init {
    tokio::pin!(init);
    let slow = tokio::time::sleep(SLOW_INIT_WARNING);
    tokio::pin!(slow);
    let mut warned = false;
    loop {
        tokio::select! {
            // The init function first: one that has returned is done, even
            // if a stop signal came meanwhile (that stop then comes after
            // readiness, through the lifecycle).
            biased;
            result = &mut init => return Init::Done(result),
            _ = signals.term.recv() => return Init::Stopped("SIGTERM"),
            _ = signals.int.recv() => return Init::Stopped("SIGINT"),
            () = &mut slow, if !warned => {
                warned = true;
                tracing::warn!(
                    elapsed_s = SLOW_INIT_WARNING.as_secs(),
                    "the main function has not returned after {} s, so the service is not ready: readiness is signalled when it returns. Start servers with cx.spawn(…) and return; a server awaited in main (such as axum::serve(…).await) never returns",
                    SLOW_INIT_WARNING.as_secs()
                );
            }
        }
    }
}

/// A stop signal arrived during the initialisation: the init function has
/// been dropped; the service never becomes ready (no PID file, the parent
/// is not told). The tasks it started get the drain; a second stop signal
/// exits at once.
async fn stop_during_init(
    upgrader: &Upgrader,
    cx: &Context,
    mut signals: Signals,
    signal: &'static str,
    drain_timeout: Duration,
) -> ExitCode {
    tracing::info!(
        "{signal} during initialisation: stopping without becoming ready (a second one exits at once)"
    );
    upgrader.stop();
    let drain = cx.drain(drain_timeout);
    tokio::pin!(drain);
    tokio::select! {
        abandoned = &mut drain => {
            if abandoned > 0 {
                tracing::warn!(abandoned, "drain timeout passed; exiting with tasks still running");
            }
            ExitCode::SUCCESS
        }
        _ = signals.term.recv() => second_stop(),
        _ = signals.int.recv() => second_stop(),
    }
}

fn second_stop() -> ExitCode {
    tracing::warn!("second stop signal: exiting at once");
    ExitCode::from(130)
}

/// The next upgrade signal (its name); never, without one.
async fn upgrade_signal(
    upgrade: &mut Option<(tokio::signal::unix::Signal, &'static str)>,
) -> &'static str {
    match upgrade {
        Some((s, name)) => {
            s.recv().await;
            name
        }
        None => std::future::pending().await,
    }
}

struct Signals {
    /// The upgrade signal (`Options::upgrade_signal`), if any.
    upgrade: Option<(tokio::signal::unix::Signal, &'static str)>,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install(upgrade: crate::UpgradeSignal) -> Result<Signals, ()> {
        let make = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| tracing::error!(error = %e, "cannot handle {name}"))
        };
        let upgrade = match upgrade.number() {
            Some(n) => Some((
                make(SignalKind::from_raw(n), upgrade.as_str())?,
                upgrade.as_str(),
            )),
            None => None,
        };
        Ok(Signals {
            upgrade,
            term: make(SignalKind::terminate(), "SIGTERM")?,
            int: make(SignalKind::interrupt(), "SIGINT")?,
        })
    }
}

async fn lifecycle(
    upgrader: Upgrader,
    cx: Context,
    mut signals: Signals,
    drain_timeout: Duration,
) -> ExitCode {
    let exit = upgrader.exit();
    tokio::pin!(exit);
    // Counts the upgrade requests (SIGHUP) received so far.
    let (requests, requested) = watch::channel(0u64);
    // In supervised mode the supervisor runs the upgrades.
    let supervised = upgrader.supervisor_pid().is_some();
    let scheduler =
        (!supervised).then(|| tokio::spawn(schedule_upgrades(upgrader.clone(), requested)));
    // Whether a stop signal was received: the next one exits at once.
    let mut stopping = false;
    // A lame-duck stop under way (`Options::stop_delay`): when it ends.
    let delay = upgrader.options().get_stop_delay();
    let lame_duck = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(lame_duck);
    let mut lame = false;
    loop {
        tokio::select! {
            name = upgrade_signal(&mut signals.upgrade) => {
                if lame {
                    tracing::warn!("{name} ignored: the service is stopping (stop_delay)");
                } else if supervised {
                    ask_supervisor(&upgrader);
                } else {
                    tracing::info!("{name}: upgrade requested");
                    requests.send_modify(|n| *n += 1);
                }
            }
            signal = async {
                tokio::select! {
                    _ = signals.term.recv() => "SIGTERM",
                    _ = signals.int.recv() => "SIGINT",
                }
            } => {
                // An upgrade in flight is cancelled by the stop, at once,
                // as without a delay: the lame duck is for a service that
                // only serves.
                if !lame && !delay.is_zero() && !upgrader.upgrading() {
                    tracing::info!(delay_ms = delay.as_millis() as u64, "{signal}: stopping after stop_delay; still accepting meanwhile (another {signal} stops at once)");
                    lame = true;
                    lame_duck.as_mut().reset(tokio::time::Instant::now() + delay);
                    upgrader.announce_lame_duck(delay);
                } else {
                    if lame {
                        tracing::info!("{signal}: ending stop_delay early: stopping");
                        lame = false;
                    } else {
                        tracing::info!("{signal}: stopping");
                    }
                    stopping = true;
                    upgrader.stop();
                }
            }
            () = &mut lame_duck, if lame => {
                tracing::info!("stop_delay over: stopping");
                lame = false;
                stopping = true;
                upgrader.stop();
            }
            () = &mut exit => break,
        }
    }
    if let Some(scheduler) = scheduler {
        scheduler.abort();
    }
    tracing::info!(tasks = cx.tasks(), timeout = ?drain_timeout, "draining");
    let started = Instant::now();
    let drain = cx.drain(drain_timeout);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            abandoned = &mut drain => {
                #[cfg(feature = "http")]
                let handed_over = upgrader.http_conns_handed_over();
                #[cfg(not(feature = "http"))]
                let handed_over = 0_u64;
                crate::metrics::emit(&crate::metrics::Metric::Drained {
                    seconds: crate::metrics::seconds(started.elapsed()),
                    abandoned: abandoned as u64,
                    handed_over,
                });
                if abandoned == 0 {
                    tracing::info!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        idle_connections_handed_over = handed_over,
                        "drained; exiting"
                    );
                } else {
                    tracing::warn!(abandoned, "drain timeout passed; exiting with tasks still running");
                }
                // A successor that died after taking over is being
                // replaced: exiting now would kill the replacement.
                upgrader.settled().await;
                // Answers to the control socket are written before the
                // exit (a joined upgrade's outcome, a `retry`); a request
                // that waits for the new generation's probation keeps this
                // process (which can roll back) until it is over. A stop
                // signal cuts it short.
                let window = upgrader.options().get_probation().max(Duration::from_secs(1));
                tokio::select! {
                    () = upgrader.ctl_settled(window) => {}
                    _ = signals.term.recv() => {
                        upgrader.stop();
                        upgrader.ctl_settled(Duration::from_secs(1)).await;
                    }
                    _ = signals.int.recv() => {
                        upgrader.stop();
                        upgrader.ctl_settled(Duration::from_secs(1)).await;
                    }
                }
                upgrader.settled().await;
                upgrader.release_pid_file();
                return ExitCode::SUCCESS;
            }
            // A generation draining after an upgrade receives its first stop
            // signal here (`systemctl stop` signals every process of the
            // unit): it is stopping already, so it keeps draining.
            _ = signals.term.recv() => {
                if stopping {
                    break;
                }
                tracing::info!("SIGTERM: already draining; a second one exits at once");
                stopping = true;
                // After an upgrade: marks the service as stopping, so a
                // successor ending now is not replaced.
                upgrader.stop();
            }
            _ = signals.int.recv() => {
                if stopping {
                    break;
                }
                tracing::info!("SIGINT: already draining; a second one exits at once");
                stopping = true;
                // After an upgrade: marks the service as stopping, so a
                // successor ending now is not replaced.
                upgrader.stop();
            }
            _ = upgrade_signal(&mut signals.upgrade) => {
                if supervised {
                    ask_supervisor(&upgrader);
                } else {
                    forward_upgrade_request(&upgrader);
                }
            }
        }
    }
    upgrader.release_pid_file();
    second_stop()
}

/// Supervised mode: a `SIGHUP` that reaches a generation is the
/// supervisor's to act on.
fn ask_supervisor(upgrader: &Upgrader) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    match upgrader.ask_supervisor_to_upgrade() {
        Ok(()) => tracing::info!(
            supervisor_pid = upgrader.supervisor_pid(),
            "SIGHUP: upgrade requested; forwarded to the supervisor"
        ),
        Err(e) => {
            tracing::warn!(error = %chain(&e), "SIGHUP: cannot forward the upgrade request to the supervisor")
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = upgrader;
}

/// A `SIGHUP` that reaches a generation draining after an upgrade (a
/// `kill -HUP $MAINPID` sent before the service manager learnt the new
/// PID) is meant for the service: it goes to the new generation, which
/// runs it once this one has exited.
fn forward_upgrade_request(upgrader: &Upgrader) {
    if upgrader.successor_pid().is_none() {
        tracing::info!("SIGHUP ignored: there is no new generation to forward it to");
        return;
    }
    forward_sighup(
        upgrader,
        "SIGHUP while draining: forwarded to the new generation",
    );
}

/// Sends `SIGHUP` to the new generation (by pidfd: never to a process that
/// reused its PID), logging the outcome.
fn forward_sighup(upgrader: &Upgrader, what: &str) {
    match upgrader.signal_successor(nix::sys::signal::Signal::SIGHUP) {
        Ok(pid) => tracing::info!(child_pid = pid, "{what}"),
        Err(e) => tracing::warn!(
            child_pid = upgrader.successor_pid(),
            error = %e,
            "cannot forward SIGHUP to the new generation (it has exited?)"
        ),
    }
}

/// Runs the upgrades that `SIGHUP` requests, one at a time, never losing
/// one:
///
/// - a request that arrives while this process's parent is still draining
///   waits until the parent has exited (which its drain timeout bounds);
/// - requests that arrive while an upgrade runs are remembered: if the
///   upgrade fails, one more is run; if it succeeds, `SIGHUP` is forwarded
///   to the new generation, so that two deploys in a row end on the newest
///   binary;
/// - several requests made while waiting collapse into one upgrade (the
///   executable is resolved when the upgrade starts).
async fn schedule_upgrades(upgrader: Upgrader, mut requested: watch::Receiver<u64>) {
    let mut handled = 0u64;
    loop {
        if requested.wait_for(|n| *n > handled).await.is_err() {
            return;
        }
        if upgrader.has_parent() && !upgrader.parent_exited() {
            tracing::info!(
                parent_pid = upgrader.parent_pid(),
                "upgrade waits until the previous generation has finished draining"
            );
            upgrader.wait_for_parent().await;
        }
        // Everything requested until now is served by this upgrade.
        handled = *requested.borrow_and_update();
        let result = upgrader.upgrade().await;
        // The upgrader logged the outcome (child PID and duration, or error).
        let again = *requested.borrow() > handled;
        match result {
            Ok(_) if again => {
                forward_sighup(
                    &upgrader,
                    "SIGHUP arrived during the upgrade: forwarded to the new generation",
                );
                return;
            }
            Ok(_) => return,
            Err(_) if again => {
                tracing::info!("SIGHUP arrived during the failed upgrade: trying again");
            }
            Err(_) => {}
        }
    }
}
