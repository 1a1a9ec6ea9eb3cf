//! Scale: 10 000 servers (joins, leaves, storms and checks at size), 100 000 instances in
//! 1 000 services (`wide`), and what a verifying listing costs etcd.

use super::*;

/// One size of the scale scenario: `n` weight-0 filler instances (closed ports) in one
/// backend, plus the live backend b0 joining and leaving.
pub(crate) struct ScaleEnv {
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
pub(crate) async fn checks_run(lb: &Lb) -> f64 {
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
pub(crate) async fn storm_at_scale(s: &ScaleEnv, n: usize) -> Vec<Row> {
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

pub(crate) async fn scale(o: &Opts) -> Vec<Row> {
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
pub(crate) const WIDE_TEMPLATE: &str = r#"global
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
pub(crate) async fn wide(o: &Opts) -> Vec<Row> {
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
    let lb = Lb::start_with_template(dir.path(), &etcd, &template, &["--log-format", "json"]);
    let count = || async {
        lb.master_cli("@1 show servers state")
            .await
            .lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 4)
            .count()
    };
    // Each look reads every server's state (~100 MB at 1 000 000): look less often there.
    let (wait, every) = (
        Duration::from_secs(300.max(total as u64 / 1000)),
        Duration::from_millis(50.max(total as u64 / 1000)),
    );
    let deadline = Instant::now() + wait;
    let mut first = None;
    while Instant::now() < deadline {
        if count().await >= total {
            first = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(every).await;
    }
    let mut joins = Vec::new();
    let mut measured = Vec::new();
    let clock = stages::Clock::new();
    let mut c = etcd.client().await;
    let n = if o.quick { 3 } else { 20 };
    for _ in 0..n {
        let joined = timed_join(
            &mut c,
            &clock,
            "svc0000",
            &b,
            lb.http_port,
            Duration::from_secs(60),
        )
        .await;
        joins.push(joined.as_ref().map_or(f64::NAN, |j| j.served - j.put));
        measured.extend(joined);
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
    let split = stages::split(&measured, &stages::apply_lines(&lb.proc.log()));
    // Each join's total and stages, for a look at the spread behind the p50s.
    if let Ok(path) = std::env::var("BENCH_WIDE_JOINS") {
        let json = serde_json::json!({"put_to_served_ms": joins, "stages": stages::STAGES, "split_ms": split});
        std::fs::write(&path, json.to_string()).expect("write BENCH_WIDE_JOINS");
    }
    // HAProxy's side of a verification at this size, asked by hand: every backend's id
    // (a new session each time, so never from the renderer's per-session memory) and one
    // server's row.
    let (mut ids_ms, mut row_ms) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let cli = renderer::haproxy::MasterCli::new(&lb.master);
        let t = Instant::now();
        let ids = cli.backend_ids().await.unwrap_or_default();
        ids_ms.push(ms(t.elapsed()));
        let iid = ids.get("be_svc0000").copied().unwrap_or(0);
        for _ in 0..4 {
            let t = Instant::now();
            let _ = cli.show_stat_server(iid, 1).await;
            row_ms.push(ms(t.elapsed()));
        }
    }
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
            format!("{label}: join, put → served p50 (n={n})"),
            percentile(&joins, 50.0),
            "ms",
        )
        .at_most(10.0),
        Row::new("wide", format!("{label}: reloads during joins"), f64::from(reloads), ""),
        Row::new(
            "wide",
            format!("{label}: renderer RSS"),
            rss_kib(lb.proc.pid()) / 1024.0,
            "MiB",
        )
        .at_most(150.0),
    ];
    rows.push(Row::new(
        "wide",
        format!("{label}: HAProxy: every backend's id (show stat -1 2 -1), p50 (n=5)"),
        percentile(&ids_ms, 50.0),
        "ms",
    ));
    rows.push(Row::new(
        "wide",
        format!("{label}: HAProxy: one server's row (show stat IID 4 SID), p50 (n=20)"),
        percentile(&row_ms, 50.0),
        "ms",
    ));
    // Where a join's time goes at this size (p50 of each stage).
    for (i, name) in stages::STAGES.iter().enumerate().skip(2) {
        let v: Vec<f64> = split.iter().map(|s| s[i]).collect();
        rows.push(Row::new(
            "wide",
            format!("{label}: join stage {name}, p50"),
            percentile(&v, 50.0),
            "ms",
        ));
    }
    rows.extend(resync);
    rows
}

/// What one verifying listing (`--resync`, every re-watch) costs at this size: the
/// renderer's own listing code against the scenario's etcd, 5 times: wall time, etcd CPU
/// and the lister's CPU (this process: decoding, as the renderer does) per listing.
pub(crate) async fn resync_cost(scenario: &'static str, label: &str, etcd: &Etcd) -> Vec<Row> {
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
