//! Health checks of the app (HTTP GET or TCP connect) and the pass/fail hysteresis that
//! decides whether the instance should be registered.
//!
//! The verdict is published on a `watch` channel: `true` = register, `false` = stay (or
//! become) deregistered. Without a check the verdict is always `true`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One way of asking the app whether it is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// `GET path` on `host:port`; 2xx and 3xx pass.
    Http {
        host: String,
        port: u16,
        path: String,
    },
    /// A TCP connect to `addr` passes.
    Tcp { addr: String },
}

impl HealthCheck {
    /// Parses `http://host[:port][/path]`.
    pub fn http(url: &str) -> Result<HealthCheck, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--health-http {url:?}: only http:// URLs are supported"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_host_port(hostport, 80)
            .ok_or_else(|| format!("--health-http {url:?}: bad host or port"))?;
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!("--health-http {url:?}: bad path"));
        }
        Ok(HealthCheck::Http {
            host,
            port,
            path: path.to_string(),
        })
    }

    /// Parses `host:port`.
    pub fn tcp(addr: &str) -> Result<HealthCheck, String> {
        let (host, port) = split_host_port(addr, 0)
            .filter(|(_, p)| *p != 0)
            .ok_or_else(|| format!("--health-tcp {addr:?}: expected HOST:PORT"))?;
        Ok(HealthCheck::Tcp {
            addr: join_host_port(&host, port),
        })
    }

    /// Runs the check once.
    pub async fn probe(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.probe_inner()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn probe_inner(&self) -> Result<(), String> {
        match self {
            HealthCheck::Tcp { addr } => TcpStream::connect(addr)
                .await
                .map(|_| ())
                .map_err(|e| format!("connect {addr}: {e}")),
            HealthCheck::Http { host, port, path } => {
                let addr = join_host_port(host, *port);
                let mut s = TcpStream::connect(&addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: registrar\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                let mut buf = [0u8; 64];
                let mut n = 0;
                while n < 12 {
                    let r = s
                        .read(&mut buf[n..])
                        .await
                        .map_err(|e| format!("read: {e}"))?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let code: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP status {code}"))
                }
            }
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

/// Runs `check` every `interval` until `stop`, publishing the verdict on `tx`.
pub async fn run_checks(
    check: HealthCheck,
    interval: Duration,
    timeout: Duration,
    mut state: Hysteresis,
    tx: watch::Sender<bool>,
    stop: CancellationToken,
    metrics: crate::metrics::Metrics,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = check.probe(timeout).await;
        let label = if result.is_ok() { "pass" } else { "fail" };
        metrics
            .health_checks
            .get_or_create(&crate::metrics::ResultLabel {
                result: label.into(),
            })
            .inc();
        let was = *tx.borrow();
        let now = state.observe(result.is_ok());
        match (&result, was, now) {
            (Err(e), true, false) => {
                tracing::warn!(error = %e, "health check failed; deregistering")
            }
            (Err(e), _, _) => tracing::debug!(error = %e, "health check failed"),
            (Ok(()), false, true) => tracing::info!("health check passed; registering"),
            _ => {}
        }
        if was != now {
            tx.send_replace(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            HealthCheck::http("http://127.0.0.1:3000/health").unwrap(),
            HealthCheck::Http {
                host: "127.0.0.1".into(),
                port: 3000,
                path: "/health".into()
            }
        );
        assert_eq!(
            HealthCheck::http("http://app").unwrap(),
            HealthCheck::Http {
                host: "app".into(),
                port: 80,
                path: "/".into()
            }
        );
        assert_eq!(
            HealthCheck::tcp("[::1]:80").unwrap(),
            HealthCheck::Tcp {
                addr: "[::1]:80".into()
            }
        );
        assert!(HealthCheck::http("https://x").is_err());
        assert!(HealthCheck::http("http://x:99999/").is_err());
        assert!(HealthCheck::tcp("localhost").is_err());
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
        let http = HealthCheck::http(&format!("http://127.0.0.1:{port}/health")).unwrap();
        assert_eq!(http.probe(t).await.unwrap_err(), "HTTP status 503");
    }
}
