//! The renderer's Prometheus metrics and the state behind `/readyz` and `/status`.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    pub change: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

fn seconds() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the renderer exports. Cheap to clone (shared atomics).
#[derive(Clone)]
pub struct Metrics {
    pub revision: Gauge,
    pub instances: Family<ServiceLabel, Gauge>,
    pub watch_live: Gauge,
    pub watch_reconnects: Counter,
    pub resyncs: Family<ReasonLabel, Counter>,
    pub drift: Family<ChangeLabel, Counter>,
    pub haproxy_drift: Counter,
    pub records_skipped: Family<ReasonLabel, Counter>,
    pub renders: Family<ResultLabel, Counter>,
    pub applies: Family<ResultLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub runtime_applies: Family<ResultLabel, Counter>,
    pub render_seconds: Histogram,
    pub check_seconds: Histogram,
    pub write_seconds: Histogram,
    pub reload_seconds: Histogram,
    pub runtime_seconds: Histogram,
    pub last_apply: Gauge<f64, AtomicU64>,
    pub config_hash: Gauge,
    pub template_reloads: Family<ResultLabel, Counter>,
    pub quarantined: Gauge,
    pub last_change: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            revision: Gauge::default(),
            instances: Family::default(),
            watch_live: Gauge::default(),
            watch_reconnects: Counter::default(),
            resyncs: Family::default(),
            drift: Family::default(),
            haproxy_drift: Counter::default(),
            records_skipped: Family::default(),
            renders: Family::default(),
            applies: Family::default(),
            reloads: Family::default(),
            runtime_applies: Family::default(),
            render_seconds: seconds(),
            check_seconds: seconds(),
            write_seconds: seconds(),
            reload_seconds: seconds(),
            runtime_seconds: seconds(),
            last_apply: Gauge::default(),
            config_hash: Gauge::default(),
            template_reloads: Family::default(),
            quarantined: Gauge::default(),
            last_change: Gauge::default(),
        };
        // Every result a counter can have exists from the start at 0: the first error is
        // then an increase Prometheus can see (a series born at 1 shows none).
        for (family, results) in [
            (&m.applies, &["ok", "error"][..]),
            (&m.reloads, &["ok", "error"][..]),
            (&m.renders, &["ok", "error"][..]),
            (&m.template_reloads, &["ok", "failed"][..]),
        ] {
            for r in results {
                let _ = family.get_or_create(&ResultLabel {
                    result: (*r).into(),
                });
            }
        }
        for change in ["put", "delete"] {
            let _ = m.drift.get_or_create(&ChangeLabel {
                change: change.into(),
            });
        }
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        let r = registry;
        r.register("renderer_build_info", "Build information", build);
        r.register(
            "renderer_registry_revision",
            "etcd revision the model reflects",
            m.revision.clone(),
        );
        r.register(
            "renderer_instances",
            "Admitted instances per service",
            m.instances.clone(),
        );
        r.register(
            "renderer_watch_live",
            "1 while the etcd watch is established",
            m.watch_live.clone(),
        );
        r.register(
            "renderer_watch_reconnects",
            "Watch streams re-established after a failure",
            m.watch_reconnects.clone(),
        );
        r.register("renderer_resyncs", "Listings of the registry by reason: initial, compaction and store_replaced replace the model; reconnect and periodic verify the watch against it", m.resyncs.clone());
        r.register("renderer_resync_drift", "Keys a verifying listing found the watch had not delivered (change: put or delete), repaired from the listing: etcd lost an event", m.drift.clone());
        r.register(
            "renderer_haproxy_drift",
            "Comparisons that found HAProxy running other servers than the config it was given (a renderer stopped between a live change and its file, a change by hand through the runtime API); each repaired by a reload",
            m.haproxy_drift.clone(),
        );
        r.register(
            "renderer_records_skipped",
            "Registry records skipped as invalid, by reason",
            m.records_skipped.clone(),
        );
        r.register(
            "renderer_renders",
            "Template renders by result",
            m.renders.clone(),
        );
        r.register(
            "renderer_applies",
            "Applies by result (ok, error)",
            m.applies.clone(),
        );
        r.register(
            "renderer_quarantined",
            "Records left out because HAProxy rejected the config they produced",
            m.quarantined.clone(),
        );
        r.register(
            "renderer_last_change_timestamp_seconds",
            "When the registry last changed what the templates see (Unix time); later than the last apply for long = stuck",
            m.last_change.clone(),
        );
        r.register(
            "renderer_template_reloads",
            "Templates read again on SIGHUP, by result (ok, failed: the running config was kept)",
            m.template_reloads.clone(),
        );
        r.register(
            "renderer_reloads",
            "HAProxy reloads by result",
            m.reloads.clone(),
        );
        r.register(
            "renderer_runtime_applies",
            "Membership changes applied through the runtime API, by result (ok, fallback)",
            m.runtime_applies.clone(),
        );
        r.register_with_unit(
            "renderer_render_duration",
            "Time to render all templates",
            Unit::Seconds,
            m.render_seconds.clone(),
        );
        r.register_with_unit(
            "renderer_check_duration",
            "Time to run the check command",
            Unit::Seconds,
            m.check_seconds.clone(),
        );
        r.register_with_unit(
            "renderer_write_duration",
            "Time to write a checked file into place",
            Unit::Seconds,
            m.write_seconds.clone(),
        );
        r.register_with_unit(
            "renderer_reload_duration",
            "Time for a confirmed reload",
            Unit::Seconds,
            m.reload_seconds.clone(),
        );
        r.register_with_unit(
            "renderer_runtime_duration",
            "Time to apply and verify runtime API changes",
            Unit::Seconds,
            m.runtime_seconds.clone(),
        );
        r.register(
            "renderer_last_apply_timestamp_seconds",
            "Unix time of the last successful apply",
            m.last_apply.clone(),
        );
        r.register(
            "renderer_config_hash",
            "Hash of the config last applied (53 bits)",
            m.config_hash.clone(),
        );
        m
    }
}

