//! etcd connection flags in etcdctl's vocabulary (`--endpoints`, `--user`,
//! `--password-file`, `--cacert`, `--cert`, `--key`), a connect that proves a member
//! answers and tells fatal problems (bad credentials, untrusted certificate) from transient
//! ones (etcd not up yet), and [`Member`]: a client bound to one member at a time that
//! moves to another member that answers when a call times out.
//!
//! Why one member at a time: etcd-client's balanced channel picks an endpoint per call and
//! keeps picking a frozen (SIGSTOPped, partitioned) member, whose TCP connection looks
//! healthy, so a keep-alive or a watch can sit on it until the lease is gone. Callers bound
//! every call and, on a timeout, [`Member::fail_over`] to whichever other member answers
//! first — the same thing etcd's Go client does with its health-checking balancer.
//!
//! HTTP/2 pings: etcd (3.4 and 3.5) refuses pings closer than 5 s apart, and any ping on a
//! connection without streams, with GOAWAY `too_many_pings` after two strikes. Our pings
//! are at least [`KEEPALIVE_INTERVAL`] apart and only while a stream is open; liveness
//! comes from bounded calls and watch progress requests instead.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use thiserror::Error;

use crate::duration::parse_duration;

/// HTTP/2 keep-alive ping interval (counted from the last frame read, so a connection that
/// carries answers never pings). etcd's `--grpc-keepalive-min-time` defaults to 5 s and a
/// client pinging faster is disconnected; 10 s leaves room for timer jitter.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive ping timeout.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one failover round waits for the other members to answer (connect +
/// `status`): generous for a member that works, short next to a lease's TTL.
pub const PROBE_ROUND: Duration = Duration::from_secs(1);

/// Connection flags shared by both binaries (flatten into a clap parser).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (all members of the cluster).
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// etcd user name for authentication.
    #[arg(long, env = "ETCD_USER")]
    pub user: Option<String>,

    /// File holding the etcd password (first line). Preferred over --password / ETCD_PASSWORD.
    #[arg(long, env = "ETCD_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// etcd password. Prefer --password-file or the ETCD_PASSWORD environment variable:
    /// a flag is visible to every user of the machine in the process list.
    #[arg(long, env = "ETCD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// CA bundle to verify the etcd server certificate (enables TLS; use https:// endpoints).
    #[arg(long, env = "ETCD_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate for TLS client authentication (with --key).
    #[arg(long, env = "ETCD_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Client private key for TLS client authentication (with --cert).
    #[arg(long, env = "ETCD_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Timeout for connecting to etcd and for each request.
    #[arg(long, env = "ETCD_DIAL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
}

/// Why connecting failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Bad flags, unreadable files, bad credentials, untrusted certificate: retrying will
    /// not help, the operator must fix something.
    #[error("{0}")]
    Fatal(String),
    /// etcd is not reachable (yet): retry with backoff.
    #[error("etcd unreachable at {endpoints}: {message}")]
    Unavailable { endpoints: String, message: String },
}

