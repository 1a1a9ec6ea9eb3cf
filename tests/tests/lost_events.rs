//! A watch resumed after a cut is verified, not trusted: etcd before 3.4.33 / 3.5.15 drops
//! a delete when a watch starts at the compaction revision (etcd #18089), and a renderer
//! that trusted the resumed watch served the deleted instance forever. Reproduced here on
//! the machine's etcd: the renderer's link to etcd is cut (a loopback proxy), an instance
//! is deleted, another put, the store compacted at the delete's revision, the link opened.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Duration;

use e2e::gate::Gate;
use e2e::lb::{put_instance, template, wait_routed, Backend, Lb};
use e2e::{eventually, http, temp_dir, Etcd};

const T: Duration = Duration::from_secs(30);

/// etcd's version as `etcd --version` prints it.
fn etcd_version() -> (u32, u32, u32) {
    let out = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .unwrap()
        .trim();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    )
}

/// Does this etcd drop a delete at the compaction revision (#18089)?
fn drops_the_delete((major, minor, patch): (u32, u32, u32)) -> bool {
    major == 3 && ((minor == 4 && patch < 33) || (minor == 5 && patch < 15) || minor < 4)
}

async fn metric(port: u16, line_prefix: &str) -> Option<f64> {
    let body = http::get(port, "/metrics", None).await.ok()?.body;
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_etcd_drops_across_a_reconnect_does_not_leave_a_ghost() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let gate = Gate::start(etcd.client_port).await;
    let (s0, ghost, new) = (
        Backend::start(dir.path(), "s0"),
        Backend::start(dir.path(), "ghost"),
        Backend::start(dir.path(), "new"),
    );
    put_instance(&etcd, "webapp", "s0", s0.port).await;
    put_instance(&etcd, "webapp", "ghost", ghost.port).await;
    // No periodic resync: only the re-watch's verification can find the lost delete.
    let lb = Lb::start_on(
        dir.path(),
        &format!("http://127.0.0.1:{}", gate.port),
        &template(),
        &["--resync", "0s"],
    );
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["ghost", "s0"], T).await;

    // The renderer's last revision is the ghost's put; the delete is the next revision.
    gate.cut();
    let mut c = etcd.client().await;
    let deleted = c.delete("/services/webapp/ghost", None).await.unwrap();
    let delete_rev = deleted.header().unwrap().revision();
    put_instance(&etcd, "webapp", "new", new.port).await;
    etcd.etcdctl(&["compact", &delete_rev.to_string()]);
    gate.open();

    eventually(T, "the new instance is in the config", || async {
        lb.config().contains("server new ").then_some(())
    })
    .await;
    eventually(
        T,
        "the deleted instance leaves config and HAProxy",
        || async {
            let gone_from_file = !lb.config().contains("server ghost ");
            let live = lb.running_servers().await;
            (gone_from_file && !live.iter().any(|s| s.contains("ghost"))).then_some(())
        },
    )
    .await;
    wait_routed(lb.http_port, &["new", "s0"], T).await;

    let version = etcd_version();
    let drift = eventually(T, "the drift counter is scraped", || async {
        metric(
            lb.metrics_port,
            "renderer_resync_drift_total{change=\"delete\"} ",
        )
        .await
    })
    .await;
    let log = lb.proc.log();
    if drops_the_delete(version) {
        // This etcd lost the delete: the verification found it, counted and named it.
        assert_eq!(drift, 1.0, "etcd {version:?}: one lost delete counted");
        let warn = log
            .lines()
            .find(|l| l.contains("did not deliver every change"))
            .unwrap_or_else(|| panic!("no drift WARN in:\n{log}"));
        assert!(warn.contains("WARN"), "{warn}");
        assert!(warn.contains("/services/webapp/ghost"), "{warn}");
    } else {
        // A fixed etcd delivered it: a verification must not cry wolf.
        assert_eq!(drift, 0.0, "etcd {version:?}: nothing was lost:\n{log}");
        assert!(!log.contains("did not deliver every change"), "{log}");
    }
    let puts = metric(
        lb.metrics_port,
        "renderer_resync_drift_total{change=\"put\"} ",
    )
    .await;
    assert_eq!(puts, Some(0.0), "the put was delivered: no put drift");
}

