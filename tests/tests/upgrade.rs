//! A rolling etcd upgrade, Debian 12's 3.4.23 → Debian 13's 3.5.16, member by member on the
//! same data directories, under wrk through two load balancers with four registrars
//! (`--ttl 3s`): nothing fails, nothing re-registers (e2e::upgrade; `bench upgrade` runs
//! the longer version).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Duration;

use e2e::upgrade::{etcd_of, run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_etcd_upgrade_from_3_4_to_3_5_loses_no_request_and_no_registration() {
    let from = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .unwrap();
    let from = String::from_utf8_lossy(&from.stdout).into_owned();
    assert!(
        from.contains("etcd Version: 3.4."),
        "this test starts from Debian 12's etcd 3.4 (run it outside with-debian.sh): {from}"
    );
    let report = run(&Options {
        to: etcd_of("trixie"),
        apps: 4,
        settle: Duration::from_secs(4),
    })
    .await;
    let text = serde_json::to_string_pretty(&report).unwrap();
    eprintln!("{text}");
    assert!(
        report["requests"]["total"].as_u64().unwrap() > 1000,
        "{text}"
    );
    assert_eq!(report["requests"]["failed"], 0, "{text}");
    assert_eq!(report["registrations"], 4, "{text}");
    assert_eq!(report["registrations_lost"], 0, "{text}");
    assert_eq!(report["registrars_that_registered_again"], 0, "{text}");
    for v in report["versions_after"].as_array().unwrap() {
        assert!(v.as_str().unwrap().starts_with("3.5."), "{text}");
    }
    assert_eq!(
        report["load_balancers_serving_every_instance_after"], true,
        "{text}"
    );
}
