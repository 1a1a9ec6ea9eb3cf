//! The invariants, judged on each look at the system (every 100 ms) from public interfaces
//! only: (1) quiet → every load balancer runs exactly the registry's set; (2) quiet → its
//! file lists what it runs; (3) never emptied while a registered instance is healthy;
//! hostile records never reach HAProxy; (5) no process of ours grows in memory or open
//! files. Each open episode is reported once. (4, failed requests, is counted by the
//! probers and wrk.) A type of its own so it can be tested on made-up looks.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::report::{Sample, Usage, Violation};
use super::system::{ms_since, Server};

/// One look at the system.
pub(super) struct Observation {
    pub t: Instant,
    /// The registry's valid instances (`None`: etcd did not answer in time).
    pub registry: Option<BTreeMap<String, Server>>,
    /// Per load balancer, the servers HAProxy runs out of maintenance (`None`: its master
    /// did not answer, e.g. re-executing for a reload; not judged in this look).
    pub running: [Option<BTreeMap<String, Server>>; 2],
    /// Per load balancer, the servers its file lists.
    pub files: [Vec<String>; 2],
    /// Faults in progress.
    pub faults_active: usize,
    /// When the last fault was healed.
    pub last_heal: Option<Instant>,
}

pub(super) struct Checker {
    start: Instant,
    /// How long the system must be quiet (no fault, no registry change) before (1) and (2)
    /// must hold.
    bound: Duration,
    violations: Vec<Violation>,
    samples: Vec<Sample>,
    last_registry: Option<BTreeMap<String, Server>>,
    registry_changed: Instant,
    /// Per load balancer and invariant: an episode is open (reported once).
    open: BTreeMap<(usize, &'static str), bool>,
    usage: BTreeMap<String, Usage>,
}

impl Checker {
    pub fn new(start: Instant) -> Checker {
        Checker {
            start,
            bound: Duration::from_secs(3),
            violations: Vec::new(),
            samples: Vec::new(),
            last_registry: None,
            registry_changed: start,
            open: BTreeMap::new(),
            usage: BTreeMap::new(),
        }
    }

    pub fn violate(&mut self, at_ms: u64, invariant: &'static str, detail: String) {
        self.violations.push(Violation {
            at_ms,
            invariant,
            detail,
        });
    }

    /// Opens an episode of `invariant` on load balancer `lb`: true the first time (report
    /// it), false while it stays open.
    fn opens(&mut self, lb: usize, invariant: &'static str) -> bool {
        !self.open.insert((lb, invariant), true).unwrap_or(false)
    }

    fn closes(&mut self, lb: usize, invariant: &'static str) {
        self.open.insert((lb, invariant), false);
    }

