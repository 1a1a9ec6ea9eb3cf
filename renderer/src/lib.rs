//! renderer: watches the registry in etcd and keeps HAProxy's config in step with it.
//!
//! Data flows one way: [`watch`] (etcd) → [`model`] (BTreeMaps) → [`render`] (Handlebars,
//! pure) → [`apply`] (files, HAProxy). [`coalesce`] decides when to apply. `main.rs` only
//! parses flags, sets up logging and signals, and maps the result to an exit code.
#![forbid(unsafe_code)]

pub mod apply;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod data;
pub mod guard;
pub mod metrics;
pub mod model;
pub mod render;
pub mod signal;
pub mod status;
pub mod watch;

use std::io::Write;

use registry::etcd::ConnectError;
use registry::etcd::Member;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use apply::file::FileTarget;
use apply::haproxy::MasterCli;
use apply::{Applier, Reloader, Target};
pub use config::{Args, Config, ReloadMode};
use daemon::Daemon;
use model::Model;
use render::Renderer;
use watch::{Update, Watcher};

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
    Haproxy(#[from] apply::haproxy::HaproxyError),
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

/// Compiles every template; a broken one stops the start. Templates see the HAProxy
/// version of `--haproxy-version`, or the one the HAProxy we run (or find) says it is.
async fn load_templates(config: &Config) -> Result<(Renderer, Vec<Target>), Error> {
    let mut renderer = Renderer::new();
    renderer.set_haproxy_version(&haproxy_version(config).await);
    let mut targets = Vec::new();
    for spec in &config.templates {
        let name = renderer.add_file(&spec.source)?;
        let file = FileTarget::new(spec.dest.clone(), spec.check.clone());
        let stale = file.remove_stale_staged();
        if stale > 0 {
            info!(dest = %spec.dest.display(), stale, "removed staged files left by a renderer that stopped mid-check");
        }
        targets.push(Target::new(name, file));
    }
    Ok((renderer, targets))
}

/// The version of the HAProxy the config is for ("" when it cannot be told).
async fn haproxy_version(config: &Config) -> String {
    if let Some(v) = &config.haproxy_version {
        return v.clone();
    }
    let program = match &config.reload {
        ReloadMode::Exec { command, .. } => command[0].as_str(),
        _ => "haproxy",
    };
    match apply::haproxy::detect_version(program).await {
        Some(v) => {
            info!(version = %v, %program, "HAProxy version");
            v
        }
        None if matches!(
            config.reload,
            ReloadMode::Exec { .. } | ReloadMode::Master(_)
        ) =>
        {
            warn!(%program, "cannot tell HAProxy's version (`{program} -v`); templates see haproxy.version = \"\" and take the oldest supported path; set --haproxy-version");
            String::new()
        }
        None => String::new(),
    }
}

/// Runs until `shutdown` (or until HAProxy exits in exec mode). Returns the exit code.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<i32, Error> {
    let (renderer, targets) = load_templates(&config).await?;
    if config.once {
        return run_once(&config, renderer, targets).await;
    }
    let reloader = match &config.reload {
        ReloadMode::None => Reloader::None,
        ReloadMode::Exec { .. } => Reloader::Exec(None),
        ReloadMode::Master(path) => Reloader::Master(MasterCli::new(path)),
        ReloadMode::Command { command, timeout } => Reloader::Command {
            command: command.clone(),
            timeout: *timeout,
        },
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let state = metrics::State::new(config.ready_grace);
    let tasks = CancellationToken::new();
    if let Some(addr) = config.metrics_addr {
        let ready_state = state.clone();
        let status_state = state.clone();
        let endpoint = observe::Endpoint {
            registry: std::sync::Arc::new(registry),
            ready: std::sync::Arc::new(move || ready_state.ready()),
            status: Some(std::sync::Arc::new(move || {
                status_state
                    .status
                    .lock()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            })),
        };
        if let Err(e) = observe::serve(addr, endpoint, tasks.clone()).await {
            // The load balancer matters more than its metrics: report loudly, keep going.
            error!(%addr, error = %e, "cannot serve metrics; continuing without them");
        }
    }
    let applier = Applier {
        targets,
        reloader,
        runtime_api: config.runtime_api,
        runtime_limits: config.runtime_limits,
        drain_timeout: config.drain_timeout,
        metrics: metrics.clone(),
    };
    let mut daemon = Daemon::new(
        config.clone(),
        renderer,
        applier,
        metrics.clone(),
        state.clone(),
    );
    if daemon.start_haproxy_if_due().await? {
        info!("serving the existing config until the registry is read");
    }

    let (tx, rx) = mpsc::channel::<Update>(256);
    let (live_tx, mut live_rx) = tokio::sync::watch::channel(false);
    {
        // Mirror the watch's liveness into readiness and the gauge.
        let (state, metrics, stop) = (state.clone(), metrics.clone(), tasks.clone());
        tokio::spawn(async move {
            loop {
                let live = *live_rx.borrow_and_update();
                state.set_live(live);
                metrics.watch_live.set(i64::from(live));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = live_rx.changed() => if r.is_err() { return },
                }
            }
        });
    }
    let source = tokio::spawn(follow_registry(
        config.clone(),
        tx,
        live_tx,
        metrics.clone(),
        tasks.clone(),
    ));
    let result = daemon.run(rx, source, shutdown).await;
    tasks.cancel();
    result
}

