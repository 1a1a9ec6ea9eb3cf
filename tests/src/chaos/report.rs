//! What a run reports: faults with their heal and convergence times, violations, requests,
//! samples for the timeline, memory and open files per process; as text, JSON and SVG.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::schedule::KINDS;

/// A fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: &'static str,
    pub target: usize,
    pub at_ms: u64,
    pub healed_ms: u64,
    /// Healed → every load balancer runs the registry's set (and its file lists it).
    pub converged_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub at_ms: u64,
    pub invariant: &'static str,
    pub detail: String,
}

/// One checker sample (for the timeline).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: u64,
    /// Valid instances in the registry (`None`: etcd did not answer in time).
    pub registry: Option<usize>,
    /// Servers each load balancer runs (not in maintenance).
    pub live: [usize; 2],
}

#[derive(Debug, Clone, Default)]
pub struct Requests {
    pub total: u64,
    pub failed: u64,
    /// Prober requests refused by a load balancer whose HAProxy was down because the run
    /// killed it (`haproxy_restart`, until it answers again): expected, not failures.
    pub refused_while_down: u64,
    /// Failed prober requests: (ms, load balancer, faults active then).
    pub failures: Vec<(u64, usize, Vec<String>)>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    pub sabotage: bool,
    pub faults: Vec<Fault>,
    pub violations: Vec<Violation>,
    pub requests: Requests,
    pub samples: Vec<Sample>,
    /// Resident memory at the start and end, MiB, per process ("renderer-0", "registrar-3").
    pub rss: BTreeMap<String, (f64, f64)>,
    /// RSS and open files per process, from its first reading (10 s into the run, or its
    /// start if a fault restarted it) to its last: what a long run shows about leaks.
    pub usage: BTreeMap<String, Usage>,
}

/// One process's resources at its first and last reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub pid: u32,
    /// Seconds into the run of the first and the last reading.
    pub from_s: f64,
    pub to_s: f64,
    pub rss_mib: (f64, f64),
    pub fds: (u32, u32),
}

impl Report {
    pub fn json(&self) -> Value {
        json!({
            "seed": self.seed,
            "duration_s": self.duration_s,
            "sabotage": self.sabotage,
            "faults": self.faults.iter().map(|f| json!({
                "kind": f.kind, "target": f.target, "at_ms": f.at_ms,
                "healed_ms": f.healed_ms, "converged_ms": f.converged_ms,
            })).collect::<Vec<_>>(),
            "violations": self.violations.iter().map(|v| json!({
                "at_ms": v.at_ms, "invariant": v.invariant, "detail": v.detail,
            })).collect::<Vec<_>>(),
            "requests": {
                "total": self.requests.total,
                "failed": self.requests.failed,
                "refused_while_down": self.requests.refused_while_down,
                "failures": self.requests.failures.iter().map(|(at, lb, active)| json!({
                    "at_ms": at, "lb": lb, "faults": active,
                })).collect::<Vec<_>>(),
            },
            "rss_mib": self.rss.iter().map(|(k, (a, b))| (k.clone(), json!([a, b]))).collect::<serde_json::Map<_, _>>(),
            "usage": self.usage.iter().map(|(k, u)| (k.clone(), json!({
                "pid": u.pid, "from_s": u.from_s, "to_s": u.to_s,
                "rss_mib": [u.rss_mib.0, u.rss_mib.1], "open_files": [u.fds.0, u.fds.1],
            }))).collect::<serde_json::Map<_, _>>(),
            "samples": self.samples.iter().map(|s| json!([s.at_ms, s.registry, s.live[0], s.live[1]])).collect::<Vec<_>>(),
        })
    }

    /// Violations of load balancer `lb` ("lb1: …").
    pub fn violations_of(&self, lb: usize) -> Vec<&Violation> {
        let tag = format!("lb{lb}");
        self.violations
            .iter()
            .filter(|v| v.detail.contains(&tag))
            .collect()
    }

