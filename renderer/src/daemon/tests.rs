//! The loop driven in-process, in paused time: a file target without a check, no HAProxy.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::watch::Change;
use clap::Parser;

struct Harness {
    tx: mpsc::Sender<Update>,
    dest: std::path::PathBuf,
    metrics: metrics::Metrics,
    shutdown: CancellationToken,
    task: JoinHandle<Result<i32, Error>>,
    hup: mpsc::Sender<()>,
    tpl: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn value(service: &str, id: &str) -> Vec<u8> {
    registry::Instance::new(service, id, "10.0.0.1", 80)
        .encode()
        .into_bytes()
}

fn put(id: &str) -> Change {
    Change::Put {
        key: registry::instance_key("/services", "web", id),
        value: value("web", id),
    }
}

/// `id`'s record marked `leaving` (what a registrar writes before it revokes).
fn leaving(id: &str) -> Change {
    let mut inst = registry::Instance::new("web", id, "10.0.0.1", 8080);
    inst.state = Some(registry::RecordState::Leaving);
    Change::Put {
        key: registry::instance_key("/services", "web", id),
        value: inst.encode().into_bytes(),
    }
}

fn delete(id: &str) -> Change {
    Change::Delete {
        key: registry::instance_key("/services", "web", id),
    }
}

async fn start(extra: &[&str]) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    std::fs::write(
        &tpl,
        "{{#each services}}{{@key}}:{{#each this}} {{id}}{{/each}}\n{{/each}}",
    )
    .unwrap();
    let dest = dir.path().join("out.cfg");
    let spec = format!("{}:{}", tpl.display(), dest.display());
    let mut args = vec![
        "renderer",
        "--template",
        &spec,
        "--check-cmd",
        "",
        "--haproxy-version",
        "2.6",
    ];
    args.extend_from_slice(extra);
    let config = Config::from_args(crate::Args::try_parse_from(args).unwrap()).unwrap();
    let (renderer, targets) = crate::start::load_templates(&config).await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let state = metrics::State::new(config.ready_grace);
    let applier = crate::start::applier(&config, targets, metrics.clone(), false);
    let (hup, hup_rx) = mpsc::channel(1);
    let mut daemon = Daemon::new(config, renderer, applier, metrics.clone(), state)
        .with_service_manager(observe::notify::Notifier::disabled(), hup_rx);
    let (tx, rx) = mpsc::channel(16);
    let source = tokio::spawn(std::future::pending::<Result<(), Error>>());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { daemon.run(rx, source, stop).await });
    Harness {
        tx,
        dest,
        metrics,
        shutdown,
        task,
        hup,
        tpl,
        _dir: dir,
    }
}

impl Harness {
    fn file(&self) -> String {
        std::fs::read_to_string(&self.dest).unwrap_or_default()
    }

    fn applies(&self) -> u64 {
        self.metrics
            .applies
            .get_or_create(&metrics::ResultLabel {
                result: "ok".into(),
            })
            .get()
    }

    async fn snapshot(&self, ids: &[&str]) {
        let kvs = ids
            .iter()
            .map(|id| {
                (
                    registry::instance_key("/services", "web", id),
                    value("web", id),
                )
            })
            .collect();
        self.tx
            .send(Update::Snapshot { revision: 1, kvs })
            .await
            .unwrap();
    }

    async fn changes(&self, revision: i64, changes: Vec<Change>) {
        self.tx
            .send(Update::Changes { revision, changes })
            .await
            .unwrap();
    }

