//! `fleet`: how big a fleet one 3-member etcd carries. N registrations driven through the
//! registrar's own lease code (`registrar::lease::Registration`, TTL 10 s) from this
//! process, M watchers that list and watch the prefix as a renderer does (each on its own
//! connection, spread over the members), and one real renderer + HAProxy. Per point: etcd's
//! CPU and memory, the keep-alive round trip p99, watch delivery p99 to the M watchers, and
//! put → served p99 at the renderer; then the same N with one lease per host (50 records
//! each, as `registrar docker` keeps them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use e2e::cluster::Cluster;
use etcd_client::{GetOptions, WatchOptions};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::*;

const TTL: i64 = 10;
/// Records per lease in the lease-per-host runs.
const PER_HOST: usize = 50;

/// The grid: `BENCH_FLEET_SIZES` (records with a lease each; default 1000,10000,20000,50000),
/// `BENCH_FLEET_HOST_SIZES` (records, 50 per lease; default 1000,10000,50000) and
/// `BENCH_FLEET_WATCHERS` (default 1,10,50); `quick` runs 1000 × 1,10. A size etcd cannot
/// hold (fewer than 99 % of the records registered, and no progress for 30 s) ends that
/// mode's sizes with a "not held" point.
pub struct Grid {
    pub sizes: Vec<usize>,
    pub host_sizes: Vec<usize>,
    pub watchers: Vec<usize>,
    pub probes: usize,
    pub window: Duration,
}

impl Grid {
    pub fn from_env(quick: bool) -> Grid {
        let list = |var: &str, default: &str| -> Vec<usize> {
            std::env::var(var)
                .unwrap_or_else(|_| default.into())
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect()
        };
        if quick {
            return Grid {
                sizes: vec![1000],
                host_sizes: vec![1000],
                watchers: vec![1, 10],
                probes: 10,
                window: Duration::from_secs(5),
            };
        }
        Grid {
            sizes: list("BENCH_FLEET_SIZES", "1000,10000,20000,50000"),
            host_sizes: list("BENCH_FLEET_HOST_SIZES", "1000,10000,50000"),
            watchers: list("BENCH_FLEET_WATCHERS", "1,10,50"),
            probes: 40,
            window: Duration::from_secs(15),
        }
    }
}

/// Watchers' arrival times of probe events, by key and put sequence.
type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

struct Watchers {
    stop: CancellationToken,
    /// One token per running watcher.
    running: Vec<CancellationToken>,
    count: usize,
    arrivals: Arrivals,
}

impl Watchers {
    /// Adds watchers (or stops the newest) until there are `m`: each lists the prefix,
    /// then watches it from the listing's revision, on a connection of its own to member
    /// `i % 3`.
    async fn set_to(&mut self, m: usize, cluster: &Cluster) {
        while self.count > m {
            if let Some(t) = self.running.pop() {
                t.cancel();
            }
            self.count -= 1;
        }
        while self.count < m {
            let endpoint = cluster.endpoint(self.count % 3);
            let stop = self.stop.child_token();
            self.running.push(stop.clone());
            let arrivals = self.arrivals.clone();
            // The renderer's own paginated listing (one `get` of 50 000 records is over
            // gRPC's 4 MiB message limit).
            let flags =
                <EtcdFlags as clap::Parser>::parse_from(["watcher", "--endpoints", &endpoint]);
            let member = flags.etcd.connect().await.unwrap();
            let (store, _) = renderer::watch::list(&member, "/services", Duration::from_secs(30))
                .await
                .unwrap();
            let rev = store.revision;
            let mut c = member.client();
            let mut stream = c
                .watch(
                    "/services/",
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await
                .unwrap();
            tokio::spawn(async move {
                let _keep = c;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        m = stream.message() => match m {
                            Ok(Some(resp)) => {
                                let now = Instant::now();
                                for e in resp.events() {
                                    let Some(key) = e.kv().and_then(|kv| kv.key_str().ok()) else { continue };
                                    if key.starts_with("/services/probe/") && e.event_type() == etcd_client::EventType::Put {
                                        arrivals.lock().unwrap().entry(key.to_string()).or_default().push(now);
                                    }
                                }
                            }
                            _ => return,
                        },
                    }
                }
            });
            self.count += 1;
        }
    }
}