impl EtcdArgs {
    /// Endpoints joined for messages.
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }

    /// Checks the flags and reads the files they name; called once at start-up so a bad
    /// flag is a usage error, not a retry loop.
    pub fn connect_options(&self) -> Result<ConnectOptions, ConnectError> {
        if self.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(ConnectError::Fatal("--endpoints is empty".into()));
        }
        let mut opts = ConnectOptions::new()
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            // A ping on a connection without streams is a strike for etcd whatever its
            // interval (grpc-go: PermitWithoutStream = false).
            .with_keep_alive_while_idle(false)
            .with_connect_timeout(self.dial_timeout)
            .with_require_leader(true);

        let password = match (&self.password_file, &self.password) {
            (Some(file), _) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| {
                        ConnectError::Fatal(format!(
                            "cannot read --password-file {}: {e}",
                            file.display()
                        ))
                    })?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        match (&self.user, password) {
            (Some(user), Some(pw)) => {
                opts = opts
                    .with_user(user.clone(), pw)
                    .with_auto_token_refresh(true)
            }
            (Some(_), None) => {
                return Err(ConnectError::Fatal(
                    "--user needs a password: --password-file FILE or ETCD_PASSWORD".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ConnectError::Fatal(
                    "a password was given without --user".into(),
                ))
            }
            (None, None) => {}
        }

        if self.cacert.is_some() || self.cert.is_some() || self.key.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.cacert {
                tls = tls.ca_certificate(Certificate::from_pem(read_file("--cacert", ca)?));
            }
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read_file("--cert", cert)?,
                        read_file("--key", key)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(ConnectError::Fatal(
                        "--cert and --key must be given together".into(),
                    ))
                }
            }
            if self.endpoints.iter().any(|e| e.starts_with("http://")) {
                return Err(ConnectError::Fatal(
                    "TLS options given but an endpoint uses http://; use https://".into(),
                ));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    /// Connects, retrying with capped backoff (100 ms … `max_backoff`) while etcd is
    /// unreachable and logging each failure with `waiting` (what the caller does
    /// meanwhile). `Ok(None)` when `stop` fires first; fatal setup errors are returned.
    pub async fn connect_retrying(
        &self,
        stop: &tokio_util::sync::CancellationToken,
        max_backoff: Duration,
        waiting: &str,
    ) -> Result<Option<Member>, ConnectError> {
        let mut backoff = Backoff::new(max_backoff);
        loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                r = self.connect() => r,
            };
            match attempt {
                Ok(m) => {
                    tracing::info!(endpoint = %m.endpoint(), endpoints = %self.endpoints_display(), "connected to etcd");
                    return Ok(Some(m));
                }
                Err(e @ ConnectError::Fatal(_)) => return Err(e),
                Err(e @ ConnectError::Unavailable { .. }) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "etcd not reachable; {waiting}");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Connects to the first member that answers a `status` call (all endpoints are asked
    /// at once) within `--dial-timeout`. `Client::connect` alone is lazy and proves nothing.
    pub async fn connect(&self) -> Result<Member, ConnectError> {
        let opts = self.connect_options()?;
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let client = first_answering(&endpoints, &opts, self.dial_timeout).await?;
        Ok(Member {
            endpoints,
            opts,
            dial_timeout: self.dial_timeout,
            client: client.0,
            endpoint: client.1,
        })
    }
}

/// A client connected to one etcd member, able to move to another one.
#[derive(Clone)]
pub struct Member {
    endpoints: Vec<String>,
    opts: ConnectOptions,
    dial_timeout: Duration,
    client: Client,
    endpoint: String,
}

impl Member {
    /// The client for the current member (cheap to clone: one shared HTTP/2 connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The endpoint of the current member.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Moves to another member: every other endpoint is asked at once and the first to
    /// answer is taken. While none does (e.g. all say "no leader" during an election), they
    /// are asked again, in rounds of at most [`PROBE_ROUND`], for up to `--dial-timeout`:
    /// a frozen current member is never waited on while the others elect a leader. Then,
    /// as a last resort (and straight away for a single endpoint), every endpoint is asked,
    /// the current one too.
    pub async fn fail_over(&mut self) -> Result<(), ConnectError> {
        let others: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| **e != self.endpoint)
            .cloned()
            .collect();
        let deadline = tokio::time::Instant::now() + self.dial_timeout;
        let mut found = None;
        while !others.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Short rounds: a round lasts until every member answered or its bound passed,
            // and a frozen member never answers, so one long round would hide a member
            // that starts answering a moment later (a new leader elected).
            match first_answering(&others, &self.opts, left.min(PROBE_ROUND)).await {
                Ok(f) => {
                    found = Some(f);
                    break;
                }
                Err(ConnectError::Fatal(m)) => return Err(ConnectError::Fatal(m)),
                Err(_) if left.is_zero() => break,
                Err(_) => {
                    let pause = Duration::from_millis(200);
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause))
                        .await;
                }
            }
        }
        let found = match found {
            Some(f) => f,
            None => first_answering(&self.endpoints, &self.opts, self.dial_timeout).await?,
        };
        if found.1 != self.endpoint {
            tracing::info!(from = %self.endpoint, to = %found.1, "moved to another etcd member");
        }
        (self.client, self.endpoint) = found;
        Ok(())
    }

    /// [`fail_over`](Self::fail_over) for retry loops, unless `stop` fires first. Not
    /// finding another member is only logged (DEBUG): the caller's loop retries, and reports
    /// the failure that brought it here.
    pub async fn fail_over_unless(
        &mut self,
        stop: &tokio_util::sync::CancellationToken,
    ) -> FailOver {
        let before = self.endpoint.clone();
        tokio::select! {
            _ = stop.cancelled() => FailOver::Stopped,
            r = self.fail_over() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "no other etcd member answered");
                }
                if self.endpoint == before { FailOver::Stayed } else { FailOver::Moved }
            }
        }
    }
}