    /// Advances paused time in 5 ms steps until the file reads `want`; returns how long
    /// that took. Panics after `limit`.
    async fn until_file(&self, want: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.file() != want {
            assert!(
                started.elapsed() <= limit,
                "file is {:?}, not {want:?}, after {limit:?}",
                self.file()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    }

    /// Advances paused time by `period`, asserting the file stays `want` throughout.
    async fn file_stays(&self, want: &str, period: Duration) {
        let end = Instant::now() + period;
        while Instant::now() < end {
            assert_eq!(self.file(), want);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        assert_eq!(self.task.await.unwrap().unwrap(), 0);
    }
}

/// The first change after a quiet period is applied at once; a storm of changes (one
/// every 50 ms for 2 s) is merged into applies at least --wait-min apart and never
/// more than --wait-max after the first change they hold, and nothing is lost. (Without HAProxy every apply counts as a
/// reload: writing files is all there is.)
#[tokio::test(start_paused = true)]
async fn changes_are_applied_at_once_and_storms_coalesced() {
    let h = start(&["--wait-min", "100ms", "--wait-max", "400ms"]).await;
    h.snapshot(&["a", "b"]).await;
    let took = h.until_file("web: a b\n", Duration::from_secs(1)).await;
    assert!(took < Duration::from_millis(20), "applied after {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.applies(), 1);
    // Quiet for a second: the next change goes at once.
    h.changes(2, vec![put("c")]).await;
    let took = h.until_file("web: a b c\n", Duration::from_secs(1)).await;
    assert!(took < Duration::from_millis(20), "applied after {took:?}");
    let mut times = vec![Instant::now()];
    let mut seen = h.applies();
    let mut want = "web: a b c".to_string();
    for i in 0..40 {
        let id = format!("x{i:02}");
        want.push_str(&format!(" {id}"));
        h.changes(10 + i, vec![put(&id)]).await;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if h.applies() > seen {
                seen = h.applies();
                times.push(Instant::now());
            }
        }
    }
    want.push('\n');
    h.until_file(&want, Duration::from_millis(500)).await;
    let storm = seen - 2;
    assert!(
        (4..=20).contains(&storm),
        "{storm} applies for 40 changes in 2 s"
    );
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(95),
            "applies {gap:?} apart in a storm"
        );
        // --wait-max counts from the first change not yet applied, which arrives up to
        // one interval (50 ms) after the previous apply.
        assert!(
            gap <= Duration::from_millis(460),
            "{gap:?} without an apply in a storm"
        );
    }
    h.stop().await;
}

/// Every instance of a service leaving at once keeps its servers for --empty-hold while
/// they may come back; all back → nothing changes; gone for good → applied after it.
#[tokio::test(start_paused = true)]
async fn a_service_emptied_at_once_is_held() {
    let h = start(&["--wait-min", "10ms", "--empty-hold", "3s"]).await;
    h.snapshot(&["a", "b", "c"]).await;
    h.until_file("web: a b c\n", Duration::from_secs(1)).await;
    // All three revoked (a leader resuming revokes every lease): held.
    h.changes(2, vec![delete("a"), delete("b"), delete("c")])
        .await;
    h.file_stays("web: a b c\n", Duration::from_secs(2)).await;
    // They register again within the hold: released, the file never changed.
    h.changes(3, vec![put("a"), put("b")]).await;
    h.file_stays("web: a b c\n", Duration::from_millis(200))
        .await;
    h.changes(4, vec![put("c")]).await;
    h.file_stays("web: a b c\n", Duration::from_secs(4)).await;
    // Gone for good (arriving as separate events): applied once the hold ends.
    h.changes(5, vec![delete("a")]).await;
    h.until_file("web: b c\n", Duration::from_secs(1)).await;
    h.changes(6, vec![delete("b")]).await;
    h.changes(7, vec![delete("c")]).await;
    h.file_stays("web: b c\n", Duration::from_millis(2900))
        .await;
    h.until_file("", Duration::from_secs(1)).await;
    h.stop().await;
}

/// SIGHUP reads the templates again: an edited one is applied with the registry as it
/// is; one that no longer compiles or renders keeps the running config and counts as a
/// failed reload; fixed, the next SIGHUP applies it.
#[tokio::test(start_paused = true)]
async fn sighup_reloads_templates_and_keeps_the_config_when_one_is_broken() {
    let h = start(&["--wait-min", "10ms"]).await;
    h.snapshot(&["a", "b"]).await;
    h.until_file("web: a b\n", Duration::from_secs(1)).await;
    let reloads = |result: &str| {
        h.metrics
            .template_reloads
            .get_or_create(&metrics::ResultLabel {
                result: result.into(),
            })
            .get()
    };
    std::fs::write(&h.tpl, "{{#each services.web}}{{id}};{{/each}}\n").unwrap();
    h.hup.send(()).await.unwrap();
    h.until_file("a;b;\n", Duration::from_secs(1)).await;
    assert_eq!(reloads("ok"), 1);
    // Does not compile: kept, and changes go on being applied with the old one.
    std::fs::write(&h.tpl, "{{#each services.web}}{{id}};\n").unwrap();
    h.hup.send(()).await.unwrap();
    h.changes(2, vec![put("c")]).await;
    h.until_file("a;b;c;\n", Duration::from_secs(1)).await;
    assert_eq!(reloads("failed"), 1);
    // Compiles but does not render (strict mode: an unknown variable).
    std::fs::write(&h.tpl, "{{nonexistent.field}}\n").unwrap();
    h.hup.send(()).await.unwrap();
    h.file_stays("a;b;c;\n", Duration::from_millis(200)).await;
    assert_eq!(reloads("failed"), 2);
    std::fs::write(&h.tpl, "{{#each services.web}}{{id}}|{{/each}}\n").unwrap();
    h.hup.send(()).await.unwrap();
    h.until_file("a|b|c|\n", Duration::from_secs(1)).await;
    assert_eq!(reloads("ok"), 2);
    h.stop().await;
}

/// Every instance stopped on purpose (each record marked `leaving`, then deleted) is a
/// deliberate act: applied at once, not held. One lost without the mark among them
/// keeps the hold.
#[tokio::test(start_paused = true)]
async fn a_service_stopped_on_purpose_is_emptied_at_once() {
    let h = start(&["--wait-min", "10ms", "--empty-hold", "3s"]).await;
    h.snapshot(&["a", "b", "c"]).await;
    h.until_file("web: a b c\n", Duration::from_secs(1)).await;
    h.changes(2, vec![leaving("a"), leaving("b"), leaving("c")])
        .await;
    h.changes(3, vec![delete("a"), delete("b"), delete("c")])
        .await;
    let took = h.until_file("", Duration::from_secs(1)).await;
    assert!(took < Duration::from_millis(100), "{took:?}");
    // Back, then two leave on purpose and one loses its lease: held.
    h.changes(4, vec![put("a"), put("b"), put("c")]).await;
    h.until_file("web: a b c\n", Duration::from_secs(1)).await;
    h.changes(5, vec![leaving("a"), leaving("b")]).await;
    h.changes(6, vec![delete("a"), delete("b"), delete("c")])
        .await;
    h.file_stays("web: a b c\n", Duration::from_secs(2)).await;
    h.until_file("", Duration::from_secs(2)).await;
    h.stop().await;
}

/// With --empty-hold 0 the same revocation is applied at once.
#[tokio::test(start_paused = true)]
async fn without_a_hold_an_emptied_service_is_applied_at_once() {
    let h = start(&["--wait-min", "10ms", "--empty-hold", "0s"]).await;
    h.snapshot(&["a", "b", "c"]).await;
    h.until_file("web: a b c\n", Duration::from_secs(1)).await;
    h.changes(2, vec![delete("a"), delete("b"), delete("c")])
        .await;
    let took = h.until_file("", Duration::from_secs(1)).await;
    assert!(took < Duration::from_millis(100), "{took:?}");
    h.stop().await;
}
