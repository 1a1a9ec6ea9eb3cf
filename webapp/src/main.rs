//! The sample web app behind the load balancer (replaces the lab's Node.js app).
//!
//! `GET /` answers `{"hello":"world","id":…,"host":…,"ip":…,"sessionViews":N}` and sets a
//! session cookie so sticky sessions through HAProxy are visible; `GET /health` answers
//! `ok`; `GET /slow?ms=N` answers after N ms (for drain tests). Served by axum (HTTP/1.1,
//! keep-alive). SIGTERM/SIGINT stop accepting and let in-flight requests finish (up to 10 s).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::Router;
use clap::Parser;
use tokio::net::TcpListener;
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
    let id = app.id.clone();
    let instance = HeaderValue::from_str(&app.id).unwrap_or(HeaderValue::from_static("invalid"));
    let router = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/", get(hello))
        .route("/slow", get(slow))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(axum::middleware::map_response(move |mut r: Response| {
            let id = instance.clone();
            async move {
                r.headers_mut().insert("x-instance-id", id);
                r
            }
        }))
        .with_state(app);
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Local>(),
    )
    .with_graceful_shutdown(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("webapp {id}: stopping, waiting for in-flight requests");
        signalled.notify_one();
    });
    // In-flight requests get up to 10 s after the signal.
    let bound = async {
        stopping.notified().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    };
    tokio::select! {
        r = server => match r {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("webapp: {e}");
                1
            }
        },
        _ = bound => 0,
    }
}

/// A per-process starting point for session ids, so two instances rarely collide.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// `GET /`: who answered, and this session's view count.
async fn hello(
    State(app): State<Arc<App>>,
    ConnectInfo(local): ConnectInfo<Local>,
    headers: HeaderMap,
) -> Response {
    answer(&app, local, &headers)
}

/// `GET /slow?ms=N`: `/` after N ms (default 1000, at most 30 000).
async fn slow(
    State(app): State<Arc<App>>,
    ConnectInfo(local): ConnectInfo<Local>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let ms: u64 = q
        .get("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .min(30_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    answer(&app, local, &headers)
}

/// The address a connection came in on (the "ip" of the answer).
#[derive(Clone, Copy)]
struct Local(Option<SocketAddr>);

impl Connected<IncomingStream<'_, TcpListener>> for Local {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Local(stream.io().local_addr().ok())
    }
}

fn answer(app: &App, local: Local, headers: &HeaderMap) -> Response {
    let cookie_sid = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == SESSION_COOKIE).then(|| v.to_string())
        });
    let (sid, views, new) = app.view(cookie_sid);
    let body = serde_json::json!({
        "hello": "world",
        "id": app.id,
        "host": app.host,
        "ip": local.0.map(|a| a.ip().to_string()).unwrap_or_default(),
        "sessionViews": views,
    })
    .to_string()
        + "\n";
    let mut resp = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    if new {
        if let Ok(v) = HeaderValue::from_str(&format!("{SESSION_COOKIE}={sid}; Path=/; HttpOnly")) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
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
