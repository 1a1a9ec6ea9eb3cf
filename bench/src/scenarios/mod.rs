//! The scenarios, one file per family. Each returns result rows; latencies for the CDF
//! picture are collected in `series`. This file: the dispatcher and what several share.

mod etcd;
pub mod fleet;
mod footprint;
mod membership;
mod reload;
mod scale;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::lb::{put_instance, Backend, Lb};
use e2e::load::Load;
use e2e::{bin, http, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

use crate::stages;
use crate::stats::{ms, percentile, Row};
use etcd::{frozen, outage};
use footprint::{footprint, idle};
use membership::{convergence, crash, deregister};
use reload::{reload_safety, storm};
use scale::{scale, wide};

pub struct Opts {
    pub quick: bool,
    pub lb_cmd: Option<String>,
    pub no_runtime_api: bool,
}

pub async fn run(name: &str, o: &Opts, series: &mut Vec<(String, Vec<f64>)>) -> Option<Vec<Row>> {
    Some(match name {
        "convergence" => convergence(o, series).await,
        "deregister" => deregister(o).await,
        "crash" => crash(o).await,
        "reload" => reload_safety(o).await,
        "storm" => storm(o).await,
        "scale" => scale(o).await,
        "wide" => wide(o).await,
        "footprint" => footprint(o).await,
        "outage" => outage(o).await,
        "idle" => idle(o).await,
        "frozen" => frozen(o).await,
        _ => return None,
    })
}

/// etcd + load balancer + `n` backends (none registered).
pub(crate) struct Env {
    _dir: tempfile::TempDir,
    etcd: Etcd,
    lb: Lb,
    backends: Vec<Backend>,
}

pub(crate) async fn env(o: &Opts, n: usize) -> Env {
    env_with(o, n, &[]).await
}

/// [`env`] with `extra` flags for this project's renderer (ignored under `--lb-cmd`).
pub(crate) async fn env_with(o: &Opts, n: usize, extra: &[&str]) -> Env {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let backends: Vec<Backend> = (0..n)
        .map(|i| Backend::start(dir.path(), &format!("b{i}")))
        .collect();
    for b in &backends {
        b.wait_up().await;
    }
    let lb = match &o.lb_cmd {
        Some(cmd) => Lb::start_shell(dir.path(), &etcd, &e2e::lb::template(), cmd),
        None if o.no_runtime_api => {
            Lb::start(dir.path(), &etcd, &[extra, &["--no-runtime-api"]].concat())
        }
        None => Lb::start(dir.path(), &etcd, extra),
    };
    lb.wait_serving().await;
    Env {
        _dir: dir,
        etcd,
        lb,
        backends,
    }
}

/// Sends requests until one is answered by `id`; returns when.
pub(crate) async fn until_served(port: u16, id: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = http::get(port, "/", None).await {
            if r.instance_id().as_deref() == Some(id) {
                return Some(Instant::now());
            }
        }
    }
    None
}

/// Registers `b` as an instance of `service` through `c` (one client kept for the whole
/// run, as a registrar keeps its connection) and sends requests through HAProxy on `port`
/// until `b` answers: the join as [`stages`] splits it, `None` when not served within
/// `timeout`.
pub(crate) async fn timed_join(
    c: &mut etcd_client::Client,
    clock: &stages::Clock,
    service: &str,
    b: &Backend,
    port: u16,
    timeout: Duration,
) -> Option<stages::Join> {
    let key = registry::instance_key("/services", service, &b.id);
    let value = registry::Instance::new(service, &b.id, "127.0.0.1", b.port).encode();
    let t = Instant::now();
    let resp = c.put(key.as_str(), value, None).await.unwrap();
    let acked = Instant::now();
    let served = until_served(port, &b.id, timeout).await?;
    Some(stages::Join {
        revision: resp.header().map_or(0, |h| h.revision()),
        put: clock.unix_ms(t),
        acked: clock.unix_ms(acked),
        served: clock.unix_ms(served),
    })
}

/// Sends requests until `quiet` answers in a row come from others than `id`; returns the
/// time of the first of them (when `id` left rotation) and the failures seen meanwhile.
pub(crate) async fn until_gone(
    port: u16,
    id: &str,
    quiet: usize,
    timeout: Duration,
) -> (Option<Instant>, usize) {
    let deadline = Instant::now() + timeout;
    let mut first_without: Option<Instant> = None;
    let mut streak = 0;
    let mut failures = 0;
    while Instant::now() < deadline {
        let now = Instant::now();
        match http::get(port, "/", None).await {
            Ok(r) if r.status == 200 => {
                if r.instance_id().as_deref() == Some(id) {
                    streak = 0;
                    first_without = None;
                } else {
                    first_without.get_or_insert(now);
                    streak += 1;
                    if streak >= quiet {
                        return (first_without, failures);
                    }
                }
            }
            _ => failures += 1,
        }
    }
    (None, failures)
}

pub(crate) async fn register_all(etcd: &Etcd, backends: &[Backend]) {
    for b in backends {
        put_instance(etcd, "webapp", &b.id, b.port).await;
    }
}

pub(crate) fn registrar_cmd(
    etcd: &Etcd,
    id: &str,
    port: u16,
    ttl: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = e2e::registrar_command(&etcd.endpoint(), id, port, ttl);
    cmd.args(extra);
    cmd
}

/// Polls HAProxy's live state (`show servers state`: names, addresses, ports) until it
/// equals `want`; returns when.
pub(crate) async fn live_set_is(
    lb: &Lb,
    want: &BTreeMap<String, (String, u16)>,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let live: BTreeMap<String, (String, u16)> = lb
            .live_servers()
            .await
            .into_iter()
            .map(|(n, s)| (n, (s.addr, s.port)))
            .collect();
        if &live == want {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

pub(crate) fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

pub(crate) fn cpu_ticks(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(f64::NAN)
}
