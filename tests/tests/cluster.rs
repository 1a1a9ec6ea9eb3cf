//! Against a three-member etcd cluster: the leader killed during registrar churn, the
//! member under the renderer's watch frozen, and two renderers converging byte for byte.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::cluster::Cluster;
use e2e::lb::{template, wait_routed, Backend, Lb};
use e2e::load::Load;
use e2e::{bin, eventually, temp_dir, Proc};
use etcd_client::Client;

const T: Duration = Duration::from_secs(30);

async fn put(c: &Cluster, id: &str, port: u16) {
    let v = registry::Instance::new("webapp", id, "127.0.0.1", port).encode();
    let key = format!("/services/webapp/{id}");
    // A write may fail while the cluster elects a leader: retry, bounded.
    eventually(T, "put accepted", || {
        let (key, v) = (key.clone(), v.clone());
        async move {
            let mut client = c.client().await;
            tokio::time::timeout(Duration::from_secs(2), client.put(key, v, None))
                .await
                .ok()?
                .ok()
        }
    })
    .await;
}

async fn lease_of(c: &Cluster, id: &str) -> Option<i64> {
    let mut client = c.client().await;
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        client.get(format!("/services/webapp/{id}"), None),
    )
    .await
    .ok()?
    .ok()?;
    r.kvs().first().map(|kv| kv.lease())
}

