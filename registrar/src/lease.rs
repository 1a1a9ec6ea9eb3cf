//! Lease keeping: grant a lease, put the record under it (without overwriting another live
//! registrar's key), keep it alive every TTL/3, follow the health verdict, re-register
//! after any lease loss, and revoke on shutdown.
//!
//! etcd being down is never fatal here: every failure is logged and retried with capped
//! backoff. Only the caller's cancellation ends [`Registration::run`].

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use registry::etcd::{error_chain, is_lease_not_found, is_refusal, Backoff, FailOver, Member};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

/// Longest wait between attempts while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why a registration attempt did not take.
#[derive(Debug)]
enum RegisterError {
    /// Another live owner holds the key.
    Conflict {
        lease: i64,
        value: String,
    },
    Etcd(etcd_client::Error),
}

impl From<etcd_client::Error> for RegisterError {
    fn from(e: etcd_client::Error) -> Self {
        RegisterError::Etcd(e)
    }
}

/// How a kept session ended.
enum SessionEnd {
    Shutdown,
    LeaseLost,
}

/// One instance's registration in etcd.
pub struct Registration {
    /// The etcd member we talk to; replaced by another one when a call times out.
    etcd: Member,
    key: String,
    value: String,
    ttl: i64,
    request_timeout: Duration,
    health: watch::Receiver<bool>,
    /// The lease of our previous registration: a key still held by it is ours to take over.
    previous_lease: Option<i64>,
    /// Published: whether the key is currently in etcd under our lease.
    registered: watch::Sender<bool>,
    metrics: crate::metrics::Metrics,
}

impl Registration {
    /// A registration of `value` under `key`; nothing is written until [`run`](Self::run).
    pub fn new(
        etcd: Member,
        key: String,
        value: String,
        ttl: i64,
        request_timeout: Duration,
        health: watch::Receiver<bool>,
        registered: watch::Sender<bool>,
    ) -> Self {
        Registration {
            etcd,
            key,
            value,
            ttl,
            request_timeout,
            health,
            previous_lease: None,
            registered,
            metrics: crate::metrics::Metrics::unregistered(),
        }
    }

