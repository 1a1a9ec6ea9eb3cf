//! Lease keeping: grant a lease, put the record under it (without overwriting another live
//! registrar's key), keep it alive every TTL/3, follow the health verdict, re-register
//! after any lease loss, and revoke on shutdown.
//!
//! etcd being down is never fatal here: every failure is logged and retried with capped
//! backoff. Only the caller's cancellation ends [`Registration::run`].

use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, Txn, TxnOp};
use registry::etcd::{
    error_chain, is_lease_not_found, is_refusal, Backoff, Claim, FailOver, Member,
};
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
        key: String,
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

/// One instance's registration in etcd: one record per service (`--register`), all under
/// one lease, so they come and go together.
pub struct Registration {
    /// The etcd member we talk to; replaced by another one when a call times out.
    etcd: Member,
    /// (key, value) of each record.
    records: Vec<(String, String)>,
    ttl: i64,
    request_timeout: Duration,
    health: watch::Receiver<bool>,
    /// The lease of our previous registration: a key still held by it is ours to take over.
    previous_lease: Option<i64>,
    /// Published: whether the key is currently in etcd under our lease.
    registered: watch::Sender<bool>,
    metrics: crate::metrics::Metrics,
    /// Put the record again now (SIGHUP): repairs a key deleted or edited by hand.
    refresh: std::sync::Arc<tokio::sync::Notify>,
}

impl Registration {
    /// A registration of each `(key, value)` of `records` under one lease; nothing is
    /// written until [`run`](Self::run).
    pub fn new(
        etcd: Member,
        records: Vec<(String, String)>,
        ttl: i64,
        request_timeout: Duration,
        health: watch::Receiver<bool>,
        registered: watch::Sender<bool>,
    ) -> Self {
        Registration {
            etcd,
            records,
            ttl,
            request_timeout,
            health,
            previous_lease: None,
            registered,
            metrics: crate::metrics::Metrics::unregistered(),
            refresh: Default::default(),
        }
    }

    /// Each notification of `refresh` puts the record again (while it should be there).
    pub fn with_refresh(mut self, refresh: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.refresh = refresh;
        self
    }

