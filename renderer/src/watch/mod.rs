//! Following the registry in etcd: list the prefix (paginated, at one revision), then watch
//! it from the next revision, and keep doing so through every failure.
//!
//! * stream error / disconnect → re-watch from the last seen revision + 1 on another
//!   member that answers, with capped backoff; never gives up;
//! * frozen member (SIGSTOP, cut off): whenever nothing arrived for [`PROGRESS_EVERY`], a
//!   progress request goes down the watch stream (etcd ≥ 3.4 answers it at once with the
//!   current revision); no answer within [`PROGRESS_TIMEOUT`] → move to another member and
//!   re-watch. This replaces fast HTTP/2 pings, which etcd's default keep-alive policy
//!   punishes with GOAWAY;
//! * watch cancelled with `compact_revision` → full re-list, then watch again;
//! * store replaced (cluster id changed, revision or raft term went backwards) → full re-list;
//! * a resumed watch is **verified, not trusted**: right after every re-watch, and every
//!   `--resync` while the watch runs, the prefix is listed at the current revision R
//!   ([`Verify`]); once the watch has delivered everything up to R (an event after R, or a
//!   progress answer at ≥ R), what the events built ([`Watcher::mirror`], key → mod
//!   revision) is compared with the listing, and every difference is sent as a repair,
//!   counted (`renderer_resync_drift_total`) and logged at WARN with its keys. etcd drops
//!   events in known cases (a watch resumed at the compaction revision loses a delete
//!   there: etcd #18089, fixed in 3.4.33 / 3.5.15); a ghost server must not follow.
//!
//! Knows etcd, not templates: it only emits [`Update`]s.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions};
use registry::etcd::{error_chain, Backoff, FailOver, Member};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

mod list;
use list::{header_store, list_root, Entry};
pub use list::{list, list_at, Listing};

const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A watch that has received nothing for this long asks for progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// A progress request not answered within this is a member that stopped answering.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);

/// One change to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// What the watcher tells the model.
#[derive(Debug, Clone)]
pub enum Update {
    /// The complete content of the prefix at `revision`.
    Snapshot {
        revision: i64,
        kvs: Vec<(String, Vec<u8>)>,
    },
    /// Changes up to `revision`, in order.
    Changes { revision: i64, changes: Vec<Change> },
}

/// Identity of the store a revision belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Store {
    pub cluster_id: u64,
    pub raft_term: u64,
    pub revision: i64,
}

/// A listing at `revision`, waiting for the watch to reach that revision to be compared
/// with what the events built.
struct Verify {
    revision: i64,
    /// key → (mod revision, value)
    kvs: HashMap<String, (i64, Vec<u8>)>,
    reason: &'static str,
    started: std::time::Instant,
}

/// Watches `<prefix>/` and sends [`Update`]s.
pub struct Watcher {
    /// The member watched; replaced by another one after a failure.
    etcd: Member,
    root: String,
    request_timeout: Duration,
    resync: Option<Duration>,
    tx: mpsc::Sender<Update>,
    /// true while a watch stream is established.
    live: watch::Sender<bool>,
    metrics: Option<crate::metrics::Metrics>,
    /// key → mod revision of everything the listings and events delivered so far.
    mirror: HashMap<String, i64>,
    verify: Option<Verify>,
}

impl Watcher {
    pub fn new(
        etcd: Member,
        prefix: &str,
        request_timeout: Duration,
        resync: Option<Duration>,
        tx: mpsc::Sender<Update>,
        live: watch::Sender<bool>,
    ) -> Self {
        Watcher {
            etcd,
            root: registry::key::root_prefix(prefix),
            request_timeout,
            resync,
            tx,
            live,
            metrics: None,
            mirror: HashMap::new(),
            verify: None,
        }
    }

