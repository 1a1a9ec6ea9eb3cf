//! Observability shared by registrar and renderer: logging setup, and a small HTTP
//! endpoint serving `/metrics` (Prometheus/OpenMetrics text, encoded by the
//! `prometheus-client` crate), `/healthz` (alive), `/readyz` (ready or 503 with the
//! reason) and `/status` (JSON, renderer only).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod cli;

pub use prometheus_client;

/// Sets up `tracing`: filter from `RUST_LOG` (default `info`), JSON or human text on stderr.
pub fn init_logging(json: bool) {
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

/// Binds `addr` (fails at once if it cannot) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let ep = endpoint.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), answer(stream, ep)).await;
                    });
                }
            }
        }
    }))
}

async fn answer(mut stream: TcpStream, ep: Endpoint) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/");
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &ep.registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => ("500 Internal Server Error", "text/plain", e.to_string()),
            }
        }
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/readyz" => match (ep.ready)() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => match &ep.status {
            Some(f) => ("200 OK", "application/json", f()),
            None => ("404 Not Found", "text/plain", "not found\n".to_string()),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await
}
