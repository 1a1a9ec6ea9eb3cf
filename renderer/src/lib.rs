//! renderer: watches the registry in etcd and keeps HAProxy's config in step with it.
//!
//! Data flows one way: [`watch`] (etcd) → [`model`] (BTreeMaps) → [`render`] (Handlebars,
//! pure) → [`apply`] (files, HAProxy). [`coalesce`] decides when to apply. `main.rs` only
//! parses flags, sets up logging and signals, and maps the result to an exit code.
#![forbid(unsafe_code)]

pub mod apply;
pub mod coalesce;
pub mod config;
pub mod metrics;
pub mod model;
pub mod render;
pub mod signal;
pub mod status;
pub mod watch;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitStatus;

use nix::sys::signal::Signal;
use registry::etcd::ConnectError;
use registry::etcd::Member;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use apply::file::FileTarget;
use apply::haproxy::MasterCli;
use apply::{Applier, Reloader, Target};
pub use config::{Args, Config, ReloadMode};
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
        let last = file.current();
        targets.push(Target { name, file, last });
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

/// The `dynamic-cookie-key` the shipped template falls back to: public, so anyone can
/// compute which server a cookie pins (and forge one for any server).
const PUBLIC_COOKIE_KEY: &[u8] = b"dynamic-cookie-key lb-registry-change-me";

