//! etcd trouble: an outage, a 3-member cluster with frozen members and a frozen leader.

use super::*;

pub(crate) async fn outage(o: &Opts) -> Vec<Row> {
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
pub(crate) fn member_in_log(log: &str) -> Option<String> {
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

/// (create_revision, lease) of b0's key, read through the live members (retried while
/// they elect a leader); `None` when the key is absent.
pub(crate) async fn b0_record(c: &e2e::cluster::Cluster) -> Option<(i64, i64)> {
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
