//! The sample web app behind the load balancer (replaces the lab's Node.js app).
//!
//! `GET /` answers `{"hello":"world","id":…,"host":…,"ip":…,"sessionViews":N}` and sets a
//! session cookie so sticky sessions through HAProxy are visible; `GET /health` answers
//! `ok`; `GET /slow?ms=N` answers after N ms (for drain tests). HTTP/1.1 keep-alive is
//! supported. SIGTERM/SIGINT stop accepting and let in-flight requests finish (up to 10 s).
//! It is deliberately tiny: a hand-written HTTP/1.1 subset over tokio, no framework.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "webapp",
    version,
    about = "Sample web app: JSON with its id, per-session view counter, /health."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WEBAPP_BIND", default_value = "0.0.0.0")]
    bind: String,
    /// Port to listen on.
    #[arg(long, env = "WEBAPP_PORT", default_value_t = 3000)]
    port: u16,
    /// Instance id reported in every answer [default: the hostname].
    #[arg(long, env = "WEBAPP_ID")]
    id: Option<String>,
}

struct App {
    id: String,
    host: String,
    sessions: Mutex<HashMap<String, u64>>,
    next_sid: AtomicU64,
}

const MAX_HEADER: usize = 16 * 1024;
const SESSION_COOKIE: &str = "webapp.sid";

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("webapp: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(rt.block_on(serve(args)));
}

async fn serve(args: Args) -> i32 {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let app = Arc::new(App {
        id: args.id.unwrap_or_else(|| host.clone()),
        host,
        sessions: Mutex::new(HashMap::new()),
        next_sid: AtomicU64::new(seed()),
    });
    let listener = match TcpListener::bind((args.bind.as_str(), args.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("webapp: cannot listen on {}:{}: {e}", args.bind, args.port);
            return 1;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("webapp: cannot install signal handlers");
        return 1;
    };
    eprintln!("webapp {} listening on {}:{}", app.id, args.bind, args.port);
    let inflight = Arc::new(tokio::sync::Semaphore::new(10_000));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let app = app.clone();
                let Ok(permit) = inflight.clone().acquire_owned().await else { continue };
                tokio::spawn(async move {
                    let _ = handle(stream, peer, app).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    eprintln!(
        "webapp {}: stopping, waiting for in-flight requests",
        app.id
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), inflight.acquire_many(10_000)).await;
    0
}

/// A per-process starting point for session ids, so two instances rarely collide.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

async fn handle(mut stream: TcpStream, _peer: SocketAddr, app: Arc<App>) -> std::io::Result<()> {
    let local_ip = stream.local_addr()?.ip().to_string();
    let mut buf = Vec::with_capacity(1024);
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEADER {
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let target = parts.next().unwrap_or("/").to_string();
        let version = parts.next().unwrap_or("HTTP/1.0");
        let mut keep_alive = version == "HTTP/1.1";
        let mut cookie_sid = None;
        let mut body_len = 0usize;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "connection" => keep_alive = value.eq_ignore_ascii_case("keep-alive"),
                "content-length" => body_len = value.parse().unwrap_or(0),
                "cookie" => {
                    cookie_sid = value.split(';').find_map(|c| {
                        let (k, v) = c.trim().split_once('=')?;
                        (k == SESSION_COOKIE).then(|| v.to_string())
                    })
                }
                _ => {}
            }
        }
        // Discard any body (bounded).
        let total = head_end + body_len.min(1 << 20);
        while buf.len() < total {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..total);

        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let (status, content_type, body, set_cookie) = match (method, path) {
            ("GET" | "HEAD", "/health") => ("200 OK", "text/plain", "ok\n".to_string(), None),
            ("GET" | "HEAD", "/" | "/slow") => {
                if path == "/slow" {
                    let ms: u64 = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("ms="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1000)
                        .min(30_000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let (sid, views, new) = app.view(cookie_sid);
                let body = serde_json::json!({
                    "hello": "world",
                    "id": app.id,
                    "host": app.host,
                    "ip": local_ip,
                    "sessionViews": views,
                })
                .to_string()
                    + "\n";
                let cookie = new.then(|| format!("{SESSION_COOKIE}={sid}; Path=/; HttpOnly"));
                ("200 OK", "application/json", body, cookie)
            }
            _ => (
                "404 Not Found",
                "text/plain",
                "not found\n".to_string(),
                None,
            ),
        };
        let mut resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Instance-Id: {}\r\n",
            body.len(),
            app.id
        );
        if let Some(c) = set_cookie {
            resp.push_str(&format!("Set-Cookie: {c}\r\n"));
        }
        resp.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        if method != "HEAD" {
            resp.push_str(&body);
        }
        stream.write_all(resp.as_bytes()).await?;
        if !keep_alive {
            return Ok(());
        }
    }
}

impl App {
    /// Counts a view for the session; returns (session id, views, whether it is new).
    fn view(&self, sid: Option<String>) -> (String, u64, bool) {
        let mut sessions = match self.sessions.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(sid) = sid {
            if let Some(n) = sessions.get_mut(&sid) {
                *n += 1;
                return (sid, *n, false);
            }
        }
        // Bound memory: a demo app, so forget everything past 100k sessions.
        if sessions.len() > 100_000 {
            sessions.clear();
        }
        let sid = format!("{:x}", self.next_sid.fetch_add(1, Ordering::Relaxed));
        sessions.insert(sid.clone(), 1);
        (sid, 1, true)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
