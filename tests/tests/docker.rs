//! The deploy/ stack for real: images built locally by deploy/images.sh (no registry),
//! docker-compose up, scale the web tier up and down under load, kill a web app, stop and
//! start etcd, sticky sessions. Ports are published on 127.0.0.1 only.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::load::Load;
use e2e::{eventually, free_port, http, stays};

const T: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Stack {
    project: String,
    http_port: u16,
    stats_port: u16,
}

impl Stack {
    fn compose(&self, args: &[&str]) -> Output {
        let out = Command::new("docker-compose")
            .current_dir(root())
            .args(["-p", &self.project, "-f", "deploy/docker-compose.yml"])
            .args(args)
            .env("HTTP_PORT", self.http_port.to_string())
            .env("STATS_PORT", self.stats_port.to_string())
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("COOKIE_KEY", "e2e-secret")
            .output()
            .expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.compose(args).stdout).into_owned()
    }

    /// Distinct web-app ids answering through HAProxy over `n` requests.
    async fn ids(&self, n: usize) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        for _ in 0..n {
            if let Ok(r) = http::get(self.http_port, "/", None).await {
                if let Some(id) = r.instance_id() {
                    seen.insert(id);
                }
            }
        }
        seen
    }

    async fn wait_ids(&self, count: usize) -> BTreeSet<String> {
        eventually(T, &format!("{count} web apps in rotation"), || async {
            let seen = self.ids(count * 6).await;
            (seen.len() == count).then_some(seen)
        })
        .await
    }

    fn ha_started_at(&self) -> String {
        let id = self.stdout(&["ps", "-q", "ha"]).trim().to_string();
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.StartedAt}}", &id])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = Command::new("docker-compose")
                .current_dir(root())
                .args([
                    "-p",
                    &self.project,
                    "-f",
                    "deploy/docker-compose.yml",
                    "logs",
                    "--tail",
                    "40",
                ])
                .output()
            {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = Command::new("docker-compose")
            .current_dir(root())
            .args([
                "-p",
                &self.project,
                "-f",
                "deploy/docker-compose.yml",
                "down",
                "-v",
                "--timeout",
                "5",
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_scales_without_config_edits() {
    let images = Command::new("bash")
        .arg(root().join("deploy/images.sh"))
        .env("PROFILE", "debug")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        images.status.success(),
        "deploy/images.sh: {}",
        String::from_utf8_lossy(&images.stderr)
    );

    let stack = Stack {
        project: format!("lbe2e{}", std::process::id()),
        http_port: free_port(),
        stats_port: free_port(),
    };
    stack.compose(&["up", "-d", "--scale", "webapp=2"]);
    let two = stack.wait_ids(2).await;
    let stats = eventually(T, "stats page lists both", || async {
        let body = http::get(stack.stats_port, "/;csv", None).await.ok()?.body;
        two.iter()
            .all(|id| body.contains(&format!("nodes,{id},")))
            .then_some(body)
    })
    .await;
    assert!(stats.contains("nodes,BACKEND"));
    let started = stack.ha_started_at();

    // Scale up under load: new web apps get traffic within seconds, nothing fails.
    let load = Load::start(stack.http_port, 20, 8, false);
    let t = Instant::now();
    stack.compose(&["up", "-d", "--scale", "webapp=5", "--no-recreate"]);
    stack.wait_ids(5).await;
    eprintln!(
        "scale 2 -> 5 served after {:?} (compose returned included)",
        t.elapsed()
    );
    // Scale down under the same load: removed ones drain out, nothing fails.
    stack.compose(&["up", "-d", "--scale", "webapp=2", "--no-recreate"]);
    stack.wait_ids(2).await;
    let result = load.finish();
    eprintln!(
        "load during scaling: {} requests, {} failed",
        result.requests,
        result.failed()
    );
    assert!(result.requests > 100, "{}", result.raw);
    assert_eq!(result.failed(), 0, "{}", result.raw);
    assert_eq!(
        stack.ha_started_at(),
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
    stack.wait_ids(1).await;
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
        let out = Command::new("docker-compose")
            .current_dir(root())
            .args([
                "-p",
                &stack.project,
                "-f",
                "deploy/docker-compose.yml",
                "exec",
                "-T",
                "etcd",
                "etcdctl",
                "get",
                "--prefix",
                "/services/",
                "--keys-only",
            ])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .count()
            == 1)
            .then_some(())
    })
    .await;
    stack.wait_ids(1).await;
}
