//! The `registrar docker` loop: subscribe to the engine's container events, sync fully
//! (register what runs and is eligible, remove this daemon's stale keys), then follow the
//! events; on losing the socket, do it all again. Every record is bound to one lease the
//! daemon keeps alive; when it is lost, a new one is granted and everything is put again.
//!
//! Each event is judged by the container's state at that moment (`inspect`), not by its
//! name alone, so events replayed after a reconnect are harmless. The exception is the
//! first stop signal (`kill` with the container's stop signal, `stop`): the container is
//! still running then, and is deregistered at once so the load balancer drains it before
//! it exits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use futures_util::StreamExt;
use registry::etcd::{error_chain, is_lease_not_found, Backoff, ConnectError, Member};
use registry::Instance;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::engine::{is_stop_signal, not_found, view};
use super::labels;
use super::metrics::Metrics;
use super::DockerConfig;
use crate::lease::{sleep_or_stop, Keeper, Kept};

/// Fatal failures: flags or etcd setup that retrying cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One registration this daemon holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    key: String,
    value: String,
}

struct Daemon {
    config: DockerConfig,
    etcd: Member,
    docker: Docker,
    /// Our one lease, every container's record under it; `None` until the first is
    /// registered, and after the lease was lost.
    keeper: Option<Keeper>,
    /// Container id → what is in etcd for it under our lease (one record per service it
    /// registers; never empty).
    held: BTreeMap<String, Vec<Held>>,
    /// Containers that got their stop signal: not registered again until they start.
    stopping: BTreeSet<String>,
    /// Containers already reported for a bad label (reported once per container).
    reported: BTreeSet<String>,
    /// When to sync again: soon after a failed write, a TTL after a conflict.
    resync_at: Option<Instant>,
    /// Keys reported as held by another registrar (reported once each).
    conflicts: BTreeSet<String>,
    metrics: Metrics,
    ready: tokio::sync::watch::Sender<bool>,
    /// SIGHUP: sync with the engine and etcd now.
    hup: tokio::sync::mpsc::Receiver<()>,
    /// systemd: READY after the first sync, STATUS, WATCHDOG from the event loop.
    notifier: observe::notify::Notifier,
}

/// Runs until `shutdown`. Never returns because etcd or Docker is unavailable. Each
/// notification of `hup` (SIGHUP) syncs fully at once.
pub async fn run(
    config: DockerConfig,
    shutdown: CancellationToken,
    hup: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::default();
    metrics.register(&mut registry);
    let (ready, ready_rx) = tokio::sync::watch::channel(false);
    let tasks = CancellationToken::new();
    observe::serve_if(
        config.metrics_addr,
        || observe::Endpoint::ready_when(registry, ready_rx, "not synced with Docker and etcd"),
        tasks.clone(),
    )
    .await;
    // The socket may not be there yet (the engine restarting): wait for it.
    let mut warned = false;
    let docker = loop {
        match Docker::connect_with_unix(&config.socket, 30, bollard::API_DEFAULT_VERSION) {
            Ok(d) => break d,
            Err(e) => {
                if !warned {
                    warned = true;
                    warn!(socket = %config.socket, error = %e, "Docker socket not available; waiting for it");
                }
                if sleep_or_stop(Duration::from_secs(1), &shutdown).await {
                    return Ok(());
                }
            }
        }
    };
    let waiting = "registering nothing until it answers";
    let etcd = match config
        .etcd
        .connect_retrying(&shutdown, Duration::from_secs(1), waiting)
        .await
    {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(()),
        Err(ConnectError::Fatal(m)) => return Err(Error::Setup(m)),
        Err(e @ ConnectError::Unavailable { .. }) => return Err(Error::Setup(e.to_string())),
    };
    let mut daemon = Daemon {
        config,
        etcd,
        docker,
        keeper: None,
        held: BTreeMap::new(),
        stopping: BTreeSet::new(),
        reported: BTreeSet::new(),
        resync_at: None,
        conflicts: BTreeSet::new(),
        metrics,
        ready,
        hup,
        notifier: observe::notify::Notifier::from_env(),
    };
    daemon.run(&shutdown).await;
    daemon.notifier.stopping();
    tasks.cancel();
    Ok(())
}

