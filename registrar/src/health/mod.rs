//! Health checks of the app (HTTP GET, TCP connect, a command) and the pass/fail
//! hysteresis that decides whether the instance should be registered.
//!
//! The verdict is published on a `watch` channel: `true` = register, `false` = stay (or
//! become) deregistered. Several checks make one verdict: a round passes only when every
//! check passes. Without a check the verdict is always `true`.

mod tls;

use std::path::Path;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One way of asking the app whether it is healthy.
#[derive(Debug, Clone)]
pub enum HealthCheck {
    /// `GET url` (http or https, redirects followed up to 5); a final 2xx or 3xx passes.
    Http {
        url: reqwest::Url,
        client: reqwest::Client,
    },
    /// A TCP connect to `addr` passes.
    Tcp { addr: String },
    /// `sh -c command` exiting 0 passes; killed (its whole process group) at the timeout.
    Cmd { command: String },
}

impl PartialEq for HealthCheck {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (HealthCheck::Http { url: a, .. }, HealthCheck::Http { url: b, .. }) => a == b,
            (HealthCheck::Tcp { addr: a }, HealthCheck::Tcp { addr: b }) => a == b,
            (HealthCheck::Cmd { command: a }, HealthCheck::Cmd { command: b }) => a == b,
            _ => false,
        }
    }
}

/// A health-check flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("--health-http {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("--health-tcp {0:?}: expected HOST:PORT")]
    Tcp(String),
    #[error("--health-cacert {path}: {why}")]
    CaCert { path: String, why: String },
    #[error("--health-cmd: empty command")]
    Cmd,
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The request failed (connection, TLS, redirects): the whole cause chain.
    #[error("{0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("{0}")]
    Command(String),
}

impl HealthCheck {
    /// Parses `http(s)://host[:port][/path]`; `https` trusts `cacert` (PEM, one or more
    /// certificates) when given, else the system's roots.
    pub fn http(url: &str, cacert: Option<&Path>) -> Result<HealthCheck, HealthError> {
        let bad = |why: &str| HealthError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("only http:// and https:// URLs are supported"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .no_proxy()
            .user_agent("registrar")
            .redirect(reqwest::redirect::Policy::limited(5))
            // A fresh connection per check: a wedged listener fails it.
            .pool_max_idle_per_host(0);
        if let Some(path) = cacert {
            let ca_error = |why: String| HealthError::CaCert {
                path: path.display().to_string(),
                why,
            };
            use rustls::pki_types::pem::PemObject;
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no PEM certificate in the file".into()));
            }
            builder = builder.use_preconfigured_tls(tls::client_config(certs).map_err(ca_error)?);
        }
        let client = builder
            .build()
            .map_err(|e| bad(&registry::etcd::error_chain(&e)))?;
        Ok(HealthCheck::Http {
            url: parsed,
            client,
        })
    }

    /// Parses `host:port`.
    pub fn tcp(addr: &str) -> Result<HealthCheck, HealthError> {
        let (host, port) = split_host_port(addr, 0)
            .filter(|(_, p)| *p != 0)
            .ok_or_else(|| HealthError::Tcp(addr.to_string()))?;
        Ok(HealthCheck::Tcp {
            addr: join_host_port(&host, port),
        })
    }

    /// Runs `command` with `sh -c`.
    pub fn cmd(command: &str) -> Result<HealthCheck, HealthError> {
        if command.trim().is_empty() {
            return Err(HealthError::Cmd);
        }
        Ok(HealthCheck::Cmd {
            command: command.to_string(),
        })
    }

    /// How the check is named in logs and in the `check` label of the metrics.
    pub fn name(&self) -> String {
        match self {
            HealthCheck::Http { url, .. } => format!("http {url}"),
            HealthCheck::Tcp { addr } => format!("tcp {addr}"),
            HealthCheck::Cmd { command } => format!("cmd {command}"),
        }
    }

