//! Metrics, health endpoints and `renderer status`, scraped from real processes.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;
use std::time::Duration;

use e2e::lb::{put_instance, wait_routed, Backend, Lb};
use e2e::{bin, eventually, free_port, http, temp_dir, Etcd, Proc};

const T: Duration = Duration::from_secs(15);

/// Scrapes `/metrics` and parses it with a Prometheus text-format parser.
async fn scrape(port: u16) -> prometheus_parse::Scrape {
    let resp = http::get(port, "/metrics", None)
        .await
        .expect("scrape /metrics");
    assert_eq!(resp.status, 200);
    let lines = resp.body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
}

/// The value of `name` with label `label=value` (or the unlabelled sample), 0 if absent.
fn value(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_registry_changes() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s1 = Backend::start(dir.path(), "s1");
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;
    let before = eventually(T, "first apply counted", || async {
        let s = scrape(lb.metrics_port).await;
        (value(&s, "renderer_applies_total", Some(("result", "ok"))) >= 1.0).then_some(s)
    })
    .await;
    assert_eq!(value(&before, "renderer_build_info", None), 1.0);
    assert_eq!(
        value(&before, "renderer_instances", Some(("service", "webapp"))),
        1.0
    );

    // One put → one render, one apply (through the runtime API).
    let s2 = Backend::start(dir.path(), "s2");
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    let after = eventually(T, "apply counted", || async {
        let s = scrape(lb.metrics_port).await;
        (value(&s, "renderer_applies_total", Some(("result", "ok")))
            > value(&before, "renderer_applies_total", Some(("result", "ok"))))
        .then_some(s)
    })
    .await;
    let d = |n: &str, l: Option<(&str, &str)>| value(&after, n, l) - value(&before, n, l);
    assert_eq!(d("renderer_applies_total", Some(("result", "ok"))), 1.0);
    assert_eq!(d("renderer_renders_total", Some(("result", "ok"))), 1.0);
    assert_eq!(
        d("renderer_runtime_applies_total", Some(("result", "ok"))),
        1.0
    );
    assert_eq!(
        value(&after, "renderer_instances", Some(("service", "webapp"))),
        2.0
    );
    assert!(value(&after, "renderer_registry_revision", None) >= 3.0);
    assert!(value(&after, "renderer_last_apply_timestamp_seconds", None) > 1.0e9);
    assert_eq!(value(&after, "renderer_watch_live", None), 1.0);

    // A hostile record → skipped counter with its reason.
    etcd.put(
        "/services/webapp/evil",
        r#"{"id":"evil","service":"webapp","address":"1.2.3.4\nserver x 6.6.6.6:80","port":80}"#,
    )
    .await;
    eventually(T, "skip counted", || async {
        let s = scrape(lb.metrics_port).await;
        (value(
            &s,
            "renderer_records_skipped_total",
            Some(("reason", "invalid")),
        ) == 1.0)
            .then_some(())
    })
    .await;

    // renderer status shows it, and why.
    let out = Command::new(bin("lb-renderer"))
        .args([
            "status",
            "--endpoints",
            &etcd.endpoint(),
            "--renderer",
            &format!("127.0.0.1:{}", lb.metrics_port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("/services/webapp/evil: invalid"), "{text}");
    assert!(text.contains("address"), "{text}");
    assert!(text.contains("s1 ") && text.contains("s2 "), "{text}");
    assert!(text.contains("last apply"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_applies_and_the_watch() {
    let dir = temp_dir();
    let mut etcd = Etcd::start(dir.path()).await;
    etcd.stop().await;
    let lb = Lb::start(dir.path(), &etcd, &["--ready-grace", "1s"]);
    let port = lb.metrics_port;
    let status = |path: &'static str| async move {
        http::get(port, path, None).await.map(|r| r.status).ok()
    };
    eventually(T, "healthz answers", || async {
        (status("/healthz").await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(
        status("/readyz").await,
        Some(503),
        "not ready before the first apply"
    );

    etcd.start_again().await;
    eventually(T, "ready after the first apply", || async {
        (status("/readyz").await == Some(200)).then_some(())
    })
    .await;

    etcd.stop().await;
    eventually(
        T,
        "not ready once etcd is down longer than the grace",
        || async { (status("/readyz").await == Some(503)).then_some(()) },
    )
    .await;
    let body = http::get(port, "/readyz", None).await.unwrap().body;
    assert!(body.contains("watch down"), "{body}");
    etcd.start_again().await;
    eventually(T, "ready again", || async {
        (status("/readyz").await == Some(200)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrar_exports_registration_state() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let port = free_port();
    let mut cmd = e2e::registrar_command(&etcd.endpoint(), "s1", 3000, "3s");
    cmd.args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let _reg = Proc::spawn("registrar", dir.path(), cmd);
    eventually(T, "registered and ready", || async {
        (http::get(port, "/readyz", None).await.ok()?.status == 200).then_some(())
    })
    .await;
    let s = scrape(port).await;
    assert_eq!(value(&s, "registrar_registered", None), 1.0);
    assert_eq!(value(&s, "registrar_lease_grants_total", None), 1.0);
    assert_eq!(value(&s, "registrar_build_info", None), 1.0);
    assert!(s.samples.iter().any(|x| x
        .metric
        .starts_with("registrar_etcd_request_duration_seconds")));
}

/// Against an etcd with its default settings (no `--grpc-keepalive-min-time`), a healthy
/// idle system keeps its connections and says nothing: no watch reconnect, no failed
/// keep-alive, no WARN line in either binary's log, then or on a graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_against_a_default_etcd_nothing_reconnects_and_nothing_warns() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let app = Backend::start(dir.path(), "s1");
    let reg_metrics = free_port();
    let mut reg_cmd = e2e::registrar_command(&etcd.endpoint(), "s1", app.port, "3s");
    reg_cmd.args([
        "--health-http",
        &format!("http://127.0.0.1:{}/health", app.port),
        "--health-interval",
        "1s",
        "--metrics-addr",
        &format!("127.0.0.1:{reg_metrics}"),
    ]);
    let mut registrar = Proc::spawn("registrar", dir.path(), reg_cmd);
    let mut lb = Lb::start(dir.path(), &etcd, &["--var", "cookie_key=idle-test-key"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    let idle = Duration::from_secs(30);
    let started = std::time::Instant::now();
    e2e::stays(
        idle,
        "no watch reconnect and no failed keep-alive",
        || async {
            let r = scrape(lb.metrics_port).await;
            let g = scrape(reg_metrics).await;
            value(&r, "renderer_watch_reconnects_total", None) == 0.0
                && value(&r, "renderer_watch_live", None) == 1.0
                && value(&g, "registrar_keepalive_failures_total", None) == 0.0
                && value(&g, "registrar_lease_grants_total", None) == 1.0
        },
    )
    .await;
    eprintln!(
        "idle for {:?}: 0 reconnects, 0 failed keep-alives",
        started.elapsed()
    );

    registrar.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(registrar.exited(T).await.is_some());
    lb.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(lb.proc.exited(T).await.is_some());
    for (name, log) in [("renderer", lb.proc.log()), ("registrar", registrar.log())] {
        let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        assert!(
            warns.is_empty(),
            "{name} logged WARN lines:\n{}",
            warns.join("\n")
        );
    }
}
