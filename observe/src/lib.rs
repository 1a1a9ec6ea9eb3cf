//! Observability shared by registrar and renderer: logging setup, and the HTTP
//! endpoint (axum on hyper, bounded heads and head timeouts) serving `/metrics` (Prometheus/OpenMetrics text, encoded by the
//! `prometheus-client` crate), `/healthz` (alive), `/readyz` (ready or 503 with the
//! reason) and `/status` (JSON, renderer only).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod cli;
pub mod notify;
pub mod process;
pub mod signal;

pub use prometheus_client;

/// How log lines are written (`--log-format`, `LOG_FORMAT`), the same for every binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sets up `tracing`: filter from `RUST_LOG` (default `info`), JSON or human text on stderr.
pub fn init_logging(format: LogFormat) {
    let json = format == LogFormat::Json;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Readiness: `Ok(())` or the reason it is not ready.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// A JSON document for `/status`.
pub type StatusFn = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint serves.
#[derive(Clone)]
pub struct Endpoint {
    pub registry: Arc<Registry>,
    pub ready: ReadyFn,
    pub status: Option<StatusFn>,
}

impl Endpoint {
    /// `registry`'s metrics, ready while `ready` holds true (else not ready because
    /// `why_not`), no `/status`.
    pub fn ready_when(
        registry: Registry,
        ready: tokio::sync::watch::Receiver<bool>,
        why_not: &'static str,
    ) -> Endpoint {
        Endpoint {
            registry: Arc::new(registry),
            ready: Arc::new(move || {
                if *ready.borrow() {
                    Ok(())
                } else {
                    Err(why_not.into())
                }
            }),
            status: None,
        }
    }
}

/// `--metrics-addr` for every binary: serves `endpoint` on `addr` until `stop`, nothing
/// when `addr` is `None` (`off`). A port that cannot be bound is reported at ERROR and the
/// process goes on without its metrics: the service matters more than its metrics.
pub async fn serve_if(
    addr: Option<SocketAddr>,
    endpoint: impl FnOnce() -> Endpoint,
    stop: CancellationToken,
) {
    let Some(addr) = addr else {
        return;
    };
    if let Err(e) = serve(addr, endpoint(), stop).await {
        tracing::error!(%addr, error = %e, "cannot serve metrics; continuing without them");
    }
}

/// Time a client gets to send a request head; a client that never finishes its request
/// is dropped after it (and never holds up anyone else: each connection is its own task).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; a larger one is answered 431 and the connection closed.
pub const MAX_HEAD: usize = 64 * 1024;
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 512;

/// Binds `addr` (fails at once if it cannot) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    let service = TowerToHyperService::new(router(endpoint));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // drops the connection
            };
            let (service, stop) = (service.clone(), stop.clone());
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
                drop(slot);
            });
        }
    }))
}

/// The routes: `/metrics`, `/healthz`, `/readyz` and, when there is one, `/status`.
fn router(ep: Endpoint) -> Router {
    let metrics = {
        let registry = ep.registry.clone();
        move || async move {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    e.to_string(),
                ),
            }
        }
    };
    let ready = {
        let ready = ep.ready.clone();
        move || async move {
            match ready() {
                Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }
        }
    };
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    if let Some(status) = ep.status {
        router = router.route(
            "/status",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], status()) }),
        );
    }
    router.fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start() -> (SocketAddr, CancellationToken) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stop = CancellationToken::new();
        let endpoint = Endpoint {
            registry: Arc::new(Registry::default()),
            ready: Arc::new(|| Err("not yet".into())),
            status: None,
        };
        serve(port, endpoint, stop.clone()).await.unwrap();
        (port, stop)
    }

    async fn get_raw(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_routes() {
        let (addr, stop) = start().await;
        assert!(get_raw(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let ready = get_raw(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503") && ready.ends_with("not ready: not yet\n"));
        assert!(get_raw(addr, "/metrics").await.contains("openmetrics-text"));
        assert!(get_raw(addr, "/status").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
    }

    /// Neither a client that never finishes its request nor a 1 MiB header stops
    /// `/healthz` from answering; the stalled client is dropped after HEADER_TIMEOUT.
    #[tokio::test]
    async fn slow_and_huge_requests_do_not_stop_healthz() {
        let (addr, stop) = start().await;
        let mut stalled = Vec::new();
        for _ in 0..20 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
                .await
                .unwrap();
            stalled.push(s);
        }
        let mut huge = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
        req.resize(req.len() + (1 << 20), b'a');
        req.extend_from_slice(b"\r\n\r\n");
        // The server stops reading at MAX_HEAD: the write may fail, the answer is 431.
        let _ = huge.write_all(&req).await;
        let mut answer = vec![0u8; 64];
        let n = huge.read(&mut answer).await.unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
        let ok = tokio::time::timeout(Duration::from_secs(2), get_raw(addr, "/healthz"))
            .await
            .expect("/healthz answers while 20 clients stall");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        // The stalled ones are closed once their head timeout passes.
        let mut first = stalled.remove(0);
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(HEADER_TIMEOUT * 3, first.read(&mut buf))
            .await
            .expect("a stalled client is dropped");
        assert!(closed.is_ok());
        stop.cancel();
    }
}