    /// Judges one look; true when both load balancers answered, run exactly the
    /// registry's set and their files list it (healed faults have converged).
    pub fn observe(&mut self, o: Observation) -> bool {
        let at = ms_since(self.start, o.t);
        let none = BTreeMap::new();
        let answered = [o.running[0].is_some(), o.running[1].is_some()];
        let running = [0, 1].map(|i| o.running[i].as_ref().unwrap_or(&none));
        let previous = self.samples.last().map_or([0, 0], |s| s.live);
        self.samples.push(Sample {
            at_ms: at,
            registry: o.registry.as_ref().map(BTreeMap::len),
            live: [0, 1].map(|i| {
                if answered[i] {
                    running[i].len()
                } else {
                    previous[i]
                }
            }),
        });
        // Hostile values never reach HAProxy, whatever else is going on.
        for (i, r) in running.iter().enumerate() {
            if let Some(name) = r
                .keys()
                .find(|n| n.starts_with("poison") || n.contains("evil"))
            {
                if self.opens(i, "hostile") {
                    self.violate(at, "hostile", format!("lb{i} runs {name}"));
                }
            }
        }
        let Some(reg) = o.registry else {
            return false;
        };
        if self.last_registry.as_ref() != Some(&reg) {
            self.registry_changed = o.t;
            self.last_registry = Some(reg.clone());
        }
        let quiet_since = o
            .last_heal
            .map_or(self.registry_changed, |h| h.max(self.registry_changed));
        let quiet_for = o.t.saturating_duration_since(quiet_since);
        let quiet = o.faults_active == 0 && quiet_for > self.bound;
        let healthy = reg.values().filter(|s| s.2 > 0).count();
        for i in (0..2).filter(|i| answered[*i]) {
            let run = running[i];
            // 3. never emptied while a registered instance is healthy.
            let serving = run.values().filter(|s| s.2 > 0).count();
            if healthy > 0 && serving == 0 {
                if self.opens(i, "emptied") {
                    self.violate(
                        at,
                        "emptied",
                        format!("lb{i} serves no instance while the registry has {healthy}"),
                    );
                }
            } else {
                self.closes(i, "emptied");
            }
            // 1. quiet → live set = registry.
            let differs = *run != reg;
            if quiet && differs {
                if self.opens(i, "converged") {
                    let missing: Vec<&String> =
                        reg.keys().filter(|k| !run.contains_key(*k)).collect();
                    let extra: Vec<&String> =
                        run.keys().filter(|k| !reg.contains_key(*k)).collect();
                    self.violate(
                        at,
                        "converged",
                        format!(
                            "lb{i}: {} s quiet, live set differs from the registry (missing {:?}, extra {:?}, or other address/weight)",
                            quiet_for.as_secs(),
                            missing.iter().take(5).collect::<Vec<_>>(),
                            extra.iter().take(5).collect::<Vec<_>>(),
                        ),
                    );
                }
            } else if !differs {
                self.closes(i, "converged");
            }
            // 2. quiet → file = live set.
            let file_differs = !o.files[i].iter().eq(run.keys());
            if quiet && !differs && file_differs {
                if self.opens(i, "file") {
                    self.violate(
                        at,
                        "file",
                        format!(
                            "lb{i}: the file lists {} servers, HAProxy runs {}",
                            o.files[i].len(),
                            run.len()
                        ),
                    );
                }
            } else if !file_differs {
                self.closes(i, "file");
            }
        }
        answered == [true, true]
            && running.iter().all(|r| **r == reg)
            && o.files
                .iter()
                .zip(running)
                .all(|(f, r)| f.iter().eq(r.keys()))
    }

    /// Records a reading of `pid` as process `name`'s. The first reading is taken 10 s into the
    /// run (after start-up), or anew when the name has a new process (a fault restarted it).
    pub fn note_usage(&mut self, name: String, pid: u32, at_ms: u64) {
        let (Some(mib), Some(fds)) = (rss_mib(pid), open_fds(pid)) else {
            return;
        };
        let at = at_ms as f64 / 1000.0;
        match self.usage.get_mut(&name) {
            Some(u) if u.pid == pid => {
                u.to_s = at;
                u.rss_mib.1 = mib;
                u.fds.1 = fds;
            }
            _ if at_ms >= 10_000 => {
                self.usage.insert(
                    name,
                    Usage {
                        pid,
                        from_s: at,
                        to_s: at,
                        rss_mib: (mib, mib),
                        fds: (fds, fds),
                    },
                );
            }
            _ => {}
        }
    }

    /// Invariant 5, at the end: a process of ours whose memory more than doubled (and grew
    /// by 50 MiB) or whose open files more than doubled (+32) is a violation. Returns RSS
    /// first and last per process of ours.
    pub fn judge_usage(&mut self, at_ms: u64) -> BTreeMap<String, (f64, f64)> {
        let mut rss = BTreeMap::new();
        let usage = self.usage.clone();
        for (name, u) in &usage {
            let ours = name.starts_with("renderer") || name.starts_with("registrar");
            if !ours {
                continue;
            }
            let (first, last) = u.rss_mib;
            rss.insert(name.clone(), (first, last));
            if last > (2.0 * first).max(first + 50.0) {
                self.violate(
                    at_ms,
                    "memory",
                    format!("{name}: RSS {first:.1} → {last:.1} MiB"),
                );
            }
            let (first, last) = u.fds;
            if last > 2 * first + 32 {
                self.violate(
                    at_ms,
                    "open_files",
                    format!("{name}: {first} → {last} open files"),
                );
            }
        }
        rss
    }

    /// Violations, samples and per-process usage.
    pub fn finish(self) -> (Vec<Violation>, Vec<Sample>, BTreeMap<String, Usage>) {
        (self.violations, self.samples, self.usage)
    }
}

/// Open file descriptors of `pid`.
fn open_fds(pid: u32) -> Option<u32> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u32)
}

