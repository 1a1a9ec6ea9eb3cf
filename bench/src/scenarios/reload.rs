//! Reload safety under load, and storms of changes coalesced into few reloads.

use super::*;

pub(crate) async fn reload_safety(o: &Opts) -> Vec<Row> {
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

pub(crate) async fn storm(o: &Opts) -> Vec<Row> {
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