    /// Records into `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Keeps the instance registered until `stop`, then revokes the lease. Ends early only
    /// when etcd refuses these credentials (permission denied, authentication failed):
    /// retrying cannot fix that.
    #[instrument(skip_all, fields(key = %self.key))]
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), String> {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        loop {
            // Register only while healthy.
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = self.health.wait_for(|h| *h) => if r.is_err() { return Ok(()) },
            }
            let started = Instant::now();
            let lease = match self.register().await {
                Ok(lease) => lease,
                Err(RegisterError::Conflict { lease, value }) => {
                    error!(
                        holder_lease = format_args!("{lease:x}"),
                        holder = %value,
                        "CONFLICT: another live registrar holds this key; not overwriting it. \
                         Give each instance a unique --id. Retrying until the other lease ends."
                    );
                    if sleep_or_stop(Duration::from_secs(self.ttl as u64), &stop).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(RegisterError::Etcd(e)) if is_refusal(&e) => {
                    let msg = format!("etcd refused the registration: {}", error_chain(&e));
                    error!(error = %msg, "check --user and its role: it needs write access to the key");
                    return Err(msg);
                }
                Err(RegisterError::Etcd(e)) => {
                    let delay = backoff.next_delay();
                    warn!(error = %error_chain(&e), member = %self.etcd.endpoint(), retry_in = ?delay, "registration failed; trying another etcd member");
                    if self.etcd.fail_over_unless(&stop).await == FailOver::Stopped
                        || sleep_or_stop(delay, &stop).await
                    {
                        return Ok(());
                    }
                    continue;
                }
            };
            backoff.reset();
            info!(
                lease = format_args!("{lease:x}"),
                ttl = self.ttl,
                took = ?started.elapsed(),
                "registered"
            );
            self.registered.send_replace(true);
            self.previous_lease = Some(lease);
            let end = self.keep(lease, &stop).await;
            self.registered.send_replace(false);
            match end {
                SessionEnd::Shutdown => {
                    self.revoke(lease).await;
                    return Ok(());
                }
                SessionEnd::LeaseLost => {
                    warn!(
                        lease = format_args!("{lease:x}"),
                        "lease lost; registering again"
                    );
                }
            }
        }
    }

    /// Grants a lease and creates the key under it, unless another owner holds the key.
    async fn register(&mut self) -> Result<i64, RegisterError> {
        let grant = self
            .timed(async {
                let mut c = self.etcd.client();
                c.lease_grant(self.ttl, None).await
            })
            .await?;
        let lease = grant.id();
        self.metrics.lease_grants.inc();
        match self.put_if_ours(lease).await {
            Ok(()) => Ok(lease),
            Err(e) => {
                // Do not leak the lease we just granted.
                let mut c = self.etcd.client();
                let _ = tokio::time::timeout(self.request_timeout, c.lease_revoke(lease)).await;
                Err(e)
            }
        }
    }

    /// Creates the key under `lease` if it is absent, or takes it over if it is held by
    /// `lease` itself or by our previous lease. Anything else is a conflict.
    async fn put_if_ours(&self, lease: i64) -> Result<(), RegisterError> {
        let put = || {
            TxnOp::put(
                self.key.clone(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![put()])
            .or_else(vec![TxnOp::get(self.key.clone(), None)]);
        let resp = self.timed(self.etcd.client().kv_client().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let Some(kv) = existing else {
            // Deleted between compare and get: try again on the next round.
            return Err(RegisterError::Conflict {
                lease: 0,
                value: "(key vanished during registration)".into(),
            });
        };
        let holder = kv.lease();
        if holder == lease || Some(holder) == self.previous_lease {
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    self.key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then(vec![put()]);
            let resp = self.timed(self.etcd.client().kv_client().txn(txn)).await?;
            if resp.succeeded() {
                debug!("took over our own previous registration");
                return Ok(());
            }
        }
        Err(RegisterError::Conflict {
            lease: holder,
            value: String::from_utf8_lossy(kv.value())
                .chars()
                .take(200)
                .collect(),
        })
    }

    /// Keeps `lease` alive and follows the health verdict until the lease is lost or `stop`.
    async fn keep(&mut self, lease: i64, stop: &CancellationToken) -> SessionEnd {
        let ttl = Duration::from_secs(self.ttl as u64);
        let period = ttl / 3;
        // Until etcd confirms otherwise, the lease is alive for at most one TTL.
        let mut expires = Instant::now() + ttl;
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut key_present = true;
        let mut want_present = *self.health.borrow_and_update();
        let mut next_keep_alive = Instant::now() + period;
        let mut next_presence_try = Instant::now();
        let mut overdue_warned = false;
        loop {
            let wake = if want_present != key_present {
                next_keep_alive.min(next_presence_try)
            } else {
                next_keep_alive
            };
            tokio::select! {
                _ = stop.cancelled() => return SessionEnd::Shutdown,
                _ = tokio::time::sleep_until(wake) => {}
                changed = self.health.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Shutdown;
                    }
                    want_present = *self.health.borrow_and_update();
                }
            }
            if want_present != key_present && Instant::now() >= next_presence_try {
                match self.set_presence(lease, want_present).await {
                    Ok(()) => {
                        key_present = want_present;
                        self.registered.send_replace(key_present);
                        info!(registered = key_present, "followed health change");
                    }
                    Err(RegisterError::Etcd(e)) if is_lease_not_found(&e) => {
                        return SessionEnd::LeaseLost
                    }
                    Err(e) => {
                        warn!(error = ?e, "could not follow health change; retrying");
                        next_presence_try = Instant::now() + Duration::from_millis(500);
                    }
                }
            }
            if Instant::now() < next_keep_alive {
                continue;
            }
            match self.keep_alive_once(lease, &mut stream).await {
                Ok(remaining) if remaining > 0 => {
                    if overdue_warned {
                        overdue_warned = false;
                        info!(member = %self.etcd.endpoint(), "keep-alive answered again; the lease was kept");
                    }
                    expires = Instant::now() + Duration::from_secs(remaining as u64);
                    next_keep_alive = Instant::now() + period;
                }
                Ok(_) => return SessionEnd::LeaseLost,
                Err(e) if is_lease_not_found(&e) => return SessionEnd::LeaseLost,
                Err(e) => {
                    stream = None;
                    self.metrics.keepalive_failures.inc();
                    let failed_on = self.etcd.endpoint();
                    // Past our own estimate of the expiry the lease may still be alive: a
                    // newly elected leader restarts every lease's TTL. Only etcd's answer
                    // (TTL 0 or "lease not found") ends this lease.
                    if Instant::now() >= expires && !overdue_warned {
                        overdue_warned = true;
                        warn!(error = %error_chain(&e), member = %failed_on, "no keep-alive answered for longer than the TTL; the key may have expired");
                    } else {
                        debug!(error = %error_chain(&e), member = %failed_on, "keep-alive failed; trying another etcd member");
                    }
                    // Straight away when we moved to another member; a short pause when
                    // the same member is all there is.
                    next_keep_alive = match self.etcd.fail_over_unless(stop).await {
                        FailOver::Stopped => return SessionEnd::Shutdown,
                        FailOver::Moved => Instant::now(),
                        FailOver::Stayed => Instant::now() + Duration::from_millis(200).min(period),
                    };
                }
            }
        }
    }

    /// One keep-alive round trip; returns the TTL etcd granted (0 = lease gone).
    async fn keep_alive_once(
        &self,
        lease: i64,
        stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    ) -> Result<i64, etcd_client::Error> {
        let round = async {
            if stream.is_none() {
                // Opening the stream already waits for etcd's first answer (gRPC sends the
                // response headers with it): it is part of the round trip.
                let mut c = self.etcd.client();
                *stream = Some(c.lease_keep_alive(lease).await?);
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                return Err(etcd_client::Error::LeaseKeepAliveError("no stream".into()));
            };
            keeper.keep_alive().await?;
            match responses.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "keep-alive stream closed".into(),
                )),
            }
        };
        registry::etcd::within(self.call_limit(), "keep-alive", round).await
    }

    /// The bound of every etcd call: the request timeout, but never more than the
    /// keep-alive period (TTL/3), so a hung member cannot eat the lease's TTL in one call
    /// before we move to another member.
    fn call_limit(&self) -> Duration {
        self.request_timeout
            .min(Duration::from_secs(self.ttl as u64) / 3)
    }

    /// Puts the key back (healthy) or deletes it while keeping the lease (unhealthy).
    async fn set_presence(&self, lease: i64, present: bool) -> Result<(), RegisterError> {
        if present {
            return self.put_if_ours(lease).await;
        }
        // Delete only if the key is still ours.
        let txn = Txn::new()
            .when(vec![Compare::lease(
                self.key.clone(),
                CompareOp::Equal,
                lease,
            )])
            .and_then(vec![TxnOp::delete(self.key.clone(), None)]);
        self.timed(self.etcd.client().kv_client().txn(txn)).await?;
        Ok(())
    }

    async fn revoke(&self, lease: i64) {
        let mut c = self.etcd.client();
        match self.timed(c.lease_revoke(lease)).await {
            Ok(_) => info!(
                lease = format_args!("{lease:x}"),
                "lease revoked; deregistered"
            ),
            Err(e) if is_lease_not_found(&e) => info!("lease already gone; deregistered"),
            Err(e) => warn!(
                error = %error_chain(&e),
                "could not revoke the lease; the key expires after the TTL"
            ),
        }
    }

    /// Bounds one etcd call by the request timeout.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, etcd_client::Error> {
        let started = std::time::Instant::now();
        let result = registry::etcd::within(self.call_limit(), "etcd request", fut).await;
        self.metrics
            .etcd_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// Sleeps `d` unless `stop` fires first; returns true when stopped.
pub async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