/// Resident set size of `pid`, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeMap<String, Server> {
        names
            .iter()
            .map(|n| (n.to_string(), ("127.0.0.1".to_string(), 80, 100)))
            .collect()
    }

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// A look `ms` into the run with no fault in progress.
    fn look(start: Instant, ms: u64, reg: &[&str], lb: [Option<&[&str]>; 2]) -> Observation {
        Observation {
            t: start + Duration::from_millis(ms),
            registry: Some(set(reg)),
            running: lb.map(|l| l.map(set)),
            files: lb.map(|l| files(l.unwrap_or(&[]))),
            faults_active: 0,
            last_heal: None,
        }
    }

    fn invariants(c: &Checker) -> Vec<(&'static str, u64)> {
        c.violations
            .iter()
            .map(|v| (v.invariant, v.at_ms))
            .collect()
    }

    #[test]
    fn a_load_balancer_that_stays_behind_once_quiet_is_reported_once() {
        let start = Instant::now();
        let mut c = Checker::new(start);
        let both: &[&str] = &["a", "b"];
        let behind: &[&str] = &["a"];
        // Converged while both run the registry.
        assert!(c.observe(look(start, 100, both, [Some(both), Some(both)])));
        // b left lb1's HAProxy, not the registry: within the bound, not yet a violation.
        assert!(!c.observe(look(start, 2_000, both, [Some(both), Some(behind)])));
        assert!(c.violations.is_empty());
        c.observe(look(start, 3_200, both, [Some(both), Some(behind)]));
        c.observe(look(start, 3_300, both, [Some(both), Some(behind)]));
        assert_eq!(invariants(&c), [("converged", 3_200)]);
        assert!(
            c.violations[0].detail.starts_with("lb1:"),
            "{:?}",
            c.violations
        );
        // Back in step: the episode closes; a new one is reported again.
        assert!(c.observe(look(start, 3_400, both, [Some(both), Some(both)])));
        c.observe(look(start, 3_500, both, [Some(both), Some(behind)]));
        assert_eq!(c.violations.len(), 2);
    }

    #[test]
    fn faults_in_progress_and_a_new_registry_are_not_quiet() {
        let start = Instant::now();
        let mut c = Checker::new(start);
        let (reg, lb): (&[&str], &[&str]) = (&["a", "b"], &["a"]);
        let mut o = look(start, 10_000, reg, [Some(lb), Some(reg)]);
        o.faults_active = 1;
        c.observe(o);
        // The registry changes at 20 s: quiet again only 3 s later.
        c.observe(look(
            start,
            20_000,
            &["a", "c"],
            [Some(&["a", "c"]), Some(lb)],
        ));
        c.observe(look(
            start,
            22_000,
            &["a", "c"],
            [Some(&["a", "c"]), Some(lb)],
        ));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        c.observe(look(
            start,
            23_100,
            &["a", "c"],
            [Some(&["a", "c"]), Some(lb)],
        ));
        assert_eq!(invariants(&c), [("converged", 23_100)]);
    }

    #[test]
    fn emptied_hostile_and_file_are_reported_and_silence_is_not_judged() {
        let start = Instant::now();
        let mut c = Checker::new(start);
        let reg: &[&str] = &["a", "poison-1"];
        // lb0 serves nothing (not even quiet: "emptied" holds always); lb1 runs the poison.
        c.observe(look(start, 100, reg, [Some(&[]), Some(reg)]));
        assert_eq!(invariants(&c), [("hostile", 100), ("emptied", 100)]);
        // An HAProxy that does not answer is not judged.
        let mut c = Checker::new(start);
        assert!(!c.observe(look(start, 5_000, &["a"], [None, Some(&["a"])])));
        assert!(c.violations.is_empty());
        // Quiet, HAProxy runs the registry, its file lists something else.
        let mut o = look(start, 8_100, &["a"], [Some(&["a"]), Some(&["a"])]);
        o.files[0] = files(&["a", "old"]);
        assert!(!c.observe(o));
        assert_eq!(invariants(&c), [("file", 8_100)]);
    }
}
