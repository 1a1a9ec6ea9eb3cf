//! `renderer status`: the first thing to run when HAProxy does not route where you expect.
//! Reads the registry from etcd (what is admitted, what is skipped and why) and the running
//! renderer's `/status` (what it last applied, and when).

use std::time::Duration;

use clap::Parser;
use registry::etcd::EtcdArgs;

use crate::model::Model;

/// Flags of `renderer status`.
#[derive(Debug, Parser)]
#[command(
    name = "lb-renderer status",
    about = "Show the services and instances in the registry, skipped records and why, and what the running renderer last applied."
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Key prefix.
    #[arg(long, env = "RENDERER_PREFIX", default_value = registry::DEFAULT_PREFIX)]
    pub prefix: String,
    /// The running renderer's metrics address (its --metrics-addr).
    #[arg(long, env = "RENDERER_METRICS_ADDR", default_value = "127.0.0.1:9105")]
    pub renderer: String,
}

/// Why `renderer status` has no report: only the registry is required.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Connect(#[from] registry::etcd::ConnectError),
    #[error("listing {prefix}: {message}")]
    List { prefix: String, message: String },
}

/// Why the running renderer's `/status` could not be read (reported, not fatal).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Http(String),
    #[error("/status answered {0}")]
    Status(reqwest::StatusCode),
    #[error("bad /status answer: {0}")]
    Json(#[from] serde_json::Error),
}

/// Builds the report. Errors only when etcd cannot be read.
pub async fn report(args: &StatusArgs) -> Result<String, StatusError> {
    let client = args.etcd.connect().await?;
    let (store, kvs) = crate::watch::list(&client, &args.prefix, args.etcd.dial_timeout)
        .await
        .map_err(|e| StatusError::List {
            prefix: args.prefix.clone(),
            message: registry::etcd::error_chain(&e),
        })?;
    let mut model = Model::new(&args.prefix);
    model.reset(
        kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        store.revision,
    );
    let _ = model.take_new_skips();

    let mut out = format!(
        "registry {} at revision {}: {} instance(s) in {} service(s)\n",
        args.etcd.endpoints_display(),
        store.revision,
        model.len(),
        model.services().len()
    );
    for (service, ids) in model.services() {
        out.push_str(&format!("  {service}\n"));
        for i in ids.values() {
            out.push_str(&format!(
                "    {:<20} {}:{} weight {}{}\n",
                i.id,
                i.address,
                i.port,
                i.weight,
                if i.tags.is_empty() {
                    String::new()
                } else {
                    format!(" tags {}", i.tags.join(","))
                }
            ));
        }
    }
    if model.skipped().is_empty() {
        out.push_str("skipped records: none\n");
    } else {
        out.push_str(&format!("skipped records: {}\n", model.skipped().len()));
        for (key, s) in model.skipped() {
            out.push_str(&format!("  {key}: {} ({})\n", s.reason, s.message));
        }
    }
    match get_status(&args.renderer).await {
        Ok(doc) => {
            let rev = doc["revision"].as_i64().unwrap_or(0);
            let last = &doc["last_apply"];
            let age = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
                - last["unix_time"].as_f64().unwrap_or(0.0);
            out.push_str(&format!(
                "renderer {}: model at revision {rev} ({}), last apply {:.0}s ago: {} via {}, {:.1} ms{}\n",
                args.renderer,
                if rev >= store.revision { "up to date".to_string() } else { format!("{} behind", store.revision - rev) },
                age,
                if last["ok"].as_bool() == Some(true) { "ok" } else { "FAILED" },
                last["how"].as_str().unwrap_or("?"),
                last["took_ms"].as_f64().unwrap_or(0.0),
                match last["errors"].as_array() {
                    Some(e) if !e.is_empty() => format!("\n  errors: {}", e.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("\n          ")),
                    _ => String::new(),
                }
            ));
        }
        Err(e) => out.push_str(&format!(
            "renderer {}: not reachable ({e})\n",
            args.renderer
        )),
    }
    Ok(out)
}

async fn get_status(addr: &str) -> Result<serde_json::Value, FetchError> {
    let base = if addr.contains("://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr.trim_end_matches('/'))
    };
    let http = |e: reqwest::Error| FetchError::Http(registry::etcd::error_chain(&e));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(http)?;
    let response = client
        .get(format!("{base}/status"))
        .send()
        .await
        .map_err(http)?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    let body = response.text().await.map_err(http)?;
    Ok(serde_json::from_str(&body)?)
}