/// What `/readyz` and `/status` read.
pub struct State {
    /// A config was applied without error at least once.
    pub applied: AtomicBool,
    /// When the watch went down (None while live).
    pub down_since: Mutex<Option<Instant>>,
    /// How long the watch may be down before the renderer reports not ready.
    pub grace: Duration,
    /// The `/status` document ([`crate::status::StatusDoc`]), written as JSON when asked
    /// for: an apply hands over a snapshot, and serialising 100 000 instances after every
    /// apply cost more than the apply.
    pub status: Mutex<observe::StatusFn>,
}

impl State {
    pub fn new(grace: Duration) -> Arc<State> {
        Arc::new(State {
            applied: AtomicBool::new(false),
            down_since: Mutex::new(Some(Instant::now())),
            grace,
            status: Mutex::new(Arc::new(|| "{}".into())),
        })
    }

    /// Readiness: a valid config applied, and the watch live (or down less than `grace`).
    pub fn ready(&self) -> Result<(), String> {
        if !self.applied.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("no config applied yet".into());
        }
        let down = self.down_since.lock().map(|d| *d).unwrap_or(None);
        match down {
            Some(since) if since.elapsed() > self.grace => Err(format!(
                "etcd watch down for {:.1}s (grace {:?})",
                since.elapsed().as_secs_f64(),
                self.grace
            )),
            _ => Ok(()),
        }
    }

    /// After an apply: ready from the first good one on; `/status` serves what `doc` writes.
    pub fn set_applied(&self, ok: bool, doc: observe::StatusFn) {
        if ok {
            self.applied
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Ok(mut s) = self.status.lock() {
            *s = doc;
        }
    }

    pub fn set_live(&self, live: bool) {
        if let Ok(mut d) = self.down_since.lock() {
            match (live, d.is_some()) {
                (true, _) => *d = None,
                (false, false) => *d = Some(Instant::now()),
                (false, true) => {}
            }
        }
    }
}

impl State {
    /// What `--metrics-addr` serves: `registry`, readiness and `/status` from this state.
    pub fn endpoint(self: &Arc<Self>, registry: Registry) -> observe::Endpoint {
        let (ready, status) = (self.clone(), self.clone());
        observe::Endpoint {
            registry: Arc::new(registry),
            ready: Arc::new(move || ready.ready()),
            status: Some(Arc::new(move || {
                let doc = status.status.lock().map(|s| s.clone());
                doc.map(|write| write()).unwrap_or_default()
            })),
        }
    }
}

/// Mirrors the watch's liveness into readiness and the `watch_live` gauge until `stop`.
pub async fn mirror_live(
    mut live: tokio::sync::watch::Receiver<bool>,
    state: Arc<State>,
    metrics: Metrics,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let now = *live.borrow_and_update();
        state.set_live(now);
        metrics.watch_live.set(i64::from(now));
        tokio::select! {
            _ = stop.cancelled() => return,
            r = live.changed() => if r.is_err() { return },
        }
    }
}

impl Metrics {
    /// Counts an apply (`ok`: without error) and sets the gauges that describe its result:
    /// the registry revision, instances per service, quarantined records and, after a good
    /// apply, its time and the hash of the first config.
    pub fn record_apply<'a>(
        &self,
        ok: bool,
        revision: i64,
        services: impl Iterator<Item = (&'a String, usize)>,
        quarantined: usize,
        config: Option<&[u8]>,
    ) {
        self.applies
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
        self.revision.set(revision);
        self.quarantined.set(quarantined as i64);
        self.instances.clear();
        for (service, n) in services {
            self.instances
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .set(n as i64);
        }
        if ok {
            self.last_apply.set(unix_now());
            if let Some(bytes) = config {
                self.config_hash.set(hash53(bytes));
            }
        }
    }
}

/// xxHash64, truncated to 53 bits so it survives a float gauge. (FNV-1a, a byte at a
/// time, took ~6 ms of every apply of a 6 MB config; xxh64 reads it in well under one.)
pub fn hash53(bytes: &[u8]) -> i64 {
    (xxhash_rust::xxh64::xxh64(bytes, 0) & ((1 << 53) - 1)) as i64
}

/// Now as Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