    /// Runs the check once.
    pub async fn probe(&self, timeout: Duration) -> Result<(), ProbeError> {
        if let HealthCheck::Cmd { command } = self {
            return run_command(command, timeout).await;
        }
        match tokio::time::timeout(timeout, self.probe_inner()).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(timeout)),
        }
    }

    async fn probe_inner(&self) -> Result<(), ProbeError> {
        match self {
            HealthCheck::Cmd { command } => Err(ProbeError::Command(format!(
                "{command:?} probed without its timeout"
            ))),
            HealthCheck::Tcp { addr } => {
                TcpStream::connect(addr)
                    .await
                    .map(|_| ())
                    .map_err(|source| ProbeError::Connect {
                        addr: addr.clone(),
                        source,
                    })
            }
            HealthCheck::Http { url, client } => {
                let response = client
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(|e| ProbeError::Request(registry::etcd::error_chain(&e)))?;
                let code = response.status().as_u16();
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(ProbeError::Status(code))
                }
            }
        }
    }
}

/// `sh -c command` in its own process group, stdin from /dev/null, stdout discarded;
/// passes on exit 0. At `timeout` the whole group is killed (a command's children too)
/// and the probe fails. The failure names the exit status and the start of stderr.
async fn run_command(command: &str, timeout: Duration) -> Result<(), ProbeError> {
    use std::process::Stdio;
    use tokio::io::AsyncReadExt;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ProbeError::Command(format!("cannot run sh -c {command:?}: {e}")))?;
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut stderr = child.stderr.take();
    let finished = tokio::time::timeout(timeout, async {
        let mut err = Vec::new();
        if let Some(s) = stderr.as_mut() {
            // At most 4 KiB is kept; the rest is read and dropped so the command never
            // blocks on a full pipe.
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => err.extend_from_slice(&buf[..n.min(4096 - err.len().min(4096))]),
                }
            }
        }
        (child.wait().await, err)
    })
    .await;
    match finished {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), err)) => {
            let err = String::from_utf8_lossy(&err);
            let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let first: String = first.chars().take(200).collect();
            Err(ProbeError::Command(if first.is_empty() {
                format!("command {status}")
            } else {
                format!("command {status}: {first}")
            }))
        }
        Ok((Err(e), _)) => Err(ProbeError::Command(format!("waiting for the command: {e}"))),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            }
            Err(ProbeError::Timeout(timeout))
        }
    }
}

fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        None if !s.is_empty() => Some((s.to_string(), default_port)),
        _ => None,
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Pass/fail hysteresis: `fails` consecutive failures turn a healthy instance unhealthy,
/// `rises` consecutive passes turn an unhealthy one healthy. Starts unhealthy.
#[derive(Debug)]
pub struct Hysteresis {
    healthy: bool,
    streak: u32,
    fails: u32,
    rises: u32,
}

impl Hysteresis {
    /// Starts unhealthy: nothing is registered before the first passing check.
    pub fn new(fails: u32, rises: u32) -> Self {
        Hysteresis {
            healthy: false,
            streak: 0,
            fails: fails.max(1),
            rises: rises.max(1),
        }
    }

    /// Feeds one result; returns the verdict after it.
    pub fn observe(&mut self, passed: bool) -> bool {
        if passed == self.healthy {
            self.streak = 0;
        } else {
            self.streak += 1;
            let needed = if self.healthy { self.fails } else { self.rises };
            if self.streak >= needed {
                self.healthy = passed;
                self.streak = 0;
            }
        }
        self.healthy
    }
}

/// What the checker is told and tells besides the verdict.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Probe now, without waiting for the next interval (SIGHUP).
    pub probe_now: std::sync::Arc<tokio::sync::Notify>,
    /// Counts the probes done (the first one makes the registrar ready for systemd).
    pub probes: std::sync::Arc<watch::Sender<u64>>,
}

