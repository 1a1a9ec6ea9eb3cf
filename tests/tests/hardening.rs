//! Failure behaviour with real processes: quarantine of a record HAProxy rejects, the
//! --min-instances guard, a frozen registrar, HAProxy dying under the renderer, a renderer
//! restarted under a running HAProxy (also one killed between a live join and its file),
//! etcd killed during a burst, HAProxy restarted by its supervisor, a server added to
//! HAProxy by hand.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Duration;

use e2e::lb::{master_cli, put_instance, template, wait_routed, Backend, Lb, Standalone};
use e2e::load::Load;
use e2e::{eventually, http, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(20);

/// etcd, web apps s1 and s2 (s1 registered), and HAProxy run on its own from a first
/// config (as a system service runs it), serving s1; the test starts the renderers.
struct Site {
    // Dropped in this order: HAProxy first, the directory last.
    haproxy: Proc,
    lb: Standalone,
    s2: Backend,
    _s1: Backend,
    etcd: Etcd,
    _dir: tempfile::TempDir,
}

impl Site {
    async fn start() -> Site {
        let dir = temp_dir();
        let etcd = Etcd::start(dir.path()).await;
        let (s1, s2) = (
            Backend::start(dir.path(), "s1"),
            Backend::start(dir.path(), "s2"),
        );
        put_instance(&etcd, "webapp", "s1", s1.port).await;
        let lb = Standalone::prepare(dir.path(), &etcd).await;
        let haproxy = lb.haproxy("haproxy");
        wait_routed(lb.http_port, &["s1"], T).await;
        Site {
            haproxy,
            lb,
            s2,
            _s1: s1,
            etcd,
            _dir: dir,
        }
    }
}

/// Waits for the renderer's first apply.
async fn following(r: &Proc) {
    eventually(T, "the renderer is following", || async {
        r.log().contains("apply").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_haproxy_rejects_is_quarantined_not_fleet_freezing() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    // A template that turns meta values into server keywords.
    let t = dir.path().join("t.hbs");
    let text = std::fs::read_to_string(template()).unwrap().replace(
        "check inter 2s weight {{weight}}",
        "check inter 2s weight {{weight}}{{#each meta}} {{this}}{{/each}}",
    );
    std::fs::write(&t, text).unwrap();
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put_instance(&etcd, "webapp", "s1", b[0].port).await;
    let lb = Lb::start_with_template(dir.path(), &etcd, &t, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    let bad = format!(
        r#"{{"id":"s2","service":"webapp","address":"127.0.0.1","port":{},"meta":{{"opt":"bogus"}}}}"#,
        b[1].port
    );
    etcd.put("/services/webapp/s2", &bad).await;
    put_instance(&etcd, "webapp", "s3", b[2].port).await;
    // The other change keeps flowing; the bad record is out, and reported.
    wait_routed(lb.http_port, &["s1", "s3"], T).await;
    eventually(T, "quarantine logged", || async {
        lb.proc
            .log()
            .contains("quarantined registry record")
            .then_some(())
    })
    .await;
    assert!(lb.proc.log().contains("/services/webapp/s2"));
    eventually(T, "/status lists the quarantined record", || async {
        let status = http::get(lb.metrics_port, "/status", None).await.ok()?.body;
        let doc: serde_json::Value = serde_json::from_str(&status).ok()?;
        doc["quarantined"].get("/services/webapp/s2").map(|_| ())
    })
    .await;
    assert!(!lb.config().contains("bogus"));

    // Fixed record → back in rotation.
    put_instance(&etcd, "webapp", "s2", b[1].port).await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_instances_guard_keeps_the_last_good_config() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put_instance(&etcd, "webapp", "s1", b[0].port).await;
    put_instance(&etcd, "webapp", "s2", b[1].port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--min-instances", "webapp=2"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    etcd.delete("/services/webapp/s2").await;
    eventually(T, "guard refuses", || async {
        lb.proc
            .log()
            .contains("refusing to apply: service webapp would have 1 instance")
            .then_some(())
    })
    .await;
    assert_eq!(lb.config_servers(), ["s1", "s2"], "last good config kept");
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    put_instance(&etcd, "webapp", "s3", b[2].port).await;
    wait_routed(lb.http_port, &["s1", "s3"], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_registrar_leaves_rotation_and_comes_back() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (s0, s1) = (
        Backend::start(dir.path(), "s0"),
        Backend::start(dir.path(), "s1"),
    );
    put_instance(&etcd, "webapp", "s0", s0.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    let cmd = e2e::registrar_command(&etcd.endpoint(), "s1", s1.port, "2s");
    let reg = Proc::spawn("registrar", dir.path(), cmd);
    wait_routed(lb.http_port, &["s0", "s1"], T).await;
    // A partition as the registrar sees it: it cannot keep its lease for longer than the TTL.
    reg.signal(Signal::SIGSTOP);
    wait_routed(lb.http_port, &["s0"], T).await;
    reg.signal(Signal::SIGCONT);
    let t = std::time::Instant::now();
    wait_routed(lb.http_port, &["s0", "s1"], T).await;
    eprintln!("SIGCONT -> back in rotation: {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "re-registered after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renderer_exits_promptly_when_haproxy_dies() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s1 = Backend::start(dir.path(), "s1");
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let mut lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    let master: i32 = eventually(T, "master pid", || async {
        let out = lb.master_cli("show proc").await;
        out.lines()
            .find(|l| l.contains("master"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), Signal::SIGKILL).unwrap();
    let status = lb
        .proc
        .exited(Duration::from_secs(10))
        .await
        .expect("renderer exits promptly");
    assert_ne!(status.code(), Some(0));
    assert!(lb.proc.log().contains("HAProxy exited"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renderer_restarted_under_a_running_haproxy_loses_no_traffic() {
    let site = Site::start().await;
    let (etcd, s2, lb) = (&site.etcd, &site.s2, &site.lb);
    let (http_port, master) = (lb.http_port, lb.master.clone());

    let mut first = lb.renderer("renderer-1", &[]);
    let load = Load::start(http_port, 5, 8, false);
    first.kill(); // crash
    wait_routed(http_port, &["s1"], T).await;
    let _second = lb.renderer("renderer-2", &[]);
    put_instance(etcd, "webapp", "s2", s2.port).await;
    wait_routed(http_port, &["s1", "s2"], T).await;
    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);
    let proc_out = master_cli(&master, "show proc").await;
    assert!(
        proc_out.contains("0 [failed: 0]"),
        "the new renderer applied s2 without a reload: {proc_out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_during_a_burst_is_caught_up_exactly() {
    let dir = temp_dir();
    let mut etcd = Etcd::start(dir.path()).await;
    let s0 = Backend::start(dir.path(), "s0");
    put_instance(&etcd, "webapp", "s0", s0.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    let mut c = etcd.client().await;
    for i in 0..60u16 {
        let v =
            registry::Instance::new("webapp", &format!("n{i:02}"), "127.0.0.1", 20000 + i).encode();
        c.put(format!("/services/webapp/n{i:02}"), v, None)
            .await
            .unwrap();
    }
    etcd.kill();
    // HAProxy keeps serving during the outage.
    assert!(http::get(lb.http_port, "/", None).await.is_ok());
    etcd.start_again().await;
    let mut c = etcd.client().await;
    for i in 0..30u16 {
        c.delete(format!("/services/webapp/n{i:02}"), None)
            .await
            .unwrap();
    }
    let mut want: Vec<String> = etcd
        .get_prefix("/services/webapp/")
        .await
        .iter()
        .map(|kv| kv.key.rsplit('/').next().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(want.len(), 31);
    eventually(T, "config and HAProxy equal the registry", || async {
        (lb.config_servers() == want && lb.running_servers().await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_restarted_by_its_supervisor_gets_the_live_changes_again() {
    // HAProxy on its own (a system service), the renderer through its master CLI. A join
    // goes live at once; its file is checked slowly (3 s), so when the supervisor restarts
    // HAProxy from the file on disk the join is not in it. The renderer must notice the new
    // master and apply the registry again.
    let mut site = Site::start().await;
    let (etcd, s2, lb, first) = (&site.etcd, &site.s2, &site.lb, &mut site.haproxy);
    let (http_port, cfg) = (lb.http_port, lb.cfg.clone());
    let r = lb.renderer(
        "renderer",
        &["--check-cmd", "sh -c 'sleep 3 && haproxy -c -f {}'"],
    );
    following(&r).await;

    put_instance(etcd, "webapp", "s2", s2.port).await;
    wait_routed(http_port, &["s1", "s2"], T).await;
    assert!(
        !std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("server s2 "),
        "the file is still being checked"
    );
    // The supervisor: the master and its workers killed, HAProxy started from the file.
    e2e::lb::kill_haproxy(first);
    let _second = lb.haproxy("haproxy-2");
    wait_routed(http_port, &["s1", "s2"], T).await;
    let log = r.log();
    assert!(
        log.contains("HAProxy was restarted by someone else"),
        "{log}"
    );
    // And the file follows once its check is done.
    eventually(T, "the file lists s2", || async {
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("server s2 ")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renderer_killed_between_a_live_join_and_its_file_leaves_no_ghost() {
    // HAProxy on its own, the renderer through its master CLI with a slow file check: a
    // join goes live, the renderer is killed before the join's file is written, and the
    // instance leaves while no renderer runs. The next renderer must not trust the file
    // to be what HAProxy runs: it compares, finds the join, and reloads HAProxy from the
    // registry's config (the chaos run's ghost: 270 servers stayed in HAProxy).
    let site = Site::start().await;
    let (etcd, s2, lb) = (&site.etcd, &site.s2, &site.lb);
    let (http_port, cfg, master) = (lb.http_port, lb.cfg.clone(), lb.master.clone());
    let mut first = lb.renderer(
        "renderer-1",
        &["--check-cmd", "sh -c 'sleep 60 && haproxy -c -f {}'"],
    );
    following(&first).await;
    put_instance(etcd, "webapp", "s2", s2.port).await;
    wait_routed(http_port, &["s1", "s2"], T).await;
    first.kill();
    assert!(
        !std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("server s2 "),
        "the file was still being checked"
    );
    etcd.delete(&registry::instance_key("/services", "webapp", "s2"))
        .await;

    let second = lb.renderer("renderer-2", &[]);
    wait_routed(http_port, &["s1"], T).await;
    // What the worker runs: s1 and nothing else (the master CLI is briefly unavailable
    // while it re-executes after the reload: ask until a worker answers).
    let running = eventually(T, "the worker answers show servers state", || async {
        e2e::lb::try_live_servers_at(&master).await
    })
    .await;
    assert_eq!(running.keys().collect::<Vec<_>>(), ["s1"]);
    let log = second.log();
    assert!(
        log.contains("HAProxy does not run the config on disk") && log.contains("nodes/s2"),
        "{log}"
    );
    // One reload (the repair), none for the start of HAProxy.
    let (reloads, failed) = eventually(T, "the master answers show proc", || async {
        let table = renderer::haproxy::ProcTable::parse(&master_cli(&master, "show proc").await)?;
        table
            .current_worker()
            .map(|_| (table.reloads, table.failed))
    })
    .await;
    assert_eq!((reloads, failed), (1, 0), "show proc: reloads, failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_added_by_hand_through_the_runtime_api_is_found_by_the_live_check() {
    let site = Site::start().await;
    let (s2, lb) = (&site.s2, &site.lb);
    let (http_port, master) = (lb.http_port, lb.master.clone());
    let r = lb.renderer("renderer", &["--resync", "1s"]);
    following(&r).await;
    // Something else than the renderer (a hand, a script) adds a server HAProxy serves.
    let added = master_cli(
        &master,
        &format!("@1 add server nodes/byhand 127.0.0.1:{}", s2.port),
    )
    .await;
    assert!(added.contains("New server registered"), "{added}");
    master_cli(&master, "@1 enable server nodes/byhand").await;
    eventually(
        T,
        "the renderer names the server and reloads it away",
        || async {
            let log = r.log();
            let state = master_cli(&master, "@1 show servers state nodes").await;
            (log.contains("HAProxy runs other servers than it was given")
                && log.contains("nodes/byhand: running, not in the config")
                && state.contains(" s1 ")
                && !state.contains(" byhand "))
            .then_some(())
        },
    )
    .await;
    wait_routed(http_port, &["s1"], T).await;
}
