//! `registrar docker`'s metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The daemon's metrics.
#[derive(Clone, Default)]
pub(super) struct Metrics {
    pub(super) registered: Gauge,
    pub(super) events: Counter,
    pub(super) syncs: Counter,
    pub(super) docker_connected: Gauge,
    pub(super) lease_grants: Counter,
    pub(super) keepalive_failures: Counter,
    pub(super) skipped: Counter,
}

impl Metrics {
    pub(super) fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "registrar_docker_registered",
            "Records registered now (a container may register several services)",
            self.registered.clone(),
        );
        r.register(
            "registrar_docker_events",
            "Container events received",
            self.events.clone(),
        );
        r.register(
            "registrar_docker_syncs",
            "Full syncs against the engine and etcd",
            self.syncs.clone(),
        );
        r.register(
            "registrar_docker_connected",
            "1 while the engine's event stream is up",
            self.docker_connected.clone(),
        );
        r.register(
            "registrar_lease_grants",
            "Leases granted",
            self.lease_grants.clone(),
        );
        r.register(
            "registrar_keepalive_failures",
            "Keep-alive round trips that failed (timeout, member down)",
            self.keepalive_failures.clone(),
        );
        r.register(
            "registrar_docker_skipped",
            "Labelled containers not registered because of a bad label",
            self.skipped.clone(),
        );
    }
}
