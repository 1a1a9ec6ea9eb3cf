//! The deploy/ stack for real: images built locally by deploy/images.sh (no registry),
//! docker-compose up, scale the web tier up and down under load, kill a web app, stop and
//! start etcd, sticky sessions. Ports are published on 127.0.0.1 only.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::compose::{build_images, Stack};
use e2e::load::Load;
use e2e::{eventually, http, stays};

const T: Duration = Duration::from_secs(60);

/// When HAProxy's container started (a reload must not restart it).
fn ha_started_at(stack: &Stack) -> String {
    let id = stack.stdout(&["ps", "-q", "ha"]);
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.StartedAt}}", &id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_scales_without_config_edits() {
    build_images();
    let stack = Stack::new("lbe2e", &[]);
    stack.compose(&["up", "-d", "--scale", "webapp=2"]);
    let two = stack.wait_ids(2, T).await;
    let stats = eventually(T, "stats page lists both", || async {
        let body = http::get(stack.stats_port, "/;csv", None).await.ok()?.body;
        two.iter()
            .all(|id| body.contains(&format!("nodes,{id},")))
            .then_some(body)
    })
    .await;
    assert!(stats.contains("nodes,BACKEND"));
    let started = ha_started_at(&stack);

    // Scale up under load: new web apps get traffic within seconds, nothing fails.
    let load = Load::start(stack.http_port, 20, 8, false);
    let t = Instant::now();
    stack.compose(&["up", "-d", "--scale", "webapp=5", "--no-recreate"]);
    stack.wait_ids(5, T).await;
    eprintln!(
        "scale 2 -> 5 served after {:?} (compose returned included)",
        t.elapsed()
    );
    // Scale down under the same load: removed ones drain out, nothing fails.
    stack.compose(&["up", "-d", "--scale", "webapp=2", "--no-recreate"]);
    stack.wait_ids(2, T).await;
    let result = load.finish();
    eprintln!(
        "load during scaling: {} requests, {} failed",
        result.requests,
        result.failed()
    );
    assert!(result.requests > 100, "{}", result.raw);
    assert_eq!(result.failed(), 0, "{}", result.raw);
    assert_eq!(
        ha_started_at(&stack),
        started,
        "HAProxy container never restarted"
    );

    // Sticky sessions: the NODESESSID cookie pins a client to one web app.
    let first = http::get(stack.http_port, "/", None).await.unwrap();
    let cookie = first
        .headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .filter_map(|(_, v)| v.split(';').next())
        .find(|c| c.starts_with("NODESESSID="))
        .expect("NODESESSID cookie")
        .to_string();
    let pinned = first.instance_id().unwrap();
    for _ in 0..8 {
        let again = http::get(stack.http_port, "/", Some(&cookie))
            .await
            .unwrap();
        assert_eq!(again.instance_id().as_deref(), Some(pinned.as_str()));
    }

    // docker kill: no graceful stop, the lease expires after the TTL (5s).
    let ids: Vec<String> = stack
        .stdout(&["ps", "-q", "webapp"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 2);
    let t = Instant::now();
    let killed = Command::new("docker")
        .args(["kill", &ids[0]])
        .output()
        .unwrap();
    assert!(killed.status.success());
    stack.wait_ids(1, T).await;
    eprintln!("docker kill -> out of rotation after {:?}", t.elapsed());

    // etcd stopped and started: traffic keeps flowing, the registration comes back.
    stack.compose(&["stop", "etcd"]);
    stays(
        Duration::from_secs(3),
        "traffic flows while etcd is down",
        || async {
            http::get(stack.http_port, "/", None)
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false)
        },
    )
    .await;
    stack.compose(&["start", "etcd"]);
    eventually(T, "registration back in etcd", || async {
        let out = stack.try_stdout(&[
            "exec",
            "-T",
            "etcd",
            "etcdctl",
            "get",
            "--prefix",
            "/services/",
            "--keys-only",
        ])?;
        (out.lines().filter(|l| !l.is_empty()).count() == 1).then_some(())
    })
    .await;
    stack.wait_ids(1, T).await;
}
