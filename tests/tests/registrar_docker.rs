//! `registrar docker` against the real Docker engine: containers from the locally built
//! lb-registry/webapp image (deploy/images.sh), run with their registrar bypassed, are
//! registered from their labels; stop, kill, health, bad labels, the daemon's crash and
//! restart, and its stale keys. Containers are reached only through the engine's API.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::compose::{build_images, Stack};
use e2e::{bin, eventually, free_port, http, stays, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);
/// The two tests share the engine and each runs a `registrar docker`: one at a time, so
/// neither's timing depends on the other's load.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The service of the first test's containers: not the compose stack's `webapp`, so the
/// stack's own `registrar docker` (the second test, in parallel) never routes to them.
const SERVICE: &str = "dockerweb";

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes the test's containers, whatever happens.
struct Containers(String);

impl Containers {
    fn name(&self, n: &str) -> String {
        format!("{}-{n}", self.0)
    }

    /// `docker run -d` of the webapp image with `args` before the image (labels, health)
    /// and `cmd` as the command of `entrypoint`.
    fn run(&self, n: &str, args: &[&str], entrypoint: &str, cmd: &[&str]) -> String {
        let name = self.name(n);
        let mut all = vec!["run", "-d", "--name", &name, "--entrypoint", entrypoint];
        all.extend_from_slice(args);
        all.push("lb-registry/webapp:latest");
        all.extend_from_slice(cmd);
        docker(&all);
        name
    }

    /// A labelled web app (no registrar inside).
    fn webapp(&self, n: &str, labels: &[&str]) -> String {
        let mut args = Vec::new();
        for l in labels {
            args.extend(["--label", l]);
        }
        self.run(n, &args, "/usr/local/bin/webapp", &[])
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("name={}-", self.0)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

fn daemon(dir: &Path, etcd: &Etcd, owner: &str, metrics: u16) -> Proc {
    daemon_with(dir, "registrar-docker", etcd, owner, metrics, &[])
}

fn daemon_with(
    dir: &Path,
    name: &str,
    etcd: &Etcd,
    owner: &str,
    metrics: u16,
    extra: &[&str],
) -> Proc {
    let mut cmd = Command::new(bin("lb-registrar"));
    cmd.env("RUST_LOG", "info,registrar=debug").args([
        "docker",
        "--endpoints",
        &etcd.endpoint(),
        "--ttl",
        "3s",
        "--owner",
        owner,
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ]);
    cmd.args(extra);
    Proc::spawn(name, dir, cmd)
}

/// A Docker network of the test's own, removed whatever happens (after the containers:
/// declare it first).
struct Network(String);

impl Network {
    fn create(name: String) -> Network {
        docker(&["network", "create", &name]);
        Network(name)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

/// A container's address on `network`.
fn ip_on(name: &str, network: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        name,
    ])
}

/// Several services per container (port groups), a daemon scoped by --network and
/// --label-filter, and published mode (this host's address and the published port, and
/// the app answers there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_groups_scoping_and_published_mode() {
    let _serial = SERIAL.lock().await;
    build_images();
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let tag = format!("rdp{}", std::process::id());
    let net = Network::create(format!("{tag}-net"));
    let c = Containers(tag.clone());
    let scope = format!("lb-test={tag}");
    let scoped = daemon_with(
        dir.path(),
        "registrar-docker-scoped",
        &etcd,
        &format!("{tag}a"),
        free_port(),
        &["--network", &net.0, "--label-filter", &scope],
    );
    let published = daemon_with(
        dir.path(),
        "registrar-docker-published",
        &etcd,
        &format!("{tag}b"),
        free_port(),
        &[
            "--address-mode",
            "published",
            "--host-address",
            "127.0.0.1",
            "--label-filter",
            &format!("lb-pub={tag}"),
        ],
    );
    let on_net = ["--network", net.0.as_str()];
    let labelled = |labels: &[&str]| -> Vec<String> {
        labels
            .iter()
            .flat_map(|l| ["--label".to_string(), l.to_string()])
            .collect()
    };
    let args = |extra: &[&str], labels: &[&str]| -> Vec<String> {
        extra
            .iter()
            .map(|s| s.to_string())
            .chain(labelled(labels))
            .collect()
    };
    let run = |n: &str, a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        c.run(n, &a, "/usr/local/bin/webapp", &[])
    };
    // Two port groups: two records, both with the address on the daemon's network.
    let multi = run(
        "multi",
        args(
            &on_net,
            &[
                &scope,
                "lb-registry.3000.service=dkweb",
                "lb-registry.9000.service=dkadmin",
                "lb-registry.9000.meta.role=admin",
            ],
        ),
    );
    let web_key = format!("/services/dkweb/{multi}");
    let admin_key = format!("/services/dkadmin/{multi}");
    let (web, admin) = eventually(T, "both port groups registered", || async {
        Some((etcd.get(&web_key).await?, etcd.get(&admin_key).await?))
    })
    .await;
    let ip = ip_on(&multi, &net.0);
    assert!(
        web.value
            .contains(&format!("\"address\":\"{ip}\",\"port\":3000")),
        "{}",
        web.value
    );
    assert!(
        admin
            .value
            .contains(&format!("\"address\":\"{ip}\",\"port\":9000")),
        "{}",
        admin.value
    );
    assert!(
        admin.value.contains("\"role\":\"admin\""),
        "{}",
        admin.value
    );
    assert_eq!(web.lease, admin.lease, "the daemon's one lease");
    // Out of scope: another network; no lb-test label. Neither is registered.
    let elsewhere = run(
        "elsewhere",
        args(&[], &[&scope, "lb-registry.service=dkweb"]),
    );
    let unscoped = run("unscoped", args(&on_net, &["lb-registry.service=dkweb"]));
    // Published: this host's address and the port Docker published, which answers.
    let pubd = run(
        "pub",
        args(
            &["-p", "127.0.0.1::3000"],
            &[&format!("lb-pub={tag}"), "lb-registry.service=dkpub"],
        ),
    );
    let host_port: u16 = docker(&["port", &pubd, "3000/tcp"])
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let value = eventually(T, "published registered", || async {
        etcd.get(&format!("/services/dkpub/{pubd}")).await
    })
    .await
    .value;
    assert!(
        value.contains(&format!("\"address\":\"127.0.0.1\",\"port\":{host_port}")),
        "{value}"
    );
    eventually(T, "the app answers on the registered address", || async {
        (http::get(host_port, "/health", None).await.ok()?.status == 200).then_some(())
    })
    .await;
    stays(
        Duration::from_secs(2),
        "out of scope: not registered",
        || async {
            etcd.get(&format!("/services/dkweb/{elsewhere}"))
                .await
                .is_none()
                && etcd
                    .get(&format!("/services/dkweb/{unscoped}"))
                    .await
                    .is_none()
                && etcd
                    .get(&format!("/services/dkpub/{multi}"))
                    .await
                    .is_none()
        },
    )
    .await;
    // A stop takes every record of the container at once.
    docker(&["stop", "-t", "1", &multi]);
    eventually(T, "both records gone", || async {
        (etcd.get(&web_key).await.is_none() && etcd.get(&admin_key).await.is_none()).then_some(())
    })
    .await;
    for d in [&scoped, &published] {
        assert!(!d.log().contains(" WARN "), "{}", d.log());
    }
}

