//! Membership: put → served convergence (the CDF), deregistration on a graceful stop, and a
//! crashed registrar's lease expiring.

use super::*;

pub(crate) async fn convergence(o: &Opts, series: &mut Vec<(String, Vec<f64>)>) -> Vec<Row> {
    // ≥ 2 000 joins: a p99 over fewer is a handful of samples.
    let count = if o.quick { 20 } else { 2000 };
    // JSON logs: the renderer's apply lines carry each stage's time (crate::stages).
    let e = env_with(o, 4, &["--log-format", "json"]).await;
    register_all(&e.etcd, &e.backends[..1]).await;
    until_served(e.lb.http_port, "b0", Duration::from_secs(10)).await;
    let (r0, _, _) = e.lb.proc_state().await;
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    let mut measured = Vec::new();
    let clock = stages::Clock::new();
    // One client for the whole run, as a registrar keeps its connection: the clock
    // starts at the write, not at a TCP and HTTP/2 handshake.
    let mut c = e.etcd.client().await;
    for i in 0..count {
        let b = &e.backends[1 + i % 3];
        let key = registry::instance_key("/services", "webapp", &b.id);
        let port = e.lb.http_port;
        if let Some(j) =
            timed_join(&mut c, &clock, "webapp", b, port, Duration::from_secs(10)).await
        {
            join.push(j.served - j.put);
            measured.push(j);
        }
        // ~10 changes a second, each measured on its own (bursts are the storm scenario's
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
    let (floor_cmds, floor_verify) = haproxy_floor(&e, if o.quick { 20 } else { 500 }).await;
    let applies = stages::apply_lines(&e.lb.proc.log());
    let split = stages::split(&measured, &applies);
    series.push(("put → first request served".into(), join.clone()));
    series.push(("delete → last request served".into(), leave.clone()));
    let mut rows = vec![
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
    ];
    // Each stage's p50 and p99 over the joins whose apply line was found.
    let stage = |i: usize| -> Vec<f64> { split.iter().map(|s| s[i]).collect() };
    for (i, name) in stages::STAGES.iter().enumerate() {
        let v = stage(i);
        let label = if i == 0 {
            format!("stage {name} (n={})", v.len())
        } else {
            format!("stage {name}")
        };
        rows.push(Row::new(
            "convergence",
            format!("{label}: p50"),
            percentile(&v, 50.0),
            "ms",
        ));
        let p99 = Row::new(
            "convergence",
            format!("{label}: p99"),
            percentile(&v, 99.0),
            "ms",
        );
        rows.push(if i == stages::STAGES.len() - 1 {
            p99.at_most(3.0)
        } else {
            p99
        });
    }
    // Our own code on the path, without the HAProxy dialogue (runtime commands, verify):
    // coalescing wait + template data + render + plan + the rest of the apply.
    let own: Vec<f64> = split
        .iter()
        .map(|s| s[2] + s[3] + s[4] + s[5] + s[8])
        .collect();
    rows.push(
        Row::new(
            "convergence",
            "our own code (wait + data + render + plan + rest), p99",
            percentile(&own, 99.0),
            "ms",
        )
        .at_most(3.0),
    );
    for (name, v) in [
        ("runtime API commands", &floor_cmds),
        ("verify", &floor_verify),
    ] {
        for p in [50.0, 99.0] {
            rows.push(Row::new(
                "convergence",
                format!("HAProxy floor (n={}): {name}, the same commands and requests without etcd or renderer, p{p}", v.len()),
                percentile(v, p),
                "ms",
            ));
        }
    }
    if let Some((name, mean)) = stages::tail_culprit(&measured, &split) {
        rows.push(Row::new(
            "convergence",
            format!("slowest 1 % of joins: largest stage = {name}, mean"),
            mean,
            "ms",
        ));
    }
    rows.extend([
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
    ]);
    rows
}

/// HAProxy's floor under the join's runtime stages: the same commands a join sends (the
/// renderer's own plan, execute and verify), straight to the master CLI with no etcd and no
/// renderer in between, `n` times — a server added, verified, then removed again. Returns
/// (commands, verify) in ms.
async fn haproxy_floor(e: &Env, n: usize) -> (Vec<f64>, Vec<f64>) {
    use renderer::apply::{plan, runtime};
    let old = std::fs::read_to_string(&e.lb.cfg).unwrap();
    let Some(line) = old
        .lines()
        .find(|l| l.trim_start().starts_with("server b0 "))
    else {
        return (Vec::new(), Vec::new());
    };
    // b0's line as the template writes it, for another name and id.
    let words: Vec<String> = line
        .split_whitespace()
        .scan("", |prev, w| {
            let out = match (*prev, w) {
                ("server" | "cookie", "b0") => "floor".to_string(),
                ("id", _) => "9999".to_string(),
                _ => w.to_string(),
            };
            *prev = w;
            Some(out)
        })
        .collect();
    let new = old.replacen(line, &format!("{line}\n    {}", words.join(" ")), 1);
    let (Some(join), Some(leave)) = (plan::plan(&old, &new), plan::plan(&new, &old)) else {
        return (Vec::new(), Vec::new());
    };
    let cli = renderer::haproxy::MasterCli::new(&e.lb.master);
    let (mut cmds, mut verify) = (Vec::new(), Vec::new());
    // Under the same traffic as a measured join: requests one after another through
    // HAProxy (what until_served sends while the join is applied).
    let port = e.lb.http_port;
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                let _ = http::get(port, "/", None).await;
            }
        }
    });
    for _ in 0..n {
        let t = Instant::now();
        runtime::execute(&cli, &join, Duration::from_secs(1))
            .await
            .unwrap();
        let v = Instant::now();
        runtime::verify(&cli, &join).await.unwrap();
        cmds.push(ms(v - t));
        verify.push(ms(v.elapsed()));
        runtime::execute(&cli, &leave, Duration::from_secs(1))
            .await
            .unwrap();
        // The same spacing as the joins measured through etcd.
        tokio::time::sleep(Duration::from_millis(45)).await;
    }
    stop.cancel();
    let _ = traffic.await;
    (cmds, verify)
}

pub(crate) async fn deregister(o: &Opts) -> Vec<Row> {
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

pub(crate) async fn crash(o: &Opts) -> Vec<Row> {
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
