//! Where a join's time goes: the renderer's `apply` log lines (`--log-format json`) matched
//! to the bench's own puts by etcd revision, so each put → served splits into stages —
//! etcd's acknowledgement, watch delivery, the coalescing wait, render, plan, the runtime
//! API commands, their verification, the rest of the apply (bookkeeping) and HAProxy
//! serving the new server to the first request.
//!
//! The renderer and the bench run on one machine, so the log's wall-clock timestamp (the
//! end of the apply) and the bench's wall clock are one clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One `apply` line of the renderer's JSON log.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyLine {
    pub revision: i64,
    /// Unix time (ms) the line was logged: the end of the apply.
    pub end: f64,
    pub took: f64,
    pub waited: f64,
    /// Template data brought up to date (absent from older renderers' lines: 0).
    pub data: f64,
    pub render: f64,
    pub plan: f64,
    pub runtime: f64,
    pub verify: f64,
}

/// Every `apply` line of `log` that carries timings, by revision (the first for each).
pub fn apply_lines(log: &str) -> BTreeMap<i64, ApplyLine> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = &v["fields"];
        if f["message"] != "apply" {
            continue;
        }
        let d = |k: &str| f[k].as_str().and_then(debug_duration_ms);
        let parsed = (|| {
            Some(ApplyLine {
                revision: f["revision"].as_i64()?,
                end: rfc3339_unix_ms(v["timestamp"].as_str()?)?,
                took: d("took")?,
                waited: d("waited")?,
                data: d("data").unwrap_or(0.0),
                render: d("render")?,
                plan: d("plan")?,
                runtime: d("runtime")?,
                verify: d("verify")?,
            })
        })();
        if let Some(a) = parsed {
            out.entry(a.revision).or_insert(a);
        }
    }
    out
}

/// A `Duration`'s `Debug` text ("1.5s", "2.345ms", "870.1µs", "12ns") in milliseconds.
pub fn debug_duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "s" => n * 1e3,
        "ms" => n,
        "µs" | "us" => n / 1e3,
        "ns" => n / 1e6,
        _ => return None,
    })
}

/// "2026-12-04T07:30:00.123456Z" (UTC, as tracing's JSON writes it) in unix milliseconds.
pub fn rfc3339_unix_ms(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60) as f64 + sec) * 1e3)
}

/// Converts the bench's monotonic instants to the unix clock the log uses.
pub struct Clock {
    at: Instant,
    unix_ms: f64,
}

impl Clock {
    pub fn new() -> Clock {
        let at = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Clock {
            at,
            unix_ms: unix.as_secs_f64() * 1e3,
        }
    }

    pub fn unix_ms(&self, t: Instant) -> f64 {
        self.unix_ms + t.saturating_duration_since(self.at).as_secs_f64() * 1e3
            - self.at.saturating_duration_since(t).as_secs_f64() * 1e3
    }
}

/// One measured join as the bench saw it (unix ms).
pub struct Join {
    pub revision: i64,
    pub put: f64,
    pub acked: f64,
    pub served: f64,
}

/// The stages, in order, as (name, ms per join).
pub const STAGES: [&str; 11] = [
    "etcd write acknowledged",
    "watch delivery (ack → renderer loop)",
    "coalescing wait",
    "template data update",
    "render",
    "plan",
    "runtime API commands",
    "verify",
    "rest of the apply (bookkeeping)",
    "apply done → first request served",
    "our part (renderer loop → apply done)",
];

/// Each join split into [`STAGES`] (joins without an apply line are left out).
pub fn split(joins: &[Join], applies: &BTreeMap<i64, ApplyLine>) -> Vec<[f64; 11]> {
    joins
        .iter()
        .filter_map(|j| {
            let a = applies.get(&j.revision)?;
            let start = a.end - a.took;
            let arrived = start - a.waited;
            let rest = (a.took - a.data - a.render - a.plan - a.runtime - a.verify).max(0.0);
            Some([
                j.acked - j.put,
                arrived - j.acked,
                a.waited,
                a.data,
                a.render,
                a.plan,
                a.runtime,
                a.verify,
                rest,
                j.served - a.end,
                a.waited + a.took,
            ])
        })
        .collect()
}

/// The stage that weighs most in the slowest 1 % of joins (by put → served): its name and
/// its mean there (ms). The "our part" total is not a stage of its own.
pub fn tail_culprit(joins: &[Join], split: &[[f64; 11]]) -> Option<(&'static str, f64)> {
    let mut totals: Vec<(f64, &[f64; 11])> = joins
        .iter()
        .zip(split)
        .map(|(j, s)| (j.served - j.put, s))
        .collect();
    totals.sort_by(|a, b| b.0.total_cmp(&a.0));
    let tail = &totals[..totals.len().div_ceil(100).min(totals.len())];
    if tail.is_empty() {
        return None;
    }
    (0..STAGES.len() - 1)
        .map(|i| {
            let mean = tail.iter().map(|(_, s)| s[i]).sum::<f64>() / tail.len() as f64;
            (STAGES[i], mean)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_debug_unit() {
        assert_eq!(debug_duration_ms("1.5s"), Some(1500.0));
        assert_eq!(debug_duration_ms("2.25ms"), Some(2.25));
        assert_eq!(debug_duration_ms("870µs"), Some(0.87));
        assert_eq!(debug_duration_ms("0ns"), Some(0.0));
        assert_eq!(debug_duration_ms("soon"), None);
        assert_eq!(debug_duration_ms("3h"), None);
    }

    #[test]
    fn timestamps_are_unix_milliseconds() {
        assert_eq!(rfc3339_unix_ms("1970-01-01T00:00:00.000000Z"), Some(0.0));
        // `date -u -d 2026-12-04T07:30:00Z +%s` = 1796369400
        assert_eq!(
            rfc3339_unix_ms("2026-12-04T07:30:00.250000Z"),
            Some(1_796_369_400_250.0)
        );
        assert_eq!(
            rfc3339_unix_ms("2024-02-29T12:00:00Z"),
            Some(1_709_208_000_000.0)
        );
        assert_eq!(rfc3339_unix_ms("2026-12-04 07:30:00"), None);
    }

    #[test]
    fn a_join_splits_into_stages_that_add_up() {
        let log = r#"{"timestamp":"1970-01-01T00:00:01.010000Z","level":"INFO","fields":{"message":"apply","revision":7,"took":"4ms","waited":"1ms","data":"0ns","render":"500µs","plan":"500µs","runtime":"1ms","verify":"1ms"}}
{"timestamp":"1970-01-01T00:00:01.000000Z","level":"INFO","fields":{"message":"watching","revision":7}}
not json"#;
        let applies = apply_lines(log);
        assert_eq!(applies.len(), 1);
        let joins = [Join {
            revision: 7,
            put: 1000.0,
            acked: 1002.0,
            served: 1012.0,
        }];
        let s = split(&joins, &applies);
        let want = [2.0, 3.0, 1.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 2.0, 5.0];
        for (got, want) in s[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", s[0]);
        }
        // Every stage but the "our part" total adds up to put → served.
        assert!((s[0][..10].iter().sum::<f64>() - 12.0).abs() < 1e-6);
        assert_eq!(
            tail_culprit(&joins, &s),
            Some(("watch delivery (ack → renderer loop)", 3.0))
        );
    }
}