fn ip_of(name: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        name,
    ])
}

async fn key_of(etcd: &Etcd, id: &str) -> Option<String> {
    etcd.get(&format!("/services/{SERVICE}/{id}"))
        .await
        .map(|kv| kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_are_registered_from_their_labels() {
    let _serial = SERIAL.lock().await;
    build_images();
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let tag = format!("rdk{}", std::process::id());
    let owner = tag.clone();
    let c = Containers(tag.clone());
    let port = free_port();
    let mut d = daemon(dir.path(), &etcd, &owner, port);

    // Bad flags: exit 64, nothing started; --help explains the labels.
    for bad in [
        &["--address-mode", "published"][..],
        &["--docker-host", "tcp://127.0.0.1:2375"],
        &["--ttl", "1s"],
    ] {
        let out = Command::new(bin("lb-registrar"))
            .arg("docker")
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = Command::new(bin("lb-registrar"))
        .args(["docker", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("lb-registry.port=PORT"));
    // Ready once synced with Docker and etcd.
    eventually(T, "/readyz answers 200", || async {
        (e2e::http::get(port, "/readyz", None).await.ok()?.status == 200).then_some(())
    })
    .await;

    // A labelled container: registered with its address on the bridge, port from EXPOSE.
    let a = c.webapp("a", &["lb-registry.service=dockerweb"]);
    // `docker run -d` has returned: the container runs.
    let started = Instant::now();
    let value = eventually(T, "a registered", || key_of(&etcd, &a)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "registered {took:?} after it started"
    );
    let ip = ip_of(&a);
    assert!(
        value.contains(&format!("\"address\":\"{ip}\",\"port\":3000")),
        "{value}"
    );
    assert!(
        value.contains(&format!("\"registered-by\":\"docker:{owner}\"")),
        "{value}"
    );
    // Unlabelled: nothing. Bad labels: skipped, logged naming the container and label.
    let plain = c.run("plain", &[], "/usr/local/bin/webapp", &[]);
    let bad_port = c.webapp(
        "badport",
        &["lb-registry.service=dockerweb", "lb-registry.port=abc"],
    );
    let bad_id = c.webapp(
        "badid",
        &["lb-registry.service=dockerweb", "lb-registry.id=has space"],
    );
    eventually(T, "bad labels logged", || async {
        let log = d.log();
        (log.contains(&format!(
            "container {bad_port}: label lb-registry.port=\"abc\""
        )) && log.contains(&format!(
            "container {bad_id}: label lb-registry.id=\"has space\""
        )))
        .then_some(())
    })
    .await;
    for id in [&plain, &bad_port, &bad_id, &"has space".to_string()] {
        assert!(
            key_of(&etcd, id).await.is_none(),
            "{id} must not be registered"
        );
    }

    // A HEALTHCHECK that fails: never registered; once it passes: registered.
    let h = c.run(
        "health",
        &[
            "--label",
            "lb-registry.service=dockerweb",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
        "/usr/local/bin/webapp",
        &[],
    );
    stays(
        Duration::from_secs(3),
        "unhealthy: not registered",
        || async { key_of(&etcd, &h).await.is_none() },
    )
    .await;
    docker(&["exec", &h, "touch", "/tmp/ok"]);
    eventually(T, "healthy: registered", || key_of(&etcd, &h)).await;
    // Unhealthy again: deregistered.
    docker(&["exec", &h, "rm", "/tmp/ok"]);
    eventually(T, "unhealthy: deregistered", || async {
        key_of(&etcd, &h).await.is_none().then_some(())
    })
    .await;

    // docker stop: the key goes at the stop signal, before the container exits (it
    // ignores SIGTERM here, so it exits only at the SIGKILL 3 s later).
    let s = c.run(
        "stop",
        &[
            "--label",
            "lb-registry.service=dockerweb",
            "--label",
            "lb-registry.port=3000",
        ],
        "sh",
        &["-c", "trap '' TERM; exec sleep 60"],
    );
    eventually(T, "s registered", || key_of(&etcd, &s)).await;
    // `docker stop` returns once the container has exited.
    let stopper = {
        let s = s.clone();
        std::thread::spawn(move || {
            docker(&["stop", "-t", "3", &s]);
            Instant::now()
        })
    };
    let gone_at = eventually(T, "s deregistered", || async {
        key_of(&etcd, &s).await.is_none().then(Instant::now)
    })
    .await;
    let exited_by = stopper.join().unwrap();
    assert!(
        gone_at + Duration::from_secs(2) <= exited_by,
        "key gone {:?} before the container had exited",
        exited_by - gone_at
    );

    // docker kill: gone within 3 s.
    let k = c.webapp("kill", &["lb-registry.service=dockerweb"]);
    eventually(T, "k registered", || key_of(&etcd, &k)).await;
    let killed = Instant::now();
    docker(&["kill", &k]);
    eventually(T, "k deregistered", || async {
        key_of(&etcd, &k).await.is_none().then_some(())
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "{:?}",
        killed.elapsed()
    );

    // SIGHUP (`systemctl reload`): a full sync at once. A record carrying this daemon's
    // mark that no container explains (put by hand, no lease: nothing else removes it)
    // is gone after it; the daemon keeps running.
    let ghost_key = format!("/services/{SERVICE}/ghost-hup");
    let ghost = format!(
        "{{\"id\":\"ghost-hup\",\"service\":\"{SERVICE}\",\"address\":\"10.9.9.7\",\"port\":80,\"meta\":{{\"registered-by\":\"docker:{owner}\"}}}}"
    );
    etcd.put(&ghost_key, &ghost).await;
    d.signal(Signal::SIGHUP);
    eventually(T, "the SIGHUP sync removes the stale record", || async {
        etcd.get(&ghost_key).await.is_none().then_some(())
    })
    .await;
    assert!(d.is_running(), "SIGHUP stopped registrar docker");
    assert!(d.log().contains("syncing with Docker and etcd"));

    // The daemon crashes: its keys expire after the TTL (3 s).
    d.signal(Signal::SIGKILL);
    let crashed = Instant::now();
    eventually(T, "a expires", || async {
        key_of(&etcd, &a).await.is_none().then_some(())
    })
    .await;
    assert!(crashed.elapsed() > Duration::from_secs(1));
    // Meanwhile: a stale record of this daemon (a container it registered is gone), and
    // an in-image registrar's record: the restarted daemon removes the first only.
    let stale = format!(
        "{{\"id\":\"ghost\",\"service\":\"{SERVICE}\",\"address\":\"10.9.9.9\",\"port\":80,\"meta\":{{\"registered-by\":\"docker:{owner}\"}}}}"
    );
    etcd.put(&format!("/services/{SERVICE}/ghost"), &stale)
        .await;
    let foreign = format!(
        "{{\"id\":\"inimage\",\"service\":\"{SERVICE}\",\"address\":\"10.9.9.8\",\"port\":80}}"
    );
    etcd.put(&format!("/services/{SERVICE}/inimage"), &foreign)
        .await;
    let _d2 = daemon(dir.path(), &etcd, &owner, free_port());
    eventually(T, "a registered again after the restart", || {
        key_of(&etcd, &a)
    })
    .await;
    eventually(T, "the stale record removed", || async {
        key_of(&etcd, "ghost").await.is_none().then_some(())
    })
    .await;
    assert!(
        key_of(&etcd, "inimage").await.is_some(),
        "an in-image registrar's key is never touched"
    );
    assert!(key_of(&etcd, &h).await.is_none() && key_of(&etcd, &plain).await.is_none());
    drop(d);
}

/// Through deploy/docker-compose.yml: an app whose image has no registrar is registered
/// by the `registrar-docker` service, gets traffic through HAProxy, and `docker-compose
/// stop` takes it out of rotation without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_balances_an_image_without_a_registrar_and_stops_it_cleanly() {
    let _serial = SERIAL.lock().await;
    build_images();
    let stack = Stack::new("lbrdk", &["docker-registrar"]);
    stack.compose(&["up", "-d", "--scale", "webapp=1"]);
    let plain = stack.stdout(&["ps", "-q", "plainapp"]);
    // The sample app reports its hostname, Docker's short container id.
    let plain_id: String = plain.chars().take(12).collect();
    let both = eventually(
        Duration::from_secs(60),
        "the plain app and the registrar-run one in rotation",
        || async {
            let seen = stack.ids(12).await;
            (seen.len() == 2 && seen.contains(&plain_id)).then_some(seen)
        },
    )
    .await;
    let load = e2e::load::Load::start(stack.http_port, 8, 8, false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.compose(&["stop", "plainapp"]);
    let result = load.finish();
    eprintln!(
        "load while stopping the plain app: {} requests, {} failed",
        result.requests,
        result.failed()
    );
    assert!(result.requests > 0, "{}", result.raw);
    assert_eq!(result.failed(), 0, "{}", result.raw);
    let after = stack.ids(12).await;
    assert!(
        !after.contains(&plain_id) && after.len() == 1,
        "{both:?} then {after:?}"
    );

    // The last app stopped on purpose too: its registrar marks the record leaving before it
    // revokes (as `registrar docker` marked the plain app's), so the backend empties at once
    // instead of being held for --empty-hold, and the load balancer logs no WARN for it.
    let logged = stack.stdout(&["logs", "--no-color", "ha"]).lines().count();
    stack.compose(&["stop", "webapp"]);
    eventually(T, "no server left in backend nodes", || async {
        let body = http::get(stack.stats_port, "/;csv", None).await.ok()?.body;
        let servers = renderer::haproxy::parse_stat(&body)
            .into_iter()
            .filter(|r| r.get("pxname").map(String::as_str) == Some("nodes"))
            .filter(|r| {
                !matches!(
                    r.get("svname").map(String::as_str),
                    Some("BACKEND" | "FRONTEND")
                )
            })
            .count();
        (servers == 0).then_some(())
    })
    .await;
    let log = stack.stdout(&["logs", "--no-color", "ha"]);
    let new: Vec<&str> = log.lines().skip(logged).collect();
    assert!(
        !new.iter().any(|l| l.contains(" WARN ")),
        "WARN after a deliberate stop:\n{}",
        new.join("\n")
    );
}
