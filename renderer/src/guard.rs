//! Guard rails around an apply: `--min-instances` refuses renders that would empty a
//! service too far, `--max-instances-per-service` caps each service, records a config
//! check fails on are quarantined (left out until they change), and `--empty-hold` keeps
//! the servers of a service that lost every instance at once ([`EmptyHold`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::applied::Applied;
use crate::apply::{self, Applier};
use crate::config::Config;
use crate::data::TemplateData;
use crate::model::Model;
use crate::render::Renderer;

/// Records left out of the config because the check pinned a failure on them: key →
/// (the record as it was, HAProxy's message). A record comes back as soon as it changes.
#[derive(Debug, Default)]
pub struct Quarantine {
    entries: std::collections::BTreeMap<String, (registry::Instance, String)>,
}

impl Quarantine {
    /// Releases entries whose record changed or went away.
    fn refresh(&mut self, model: &Model) {
        self.entries.retain(|key, (inst, _)| {
            let keep = model.get(key) == Some(inst);
            if !keep {
                info!(%key, "quarantined record changed; trying it again");
            }
            keep
        });
    }

    pub(crate) fn keys(&self) -> BTreeSet<String> {
        self.entries.keys().cloned().collect()
    }

    /// True when the record under `key` is left out.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The quarantined keys and HAProxy's message for each (for `/status`).
    pub fn messages(&self) -> impl Iterator<Item = (&String, &String)> {
        self.entries.iter().map(|(k, (_, msg))| (k, msg))
    }

    /// Quarantines the record `line` (of a config a check rejected with `message`) most
    /// likely comes from; returns its key, `None` when no record can be blamed.
    pub fn pin(&mut self, model: &Model, line: &str, message: &str) -> Option<String> {
        let key = culprit(model, line, &self.keys())?;
        warn!(%key, error = %message, "quarantined registry record: the config check fails because of it; applying without it");
        let inst = model.get(&key)?.clone();
        self.entries
            .insert(key.clone(), (inst, message.to_string()));
        Some(key)
    }
}

/// Which instance (not in `exclude`) most likely produced `line` of a rendered config
/// (the line `haproxy -c` rejected, see [`crate::haproxy::rejected_line`]): a
/// `server <id>` line naming it, else a line with its address:port, else one holding one
/// of its tags or meta values as a word.
pub fn culprit(model: &Model, line: &str, exclude: &BTreeSet<String>) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let all = || {
        model
            .services()
            .values()
            .flat_map(std::collections::BTreeMap::values)
            .filter(|i| !exclude.contains(&model.key_of(i)))
    };
    let by_name =
        all().find(|i| words.first() == Some(&"server") && words.get(1) == Some(&i.id.as_str()));
    let by_addr = || {
        let target = |i: &registry::Instance| format!("{}:{}", i.address, i.port);
        all().find(|i| words.contains(&target(i).as_str()))
    };
    let by_value = || {
        all().find(|i| {
            i.tags
                .iter()
                .chain(i.meta.values())
                .any(|v| !v.is_empty() && words.contains(&v.as_str()))
        })
    };
    by_name
        .or_else(by_addr)
        .or_else(by_value)
        .map(|i| model.key_of(i))
}

/// The guarded apply: `--min-instances` refuses renders that would drop a service too low;
/// a check failure pinned on one record quarantines it and renders again without it (up to
/// three records per apply); `--max-instances-per-service` caps each service.
pub async fn apply_guarded(
    config: &Config,
    model: &mut Model,
    data: &mut TemplateData,
    quarantine: &mut Quarantine,
    applier: &mut Applier,
    renderer: &Renderer,
) -> apply::Report {
    quarantine.refresh(model);
    for round in 0..=3 {
        let excluded = quarantine.keys();
        let started = std::time::Instant::now();
        let (ctx, cut) = data.update(
            renderer,
            model,
            &config.vars,
            &excluded,
            config.max_instances_per_service,
        );
        if cut > 0 {
            warn!(
                cut,
                max = config.max_instances_per_service,
                "instances over --max-instances-per-service left out"
            );
        }
        for (service, min) in &config.min_instances {
            let have = crate::data::instances_in(ctx, service);
            if have < *min {
                let msg = format!(
                    "refusing to apply: service {service} would have {have} instance(s), below --min-instances {service}={min}; keeping the last good config"
                );
                error!("{msg}");
                return apply::Report {
                    errors: vec![msg],
                    ..Default::default()
                };
            }
        }
        let data_took = started.elapsed();
        let mut report = applier.apply(renderer, ctx).await;
        report.timings.data += data_took;
        let Some(line) = report.rejected_lines.first().filter(|_| round < 3) else {
            return report;
        };
        let message = report.errors.first().cloned().unwrap_or_default();
        if quarantine.pin(model, line, &message).is_none() {
            return report;
        }
    }
    apply::Report::default()
}

/// `--empty-hold`: when a service that had two or more instances loses all of them at
/// once (a registrar-side outage more likely than a decision), nothing is applied for up
/// to the hold, waiting for them to register again; applied at once when they are back,
/// or when every one of them left on purpose.
#[derive(Debug)]
pub struct EmptyHold {
    hold: Duration,
    /// The hold in force: (until, service, how many it had).
    active: Option<(Instant, String, usize)>,
    /// Per service, the most instances applied within the last `hold` (and when): a mass
    /// revocation reaches the watch as several events, applied one by one, so "at once"
    /// is judged over that window, not over one apply.
    peaks: BTreeMap<String, (usize, Instant)>,
}

