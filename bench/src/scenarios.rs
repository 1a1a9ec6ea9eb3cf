//! The scenarios. Each returns result rows; latencies for the CDF picture are collected
//! in `series`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::lb::{put_instance, Backend, Lb};
use e2e::load::Load;
use e2e::{bin, http, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

use crate::stats::{ms, percentile, Row};

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
struct Env {
    _dir: tempfile::TempDir,
    etcd: Etcd,
    lb: Lb,
    backends: Vec<Backend>,
}

async fn env(o: &Opts, n: usize) -> Env {
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
        None if o.no_runtime_api => Lb::start(dir.path(), &etcd, &["--no-runtime-api"]),
        None => Lb::start(dir.path(), &etcd, &[]),
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
async fn until_served(port: u16, id: &str, timeout: Duration) -> Option<Instant> {
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

/// Sends requests until `quiet` answers in a row come from others than `id`; returns the
/// time of the first of them (when `id` left rotation) and the failures seen meanwhile.
async fn until_gone(
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

async fn register_all(etcd: &Etcd, backends: &[Backend]) {
    for b in backends {
        put_instance(etcd, "webapp", &b.id, b.port).await;
    }
}

async fn convergence(o: &Opts, series: &mut Vec<(String, Vec<f64>)>) -> Vec<Row> {
    let count = if o.quick { 20 } else { 200 };
    let e = env(o, 4).await;
    register_all(&e.etcd, &e.backends[..1]).await;
    until_served(e.lb.http_port, "b0", Duration::from_secs(10)).await;
    let (r0, _, _) = e.lb.proc_state().await;
    let (mut join, mut leave, mut acked) = (Vec::new(), Vec::new(), Vec::new());
    let mut after_ack = Vec::new();
    // One client for the whole run, as a registrar keeps its connection: the clock
    // starts at the write, not at a TCP and HTTP/2 handshake.
    let mut c = e.etcd.client().await;
    for i in 0..count {
        let b = &e.backends[1 + i % 3];
        let key = registry::instance_key("/services", "webapp", &b.id);
        let value = registry::Instance::new("webapp", &b.id, "127.0.0.1", b.port).encode();
        let t = Instant::now();
        c.put(key.as_str(), value, None).await.unwrap();
        acked.push(ms(t.elapsed()));
        if let Some(done) = until_served(e.lb.http_port, &b.id, Duration::from_secs(10)).await {
            join.push(ms(done - t));
            after_ack.push(ms(done - t) - acked[acked.len() - 1]);
        }
        // ~20 changes a second, each measured on its own (bursts are the storm scenario's
        // business): a change after a live apply is applied at once, so this spacing
        // shows whether it ever waits behind the previous one's background file check.
        tokio::time::sleep(Duration::from_millis(45)).await;
        let t = Instant::now();
        c.delete(key.as_str(), None).await.unwrap();
        if let (Some(done), _) = until_gone(e.lb.http_port, &b.id, 8, Duration::from_secs(10)).await
        {
            leave.push(ms(done.saturating_duration_since(t)));
        }
        tokio::time::sleep(Duration::from_millis(45)).await;
    }
    let (r1, _, _) = e.lb.proc_state().await;
    series.push(("put → first request served".into(), join.clone()));
    series.push(("delete → last request served".into(), leave.clone()));
    vec![
        Row::new(
            "convergence",
            format!("put → served, p50 (n={})", join.len()),
            percentile(&join, 50.0),
            "ms",
        )
        .at_most(3.0),
        Row::new(
            "convergence",
            "put → served, p99",
            percentile(&join, 99.0),
            "ms",
        )
        .at_most(10.0),
        Row::new(
            "convergence",
            "of which: etcd write acknowledged, p50",
            percentile(&acked, 50.0),
            "ms",
        ),
        Row::new(
            "convergence",
            "of which: etcd write acknowledged, p99",
            percentile(&acked, 99.0),
            "ms",
        ),
        Row::new(
            "convergence",
            "put → served minus etcd ack, p99",
            percentile(&after_ack, 99.0),
            "ms",
        ),
        Row::new(
            "convergence",
            format!("delete → gone, p50 (n={})", leave.len()),
            percentile(&leave, 50.0),
            "ms",
        )
        .at_most(20.0),
        Row::new(
            "convergence",
            "delete → gone, p99",
            percentile(&leave, 99.0),
            "ms",
        )
        .at_most(100.0),
        Row::new(
            "convergence",
            "reloads per change",
            f64::from(r1 - r0) / (2 * count) as f64,
            "",
        ),
    ]
}

fn registrar_cmd(etcd: &Etcd, id: &str, port: u16, ttl: &str, extra: &[&str]) -> Command {
    let mut cmd = e2e::registrar_command(&etcd.endpoint(), id, port, ttl);
    cmd.args(extra);
    cmd
}

async fn deregister(o: &Opts) -> Vec<Row> {
    let rounds = if o.quick { 3 } else { 10 };
    let e = env(o, 1).await;
    register_all(&e.etcd, &e.backends).await;
    let dir = temp_dir();
    let (mut times, mut failures) = (Vec::new(), 0);
    for i in 0..rounds {
        let port = e2e::free_port();
        let id = format!("g{i}");
        let mut cmd = registrar_cmd(&e.etcd, &id, port, "10s", &["--drain", "1s", "--"]);
        cmd.args([
            bin("webapp").display().to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--id".into(),
            id.clone(),
        ]);
        let mut reg = Proc::spawn(&format!("registrar-{id}"), dir.path(), cmd);
        until_served(e.lb.http_port, &id, Duration::from_secs(10)).await;
        // An instance that has been up a moment (its join fully applied), not a join/leave race.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        reg.signal(Signal::SIGTERM);
        let (gone, f) = until_gone(e.lb.http_port, &id, 8, Duration::from_secs(10)).await;
        failures += f;
        if let Some(g) = gone {
            times.push(ms(g.saturating_duration_since(t)));
        }
        let _ = reg.exited(Duration::from_secs(15)).await;
    }
    vec![
        Row::new(
            "deregister",
            format!("SIGTERM → out of rotation, p50 (n={})", times.len()),
            percentile(&times, 50.0),
            "ms",
        )
        .at_most(50.0),
        Row::new(
            "deregister",
            "SIGTERM → out of rotation, max",
            percentile(&times, 100.0),
            "ms",
        ),
        Row::new(
            "deregister",
            "failed requests (drain 1s)",
            failures as f64,
            "",
        )
        .at_most(0.0),
    ]
}

async fn crash(o: &Opts) -> Vec<Row> {
    let rounds = if o.quick { 1 } else { 3 };
    let e = env(o, 1).await;
    register_all(&e.etcd, &e.backends).await;
    let dir = temp_dir();
    let mut times = Vec::new();
    for i in 0..rounds {
        let id = format!("k{i}");
        let mut app = Backend::start(dir.path(), &id);
        app.wait_up().await;
        let mut reg = Proc::spawn(
            &format!("registrar-{id}"),
            dir.path(),
            registrar_cmd(&e.etcd, &id, app.port, "3s", &[]),
        );
        until_served(e.lb.http_port, &id, Duration::from_secs(10)).await;
        let t = Instant::now();
        reg.kill();
        app.proc.kill();
        let deadline = t + Duration::from_secs(15);
        while Instant::now() < deadline {
            // An empty answer (CLI busy during a reload) says nothing; b0 is always there.
            let running = e.lb.running_servers().await;
            if running.iter().any(|s| s == "b0") && !running.contains(&id) {
                times.push(ms(t.elapsed()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    vec![Row::new(
        "crash",
        format!("SIGKILL → out of HAProxy (ttl 3s), max (n={})", times.len()),
        percentile(&times, 100.0),
        "ms",
    )
    .at_most(3500.0)]
}

async fn reload_safety(o: &Opts) -> Vec<Row> {
    let secs = if o.quick { 4 } else { 60 };
    let mut rows = Vec::new();
    for close in [false, true] {
        let e = env(o, 4).await;
        register_all(&e.etcd, &e.backends[..2]).await;
        until_served(e.lb.http_port, "b1", Duration::from_secs(10)).await;
        let (r0, _, _) = e.lb.proc_state().await;
        let load = Load::start(e.lb.http_port, secs, 16, close);
        let end =
            Instant::now() + Duration::from_secs(u64::from(secs)) - Duration::from_millis(500);
        let mut i = 0usize;
        // BENCH_NO_CHURN=1: the same load without changes (the baseline throughput).
        let churn = std::env::var_os("BENCH_NO_CHURN").is_none();
        while churn && Instant::now() < end {
            let b = &e.backends[1 + i % 3];
            if (i / 3) % 2 == 0 {
                put_instance(&e.etcd, "webapp", &b.id, b.port).await;
            } else {
                e.etcd.delete(&format!("/services/webapp/{}", b.id)).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(200)).await; // churn pacing
        }
        let res = load.finish();
        let (r1, failed_reloads, _) = e.lb.proc_state().await;
        let old =
            e.lb.master_cli("show proc")
                .await
                .split("# old workers")
                .nth(1)
                .map(|s| s.lines().filter(|l| l.contains("worker")).count())
                .unwrap_or(0);
        let mode = if close { "close" } else { "keep-alive" };
        rows.push(Row::new(
            "reload",
            format!("{mode}: requests ({secs}s, 16 conns, {i} changes)"),
            res.requests as f64,
            "",
        ));
        rows.push(
            Row::new(
                "reload",
                format!("{mode}: failed requests"),
                res.failed() as f64,
                "",
            )
            .at_most(0.0),
        );
        rows.push(Row::new(
            "reload",
            format!("{mode}: reloads (failed: {failed_reloads})"),
            f64::from(r1 - r0),
            "",
        ));
        rows.push(Row::new(
            "reload",
            format!("{mode}: old workers left at the end"),
            old as f64,
            "",
        ));
    }
    rows
}

/// Polls HAProxy's live state (`show servers state`: names, addresses, ports) until it
/// equals `want`; returns when.
async fn live_set_is(
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

async fn storm(o: &Opts) -> Vec<Row> {
    let e = env(o, 1).await;
    register_all(&e.etcd, &e.backends).await;
    until_served(e.lb.http_port, "b0", Duration::from_secs(10)).await;
    let (r0, _, _) = e.lb.proc_state().await;
    let mut c = e.etcd.client().await;
    let t = Instant::now();
    // 1000 changes: 200 instances, each put 5 times with a different port.
    for round in 0..5u16 {
        for i in 0..200u16 {
            let v =
                registry::Instance::new("webapp", &format!("n{i:03}"), "127.0.0.1", 30000 + round)
                    .encode();
            c.put(format!("/services/webapp/n{i:03}"), v, None)
                .await
                .unwrap();
        }
    }
    let written = t.elapsed();
    // What the registry says now, compared with what HAProxy runs (not with the file: a
    // tool that writes the file and reloads without confirming can leave HAProxy behind).
    let mut want: BTreeMap<String, (String, u16)> = (0..200)
        .map(|i| (format!("n{i:03}"), ("127.0.0.1".to_string(), 30004)))
        .collect();
    want.insert("b0".into(), ("127.0.0.1".into(), e.backends[0].port));
    let done = live_set_is(&e.lb, &want, Duration::from_secs(30)).await;
    // The file follows the live state (checked and written in the background).
    let deadline = Instant::now() + Duration::from_secs(30);
    let file_ok = loop {
        let ok = e.lb.config().matches(":30004 ").count() == 200;
        if ok || Instant::now() > deadline {
            break ok;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let file_done = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await; // let a trailing apply, if any, show up in the count
    let (r1, _, _) = e.lb.proc_state().await;
    let still = live_set_is(&e.lb, &want, Duration::from_millis(100))
        .await
        .is_some();
    vec![
        Row::new("storm", "1000 changes written in", ms(written), "ms"),
        Row::new("storm", "reloads", f64::from(r1 - r0), "").at_most(5.0),
        Row::new(
            "storm",
            "last write → HAProxy runs the registry's set (show servers state)",
            done.map_or(f64::NAN, |d| ms(d.saturating_duration_since(t + written))),
            "ms",
        ),
        Row::new(
            "storm",
            "last write → file lists it",
            if file_ok {
                ms(file_done.saturating_duration_since(t + written))
            } else {
                f64::NAN
            },
            "ms",
        ),
        Row::new(
            "storm",
            "final live state and file exact (1 = yes)",
            f64::from(u8::from(file_ok && done.is_some() && still)),
            "",
        )
        .at_least(1.0),
    ]
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn cpu_ticks(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(f64::NAN)
}

/// One size of the scale scenario: `n` weight-0 filler instances (closed ports) in one
/// backend, plus the live backend b0 joining and leaving.
struct ScaleEnv {
    e: Env,
}

impl ScaleEnv {
    /// `joiners` web apps that join and leave, plus one more (the last) registered
    /// throughout, so that requests have somewhere to go when a joiner has left.
    async fn start(o: &Opts, n: usize, no_runtime_api: bool, joiners: usize) -> ScaleEnv {
        let o = Opts {
            quick: o.quick,
            lb_cmd: o.lb_cmd.clone(),
            no_runtime_api: o.no_runtime_api || no_runtime_api,
        };
        let e = env(&o, joiners + 1).await;
        e2e::lb::put_filler(&e.etcd, "webapp", "n", n).await;
        let stay = &e.backends[joiners];
        put_instance(&e.etcd, "webapp", &stay.id, stay.port).await;
        let deadline = Instant::now() + Duration::from_secs(180);
        while e.lb.live_servers().await.len() < n + 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        until_served(e.lb.http_port, &stay.id, Duration::from_secs(30)).await;
        // The bulk load may end with a reload: wait until HAProxy's process table holds
        // still (same counter and worker over half a second), so none is counted later.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = e.lb.proc_state().await;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = e.lb.proc_state().await;
            if now == last {
                break;
            }
            last = now;
        }
        ScaleEnv { e }
    }

    /// put → served by joiner `k`.
    async fn join(&self, k: usize) -> f64 {
        let b = &self.e.backends[k];
        let t = Instant::now();
        put_instance(&self.e.etcd, "webapp", &b.id, b.port).await;
        let served = until_served(self.e.lb.http_port, &b.id, Duration::from_secs(60)).await;
        served.map_or(f64::NAN, |s| ms(s - t))
    }

    /// delete → joiner 0 out of rotation (requests reach only the others).
    async fn leave(&self) -> f64 {
        let b = &self.e.backends[0];
        let t = Instant::now();
        self.e
            .etcd
            .delete(&registry::instance_key("/services", "webapp", &b.id))
            .await;
        let (gone, _) = until_gone(self.e.lb.http_port, &b.id, 5, Duration::from_secs(60)).await;
        gone.map_or(f64::NAN, |g| ms(g.saturating_duration_since(t)))
    }

    /// The HAProxy floor for the same join done by hand: the running file plus joiner 0's
    /// server line, `haproxy -c` of it, then a master-CLI reload until joiner 0 answers.
    /// (The file is put back and reloaded afterwards.)
    async fn floor(&self) -> (f64, f64) {
        let lb = &self.e.lb;
        let b = &self.e.backends[0];
        let original = lb.config();
        let joined = format!(
            "{}    server {} 127.0.0.1:{} check inter 2s weight 100\n",
            original, b.id, b.port
        );
        let staged = lb.cfg.with_extension("floor");
        std::fs::write(&staged, &joined).unwrap();
        let t = Instant::now();
        let _ = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&staged)
            .output();
        let check = ms(t.elapsed());
        std::fs::rename(&staged, &lb.cfg).unwrap();
        let t = Instant::now();
        let _ = lb.master_cli("reload").await;
        let served = until_served(lb.http_port, &b.id, Duration::from_secs(60)).await;
        let reload = served.map_or(f64::NAN, |s| ms(s - t));
        std::fs::write(&lb.cfg, original).unwrap();
        let (r0, _, _) = lb.proc_state().await;
        let _ = lb.master_cli("reload").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while lb.proc_state().await.0 == r0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (check, reload)
    }
}

/// The renderer's `renderer_check_duration_seconds_count` (file checks run so far).
async fn checks_run(lb: &Lb) -> f64 {
    http::get(lb.metrics_port, "/metrics", None)
        .await
        .ok()
        .and_then(|r| {
            r.body
                .lines()
                .find(|l| l.starts_with("renderer_check_duration_seconds_count"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// A storm at scale: every one of the `n` fillers moves to another port (n changes, in
/// transactions of 100, as fast as etcd takes them). Reports reloads, file checks, and
/// when HAProxy runs exactly the registry's state and the file lists it.
async fn storm_at_scale(s: &ScaleEnv, n: usize) -> Vec<Row> {
    let lb = &s.e.lb;
    let (r0, failed0, _) = lb.proc_state().await;
    let checks0 = checks_run(lb).await;
    let port = |i: usize| 30000 + (i % 30000) as u16;
    let t = Instant::now();
    e2e::lb::put_filler_on(&s.e.etcd, "webapp", "n", n, port).await;
    let written = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut live_at = None;
    while Instant::now() < deadline {
        let live = lb.live_servers().await;
        if (0..n).all(|i| {
            live.get(&format!("n{i:05}"))
                .is_some_and(|l| l.port == port(i))
        }) {
            live_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut file_at = None;
    while Instant::now() < deadline {
        let cfg = lb.config();
        if (0..n).all(|i| cfg.contains(&format!("server n{i:05} 127.0.0.1:{} ", port(i)))) {
            file_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (r1, failed1, _) = lb.proc_state().await;
    let checks = checks_run(lb).await - checks0;
    let after =
        |at: Option<Instant>| at.map_or(f64::NAN, |a| ms(a.saturating_duration_since(t + written)));
    vec![
        Row::new(
            "scale",
            format!("{n} instances: storm of {n} changes written in"),
            ms(written),
            "ms",
        ),
        Row::new(
            "scale",
            format!(
                "{n} instances: storm: reloads (failed: {})",
                failed1 - failed0
            ),
            f64::from(r1 - r0),
            "",
        )
        .at_most(3.0),
        Row::new(
            "scale",
            format!("{n} instances: storm: file checks run"),
            checks,
            "",
        ),
        Row::new(
            "scale",
            format!("{n} instances: storm: last write → HAProxy runs exactly the registry"),
            after(live_at),
            "ms",
        ),
        Row::new(
            "scale",
            format!("{n} instances: storm: last write → file lists it"),
            after(file_at),
            "ms",
        ),
    ]
}

async fn scale(o: &Opts) -> Vec<Row> {
    // BENCH_SCALE_SIZES=10,1000 overrides the sizes (e.g. to rerun one).
    let sizes: Vec<usize> = match std::env::var("BENCH_SCALE_SIZES") {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) if o.quick => vec![10, 1000],
        Err(_) => vec![10, 1000, 10_000],
    };
    let samples = if o.quick { 3 } else { 7 };
    let mut rows = Vec::new();
    let template = std::fs::read_to_string(e2e::lb::template()).unwrap();
    let version = e2e::lb::haproxy_version();
    for &n in &sizes {
        let big = n >= 10_000;
        let goal = |row: Row, limit: f64| if big { row.at_most(limit) } else { row };
        // Render, in process: what the renderer does per apply (template data, context,
        // Handlebars), whatever --lb-cmd says.
        let mut model = renderer::model::Model::new("/services");
        for i in 0..n {
            let port = 10000 + (i % 50000) as u16;
            let v =
                registry::Instance::new("webapp", &format!("n{i:05}"), "127.0.0.1", port).encode();
            model.put(&format!("/services/webapp/n{i:05}"), v.as_bytes());
        }
        let mut r = renderer::render::Renderer::new();
        r.set_haproxy_version(&format!("{}.{}", version.0, version.1));
        r.add("t", &template).unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("runtime_dir".to_string(), "/tmp".to_string());
        // A full build (first apply, or after a full listing)…
        let mut full = Vec::new();
        let mut out = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            out = r
                .render_with("t", &r.context(model.template_data(&vars)))
                .unwrap();
            full.push(ms(t.elapsed()));
        }
        // …and what each change costs: the data patched, then rendered.
        let mut data = renderer::data::TemplateData::new();
        let none = Default::default();
        data.update(&r, &mut model, &vars, &none, usize::MAX);
        let mut times = Vec::new();
        for k in 0..9u16 {
            let id = format!("n{:05}", (usize::from(k) * 997) % n.max(1));
            let v = registry::Instance::new("webapp", &id, "127.0.0.1", 20000 + k).encode();
            let t = Instant::now();
            model.put(&format!("/services/webapp/{id}"), v.as_bytes());
            let (ctx, _) = data.update(&r, &mut model, &vars, &none, usize::MAX);
            let bytes = r.render_with("t", ctx).unwrap();
            times.push(ms(t.elapsed()));
            std::hint::black_box(bytes);
        }
        let dir = temp_dir();
        let f = dir.path().join("h.cfg");
        std::fs::write(&f, &out).unwrap();
        let t = Instant::now();
        let ok = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&f)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let check = ms(t.elapsed());
        rows.push(Row::new(
            "scale",
            format!("{n} instances: first render, data built (in process, our template)"),
            percentile(&full, 50.0),
            "ms",
        ));
        rows.push(goal(
            Row::new(
                "scale",
                format!("{n} instances: render per change, data patched (in process)"),
                percentile(&times, 50.0),
                "ms",
            ),
            20.0,
        ));
        rows.push(Row::new(
            "scale",
            format!(
                "{n} instances: haproxy -c of our template's output{}",
                if ok { "" } else { " (FAILED)" }
            ),
            check,
            "ms",
        ));

        // The load balancer under test, with n instances in place: joins and leaves of b0.
        let s = ScaleEnv::start(o, n, false, 1).await;
        let (r0, _, w0) = s.e.lb.proc_state().await;
        let (mut joins, mut leaves) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            joins.push(s.join(0).await);
            leaves.push(s.leave().await);
        }
        let (r1, _, w1) = s.e.lb.proc_state().await;
        rows.push(goal(
            Row::new(
                "scale",
                format!("{n} instances: join, put → served p50 (n={samples})"),
                percentile(&joins, 50.0),
                "ms",
            ),
            50.0,
        ));
        rows.push(goal(
            Row::new(
                "scale",
                format!("{n} instances: leave, delete → out of HAProxy p50"),
                percentile(&leaves, 50.0),
                "ms",
            ),
            50.0,
        ));
        let live = Row::new(
            "scale",
            format!("{n} instances: joins and leaves live (1 = no reload, same worker)"),
            f64::from(u8::from(r1 == r0 && w1 == w0)),
            "",
        );
        rows.push(if big && !o.no_runtime_api {
            live.at_least(1.0)
        } else {
            live
        });
        if big && o.lb_cmd.is_none() {
            rows.extend(storm_at_scale(&s, n).await);
        }
        if big {
            rows.extend(resync_cost("scale", &format!("{n} instances"), &s.e.etcd).await);
        }
        rows.push(Row::new(
            "scale",
            format!("{n} instances: renderer RSS"),
            rss_kib(s.e.lb.proc.pid()) / 1024.0,
            "MiB",
        ));
        drop(s);

        // The reload path (--no-runtime-api): joins checked, written and reloaded (three
        // different instances: across reloads, "left" is not observable as exactly), and
        // the HAProxy floor for the same join by hand.
        if o.lb_cmd.is_none() {
            let s = ScaleEnv::start(o, n, true, 3).await;
            let (floor_check, floor_reload) = s.floor().await;
            rows.push(Row::new(
                "scale",
                format!(
                    "{n} instances: HAProxy floor: haproxy -c + reload → served, same join by hand"
                ),
                floor_check + floor_reload,
                "ms",
            ));
            let mut times = Vec::new();
            for k in 0..3 {
                // Isolated joins: each after a quiet period longer than --wait-min (a join
                // within 50 ms of the previous reload is merged into a burst on purpose).
                tokio::time::sleep(Duration::from_millis(200)).await;
                times.push(s.join(k).await);
            }
            let apply = percentile(&times, 50.0);
            rows.push(Row::new(
                "scale",
                format!("{n} instances: join through a reload (--no-runtime-api) p50"),
                apply,
                "ms",
            ));
            rows.push(goal(
                Row::new(
                    "scale",
                    format!("{n} instances: reload path ÷ HAProxy floor"),
                    apply / (floor_check + floor_reload),
                    "×",
                ),
                1.3,
            ));
        }
    }
    rows
}

/// A template with one backend per service (no health checks: the fillers' ports are
/// closed and 100 000 checks every 2 s would measure the machine, not the renderer).
const WIDE_TEMPLATE: &str = r#"global
    maxconn 4096
    stats socket {{vars.runtime_dir}}/admin.sock mode 600 level admin expose-fd listeners
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend http
    bind {{vars.bind_address}}:{{vars.http_port}}
    default_backend be_svc0000
listen stats
    bind {{vars.bind_address}}:{{vars.stats_port}}
    stats enable
{{#each services}}
backend be_{{@key}}
    balance roundrobin
{{#each this}}
    server {{id}} {{address}}:{{port}} weight {{weight}} id {{server_id}}
{{/each}}
{{/each}}
"#;

/// 100 000 instances across 1 000 services, one backend each (`BENCH_WIDE=services,per`
/// overrides the shape): list + first apply, one join, renderer RSS.
async fn wide(o: &Opts) -> Vec<Row> {
    let (services, per) = std::env::var("BENCH_WIDE")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .unwrap_or(if o.quick { (100, 100) } else { (1000, 100) });
    let total = services * per;
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b = Backend::start(dir.path(), "b0");
    b.wait_up().await;
    let t = Instant::now();
    for k in 0..services {
        e2e::lb::put_filler(&etcd, &format!("svc{k:04}"), &format!("s{k:04}-"), per).await;
    }
    let written = t.elapsed();
    let template = dir.path().join("wide.hbs");
    std::fs::write(&template, WIDE_TEMPLATE).unwrap();
    let t = Instant::now();
    let lb = Lb::start_with_template(dir.path(), &etcd, &template, &[]);
    let count = || async {
        lb.master_cli("@1 show servers state")
            .await
            .lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 4)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first = None;
    while Instant::now() < deadline {
        if count().await >= total {
            first = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut joins = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        put_instance(&etcd, "svc0000", &b.id, b.port).await;
        joins.push(
            until_served(lb.http_port, &b.id, Duration::from_secs(60))
                .await
                .map_or(f64::NAN, |s| ms(s - t)),
        );
        etcd.delete(&registry::instance_key("/services", "svc0000", &b.id))
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline
            && lb
                .master_cli("@1 show servers state be_svc0000")
                .await
                .contains(" b0 ")
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (reloads, _, _) = lb.proc_state().await;
    let label = format!("{total} instances in {services} services");
    let resync = resync_cost("wide", &label, &etcd).await;
    let mut rows = vec![
        Row::new("wide", format!("{label}: written to etcd in"), ms(written), "ms"),
        Row::new(
            "wide",
            format!("{label}: renderer start → HAProxy runs them all (list + first apply + HAProxy start)"),
            first.map_or(f64::NAN, ms),
            "ms",
        )
        .at_most(10_000.0),
        Row::new(
            "wide",
            format!("{label}: join, put → served p50 (n=3)"),
            percentile(&joins, 50.0),
            "ms",
        )
        .at_most(100.0),
        Row::new("wide", format!("{label}: reloads during joins"), f64::from(reloads), ""),
        Row::new(
            "wide",
            format!("{label}: renderer RSS"),
            rss_kib(lb.proc.pid()) / 1024.0,
            "MiB",
        )
        .at_most(500.0),
    ];
    rows.extend(resync);
    rows
}

/// What one verifying listing (`--resync`, every re-watch) costs at this size: the
/// renderer's own listing code against the scenario's etcd, 5 times: wall time, etcd CPU
/// and the lister's CPU (this process: decoding, as the renderer does) per listing.
async fn resync_cost(scenario: &'static str, label: &str, etcd: &Etcd) -> Vec<Row> {
    use clap::Parser;
    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        etcd: registry::etcd::EtcdArgs,
    }
    let args = A::parse_from(["bench", "--endpoints", &etcd.endpoint()]);
    let member = args.etcd.connect().await.expect("connect to etcd");
    let etcd_pid = etcd.proc.as_ref().map_or(0, Proc::pid);
    let me = std::process::id();
    let (mut walls, mut keys) = (Vec::new(), 0);
    let (e0, m0) = (cpu_ticks(etcd_pid), cpu_ticks(me));
    const RUNS: f64 = 5.0;
    for _ in 0..5 {
        let t = Instant::now();
        let (_, kvs) = renderer::watch::list(&member, "/services", Duration::from_secs(60))
            .await
            .expect("list the registry");
        walls.push(ms(t.elapsed()));
        keys = kvs.len();
    }
    // /proc ticks are 1/100 s.
    let (etcd_ms, own_ms) = (
        (cpu_ticks(etcd_pid) - e0) * 10.0 / RUNS,
        (cpu_ticks(me) - m0) * 10.0 / RUNS,
    );
    vec![
        Row::new(
            scenario,
            format!("{label}: resync listing ({keys} keys) wall p50 (n=5)"),
            percentile(&walls, 50.0),
            "ms",
        ),
        Row::new(
            scenario,
            format!("{label}: resync listing, etcd CPU per listing"),
            etcd_ms,
            "ms",
        ),
        Row::new(
            scenario,
            format!("{label}: resync listing, lister CPU per listing"),
            own_ms,
            "ms",
        ),
    ]
}

async fn footprint(o: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    let target = bin("lb-registrar");
    for name in ["lb-registrar", "lb-renderer", "webapp"] {
        let size = std::fs::metadata(target.with_file_name(name))
            .map(|m| m.len() as f64 / 1024.0 / 1024.0)
            .unwrap_or(f64::NAN);
        rows.push(Row::new(
            "footprint",
            format!("{name} binary (stripped)"),
            size,
            "MiB",
        ));
    }
    let e = env(o, 1).await;
    let dir = temp_dir();
    let b = &e.backends[0];
    let reg = Proc::spawn(
        "registrar",
        dir.path(),
        registrar_cmd(
            &e.etcd,
            &b.id,
            b.port,
            "10s",
            &[
                "--health-http",
                &format!("http://127.0.0.1:{}/health", b.port),
            ],
        ),
    );
    until_served(e.lb.http_port, &b.id, Duration::from_secs(10)).await;
    let idle = Duration::from_secs(if o.quick { 2 } else { 10 });
    let (c0, r0) = (cpu_ticks(reg.pid()), cpu_ticks(e.lb.proc.pid()));
    tokio::time::sleep(idle).await; // the idle period being measured
    let (c1, r1) = (cpu_ticks(reg.pid()), cpu_ticks(e.lb.proc.pid()));
    let pct = |a: f64, b: f64| (b - a) / 100.0 / idle.as_secs_f64() * 100.0;
    rows.push(
        Row::new(
            "footprint",
            "registrar RSS, registered, health checks on",
            rss_kib(reg.pid()) / 1024.0,
            "MiB",
        )
        .at_most(8.0),
    );
    rows.push(Row::new(
        "footprint",
        "registrar CPU idle",
        pct(c0, c1),
        "%",
    ));
    rows.push(Row::new(
        "footprint",
        "renderer RSS idle",
        rss_kib(e.lb.proc.pid()) / 1024.0,
        "MiB",
    ));
    rows.push(Row::new("footprint", "renderer CPU idle", pct(r0, r1), "%"));
    // Under churn: a change every 50 ms.
    let others: Vec<Backend> = (0..3)
        .map(|i| Backend::start(dir.path(), &format!("c{i}")))
        .collect();
    let r0 = cpu_ticks(e.lb.proc.pid());
    let t = Instant::now();
    let mut i = 0;
    while t.elapsed() < idle {
        let x = &others[i % 3];
        if (i / 3) % 2 == 0 {
            put_instance(&e.etcd, "webapp", &x.id, x.port).await;
        } else {
            e.etcd.delete(&format!("/services/webapp/{}", x.id)).await;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await; // churn pacing
    }
    let r1 = cpu_ticks(e.lb.proc.pid());
    rows.push(Row::new(
        "footprint",
        format!("renderer CPU under churn (20 changes/s, {i} total)"),
        (r1 - r0) / 100.0 / t.elapsed().as_secs_f64() * 100.0,
        "%",
    ));
    rows.push(Row::new(
        "footprint",
        "renderer RSS after churn",
        rss_kib(e.lb.proc.pid()) / 1024.0,
        "MiB",
    ));
    rows
}

async fn outage(o: &Opts) -> Vec<Row> {
    let down = Duration::from_secs(if o.quick { 3 } else { 15 });
    let mut e = env(o, 2).await;
    register_all(&e.etcd, &e.backends[..1]).await;
    until_served(e.lb.http_port, "b0", Duration::from_secs(10)).await;
    e.etcd.stop().await;
    tokio::time::sleep(down).await; // the outage being injected
    e.etcd.start_again().await; // returns once etcd answers
    let t = Instant::now();
    let b = &e.backends[1];
    put_instance(&e.etcd, "webapp", &b.id, b.port).await;
    let served = until_served(e.lb.http_port, &b.id, Duration::from_secs(30)).await;
    vec![Row::new(
        "outage",
        format!("etcd down {}s: healthy → change served", down.as_secs()),
        served.map_or(f64::NAN, |s| ms(s - t)),
        "ms",
    )
    .at_most(1000.0)]
}

/// The etcd member a renderer or registrar is on, from its log: the endpoint of its last
/// "connected to etcd" or "moved to another etcd member" line.
fn member_in_log(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        let field = if l.contains("moved to another etcd member") {
            " to="
        } else if l.contains("connected to etcd") {
            " endpoint="
        } else {
            return None;
        };
        let rest = &l[l.find(field)? + field.len()..];
        Some(rest.split_whitespace().next()?.to_string())
    })
}

/// A healthy idle system against an etcd with its default settings: how often connections
/// are torn down (etcd's keep-alive enforcement) and how many WARN lines that costs.
pub async fn idle(o: &Opts) -> Vec<Row> {
    let secs = if o.quick { 30 } else { 600 };
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let app = Backend::start(dir.path(), "b0");
    app.wait_up().await;
    let health = format!("http://127.0.0.1:{}/health", app.port);
    let reg = Proc::spawn(
        "registrar",
        dir.path(),
        registrar_cmd(&etcd, "b0", app.port, "3s", &["--health-http", &health]),
    );
    let lb = match &o.lb_cmd {
        Some(cmd) => Lb::start_shell(dir.path(), &etcd, &e2e::lb::template(), cmd),
        None => Lb::start(dir.path(), &etcd, &["--var", "cookie_key=bench-idle"]),
    };
    lb.wait_serving().await;
    until_served(lb.http_port, "b0", Duration::from_secs(30)).await;
    let warns = |log: String| log.lines().filter(|l| l.contains(" WARN ")).count() as f64;
    let (lb_warn0, reg_warn0) = (warns(lb.proc.log()), warns(reg.log()));
    tokio::time::sleep(Duration::from_secs(secs)).await; // the measured idle period itself
    let reconnects = if lb.metrics_port == 0 {
        f64::NAN
    } else {
        let body = http::get(lb.metrics_port, "/metrics", None)
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        body.lines()
            .find(|l| l.starts_with("renderer_watch_reconnects_total "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let label = |what: &str| format!("{what} in {secs} s idle (default etcd)");
    vec![
        Row::new("idle", label("watch reconnects"), reconnects, "").at_most(0.0),
        Row::new(
            "idle",
            label("renderer WARN lines"),
            warns(lb.proc.log()) - lb_warn0,
            "",
        )
        .at_most(0.0),
        Row::new(
            "idle",
            label("registrar WARN lines"),
            warns(reg.log()) - reg_warn0,
            "",
        )
        .at_most(0.0),
    ]
}

/// (create_revision, lease) of b0's key, read through the live members (retried while
/// they elect a leader); `None` when the key is absent.
async fn b0_record(c: &e2e::cluster::Cluster) -> Option<(i64, i64)> {
    for _ in 0..100 {
        let mut client = c.client().await;
        let get = client.get("/services/webapp/b0", None);
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), get).await {
            return r.kvs().first().map(|kv| (kv.create_revision(), kv.lease()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no live member answered a read");
}

/// Three members. Ten rounds: freeze the member the renderer's watch is on, make a change
/// through the others, time until HAProxy serves it. Then freeze the member a `--ttl 3s`
/// registrar is on (time until it moved on), and the leader for three TTLs (is the
/// registration kept: same create_revision?).
pub async fn frozen(o: &Opts) -> Vec<Row> {
    use e2e::cluster::Cluster;
    let rounds = if o.quick { 4 } else { 10 };
    let dir = temp_dir();
    let cluster = Cluster::start(dir.path(), 3).await;
    let member_of = |endpoint: &str| (0..3).find(|i| cluster.endpoint(*i) == endpoint);
    // A fresh instance per round: a write that timed out against a frozen member may
    // still be applied later, so rounds that put and delete the same key could undo each
    // other; adds of distinct keys cannot.
    let b: Vec<Backend> = (0..=rounds)
        .map(|i| Backend::start(dir.path(), &format!("b{i}")))
        .collect();
    let mut reg_cmd = e2e::registrar_command(&cluster.endpoints(), "b0", b[0].port, "3s");
    if let Ok(filter) = std::env::var("BENCH_REGISTRAR_LOG") {
        reg_cmd.env("RUST_LOG", filter);
    }
    let reg = Proc::spawn("registrar", dir.path(), reg_cmd);
    let lbdir = dir.path().join("lb");
    std::fs::create_dir_all(&lbdir).unwrap();
    let lb = Lb::start_on(&lbdir, &cluster.endpoints(), &e2e::lb::template(), &[]);
    lb.wait_serving().await;
    until_served(lb.http_port, "b0", Duration::from_secs(30)).await;

    let mut served = Vec::new();
    for round in 0..rounds {
        let Some(m) = member_in_log(&lb.proc.log()).and_then(|e| member_of(&e)) else {
            panic!("cannot tell which member the renderer watches");
        };
        cluster.freeze(m);
        let x = &b[round + 1];
        let (key, v) = (
            format!("/services/webapp/{}", x.id),
            registry::Instance::new("webapp", &x.id, "127.0.0.1", x.port).encode(),
        );
        let mut accepted = None;
        for _ in 0..100 {
            let mut c = cluster.client_without(m).await;
            let put = c.put(key.clone(), v.clone(), None);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), put).await {
                accepted = Some(Instant::now());
                break;
            }
        }
        let accepted = accepted.expect("no live member accepted the change");
        let done = until_served(lb.http_port, &x.id, Duration::from_secs(30)).await;
        served.push(done.map_or(f64::NAN, |t| ms(t - accepted)));
        eprintln!(
            "   round {round}: member {m} frozen, change served after {:.0} ms",
            served[round]
        );
        cluster.thaw(m);
        cluster.leader().await;
    }

    // Keep-alive failover: freeze the registrar's member.
    let reg_member = member_in_log(&reg.log())
        .and_then(|e| member_of(&e))
        .expect("registrar's member");
    let moves = |log: String| log.matches("moved to another etcd member").count();
    let before = moves(reg.log());
    cluster.freeze(reg_member);
    let frozen_at = Instant::now();
    let mut failover = f64::NAN;
    while frozen_at.elapsed() < Duration::from_secs(15) {
        if moves(reg.log()) > before {
            failover = ms(frozen_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.thaw(reg_member);
    cluster.leader().await;

    // The leader frozen for three TTLs.
    let before = b0_record(&cluster).await;
    let leader = cluster.leader().await;
    cluster.freeze(leader);
    tokio::time::sleep(Duration::from_secs(9)).await; // the fault's duration, not a sync
    cluster.thaw(leader);
    cluster.leader().await;
    let after = b0_record(&cluster).await;
    let lost = if before.is_some() && before == after {
        0.0
    } else {
        1.0
    };

    let label = format!("change served, watch's member frozen ({rounds} rounds)");
    vec![
        Row::new(
            "frozen",
            format!("{label} p50"),
            percentile(&served, 50.0),
            "ms",
        )
        .at_most(1500.0),
        Row::new(
            "frozen",
            format!("{label} max"),
            percentile(&served, 100.0),
            "ms",
        )
        .at_most(3000.0),
        Row::new(
            "frozen",
            "registrar moved off its frozen member",
            failover,
            "ms",
        )
        .at_most(3000.0),
        Row::new(
            "frozen",
            "ttl 3s registrations redone, leader frozen 9 s",
            lost,
            "",
        )
        .at_most(0.0),
    ]
}
