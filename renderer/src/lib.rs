//! renderer: watches the registry in etcd and keeps HAProxy's config in step with it.
//!
//! Data flows one way: [`watch`] (etcd) → [`model`] (BTreeMaps) → [`render`] (Handlebars,
//! pure) → [`apply`] (files, HAProxy; [`haproxy`] speaks HAProxy's CLI and parses what it
//! prints). The [`daemon`] is the loop that owns them;
//! [`coalesce`] decides when it applies, [`guard`] keeps bad renders and records out.
//! [`start`] compiles the templates, [`once`] is `--once`/`--dry-run`, [`metrics`] holds
//! the counters, readiness and `/status`, [`status`] is `renderer status`. `main.rs` only
//! parses flags, sets up logging and signals, and maps the result to an exit code.
#![forbid(unsafe_code)]

pub mod apply;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod data;
pub mod guard;
pub mod haproxy;
pub mod metrics;
pub mod model;
pub mod once;
pub mod render;
pub mod signal;
pub mod start;
pub mod status;
pub mod watch;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use apply::Applier;
pub use config::{Args, Config, ReloadMode};
use daemon::Daemon;
use watch::Update;

/// Fatal failures of [`run`].
#[derive(Debug, Error)]
pub enum Error {
    /// A template that does not load or compile: fix it before starting.
    #[error(transparent)]
    Template(#[from] render::RenderFailure),
    /// etcd setup that retrying cannot fix (credentials, certificates, flags).
    #[error("{0}")]
    EtcdSetup(String),
    /// etcd unreachable in --once / --dry-run mode.
    #[error("{0}")]
    EtcdUnavailable(String),
    /// HAProxy could not be started (exec mode).
    #[error(transparent)]
    Haproxy(#[from] haproxy::HaproxyError),
    /// --once: something failed.
    #[error("{0} failure(s) while applying; see the log")]
    Apply(usize),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Template(_) | Error::EtcdSetup(_) => 64,
            _ => 1,
        }
    }
}

/// Runs until `shutdown` (or until HAProxy exits in exec mode). Returns the exit code.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<i32, Error> {
    run_with(config, shutdown, None).await
}

/// [`run`] under a service manager: SIGHUPs arrive on `hup` (templates read again), and
/// systemd is told READY/STATUS/WATCHDOG/RELOADING/STOPPING when `NOTIFY_SOCKET` is set.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    hup: Option<mpsc::Receiver<()>>,
) -> Result<i32, Error> {
    let (renderer, targets) = start::load_templates(&config).await?;
    if config.once {
        return once::run(&config, renderer, targets).await;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let state = metrics::State::new(config.ready_grace);
    let tasks = CancellationToken::new();
    if let Some(addr) = config.metrics_addr {
        let endpoint = state.endpoint(registry);
        if let Err(e) = observe::serve(addr, endpoint, tasks.clone()).await {
            // The load balancer matters more than its metrics: report loudly, keep going.
            error!(%addr, error = %e, "cannot serve metrics; continuing without them");
        }
    }
    let applier = Applier::from_config(&config, targets, metrics.clone(), false);
    let mut daemon = Daemon::new(
        config.clone(),
        renderer,
        applier,
        metrics.clone(),
        state.clone(),
    );
    if let Some(hup) = hup {
        daemon = daemon.with_service_manager(observe::notify::Notifier::from_env(), hup);
    }
    if daemon.start_haproxy_if_due().await? {
        info!("serving the existing config until the registry is read");
    }
    let (tx, rx) = mpsc::channel::<Update>(256);
    let (live_tx, live_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(metrics::mirror_live(
        live_rx,
        state,
        metrics.clone(),
        tasks.clone(),
    ));
    let watch = watch::follow(config, tx, live_tx, metrics, tasks.clone());
    let result = daemon.run(rx, tokio::spawn(watch), shutdown).await;
    tasks.cancel();
    result
}
