//! registrar: keeps one service instance registered in etcd under a TTL lease.
//!
//! [`run`] wires the pieces: the optional child app ([`child`]), the health verdict
//! ([`health`]), and the lease-bound registration ([`lease`]). `main.rs` only parses flags,
//! sets up logging and signals ([`signal`]) and maps the result to an exit code.
#![forbid(unsafe_code)]

pub mod child;
pub mod config;
pub mod docker;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod signal;

use nix::sys::signal::Signal;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::{Args, Config};

/// Fatal failures of [`run`].
#[derive(Debug, Error)]
pub enum Error {
    /// etcd setup that retrying cannot fix: credentials, certificates, flags.
    #[error("{0}")]
    EtcdSetup(String),
    /// The app could not be started.
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// Waiting for the app failed.
    #[error("waiting for the app: {0}")]
    Wait(std::io::Error),
}

/// Signals delivered by [`signal::install`].
pub struct Signals {
    /// Signals to pass on to the app.
    pub forward: mpsc::UnboundedReceiver<Signal>,
    /// The signal that requested shutdown (valid once `shutdown` is cancelled).
    pub stop_signal: watch::Receiver<Signal>,
}

/// Runs until `shutdown` (or, in exec mode, until the app exits). Returns the process
/// exit code: 0, or the app's status in exec mode.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    mut signals: Signals,
) -> Result<i32, Error> {
    let key = config.keys();
    for (key, value) in config.records() {
        info!(%key, %value, ttl = config.ttl_secs, "starting");
    }

    let mut app = if config.command.is_empty() {
        None
    } else {
        Some(
            child::App::spawn(&config.command).map_err(|source| Error::Spawn {
                command: config.command.join(" "),
                source,
            })?,
        )
    };

    let tasks = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let (registered_tx, registered_rx) = watch::channel(false);
    let ready = registered_rx.clone();
    observe::serve_if(
        config.metrics_addr,
        || observe::Endpoint::ready_when(registry, ready, "not registered"),
        tasks.clone(),
    )
    .await;
    {
        let (mut rx, gauge, stop) = (
            registered_rx.clone(),
            metrics.registered.clone(),
            tasks.clone(),
        );
        tokio::spawn(async move {
            loop {
                gauge.set(i64::from(*rx.borrow_and_update()));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
    }

    // Health verdict: always true without a check.
    let (health_tx, health_rx) = watch::channel(config.health.is_empty());
    let checker = health::Signals::default();
    let mut probes = checker.probes.subscribe();
    if !config.health.is_empty() {
        tokio::spawn(health::run_checks(
            config.health.clone(),
            config.health_interval,
            config.health_timeout,
            health::Hysteresis::new(config.health_fails, config.health_rises),
            health_tx,
            tasks.clone(),
            metrics.clone(),
            checker.clone(),
        ));
    } else {
        // Keep the sender alive so the verdict never reads as "checker gone".
        tokio::spawn({
            let t = tasks.clone();
            async move {
                t.cancelled().await;
                drop(health_tx);
            }
        });
    }

    let refresh = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut registration = tokio::spawn(register(
        config.clone(),
        health_rx,
        registered_tx,
        metrics.clone(),
        refresh.clone(),
        tasks.clone(),
    ));

    // systemd (nothing without NOTIFY_SOCKET): READY=1 once started and the first health
    // check has answered, whatever it said (an unhealthy app must not fail the unit's
    // start); STATUS= follows the registration; WATCHDOG=1 from this loop.
    let notifier = observe::notify::Notifier::from_env();
    let mut ready_sent = false;
    let mut registered_seen = registered_rx.clone();
    let mut registration_open = true;
    let status = |registered: bool| {
        if registered {
            format!("registered: {key}")
        } else if !config.health.is_empty() {
            format!("not registered: {key} (health check failing or etcd unreachable)")
        } else {
            format!("not registered: {key} (etcd unreachable)")
        }
    };
    let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(86_400);
    let mut watchdog = observe::notify::Watchdog::new(&notifier);

    // Wait for whatever comes first: a stop request, the app's exit, a fatal etcd error.
    let app_status = loop {
        let next_watchdog = watchdog.pet();
        if !ready_sent && (config.health.is_empty() || *probes.borrow_and_update() > 0) {
            ready_sent = true;
            notifier.ready(&status(*registered_seen.borrow_and_update()));
        }
        let app_exit = async {
            match app.as_mut() {
                Some(a) => a.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break None,
            status = app_exit => {
                let status = status.map_err(Error::Wait)?;
                warn!(%status, "app exited; deregistering");
                break Some(status);
            }
            result = &mut registration => {
                // Only a fatal setup error ends the registration task on its own.
                let err = match result {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => Error::EtcdSetup("registration ended unexpectedly".into()),
                    Err(join) => Error::EtcdSetup(format!("registration task failed: {join}")),
                };
                tasks.cancel();
                if let Some(a) = app.as_mut() {
                    let _ = a.stop(Signal::SIGTERM, config.kill_timeout).await;
                }
                return Err(err);
            }
            Some(sig) = signals.forward.recv() => {
                match &app {
                    Some(a) => { info!(signal = %sig, "forwarding signal to app"); a.signal(sig) }
                    None if sig == Signal::SIGHUP => {
                        info!(signal = %sig, "putting the record again and re-running the health check");
                        refresh.notify_one();
                        checker.probe_now.notify_one();
                    }
                    None => info!(signal = %sig, "ignoring signal"),
                }
            }
            _ = probes.changed(), if !ready_sent => {}
            r = registered_seen.changed(), if registration_open => match r {
                Ok(()) if ready_sent => notifier.status(&status(*registered_seen.borrow_and_update())),
                Ok(()) => {}
                Err(_) => registration_open = false,
            },
            _ = tokio::time::sleep_until(next_watchdog.unwrap_or_else(far)), if next_watchdog.is_some() => {}
        }
    };
    notifier.stopping();

    // Deregister first: revoke the lease so the load balancer stops routing here.
    let was_registered = *registered_rx.borrow();
    tasks.cancel();
    if let Ok(Err(e)) = registration.await {
        warn!(error = %e, "registration ended with an error");
    }
    if let Some(status) = app_status {
        return Ok(child::exit_code(status));
    }
    let Some(mut app) = app else {
        return Ok(0);
    };
    if was_registered && !config.drain.is_zero() {
        info!(drain = ?config.drain, "draining before stopping the app");
        tokio::time::sleep(config.drain).await;
    }
    let sig = *signals.stop_signal.borrow();
    let status = app
        .stop(sig, config.kill_timeout)
        .await
        .map_err(Error::Wait)?;
    info!(%status, "app stopped");
    Ok(child::exit_code(status))
}

/// Connects (retrying while etcd is unreachable, failing on fatal setup errors), then keeps
/// the registration until `stop`.
async fn register(
    config: Config,
    health: watch::Receiver<bool>,
    registered: watch::Sender<bool>,
    metrics: metrics::Metrics,
    refresh: std::sync::Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let attempt = config
        .etcd
        .connect_retrying(
            &stop,
            std::time::Duration::from_secs(2),
            "the app keeps running, registration waits",
        )
        .await;
    let member = match attempt {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(()),
        Err(e) => {
            error!(error = %e, "cannot use etcd");
            return Err(Error::EtcdSetup(e.to_string()));
        }
    };
    lease::Registration::new(
        member,
        config.records(),
        config.ttl_secs,
        config.etcd.dial_timeout,
        health,
        registered,
    )
    .with_metrics(metrics)
    .with_refresh(refresh)
    .run(stop)
    .await
    .map_err(Error::EtcdSetup)
}