/// Runs `lb-renderer status` against `etcd` and the `/status` at `renderer_port`.
fn status(etcd: &Etcd, renderer_port: u16) -> (i32, String) {
    let out = std::process::Command::new(e2e::bin("lb-renderer"))
        .args([
            "status",
            "--endpoints",
            &etcd.endpoint(),
            "--renderer",
            &format!("127.0.0.1:{renderer_port}"),
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_what_a_held_renderer_serves_and_the_registry_lacks() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (a, b) = (
        Backend::start(dir.path(), "a"),
        Backend::start(dir.path(), "b"),
    );
    put_instance(&etcd, "webapp", "a", a.port).await;
    put_instance(&etcd, "webapp", "b", b.port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--empty-hold", "120s"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["a", "b"], T).await;
    let (code, text) = status(&etcd, lb.metrics_port);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("served: exactly the registry (2 instance(s))"),
        "{text}"
    );

    // Both leave at once: the renderer holds them (--empty-hold); status says so.
    etcd.etcdctl(&["del", "--prefix", "/services/webapp/"]);
    let text = eventually(T, "status reports the held instances", || async {
        let (code, text) = status(&etcd, lb.metrics_port);
        (code == 0 && text.contains("served: 2 difference(s)")).then_some(text)
    })
    .await;
    assert!(text.contains("BEHIND"), "{text}");
    assert!(
        text.contains(&format!(
            "served, not in the registry: webapp/a 127.0.0.1:{}",
            a.port
        )),
        "{text}"
    );
    assert!(
        text.contains("served, not in the registry: webapp/b"),
        "{text}"
    );
}

/// Serves one fixed `/status` document on a free loopback port (what a renderer that lost
/// an event would report), until dropped.
struct FakeStatus {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl FakeStatus {
    async fn start(doc: serde_json::Value) -> FakeStatus {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = e2e::free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let body = doc.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        });
        FakeStatus { port, task }
    }
}

impl Drop for FakeStatus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_calls_a_ghost_at_the_renderers_own_revision_drift() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    put_instance(&etcd, "webapp", "s0", 8080).await;
    let mut c = etcd.client().await;
    let r = c.get("/services/webapp/s0", None).await.unwrap();
    let rev = r.header().unwrap().revision();
    let doc = |services: serde_json::Value| {
        serde_json::json!({
            "revision": rev,
            "services": services,
            "last_apply": {"ok": true, "how": "runtime API", "unix_time": 0.0, "took_ms": 1.0, "errors": []},
        })
    };

    // What the registry holds at the renderer's revision: exact.
    let fine = FakeStatus::start(doc(serde_json::json!({"webapp": ["s0 127.0.0.1:8080"]}))).await;
    let (code, text) = status(&etcd, fine.port);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("served: exactly the registry (1 instance(s))"),
        "{text}"
    );

    // A ghost the registry never held at that revision: DRIFT, exit 3, named.
    let ghost = FakeStatus::start(doc(serde_json::json!({
        "webapp": ["ghost 127.0.0.1:9", "s0 127.0.0.1:8080"]
    })))
    .await;
    let (code, text) = status(&etcd, ghost.port);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("DRIFT"), "{text}");
    assert!(
        text.contains("served, not in the registry: webapp/ghost 127.0.0.1:9"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_verification_under_churn_finds_no_drift_where_none_is() {
    // Verifications every 300 ms while keys change all the time: changes in flight at the
    // listing's revision must never be taken for lost events.
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s0 = Backend::start(dir.path(), "s0");
    put_instance(&etcd, "webapp", "s0", s0.port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--resync", "300ms"]);
    lb.wait_serving().await;
    let started = std::time::Instant::now();
    let mut k = 0u32;
    while started.elapsed() < Duration::from_secs(4) {
        let id = format!("churn{}", k % 20);
        if k % 3 == 2 {
            etcd.delete(&format!("/services/webapp/{id}")).await;
        } else {
            put_instance(&etcd, "webapp", &id, 40000 + (k % 1000) as u16).await;
        }
        k += 1;
    }
    let verified = eventually(T, "periodic verifications counted", || async {
        let n = metric(
            lb.metrics_port,
            "renderer_resyncs_total{reason=\"periodic\"} ",
        )
        .await?;
        (n >= 5.0).then_some(n)
    })
    .await;
    for change in ["put", "delete"] {
        let drift = metric(
            lb.metrics_port,
            &format!("renderer_resync_drift_total{{change=\"{change}\"}} "),
        )
        .await;
        assert_eq!(drift, Some(0.0), "{change}: {}", lb.proc.log());
    }
    assert!(
        !lb.proc.log().contains("did not deliver every change"),
        "{k} changes, {verified} verifications:\n{}",
        lb.proc.log()
    );
}