    /// One screen: faults per kind with convergence, requests, violations.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "chaos run: seed {}, {:.0} s{}\n\n| fault | count | converged p50 | converged max |\n|---|---:|---:|---:|\n",
            self.seed,
            self.duration_s,
            if self.sabotage { ", SABOTAGE (lb1's renderer frozen after the first fault)" } else { "" }
        );
        for kind in KINDS {
            let of: Vec<&Fault> = self.faults.iter().filter(|f| f.kind == kind).collect();
            let mut conv: Vec<u64> = of.iter().filter_map(|f| f.converged_ms).collect();
            conv.sort_unstable();
            let p50 = conv
                .get(conv.len() / 2)
                .map_or("—".into(), |v| format!("{v} ms"));
            let max = conv.last().map_or("—".into(), |v| format!("{v} ms"));
            let never = of.len() - conv.len();
            let max = if never > 0 {
                format!("{max} ({never} not before the next fault)")
            } else {
                max
            };
            out += &format!("| {kind} | {} | {p50} | {max} |\n", of.len());
        }
        out += &format!(
            "\nrequests: {} total, {} failed ({} refused by a load balancer while the run had its HAProxy down: expected)\nviolations: {}\n",
            self.requests.total,
            self.requests.failed,
            self.requests.refused_while_down,
            self.violations.len()
        );
        for v in self.violations.iter().take(12) {
            out += &format!("  {:>7} ms  {:<15} {}\n", v.at_ms, v.invariant, v.detail);
        }
        if self.violations.len() > 12 {
            out += &format!("  … and {} more\n", self.violations.len() - 12);
        }
        for (name, u) in &self.usage {
            if !name.starts_with("registrar") || name == "registrar-0" {
                out += &format!(
                    "{name}: RSS {:.1} → {:.1} MiB, open files {} → {} ({:.0}–{:.0} s)\n",
                    u.rss_mib.0, u.rss_mib.1, u.fds.0, u.fds.1, u.from_s, u.to_s
                );
            }
        }
        out
    }

    /// SVG timeline: faults as bands, registry and live sizes, failed requests.
    pub fn svg(&self) -> String {
        let (w, left, top) = (1000.0, 130.0, 20.0);
        let row = 14.0;
        let bands_h = row * KINDS.len() as f64;
        let chart_top = top + bands_h + 20.0;
        let chart_h = 200.0;
        let h = chart_top + chart_h + 50.0;
        let total_ms = (self.duration_s * 1000.0).max(1.0);
        let x = |ms: f64| left + (w - left - 20.0) * ms / total_ms;
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="13">chaos run, seed {}: faults (bands), registry and live servers per load balancer, failed requests (red ticks)</text>"#,
            self.seed
        );
        for (i, kind) in KINDS.iter().enumerate() {
            let y = top + row * i as f64;
            s += &format!(r#"<text x="4" y="{}">{kind}</text>"#, y + 10.0);
            for f in self.faults.iter().filter(|f| f.kind == *kind) {
                let (x0, x1) = (x(f.at_ms as f64), x(f.healed_ms as f64));
                s += &format!(
                    r##"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{}" fill="#e8a33d" opacity="0.8"/>"##,
                    (x1 - x0).max(1.5),
                    row - 3.0
                );
            }
        }
        let max = self
            .samples
            .iter()
            .flat_map(|s| [s.registry.unwrap_or(0), s.live[0], s.live[1]])
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let y = |v: f64| chart_top + chart_h - chart_h * v / max;
        s += &format!(
            r##"<rect x="{left}" y="{chart_top}" width="{}" height="{chart_h}" fill="none" stroke="#999"/><text x="4" y="{}">{max:.0} servers</text><text x="4" y="{}">0</text>"##,
            w - left - 20.0,
            chart_top + 10.0,
            chart_top + chart_h
        );
        type Series = (&'static str, &'static str, fn(&Sample) -> Option<usize>);
        let series: [Series; 3] = [
            ("registry", "#333", |s| s.registry),
            ("lb0 live", "#1f77b4", |s| Some(s.live[0])),
            ("lb1 live", "#2ca02c", |s| Some(s.live[1])),
        ];
        for (k, (name, color, f)) in series.iter().enumerate() {
            // At most ~2 000 points a line (a 30-minute run has 18 000 samples).
            let step = (self.samples.len() / 2000).max(1);
            let pts: Vec<String> = self
                .samples
                .iter()
                .step_by(step)
                .filter_map(|smp| {
                    f(smp).map(|v| format!("{:.1},{:.1}", x(smp.at_ms as f64), y(v as f64)))
                })
                .collect();
            s += &format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="{}" points="{}"/>"#,
                if k == 0 { 2.5 } else { 1.2 },
                pts.join(" ")
            );
            s += &format!(
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                left + 10.0 + 90.0 * k as f64,
                h - 10.0
            );
        }
        for (at, _, _) in &self.requests.failures {
            let xx = x(*at as f64);
            s += &format!(
                r#"<line x1="{xx:.1}" x2="{xx:.1}" y1="{}" y2="{}" stroke="red"/>"#,
                chart_top + chart_h,
                chart_top + chart_h + 10.0
            );
        }
        s += &format!(
            r#"<text x="{}" y="{}">0 s</text><text x="{}" y="{}">{:.0} s</text></svg>"#,
            left,
            chart_top + chart_h + 22.0,
            w - 60.0,
            chart_top + chart_h + 22.0,
            self.duration_s
        );
        s
    }
}
