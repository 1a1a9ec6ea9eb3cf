//! Burst merging without added latency.
//!
//! * The first change after a quiet period is applied at once, and so is every change
//!   after an apply that HAProxy took live (runtime API: cheap, no reload to spare;
//!   changes that arrive during such an apply are taken together by the next one).
//! * A change that arrives while a reloading apply runs, or within `wait_min` of one,
//!   waits until nothing has changed for `wait_min`, so a burst becomes one reload…
//! * …but never longer than `wait_max` after the first unapplied change, so continuous
//!   churn cannot postpone an apply forever.
//!
//! consul-template's `wait` delays every change by at least its minimum; this delays only
//! changes that arrive in a burst. Pure: the caller passes the clock in.

use std::time::Duration;

use tokio::time::Instant;

/// Decides when pending changes should be applied.
#[derive(Debug, Clone)]
pub struct Coalescer {
    wait_min: Duration,
    wait_max: Duration,
    last_apply: Option<Instant>,
    first_pending: Option<Instant>,
    last_change: Option<Instant>,
}

impl Coalescer {
    pub fn new(wait_min: Duration, wait_max: Duration) -> Self {
        Coalescer {
            wait_min,
            wait_max: wait_max.max(wait_min),
            last_apply: None,
            first_pending: None,
            last_change: None,
        }
    }

    /// A change arrived at `now`.
    pub fn changed(&mut self, now: Instant) {
        self.first_pending.get_or_insert(now);
        self.last_change = Some(now);
    }

    /// When the oldest change waiting arrived.
    pub fn first_pending(&self) -> Option<Instant> {
        self.first_pending
    }

    /// True when changes are waiting.
    pub fn pending(&self) -> bool {
        self.first_pending.is_some()
    }

    /// When to apply the pending changes; `None` when nothing is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let first = self.first_pending?;
        let last = self.last_change.unwrap_or(first);
        let in_burst = self
            .last_apply
            .is_some_and(|applied| first < applied + self.wait_min);
        if !in_burst {
            // The first change after a quiet period: now.
            return Some(first);
        }
        let quiet = last + self.wait_min;
        let after_apply = self.last_apply.map_or(quiet, |a| a + self.wait_min);
        Some(quiet.max(after_apply).min(first + self.wait_max))
    }

    /// An apply that reloaded (or failed) finished at `now`; everything seen before it is
    /// applied.
    pub fn applied(&mut self, now: Instant) {
        self.last_apply = Some(now);
        self.first_pending = None;
        self.last_change = None;
    }

    /// An apply that needed no reload (runtime API, or nothing changed) finished:
    /// everything seen before it is applied, and the next change may go at once.
    pub fn applied_live(&mut self) {
        self.first_pending = None;
        self.last_change = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_change_after_quiet_is_immediate() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(50 * MS, 1000 * MS);
        assert_eq!(c.deadline(), None);
        c.changed(t0);
        assert_eq!(c.deadline(), Some(t0));
        c.applied(t0 + 5 * MS);
        // Long after: immediate again.
        c.changed(t0 + 500 * MS);
        assert_eq!(c.deadline(), Some(t0 + 500 * MS));
    }

    #[test]
    fn changes_right_after_an_apply_are_merged() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(50 * MS, 1000 * MS);
        c.changed(t0);
        c.applied(t0 + 40 * MS);
        c.changed(t0 + 41 * MS);
        c.changed(t0 + 45 * MS);
        assert_eq!(
            c.deadline(),
            Some(t0 + 95 * MS),
            "quiet for wait_min after the last change"
        );
    }

    #[test]
    fn changes_after_a_live_apply_go_at_once() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(50 * MS, 1000 * MS);
        c.changed(t0);
        c.applied_live();
        c.changed(t0 + 2 * MS);
        assert_eq!(c.deadline(), Some(t0 + 2 * MS));
        // …but a reload still merges what follows it.
        c.applied(t0 + 40 * MS);
        c.applied_live();
        c.changed(t0 + 41 * MS);
        assert_eq!(c.deadline(), Some(t0 + 91 * MS));
    }

    #[test]
    fn continuous_churn_is_bounded_by_wait_max() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(50 * MS, 1000 * MS);
        c.changed(t0);
        c.applied(t0 + 10 * MS);
        for i in 0..2000u32 {
            c.changed(t0 + 11 * MS + i * MS);
        }
        assert_eq!(c.deadline(), Some(t0 + 1011 * MS));
    }
}
