//! Guard rails around an apply: `--min-instances` refuses renders that would empty a
//! service too far, `--max-instances-per-service` caps each service, and records a config
//! check fails on are quarantined (left out until they change).

use std::collections::BTreeSet;

use tracing::{error, info, warn};

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
            let have = ctx.data()["services"][service]
                .as_array()
                .map_or(0, Vec::len);
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
        let report = applier.apply(renderer, ctx).await;
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
