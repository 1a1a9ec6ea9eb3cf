//! Operators steer instances from etcd (`<prefix>/_admin/<service>/<id>`): drain,
//! maintenance and weight go live through the runtime API of every load balancer under load
//! with no reload, and the file keeps them across a reload and an HAProxy restart; a
//! deliberate stop of every instance (records marked `leaving`) empties the backend at once,
//! while leases lost without the mark are still held.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::lb::{master_cli, put_instance, wait_routed, Backend, Lb, Standalone};
use e2e::load::Load;
use e2e::{eventually, registrar_command, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(15);

/// `show stat` rows of backend `nodes`' servers in the current worker: name → column → value.
async fn stat(master: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let csv = master_cli(master, "@1 show stat nodes 4 -1").await;
    renderer::haproxy::parse_stat(&csv)
        .into_iter()
        .filter_map(|row| Some((row.get("svname")?.clone(), row)))
        .filter(|(name, _)| name != "BACKEND" && !name.is_empty())
        .collect()
}

/// Waits until server `name` runs with `status` (a prefix: "DRAIN", "MAINT"; "READY" means
/// neither drain nor maintenance, whatever its health) and user weight `weight`; returns
/// how long it took from `since`.
async fn wait_live(
    master: &Path,
    name: &str,
    status: &str,
    weight: &str,
    since: Instant,
) -> Duration {
    eventually(T, &format!("{name}: {status} weight {weight}"), || async {
        let rows = stat(master).await;
        let row = rows.get(name)?;
        let st = row.get("status")?;
        let state_ok = match status {
            "READY" => !st.starts_with("DRAIN") && !st.starts_with("MAINT"),
            s => st.starts_with(s),
        };
        (state_ok && row.get("uweight")? == weight).then(|| since.elapsed())
    })
    .await
}

/// [`wait_live`] on every load balancer: the slowest one's time.
async fn wait_live_all(
    masters: &[&Path],
    name: &str,
    status: &str,
    weight: &str,
    since: Instant,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for m in masters {
        slowest = slowest.max(wait_live(m, name, status, weight, since).await);
    }
    slowest
}

/// Total sessions server `name` has had.
async fn stot(master: &Path, name: &str) -> u64 {
    stat(master).await[name]["stot"].parse().unwrap()
}

/// Waits until the other servers have taken `n` more sessions, then checks that `name` took
/// none in the meantime: no new requests reach it.
async fn takes_no_new_requests(master: &Path, name: &str, others: &[&str], n: u64) {
    let sum = |rows: &BTreeMap<String, BTreeMap<String, String>>| -> u64 {
        others
            .iter()
            .map(|o| rows[*o]["stot"].parse::<u64>().unwrap())
            .sum()
    };
    let mine = stot(master, name).await;
    let start = sum(&stat(master).await);
    eventually(T, &format!("{n} more sessions on {others:?}"), || async {
        (sum(&stat(master).await) >= start + n).then_some(())
    })
    .await;
    assert_eq!(stot(master, name).await, mine, "{name} took new sessions");
}

fn admin_key(id: &str) -> String {
    registry::admin_key("/services", "webapp", id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_maintenance_and_weight_go_live_under_load_without_a_reload() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    for x in &b {
        x.wait_up().await;
        put_instance(&etcd, "webapp", &x.id, x.port).await;
    }
    // A private cookie key: the public one's WARN is not what these tests look for.
    let lb = Lb::start(dir.path(), &etcd, &["--var", "cookie_key=controls-test"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;
    // A second load balancer on the same registry: every control must reach both.
    let dir2 = dir.path().join("lb2");
    std::fs::create_dir_all(&dir2).unwrap();
    let lb2 = Lb::start(&dir2, &etcd, &["--var", "cookie_key=controls-test"]);
    lb2.wait_serving().await;
    wait_routed(lb2.http_port, &["s1", "s2", "s3"], T).await;
    let m = lb.master.clone();
    let m2 = lb2.master.clone();
    let both = [m.as_path(), m2.as_path()];
    wait_live_all(&both, "s1", "READY", "100", Instant::now()).await;
    let before = (lb.proc_state().await, lb2.proc_state().await);
    let load = Load::start(lb.http_port, 25, 8, false);

    // Drain: HAProxy's DRAIN, weight 0, no new requests; the file says weight 0.
    let t = Instant::now();
    etcd.put(
        &admin_key("s1"),
        r#"{"state":"drain","reason":"disk swap"}"#,
    )
    .await;
    let drain = wait_live_all(&both, "s1", "DRAIN", "0", t).await;
    takes_no_new_requests(&m, "s1", &["s2", "s3"], 500).await;
    // The file follows a live change once its check is done.
    lb.wait_server_line("s1", " weight 0 ", T).await;

    // Maintenance: MAINT, no requests; the file says disabled.
    let t = Instant::now();
    etcd.put(&admin_key("s2"), r#"{"state":"maint"}"#).await;
    let maint = wait_live_all(&both, "s2", "MAINT", "100", t).await;
    takes_no_new_requests(&m, "s2", &["s3"], 500).await;
    lb.wait_server_line("s2", " disabled", T).await;

    // `lb-renderer status` names each instance's state and reason, and admin keys with no
    // instance.
    etcd.put(
        &admin_key("gone"),
        r#"{"state":"maint","reason":"retired"}"#,
    )
    .await;
    let out = std::process::Command::new(e2e::bin("lb-renderer"))
        .args(["status", "--endpoints", &etcd.endpoint()])
        .args(["--renderer", &format!("127.0.0.1:{}", lb.metrics_port)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = |id: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or("")
            .to_string()
    };
    assert!(line("s1").ends_with("DRAIN (admin: disk swap)"), "{text}");
    assert!(line("s2").ends_with("MAINT (admin)"), "{text}");
    assert!(
        !line("s3").contains("DRAIN") && !line("s3").contains("MAINT"),
        "{text}"
    );
    assert!(
        text.contains("admin keys that match no registered instance")
            && text.contains("/services/_admin/webapp/gone: maint (retired)"),
        "{text}"
    );
    etcd.delete(&admin_key("gone")).await;

    // Weight.
    let t = Instant::now();
    etcd.put(&admin_key("s3"), r#"{"weight":7}"#).await;
    let weight = wait_live_all(&both, "s3", "READY", "7", t).await;

    // Keys deleted: every instance back to its own record.
    let t = Instant::now();
    for id in ["s1", "s2", "s3"] {
        etcd.delete(&admin_key(id)).await;
    }
    let mut back = Duration::ZERO;
    for id in ["s1", "s2", "s3"] {
        back = back.max(wait_live_all(&both, id, "READY", "100", t).await);
    }
    // …and taking requests again.
    let (s1, s2) = (stot(&m, "s1").await, stot(&m, "s2").await);
    eventually(T, "s1 and s2 take requests again", || async {
        (stot(&m, "s1").await > s1 && stot(&m, "s2").await > s2).then_some(())
    })
    .await;
    let result = load.finish();
    eprintln!(
        "etcd write → live state on both load balancers (the slower): drain {drain:?}, maint {maint:?}, weight {weight:?}, cleared {back:?}; {} requests, {} failed",
        result.requests,
        result.failed()
    );
    assert!(result.requests > 1000, "{}", result.raw);
    assert_eq!(result.failed(), 0, "{}", result.raw);
    assert_eq!(
        (lb.proc_state().await, lb2.proc_state().await),
        before,
        "no reload on either load balancer, same workers (reloads, failed, worker pid)"
    );
    for took in [drain, maint, weight, back] {
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    for l in [&lb, &lb2] {
        assert!(!l.proc.log().contains(" WARN "), "{}", l.proc.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_is_kept_across_a_reload_and_an_haproxy_restart_from_the_file() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=5)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    for x in &b[..2] {
        put_instance(&etcd, "webapp", &x.id, x.port).await;
    }
    let lb = Standalone::prepare(dir.path(), &etcd).await;
    let mut haproxy = lb.haproxy("haproxy-1");
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    // More than 2 server changes in one apply go through a reload.
    let mut renderer = lb.renderer("renderer", &["--runtime-max-changes", "2"]);
    eventually(T, "the renderer is following", || async {
        renderer.log().contains("apply").then_some(())
    })
    .await;
    let m = lb.master.clone();
    etcd.put(
        &admin_key("s1"),
        r#"{"state":"maint","reason":"disk swap"}"#,
    )
    .await;
    wait_live(&m, "s1", "MAINT", "100", Instant::now()).await;
    let worker = master_cli(&m, "show proc").await;

    // Something else causes a reload: three joins in one transaction.
    let client = etcd.client().await;
    let puts = b[2..]
        .iter()
        .map(|x| {
            let rec = registry::Instance::new("webapp", &x.id, "127.0.0.1", x.port);
            etcd_client::TxnOp::put(
                registry::instance_key("/services", "webapp", &x.id),
                rec.encode(),
                None,
            )
        })
        .collect::<Vec<_>>();
    client
        .kv_client()
        .txn(etcd_client::Txn::new().and_then(puts))
        .await
        .unwrap();
    wait_routed(lb.http_port, &["s2", "s3", "s4", "s5"], T).await;
    assert_ne!(master_cli(&m, "show proc").await, worker, "a reload");
    assert!(renderer.log().contains("reload"), "{}", renderer.log());
    wait_live(&m, "s1", "MAINT", "100", Instant::now()).await;

    // HAProxy restarted from the file with no renderer to repair anything.
    renderer.signal(Signal::SIGTERM);
    renderer.exited(T).await;
    e2e::lb::kill_haproxy(&mut haproxy);
    let _second = lb.haproxy("haproxy-2");
    wait_routed(lb.http_port, &["s2", "s3", "s4", "s5"], T).await;
    wait_live(&m, "s1", "MAINT", "100", Instant::now()).await;
    let served = e2e::lb::served_ids(lb.http_port, 40).await;
    assert!(!served.contains_key("s1"), "{served:?}");
}

/// Registrars for `backends`, `--ttl 3s`, each running until stopped.
fn registrars(dir: &Path, etcd: &Etcd, backends: &[Backend]) -> Vec<Proc> {
    backends
        .iter()
        .map(|x| {
            let cmd = registrar_command(&etcd.endpoint(), &x.id, x.port, "3s");
            Proc::spawn(&format!("registrar-{}", x.id), dir, cmd)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberate_stop_of_every_instance_empties_at_once_and_a_mass_revocation_is_held() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    let lb = Lb::start(
        dir.path(),
        &etcd,
        &["--empty-hold", "10s", "--var", "cookie_key=controls-test"],
    );
    let regs = registrars(dir.path(), &etcd, &b);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;

    // Every registrar stopped gracefully: each marks its record leaving, then revokes.
    let t = Instant::now();
    for r in &regs {
        r.signal(Signal::SIGTERM);
    }
    eventually(T, "backend emptied", || async {
        lb.live_servers().await.is_empty().then_some(())
    })
    .await;
    let emptied = t.elapsed();
    for mut r in regs {
        assert_eq!(
            r.exited(T).await.and_then(|s| s.code()),
            Some(0),
            "{}",
            r.log()
        );
    }
    eprintln!("deliberate stop of 3 instances → backend empty in {emptied:?}");
    assert!(emptied < Duration::from_secs(5), "held: {emptied:?}");
    eventually(T, "the file has no server", || async {
        lb.config_servers().is_empty().then_some(())
    })
    .await;
    assert!(!lb.proc.log().contains(" WARN "), "{}", lb.proc.log());

    // Registered again, then every lease revoked behind the registrars' backs (what
    // etcd's mass revocation looks like): no mark, so held.
    let regs = registrars(dir.path(), &etcd, &b);
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;
    let leases: Vec<String> = etcd
        .get_prefix("/services/webapp/")
        .await
        .iter()
        .map(|kv| format!("{:x}", kv.lease))
        .collect();
    assert_eq!(leases.len(), 3);
    for r in &regs {
        r.signal(Signal::SIGSTOP); // so they cannot register again at once
    }
    for l in &leases {
        etcd.etcdctl(&["lease", "revoke", l]);
    }
    eventually(T, "the hold's WARN", || async {
        lb.proc
            .log()
            .contains("every instance of the service left at once")
            .then_some(())
    })
    .await;
    // Revoked one by one, the first leaves may be applied; the last is held.
    assert!(!lb.running_servers().await.is_empty(), "held");
    eventually(T, "the file keeps the held servers", || async {
        (!lb.config_servers().is_empty()).then_some(())
    })
    .await;
    assert!(!lb.running_servers().await.is_empty(), "held");
    for r in &regs {
        r.signal(Signal::SIGCONT);
    }
}