/// Runs `checks` every `interval` until `stop`, publishing the verdict on `tx`. The
/// checks of a round run side by side; the round passes when all of them pass, and its
/// failure names every check that failed.
///
/// Logging: an instance that is not registered because its checks fail gets one WARN with
/// the reason once `fails` probes in a row have failed (an app still starting beside the
/// registrar does not trip it), and another only when the reason changes; a healthy one
/// losing its registration gets the WARN at once; registering is INFO.
#[allow(clippy::too_many_arguments)]
pub async fn run_checks(
    checks: Vec<HealthCheck>,
    interval: Duration,
    timeout: Duration,
    mut state: Hysteresis,
    tx: watch::Sender<bool>,
    stop: CancellationToken,
    metrics: crate::metrics::Metrics,
    signals: Signals,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut log = FailureLog::new(state.fails);
    let names: Vec<String> = checks.iter().map(HealthCheck::name).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
            _ = signals.probe_now.notified() => ticker.reset(),
        }
        let results = futures_util::future::join_all(checks.iter().map(|c| c.probe(timeout))).await;
        let mut failures = Vec::new();
        for (name, result) in names.iter().zip(&results) {
            let label = crate::metrics::CheckLabel {
                check: name.clone(),
                result: if result.is_ok() { "pass" } else { "fail" }.into(),
            };
            metrics.health_checks.get_or_create(&label).inc();
            metrics
                .health_check_up
                .get_or_create(&crate::metrics::NameLabel {
                    check: name.clone(),
                })
                .set(i64::from(result.is_ok()));
            if let Err(e) = result {
                failures.push(if names.len() == 1 {
                    e.to_string()
                } else {
                    format!("{name}: {e}")
                });
            }
        }
        let result: Result<(), String> = if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        };
        let was = *tx.borrow();
        let now = state.observe(result.is_ok());
        match (&result, was, now) {
            (Err(e), true, false) => {
                log.warned(e.clone());
                tracing::warn!(error = %e, "health check failed; deregistering")
            }
            (Err(reason), _, false) => {
                if log.failed(reason) {
                    tracing::warn!(
                        error = %reason,
                        fails = log.streak,
                        "not registered: the health check keeps failing"
                    )
                } else {
                    tracing::debug!(error = %reason, "health check failed")
                }
            }
            (Err(e), _, _) => tracing::debug!(error = %e, "health check failed"),
            (Ok(()), false, true) => {
                log.passed();
                tracing::info!("health check passed; registering")
            }
            (Ok(()), _, _) => log.passed(),
        }
        if was != now {
            tx.send_replace(now);
        }
        signals.probes.send_modify(|n| *n += 1);
    }
}

/// When a failing check is worth a WARN: after `fails` failures in a row, and then only
/// when the reason differs from the last one warned about.
#[derive(Debug)]
struct FailureLog {
    fails: u32,
    streak: u32,
    warned: Option<String>,
}

impl FailureLog {
    fn new(fails: u32) -> Self {
        FailureLog {
            fails: fails.max(1),
            streak: 0,
            warned: None,
        }
    }

    /// A failure while unregistered: true if it should be logged at WARN.
    fn failed(&mut self, reason: &str) -> bool {
        self.streak += 1;
        if self.streak < self.fails || self.warned.as_deref() == Some(reason) {
            return false;
        }
        self.warned = Some(reason.to_string());
        true
    }

    /// A WARN was logged elsewhere for `reason` (deregistering).
    fn warned(&mut self, reason: String) {
        self.streak = self.fails;
        self.warned = Some(reason);
    }

