//! A rolling etcd upgrade under load: three members on this machine's etcd (Debian 12:
//! 3.4.23), registrars (`--ttl 3s`, HTTP health check) and two load balancers under wrk;
//! each member in turn (followers first, the leader last) stopped with SIGTERM and started
//! on another etcd (Debian 13's 3.5.16, chrooted by scripts/with-debian.sh) with the same
//! data directory. Measures what operators care about: failed requests, registrations
//! lost (an instance whose key was re-created or is missing), each member's version and
//! the cluster version afterwards, and the time of each step. Used by `bench upgrade` and
//! the e2e suite.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::lb::{template, wait_routed, Backend, Lb};
use crate::load::Load;
use crate::{http, registrar_command, Proc};

/// The etcd of another Debian release: the wrapper scripts/with-debian.sh makes (building
/// the root on first use).
pub fn etcd_of(suite: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/with-debian.sh"))
        .args([suite, "--", "sh", "-c", "command -v etcd"])
        .current_dir(&root)
        .output()
        .expect("scripts/with-debian.sh");
    assert!(
        out.status.success(),
        "with-debian.sh {suite}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// What to run.
pub struct Options {
    /// The etcd every member moves to.
    pub to: PathBuf,
    pub apps: usize,
    /// How long to watch after each step before the next (registrations must hold).
    pub settle: Duration,
}

/// key → create revision of every registration.
async fn registrations(c: &mut Client) -> BTreeMap<String, i64> {
    let resp = c
        .get("/services/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("list registrations");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.create_revision(),
            )
        })
        .collect()
}

/// Each member's server version (`status`), and the cluster version (`/version`).
async fn versions(cluster: &Cluster, n: usize) -> (Vec<String>, Option<String>) {
    let mut out = Vec::new();
    for i in 0..n {
        let v = async {
            let mut c = Client::connect([cluster.endpoint(i)], None).await.ok()?;
            let s = tokio::time::timeout(Duration::from_secs(2), c.status())
                .await
                .ok()?
                .ok()?;
            Some(s.version().to_string())
        }
        .await;
        out.push(v.unwrap_or_else(|| "unreachable".into()));
    }
    let cluster_version = http::get(cluster.client_port(0), "/version", None)
        .await
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .and_then(|v| v["etcdcluster"].as_str().map(str::to_string));
    (out, cluster_version)
}

/// Runs the upgrade; the JSON report (see the module doc).
pub async fn run(o: &Options) -> Value {
    let tmp = crate::temp_dir();
    let dir = tmp.path();
    let started = Instant::now();
    let mut cluster = Cluster::start(dir, 3).await;
    let endpoints = cluster.endpoints();
    let (versions_before, cluster_before) = versions(&cluster, 3).await;

    let mut apps = Vec::new();
    let mut registrars = Vec::new();
    for i in 0..o.apps {
        let id = format!("app{i}");
        let b = Backend::start(dir, &id);
        let mut cmd = registrar_command(&endpoints, &id, b.port, "3s");
        cmd.args([
            "--health-http",
            &format!("http://127.0.0.1:{}/health", b.port),
            "--health-interval",
            "500ms",
        ]);
        registrars.push(Proc::spawn(&format!("registrar-{id}"), dir, cmd));
        apps.push(b);
    }
    let ids: Vec<String> = apps.iter().map(|b| b.id.clone()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut lbs = Vec::new();
    for k in 0..2 {
        let d = dir.join(format!("lb{k}"));
        std::fs::create_dir_all(&d).expect("lb dir");
        lbs.push(Lb::start_on(&d, &endpoints, &template(), &[]));
    }
    for lb in &lbs {
        wait_routed(lb.http_port, &id_refs, Duration::from_secs(60)).await;
    }
    let mut c = cluster.client().await;
    let before = registrations(&mut c).await;
    drop(c);

    // Load for longer than the upgrade can take; stopped at the end.
    let loads: Vec<Load> = lbs
        .iter()
        .map(|lb| Load::start(lb.http_port, 600, 4, false))
        .collect();

    // Followers first, the leader last (one election instead of up to three).
    let leader = cluster.leader().await;
    let order: Vec<usize> = (0..3).filter(|i| *i != leader).chain([leader]).collect();
    let mut steps = Vec::new();
    for i in order {
        let t = Instant::now();
        let at_ms = started.elapsed().as_millis() as u64;
        cluster.upgrade(i, &o.to).await;
        let up_ms = t.elapsed().as_millis() as u64;
        let leader_now = cluster.leader().await;
        let ready_ms = t.elapsed().as_millis() as u64;
        tokio::time::sleep(o.settle).await;
        let (v, _) = versions(&cluster, 3).await;
        steps.push(json!({
            "member": i,
            "was_leader": i == leader,
            "at_ms": at_ms,
            "stopped_and_answering_ms": up_ms,
            "leader_after_ms": ready_ms,
            "leader_after": leader_now,
            "versions": v,
        }));
    }
    // Everything still served after the last step.
    let mut serving_all = true;
    for lb in &lbs {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ok = false;
        while Instant::now() < deadline {
            let served = crate::lb::served_ids(lb.http_port, 40).await;
            if ids.iter().all(|id| served.contains_key(id)) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        serving_all &= ok;
    }
    let results: Vec<_> = loads.into_iter().map(Load::stop).collect();
    let mut c = cluster.client().await;
    let after = registrations(&mut c).await;
    let lost: Vec<&String> = before
        .iter()
        .filter(|(k, rev)| after.get(*k) != Some(rev))
        .map(|(k, _)| k)
        .collect();
    let (versions_after, cluster_after) = versions(&cluster, 3).await;
    let total: u64 = results.iter().map(|r| r.requests).sum();
    let failed: u64 = results.iter().map(|r| r.failed()).sum();
    // Registrar logs: a re-registration would show here too.
    let reregistered = registrars
        .iter()
        .filter(|r| r.log().matches("lease: registered").count() > 1)
        .count();
    json!({
        "from": versions_before,
        "cluster_version_before": cluster_before,
        "requests": {"total": total, "failed": failed},
        "registrations": before.len(),
        "registrations_lost": lost.len(),
        "lost": lost,
        "registrars_that_registered_again": reregistered,
        "versions_after": versions_after,
        "cluster_version_after": cluster_after,
        "load_balancers_serving_every_instance_after": serving_all,
        "steps": steps,
        "duration_s": started.elapsed().as_secs_f64(),
    })
}