    /// Counts reconnects and resyncs in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count_resync(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.resyncs
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: reason.to_string(),
                })
                .inc();
        }
    }

    /// Runs until `stop` (or until the receiver is gone).
    #[instrument(skip_all, fields(prefix = %self.root))]
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut last: Option<Store> = None;
        let mut relist_reason = "initial";
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Resume from the last revision if the store is the one we know, else re-list.
            let resume = match last {
                Some(known) => match self.store_now().await {
                    Ok(now) if replaced(known, now) => {
                        warn!(?known, ?now, "etcd store replaced (cluster id changed or history went backwards); full resync");
                        relist_reason = "store_replaced";
                        None
                    }
                    Ok(_) => Some(known.revision + 1),
                    Err(e) => {
                        self.failed("cannot reach etcd", &e, &mut backoff, &stop)
                            .await;
                        continue;
                    }
                },
                None => None,
            };
            let start = match resume {
                Some(rev) => rev,
                None => match self.list_entries().await {
                    Ok((store, entries)) => {
                        self.verify = None;
                        self.mirror = entries
                            .iter()
                            .map(|e| (e.key.clone(), e.mod_revision))
                            .collect();
                        let kvs: Vec<(String, Vec<u8>)> =
                            entries.into_iter().map(|e| (e.key, e.value)).collect();
                        info!(
                            revision = store.revision,
                            keys = kvs.len(),
                            reason = relist_reason,
                            "listed registry"
                        );
                        self.count_resync(relist_reason);
                        if self
                            .tx
                            .send(Update::Snapshot {
                                revision: store.revision,
                                kvs,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        last = Some(store);
                        store.revision + 1
                    }
                    Err(e) => {
                        self.failed("cannot list the registry", &e, &mut backoff, &stop)
                            .await;
                        continue;
                    }
                },
            };
            // A resumed watch is checked against a listing (a fresh listing needs none).
            let check = resume.map(|_| "reconnect");
            match self
                .follow(start, check, &mut last, &mut backoff, &stop)
                .await
            {
                Follow::Stop => return,
                Follow::Relist(reason) => {
                    last = None;
                    relist_reason = reason;
                }
                Follow::Reconnect => {
                    if let Some(m) = &self.metrics {
                        m.watch_reconnects.inc();
                    }
                    let delay = backoff.next_delay();
                    // Another member answered: re-watch there at once. The same member
                    // (a lone endpoint, or nobody else answered): back off first.
                    match self.etcd.fail_over_unless(&stop).await {
                        FailOver::Stopped => return,
                        FailOver::Moved => {}
                        FailOver::Stayed => tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        },
                    }
                }
            }
        }
    }

    async fn failed(
        &mut self,
        what: &str,
        e: &etcd_client::Error,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) {
        self.live.send_replace(false);
        let delay = backoff.next_delay();
        warn!(error = %error_chain(e), member = %self.etcd.endpoint(), retry_in = ?delay, "{what}; keeping the last config");
        if self.etcd.fail_over_unless(stop).await == FailOver::Stopped {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// Watches from `start` until something ends the stream; with `check`, verifies the
    /// resumed watch against a listing (for that reason).
    async fn follow(
        &mut self,
        start: i64,
        check: Option<&'static str>,
        last: &mut Option<Store>,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> Follow {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_prev_key()
            .with_progress_notify();
        let mut client = self.etcd.client();
        let (mut requests, mut stream) = match self
            .timed(client.watch(self.root.clone(), Some(opts)))
            .await
        {
            Ok(s) => s.split(),
            Err(e) => {
                self.live.send_replace(false);
                warn!(error = %error_chain(&e), member = %self.etcd.endpoint(), "cannot start the watch; keeping the last config");
                return Follow::Reconnect;
            }
        };
        self.verify = None;
        if let Some(reason) = check {
            self.start_verify(reason).await;
        }
        // Liveness: the last time anything arrived, and an unanswered progress request.
        // A pending verification asks for progress at once (an idle watch reaches the
        // listing's revision only through a progress answer).
        let mut heard = Instant::now();
        if self.verify.is_some() {
            heard -= PROGRESS_EVERY;
        }
        let mut asked: Option<Instant> = None;
        let mut resync = self.resync.map(|d| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            let tick = async {
                match resync.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let check_at = match asked {
                Some(at) => at + PROGRESS_TIMEOUT,
                None => heard + PROGRESS_EVERY,
            };
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => return Follow::Stop,
                m = stream.message() => m,
                _ = tick => {
                    if self.verify.is_none() {
                        debug!("periodic resync");
                        self.start_verify("periodic").await;
                        if asked.is_none() {
                            heard = Instant::now() - PROGRESS_EVERY;
                        }
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(check_at) => {
                    if asked.is_some() {
                        self.live.send_replace(false);
                        warn!(member = %self.etcd.endpoint(), timeout = ?PROGRESS_TIMEOUT, "etcd member stopped answering the watch; moving to another member");
                        return Follow::Reconnect;
                    }
                    let sent = tokio::time::timeout(PROGRESS_TIMEOUT, requests.request_progress()).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        self.live.send_replace(false);
                        warn!(member = %self.etcd.endpoint(), "cannot write to the watch stream; moving to another member");
                        return Follow::Reconnect;
                    }
                    asked = Some(Instant::now());
                    continue;
                }
            };
            heard = Instant::now();
            asked = None;
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.live.send_replace(false);
                    warn!("watch stream closed by etcd; re-watching");
                    return Follow::Reconnect;
                }
                Err(e) => {
                    self.live.send_replace(false);
                    warn!(error = %error_chain(&e), "watch stream failed; re-watching from the last revision");
                    return Follow::Reconnect;
                }
            };
            if resp.canceled() {
                self.live.send_replace(false);
                if resp.compact_revision() > 0 {
                    warn!(
                        compact_revision = resp.compact_revision(),
                        "watch revision compacted; full resync"
                    );
                    return Follow::Relist("compaction");
                }
                warn!(
                    reason = resp.cancel_reason(),
                    "watch cancelled by etcd (no leader?); re-watching"
                );
                return Follow::Reconnect;
            }
            if resp.created() {
                backoff.reset();
                self.live.send_replace(true);
            }
            let header = resp
                .header()
                .map(|h| (h.cluster_id(), h.raft_term(), h.revision()));
            let mut changes = Vec::with_capacity(resp.events().len());
            let mut max_rev = 0;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                // Everything up to the verification's revision has arrived: compare.
                if self
                    .verify
                    .as_ref()
                    .is_some_and(|v| kv.mod_revision() > v.revision)
                {
                    self.finish_verify(&mut changes);
                }
                max_rev = max_rev.max(kv.mod_revision());
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                // Raw event type: 0 put, 1 delete (event_type() panics on anything else).
                match ev.0.r#type {
                    0 => {
                        self.mirror.insert(key.clone(), kv.mod_revision());
                        changes.push(Change::Put {
                            key,
                            value: kv.value().to_vec(),
                        });
                    }
                    1 => {
                        self.mirror.remove(&key);
                        changes.push(Change::Delete { key });
                    }
                    other => warn!(event_type = other, %key, "unknown watch event type; ignored"),
                }
            }
            // A progress answer at ≥ the verification's revision: nothing up to it is
            // still on the way.
            if resp.events().is_empty() && !resp.created() {
                if let (Some(v), Some((_, _, rev))) = (self.verify.as_ref(), header) {
                    if rev >= v.revision {
                        self.finish_verify(&mut changes);
                    }
                }
            }
            if let (Some(store), Some((cluster_id, raft_term, _))) = (last.as_mut(), header) {
                store.cluster_id = cluster_id;
                store.raft_term = store.raft_term.max(raft_term);
                store.revision = store.revision.max(max_rev);
            }
            if !changes.is_empty() {
                let revision = last.map_or(max_rev, |s| s.revision).max(max_rev);
                if self
                    .tx
                    .send(Update::Changes { revision, changes })
                    .await
                    .is_err()
                {
                    return Follow::Stop;
                }
            }
        }
    }

    /// Lists the prefix for a later comparison with what the watch delivers. A listing that
    /// fails is logged; the next re-watch or `--resync` tries again.
    async fn start_verify(&mut self, reason: &'static str) {
        let started = std::time::Instant::now();
        match self.list_entries().await {
            Ok((store, entries)) => {
                self.count_resync(reason);
                self.verify = Some(Verify {
                    revision: store.revision,
                    kvs: entries
                        .into_iter()
                        .map(|e| (e.key, (e.mod_revision, e.value)))
                        .collect(),
                    reason,
                    started,
                });
            }
            Err(e) => {
                warn!(error = %error_chain(&e), member = %self.etcd.endpoint(), reason, "cannot list the registry to verify the watch; trying again at the next re-watch or --resync");
            }
        }
    }

    /// Compares what the events built with the pending listing (the watch has delivered
    /// everything up to its revision) and appends a repair for every difference.
    fn finish_verify(&mut self, changes: &mut Vec<Change>) {
        let Some(v) = self.verify.take() else { return };
        let (puts, deletes) = drift(&self.mirror, &v.kvs);
        let took = v.started.elapsed();
        if puts.is_empty() && deletes.is_empty() {
            debug!(
                revision = v.revision,
                keys = v.kvs.len(),
                reason = v.reason,
                ?took,
                "watch verified against a listing: no drift"
            );
            return;
        }
        if let Some(m) = &self.metrics {
            for (change, n) in [("put", puts.len()), ("delete", deletes.len())] {
                m.drift
                    .get_or_create(&crate::metrics::ChangeLabel {
                        change: change.to_string(),
                    })
                    .inc_by(n as u64);
            }
        }
        warn!(
            revision = v.revision,
            reason = v.reason,
            missed_puts = ?some(&puts),
            missed_deletes = ?some(&deletes),
            "etcd did not deliver every change to the watch (the listing differs from the events); repaired from the listing"
        );
        let mut kvs = v.kvs;
        for key in puts {
            if let Some((rev, value)) = kvs.remove(&key) {
                self.mirror.insert(key.clone(), rev);
                changes.push(Change::Put { key, value });
            }
        }
        for key in deletes {
            self.mirror.remove(&key);
            changes.push(Change::Delete { key });
        }
    }

    /// The whole prefix at the current revision, page by page, with each key's mod revision.
    async fn list_entries(&self) -> Result<(Store, Vec<Entry>), etcd_client::Error> {
        list_root(&self.etcd, &self.root, None, self.request_timeout).await
    }

    /// The current store identity (a count-only read).
    async fn store_now(&self) -> Result<Store, etcd_client::Error> {
        let mut kv = self.etcd.client().kv_client();
        let resp = self
            .timed(kv.get(
                self.root.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ))
            .await?;
        Ok(header_store(resp.header()))
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, etcd_client::Error> {
        registry::etcd::within(self.request_timeout, "etcd request", fut).await
    }
}