/// Registrations driven through the registrar's lease code.
struct Fleet {
    stop: CancellationToken,
    members: Vec<registry::etcd::Member>,
    metrics: registrar::metrics::Metrics,
    health: tokio::sync::watch::Receiver<bool>,
    _health_tx: tokio::sync::watch::Sender<bool>,
    records: usize,
    leases: usize,
}

impl Fleet {
    async fn new(cluster: &Cluster, keepalive: Histogram) -> Fleet {
        let args =
            <EtcdFlags as clap::Parser>::parse_from(["fleet", "--endpoints", &cluster.endpoints()]);
        // 20 connections, as many registrars would have many: spread over the members.
        let mut members = Vec::new();
        for _ in 0..20 {
            members.push(args.etcd.connect().await.unwrap());
        }
        let mut metrics = registrar::metrics::Metrics::unregistered();
        metrics.keepalive_seconds = keepalive;
        let (health_tx, health) = tokio::sync::watch::channel(true);
        Fleet {
            stop: CancellationToken::new(),
            members,
            metrics,
            health,
            _health_tx: health_tx,
            records: 0,
            leases: 0,
        }
    }

    /// Registers records until there are `n`, `per_lease` records per lease, 500 records at
    /// a time (a fleet starting is not one burst), waiting for etcd to hold them. Returns
    /// how many etcd holds: fewer than asked when it cannot keep them.
    async fn grow_to(
        &mut self,
        n: usize,
        per_lease: usize,
        etcd: &mut etcd_client::Client,
    ) -> usize {
        while self.records < n {
            // 500 records at a time: a lease's records are put one after another before
            // its first keep-alive, so a batch must register well within the TTL.
            let batch_end = (self.records + 500).min(n);
            while self.records < batch_end {
                let records: Vec<(String, String)> = (self.records
                    ..(self.records + per_lease).min(n))
                    .map(|i| {
                        let id = format!("i{i}");
                        let svc = format!("svc{}", i / 100);
                        let value = registry::Instance::new(&svc, &id, "10.0.0.1", 3000).encode();
                        (registry::instance_key("/services", &svc, &id), value)
                    })
                    .collect();
                self.records += records.len();
                let member = self.members[self.leases % self.members.len()].clone();
                let (registered, _) = tokio::sync::watch::channel(false);
                let r = registrar::lease::Registration::new(
                    member,
                    records,
                    TTL,
                    Duration::from_secs(5),
                    self.health.clone(),
                    registered,
                )
                .with_metrics(self.metrics.clone());
                tokio::spawn(r.run(self.stop.clone()));
                self.leases += 1;
            }
            // Waits while the count grows; gives up after 30 s without progress.
            let (mut best, mut progressed) = (0, Instant::now());
            loop {
                let held = count(etcd).await;
                if held >= self.records {
                    break;
                }
                if held > best {
                    (best, progressed) = (held, Instant::now());
                }
                if progressed.elapsed() > Duration::from_secs(30) {
                    return held;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        count(etcd).await
    }
}

#[derive(clap::Parser)]
struct EtcdFlags {
    #[command(flatten)]
    etcd: registry::etcd::EtcdArgs,
}

/// Records under /services/ except the probe's.
async fn count(c: &mut etcd_client::Client) -> usize {
    let r = c
        .get(
            "/services/svc",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await;
    r.map_or(0, |r| r.count() as usize)
}

/// Bucket upper bounds and cumulative counts of `h` now.
fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register("h", "", h.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("h_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The p-th percentile (upper bucket bound, ms) of what `h` observed since `before`.
fn window_percentile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> (f64, u64) {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = diff.last().map_or(0, |d| d.1);
    let want = (total as f64 * p / 100.0).ceil() as u64;
    let le = diff
        .iter()
        .find(|(_, c)| *c >= want.max(1))
        .map_or(f64::NAN, |(le, _)| *le);
    (le * 1000.0, total)
}

fn etcd_usage(cluster: &Cluster) -> (f64, f64) {
    let pids: Vec<u32> = (0..3).filter_map(|i| cluster.pid(i)).collect();
    let ticks: f64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let rss = pids.iter().map(|p| rss_kib(*p)).fold(0.0, f64::max) / 1024.0;
    (ticks, rss)
}

/// One measured point.
#[allow(clippy::too_many_arguments)]
async fn measure(
    mode: &str,
    fleet: &Fleet,
    watchers: &Watchers,
    cluster: &Cluster,
    lb: &Lb,
    backends: &[Backend],
    keepalive: &Histogram,
    grid: &Grid,
    etcd: &mut etcd_client::Client,
) -> Value {
    // Settle: a full TTL so every keeper has renewed at its own rhythm.
    tokio::time::sleep(Duration::from_secs(TTL as u64)).await;
    let (t0, _) = etcd_usage(cluster);
    let me = std::process::id();
    let (d0, r0) = (cpu_ticks(me), cpu_ticks(lb.proc.pid()));
    let k0 = buckets(keepalive);
    let started = Instant::now();
    watchers.arrivals.lock().unwrap().clear();
    let (mut served, mut sent) = (Vec::new(), Vec::new());
    for i in 0..grid.probes {
        let b = &backends[1 + i % 2];
        let key = registry::instance_key("/services", "probe", &b.id);
        let value = registry::Instance::new("probe", &b.id, "127.0.0.1", b.port).encode();
        let t = Instant::now();
        etcd.put(key.as_str(), value, None).await.unwrap();
        sent.push((key.clone(), t));
        if let Some(done) = until_served(lb.http_port, &b.id, Duration::from_secs(10)).await {
            served.push(ms(done - t));
        }
        etcd.delete(key.as_str(), None).await.unwrap();
        until_gone(lb.http_port, &b.id, 4, Duration::from_secs(10)).await;
        let pause = grid.window.saturating_sub(started.elapsed()) / (grid.probes - i) as u32;
        tokio::time::sleep(pause.min(Duration::from_millis(500))).await;
    }
    if started.elapsed() < grid.window {
        tokio::time::sleep(grid.window - started.elapsed()).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (t1, rss) = etcd_usage(cluster);
    let (d1, r1) = (cpu_ticks(me), cpu_ticks(lb.proc.pid()));
    let pct = |a: f64, b: f64| (b - a) / 100.0 / elapsed * 100.0;
    let k1 = buckets(keepalive);
    let (ka_p99, ka_n) = window_percentile(&k0, &k1, 99.0);
    // Delivery: each watcher's arrival of each probe put (the n-th put of a key is its
    // n-th arrival), from the start of the put.
    let arrivals = watchers.arrivals.lock().unwrap().clone();
    let mut delivered = Vec::new();
    let mut nth: HashMap<&str, usize> = HashMap::new();
    for (key, t) in &sent {
        let n = nth.entry(key.as_str()).or_default();
        if let Some(times) = arrivals.get(key) {
            for at in times.iter().skip(*n * watchers.count).take(watchers.count) {
                delivered.push(ms(at.saturating_duration_since(*t)));
            }
        }
        *n += 1;
    }
    let point = json!({
        "mode": mode,
        "records": fleet.records,
        "leases": fleet.leases,
        "watchers": watchers.count,
        "etcd_cpu_pct": pct(t0, t1),
        // The load generator (every registrar's keep-alives, the watchers) and the one
        // renderer share the same 2 cores with etcd: their CPU shows when the machine,
        // not etcd, is the limit.
        "driver_cpu_pct": pct(d0, d1),
        "renderer_cpu_pct": pct(r0, r1),
        "etcd_rss_mib_max_member": rss,
        "keepalives_per_s": ka_n as f64 / elapsed,
        "keepalive_p99_ms": ka_p99,
        "watch_delivery_p99_ms": percentile(&delivered, 99.0),
        "watch_deliveries": delivered.len(),
        "put_served_p50_ms": percentile(&served, 50.0),
        "put_served_p99_ms": percentile(&served, 99.0),
        "probes_served": served.len(),
        "registry_records": count(etcd).await,
    });
    eprintln!("   {point}");
    point
}

/// Runs the grid; returns the JSON report.
pub async fn fleet(grid: &Grid) -> Value {
    let dir = temp_dir();
    let cluster = Cluster::start(dir.path(), 3).await;
    // b0 stays registered (a departed probe is "gone" once others answer), b1 and b2 are
    // the probes.
    let backends: Vec<Backend> = (0..3)
        .map(|i| Backend::start(dir.path(), &format!("b{i}")))
        .collect();
    for b in &backends {
        b.wait_up().await;
    }
    let lb = Lb::start_on(
        dir.path(),
        &cluster.endpoints(),
        &e2e::lb::template(),
        &["--var", "service=probe"],
    );
    lb.wait_serving().await;
    let mut etcd = cluster.client().await;
    let anchor = &backends[0];
    let value = registry::Instance::new("probe", &anchor.id, "127.0.0.1", anchor.port).encode();
    etcd.put(
        registry::instance_key("/services", "probe", &anchor.id),
        value,
        None,
    )
    .await
    .unwrap();
    until_served(lb.http_port, &anchor.id, Duration::from_secs(10)).await;
    let keepalive = Histogram::new(exponential_buckets(0.0001, 1.25, 50));
    let mut watchers = Watchers {
        stop: CancellationToken::new(),
        running: Vec::new(),
        count: 0,
        arrivals: Arc::default(),
    };
    let mut points = Vec::new();
    for (mode, per_lease, sizes) in [
        ("lease per instance", 1, &grid.sizes),
        ("lease per host", PER_HOST, &grid.host_sizes),
    ] {
        let mut fleet = Fleet::new(&cluster, keepalive.clone()).await;
        for &n in sizes {
            let held = fleet.grow_to(n, per_lease, &mut etcd).await;
            if held * 100 < n * 99 {
                let point = json!({
                    "mode": mode, "records": n, "leases": fleet.leases, "held": held,
                    "note": "not held: the registered count stopped growing for 30 s short of the size \
                             (leases expiring as fast as they are granted); larger sizes not tried",
                });
                eprintln!("   {point}");
                points.push(point);
                break;
            }
            // Per instance: every watcher count; per host: the largest only.
            let ms: Vec<usize> = if per_lease == 1 {
                grid.watchers.clone()
            } else {
                grid.watchers.iter().copied().max().into_iter().collect()
            };
            for m in ms {
                watchers.set_to(m, &cluster).await;
                points.push(
                    measure(
                        mode, &fleet, &watchers, &cluster, &lb, &backends, &keepalive, grid,
                        &mut etcd,
                    )
                    .await,
                );
            }
        }
        // Graceful stops: every lease revoked; wait until etcd holds none of them.
        fleet.stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(120);
        while count(&mut etcd).await > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    watchers.stop.cancel();
    json!({
        "machine": crate::machine(),
        "ttl_s": TTL,
        "records_per_host_lease": PER_HOST,
        "points": points,
    })
}

/// The report as a table (markdown).
pub fn table(report: &Value) -> String {
    let mut out = String::from(
        "| leases | records | watchers | etcd CPU (% of a core, 3 members) | etcd RSS (largest member) | driver CPU | keep-alives/s | keep-alive p99 | watch delivery p99 | put → served p50 / p99 |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in report["points"].as_array().into_iter().flatten() {
        if let Some(held) = p.get("held") {
            out.push_str(&format!(
                "| {} ({}) | {} | | **not held**: {} registered, then no progress for 30 s | | | | | | |\n",
                p["leases"],
                if p["mode"] == "lease per host" { "per host" } else { "per instance" },
                p["records"],
                held
            ));
            continue;
        }
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        out.push_str(&format!(
            "| {} ({}) | {} | {} | {:.0} % | {:.0} MiB | {:.0} % | {:.0} | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms |\n",
            p["leases"],
            if p["mode"] == "lease per host" { "per host" } else { "per instance" },
            p["records"],
            p["watchers"],
            f("etcd_cpu_pct"),
            f("etcd_rss_mib_max_member"),
            f("driver_cpu_pct"),
            f("keepalives_per_s"),
            f("keepalive_p99_ms"),
            f("watch_delivery_p99_ms"),
            f("put_served_p50_ms"),
            f("put_served_p99_ms"),
        ));
    }
    out
}

/// Two panels over the number of records (log scale): etcd CPU, and keep-alive p99, one
/// line per (lease mode, watcher count).
pub fn svg(report: &Value) -> String {
    let points: Vec<&Value> = report["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p.get("held").is_none())
        .collect();
    // (records, etcd CPU, keep-alive p99) per line.
    type Line = Vec<(f64, f64, f64)>;
    let mut series: Vec<(String, Line)> = Vec::new();
    for p in &points {
        let name = format!(
            "{}, {} watcher(s)",
            p["mode"].as_str().unwrap_or(""),
            p["watchers"]
        );
        let x = p["records"].as_f64().unwrap_or(1.0);
        let cpu = p["etcd_cpu_pct"].as_f64().unwrap_or(0.0);
        let ka = p["keepalive_p99_ms"].as_f64().unwrap_or(0.0);
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push((x, cpu, ka)),
            None => series.push((name, vec![(x, cpu, ka)])),
        }
    }
    let mut xs: Vec<f64> = points
        .iter()
        .filter_map(|p| p["records"].as_f64())
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (xmin, xmax) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min).max(1.0),
        xs.iter().copied().fold(0.0, f64::max).max(10.0),
    );
    let max_of = |i: usize| {
        series
            .iter()
            .flat_map(|(_, v)| v.iter().map(move |t| if i == 0 { t.1 } else { t.2 }))
            .fold(1.0, f64::max)
            * 1.1
    };
    let (w, h, pad) = (440.0, 300.0, 50.0);
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * w + 20.0,
        h + 30.0 + 16.0 * series.len() as f64
    );
    for (panel, title, unit) in [
        (0, "etcd CPU (3 members)", "% of a core"),
        (1, "keep-alive round trip p99", "ms"),
    ] {
        let ox = panel as f64 * (w + 20.0);
        let ymax = max_of(panel);
        let px = |x: f64| {
            ox + pad + (x.ln() - xmin.ln()) / (xmax.ln() - xmin.ln()).max(1e-9) * (w - 2.0 * pad)
        };
        let py = |y: f64| h - pad + 10.0 - y / ymax * (h - 2.0 * pad);
        out.push_str(&format!(
            "<text x=\"{}\" y=\"16\" font-weight=\"bold\">{title} ({unit})</text>\n",
            ox + pad
        ));
        out.push_str(&format!(
            "<line x1=\"{a}\" y1=\"{b}\" x2=\"{c}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{a}\" y1=\"{d}\" x2=\"{a}\" y2=\"{b}\" stroke=\"black\"/>\n",
            a = ox + pad,
            b = py(0.0),
            c = ox + w - pad,
            d = py(ymax)
        ));
        for frac in [0.0, 0.5, 1.0] {
            let y = ymax * frac;
            out.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.0}</text>\n",
                ox + pad - 4.0,
                py(y) + 4.0
            ));
        }
        for x in &xs {
            out.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>\n",
                px(*x),
                py(0.0) + 14.0
            ));
        }
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">records (log)</text>\n",
            ox + w / 2.0,
            py(0.0) + 28.0
        ));
        for (i, (_, v)) in series.iter().enumerate() {
            let pts: Vec<String> = v
                .iter()
                .map(|t| {
                    format!(
                        "{:.1},{:.1}",
                        px(t.0),
                        py(if panel == 0 { t.1 } else { t.2 })
                    )
                })
                .collect();
            out.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                colors[i % colors.len()],
                pts.join(" ")
            ));
        }
    }
    for (i, (name, _)) in series.iter().enumerate() {
        let y = h + 30.0 + 16.0 * i as f64;
        out.push_str(&format!(
            "<rect x=\"{pad}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            y - 4.0,
            colors[i % colors.len()],
            pad + 18.0,
            y
        ));
    }
    out.push_str("</svg>\n");
    out
}
