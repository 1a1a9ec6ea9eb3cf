//! Footprint: memory and CPU of each process at rest and under churn; `idle` against a
//! default etcd.

use super::*;

pub(crate) async fn footprint(o: &Opts) -> Vec<Row> {
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
