//! Membership: put → served convergence (the CDF), deregistration on a graceful stop, and a
//! crashed registrar's lease expiring.

use super::*;

pub(crate) async fn convergence(o: &Opts, series: &mut Vec<(String, Vec<f64>)>) -> Vec<Row> {
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