/// Connects to `config`'s etcd (retrying while it is unreachable, unless `--once`; fatal on
/// bad credentials or certificates) and follows the registry into `tx` until `stop`.
pub async fn follow(
    config: crate::config::Config,
    tx: mpsc::Sender<Update>,
    live: watch::Sender<bool>,
    metrics: crate::metrics::Metrics,
    stop: CancellationToken,
) -> Result<(), crate::error::Error> {
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

/// One member of `config`'s etcd; `None` when `stop` came first.
pub async fn connect(
    config: &crate::config::Config,
    stop: &CancellationToken,
) -> Result<Option<Member>, crate::error::Error> {
    use registry::etcd::ConnectError;
    let attempt = if config.once {
        config.etcd.connect().await.map(Some)
    } else {
        let waiting = "keeping the last config";
        config
            .etcd
            .connect_retrying(stop, Duration::from_secs(2), waiting)
            .await
    };
    attempt.map_err(|e| match e {
        ConnectError::Fatal(msg) => crate::error::Error::EtcdSetup(msg),
        e @ ConnectError::Unavailable { .. } => crate::error::Error::EtcdUnavailable(e.to_string()),
    })
}

enum Follow {
    Stop,
    /// Re-list, for this reason.
    Relist(&'static str),
    Reconnect,
}

/// What a listing has that the events did not bring (keys missing or at another mod
/// revision: lost puts) and what the events left that the listing lacks (lost deletes),
/// each sorted.
fn drift(
    mirror: &HashMap<String, i64>,
    listing: &HashMap<String, (i64, Vec<u8>)>,
) -> (Vec<String>, Vec<String>) {
    let mut puts: Vec<String> = listing
        .iter()
        .filter(|(k, (rev, _))| mirror.get(*k) != Some(rev))
        .map(|(k, _)| k.clone())
        .collect();
    let mut deletes: Vec<String> = mirror
        .keys()
        .filter(|k| !listing.contains_key(*k))
        .cloned()
        .collect();
    puts.sort();
    deletes.sort();
    (puts, deletes)
}

/// Up to 10 keys, then "… and N more": one readable WARN line even for a large drift.
fn some(keys: &[String]) -> Vec<String> {
    let mut out: Vec<String> = keys.iter().take(10).cloned().collect();
    if keys.len() > 10 {
        out.push(format!("… and {} more", keys.len() - 10));
    }
    out
}

/// A store that is not the continuation of `known`: another cluster, or history that went
/// backwards (an empty etcd started with the same name and URLs keeps the cluster id).
fn replaced(known: Store, now: Store) -> bool {
    now.cluster_id != known.cluster_id
        || now.revision < known.revision
        || now.raft_term < known.raft_term
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_names_lost_puts_and_lost_deletes() {
        let mirror: HashMap<String, i64> = [("/s/a/1", 5), ("/s/a/2", 6), ("/s/a/ghost", 7)]
            .into_iter()
            .map(|(k, r)| (k.to_string(), r))
            .collect();
        let listing: HashMap<String, (i64, Vec<u8>)> =
            [("/s/a/1", 5), ("/s/a/2", 9), ("/s/a/new", 8)]
                .into_iter()
                .map(|(k, r)| (k.to_string(), (r, b"v".to_vec())))
                .collect();
        let (puts, deletes) = drift(&mirror, &listing);
        assert_eq!(puts, vec!["/s/a/2".to_string(), "/s/a/new".to_string()]);
        assert_eq!(deletes, vec!["/s/a/ghost".to_string()]);
        let same: HashMap<String, (i64, Vec<u8>)> = mirror
            .iter()
            .map(|(k, r)| (k.clone(), (*r, Vec::new())))
            .collect();
        assert_eq!(drift(&mirror, &same), (vec![], vec![]));
        let many: Vec<String> = (0..12).map(|i| i.to_string()).collect();
        assert_eq!(some(&many).last().unwrap(), "… and 2 more");
    }

    #[test]
    fn replacement_detection() {
        let known = Store {
            cluster_id: 1,
            raft_term: 5,
            revision: 100,
        };
        assert!(!replaced(
            known,
            Store {
                revision: 120,
                ..known
            }
        ));
        assert!(replaced(
            known,
            Store {
                revision: 3,
                ..known
            }
        ));
        assert!(replaced(
            known,
            Store {
                raft_term: 2,
                revision: 200,
                ..known
            }
        ));
        assert!(replaced(
            known,
            Store {
                cluster_id: 9,
                ..known
            }
        ));
    }
}