/// How [`Member::fail_over_unless`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOver {
    /// On another member now: retry at once.
    Moved,
    /// Still on the same member (a lone endpoint, or no other answered): back off first.
    Stayed,
    /// The stop token fired.
    Stopped,
}

/// Asks every endpoint at once (connect + `status`, bounded by `limit`) and returns the
/// first that answers. All failing: fatal if any failure was fatal (credentials,
/// certificates), else unavailable.
async fn first_answering(
    endpoints: &[String],
    opts: &ConnectOptions,
    limit: Duration,
) -> Result<(Client, String), ConnectError> {
    let display = endpoints.join(",");
    if endpoints.is_empty() {
        return Err(ConnectError::Unavailable {
            endpoints: display,
            message: "no endpoint to try".into(),
        });
    }
    let mut probes = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        let opts = opts.clone();
        probes.spawn(async move {
            let attempt = async {
                let mut client = Client::connect([endpoint.as_str()], Some(opts)).await?;
                // With --user, connect has already authenticated; status proves the member
                // answers (and, with require-leader, that it has a leader).
                client.status().await?;
                Ok::<_, etcd_client::Error>(client)
            };
            let result = match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(e)) => Err(classify(&endpoint, &e)),
                Err(_) => Err(ConnectError::Unavailable {
                    endpoints: endpoint.clone(),
                    message: format!("no answer within {limit:?}"),
                }),
            };
            (endpoint, result)
        });
    }
    let mut fatal = None;
    let mut messages = Vec::new();
    while let Some(joined) = probes.join_next().await {
        let Ok((endpoint, result)) = joined else {
            continue;
        };
        match result {
            // Dropping `probes` aborts the slower probes.
            Ok(client) => return Ok((client, endpoint)),
            Err(ConnectError::Fatal(m)) => fatal = Some(m),
            Err(ConnectError::Unavailable { message, .. }) => {
                messages.push(format!("{endpoint}: {message}"))
            }
        }
    }
    match fatal {
        Some(m) => Err(ConnectError::Fatal(m)),
        None => Err(ConnectError::Unavailable {
            endpoints: display,
            message: messages.join("; "),
        }),
    }
}

fn read_file(flag: &str, path: &PathBuf) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path)
        .map_err(|e| ConnectError::Fatal(format!("cannot read {flag} {}: {e}", path.display())))
}

/// The full message of an error and its sources: tonic hides the useful part (the TLS
/// or auth reason) in the source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

/// The gRPC status code etcd answered with; `None` when the call failed below gRPC
/// (connection, TLS handshake, timeout).
pub fn grpc_code(e: &etcd_client::Error) -> Option<tonic::Code> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

/// True for answers retrying cannot change: etcd's `PermissionDenied` (the role lacks the
/// key range) and `InvalidArgument` (its code for "authentication failed, invalid user ID
/// or password", and for requests it will never accept).
pub fn is_refusal(e: &etcd_client::Error) -> bool {
    matches!(
        grpc_code(e),
        Some(tonic::Code::PermissionDenied | tonic::Code::InvalidArgument)
    )
}

/// Sorts an etcd error into fatal (credentials, certificates, permissions) or transient.
pub fn classify(endpoints: &str, e: &etcd_client::Error) -> ConnectError {
    let message = error_chain(e);
    match grpc_code(e) {
        Some(tonic::Code::InvalidArgument) => ConnectError::Fatal(format!(
            "etcd refused the credentials (check --user and the password): {message}"
        )),
        Some(tonic::Code::PermissionDenied) => {
            ConnectError::Fatal(format!("etcd permission denied: {message}"))
        }
        // tonic reports a failed handshake as `Unavailable`/`Unknown` (or as a transport
        // error with no status), with rustls' reason only in the message.
        _ if tls_failure(&message) => ConnectError::Fatal(format!(
            "etcd TLS failed (certificate not trusted or not accepted): {message}"
        )),
        _ => ConnectError::Unavailable {
            endpoints: endpoints.to_string(),
            message,
        },
    }
}

/// A handshake failure happens below gRPC: whatever status tonic gives it, rustls' reason
/// is only in the text.
fn tls_failure(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer"]
        .iter()
        .any(|w| lower.contains(w))
}

