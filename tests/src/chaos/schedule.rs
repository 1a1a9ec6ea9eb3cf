//! The fault schedule: a pure function of the seed and the options, so a run can be
//! repeated exactly and every kind is tried.

use std::time::Duration;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub duration: Duration,
    /// Freeze load balancer 1's renderer after the first fault, for good: the checker must
    /// report it.
    pub sabotage: bool,
    /// Never kill, freeze or restart load balancer 2's renderer or app 1's registrar, so
    /// one of each lives the whole run (its memory and open files start → end are then a
    /// true long-run figure).
    pub spare: bool,
    pub apps: usize,
    /// Registrar lease TTL, seconds.
    pub ttl: u64,
}

impl Options {
    pub fn new(seed: u64, duration: Duration) -> Options {
        Options {
            seed,
            duration,
            sabotage: false,
            spare: false,
            apps: 8,
            ttl: 3,
        }
    }
}

/// The kinds of fault, each injected at least once per run of 90 s or more.
pub const KINDS: [&str; 13] = [
    "etcd_kill",
    "etcd_freeze",
    "etcd_partition",
    "etcd_slow_net",
    "compact_defrag",
    "registrar_kill",
    "registrar_freeze",
    "app_restart",
    "renderer_kill",
    "haproxy_restart",
    "disk_full",
    "burst",
    "poison",
];

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub kind: &'static str,
    /// Since the start of the fault phase.
    pub at: Duration,
    /// How long it lasts before it is healed (0: instantaneous).
    pub length: Duration,
    /// Member, app or load balancer index (by kind).
    pub target: usize,
}

/// SplitMix64: a small deterministic generator (the schedule must not change with a
/// dependency's version).
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (milliseconds).
    pub(super) fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The fault schedule for `o`: a fault every ~6 s on average, every kind at least once,
/// some overlapping; at most one etcd member disturbed at a time (quorum stays), and a
/// target (app, load balancer) never has two faults at once.
pub fn schedule(o: &Options) -> Vec<Planned> {
    let mut rng = Rng(o.seed);
    // The last 12 s have no new fault: everything heals and the checker sees quiet.
    let span = o.duration.saturating_sub(Duration::from_secs(12));
    let n = (span.as_secs() / 6).max(KINDS.len() as u64) as usize;
    let mut kinds: Vec<&'static str> = KINDS.to_vec();
    while kinds.len() < n {
        kinds.push(KINDS[rng.below(KINDS.len())]);
    }
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    let slot = span / n as u32;
    let ttl = o.ttl * 1000;
    let mut etcd_free = Duration::ZERO;
    let mut app_free = vec![Duration::ZERO; o.apps];
    let mut lb_free = [Duration::ZERO; 2];
    let mut out = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let mut at = slot * i as u32 + rng.ms(0, slot.as_millis() as u64);
        let length = match kind {
            "etcd_kill" | "etcd_freeze" => rng.ms(2000, 5000),
            "etcd_partition" => rng.ms(3000, 6000),
            "etcd_slow_net" => rng.ms(4000, 8000),
            // The supervisor's restart delay (systemd's RestartSec is 100 ms by default).
            "haproxy_restart" => rng.ms(100, 1500),
            "disk_full" => rng.ms(2000, 5000),
            "compact_defrag" => Duration::ZERO,
            "registrar_kill" | "app_restart" | "renderer_kill" => rng.ms(1000, 3000),
            "registrar_freeze" => rng.ms(ttl + 1000, ttl + 3000),
            _ => rng.ms(2000, 4000), // burst, poison: undone after this long
        };
        let target = match kind {
            "etcd_kill" | "etcd_freeze" => {
                at = at.max(etcd_free);
                etcd_free = at + length + Duration::from_secs(2);
                rng.below(3)
            }
            "etcd_partition" | "etcd_slow_net" => {
                // Member 0: the one in a network namespace.
                at = at.max(etcd_free);
                etcd_free = at + length + Duration::from_secs(2);
                0
            }
            "registrar_kill" | "registrar_freeze" | "app_restart" => {
                let t = if o.spare {
                    1 + rng.below(o.apps - 1)
                } else {
                    rng.below(o.apps)
                };
                at = at.max(app_free[t]);
                app_free[t] = at + length + Duration::from_secs(ttl / 1000 + 2);
                t
            }
            "renderer_kill" | "haproxy_restart" | "disk_full" => {
                // Under --sabotage, load balancer 1's renderer stays frozen: not restarted.
                let t = if o.sabotage || (o.spare && kind == "renderer_kill") {
                    0
                } else {
                    rng.below(2)
                };
                at = at.max(lb_free[t]);
                lb_free[t] = at + length + Duration::from_secs(2);
                t
            }
            _ => 0,
        };
        if at < span {
            out.push(Planned {
                kind,
                at,
                length,
                target,
            });
        }
    }
    out.sort_by_key(|p| p.at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_every_kind_and_quorum_kept() {
        let o = Options::new(7, Duration::from_secs(90));
        let a = schedule(&o);
        assert_eq!(a, schedule(&o));
        assert_ne!(a, schedule(&Options::new(8, Duration::from_secs(90))));
        for kind in KINDS {
            assert!(a.iter().any(|p| p.kind == kind), "{kind} missing: {a:?}");
        }
        let etcd: Vec<&Planned> = a.iter().filter(|p| p.kind.starts_with("etcd")).collect();
        for w in etcd.windows(2) {
            assert!(
                w[0].at + w[0].length <= w[1].at,
                "two members disturbed at once: {w:?}"
            );
        }
        let sabotage = Options {
            sabotage: true,
            ..o.clone()
        };
        assert!(schedule(&sabotage)
            .iter()
            .all(|p| p.kind != "renderer_kill" || p.target == 0));
        let spare = Options {
            spare: true,
            ..o.clone()
        };
        let spared = schedule(&spare);
        for kind in KINDS {
            assert!(spared.iter().any(|p| p.kind == kind), "{kind} missing");
        }
        assert!(spared.iter().all(|p| match p.kind {
            "renderer_kill" => p.target == 0,
            "registrar_kill" | "registrar_freeze" | "app_restart" => p.target != 0,
            _ => true,
        }));
    }
}