    fn passed(&mut self) {
        self.streak = 0;
        self.warned = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_targets() {
        let url = |c: HealthCheck| match c {
            HealthCheck::Http { url, .. } => url.to_string(),
            HealthCheck::Tcp { addr } => addr,
            HealthCheck::Cmd { command } => command,
        };
        assert_eq!(
            url(HealthCheck::http("http://127.0.0.1:3000/health", None).unwrap()),
            "http://127.0.0.1:3000/health"
        );
        assert_eq!(
            url(HealthCheck::http("http://app", None).unwrap()),
            "http://app/"
        );
        assert_eq!(
            url(HealthCheck::http("https://app:8443/h", None).unwrap()),
            "https://app:8443/h"
        );
        assert_eq!(
            HealthCheck::tcp("[::1]:80").unwrap(),
            HealthCheck::Tcp {
                addr: "[::1]:80".into()
            }
        );
        assert!(HealthCheck::http("ftp://x", None).is_err());
        assert!(HealthCheck::http("http://x:99999/", None).is_err());
        assert!(HealthCheck::http("/health", None).is_err());
        let missing = HealthCheck::http("https://x", Some(Path::new("/nonexistent/ca.pem")));
        assert!(missing
            .unwrap_err()
            .to_string()
            .starts_with("--health-cacert /nonexistent/ca.pem:"));
        let not_pem = tempfile_with(b"not a certificate\n");
        let err = HealthCheck::http("https://x", Some(&not_pem)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_file(not_pem);
        assert!(HealthCheck::tcp("localhost").is_err());
    }

    #[test]
    fn a_failing_check_warns_after_fails_then_only_when_the_reason_changes() {
        let mut log = FailureLog::new(3);
        assert!(!log.failed("refused"), "an app still starting");
        assert!(!log.failed("refused"));
        assert!(log.failed("refused"), "the third failure in a row");
        assert!(!log.failed("refused"), "same reason: once");
        assert!(log.failed("HTTP status 503"), "a new reason");
        assert!(!log.failed("HTTP status 503"));
        log.passed();
        assert!(
            !log.failed("refused"),
            "the streak starts again after a pass"
        );
        assert!(!log.failed("refused"));
        assert!(log.failed("refused"));
        let mut log = FailureLog::new(3);
        log.warned("refused".into());
        assert!(!log.failed("refused"), "already said when deregistering");
        assert!(log.failed("timeout"));
    }

    #[test]
    fn hysteresis() {
        let mut h = Hysteresis::new(3, 2);
        assert!(!h.observe(true));
        assert!(h.observe(true));
        assert!(h.observe(false) && h.observe(false));
        assert!(h.observe(true), "a pass resets the failure streak");
        assert!(h.observe(false) && h.observe(false));
        assert!(!h.observe(false));
        assert!(!h.observe(true));
        assert!(h.observe(true));
    }

    #[tokio::test]
    async fn probes_real_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert!(HealthCheck::tcp(&format!("127.0.0.1:{port}"))
            .unwrap()
            .probe(t)
            .await
            .is_ok());
        let http = HealthCheck::http(&format!("http://127.0.0.1:{port}/health"), None).unwrap();
        assert_eq!(
            http.probe(t).await.unwrap_err().to_string(),
            "HTTP status 503"
        );
    }

    #[tokio::test]
    async fn a_command_passes_on_exit_0_and_is_killed_with_its_children_at_the_timeout() {
        let t = Duration::from_secs(5);
        assert!(HealthCheck::cmd("true").unwrap().probe(t).await.is_ok());
        let failed = HealthCheck::cmd("echo not ready >&2; exit 3")
            .unwrap()
            .probe(t)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(failed, "command exit status: 3: not ready");
        assert!(HealthCheck::cmd("  ").is_err());
        // A hanging command: the probe fails at the timeout and the command's own child
        // (a background sleep, in the same process group) is gone too.
        let pidfile = std::env::temp_dir().join(format!("registrar-cmd-{}", std::process::id()));
        let hang =
            HealthCheck::cmd(&format!("sleep 60 & echo $! > {}; wait", pidfile.display())).unwrap();
        let started = std::time::Instant::now();
        let err = hang.probe(Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = std::fs::remove_file(&pidfile);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // Gone, or a zombie waiting for init: not running either way.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the command's child {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tempfile_with(bytes: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("registrar-health-{}.pem", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}
