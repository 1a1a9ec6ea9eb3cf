//! The example templates in `templates/examples/`, each rendered from a real registry and
//! served by a real HAProxy: Host-header routing to a backend per service, and a TCP pool;
//! joins go live (runtime API, no reload) in each.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use e2e::lb::{put_instance, wait_routed, Backend, Lb};
use e2e::{eventually, temp_dir, Etcd};

const T: Duration = Duration::from_secs(15);

fn example(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../templates/examples")
        .join(name)
}

/// Writes an instance of `service` with `meta` as a registrar would (without a lease).
async fn put_with_meta(etcd: &Etcd, service: &str, id: &str, port: u16, meta: &[(&str, &str)]) {
    let mut i = registry::Instance::new(service, id, "127.0.0.1", port);
    i.meta = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    etcd.put(
        &registry::instance_key("/services", service, id),
        &i.encode(),
    )
    .await;
}

/// Status and, for a 200, the instance id that answered `GET /` with `Host: host`.
async fn get_host(port: u16, host: &str) -> Option<(u16, Option<String>)> {
    let client = reqwest::Client::builder().no_proxy().build().ok()?;
    let r = client
        .get(format!("http://127.0.0.1:{port}/"))
        .header("Host", host)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    Some((status, body["id"].as_str().map(String::from)))
}

/// Polls until requests with `Host: host` are answered by exactly `ids`.
async fn wait_host_routed(port: u16, host: &str, ids: &[&str]) {
    let want: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    eventually(T, &format!("{host} served by {want:?}"), || {
        let want = want.clone();
        async move {
            let mut seen = BTreeSet::new();
            for _ in 0..want.len() * 4 {
                if let Some((200, Some(id))) = get_host(port, host).await {
                    seen.insert(id);
                }
            }
            (seen == want).then_some(())
        }
    })
    .await;
}

/// An apply line of the renderer's log that added `server` through the runtime API.
fn joined_live(lb: &Lb, server: &str) -> bool {
    lb.proc.log().lines().any(|l| {
        l.contains("apply revision")
            && l.contains(&format!("added=[\"{server}\"]"))
            && l.contains("applied=\"runtime API\"")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_service_routes_by_host_and_joins_live_per_backend() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (s1, s2) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
    );
    let (a1, a2) = (
        Backend::start(dir.path(), "a1"),
        Backend::start(dir.path(), "a2"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    // `admin` names its host in meta; `webapp` gets webapp.<domain>.
    put_with_meta(&etcd, "admin", "a1", a1.port, &[("host", "Admin.Example")]).await;
    let lb = Lb::start_with_template(
        dir.path(),
        &etcd,
        &example("multi-service.cfg.hbs"),
        &["--var", "domain=test"],
    );
    lb.wait_serving().await;
    let port = lb.http_port;
    wait_host_routed(port, "webapp.test", &["s1", "s2"]).await;
    // The Host header's case and port do not matter.
    wait_host_routed(port, "ADMIN.example:8080", &["a1"]).await;
    assert_eq!(get_host(port, "nobody.test").await.unwrap().0, 404);
    let (reloads, _, _) = lb.proc_state().await;

    // A join in one backend goes live there, without a reload, and the other is untouched.
    put_with_meta(&etcd, "admin", "a2", a2.port, &[("host", "admin.example")]).await;
    wait_host_routed(port, "admin.example", &["a1", "a2"]).await;
    eventually(T, "a2 joined through the runtime API", || async {
        joined_live(&lb, "admin/a2").then_some(())
    })
    .await;
    wait_host_routed(port, "webapp.test", &["s1", "s2"]).await;
    assert_eq!(lb.proc_state().await.0, reloads, "no reload for a join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pool_serves_and_joins_live() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("p{i}")))
        .collect();
    put_instance(&etcd, "pool", "p1", b[0].port).await;
    put_instance(&etcd, "pool", "p2", b[1].port).await;
    let port = e2e::free_port();
    let lb = Lb::start_with_template(
        dir.path(),
        &etcd,
        &example("tcp.cfg.hbs"),
        &["--var", &format!("port={port}"), "--var", "service=pool"],
    );
    // HTTP through the TCP pool: each connection goes to one of the instances.
    wait_routed(port, &["p1", "p2"], T).await;
    assert!(lb.config().contains("mode tcp"));
    let (reloads, _, _) = lb.proc_state().await;
    put_instance(&etcd, "pool", "p3", b[2].port).await;
    wait_routed(port, &["p1", "p2", "p3"], T).await;
    eventually(T, "p3 joined through the runtime API", || async {
        joined_live(&lb, "pool/p3").then_some(())
    })
    .await;
    assert_eq!(lb.proc_state().await.0, reloads, "no reload for a join");
}
