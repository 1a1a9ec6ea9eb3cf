//! renderer + real HAProxy + real backends + real etcd: routing follows the registry,
//! bursts coalesce, bad input never reaches HAProxy, store failures are survived, and
//! reloads under load drop nothing.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;
use std::time::Duration;

use e2e::lb::{put_instance, served_ids, wait_routed, Backend, Lb};
use e2e::load::Load;
use e2e::{bin, eventually, http, stays, temp_dir, Etcd, Proc};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(15);

/// The file follows the traffic: membership changes go live through the runtime API first,
/// then the checked file is written.
async fn wait_config(lb: &Lb, want: &[&str]) {
    eventually(T, &format!("config lists exactly {want:?}"), || async {
        (lb.config_servers() == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_registrations_from_etcdctl_and_the_registrar() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let (s1, s2, s3) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
        Backend::start(dir.path(), "s3"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    // etcdctl-style put.
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;

    // Through the registrar binary.
    let reg = {
        let cmd = e2e::registrar_command(&etcd.endpoint(), "s3", s3.port, "5s");
        Proc::spawn("registrar-s3", dir.path(), cmd)
    };
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;

    // The stats page lists the servers.
    let stats = http::get(lb.stats_port, "/;csv", None)
        .await
        .expect("stats page");
    for id in ["s1", "s2", "s3"] {
        assert!(
            stats.body.contains(&format!("nodes,{id},")),
            "stats lists {id}"
        );
    }

    // Deletion with etcdctl, then a graceful registrar stop.
    etcd.delete("/services/webapp/s1").await;
    wait_routed(lb.http_port, &["s2", "s3"], T).await;
    reg.signal(Signal::SIGTERM);
    wait_routed(lb.http_port, &["s2"], T).await;
    wait_config(&lb, &["s2"]).await;
    assert!(
        std::path::Path::new(&format!("{}.prev", lb.cfg.display())).exists(),
        "previous config kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_changes_coalesces_into_few_reloads() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b = Backend::start(dir.path(), "keep");
    put_instance(&etcd, "webapp", "keep", b.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    let (reloads_before, _, _) = lb.proc_state().await;
    let applies_before = lb.applies();

    // 500 changes: 300 puts of 150 instances (each put twice with different ports), then
    // 200 deletes, leaving 50 + "keep". Unreachable ports are fine: they only fail checks.
    let mut c = etcd.client().await;
    for round in 0..2u16 {
        for i in 0..150u16 {
            let v = registry::Instance::new(
                "webapp",
                &format!("n{i:03}"),
                "127.0.0.1",
                20000 + i + round,
            )
            .encode();
            c.put(format!("/services/webapp/n{i:03}"), v, None)
                .await
                .unwrap();
        }
    }
    for i in 0..100u16 {
        c.delete(format!("/services/webapp/n{i:03}"), None)
            .await
            .unwrap();
    }
    for i in 0..100u16 {
        // Deleting absent keys is not a change; delete the second half of the survivors'
        // ports instead: re-put 100 with their final port (identical → no change).
        let j = 100 + (i % 50);
        let v = registry::Instance::new("webapp", &format!("n{j:03}"), "127.0.0.1", 20000 + j + 1)
            .encode();
        c.put(format!("/services/webapp/n{j:03}"), v, None)
            .await
            .unwrap();
    }
    let mut want: Vec<String> = (100..150).map(|i| format!("n{i:03}")).collect();
    want.push("keep".into());
    want.sort();
    eventually(
        T,
        "final config has exactly the surviving instances",
        || async { (lb.config_servers() == want).then_some(()) },
    )
    .await;
    // Ports are the final ones.
    assert!(
        lb.config().contains("server n149 127.0.0.1:20150 "),
        "final port of n149"
    );
    eventually(T, "HAProxy runs the final set", || async {
        (lb.running_servers().await == want).then_some(())
    })
    .await;
    let (reloads_after, failed, _) = lb.proc_state().await;
    let reloads = reloads_after - reloads_before;
    let applies = lb.applies() - applies_before;
    eprintln!("500 changes -> {applies} applies, {reloads} reloads");
    // Reloads are what a burst must not multiply. Live applies are not held back (a change
    // after a live apply goes at once, so a lone change never waits): a burst is batched by
    // whatever queues up while an apply runs — here 5–22 applies depending on the
    // machine's load, so the bound is one apply per ten changes.
    assert!(
        (1..=50).contains(&applies),
        "{applies} applies for one burst of 500 changes"
    );
    assert!(reloads <= 10, "{reloads} reloads for one burst");
    assert_eq!(failed, 0);
    assert!(served_ids(lb.http_port, 5).await.contains_key("keep"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_reput_and_unrelated_changes_do_not_reload() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b = Backend::start(dir.path(), "s1");
    put_instance(&etcd, "webapp", "s1", b.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;
    let before = lb.proc_state().await;
    let applies = lb.applies();
    let mtime = std::fs::metadata(&lb.cfg).unwrap().modified().unwrap();

    // Same bytes again: not a model change at all.
    put_instance(&etcd, "webapp", "s1", b.port).await;
    // A change the template does not use (another service): the model changes and the
    // renderer renders, but the bytes are identical, so nothing is written or reloaded.
    put_instance(&etcd, "other", "x1", 9).await;
    eventually(T, "renderer processed the unrelated change", || async {
        (lb.applies() > applies).then_some(())
    })
    .await;
    assert!(
        lb.proc
            .log()
            .lines()
            .rfind(|l| l.contains(" apply "))
            .unwrap_or("")
            .contains("written=0"),
        "{}",
        lb.proc.log()
    );
    assert_eq!(lb.proc_state().await, before, "no reload");
    assert_eq!(
        std::fs::metadata(&lb.cfg).unwrap().modified().unwrap(),
        mtime,
        "file not rewritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_templates_and_failing_checks_never_replace_the_good_config() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;

    // A template that does not compile: refuse to start, exit 64, clear message.
    let bad = dir.path().join("bad.hbs");
    std::fs::write(&bad, "global\n{{#each (instances \"webapp\")}}\n").unwrap();
    let mut cmd = Command::new(bin("lb-renderer"));
    cmd.args([
        "--endpoints",
        &etcd.endpoint(),
        "--template",
        &format!("{}:{}/out.cfg", bad.display(), dir.path().display()),
    ]);
    let mut p = Proc::spawn("renderer-bad", dir.path(), cmd);
    let status = p.exited(T).await.expect("exits");
    assert_eq!(status.code(), Some(64));
    assert!(p.log().contains("does not compile"), "{}", p.log());
    assert!(!dir.path().join("out.cfg").exists());

    // A check that fails at runtime (switched on by a marker file): the old config stays,
    // HAProxy keeps serving it, and the next good change goes through.
    let s1 = Backend::start(dir.path(), "s1");
    let s2 = Backend::start(dir.path(), "s2");
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let marker = dir.path().join("fail-check");
    let check = format!("test ! -e {} && haproxy -c -f {{}}", marker.display());
    let lb = Lb::start(dir.path(), &etcd, &["--check-cmd", &check]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;
    let good = lb.config();
    std::fs::write(&marker, "").unwrap();
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    // The apply ends with the error (a change already made live is rolled back by a
    // reload from the last good file).
    eventually(T, "failed apply logged", || async {
        let log = lb.proc.log();
        (log.contains("rendered config rejected") && log.contains("errors=1")).then_some(())
    })
    .await;
    assert_eq!(lb.config(), good, "destination untouched");
    stays(
        Duration::from_millis(300),
        "HAProxy serves the old config",
        || async { served_ids(lb.http_port, 2).await.keys().eq(["s1"].iter()) },
    )
    .await;
    std::fs::remove_file(&marker).unwrap();
    let s3 = Backend::start(dir.path(), "s3");
    put_instance(&etcd, "webapp", "s3", s3.port).await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_loses_its_last_instance_renders_empty() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    // The natural form, `{{#each services.<name>}}`, for the traffic backend and for a
    // backend whose service never had an instance.
    let shipped = std::fs::read_to_string(e2e::lb::template()).unwrap();
    let each = "{{#each (instances (default vars.service \"webapp\"))}}";
    assert!(
        shipped.contains(each),
        "shipped template changed: update this test"
    );
    let t = dir.path().join("t.hbs");
    std::fs::write(
        &t,
        shipped.replace(each, "{{#each services.webapp}}")
            + "\nbackend api\n{{#each services.api}}    server {{id}} {{address}}:{{port}}\n{{/each}}",
    )
    .unwrap();
    let (s1, s2) = (
        Backend::start(dir.path(), "s1"),
        Backend::start(dir.path(), "s2"),
    );
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    let lb = Lb::start_with_template(dir.path(), &etcd, &t, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    etcd.delete("/services/webapp/s1").await;
    wait_config(&lb, &["s2"]).await;
    // The last instance leaves: its server line goes, in the file and in HAProxy.
    etcd.delete("/services/webapp/s2").await;
    wait_config(&lb, &[]).await;
    eventually(T, "no server left in HAProxy", || async {
        lb.running_servers().await.is_empty().then_some(())
    })
    .await;
    assert!(!lb.proc.log().contains("strict mode"), "{}", lb.proc.log());
    // And it comes back.
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    wait_routed(lb.http_port, &["s1"], T).await;

    // Strictness stays for everything else: a misspelt variable is an error.
    let typo = dir.path().join("typo.hbs");
    std::fs::write(
        &typo,
        "{{#each services.webapp}}{{id}}{{/each}} {{vars.http_prot}}\n",
    )
    .unwrap();
    let out = Command::new(bin("lb-renderer"))
        .args(["--endpoints", &etcd.endpoint(), "--dry-run", "--template"])
        .arg(format!("{}:/dev/null", typo.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a misspelt variable must fail");
    assert!(
        err.contains("http_prot"),
        "the error names the variable: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partials_helpers_and_diff_from_the_registry_and_a_bad_partial_exits_64() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    put_instance(&etcd, "webapp", "s1", 3001).await;
    put_instance(&etcd, "webapp", "s2", 3002).await;
    let partials = dir.path().join("partials");
    std::fs::create_dir(&partials).unwrap();
    std::fs::write(
        partials.join("server.hbs"),
        "    server {{upper id}} {{address}}:{{add port 1000}}\n",
    )
    .unwrap();
    let tpl = dir.path().join("t.hbs");
    std::fs::write(
        &tpl,
        "backend nodes\n{{#each services.webapp}}{{> server}}{{/each}}",
    )
    .unwrap();
    let dry = |partials: &std::path::Path| {
        Command::new(bin("lb-renderer"))
            .args(["--endpoints", &etcd.endpoint(), "--dry-run", "--template"])
            .arg(format!("{}:/dev/null", tpl.display()))
            .arg("--partials")
            .arg(partials)
            .output()
            .unwrap()
    };
    let out = dry(&partials);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("    server S1 127.0.0.1:4001\n"), "{text}");
    assert!(text.contains("    server S2 127.0.0.1:4002\n"), "{text}");
    // A partial that does not compile: a clear error naming it, exit 64, nothing written.
    std::fs::write(partials.join("broken.hbs"), "{{#each}}").unwrap();
    let out = dry(&partials);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("partial broken"), "{err}");
    let out = dry(&dir.path().join("missing"));
    assert_eq!(out.status.code(), Some(64));

    // --dry-run --diff: what would change in the destination, nothing written.
    std::fs::remove_file(partials.join("broken.hbs")).unwrap();
    let dest = dir.path().join("haproxy.cfg");
    let before = "backend nodes\n    server S1 127.0.0.1:4001\n";
    std::fs::write(&dest, before).unwrap();
    let diff = |extra: &[&str]| {
        Command::new(bin("lb-renderer"))
            .args(["--endpoints", &etcd.endpoint(), "--template"])
            .arg(format!("{}:{}", tpl.display(), dest.display()))
            .arg("--partials")
            .arg(&partials)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = diff(&["--dry-run", "--diff"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\n+    server S2 127.0.0.1:4002\n"), "{text}");
    assert!(!text.contains("\n-    server S1"), "{text}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), before);
    // --diff means nothing without --dry-run: a usage error.
    assert_eq!(diff(&["--diff"]).status.code(), Some(64));
}

/// `renderer check`: every template rendered against the live registry and checked by
/// HAProxy, nothing written. A template HAProxy accepts passes (exit 0); one with a line
/// HAProxy rejects fails (exit 1) naming the template and the line; a template that does
/// not compile fails the same way; the destinations are never created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renderer_check_renders_against_the_registry_and_names_the_rejected_line() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    put_instance(&etcd, "webapp", "s1", 3001).await;
    put_instance(&etcd, "webapp", "s2", 3002).await;
    let good = std::fs::read_to_string(e2e::lb::template()).unwrap();
    let good_tpl = dir.path().join("good.hbs");
    std::fs::write(&good_tpl, &good).unwrap();
    // The same template with a directive HAProxy does not know, in the backend.
    let bad = good.replacen(
        "\nbackend nodes\n",
        "\nbackend nodes\n    bogus-directive on\n",
        1,
    );
    assert_ne!(bad, good, "the lab template has a `backend nodes` line");
    let bad_tpl = dir.path().join("bad.hbs");
    std::fs::write(&bad_tpl, &bad).unwrap();
    let bogus_line = bad
        .lines()
        .position(|l| l.contains("bogus-directive"))
        .unwrap();
    let broken_tpl = dir.path().join("broken.hbs");
    std::fs::write(&broken_tpl, "global\n{{#each services}}\n").unwrap();
    let dest = |n: &str| dir.path().join(n);
    let check = |templates: &[(&std::path::Path, &str)]| {
        let mut cmd = Command::new(bin("lb-renderer"));
        cmd.args(["check", "--endpoints", &etcd.endpoint()]);
        for (tpl, d) in templates {
            cmd.arg("--template")
                .arg(format!("{}:{}", tpl.display(), dest(d).display()));
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, text, err) = check(&[(&good_tpl, "good.cfg")]);
    assert_eq!(code, Some(0), "{text}{err}");
    assert!(
        text.contains(&format!("ok   {} -> ", good_tpl.display())),
        "{text}"
    );
    assert!(text.contains("`haproxy -c -f {}` passed"), "{text}");
    assert!(text.contains("(2 instances)"), "{text}");

    let (code, text, err) = check(&[(&good_tpl, "good.cfg"), (&bad_tpl, "bad.cfg")]);
    assert_eq!(code, Some(1), "{text}{err}");
    assert!(
        text.contains(&format!("ok   {} -> ", good_tpl.display())),
        "{text}"
    );
    let fail = text
        .lines()
        .find(|l| l.starts_with(&format!("FAIL {} -> ", bad_tpl.display())))
        .unwrap_or_else(|| panic!("{text}"));
    // The rendered line and its text (above the servers, the template's line too).
    assert!(
        fail.contains(&format!(
            "(line {}: \"bogus-directive on\")",
            bogus_line + 1
        )),
        "{fail}"
    );
    assert!(fail.contains("in 'backend' section"), "{fail}");
    assert!(text.contains("1 of 2 templates passed"), "{text}");

    let (code, text, err) = check(&[(&broken_tpl, "broken.cfg")]);
    assert_eq!(code, Some(1), "{text}{err}");
    assert!(
        text.starts_with("FAIL ") && text.contains("broken.hbs"),
        "{text}"
    );
    for d in ["good.cfg", "bad.cfg", "broken.cfg"] {
        assert!(!dest(d).exists(), "{d} written");
    }
    // Bad flags stay a usage error.
    assert_eq!(check(&[]).0, Some(64));
}

/// Found by the chaos run: etcd 3.4.23 (Debian 12) can revoke every lease at once when a
/// stalled leader resumes (etcd #15247); the registrars register again within a second,
/// but the backend was emptied meanwhile (~2 000 failed requests). Now the servers of a
/// service that lost every instance at once stay for `--empty-hold`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_emptied_at_once_keeps_its_servers_while_they_register_again() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (0..4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    for x in &b {
        put_instance(&etcd, "webapp", &x.id, x.port).await;
    }
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s0", "s1", "s2", "s3"], T).await;
    let load = Load::start(lb.http_port, 6, 4, false);

    // Every lease revoked at once, then the registrars register again 300 ms later.
    etcd.etcdctl(&["del", "--prefix", "/services/webapp/"]);
    let gone = std::time::Instant::now();
    let mut least = usize::MAX;
    while gone.elapsed() < Duration::from_millis(300) {
        least = least.min(lb.running_servers().await.len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for x in &b {
        put_instance(&etcd, "webapp", &x.id, x.port).await;
    }
    stays(Duration::from_secs(2), "all four servers stay", || async {
        lb.running_servers().await.len() == 4
    })
    .await;
    assert_eq!(
        least, 4,
        "the backend kept its servers while they were gone"
    );
    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);
    assert!(lb
        .proc
        .log()
        .contains("every instance of the service left at once"));

    // The same revocation seen as separate events, each applied before the next (found by
    // a 30-minute chaos run): the last server stays all the same.
    let load = Load::start(lb.http_port, 4, 4, false);
    for (n, x) in b.iter().enumerate() {
        etcd.delete(&format!("/services/webapp/{}", x.id)).await;
        if n < 3 {
            eventually(T, "the removal applied", || async {
                (lb.running_servers().await.len() == 3 - n).then_some(())
            })
            .await;
        }
    }
    stays(
        Duration::from_millis(500),
        "the last server stays",
        || async { lb.running_servers().await.len() == 1 },
    )
    .await;
    for x in &b {
        put_instance(&etcd, "webapp", &x.id, x.port).await;
    }
    wait_routed(lb.http_port, &["s0", "s1", "s2", "s3"], T).await;
    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);

    // Gone for good: emptied after the hold (3 s), not before.
    etcd.etcdctl(&["del", "--prefix", "/services/webapp/"]);
    let gone = std::time::Instant::now();
    stays(
        Duration::from_millis(2500),
        "servers kept during the hold",
        || async { lb.running_servers().await.len() == 4 },
    )
    .await;
    eventually(T, "emptied after the hold", || async {
        lb.running_servers().await.is_empty().then_some(())
    })
    .await;
    let took = gone.elapsed();
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert!(lb
        .proc
        .log()
        .contains("did not get its instances back within --empty-hold"));
    wait_config(&lb, &[]).await;

    // One server replaced by another in one change (a one-instance service redeployed):
    // the new one is added before the old one leaves, so the backend is never empty.
    put_instance(&etcd, "webapp", "s0", b[0].port).await;
    wait_routed(lb.http_port, &["s0"], T).await;
    let load = Load::start(lb.http_port, 3, 4, false);
    let v = registry::Instance::new("webapp", "s1", "127.0.0.1", b[1].port).encode();
    let mut c = etcd.client().await;
    c.txn(etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::delete("/services/webapp/s0", None),
        etcd_client::TxnOp::put("/services/webapp/s1", v, None),
    ]))
    .await
    .unwrap();
    wait_routed(lb.http_port, &["s1"], T).await;
    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_skipped_and_never_reach_haproxy() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let s1 = Backend::start(dir.path(), "s1");
    put_instance(&etcd, "webapp", "s1", s1.port).await;
    let lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    let huge = "a".repeat(100_000);
    let hostile: Vec<(&str, String)> = vec![
        ("evil1", r#"{"id":"evil1","service":"webapp","address":"127.0.0.1\n    server evil 6.6.6.6:80","port":80}"#.into()),
        ("evil2", r#"{"id":"evil2","service":"webapp","address":"127.0.0.1 backup","port":80}"#.into()),
        ("evil3", r##"{"id":"evil3","service":"webapp","address":"127.0.0.1","port":80,"tags":["x\"y"],"meta":{"k":"# comment"}}"##.into()),
        ("evil4", format!(r#"{{"id":"evil4","service":"webapp","address":"{huge}","port":80}}"#)),
        ("evil5", "{not json".into()),
        ("evil6", r#"{"id":"evil6","service":"webapp","address":"127.0.0.1","port":0}"#.into()),
        ("evil7", r#"{"id":"evil7","service":"webapp","address":"127.0.0.1","port":70000}"#.into()),
        ("evil8", r#"{"id":"other","service":"webapp","address":"127.0.0.1","port":80}"#.into()),
        ("evil 9", r#"{"id":"evil 9","service":"webapp","address":"127.0.0.1","port":80}"#.into()),
    ];
    for (id, v) in &hostile {
        etcd.put(&format!("/services/webapp/{id}"), v).await;
    }
    let s2 = Backend::start(dir.path(), "s2");
    put_instance(&etcd, "webapp", "s2", s2.port).await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    let cfg = lb.config();
    assert!(
        !cfg.contains("evil"),
        "no hostile value in the config:\n{cfg}"
    );
    assert!(!cfg.contains("6.6.6.6"));
    wait_config(&lb, &["s1", "s2"]).await;
    let log = lb.proc.log();
    for (id, _) in &hostile {
        assert!(
            log.contains(&format!("/services/webapp/{id}")),
            "skip of {id} logged"
        );
    }
    assert!(
        lb.proc
            .log()
            .matches("skipping invalid registry record")
            .count()
            >= hostile.len()
    );
    let out = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(&lb.cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "rendered config is valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_outage_compaction_and_replacement_are_survived() {
    let dir = temp_dir();
    let mut etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    put_instance(&etcd, "webapp", "s1", b[0].port).await;
    let mut lb = Lb::start(dir.path(), &etcd, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    // Restart: catch up with a change made after it.
    etcd.restart().await;
    put_instance(&etcd, "webapp", "s2", b[1].port).await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;

    // Outage: HAProxy keeps serving the last config (not an empty one) while etcd is down.
    etcd.stop().await;
    stays(
        Duration::from_secs(3),
        "still serving s1 and s2 during the outage",
        || async { served_ids(lb.http_port, 4).await.len() == 2 },
    )
    .await;
    assert_eq!(lb.config_servers(), vec!["s1", "s2"]);
    etcd.start_again().await;
    put_instance(&etcd, "webapp", "s3", b[2].port).await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;

    // Compaction while the renderer is disconnected: freeze it, restart etcd (its stream
    // is now dead, with nothing new buffered), change and compact; on resume its next
    // revision is gone → full resync.
    lb.proc.signal(Signal::SIGSTOP);
    etcd.restart().await;
    etcd.delete("/services/webapp/s1").await;
    put_instance(&etcd, "webapp", "s4", b[3].port).await;
    let rev = {
        let mut c = etcd.client().await;
        let r = c.get("/services/webapp/s4", None).await.unwrap();
        r.header().unwrap().revision()
    };
    etcd.client().await.compact(rev, None).await.unwrap();
    lb.proc.signal(Signal::SIGCONT);
    wait_routed(lb.http_port, &["s2", "s3", "s4"], T).await;
    assert!(
        lb.proc.log().contains("compacted; full resync"),
        "{}",
        lb.proc.log()
    );

    // Store replaced by an empty etcd: full resync; the new registrations win.
    etcd.replace_with_empty().await;
    put_instance(&etcd, "webapp", "s1", b[0].port).await;
    wait_routed(lb.http_port, &["s1"], Duration::from_secs(30)).await;
    wait_config(&lb, &["s1"]).await;
    lb.proc.kill();
}

async fn churn_under_load(close: bool) {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=4)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    for x in &b {
        x.wait_up().await;
    }
    put_instance(&etcd, "webapp", "s1", b[0].port).await;
    put_instance(&etcd, "webapp", "s2", b[1].port).await;
    let lb = Lb::start(dir.path(), &etcd, &["--no-runtime-api"]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    let (reloads_before, _, _) = lb.proc_state().await;

    let load = Load::start(lb.http_port, 6, 8, close);
    // Join and leave every 200 ms for ~5 s while the load runs (s1 always stays).
    for round in 0..25usize {
        let x = &b[1 + round % 3];
        if round % 2 == 0 {
            put_instance(&etcd, "webapp", &x.id, x.port).await;
        } else {
            etcd.delete(&format!("/services/webapp/{}", x.id)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // pacing of the injected churn
    }
    let result = load.finish();
    let (reloads_after, failed_reloads, _) = lb.proc_state().await;
    eprintln!(
        "close={close}: {} requests, {} failed, {} reloads\n{}",
        result.requests,
        result.failed(),
        reloads_after - reloads_before,
        result.raw
    );
    assert!(result.requests > 100, "load ran: {}", result.raw);
    assert_eq!(
        result.failed(),
        0,
        "failed requests under churn: {}",
        result.raw
    );
    // The reload path (runtime_api.rs covers the live path): every change is a graceful
    // master-worker reload, and none of them drops a request.
    assert!(reloads_after > reloads_before, "churn caused reloads");
    assert_eq!(failed_reloads, 0);
    // The running set equals the file after the churn.
    let mut running = lb.running_servers().await;
    running.sort();
    assert_eq!(running, lb.config_servers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failed_requests_under_churn_keep_alive() {
    churn_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failed_requests_under_churn_connection_close() {
    churn_under_load(true).await;
}

/// SIGHUP (what `systemctl reload` sends) under load: the edited template is served after
/// one confirmed reload, HAProxy's master and the renderer keep running with the same
/// PIDs, no request fails; a template that no longer compiles keeps what runs (ERROR
/// naming the file) and the renderer goes on applying registry changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_templates_under_load_without_restarting_haproxy() {
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path()).await;
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(dir.path(), &format!("s{i}")))
        .collect();
    for x in &b[..2] {
        put_instance(&etcd, "webapp", &x.id, x.port).await;
    }
    let tpl = dir.path().join("haproxy.cfg.hbs");
    std::fs::copy(e2e::lb::template(), &tpl).unwrap();
    let lb = Lb::start_with_template(dir.path(), &etcd, &tpl, &[]);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1", "s2"], T).await;
    let table = || async {
        eventually(T, "the master answers show proc", || async {
            renderer::haproxy::ProcTable::parse(&lb.master_cli("show proc").await)
        })
        .await
    };
    let before = table().await;
    let load = Load::start(lb.http_port, 6, 4, false);

    let text = std::fs::read_to_string(&tpl).unwrap();
    let edited = text.replacen(
        "    default_backend nodes\n",
        "    http-response set-header X-LB-Template v2\n    default_backend nodes\n",
        1,
    );
    assert_ne!(
        edited, text,
        "the template has the line the edit goes after"
    );
    std::fs::write(&tpl, &edited).unwrap();
    lb.proc.signal(Signal::SIGHUP);
    let port = lb.http_port;
    eventually(T, "the edited template is served", || async move {
        let r = http::get(port, "/", None).await.ok()?;
        (r.header("x-lb-template") == Some("v2")).then_some(())
    })
    .await;
    let after = table().await;
    assert_eq!(
        after.master_pid, before.master_pid,
        "HAProxy's master restarted"
    );
    assert_eq!(after.reloads, before.reloads + 1, "one reload for the edit");
    assert!(lb.config().contains("X-LB-Template v2"));

    // Broken: kept, named, and the renderer goes on with the templates it has.
    std::fs::write(&tpl, format!("{edited}{{{{#each services}}\n")).unwrap();
    lb.proc.signal(Signal::SIGHUP);
    let log = || lb.proc.log();
    eventually(T, "the failed reload is logged", || async {
        log()
            .lines()
            .any(|l| {
                l.contains("ERROR")
                    && l.contains("templates were not reloaded")
                    && l.contains(&tpl.display().to_string())
            })
            .then_some(())
    })
    .await;
    put_instance(&etcd, "webapp", &b[2].id, b[2].port).await;
    wait_routed(lb.http_port, &["s1", "s2", "s3"], T).await;
    let r = http::get(lb.http_port, "/", None).await.unwrap();
    assert_eq!(
        r.header("x-lb-template"),
        Some("v2"),
        "the last good template runs"
    );
    let result = load.finish();
    assert_eq!(result.failed(), 0, "{}", result.raw);
    assert!(result.requests > 0, "{}", result.raw);
    assert_eq!(table().await.master_pid, before.master_pid);
    let mut lb = lb;
    assert!(lb.proc.is_running(), "the renderer survived both SIGHUPs");
}
