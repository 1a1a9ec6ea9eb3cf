//! A seeded chaos run (e2e::chaos): random overlapping faults against the whole system for
//! a minute, then the same with a renderer frozen for good, which the checker must report.
//! `bench chaos` runs the long version (docs/chaos.md).

use std::time::Duration;

use e2e::chaos::{self, Options, KINDS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_run_finds_no_violation_and_a_frozen_renderer_is_caught() {
    // Sequential: two runs at once would not fit two cores.
    let report = chaos::run(&Options::new(1, Duration::from_secs(90))).await;
    eprintln!("{}", report.summary());
    for kind in KINDS {
        assert!(
            report.faults.iter().any(|f| f.kind == kind),
            "{kind} was not injected"
        );
    }
    assert!(report.requests.total > 1000, "{:?}", report.requests);
    // Refused only while the run had a load balancer's HAProxy dead (well under 1 % here).
    assert!(
        report.requests.refused_while_down * 100 < report.requests.total,
        "{:?}",
        report.requests
    );
    assert!(report.violations.is_empty(), "{}", report.summary());

    // The checker can fail: load balancer 1's renderer frozen after the first fault.
    let o = Options {
        sabotage: true,
        ..Options::new(2, Duration::from_secs(40))
    };
    let report = chaos::run(&o).await;
    eprintln!("{}", report.summary());
    assert!(
        !report.violations_of(1).is_empty(),
        "a frozen renderer went unnoticed: {}",
        report.summary()
    );
}