    /// Records into `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Keeps the instance registered until `stop`, then revokes the lease. Ends early only
    /// when etcd refuses these credentials (permission denied, authentication failed):
    /// retrying cannot fix that.
    #[instrument(skip_all, fields(key = %self.keys()))]
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
                Err(RegisterError::Conflict { key, lease, value }) => {
                    error!(
                        %key,
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
                Err(RegisterError::Etcd(e)) if after_failure(&e) == Next::GiveUp => {
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

    /// The keys, comma-separated (for logs).
    fn keys(&self) -> String {
        let keys: Vec<&str> = self.records.iter().map(|(k, _)| k.as_str()).collect();
        keys.join(",")
    }

    /// Creates each key under `lease` if it is absent, or takes it over if it is held by
    /// `lease` itself or by our previous lease. Anything else is a conflict (the keys put
    /// before it stay under `lease`: a caller that gives up revokes it).
    async fn put_if_ours(&self, lease: i64) -> Result<(), RegisterError> {
        for (key, value) in &self.records {
            self.put_one_if_ours(key, value, lease).await?;
        }
        Ok(())
    }

    async fn put_one_if_ours(
        &self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<(), RegisterError> {
        let previous = self.previous_lease;
        let ours = |kv: &etcd_client::KeyValue| kv.lease() == lease || Some(kv.lease()) == previous;
        let claim = registry::etcd::put_unless_held(
            &self.etcd.client(),
            key,
            value,
            lease,
            self.request_timeout,
            ours,
        )
        .await?;
        match claim {
            Claim::Put => Ok(()),
            // Deleted between compare and get: try again on the next round.
            Claim::Vanished => Err(RegisterError::Conflict {
                key: key.to_string(),
                lease: 0,
                value: "(key vanished during registration)".into(),
            }),
            Claim::Held(kv) => Err(RegisterError::Conflict {
                key: key.to_string(),
                lease: kv.lease(),
                value: String::from_utf8_lossy(kv.value())
                    .chars()
                    .take(200)
                    .collect(),
            }),
        }
    }

    /// Keeps `lease` alive and follows the health verdict until the lease is lost or `stop`.
    async fn keep(&mut self, lease: i64, stop: &CancellationToken) -> SessionEnd {
        let mut keeper = Keeper::new(
            lease,
            Duration::from_secs(self.ttl as u64),
            self.request_timeout,
            self.metrics.keepalive_failures.clone(),
        )
        .timing(self.metrics.keepalive_seconds.clone());
        let mut key_present = true;
        let mut want_present = *self.health.borrow_and_update();
        let mut next_presence_try = Instant::now();
        loop {
            let wake = if want_present != key_present {
                keeper.due().min(next_presence_try)
            } else {
                keeper.due()
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
                _ = self.refresh.notified() => {
                    if key_present {
                        match self.put_if_ours(lease).await {
                            Ok(()) => info!(lease = format_args!("{lease:x}"), "record put again"),
                            Err(RegisterError::Etcd(e)) if is_lease_not_found(&e) => {
                                return SessionEnd::LeaseLost
                            }
                            Err(e) => warn!(error = ?e, "could not put the record again"),
                        }
                    }
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
            if Instant::now() < keeper.due() {
                continue;
            }
            match keeper.round(&mut self.etcd, stop).await {
                Kept::Alive | Kept::Failed => {}
                Kept::Lost => return SessionEnd::LeaseLost,
                Kept::Stopped => return SessionEnd::Shutdown,
            }
        }
    }

    /// The bound of every etcd call: the request timeout, but never more than the
    /// keep-alive period (TTL/3), so a hung member cannot eat the lease's TTL in one call
    /// before we move to another member.
    fn call_limit(&self) -> Duration {
        call_limit(self.request_timeout, Duration::from_secs(self.ttl as u64))
    }

    /// Puts the key back (healthy) or deletes it while keeping the lease (unhealthy).
    async fn set_presence(&self, lease: i64, present: bool) -> Result<(), RegisterError> {
        if present {
            return self.put_if_ours(lease).await;
        }
        // Delete each key only if it is still ours.
        for (key, _) in &self.records {
            let txn = Txn::new()
                .when(vec![Compare::lease(key.clone(), CompareOp::Equal, lease)])
                .and_then(vec![TxnOp::delete(key.clone(), None)]);
            self.timed(self.etcd.client().kv_client().txn(txn)).await?;
        }
        Ok(())
    }

    async fn revoke(&self, lease: i64) {
        // The mark first: load balancers drain the instance at once and take its going
        // for a deliberate stop, not a lost lease. Without it (etcd unreachable), the
        // revoke below still deregisters.
        let mut c = self.etcd.client();
        for (key, value) in &self.records {
            match registry::etcd::mark_leaving(&c, key, value, lease, self.call_limit()).await {
                Ok(true) => debug!(%key, "record marked leaving"),
                Ok(false) => debug!(%key, "record not ours any more; not marked leaving"),
                Err(e) => {
                    debug!(%key, error = %error_chain(&e), "could not mark the record leaving");
                    // etcd is not answering: do not spend a call limit per record.
                    break;
                }
            }
        }
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

/// When to send a lease's keep-alives, and whether a missing answer has been missing for
/// longer than the lease can live. Pure: the caller passes the clock in.
#[derive(Debug, Clone)]
struct Schedule {
    /// TTL/3: three chances to renew before the lease can expire.
    period: Duration,
    /// Our estimate of the lease's expiry: one TTL after etcd last confirmed it.
    expires: Instant,
    /// When the next keep-alive is due.
    next: Instant,
    /// The "may have expired" warning was given and not yet taken back.
    overdue_warned: bool,
}

impl Schedule {
    /// A lease granted at `now`.
    fn new(ttl: Duration, now: Instant) -> Self {
        let period = ttl / 3;
        Schedule {
            period,
            expires: now + ttl,
            next: now + period,
            overdue_warned: false,
        }
    }

    /// etcd answered at `now` with `remaining` TTL. True when this takes back an earlier
    /// "may have expired" warning.
    fn answered(&mut self, now: Instant, remaining: Duration) -> bool {
        self.expires = now + remaining;
        self.next = now + self.period;
        std::mem::take(&mut self.overdue_warned)
    }

    /// A keep-alive failed at `now`: true the first time that is past our estimate of the
    /// expiry (warn once). Past it the lease may still be alive — a newly elected leader
    /// restarts every lease's TTL — so only etcd's answer (TTL 0, "lease not found") ends it.
    fn overdue(&mut self, now: Instant) -> bool {
        let first = now >= self.expires && !self.overdue_warned;
        self.overdue_warned |= first;
        first
    }

    /// After a failure: the next try straight away when we moved to another member, after
    /// a short pause (200 ms, at most a period) when the same member is all there is.
    fn failed(&mut self, now: Instant, moved: bool) {
        self.next = if moved {
            now
        } else {
            now + Duration::from_millis(200).min(self.period)
        };
    }
}

/// Keeps one lease alive: a keep-alive every TTL/3 on a reused stream (one round trip
/// each), another etcd member after a failure, "may have expired" warned once (and taken
/// back when etcd answers again). The one lease keeper of both front ends: the
/// registrar's session ([`Registration`]) and `registrar docker`'s lease for every
/// container it registers.
pub struct Keeper {
    pub lease: i64,
    schedule: Schedule,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// The bound of one round trip.
    limit: Duration,
    failures: prometheus_client::metrics::counter::Counter,
    /// Answered round trips' durations, when asked for ([`Keeper::timing`]).
    round_trips: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// How a keep-alive round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// etcd renewed the lease.
    Alive,
    /// The lease is gone (TTL 0 or "lease not found"): register again under a new one.
    Lost,
    /// No answer; tried again at [`Keeper::due`] (on another member when there is one).
    Failed,
    /// `stop` fired while moving to another member.
    Stopped,
}

impl Keeper {
    /// Keeps `lease` (granted now with `ttl`) alive, each round bounded by
    /// `request_timeout` but never more than TTL/3 (a hung member must not eat the lease's
    /// TTL in one call), counting failed rounds in `failures`.
    pub fn new(
        lease: i64,
        ttl: Duration,
        request_timeout: Duration,
        failures: prometheus_client::metrics::counter::Counter,
    ) -> Keeper {
        Keeper {
            lease,
            schedule: Schedule::new(ttl, Instant::now()),
            stream: None,
            limit: call_limit(request_timeout, ttl),
            failures,
            round_trips: None,
        }
    }

    /// Observes each answered round trip's duration into `h`.
    pub fn timing(mut self, h: prometheus_client::metrics::histogram::Histogram) -> Keeper {
        self.round_trips = Some(h);
        self
    }

    /// When the next round is due.
    pub fn due(&self) -> Instant {
        self.schedule.next
    }

    /// One keep-alive round through `etcd` (moved to another member after a failure).
    pub async fn round(&mut self, etcd: &mut Member, stop: &CancellationToken) -> Kept {
        let started = Instant::now();
        let result = self.once(etcd).await;
        if let (Ok(_), Some(h)) = (&result, &self.round_trips) {
            h.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(remaining) if remaining > 0 => {
                let remaining = Duration::from_secs(remaining as u64);
                if self.schedule.answered(Instant::now(), remaining) {
                    info!(member = %etcd.endpoint(), "keep-alive answered again; the lease was kept");
                }
                Kept::Alive
            }
            Ok(_) => Kept::Lost,
            Err(e) if is_lease_not_found(&e) => Kept::Lost,
            Err(e) => {
                self.stream = None;
                self.failures.inc();
                let failed_on = etcd.endpoint();
                if self.schedule.overdue(Instant::now()) {
                    warn!(error = %error_chain(&e), member = %failed_on, "no keep-alive answered for longer than the TTL; the key may have expired");
                } else {
                    debug!(error = %error_chain(&e), member = %failed_on, "keep-alive failed; trying another etcd member");
                }
                match etcd.fail_over_unless(stop).await {
                    FailOver::Stopped => Kept::Stopped,
                    moved => {
                        self.schedule
                            .failed(Instant::now(), moved == FailOver::Moved);
                        Kept::Failed
                    }
                }
            }
        }
    }

    /// One keep-alive round trip; returns the TTL etcd granted (0 = lease gone).
    async fn once(&mut self, etcd: &Member) -> Result<i64, etcd_client::Error> {
        let (lease, stream) = (self.lease, &mut self.stream);
        let round = async {
            if stream.is_none() {
                // Opening the stream already waits for etcd's first answer (gRPC sends the
                // response headers with it): it is part of the round trip.
                let mut c = etcd.client();
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
        registry::etcd::within(self.limit, "keep-alive", round).await
    }
}

/// What a failed registration leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// etcd refused these credentials or this request: retrying cannot help.
    GiveUp,
    /// Anything else (unreachable, timeout, no leader): another member, capped backoff.
    Retry,
}

fn after_failure(e: &etcd_client::Error) -> Next {
    if is_refusal(e) {
        Next::GiveUp
    } else {
        Next::Retry
    }
}

/// The bound of one etcd call under a lease of `ttl`: `request_timeout`, but never more
/// than TTL/3.
fn call_limit(request_timeout: Duration, ttl: Duration) -> Duration {
    request_timeout.min(ttl / 3)
}

/// Sleeps `d` unless `stop` fires first; returns true when stopped.
pub async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    /// Keep-alives every TTL/3 while etcd answers; the estimate of the expiry follows each
    /// answer's TTL.
    #[tokio::test(start_paused = true)]
    async fn keep_alives_go_every_third_of_the_ttl() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TTL, t0);
        assert_eq!(s.next, t0 + Duration::from_secs(1));
        for round in 1..=5u32 {
            tokio::time::sleep_until(s.next).await;
            assert_eq!(Instant::now(), t0 + Duration::from_secs(round.into()));
            assert!(!s.answered(Instant::now(), TTL));
            assert!(!s.overdue(Instant::now()));
        }
        assert_eq!(s.expires, t0 + Duration::from_secs(8));
    }

    /// Failures retry at once after a fail-over and after 200 ms on the same member; the
    /// "may have expired" warning comes once, only past the TTL, and is taken back by the
    /// next answer.
    #[tokio::test(start_paused = true)]
    async fn failures_retry_and_warn_once_past_the_ttl() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TTL, t0);
        tokio::time::sleep_until(s.next).await;
        // The member froze: a fail-over, then the only other member fails too.
        assert!(!s.overdue(Instant::now()));
        s.failed(Instant::now(), true);
        assert_eq!(s.next, Instant::now());
        let mut warnings = 0;
        while Instant::now() < t0 + Duration::from_secs(6) {
            tokio::time::sleep_until(s.next).await;
            warnings += u32::from(s.overdue(Instant::now()));
            s.failed(Instant::now(), false);
            assert_eq!(s.next - Instant::now(), Duration::from_millis(200));
        }
        assert_eq!(warnings, 1, "warned once past the TTL");
        // A new leader restarted the lease: answered, the warning is taken back once.
        assert!(s.answered(Instant::now(), TTL));
        assert!(!s.answered(Instant::now(), TTL));
        // A short TTL: the pause after a failure is at most a period.
        let mut short = Schedule::new(Duration::from_millis(300), Instant::now());
        short.failed(Instant::now(), false);
        assert_eq!(short.next - Instant::now(), Duration::from_millis(100));
    }

    /// Refusals end the registration; everything else is retried.
    #[test]
    fn refusals_give_up_the_rest_is_retried() {
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        let denied = status(
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        assert_eq!(after_failure(&denied), Next::GiveUp);
        let auth = status(
            tonic::Code::InvalidArgument,
            "etcdserver: authentication failed",
        );
        assert_eq!(after_failure(&auth), Next::GiveUp);
        for retry in [
            status(tonic::Code::Unavailable, "etcdserver: no leader"),
            status(tonic::Code::DeadlineExceeded, "context deadline exceeded"),
            etcd_client::Error::IoError(std::io::Error::other("connection refused")),
        ] {
            assert_eq!(after_failure(&retry), Next::Retry, "{retry}");
        }
    }

    /// Capped exponential backoff between registration attempts, reset by a success.
    #[tokio::test(start_paused = true)]
    async fn registration_attempts_back_off_to_a_second() {
        let mut b = Backoff::new(MAX_BACKOFF);
        let t0 = Instant::now();
        let mut at = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep(b.next_delay()).await;
            at.push((Instant::now() - t0).as_millis());
        }
        assert_eq!(at, [100, 300, 700, 1500, 2500, 3500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