impl EmptyHold {
    pub fn new(hold: Duration) -> EmptyHold {
        EmptyHold {
            hold,
            active: None,
            peaks: BTreeMap::new(),
        }
    }

    /// Ends the hold once the service has its instances back.
    pub fn release_if_back(&mut self, model: &Model) {
        if let Some((_, service, had)) = &self.active {
            let now = model.services().get(service).map_or(0, BTreeMap::len);
            if now >= *had {
                info!(%service, instances = now, "the service's instances are back; applying");
                self.active = None;
            }
        }
    }

    /// An apply due at `due`, or at the end of the hold if that is later.
    pub fn delay(&self, due: Instant) -> Instant {
        self.active.as_ref().map_or(due, |h| due.max(h.0))
    }

    /// True when the apply due now must wait: a service was emptied at once (a hold
    /// starts) or a hold runs. A hold whose time is up ends with a WARN and lets it go.
    pub fn holds(&mut self, now: Instant, applied: &Applied, model: &Model) -> bool {
        if self.hold.is_zero() {
            return false;
        }
        if self.active.is_none() {
            if let Some((service, had)) = emptied(applied, &self.peaks, model) {
                warn!(%service, instances = had, hold = ?self.hold, "every instance of the service left at once; keeping its servers while they may register again (--empty-hold)");
                self.active = Some((now + self.hold, service, had));
            }
        }
        if let Some((until, service, had)) = &self.active {
            if now < *until {
                return true;
            }
            let back = model.services().get(service).map_or(0, BTreeMap::len);
            warn!(%service, instances = back, had, "the service did not get its instances back within --empty-hold; applying");
        }
        self.active = None;
        false
    }

    /// After an apply: `applied` is what runs now.
    pub fn applied(&mut self, applied: &Applied, now: Instant) {
        note_peaks(&mut self.peaks, applied, now, self.hold);
    }
}

/// A service with at least one instance applied and none in the model, that had two or
/// more applied within the last `--empty-hold` ([`note_peaks`]), with that many — unless
/// every applied instance left on purpose (deleted while its record said `leaving`): a
/// deliberate stop of the whole service is applied at once.
fn emptied(
    applied: &Applied,
    peaks: &BTreeMap<String, (usize, Instant)>,
    model: &Model,
) -> Option<(String, usize)> {
    applied.iter().find_map(|(name, ids)| {
        let had = peaks.get(name).map_or(0, |p| p.0).max(ids.len());
        let gone = model.services().get(name).is_none_or(|now| now.is_empty());
        let deliberate = model
            .departed()
            .get(name)
            .is_some_and(|left| ids.iter().all(|id| left.contains(id)));
        (had >= 2 && gone && !deliberate).then(|| (name.clone(), had))
    })
}

/// Keeps, per service, the most instances applied within the last `window`.
fn note_peaks(
    peaks: &mut BTreeMap<String, (usize, Instant)>,
    applied: &Applied,
    now: Instant,
    window: Duration,
) {
    peaks.retain(|name, (_, at)| applied.contains_key(name) || now.duration_since(*at) < window);
    for (name, ids) in applied {
        let n = ids.len();
        let peak = peaks.entry(name.clone()).or_insert((n, now));
        if n >= peak.0 || now.duration_since(peak.1) >= window {
            *peak = (n, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::applied::diff_applied;

    #[test]
    fn a_service_is_emptied_when_two_or_more_recent_instances_are_all_gone() {
        let mut model = Model::new("/services");
        let key = |s: &str, i: &str| registry::instance_key("/services", s, i);
        let put = |m: &mut Model, s: &str, i: &str| {
            let v = registry::Instance::new(s, i, "10.0.0.1", 80).encode();
            m.put(&key(s, i), v.as_bytes());
        };
        for (s, i) in [("web", "a"), ("web", "b"), ("web", "c"), ("solo", "x")] {
            put(&mut model, s, i);
        }
        let (t0, window) = (Instant::now(), Duration::from_secs(3));
        let mut applied = Applied::new();
        let mut peaks = BTreeMap::new();
        let mut commit = |applied: &mut Applied, model: &Model, at: Instant| {
            diff_applied(applied, model, |_, _| true, true);
            note_peaks(&mut peaks, applied, at, window);
            peaks.clone()
        };
        let p = commit(&mut applied, &model, t0);
        assert_eq!(emptied(&applied, &p, &model), None);
        // A one-instance service leaving is ordinary; some of three leaving too.
        model.delete(&key("solo", "x"));
        model.delete(&key("web", "a"));
        model.delete(&key("web", "b"));
        assert_eq!(emptied(&applied, &p, &model), None);
        // Those removals are applied one by one (as watch events arrive)…
        let p = commit(&mut applied, &model, t0 + Duration::from_millis(10));
        // …and the last one goes: the three of 10 ms ago count.
        model.delete(&key("web", "c"));
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(emptied(&applied, &p, &model), Some(("web".to_string(), 3)));
        // One is back: not empty any more.
        put(&mut model, "web", "b");
        assert_eq!(emptied(&applied, &p, &model), None);
        model.delete(&key("web", "b"));
        // A service that shrank to one long ago and now loses it: ordinary.
        commit(&mut applied, &model, t1 + window);
        put(&mut model, "web", "c");
        let p = commit(&mut applied, &model, t1 + window * 2);
        model.delete(&key("web", "c"));
        assert_eq!(emptied(&applied, &p, &model), None);
    }
}