/// Runs one etcd call bounded by `limit`; running out of time becomes an I/O `TimedOut`
/// error naming `what`, so callers handle it like any other failed call.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} not answered within {limit:?}"),
        ))),
    }
}

/// True when etcd says the lease does not exist (expired, revoked, or the store was
/// replaced): `NotFound` is the code of "requested lease not found", the only thing the
/// lease and key calls we make can fail to find. Opening a keep-alive stream for a lease
/// etcd no longer has is answered with TTL 0, which etcd-client turns into its own
/// `LeaseKeepAliveError("lease not found")` (no gRPC status to read).
pub fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m == "lease not found",
        _ => grpc_code(e) == Some(tonic::Code::NotFound),
    }
}

/// What [`put_unless_held`] did.
#[derive(Debug)]
pub enum Claim {
    /// The value is in place under the lease.
    Put,
    /// Another holder has the key: what is there.
    Held(etcd_client::KeyValue),
    /// The key vanished between the compare and the read: try again later.
    Vanished,
}

/// Puts `value` under `key` bound to `lease` when the key is absent, or replaces it when
/// `ours` says its current holder is us (compare-and-swap on its mod revision). Never
/// overwrites anyone else's key: the registrar's and `registrar docker`'s write.
pub async fn put_unless_held(
    client: &Client,
    key: &str,
    value: &str,
    lease: i64,
    timeout: Duration,
    ours: impl Fn(&etcd_client::KeyValue) -> bool,
) -> Result<Claim, etcd_client::Error> {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
    let put = || TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
    let txn = Txn::new()
        .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then(vec![put()])
        .or_else(vec![TxnOp::get(key, None)]);
    let mut kv = client.kv_client();
    let resp = within(timeout, "etcd request", kv.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(Claim::Put);
    }
    let existing = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    let Some(held) = existing else {
        return Ok(Claim::Vanished);
    };
    if ours(&held) {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key,
                CompareOp::Equal,
                held.mod_revision(),
            )])
            .and_then(vec![put()]);
        let resp = within(timeout, "etcd request", kv.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Claim::Put);
        }
    }
    Ok(Claim::Held(held))
}

/// Marks the record under `key` as leaving (`"state":"leaving"` added to `value`), still
/// bound to `lease`, if the key is still under that lease: a registrar writes this just
/// before it revokes or deletes, so load balancers drain the instance at once and know
/// its departure is deliberate. Returns whether the mark was written.
pub async fn mark_leaving(
    client: &Client,
    key: &str,
    value: &str,
    lease: i64,
    timeout: Duration,
) -> Result<bool, etcd_client::Error> {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
    let Some(leaving) = crate::instance::leaving_value(value) else {
        return Ok(false);
    };
    let txn = Txn::new()
        .when(vec![Compare::lease(key, CompareOp::Equal, lease)])
        .and_then(vec![TxnOp::put(
            key,
            leaving,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let resp = within(timeout, "etcd request", client.kv_client().txn(txn)).await?;
    Ok(resp.succeeded())
}

/// Capped exponential backoff for reconnect loops: 100 ms doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }

    /// The delay to wait now; doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[3], Duration::from_millis(800));
        assert_eq!(delays[5], Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn errors_are_classified_by_their_grpc_code() {
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        let lost = status(
            tonic::Code::NotFound,
            "etcdserver: requested lease not found",
        );
        assert!(is_lease_not_found(&lost));
        // The text alone does not make it one.
        assert!(!is_lease_not_found(&status(
            tonic::Code::Unavailable,
            "lease not found"
        )));
        let denied = status(
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        assert!(is_refusal(&denied));
        assert!(matches!(classify("e", &denied), ConnectError::Fatal(_)));
        let auth = status(
            tonic::Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert!(
            matches!(classify("e", &auth), ConnectError::Fatal(m) if m.contains("credentials"))
        );
        let busy = status(tonic::Code::Unavailable, "etcdserver: leader changed");
        assert!(!is_refusal(&busy));
        assert!(matches!(
            classify("e", &busy),
            ConnectError::Unavailable { .. }
        ));
        let tls = status(
            tonic::Code::Unavailable,
            "error trying to connect: invalid peer certificate: UnknownIssuer",
        );
        assert!(matches!(classify("e", &tls), ConnectError::Fatal(m) if m.contains("TLS")));
        let io = etcd_client::Error::IoError(std::io::Error::other("connection refused"));
        assert!(matches!(
            classify("e", &io),
            ConnectError::Unavailable { .. }
        ));
    }
}