/// Connects (retrying while etcd is unreachable; fatal on bad credentials/certificates)
/// and follows the registry until `stop`.
async fn follow_registry(
    config: Config,
    tx: mpsc::Sender<Update>,
    live: tokio::sync::watch::Sender<bool>,
    metrics: metrics::Metrics,
    stop: CancellationToken,
) -> Result<(), Error> {
    let Some(client) = connect(&config, &stop).await? else {
        return Ok(());
    };
    Watcher::new(
        client,
        &config.prefix,
        config.etcd.dial_timeout,
        config.resync,
        tx,
        live,
    )
    .with_metrics(metrics)
    .run(stop)
    .await;
    Ok(())
}

async fn connect(config: &Config, stop: &CancellationToken) -> Result<Option<Member>, Error> {
    let attempt = if config.once {
        config.etcd.connect().await.map(Some)
    } else {
        let waiting = "keeping the last config";
        config
            .etcd
            .connect_retrying(stop, std::time::Duration::from_secs(2), waiting)
            .await
    };
    attempt.map_err(|e| match e {
        ConnectError::Fatal(msg) => Error::EtcdSetup(msg),
        e @ ConnectError::Unavailable { .. } => Error::EtcdUnavailable(e.to_string()),
    })
}

/// --once / --dry-run: one listing, one render (and apply), then exit.
async fn run_once(config: &Config, renderer: Renderer, targets: Vec<Target>) -> Result<i32, Error> {
    let stop = CancellationToken::new();
    let Some(client) = connect(config, &stop).await? else {
        return Ok(1);
    };
    let (tx, _rx) = mpsc::channel(1);
    let (live, _) = tokio::sync::watch::channel(false);
    let watcher = Watcher::new(
        client,
        &config.prefix,
        config.etcd.dial_timeout,
        None,
        tx,
        live,
    );
    let (store, kvs) = watcher
        .list()
        .await
        .map_err(|e| Error::EtcdUnavailable(registry::etcd::error_chain(&e)))?;
    let mut model = Model::new(&config.prefix);
    model.reset(
        kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        store.revision,
    );
    let ctx = renderer.context(model.template_data(&config.vars));
    if config.dry_run {
        let mut out = std::io::stdout().lock();
        for t in &targets {
            let bytes = renderer.render_with(&t.name, &ctx)?;
            let _ = out.write_all(&bytes);
        }
        let _ = out.flush();
        return Ok(0);
    }
    let reloader = match &config.reload {
        ReloadMode::Master(path) => Reloader::Master(MasterCli::new(path)),
        ReloadMode::Command { command, timeout } => Reloader::Command {
            command: command.clone(),
            timeout: *timeout,
        },
        _ => Reloader::None,
    };
    let mut applier = Applier {
        targets,
        reloader,
        runtime_api: config.runtime_api,
        runtime_limits: config.runtime_limits,
        drain_timeout: config.drain_timeout,
        metrics: metrics::Metrics::new(&mut prometheus_client::registry::Registry::default()),
    };
    let report = applier.apply(&renderer, &ctx).await;
    info!(
        revision = store.revision,
        instances = model.len(),
        written = report.written,
        unchanged = report.unchanged,
        applied = report.reload.unwrap_or("unchanged"),
        "applied once"
    );
    if report.errors.is_empty() {
        Ok(0)
    } else {
        Err(Error::Apply(report.errors.len()))
    }
}