/// Warns when an applied config uses the shipped, public dynamic-cookie key.
fn warn_public_cookie_key(applier: &Applier) {
    let public = applier.targets.iter().any(|t| {
        t.last.as_deref().is_some_and(|b| {
            b.windows(PUBLIC_COOKIE_KEY.len())
                .any(|w| w == PUBLIC_COOKIE_KEY)
        })
    });
    if public {
        warn!("the config uses the shipped, public dynamic-cookie-key: sticky-session cookies can be predicted and forged; set --var cookie_key=<secret> (the same on every load balancer)");
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
    let mut applier = Applier {
        targets,
        reloader,
        runtime_api: config.runtime_api,
        runtime_limits: config.runtime_limits,
        drain_timeout: config.drain_timeout,
        metrics: metrics.clone(),
    };

    // Exec mode with a config already in place (a previous run's last good one): serve it
    // now rather than wait for etcd.
    if let ReloadMode::Exec { command, socket } = &config.reload {
        if applier.start_haproxy_if_due(command, socket).await? {
            info!("serving the existing config until the registry is read");
        }
    }

    let (tx, mut rx) = mpsc::channel::<Update>(256);
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
    let mut source = tokio::spawn(follow_registry(
        config.clone(),
        tx,
        live_tx,
        metrics.clone(),
        tasks.clone(),
    ));

    let mut model = Model::new(&config.prefix);
    let mut coalescer = coalesce::Coalescer::new(config.wait_min, config.wait_max);
    let mut synced = false;
    let mut applied_set: BTreeSet<(String, String)> = BTreeSet::new();
    let mut quarantine = Quarantine::default();
    let mut cookie_key_checked = false;
    let far = || Instant::now() + std::time::Duration::from_secs(86_400);

    let result = loop {
        let deadline = coalescer.deadline();
        let mut haproxy_exit = applier.haproxy().map(|c| c.exit_watch());
        let exited = async {
            match haproxy_exit.as_mut() {
                Some(rx) => rx.wait_for(Option::is_some).await.ok().and_then(|s| *s),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(0),
            status = exited => {
                let status = status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(1 << 8));
                error!(%status, "HAProxy exited; stopping");
                break Ok(exit_code(status));
            }
            r = &mut source => {
                break Err(match r {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => Error::EtcdUnavailable("registry follower ended".into()),
                    Err(e) => Error::EtcdUnavailable(format!("registry follower failed: {e}")),
                });
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                // Take everything already queued into this apply.
                while let Ok(u) = rx.try_recv() {
                    if apply_update(&mut model, u, &mut synced, &metrics) {
                        coalescer.changed(Instant::now());
                    }
                }
                let started = Instant::now();
                let report = apply_guarded(&config, &model, &mut quarantine, &mut applier, &renderer).await;
                coalescer.applied(Instant::now());
                let mut now_set = instance_set(&model);
                now_set.retain(|(s, i)| !quarantine.entries.contains_key(&registry::instance_key(&config.prefix, s, i)));
                let added: Vec<_> = now_set.difference(&applied_set).map(|(s, i)| format!("{s}/{i}")).collect();
                let removed: Vec<_> = applied_set.difference(&now_set).map(|(s, i)| format!("{s}/{i}")).collect();
                if report.errors.is_empty() {
                    applied_set = now_set;
                }
                record_apply(&metrics, &state, &model, &quarantine, &applier, &report, started.elapsed());
                if !cookie_key_checked && report.errors.is_empty() {
                    cookie_key_checked = true;
                    warn_public_cookie_key(&applier);
                }
                info!(
                    revision = model.revision,
                    instances = model.len(),
                    ?added,
                    ?removed,
                    written = report.written,
                    applied = report.reload.unwrap_or("unchanged"),
                    errors = report.errors.len(),
                    took = ?started.elapsed(),
                    "apply"
                );
                if let ReloadMode::Exec { command, socket } = &config.reload {
                    if let Err(e) = applier.start_haproxy_if_due(command, socket).await {
                        break Err(e.into());
                    }
                }
            }
            u = rx.recv() => match u {
                Some(u) => {
                    if apply_update(&mut model, u, &mut synced, &metrics) {
                        coalescer.changed(Instant::now());
                    }
                }
                None => continue,
            },
        }
    };
    tasks.cancel();
    if let Some(child) = applier.haproxy() {
        if result.as_ref().is_ok_and(|_| shutdown.is_cancelled()) {
            info!("stopping HAProxy gracefully (SIGUSR1: finish in-flight requests)");
            let status = child.stop(Signal::SIGUSR1, config.stop_timeout).await;
            info!(%status, "HAProxy stopped");
        }
    }
    result
}

/// Records left out of the config because the check pinned a failure on them: key →
/// (the record as it was, HAProxy's message). A record comes back as soon as it changes.
#[derive(Debug, Default)]
pub struct Quarantine {
    entries: std::collections::BTreeMap<String, (registry::Instance, String)>,
}

impl Quarantine {
    /// Releases entries whose record changed or went away.
    fn refresh(&mut self, model: &Model) {
        self.entries.retain(|key, (inst, _)| {
            let keep = model.get(key) == Some(inst);
            if !keep {
                info!(%key, "quarantined record changed; trying it again");
            }
            keep
        });
    }

    fn keys(&self) -> BTreeSet<String> {
        self.entries.keys().cloned().collect()
    }
}

/// The guarded apply: `--min-instances` refuses renders that would drop a service too low;
/// a check failure pinned on one record quarantines it and renders again without it (up to
/// three records per apply); `--max-instances-per-service` caps each service.
async fn apply_guarded(
    config: &Config,
    model: &Model,
    quarantine: &mut Quarantine,
    applier: &mut Applier,
    renderer: &Renderer,
) -> apply::Report {
    quarantine.refresh(model);
    for round in 0..=3 {
        let excluded = quarantine.keys();
        let (data, cut) =
            model.template_data_with(&config.vars, &excluded, config.max_instances_per_service);
        if cut > 0 {
            warn!(
                cut,
                max = config.max_instances_per_service,
                "instances over --max-instances-per-service left out"
            );
        }
        for (service, min) in &config.min_instances {
            let have = data["services"][service].as_array().map_or(0, Vec::len);
            if have < *min {
                let msg = format!(
                    "refusing to apply: service {service} would have {have} instance(s), below --min-instances {service}={min}; keeping the last good config"
                );
                error!("{msg}");
                return apply::Report {
                    errors: vec![msg],
                    ..Default::default()
                };
            }
        }
        let report = applier.apply(renderer, &renderer.context(data)).await;
        let Some(line) = report.rejected_lines.first() else {
            return report;
        };
        let Some(key) = model.culprit(line, &excluded).filter(|_| round < 3) else {
            return report;
        };
        let message = report.errors.first().cloned().unwrap_or_default();
        warn!(%key, error = %message, "quarantined registry record: the config check fails because of it; applying without it");
        if let Some(inst) = model.get(&key) {
            quarantine.entries.insert(key, (inst.clone(), message));
        }
    }
    apply::Report::default()
}

/// Feeds an update to the model; true if something was admitted or removed (or this is
/// the first full listing, which must always be applied).
fn apply_update(
    model: &mut Model,
    update: Update,
    synced: &mut bool,
    m: &metrics::Metrics,
) -> bool {
    let changed = apply_update_inner(model, update, synced);
    for reason in model.take_new_skips() {
        m.records_skipped
            .get_or_create(&metrics::ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
    changed
}

fn apply_update_inner(model: &mut Model, update: Update, synced: &mut bool) -> bool {
    match update {
        Update::Snapshot { revision, kvs } => {
            let changed = model.reset(
                kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                revision,
            );
            let first = !*synced;
            *synced = true;
            changed || first
        }
        Update::Changes { revision, changes } => {
            let mut changed = false;
            for c in changes {
                changed |= match c {
                    watch::Change::Put { key, value } => model.put(&key, &value),
                    watch::Change::Delete { key } => model.delete(&key),
                };
            }
            model.revision = revision;
            changed
        }
    }
}

fn instance_set(model: &Model) -> BTreeSet<(String, String)> {
    model
        .services()
        .iter()
        .flat_map(|(s, ids)| ids.keys().map(move |i| (s.clone(), i.clone())))
        .collect()
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status.code().or_else(|| status.signal().map(|s| 128 + s)) {
        Some(0) | None => 1, // HAProxy exiting on its own is a failure for a load balancer.
        Some(c) => c,
    }
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

/// Updates metrics, readiness and the `/status` document after an apply.
fn record_apply(
    m: &metrics::Metrics,
    state: &metrics::State,
    model: &Model,
    quarantine: &Quarantine,
    applier: &Applier,
    report: &apply::Report,
    took: std::time::Duration,
) {
    let ok = report.errors.is_empty();
    let result = if ok { "ok" } else { "error" };
    m.applies
        .get_or_create(&metrics::ResultLabel {
            result: result.into(),
        })
        .inc();
    m.revision.set(model.revision);
    m.instances.clear();
    for (service, ids) in model.services() {
        m.instances
            .get_or_create(&metrics::ServiceLabel {
                service: service.clone(),
            })
            .set(ids.len() as i64);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    if ok {
        state
            .applied
            .store(true, std::sync::atomic::Ordering::Relaxed);
        m.last_apply.set(now);
        if let Some(bytes) = applier.targets.first().and_then(|t| t.last.as_deref()) {
            m.config_hash.set(metrics::hash53(bytes));
        }
    }
    let skipped: serde_json::Map<String, serde_json::Value> = model
        .skipped()
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                serde_json::json!({"reason": s.reason, "error": s.message}),
            )
        })
        .collect();
    let services: serde_json::Map<String, serde_json::Value> = model
        .services()
        .iter()
        .map(|(name, ids)| {
            let list: Vec<String> = ids
                .values()
                .map(|i| format!("{} {}:{}", i.id, i.address, i.port))
                .collect();
            (name.clone(), serde_json::json!(list))
        })
        .collect();
    let doc = serde_json::json!({
        "revision": model.revision,
        "services": services,
        "skipped": skipped,
        "quarantined": quarantine
            .entries
            .iter()
            .map(|(k, (_, msg))| (k.clone(), serde_json::json!(msg)))
            .collect::<serde_json::Map<_, _>>(),
        "last_apply": {
            "unix_time": now,
            "ok": ok,
            "how": report.reload.unwrap_or("unchanged"),
            "written": report.written,
            "runtime_changes": report.runtime_changes,
            "took_ms": took.as_secs_f64() * 1000.0,
            "errors": report.errors,
        },
    });
    if let Ok(mut s) = state.status.lock() {
        *s = doc;
    }
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