fn registrar(dir: &std::path::Path, c: &Cluster, b: &Backend) -> Proc {
    let cmd = e2e::registrar_command(&c.endpoints(), &b.id, b.port, "3s");
    Proc::spawn(&format!("registrar-{}", b.id), dir, cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_registrar_churn_loses_nothing() {
    let dir = temp_dir();
    let mut cluster = Cluster::start(dir.path(), 3).await;
    let b: Vec<Backend> = (0..4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    let mut regs: Vec<Proc> = b[..3]
        .iter()
        .map(|x| registrar(dir.path(), &cluster, x))
        .collect();
    let lbdir = dir.path().join("lb");
    std::fs::create_dir_all(&lbdir).unwrap();
    let lb = Lb::start_on(&lbdir, &cluster.endpoints(), &template(), &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0", "s1", "s2"], T).await;
    let mut leases = Vec::new();
    for id in ["s0", "s1", "s2"] {
        leases.push(lease_of(&cluster, id).await.unwrap());
    }

    let load = Load::start(lb.http_port, 12, 8, false);
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let killed_at = Instant::now();
    // Registrar churn while the cluster elects a new leader: s3 joins and leaves.
    for _ in 0..3 {
        let mut r = registrar(dir.path(), &cluster, &b[3]);
        wait_routed(lb.http_port, &["s0", "s1", "s2", "s3"], T).await;
        r.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(r.exited(T).await.is_some());
        wait_routed(lb.http_port, &["s0", "s1", "s2"], T).await;
    }
    eprintln!(
        "3 join/leave rounds after killing the leader took {:?}",
        killed_at.elapsed()
    );
    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);
    // The live registrations kept their leases through the election.
    for (i, id) in ["s0", "s1", "s2"].iter().enumerate() {
        assert_eq!(
            lease_of(&cluster, id).await,
            Some(leases[i]),
            "{id} kept its lease"
        );
    }
    // And a dead one still expires.
    cluster.restart(leader).await;
    regs[2].kill();
    let t = Instant::now();
    wait_routed(lb.http_port, &["s0", "s1"], T).await;
    eprintln!(
        "SIGKILLed registrar out of rotation after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// Bound for "an accepted change is served" while one member is frozen (the goal:
/// p50 ≤ 1.5 s, never later than 3 s): the renderer notices a silent watch within
/// 0.25 s + 1 s (progress request unanswered) and re-watches on another member.
const FROZEN_MEMBER_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_under_the_watch_is_left_for_another() {
    let dir = temp_dir();
    let cluster = Cluster::start(dir.path(), 3).await;
    // A fresh instance per round: a write that timed out against a frozen member may still
    // be applied later, so rounds that put and delete the same key could undo each other.
    let b: Vec<Backend> = (0..7)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put(&cluster, "s0", b[0].port).await;
    let lbdir = dir.path().join("lb");
    std::fs::create_dir_all(&lbdir).unwrap();
    let lb = Lb::start_on(&lbdir, &cluster.endpoints(), &template(), &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0"], T).await;
    // Freeze each member in turn, twice round (one of them carries the renderer's watch at
    // any time); a change accepted meanwhile by the others must be served within the bound.
    let mut took = Vec::new();
    for round in 0..6 {
        let frozen = round % 3;
        cluster.freeze(frozen);
        let x = &b[round + 1];
        let key = format!("/services/webapp/{}", x.id);
        let v = registry::Instance::new("webapp", &x.id, "127.0.0.1", x.port).encode();
        // Written through the members that still answer (retrying across an election).
        eventually(T, "change accepted by the live members", || {
            let (key, v) = (key.clone(), v.clone());
            let cluster = &cluster;
            async move {
                let mut c = cluster.client_without(frozen).await;
                tokio::time::timeout(Duration::from_secs(2), c.put(key, v, None))
                    .await
                    .ok()?
                    .ok()
            }
        })
        .await;
        let t = Instant::now();
        let want: Vec<String> = (0..=round + 1).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = want.iter().map(String::as_str).collect();
        wait_routed(lb.http_port, &refs, T).await;
        took.push(t.elapsed());
        eprintln!(
            "round {round}: member {frozen} frozen, change served {:?} after it was accepted",
            t.elapsed()
        );
        cluster.thaw(frozen);
        cluster.leader().await;
    }
    took.sort();
    eprintln!(
        "frozen member: change served p50 {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert!(
        took.iter().all(|t| *t <= FROZEN_MEMBER_BOUND),
        "every change served within {FROZEN_MEMBER_BOUND:?}: {took:?}"
    );
}

/// (create_revision, lease) of s0's key: both stay the same while one registration is kept.
/// The `etcd` on PATH has etcd #15247 (a leader that resumes after a stall revokes the
/// leases it thinks expired): before 3.4.28, and 3.5 before 3.5.11.
fn etcd_revokes_leases_on_resume() -> bool {
    let out = Command::new("etcd")
        .arg("--version")
        .output()
        .expect("etcd --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u32> = text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .unwrap_or("0.0.0")
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    match (v.first(), v.get(1), v.get(2)) {
        (Some(3), Some(4), Some(p)) => *p < 28,
        (Some(3), Some(5), Some(p)) => *p < 11,
        (Some(3), Some(m), _) => *m < 4,
        _ => false,
    }
}

async fn s0_record(c: &Cluster) -> (i64, i64) {
    // Retried: right after a thaw the members may still be electing a leader.
    let r = eventually(T, "a live member answers a read with s0", || async {
        let mut client = c.client().await;
        let get = client.get("/services/webapp/s0", None);
        let r = tokio::time::timeout(Duration::from_secs(2), get)
            .await
            .ok()?
            .ok()?;
        (!r.kvs().is_empty()).then_some(r)
    })
    .await;
    let kv = &r.kvs()[0];
    (kv.create_revision(), kv.lease())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_does_not_cost_a_registration() {
    let dir = temp_dir();
    let mut cluster = Cluster::start(dir.path(), 3).await;
    let b: Vec<Backend> = (0..2)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    let _reg = registrar(dir.path(), &cluster, &b[0]);
    let lbdir = dir.path().join("lb");
    std::fs::create_dir_all(&lbdir).unwrap();
    let lb = Lb::start_on(&lbdir, &cluster.endpoints(), &template(), &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0"], T).await;
    let before = s0_record(&cluster).await;
    // As seen in the field: the leader killed and restarted, then the new leader frozen
    // for three TTLs of the registrar (--ttl 3s).
    let first = cluster.leader().await;
    cluster.kill(first);
    cluster.restart(first).await;
    let second = cluster.leader().await;
    cluster.freeze(second);
    let frozen_at = Instant::now();
    put(&cluster, "s1", b[1].port).await;
    let t = Instant::now();
    wait_routed(lb.http_port, &["s0", "s1"], T).await;
    eprintln!(
        "leader {second} frozen: change served {:?} after it was accepted",
        t.elapsed()
    );
    // The registration must hold through it: never absent when a live member answers.
    let hold = Duration::from_secs(9).saturating_sub(frozen_at.elapsed());
    e2e::stays(
        hold,
        "s0 stays registered while the leader is frozen",
        || async {
            let mut c = cluster.client_without(second).await;
            match tokio::time::timeout(Duration::from_secs(1), c.get("/services/webapp/s0", None))
                .await
            {
                Ok(Ok(r)) => !r.kvs().is_empty(),
                _ => true, // no answer (election under way): nothing learnt
            }
        },
    )
    .await;
    cluster.thaw(second);
    let after = s0_record(&cluster).await;
    if etcd_revokes_leases_on_resume() {
        // etcd #15247 (fixed in 3.4.28 / 3.5.11; Debian 12 ships 3.4.23): the resumed
        // leader may revoke every lease before it learns it was deposed. The registrar
        // registers again (s0_record waited for it); keeping the same lease is not ours to
        // promise there. The chaos run found this; the renderer's --empty-hold covers it.
        eprintln!("etcd with #15247: registration {before:?} -> {after:?}");
    } else {
        assert_eq!(
            before, after,
            "create_revision and lease unchanged: the registration was kept, not redone"
        );
    }
    wait_routed(lb.http_port, &["s0", "s1"], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_renderers_under_churn_end_with_identical_configs() {
    let dir = temp_dir();
    let cluster = Cluster::start(dir.path(), 3).await;
    let b: Vec<Backend> = (0..4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put(&cluster, "s0", b[0].port).await;
    let lbs: Vec<Lb> = (0..2)
        .map(|i| {
            let d = dir.path().join(format!("lb{i}"));
            std::fs::create_dir_all(&d).unwrap();
            Lb::start_on(&d, &cluster.endpoints(), &template(), &[])
        })
        .collect();
    for lb in &lbs {
        lb.wait_serving().await;
    }
    let mut client: Client = cluster.client().await;
    for i in 0..40usize {
        let x = &b[1 + i % 3];
        let key = format!("/services/webapp/{}", x.id);
        if (i / 3) % 2 == 0 {
            let v = registry::Instance::new("webapp", &x.id, "127.0.0.1", x.port).encode();
            client.put(key, v, None).await.unwrap();
        } else {
            client.delete(key, None).await.unwrap();
        }
    }
    let mut want: Vec<String> = client
        .get(
            "/services/webapp/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            String::from_utf8_lossy(kv.key())
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    want.sort();
    eventually(T, "both renderers applied the final set", || async {
        lbs.iter()
            .all(|lb| lb.config_servers() == want)
            .then_some(())
    })
    .await;
    let (a, b) = (lbs[0].config(), lbs[1].config());
    // The files differ only in the per-LB variables (ports, runtime dir) given on the
    // command line; normalise those and compare the rest byte for byte.
    let norm = |cfg: &str, lb: &Lb, dir: &str| {
        cfg.replace(&lb.http_port.to_string(), "HTTP")
            .replace(&lb.stats_port.to_string(), "STATS")
            .replace(dir, "DIR")
    };
    let da = dir.path().join("lb0").display().to_string();
    let db = dir.path().join("lb1").display().to_string();
    assert_eq!(norm(&a, &lbs[0], &da), norm(&b, &lbs[1], &db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_loses_its_leader_cancels_the_watch_instead_of_going_silent() {
    let dir = temp_dir();
    let cluster = Cluster::start(dir.path(), 3).await;
    let b: Vec<Backend> = (0..3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put(&cluster, "s0", b[0].port).await;
    // The renderer talks to member 0 only, so its watch is there.
    let lbdir = dir.path().join("lb");
    std::fs::create_dir_all(&lbdir).unwrap();
    let lb = Lb::start_on(&lbdir, &cluster.endpoint(0), &template(), &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0"], T).await;
    // Members 1 and 2 stop answering: member 0 is alive but has no quorum, hence no leader.
    cluster.freeze(1);
    cluster.freeze(2);
    let t = Instant::now();
    eventually(T, "watch cancelled for lack of a leader", || async {
        let log = lb.proc.log();
        (log.contains("no leader") || log.contains("cancelled by etcd")).then_some(())
    })
    .await;
    eprintln!("leader lost -> watch cancelled after {:?}", t.elapsed());
    cluster.thaw(1);
    cluster.thaw(2);
    // Back to a quorum: the watch resumes from its revision and nothing is missed.
    put(&cluster, "s1", b[1].port).await;
    wait_routed(lb.http_port, &["s0", "s1"], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_instances_across_a_hundred_services_list_in_pages() {
    let dir = temp_dir();
    let cluster = Cluster::start(dir.path(), 3).await;
    // 10 000 records, written by 8 concurrent writers.
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let mut client = cluster.client().await;
        writers.push(tokio::spawn(async move {
            for n in (w..10_000).step_by(8) {
                let (svc, id) = (format!("svc{:02}", n / 100), format!("i{n:05}"));
                let v = registry::Instance::new(&svc, &id, "10.0.0.1", 1000 + (n % 60_000) as u16)
                    .encode();
                client
                    .put(format!("/services/{svc}/{id}"), v, None)
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let t = dir.path().join("count.hbs");
    std::fs::write(&t, "{{#each services}}{{@key}} {{len this}}\n{{/each}}").unwrap();
    let started = Instant::now();
    let out = Command::new(bin("lb-renderer"))
        .args([
            "--endpoints",
            &cluster.endpoints(),
            "--dry-run",
            "--template",
        ])
        .arg(format!("{}:/dev/null", t.display()))
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 100, "100 services");
    assert!(
        lines.iter().all(|l| l.ends_with(" 100")),
        "100 instances each: {text}"
    );
    eprintln!("list + render of 10 000 instances (process start included): {took:?}");
    assert!(took < Duration::from_secs(10), "generous bound: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_member_does_not_stall_the_renderer() {
    use e2e::netns::Netns;
    let dir = temp_dir();
    let ns = Netns::create();
    // m0 lives in its own network namespace; m1 and m2 on the host side of the veth link.
    let cluster = Cluster::start_placed(
        dir.path(),
        &[
            ("10.231.0.2", Some(ns.name.as_str())),
            ("10.231.0.1", None),
            ("10.231.0.1", None),
        ],
    )
    .await;
    let b: Vec<Backend> = (0..4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put(&cluster, "s0", b[0].port).await;
    let lbdir = dir.path().join("lb");
    std::fs::create_dir_all(&lbdir).unwrap();
    let lb = Lb::start_on(&lbdir, &cluster.endpoints(), &template(), &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0"], T).await;
    // A second renderer that can only reach m0: its watch is certainly on the partitioned
    // member.
    let lbdir2 = dir.path().join("lb-m0");
    std::fs::create_dir_all(&lbdir2).unwrap();
    let lb_m0 = Lb::start_on(&lbdir2, &cluster.endpoint(0), &template(), &[]);
    lb_m0.wait_serving().await;
    wait_routed(lb_m0.http_port, &["s0"], T).await;

    // Partition m0 from its peers only (iptables inside the test's own namespace, both
    // directions of every peer connection): clients can still reach it, but it has no
    // quorum and so no leader.
    let peer_rules = |op: &str| {
        let others = [cluster.peer_port(1), cluster.peer_port(2)];
        ns.cut_peers(cluster.peer_port(0), &others, op == "-A");
    };
    peer_rules("-A");
    let t = Instant::now();
    // The renderer stuck with m0 does not sit on a silent stream: m0 loses its leader and
    // cancels the require-leader watch; the renderer keeps the last good config meanwhile.
    eventually(T, "m0 cancels the watch for lack of a leader", || async {
        let log = lb_m0.proc.log();
        (log.contains("no leader") || log.contains("cancelled by etcd")).then_some(())
    })
    .await;
    eprintln!(
        "m0 partitioned: watch on m0 cancelled after {:?}",
        t.elapsed()
    );
    // The majority keeps working, and so does the renderer that can reach it.
    let t = Instant::now();
    for (i, id) in ["s1", "s2"].iter().enumerate() {
        put(&cluster, id, b[i + 1].port).await;
    }
    wait_routed(lb.http_port, &["s0", "s1", "s2"], T).await;
    eprintln!(
        "m0 partitioned: changes applied through the majority after {:?}",
        t.elapsed()
    );
    wait_routed(lb_m0.http_port, &["s0"], T).await;

    // Heal: nothing was missed, the config equals the registry.
    peer_rules("-D");
    put(&cluster, "s3", b[3].port).await;
    wait_routed(lb.http_port, &["s0", "s1", "s2", "s3"], T).await;
    // The m0-only renderer catches up with everything it missed.
    wait_routed(lb_m0.http_port, &["s0", "s1", "s2", "s3"], T).await;
    eventually(T, "both configs equal the registry", || async {
        let want = ["s0", "s1", "s2", "s3"];
        (lb.config_servers() == want && lb_m0.config_servers() == want).then_some(())
    })
    .await;
    drop(cluster);
    drop(ns);
}
