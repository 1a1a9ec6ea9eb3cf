//! The registrar's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// One health check's probes by result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    /// The check as `http URL`, `tcp HOST:PORT` or `cmd COMMAND`.
    pub check: String,
    pub result: String,
}

/// One health check.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

/// Every metric the registrar exports. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub registered: Gauge,
    pub lease_grants: Counter,
    pub keepalive_failures: Counter,
    pub health_checks: Family<CheckLabel, Counter>,
    pub health_check_up: Family<NameLabel, Gauge>,
    pub etcd_seconds: Histogram,
    pub keepalive_seconds: Histogram,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            registered: Gauge::default(),
            lease_grants: Counter::default(),
            keepalive_failures: Counter::default(),
            health_checks: Family::default(),
            health_check_up: Family::default(),
            etcd_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            keepalive_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        };
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("registrar_build_info", "Build information", build);
        registry.register(
            "registrar_registered",
            "1 while the instance's key is in etcd",
            m.registered.clone(),
        );
        registry.register(
            "registrar_lease_grants",
            "Leases granted (the first, and every re-grant after a loss)",
            m.lease_grants.clone(),
        );
        registry.register(
            "registrar_keepalive_failures",
            "Keep-alive round trips that failed",
            m.keepalive_failures.clone(),
        );
        registry.register(
            "registrar_health_checks",
            "Health check probes by check and result (pass, fail)",
            m.health_checks.clone(),
        );
        registry.register(
            "registrar_health_check_up",
            "1 when the check's last probe passed, 0 when it failed",
            m.health_check_up.clone(),
        );
        registry.register_with_unit(
            "registrar_etcd_request_duration",
            "etcd round trips",
            Unit::Seconds,
            m.etcd_seconds.clone(),
        );
        registry.register_with_unit(
            "registrar_keepalive_duration",
            "Lease keep-alive round trips that etcd answered",
            Unit::Seconds,
            m.keepalive_seconds.clone(),
        );
        m
    }

    /// Metrics registered nowhere (when no endpoint is configured they are simply not read).
    pub fn unregistered() -> Metrics {
        Metrics::new(&mut Registry::default())
    }
}
