//! Faults that need more than processes on loopback: a web-app host cut off from etcd by a
//! real network partition (a network namespace joined by a veth pair, created and removed by
//! the test), and a full disk under the renderer's destination (a tiny tmpfs).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::{Duration, Instant};

use e2e::lb::{exec_haproxy, put_instance, renderer_command, template, wait_routed, Backend, Lb};
use e2e::netns::Netns;
use e2e::{bin, eventually, free_port, temp_dir, Etcd, Proc};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_web_app_host_leaves_rotation_and_returns() {
    let dir = temp_dir();
    let ns = Netns::create();
    // etcd reachable from the host (loopback) and from the namespace (veth).
    let etcd = Etcd::start_listening(dir.path(), &["10.231.0.1"]).await;
    let s0 = Backend::start(dir.path(), "s0");
    put_instance(&etcd, "webapp", "s0", s0.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;

    // The web app and its registrar live on the "other host".
    let port = free_port();
    let mut app = ns.command(&bin("webapp"));
    app.args([
        "--bind",
        "10.231.0.2",
        "--port",
        &port.to_string(),
        "--id",
        "far",
    ]);
    let _app = Proc::spawn("webapp-far", dir.path(), app);
    let mut reg = ns.command(&bin("lb-registrar"));
    reg.args([
        "--endpoints",
        &format!("http://10.231.0.1:{}", etcd.client_port),
        "--service",
        "webapp",
        "--id",
        "far",
        "--address",
        "10.231.0.2",
        "--port",
        &port.to_string(),
        "--ttl",
        "3s",
    ]);
    let _reg = Proc::spawn("registrar-far", dir.path(), reg);
    wait_routed(lb.http_port, &["far", "s0"], T).await;

    ns.cut(true);
    let t = Instant::now();
    eventually(T, "lease of the cut-off instance expires", || async {
        etcd.get("/services/webapp/far")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    eprintln!("partition -> key gone after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(8));
    wait_routed(lb.http_port, &["s0"], T).await;

    ns.cut(false);
    let t = Instant::now();
    wait_routed(lb.http_port, &["far", "s0"], T).await;
    eprintln!("healed -> back in rotation after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "re-registered after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_old_config_and_retries() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (s1, s2, s3) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
        Backend::start(dir.path(), "s3"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    // The destination lives on a 256 KiB tmpfs the test fills up.
    let mount = e2e::Tmpfs::mount(&dir.path().join("cfgfs"), "256k");
    let fs = mount.path.clone();
    let (http_port, stats_port) = (free_port(), free_port());
    let cfg = fs.join("haproxy.cfg");
    let mut cmd = renderer_command(
        &etcd.endpoint(),
        &template(),
        &cfg,
        (http_port, stats_port),
        dir.path(),
    );
    cmd.args([
        "--metrics-addr",
        "off",
        "--no-runtime-api",
        "--haproxy-master-socket",
    ])
    .arg(dir.path().join("master.sock"));
    exec_haproxy(&mut cmd, &cfg);
    let renderer = Proc::spawn("renderer", dir.path(), cmd);
    wait_routed(http_port, &["s1"], T).await;
    let good = std::fs::read_to_string(&cfg).unwrap();

    // Fill the disk, then change the registry: the write fails, the old config stays.
    let filler = fs.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 512 * 1024]);
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    eventually(T, "write failure reported", || async {
        renderer
            .log()
            .contains("No space left on device")
            .then_some(())
    })
    .await;
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), good);
    wait_routed(http_port, &["s1"], T).await;

    // Space back: the failed apply is tried again on its own (no new change needed).
    std::fs::remove_file(&filler).unwrap();
    wait_routed(http_port, &["s1", "s2"], T).await;
    assert!(std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("server s2 "));
    put_instance(&etcd, "webapp", "s3", s3.port).await;
    wait_routed(http_port, &["s1", "s2", "s3"], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_does_not_undo_a_live_join_and_the_file_follows_once_freed() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (s1, s2) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let mount = e2e::Tmpfs::mount(&dir.path().join("cfgfs"), "256k");
    let fs = mount.path.clone();
    let (http_port, stats_port) = (free_port(), free_port());
    let cfg = fs.join("haproxy.cfg");
    let mut cmd = renderer_command(
        &etcd.endpoint(),
        &template(),
        &cfg,
        (http_port, stats_port),
        dir.path(),
    );
    cmd.args(["--metrics-addr", "off", "--haproxy-master-socket"])
        .arg(dir.path().join("master.sock"));
    exec_haproxy(&mut cmd, &cfg);
    let renderer = Proc::spawn("renderer", dir.path(), cmd);
    wait_routed(http_port, &["s1"], T).await;

    // Disk full: the join goes live through the runtime API; its file cannot be written.
    let filler = fs.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 512 * 1024]);
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    wait_routed(http_port, &["s1", "s2"], T).await;
    eventually(T, "write failure reported", || async {
        renderer
            .log()
            .contains("cannot write the config HAProxy runs")
            .then_some(())
    })
    .await;
    // Not rolled back while the disk stays full (a rollback would drop s2).
    e2e::stays(Duration::from_secs(2), "s2 stays served", || async {
        e2e::lb::served_ids(http_port, 20).await.contains_key("s2")
    })
    .await;
    assert!(!std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("server s2 "));

    std::fs::remove_file(&filler).unwrap();
    eventually(T, "the file follows once space is back", || async {
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("server s2 ")
            .then_some(())
    })
    .await;
    wait_routed(http_port, &["s1", "s2"], T).await;
    assert!(
        !renderer
            .log()
            .contains("reloading HAProxy from the last good config"),
        "{}",
        renderer.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_app_host_with_only_ipv6_registers_itself_and_is_served_live() {
    // The "other host" has one IPv6 address and no IPv4: it reaches etcd over IPv6, the
    // registrar finds its own address from the route (no --address), and HAProxy on this
    // host reaches the app over IPv6 — a join through the runtime API, no WARN.
    let dir = temp_dir();
    let ns = Netns::create_ipv6_only();
    let etcd = Etcd::start_listening(dir.path(), &["[fd00:231::1]"]).await;
    let s0 = Backend::start(dir.path(), "s0");
    put_instance(&etcd, "webapp", "s0", s0.port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--var", "cookie_key=ipv6-only-test"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0"], T).await;
    let (reloads, _, _) = lb.proc_state().await;

    let port = free_port();
    let mut app = ns.command(&bin("webapp"));
    app.args([
        "--bind",
        "fd00:231::2",
        "--port",
        &port.to_string(),
        "--id",
        "far6",
    ]);
    let _app = Proc::spawn("webapp-far6", dir.path(), app);
    let mut reg = ns.command(&bin("lb-registrar"));
    reg.args([
        "--endpoints",
        &format!("http://[fd00:231::1]:{}", etcd.client_port),
        "--service",
        "webapp",
        "--id",
        "far6",
        "--port",
        &port.to_string(),
        "--ttl",
        "3s",
        "--health-http",
        &format!("http://[fd00:231::2]:{port}/health"),
    ]);
    let registrar = Proc::spawn("registrar-far6", dir.path(), reg);
    wait_routed(lb.http_port, &["far6", "s0"], T).await;

    let kv = etcd.get("/services/webapp/far6").await.unwrap();
    let record: serde_json::Value = serde_json::from_str(&kv.value).unwrap();
    assert_eq!(
        record["address"], "fd00:231::2",
        "detected from the route: {record}"
    );
    assert_eq!(
        lb.proc_state().await.0,
        reloads,
        "the IPv6 join reloaded HAProxy"
    );
    for (name, log) in [("renderer", lb.proc.log()), ("registrar", registrar.log())] {
        let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        assert!(warns.is_empty(), "{name}: {warns:#?}");
    }
}
