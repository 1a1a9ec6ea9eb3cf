//! registrar against a real etcd: registration, graceful and crash deregistration,
//! store restarts and freezes, health checks, bad input, duplicate ids.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, eventually, free_port, stays, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

const KEY: &str = "/services/webapp/s1";

/// Registrar flags for instance s1 of webapp on port 3000 (under [`KEY`]), then `extra`.
fn s1<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--service", "webapp", "--id", "s1", "--port", "3000"];
    args.extend_from_slice(extra);
    args
}

fn registrar(dir: &std::path::Path, name: &str, etcd: &Etcd, args: &[&str]) -> Proc {
    let mut cmd = e2e::registrar_base(&etcd.endpoint(), "info,registrar=debug");
    cmd.args(args);
    Proc::spawn(name, dir, cmd)
}

fn webapp_cmd(port: u16, id: &str) -> Vec<String> {
    vec![
        bin("webapp").display().to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--id".into(),
        id.into(),
    ]
}

async fn key_present(etcd: &Etcd, key: &str) -> bool {
    etcd.get(key).await.is_some()
}

/// Waits until the key exists under a lease that outlives its own 3 s TTL, i.e. a live
/// registrar renews it.
async fn wait_kept_alive(etcd: &Etcd, key: &str, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    let mut seen: Option<(i64, Instant)> = None;
    loop {
        match etcd.get(key).await {
            Some(kv) => match seen {
                Some((lease, since)) if lease == kv.lease => {
                    if since.elapsed() > Duration::from_millis(3500)
                        && etcd.lease_ttl(lease).await > 0
                    {
                        return lease;
                    }
                }
                _ => seen = Some((kv.lease, Instant::now())),
            },
            None => seen = None,
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {key} not kept alive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_json_under_a_lease_and_revokes_on_sigterm() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let started = Instant::now();
    let mut reg = registrar(
        dir.path(),
        "registrar",
        &etcd,
        &[
            "--service",
            "webapp",
            "--id",
            "s1",
            "--address",
            "192.168.42.11",
            "--port",
            "3000",
            "--tag",
            "v1",
            "--meta",
            "zone=a",
            "--ttl",
            "10s",
        ],
    );
    eventually(Duration::from_secs(10), "key registered", || {
        key_present(&etcd, KEY).then_some_async()
    })
    .await;
    eprintln!("start -> key visible: {:?}", started.elapsed());

    // etcdctl shows the documented JSON.
    let out = etcd.etcdctl(&["get", "--prefix", "/services/", "--print-value-only"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON value");
    assert_eq!(v["id"], "s1");
    assert_eq!(v["service"], "webapp");
    assert_eq!(v["address"], "192.168.42.11");
    assert_eq!(v["port"], 3000);
    assert_eq!(v["tags"], serde_json::json!(["v1"]));
    assert_eq!(v["meta"]["zone"], "a");
    assert_eq!(v["weight"], 100);

    // The key carries the lease; the lease lists the key.
    let kv = etcd.get(KEY).await.unwrap();
    assert_ne!(kv.lease, 0, "key must be bound to a lease");
    assert_eq!(etcd.lease_keys(kv.lease).await, vec![KEY.to_string()]);
    let ttl = etcd.lease_ttl(kv.lease).await;
    assert!((1..=10).contains(&ttl), "lease TTL {ttl}");

    // SIGTERM: the lease is revoked at once (well before the 10 s TTL) and exit is 0.
    let t = Instant::now();
    reg.signal(Signal::SIGTERM);
    let status = reg
        .exited(Duration::from_secs(5))
        .await
        .expect("registrar exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        !key_present(&etcd, KEY).await,
        "key must be gone after SIGTERM"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(etcd.lease_ttl(kv.lease).await, -1, "lease revoked");
    eprintln!("SIGTERM -> key gone: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_the_key_until_the_ttl_expires() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let reg = registrar(dir.path(), "registrar", &etcd, &s1(&["--ttl", "3s"]));
    wait_kept_alive(&etcd, KEY, Duration::from_secs(10)).await;
    let t = Instant::now();
    reg.signal(Signal::SIGKILL);
    eventually(Duration::from_secs(10), "key expires", || async {
        (!key_present(&etcd, KEY).await).then_some(())
    })
    .await;
    let took = t.elapsed();
    eprintln!("SIGKILL -> key gone (ttl 3s): {took:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "gone after {took:?}: too early for a TTL expiry"
    );
    assert!(
        took <= Duration::from_secs(6),
        "gone after {took:?}: much later than the TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_mode_revokes_first_and_exits_with_the_childs_status() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let port = free_port();
    let mut args: Vec<String> = [
        "--service",
        "webapp",
        "--id",
        "s1",
        "--address",
        "127.0.0.1",
        "--ttl",
        "10s",
        "--health-http",
        &format!("http://127.0.0.1:{port}/health"),
        "--health-interval",
        "100ms",
        "--drain",
        "200ms",
        "--port",
        &port.to_string(),
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(webapp_cmd(port, "s1"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut reg = registrar(dir.path(), "registrar", &etcd, &argv);
    eventually(Duration::from_secs(10), "registered once healthy", || {
        key_present(&etcd, KEY).then_some_async()
    })
    .await;
    let resp = e2e::http::get(port, "/", None).await.expect("app answers");
    assert_eq!(resp.instance_id().as_deref(), Some("s1"));

    reg.signal(Signal::SIGTERM);
    // The key goes first (revoke), while the app still serves during the drain.
    eventually(Duration::from_secs(3), "key revoked", || async {
        (!key_present(&etcd, KEY).await).then_some(())
    })
    .await;
    let status = reg
        .exited(Duration::from_secs(10))
        .await
        .expect("registrar exits");
    assert_eq!(
        status.code(),
        Some(0),
        "child's status (webapp exits 0 on SIGTERM)"
    );
    let log = reg.log();
    let revoked = log.find("lease revoked").expect("revoked logged");
    let stopped = log.find("app stopped").expect("app stop logged");
    assert!(
        revoked < stopped,
        "lease must be revoked before the app is stopped"
    );

    // The child dying on its own: registrar revokes and exits with its status.
    let mut reg = registrar(
        dir.path(),
        "registrar-2",
        &etcd,
        &s1(&["--", "sh", "-c", "sleep 1; exit 7"]),
    );
    let status = reg
        .exited(Duration::from_secs(15))
        .await
        .expect("registrar exits after child");
    assert_eq!(status.code(), Some(7));
    assert!(!key_present(&etcd, KEY).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_survives_etcd_restart_and_long_outage() {
    let dir = temp_dir();
    let mut etcd = Etcd::start(dir.path()).await;
    let _reg = registrar(dir.path(), "registrar", &etcd, &s1(&["--ttl", "3s"]));
    wait_kept_alive(&etcd, KEY, Duration::from_secs(10)).await;

    // Quick restart on the same data dir.
    etcd.restart().await;
    wait_kept_alive(&etcd, KEY, Duration::from_secs(15)).await;

    // Down for longer than the TTL: the fault lasts 5 s (a duration we inject, not a wait
    // for an event). Make sure the lease expires meanwhile by wiping nothing; etcd expires
    // it on return, and the registrar must grant a new one.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    etcd.start_again().await;
    wait_kept_alive(&etcd, KEY, Duration::from_secs(20)).await;

    // Store replaced by an empty one (lease unknown): re-registers by itself.
    etcd.replace_with_empty().await;
    wait_kept_alive(&etcd, KEY, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_etcd_is_detected_and_registration_recovers() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let reg = registrar(dir.path(), "registrar", &etcd, &s1(&["--ttl", "3s"]));
    wait_kept_alive(&etcd, KEY, Duration::from_secs(10)).await;
    etcd.freeze();
    // The registrar must notice the frozen store (keep-alive failures), not hang silently.
    eventually(
        Duration::from_secs(15),
        "registrar reports keep-alive failure",
        || async { reg.log().contains("keep-alive fail").then_some(()) },
    )
    .await;
    etcd.thaw();
    wait_kept_alive(&etcd, KEY, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_deregisters_and_reregisters_keeping_the_lease() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let port = free_port();
    let start_app = |n: u32| {
        let argv = webapp_cmd(port, "s1");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        Proc::spawn(&format!("webapp-{n}"), dir.path(), cmd)
    };
    let mut app = start_app(1);
    let url = format!("http://127.0.0.1:{port}/health");
    let _reg = registrar(
        dir.path(),
        "registrar",
        &etcd,
        &[
            "--service",
            "webapp",
            "--id",
            "s1",
            "--port",
            &port.to_string(),
            "--ttl",
            "5s",
            "--health-http",
            &url,
            "--health-interval",
            "100ms",
            "--health-fails",
            "2",
        ],
    );
    let first = eventually(Duration::from_secs(10), "registered", || async {
        etcd.get(KEY).await
    })
    .await;

    app.kill();
    eventually(
        Duration::from_secs(5),
        "deregistered after failed checks",
        || async { (!key_present(&etcd, KEY).await).then_some(()) },
    )
    .await;
    // The lease is kept while unhealthy.
    assert!(
        etcd.lease_ttl(first.lease).await > 0,
        "lease kept while deregistered"
    );

    let _app = start_app(2);
    let again = eventually(Duration::from_secs(5), "registered again", || async {
        etcd.get(KEY).await
    })
    .await;
    assert_eq!(again.lease, first.lease, "same lease after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_flags_fail_clearly_and_write_nothing() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let base = ["--service", "webapp", "--id", "s1"];
    let cases: &[(&[&str], &str)] = &[
        (&["--port", "0"], "port"),
        (&["--port", "70000"], "70000"),
        (&["--port", "3000", "--ttl", "soon"], "duration"),
        (&["--port", "3000", "--address", "10.0.0.1:3000"], "address"),
        (&["--port", "3000", "--service", "web app"], "service"),
        (&["--port", "3000", "--service", "web/app"], "service"),
        (&["--port", "3000", "--service", "web\napp"], "service"),
        (&["--port", "3000", "--unknown-flag"], "unexpected argument"),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let mut all: Vec<&str> = base.to_vec();
        all.extend_from_slice(args);
        let mut reg = registrar(dir.path(), &format!("bad-{i}"), &etcd, &all);
        let status = reg.exited(Duration::from_secs(10)).await.expect("exits");
        assert_eq!(status.code(), Some(64), "{args:?} must be a usage error");
        let log = reg.log();
        assert!(
            log.contains(needle),
            "{args:?}: message should mention {needle:?}: {log}"
        );
    }
    assert!(
        etcd.get_prefix("/").await.is_empty(),
        "nothing written to etcd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_id_does_not_overwrite_a_live_registration() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let mut a = registrar(
        dir.path(),
        "registrar-a",
        &etcd,
        &[
            "--service",
            "webapp",
            "--id",
            "s1",
            "--address",
            "10.0.0.1",
            "--port",
            "3000",
            "--ttl",
            "3s",
        ],
    );
    let owner = eventually(Duration::from_secs(10), "A registered", || async {
        etcd.get(KEY).await
    })
    .await;
    let b = registrar(
        dir.path(),
        "registrar-b",
        &etcd,
        &[
            "--service",
            "webapp",
            "--id",
            "s1",
            "--address",
            "10.0.0.2",
            "--port",
            "3000",
            "--ttl",
            "3s",
        ],
    );
    eventually(
        Duration::from_secs(10),
        "B reports the conflict",
        || async { b.log().contains("CONFLICT").then_some(()) },
    )
    .await;
    stays(
        Duration::from_millis(500),
        "A still owns the key",
        || async {
            etcd.get(KEY)
                .await
                .map(|kv| kv.lease == owner.lease && kv.value.contains("10.0.0.1"))
                == Some(true)
        },
    )
    .await;
    // When A leaves, B takes over.
    a.signal(Signal::SIGTERM);
    assert!(a.exited(Duration::from_secs(5)).await.is_some());
    eventually(Duration::from_secs(10), "B takes over", || async {
        etcd.get(KEY)
            .await
            .filter(|kv| kv.value.contains("10.0.0.2"))
    })
    .await;
}

/// `bool::then_some(())` as a future, for `eventually`.
trait ThenSomeAsync {
    fn then_some_async(self) -> impl std::future::Future<Output = Option<()>>;
}

impl<F: std::future::Future<Output = bool>> ThenSomeAsync for F {
    async fn then_some_async(self) -> Option<()> {
        self.await.then_some(())
    }
}

/// HTTPS health endpoints (HAProxy terminating TLS, answering 200 on /health) made by the
/// two usual recipes: a leaf of a private CA, and a self-signed certificate from
/// `openssl req -x509` (CA:TRUE, which webpki alone refuses as a server's own). Each is
/// trusted through --health-cacert holding the CA, or the self-signed certificate itself;
/// refused against the system's roots or the other file; and a --health-cacert that holds
/// no certificate is a bad flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_health_checks_trust_the_given_ca_or_self_signed_certificate_only() {
    let dir = temp_dir();
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd-secure.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("certs")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // HAProxy wants the key beside the certificate in one PEM.
    let pem_of = |name: &str| {
        let mut pem = std::fs::read(certs.join(format!("{name}.crt"))).unwrap();
        pem.extend(std::fs::read(certs.join(format!("{name}.key"))).unwrap());
        std::fs::write(certs.join(format!("{name}.pem")), pem).unwrap();
    };
    pem_of("server");
    // The self-signed recipe, as operators type it.
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(certs.join("self.key"))
        .arg("-out")
        .arg(certs.join("self.crt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pem_of("self");
    let port = free_port();
    let self_port = free_port();
    let cfg = dir.path().join("tls.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode http\n  timeout client 5s\n  timeout server 5s\n  timeout connect 1s\n\
             frontend tls\n  bind 127.0.0.1:{port} ssl crt {}\n  bind 127.0.0.1:{self_port} ssl crt {}\n\
             \x20 http-request return status 200 content-type text/plain string ok if {{ path /health }}\n\
             \x20 http-request return status 503 content-type text/plain string down\n",
            certs.join("server.pem").display(),
            certs.join("self.pem").display()
        ),
    )
    .unwrap();
    let haproxy = e2e::lb::haproxy_command(None, &cfg);
    let _tls = Proc::spawn("haproxy-tls", dir.path(), haproxy);
    eventually(
        Duration::from_secs(10),
        "the TLS endpoint listens",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        },
    )
    .await;
    let etcd = Etcd::start(dir.path()).await;
    let url = format!("https://127.0.0.1:{port}/health");
    let self_url = format!("https://127.0.0.1:{self_port}/health");
    let ca = certs.join("ca.crt").display().to_string();
    let self_crt = certs.join("self.crt").display().to_string();
    let common = |id: &str, url: &str| -> Vec<String> {
        [
            "--service",
            "webapp",
            "--id",
            id,
            "--address",
            "127.0.0.1",
            "--port",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                "--ttl",
                "3s",
                "--health-interval",
                "200ms",
                "--health-http",
                url,
            ]
            .map(String::from),
        )
        .collect()
    };
    let with_cacert = |id: &str, url: &str, cacert: &str| -> Vec<String> {
        let mut args = common(id, url);
        args.extend(["--health-cacert".to_string(), cacert.to_string()]);
        args
    };
    let spawn = |name: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        registrar(dir.path(), name, &etcd, &args)
    };
    let _s4 = spawn("registrar-s4", with_cacert("s4", &self_url, &self_crt));
    let s5 = spawn("registrar-s5", with_cacert("s5", &self_url, &ca));
    let s6 = spawn("registrar-s6", with_cacert("s6", &url, &self_crt));
    let mut trusted = common("s1", &url);
    trusted.extend(["--health-cacert".to_string(), ca.clone()]);
    let trusted: Vec<&str> = trusted.iter().map(String::as_str).collect();
    let _s1 = registrar(dir.path(), "registrar-s1", &etcd, &trusted);
    let untrusted = common("s2", &url);
    let untrusted: Vec<&str> = untrusted.iter().map(String::as_str).collect();
    let s2 = registrar(dir.path(), "registrar-s2", &etcd, &untrusted);
    let registered = |id: &'static str, what: &'static str| {
        let etcd = &etcd;
        async move {
            let key = format!("/services/webapp/{id}");
            eventually(Duration::from_secs(10), what, || async {
                key_present(etcd, &key).await.then_some(())
            })
            .await
        }
    };
    registered("s1", "registered once the https check passes").await;
    // The system's roots do not hold the private CA: never registered, and the log says why.
    stays(Duration::from_secs(2), "s2 stays unregistered", || async {
        !key_present(&etcd, "/services/webapp/s2").await
    })
    .await;
    let log = s2.log().to_lowercase();
    assert!(
        log.contains("certificate") || log.contains("unknownissuer"),
        "{log}"
    );
    // The self-signed certificate, given as itself: registered.
    registered("s4", "registered through the self-signed certificate").await;
    // Each file trusts only what it holds: the CA does not vouch for the self-signed
    // certificate, the self-signed certificate does not vouch for the CA's leaf.
    for (id, reg) in [("s5", &s5), ("s6", &s6)] {
        assert!(
            !key_present(&etcd, &format!("/services/webapp/{id}")).await,
            "{id}"
        );
        let log = reg.log().to_lowercase();
        assert!(log.contains("certificate"), "{id}: {log}");
    }
    // A --health-cacert with no certificate in it is refused at start (exit 64).
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let mut bad = common("s3", &url);
    bad.extend(["--health-cacert".to_string(), empty.display().to_string()]);
    let out = Command::new(bin("lb-registrar"))
        .arg("--endpoints")
        .arg(etcd.endpoint())
        .args(&bad)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--health-cacert"));
}

/// An instance whose health check never passes says why, once, after --health-fails
/// failures in a row (not while the app may still be starting), and again only when the
/// reason changes; a passing check is INFO, and the WARN count does not grow while it is
/// healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrar_that_never_becomes_healthy_says_why_once() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/health");
    let reg = registrar(
        dir.path(),
        "registrar",
        &etcd,
        &[
            "--service",
            "webapp",
            "--id",
            "s1",
            "--address",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--health-http",
            &url,
            "--health-interval",
            "100ms",
            "--health-fails",
            "3",
        ],
    );
    let warns = || {
        reg.log()
            .lines()
            .filter(|l| {
                l.contains(" WARN ") && l.contains("not registered: the health check keeps failing")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let first = eventually(Duration::from_secs(10), "a WARN saying why", || async {
        warns().first().cloned()
    })
    .await;
    assert!(
        first.contains("Connection refused") || first.contains("connect"),
        "{first}"
    );
    // Many more failures, same reason: no second WARN.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(warns().len(), 1, "{:?}", warns());
    assert!(!key_present(&etcd, KEY).await);
    // The app comes up: registered, INFO.
    let mut app = Command::new(bin("webapp"));
    app.args(&webapp_cmd(port, "s1")[1..]);
    let _app = Proc::spawn("webapp", dir.path(), app);
    eventually(Duration::from_secs(10), "registered", || async {
        key_present(&etcd, KEY).await.then_some(())
    })
    .await;
    assert!(reg.log().contains("health check passed; registering"));
    assert_eq!(warns().len(), 1);
}

/// SIGHUP (`systemctl reload`) on a standalone registrar: it keeps running, puts the record
/// again (a key deleted by hand comes back at once, under the same lease) and re-runs the
/// health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_puts_the_record_again_and_does_not_stop_the_registrar() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let mut reg = registrar(
        dir.path(),
        "registrar",
        &etcd,
        &[
            "--service",
            "webapp",
            "--id",
            "s1",
            "--address",
            "127.0.0.1",
            "--port",
            "3000",
            "--ttl",
            "30s",
        ],
    );
    let lease = eventually(Duration::from_secs(10), "registered", || async {
        etcd.get(KEY).await.map(|kv| kv.lease)
    })
    .await;
    etcd.delete(KEY).await;
    reg.signal(Signal::SIGHUP);
    let back = eventually(Duration::from_secs(5), "the record put again", || async {
        etcd.get(KEY).await.map(|kv| kv.lease)
    })
    .await;
    assert_eq!(back, lease, "put again under the same lease");
    // The line is logged once the put returned: it may follow the key by a moment.
    eventually(Duration::from_secs(5), "the re-put logged", || async {
        reg.log().contains("record put again").then_some(())
    })
    .await;
    assert!(reg.is_running(), "SIGHUP stopped the registrar");
}

/// `--register` twice: two records, one lease; SIGTERM revokes it and both keys go in the
/// same revision (a load balancer sees the process leave in one step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_services_share_one_lease_and_leave_together() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (web, admin) = ("/services/webapp/s1", "/services/admin/s1");
    let mut reg = registrar(
        dir.path(),
        "registrar",
        &etcd,
        &[
            "--id",
            "s1",
            "--address",
            "127.0.0.1",
            "--register",
            "webapp:3000",
            "--register",
            "admin:9000",
            "--ttl",
            "10s",
        ],
    );
    let (a, b) = eventually(Duration::from_secs(10), "both records", || async {
        Some((etcd.get(web).await?, etcd.get(admin).await?))
    })
    .await;
    assert_ne!(a.lease, 0);
    assert_eq!(a.lease, b.lease, "one lease for both records");
    let mut keys = etcd.lease_keys(a.lease).await;
    keys.sort();
    assert_eq!(keys, [admin, web]);
    let port = |v: &str| serde_json::from_str::<serde_json::Value>(v).unwrap()["port"].clone();
    assert_eq!((port(&a.value), port(&b.value)), (3000.into(), 9000.into()));

    let mut client = etcd.client().await;
    let mut events = client
        .watch(
            "/services/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    reg.signal(Signal::SIGTERM);
    assert_eq!(
        reg.exited(Duration::from_secs(5)).await.unwrap().code(),
        Some(0)
    );
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("delete events")
            .unwrap()
            .unwrap();
        for e in resp.events() {
            if e.event_type() == etcd_client::EventType::Delete {
                let kv = e.kv().unwrap();
                deleted.push((kv.key_str().unwrap().to_string(), kv.mod_revision()));
            }
        }
    }
    assert_eq!(deleted[0].1, deleted[1].1, "one revision: {deleted:?}");
    assert_eq!(etcd.lease_ttl(a.lease).await, -1, "lease revoked");
}

/// `--health-cmd` twice (combined: all must pass): a readiness file, and a command that
/// hangs while a second file exists. Each failure deregisters within interval × fails
/// (+1 s), each recovery registers again, and /metrics shows which check failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_checks_combine_and_a_hanging_one_counts_as_failed() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let ready = dir.path().join("ready");
    let hang = dir.path().join("hang");
    std::fs::write(&ready, "").unwrap();
    let ready_check = format!("test -e {}", ready.display());
    let hang_check = format!("test ! -e {} || sleep 60", hang.display());
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let _reg = registrar(
        dir.path(),
        "registrar",
        &etcd,
        &s1(&[
            "--address",
            "127.0.0.1",
            "--ttl",
            "3s",
            "--health-cmd",
            &ready_check,
            "--health-cmd",
            &hang_check,
            "--health-interval",
            "200ms",
            "--health-timeout",
            "500ms",
            "--health-fails",
            "2",
            "--metrics-addr",
            &metrics_addr,
        ]),
    );
    let registered = |want: bool| {
        let etcd = &etcd;
        async move { (key_present(etcd, KEY).await == want).then_some(()) }
    };
    let up = |check: String| async move {
        let body = e2e::http::get(metrics, "/metrics", None).await.ok()?.body;
        let line = format!("registrar_health_check_up{{check=\"cmd {check}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(line.as_str()).map(|v| v.trim() == "1"))
    };
    eventually(Duration::from_secs(10), "registered", || registered(true)).await;
    // interval × fails = 400 ms (+ a 500 ms timeout per probe for the hanging one) + 1 s.
    let bound = Duration::from_millis(200 * 2 + 500 * 2 + 1000);
    for (file, check) in [(&ready, &ready_check), (&hang, &hang_check)] {
        let broke = Instant::now();
        if file == &ready {
            std::fs::remove_file(file).unwrap();
        } else {
            std::fs::write(file, "").unwrap();
        }
        eventually(Duration::from_secs(10), "deregistered", || {
            registered(false)
        })
        .await;
        assert!(broke.elapsed() < bound, "{:?} > {bound:?}", broke.elapsed());
        assert_eq!(up(check.clone()).await, Some(false), "{check}");
        if file == &ready {
            std::fs::write(file, "").unwrap();
        } else {
            std::fs::remove_file(file).unwrap();
        }
        eventually(Duration::from_secs(10), "registered again", || {
            registered(true)
        })
        .await;
        assert_eq!(up(check.clone()).await, Some(true), "{check}");
    }
}
