//! Hitless membership: joins and leaves through HAProxy's runtime API, reloads only when
//! more than server lines change, fallbacks, drains, sticky sessions, and a restart from
//! the file serving the same set.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::lb::{put_instance, template, wait_routed, Backend, Lb};
use e2e::load::Load;
use e2e::{eventually, http, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(15);

/// The shipped template plus `extra` appended.
fn template_with(dir: &std::path::Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let t = edit(std::fs::read_to_string(template()).unwrap());
    let path = dir.join(name);
    std::fs::write(&path, t).unwrap();
    path
}

async fn churn(close: bool) {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (0..5)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    for x in &b {
        x.wait_up().await;
    }
    put_instance(&etcd, "webapp", "s0", b[0].port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0"], T).await;
    let before = lb.proc_state().await;

    let load = Load::start(lb.http_port, 8, 8, close);
    // 100 joins/leaves, paced so the load sees each state (~7 s).
    for i in 0..100usize {
        let x = &b[1 + i % 4];
        if (i / 4) % 2 == 0 {
            put_instance(&etcd, "webapp", &x.id, x.port).await;
        } else {
            etcd.delete(&format!("/services/webapp/{}", x.id)).await;
        }
        tokio::time::sleep(Duration::from_millis(70)).await; // pacing of the injected churn
    }
    let result = load.finish();
    eprintln!(
        "close={close}: {} requests, {} failed",
        result.requests,
        result.failed()
    );
    assert!(result.requests > 100, "{}", result.raw);
    assert_eq!(result.failed(), 0, "{}", result.raw);
    // i = 96..99 are puts of s1..s4 (round 24, even) → all five registered at the end.
    let want = ["s0", "s1", "s2", "s3", "s4"];
    wait_routed(lb.http_port, &want, T).await;
    let after = lb.proc_state().await;
    assert_eq!(
        after, before,
        "no reload, same worker (reloads, failed, worker pid)"
    );
    eventually(T, "file and running state agree", || async {
        let running = lb.running_servers().await;
        (running == want && lb.config_servers() == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_joins_and_leaves_under_keep_alive_load_without_a_reload() {
    churn(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_joins_and_leaves_under_connection_close_load_without_a_reload() {
    churn(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_reloads_exactly_once_and_refused_keywords_fall_back() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    // One backend per extra service, and a server keyword that HAProxy 2.6 and 3.0 both
    // refuse on dynamic servers (`init-addr`; 2.6 also refuses `cookie <value>`, 3.0 takes it).
    let t = template_with(dir.path(), "t.hbs", |t| {
        t.replace("check inter 2s weight {{weight}}", "check inter 2s weight {{weight}} init-addr last,libc,none")
            + "{{#each services}}{{#if (ne @key \"webapp\")}}\nbackend svc_{{@key}}\n{{#each this}}    server {{id}} {{address}}:{{port}}\n{{/each}}{{/if}}{{/each}}\n"
    });
    let (s1, s2) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start_with_template(dir.path(), &etcd, &t, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    // A join whose line carries `init-addr`: the runtime API refuses it → one reload, correct.
    let (r0, _, _) = lb.proc_state().await;
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    wait_apply_of(&lb, "webapp/s2").await;
    assert_eq!(lb.proc_state().await.0, r0 + 1, "one fallback reload");
    assert!(lb.proc.log().contains("falling back to a reload"));

    // A new backend (a new service): more than server lines change → exactly one reload.
    put_instance(&etcd, "api", "a1", 9999).await;
    wait_apply_of(&lb, "api/a1").await;
    assert!(lb.config().contains("backend svc_api"));
    let (r2, failed, _) = lb.proc_state().await;
    assert_eq!(r2, r0 + 2, "exactly one more reload");
    assert_eq!(failed, 0);
}

/// Waits for the renderer's log line of the apply that added `instance`.
async fn wait_apply_of(lb: &Lb, instance: &str) {
    let needle = format!("added=[\"{instance}\"]");
    eventually(T, &format!("apply of {instance} logged"), || async {
        lb.proc
            .log()
            .lines()
            .any(|l| l.contains(" apply ") && l.contains(&needle))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_lets_the_in_flight_request_finish() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (s1, s2) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;
    let port = lb.http_port;
    let slow = tokio::spawn(async move { http::get(port, "/slow?ms=2000", None).await });
    eventually(T, "slow request in flight on s1", || async {
        let stat = lb.master_cli("@1 show stat -1 4 -1").await;
        stat.lines()
            .any(|l| l.starts_with("nodes,s1,") && l.split(',').nth(4) == Some("1"))
            .then_some(())
    })
    .await;
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    etcd.delete("/services/webapp/s1").await;
    let resp = slow.await.unwrap().expect("in-flight request completes");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.instance_id().as_deref(), Some("s1"));
    wait_routed(lb.http_port, &["s2"], T).await;
    eventually(T, "s1 deleted from HAProxy", || async {
        (lb.running_servers().await == ["s2"]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_hold_for_servers_added_at_runtime() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put_instance(&etcd, "webapp", "s1", b[0].port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--var", "cookie_key=test-secret"]);
    lb.wait_serving().await;
    put_instance(&etcd, "webapp", "s2", b[1].port).await;
    put_instance(&etcd, "webapp", "s3", b[2].port).await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;
    let (reloads, _, _) = lb.proc_state().await;
    assert_eq!(reloads, 0, "joins went through the runtime API");
    // HAProxy 3.0+: each server carries its own cookie, its instance id (the same on every
    // load balancer). 2.6: a dynamic cookie derived from address:port and the key.
    let per_server_cookies = e2e::lb::haproxy_version() >= (3, 0);
    // (s1 is in the file from the start; joins reach the file after HAProxy.)
    assert_eq!(
        lb.config().contains(" cookie s1"),
        per_server_cookies,
        "per-server cookies exactly from 3.0 on:\n{}",
        lb.config()
    );
    let mut pinned = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let first = http::get(lb.http_port, "/", None).await.unwrap();
        let id = first.instance_id().unwrap();
        let cookie = first
            .sticky_cookie()
            .unwrap_or_else(|| panic!("no NODESESSID cookie from {id}: {:?}", first.headers));
        if per_server_cookies {
            assert_eq!(cookie, format!("NODESESSID={id}"));
        }
        for _ in 0..5 {
            let again = http::get(lb.http_port, "/", Some(&cookie)).await.unwrap();
            assert_eq!(
                again.instance_id().as_deref(),
                Some(id.as_str()),
                "sticky with {cookie}"
            );
        }
        pinned.insert(id);
    }
    assert!(
        pinned.len() >= 2,
        "cookies pin different servers: {pinned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_restarted_from_the_file_serves_the_same_set() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (0..4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put_instance(&etcd, "webapp", "s0", b[0].port).await;
    let mut lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    for i in 0..30usize {
        let x = &b[1 + i % 3];
        if i % 2 == 0 {
            put_instance(&etcd, "webapp", &x.id, x.port).await;
        } else {
            etcd.delete(&format!("/services/webapp/{}", x.id)).await;
        }
    }
    // Registry after the churn: s0 plus whoever was put last.
    let mut want: Vec<String> = etcd
        .get_prefix("/services/webapp/")
        .await
        .iter()
        .map(|kv| kv.key.rsplit('/').next().unwrap().to_string())
        .collect();
    want.sort();
    let want_refs: Vec<&str> = want.iter().map(String::as_str).collect();
    eventually(T, "running set and file equal the registry", || async {
        (lb.running_servers().await == want && lb.config_servers() == want).then_some(())
    })
    .await;
    assert_eq!(
        lb.proc_state().await.0,
        0,
        "no reload during membership churn"
    );

    // Stop the renderer (HAProxy stops with it) and start a plain HAProxy from the file.
    lb.proc.signal(Signal::SIGTERM);
    assert!(lb.proc.exited(T).await.is_some());
    let cmd = e2e::lb::haproxy_command(None, &lb.cfg);
    let _plain = Proc::spawn("haproxy-from-file", dir.path(), cmd);
    wait_routed(lb.http_port, &want_refs, T).await;
}

/// Large users first outgrow hand-edited configs: 10 000 servers in one backend (weight-0
/// fillers on closed ports), then a join and a leave. Both go through the runtime API —
/// no reload, same worker — the joined server's cookie pins requests to it (HAProxy 2.6:
/// derived for that one server when its address is set; 3.0: its own `cookie`), and the
/// file catches up with exactly the running set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_servers_a_join_and_a_leave_stay_live_and_sticky() {
    const N: usize = 10_000;
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s1 = Backend::start(dir.path(), "s1");
    let s2 = Backend::start(dir.path(), "s2");
    e2e::lb::put_filler(&etcd, "webapp", "f", N).await;
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--var", "cookie_key=test-secret"]);
    lb.wait_serving().await;
    let big = Duration::from_secs(120);
    eventually(big, "10 001 servers running", || async {
        let n = lb.live_servers().await.len();
        (n == N + 1).then_some(())
    })
    .await;
    wait_routed(lb.http_port, &["s1"], T).await;
    let (reloads, _, worker) = lb.proc_state().await;

    put_instance(&etcd, "webapp", "s2", s2.port).await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    // Sticky: a response from s2 carries its cookie, and the cookie brings the next
    // requests back to s2.
    let cookie = loop {
        let r = http::get(lb.http_port, "/", None).await.unwrap();
        if r.instance_id().as_deref() == Some("s2") {
            break r.sticky_cookie().expect("s2 sets its cookie");
        }
    };
    for _ in 0..10 {
        let again = http::get(lb.http_port, "/", Some(&cookie)).await.unwrap();
        assert_eq!(again.instance_id().as_deref(), Some("s2"), "{cookie}");
    }

    etcd.delete(&registry::instance_key("/services", "webapp", "s1"))
        .await;
    wait_routed(lb.http_port, &["s2"], T).await;
    // Traffic leaves s1 when it is set to drain; it leaves HAProxy's list a moment later,
    // once drained and deleted.
    let live = eventually(T, "s1 deleted from HAProxy", || async {
        let live = lb.live_servers().await;
        (!live.contains_key("s1")).then_some(live)
    })
    .await;
    assert!(live.contains_key("s2") && !live.contains_key("s1"));
    assert_eq!(live.len(), N + 1);
    assert_eq!(
        lb.proc_state().await,
        (reloads, 0, worker),
        "join and leave without a reload, same worker"
    );
    // The file follows the running set (checked and written in the background).
    let mut want: Vec<String> = live.keys().cloned().collect();
    want.sort();
    eventually(T, "the file lists exactly the running servers", || async {
        (lb.config_servers() == want).then_some(())
    })
    .await;
}

/// A server added through the runtime API keeps idle connections to its web app like a
/// server from the file does (HAProxy 2.6 gives runtime-added servers no connection pool
/// unless `add server` asks for one: every request opened and closed a connection, and
/// keep-alive throughput under churn fell to under half of the reload path's), and after
/// that load it still leaves live. (2.6's `del server` refuses while a connection is
/// attached; the renderer purges idle ones and retries. That race is too rare to provoke
/// here: the bench's `reload` scenario found it once in ~145 leaves under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_added_at_runtime_reuse_their_connections() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s1 = Backend::start(dir.path(), "s1");
    let s2 = Backend::start(dir.path(), "s2");
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    etcd.delete(&registry::instance_key("/services", "webapp", "s1"))
        .await;
    wait_routed(lb.http_port, &["s2"], T).await;
    assert_eq!(lb.proc_state().await.0, 0, "s2 was added live");
    let stat = || async {
        let csv = lb.master_cli("@1 show stat nodes 4 -1").await;
        let mut lines = csv.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_string)
            .collect();
        let row: Vec<String> = lines
            .find(|l| l.split(',').nth(1) == Some("s2"))
            .unwrap_or("")
            .split(',')
            .map(str::to_string)
            .collect();
        let get = |name: &str| -> u64 {
            header
                .iter()
                .position(|h| h == name)
                .and_then(|i| row.get(i)?.parse().ok())
                .unwrap_or(0)
        };
        (get("stot"), get("connect"))
    };
    let (requests0, connects0) = stat().await;
    let load = Load::start(lb.http_port, 3, 4, false);
    let res = load.finish();
    let (requests1, connects1) = stat().await;
    let (requests, connects) = (requests1 - requests0, connects1 - connects0);
    assert_eq!(res.failed(), 0);
    assert!(requests > 1000, "{requests} requests reached s2");
    assert!(
        connects * 10 < requests,
        "{connects} connections opened to s2 for {requests} requests: no reuse"
    );

    // After the load, s2 leaves through the runtime API too.
    let s3 = Backend::start(dir.path(), "s3");
    put_instance(&etcd, "webapp", "s3", s3.port).await;
    wait_routed(lb.http_port, &["s2", "s3"], T).await;
    etcd.delete(&registry::instance_key("/services", "webapp", "s2"))
        .await;
    wait_routed(lb.http_port, &["s3"], T).await;
    eventually(T, "s2 deleted from HAProxy", || async {
        (lb.running_servers().await == ["s3"]).then_some(())
    })
    .await;
    assert_eq!(lb.proc_state().await.0, 0, "s2 left without a reload");
}

/// An IPv6 instance (`"address":"::1"`) joins and leaves through the runtime API under
/// load: no reload, no WARN, served, 0 failed requests. (Before: every IPv6 join fell back
/// to a reload with a WARN — the live check compared HAProxy's `[::1]:port` with `::1:port`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_instance_joins_and_leaves_live() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s1 = Backend::start(dir.path(), "s1");
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let port6 = e2e::free_port();
    let mut app = Command::new(e2e::bin("webapp"));
    app.args(["--bind", "::1", "--port", &port6.to_string(), "--id", "six"]);
    let _six = Proc::spawn("webapp-six", dir.path(), app);
    eventually(T, "the IPv6 web app answers", || async move {
        std::net::TcpStream::connect(("::1", port6)).ok()
    })
    .await;
    // A secret cookie key: the public one is (rightly) a WARN of its own.
    let lb = Lb::start(dir.path(), &etcd, &["--var", "cookie_key=ipv6-test-secret"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;
    let (reloads, _, _) = lb.proc_state().await;
    let load = Load::start(lb.http_port, 6, 4, false);

    let key = registry::instance_key("/services", "webapp", "six");
    let value = registry::Instance::new("webapp", "six", "::1", port6).encode();
    etcd.put(&key, &value).await;
    wait_routed(lb.http_port, &["s1", "six"], T).await;
    let live = lb.live_servers().await;
    assert_eq!(live["six"].addr, "::1", "{live:?}");
    eventually(T, "the file follows", || async {
        lb.config()
            .contains(&format!("server six ::1:{port6} "))
            .then_some(())
    })
    .await;
    // Sticky sessions agree between the runtime path and the file: HAProxy 3.0 uses the
    // instance id, 2.6 the cookie derived from the key and [::1]:port.
    let want = if e2e::lb::haproxy_version() >= (3, 0) {
        "six".to_string()
    } else {
        renderer::haproxy::dynamic_cookie("ipv6-test-secret", "::1", port6).unwrap()
    };
    let http_port = lb.http_port;
    let served = eventually(T, "six answers with its cookie", || async move {
        let r = http::get(http_port, "/", None).await.ok()?;
        (r.instance_id().as_deref() == Some("six"))
            .then_some(r)?
            .sticky_cookie()
    })
    .await;
    assert_eq!(
        served,
        format!("NODESESSID={want}"),
        "the runtime path's cookie"
    );
    let line = lb
        .config()
        .lines()
        .find(|l| l.contains("server six "))
        .map(str::to_string)
        .unwrap();
    assert!(
        line.contains(&format!("cookie {want}")),
        "the file's cookie: {line}"
    );
    etcd.delete(&key).await;
    wait_routed(lb.http_port, &["s1"], T).await;
    eventually(T, "the file follows the leave", || async {
        (!lb.config().contains("server six ")).then_some(())
    })
    .await;

    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);
    assert_eq!(
        lb.proc_state().await.0,
        reloads,
        "an IPv6 join or leave reloaded HAProxy"
    );
    let log = lb.proc.log();
    let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(warns.is_empty(), "{warns:#?}");
}