impl Daemon {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            // Events since a second before the sync are replayed: nothing between the
            // sync's listing and the stream's start is missed.
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(1))
                .unwrap_or(0);
            let mut filters = self.label_filter();
            filters.insert("type".to_string(), vec!["container".to_string()]);
            let mut events = self.docker.events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(filters),
            }));
            if let Err(e) = self.sync().await {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "full sync failed; retrying");
                if sleep_or_stop(delay, shutdown).await {
                    return;
                }
                continue;
            }
            backoff.reset();
            self.metrics.docker_connected.set(1);
            self.ready.send_replace(true);
            self.notifier.ready(&self.status_line());
            let mut watchdog = observe::notify::Watchdog::new(&self.notifier);
            loop {
                let next_watchdog = watchdog.pet();
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        // The records stay until their TTL: a restarted daemon takes them
                        // over without a gap; a daemon gone for good lets them expire.
                        info!(registered = self.records(), "stopping; records expire after the TTL unless a new daemon takes them over");
                        return;
                    }
                    event = events.next() => match event {
                        Some(Ok(event)) => self.on_event(event).await,
                        Some(Err(e)) => {
                            warn!(error = %e, "lost the Docker event stream; reconnecting");
                            break;
                        }
                        None => {
                            warn!("the Docker event stream ended; reconnecting");
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(self.keeper.as_ref().map_or(far, Keeper::due)) => {
                        self.keep_alive(shutdown).await;
                    }
                    _ = tokio::time::sleep_until(self.resync_at.unwrap_or_else(Instant::now)), if self.resync_at.is_some() => {
                        if let Err(e) = self.sync().await {
                            debug!(error = %e, "sync after a failed write failed; retrying");
                        }
                    }
                    Some(()) = self.hup.recv() => {
                        if let Err(e) = self.sync().await {
                            warn!(error = %e, "sync failed; retrying");
                            self.retry_in(Duration::from_millis(500));
                        }
                        self.notifier.status(&self.status_line());
                    }
                    _ = tokio::time::sleep_until(next_watchdog.unwrap_or(far)), if next_watchdog.is_some() => {}
                }
            }
            self.metrics.docker_connected.set(0);
            self.ready.send_replace(false);
            if sleep_or_stop(backoff.next_delay(), shutdown).await {
                return;
            }
        }
    }

    /// Registers every eligible running container, deregisters what is no longer
    /// eligible, and removes this daemon's keys that no container explains.
    async fn sync(&mut self) -> Result<(), String> {
        self.metrics.syncs.inc();
        let filters = self.label_filter();
        let running = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("listing containers: {e}"))?;
        let mut want: BTreeMap<String, Vec<Held>> = BTreeMap::new();
        for summary in running {
            let Some(id) = summary.id else { continue };
            let labels: BTreeMap<String, String> =
                summary.labels.unwrap_or_default().into_iter().collect();
            if !labels::is_labelled(&labels) {
                continue;
            }
            match self.docker.inspect_container(&id, None).await {
                Ok(c) => {
                    let held = self.desired(&id, &c);
                    if !held.is_empty() {
                        want.insert(id, held);
                    }
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(format!("inspecting {id}: {e}")),
            }
        }
        self.stopping.retain(|id| want.contains_key(id));
        let gone: Vec<String> = self
            .held
            .keys()
            .filter(|id| !want.contains_key(*id))
            .cloned()
            .collect();
        self.resync_at = None;
        for id in gone {
            self.deregister(&id).await;
        }
        for (id, held) in &want {
            self.register(id, held.clone()).await;
        }
        self.remove_stale(&want).await?;
        self.metrics.registered.set(self.records());
        Ok(())
    }

    /// Docker's `label` filter from `--label-filter` (none without it), for the event
    /// stream and the listing alike.
    fn label_filter(&self) -> HashMap<String, Vec<String>> {
        let mut filters = HashMap::new();
        if !self.config.label_filters.is_empty() {
            filters.insert("label".to_string(), self.config.label_filters.clone());
        }
        filters
    }

    /// Records held now (a container may register several services).
    fn records(&self) -> i64 {
        self.held.values().map(Vec::len).sum::<usize>() as i64
    }

    /// What `c` should have in etcd now: nothing when it is not eligible (stopping, not
    /// running, paused, unhealthy or still starting, not on `--network`) or its labels are
    /// bad.
    fn desired(&mut self, id: &str, c: &ContainerInspectResponse) -> Vec<Held> {
        let Some(state) = c.state.as_ref() else {
            return Vec::new();
        };
        let running = state.running == Some(true)
            && state.paused != Some(true)
            && state.restarting != Some(true);
        let healthy = match state.health.as_ref().and_then(|h| h.status) {
            None | Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) => true,
            Some(HealthStatusEnum::HEALTHY) => true,
            Some(HealthStatusEnum::STARTING | HealthStatusEnum::UNHEALTHY) => false,
        };
        // Labels are judged once the container runs (a created one has no address yet).
        if !running || self.stopping.contains(id) {
            return Vec::new();
        }
        let view = view(c);
        if let Some(net) = &self.config.network {
            if !view.networks.contains_key(net) {
                // Scoped out on purpose (--network): not an operator's problem.
                debug!(container = %view.name, network = %net, "not on the daemon's network; not registered");
                return Vec::new();
            }
        }
        let network = self.config.network.as_deref();
        let instances =
            match labels::instances(&view, &self.config.mode, &self.config.owner, network) {
                Ok(i) => i,
                Err(e) => {
                    if self.reported.insert(id.to_string()) {
                        self.metrics.skipped.inc();
                        warn!(error = %e, "not registering the container: bad label");
                    }
                    return Vec::new();
                }
            };
        if !healthy {
            return Vec::new();
        }
        instances
            .iter()
            .map(|i| Held {
                key: registry::instance_key(&self.config.prefix, &i.service, &i.id),
                value: i.encode(),
            })
            .collect()
    }

    async fn on_event(&mut self, event: EventMessage) {
        self.metrics.events.inc();
        let action = event.action.unwrap_or_default();
        let actor = event.actor.unwrap_or_default();
        let Some(id) = actor.id else { return };
        let attributes = actor.attributes.unwrap_or_default();
        let name = attributes
            .get("name")
            .cloned()
            .unwrap_or_else(|| id.clone());
        debug!(%action, container = %name, "event");
        if action == "start" {
            self.stopping.remove(&id);
            self.reported.remove(&id);
        }
        // Labels ride on the event: a container that asks for nothing and holds nothing is
        // not inspected.
        let asks: BTreeMap<String, String> = attributes.clone().into_iter().collect();
        if !labels::is_labelled(&asks) && !self.held.contains_key(&id) {
            return;
        }
        if action == "destroy" {
            self.stopping.remove(&id);
            self.reported.remove(&id);
            self.deregister_logged(&id, &name, "destroyed").await;
            return;
        }
        let inspected = match self.docker.inspect_container(&id, None).await {
            Ok(c) => c,
            Err(e) if not_found(&e) => {
                self.deregister_logged(&id, &name, "gone").await;
                return;
            }
            Err(e) => {
                warn!(container = %name, error = %e, "cannot inspect the container; syncing again");
                self.retry_in(Duration::from_secs(1));
                return;
            }
        };
        let stop_signal = inspected
            .config
            .as_ref()
            .and_then(|c| c.stop_signal.clone())
            .unwrap_or_else(|| "SIGTERM".into());
        let stopping = action == "stop"
            || (action == "kill"
                && attributes
                    .get("signal")
                    .is_some_and(|s| is_stop_signal(s, &stop_signal)));
        if stopping {
            self.stopping.insert(id.clone());
            self.deregister_logged(&id, &name, "stop signal").await;
            return;
        }
        let held = self.desired(&id, &inspected);
        if held.is_empty() {
            self.deregister_logged(&id, &name, &action).await;
        } else {
            self.register(&id, held).await;
        }
        self.metrics.registered.set(self.records());
    }

    async fn deregister_logged(&mut self, id: &str, name: &str, why: &str) {
        if let Some(held) = self.held.get(id) {
            let keys: Vec<&str> = held.iter().map(|h| h.key.as_str()).collect();
            info!(container = %name, keys = ?keys, %why, "deregistering");
            self.deregister(id).await;
        }
        self.metrics.registered.set(self.records());
    }

    /// Makes container `id`'s records `want`: removes the ones it no longer asks for, puts
    /// each new or changed one under our lease unless another owner holds its key.
    async fn register(&mut self, id: &str, want: Vec<Held>) {
        if self.held.get(id) == Some(&want) {
            return;
        }
        let dropped: Vec<Held> = self
            .held
            .get(id)
            .into_iter()
            .flatten()
            .filter(|h| !want.iter().any(|w| w.key == h.key))
            .cloned()
            .collect();
        for h in dropped {
            self.delete_record(&h).await;
            if let Some(v) = self.held.get_mut(id) {
                v.retain(|x| x.key != h.key);
            }
        }
        for held in want {
            if self.held.get(id).is_some_and(|v| v.contains(&held)) {
                continue;
            }
            self.register_one(id, held).await;
        }
        if self.held.get(id).is_some_and(Vec::is_empty) {
            self.held.remove(id);
        }
    }

    /// Puts one record of container `id` under our lease, unless another owner holds the key.
    async fn register_one(&mut self, id: &str, held: Held) {
        if let Some((other, _)) = self
            .held
            .iter()
            .find(|(other, hs)| other.as_str() != id && hs.iter().any(|h| h.key == held.key))
        {
            error!(key = %held.key, container = %id, holder = %other, "two containers claim the same key; set lb-registry.id");
            return;
        }
        let lease = match self.ensure_lease().await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot get a lease; retrying");
                self.retry_in(Duration::from_secs(1));
                return;
            }
        };
        match self.put_if_ours(&held, lease).await {
            Ok(true) => {
                if self.conflicts.remove(&held.key) {
                    info!(key = %held.key, "the key is free again");
                }
                info!(key = %held.key, value = %held.value, "registered");
                let records = self.held.entry(id.to_string()).or_default();
                records.retain(|h| h.key != held.key);
                records.push(held);
            }
            Ok(false) => {
                if self.conflicts.insert(held.key.clone()) {
                    error!(key = %held.key, container = %id, "CONFLICT: the key is held by a registrar that is not this daemon (another --owner, or an in-image registrar); not overwriting it, trying again every TTL");
                }
                self.retry_in(Duration::from_secs(self.config.ttl_secs as u64));
            }
            Err(e) if is_lease_not_found(&e) => {
                self.lease_lost();
            }
            Err(e) => {
                warn!(key = %held.key, error = %error_chain(&e), "registration failed; retrying");
                self.retry_in(Duration::from_secs(1));
                self.etcd.fail_over().await.ok();
            }
        }
    }

    /// Creates the key, or replaces it when the record there is ours (this daemon's
    /// owner mark). False when someone else holds it.
    async fn put_if_ours(&self, held: &Held, lease: i64) -> Result<bool, etcd_client::Error> {
        let ours = |kv: &etcd_client::KeyValue| self.ours(&held.key, kv.value());
        let claim = registry::etcd::put_unless_held(
            &self.etcd.client(),
            &held.key,
            &held.value,
            lease,
            self.config.etcd.dial_timeout,
            ours,
        )
        .await?;
        Ok(matches!(claim, registry::etcd::Claim::Put))
    }

    /// Deletes container `id`'s keys that are still under our lease.
    async fn deregister(&mut self, id: &str) {
        let Some(held) = self.held.remove(id) else {
            return;
        };
        for h in held {
            self.delete_record(&h).await;
        }
    }

    /// Deletes one record's key if it is still under our lease.
    async fn delete_record(&mut self, held: &Held) {
        let Some(lease) = self.keeper.as_ref().map(|k| k.lease) else {
            return;
        };
        // Marked leaving first: a deliberate stop, drained at once (see registry::etcd).
        let client = self.etcd.client();
        let timeout = self.config.etcd.dial_timeout;
        if let Err(e) =
            registry::etcd::mark_leaving(&client, &held.key, &held.value, lease, timeout).await
        {
            debug!(key = %held.key, error = %error_chain(&e), "could not mark the record leaving");
        }
        let txn = Txn::new()
            .when(vec![Compare::lease(
                held.key.clone(),
                CompareOp::Equal,
                lease,
            )])
            .and_then(vec![TxnOp::delete(held.key.clone(), None)]);
        if let Err(e) = self.timed(self.etcd.client().kv_client().txn(txn)).await {
            warn!(key = %held.key, error = %error_chain(&e), "deregistration failed; the key expires with the lease unless a sync removes it");
            self.retry_in(Duration::from_secs(1));
        }
    }

    /// Removes keys carrying this daemon's owner mark that no running container explains
    /// (left by an earlier run of this daemon).
    async fn remove_stale(&mut self, want: &BTreeMap<String, Vec<Held>>) -> Result<(), String> {
        let keys: BTreeSet<&str> = want.values().flatten().map(|h| h.key.as_str()).collect();
        let root = registry::key::root_prefix(&self.config.prefix);
        let resp = self
            .timed(
                self.etcd
                    .client()
                    .kv_client()
                    .get(root, Some(GetOptions::new().with_prefix())),
            )
            .await
            .map_err(|e| format!("listing {}: {}", self.config.prefix, error_chain(&e)))?;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if keys.contains(key.as_str()) {
                continue;
            }
            if !self.ours(&key, kv.value()) {
                continue;
            }
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then(vec![TxnOp::delete(key.clone(), None)]);
            match self.timed(self.etcd.client().kv_client().txn(txn)).await {
                Ok(_) => info!(%key, "removed a stale record of this daemon"),
                Err(e) => return Err(format!("removing {key}: {}", error_chain(&e))),
            }
        }
        Ok(())
    }

    /// One line for systemd's STATUS=.
    fn status_line(&self) -> String {
        format!(
            "{} record(s) of {} container(s) registered, lease {}",
            self.records(),
            self.held.len(),
            self.keeper
                .as_ref()
                .map_or("none".into(), |k| format!("{:x}", k.lease))
        )
    }

    /// Asks for a full sync within `d` (the earliest request wins).
    fn retry_in(&mut self, d: Duration) {
        let at = Instant::now() + d;
        self.resync_at = Some(self.resync_at.map_or(at, |t| t.min(at)));
    }

    /// True when the record `value` under `key` carries this daemon's owner mark.
    fn ours(&self, key: &str, value: &[u8]) -> bool {
        registry::parse_key(&self.config.prefix, key)
            .and_then(|(service, id)| Instance::decode(service, id, value).ok())
            .is_some_and(|i| labels::owned_by(&i, &self.config.owner))
    }

    async fn ensure_lease(&mut self) -> Result<i64, String> {
        if let Some(k) = &self.keeper {
            return Ok(k.lease);
        }
        let ttl = self.config.ttl_secs;
        let grant = self
            .timed(async { self.etcd.client().lease_grant(ttl, None).await })
            .await
            .map_err(|e| error_chain(&e))?;
        self.metrics.lease_grants.inc();
        info!(
            lease = format_args!("{:x}", grant.id()),
            ttl, "lease granted"
        );
        self.keeper = Some(Keeper::new(
            grant.id(),
            Duration::from_secs(ttl as u64),
            self.config.etcd.dial_timeout,
            self.metrics.keepalive_failures.clone(),
        ));
        Ok(grant.id())
    }

    /// Our lease is gone (expired while etcd was unreachable, or the store was
    /// replaced): forget what we hold and sync, which grants a new one and puts again.
    fn lease_lost(&mut self) {
        if let Some(l) = self.keeper.take().map(|k| k.lease) {
            warn!(
                lease = format_args!("{l:x}"),
                "lease lost; registering every container again"
            );
        }
        self.held.clear();
        self.retry_in(Duration::from_secs(1));
    }

    /// One keep-alive round of our lease (the registrar's [`Keeper`]); a lost lease
    /// makes every container register again.
    async fn keep_alive(&mut self, stop: &CancellationToken) {
        let Some(keeper) = self.keeper.as_mut() else {
            return;
        };
        if keeper.round(&mut self.etcd, stop).await == Kept::Lost {
            self.lease_lost();
        }
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, etcd_client::Error> {
        registry::etcd::within(self.config.etcd.dial_timeout, "etcd request", fut).await
    }
}
