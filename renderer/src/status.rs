//! `renderer status`: the first thing to run when HAProxy does not route where you expect.
//! Reads the registry from etcd (what is admitted, what is skipped and why) and the running
//! renderer's `/status` (what it last applied, and when), and names every difference
//! between what the renderer serves and the registry: behind (changes not applied yet) or
//! drift (served what the registry did not hold at the renderer's own revision). The
//! document itself, [`StatusDoc`], is written here too, after every apply.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use registry::etcd::EtcdArgs;
use serde::{Deserialize, Serialize};

use crate::apply;
use crate::guard::Quarantine;
use crate::model::{Changes, Model};

/// The renderer's `/status` document: written after every apply, read by `renderer
/// status` (and by operators: `curl 127.0.0.1:9105/status`). Missing fields read as
/// their defaults, so an older renderer's document still reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusDoc {
    /// The registry revision the served config was rendered at.
    pub revision: i64,
    /// Per service, `id address:port` of every instance served (shared with the daemon's
    /// [`ServedLists`]: a document costs a pointer per service, not a string per instance).
    pub services: BTreeMap<String, Arc<Vec<String>>>,
    /// Records left out as invalid, by key.
    pub skipped: BTreeMap<String, Skipped>,
    /// Records left out because HAProxy rejected what they render, by key: why.
    pub quarantined: BTreeMap<String, String>,
    /// HAProxy runs a state whose file is still being checked and written.
    pub file_pending: bool,
    pub last_apply: LastApply,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Skipped {
    pub reason: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastApply {
    pub unix_time: f64,
    pub ok: bool,
    /// How HAProxy was brought along: `runtime API`, `master CLI reload`, `unchanged`, …
    pub how: String,
    pub deferred: usize,
    pub written: usize,
    pub runtime_changes: usize,
    pub took_ms: f64,
    pub errors: Vec<String>,
}

/// The document's `services`, kept up to date one service at a time: a change to one
/// service among 1 000 formats that service's lines, not 100 000.
#[derive(Debug, Default)]
pub struct ServedLists {
    lists: BTreeMap<String, Arc<Vec<String>>>,
}

impl ServedLists {
    /// Brings the lists of the services `changed` names (`All`: every one) up to `model`.
    pub fn update(&mut self, model: &Model, changed: &Changes) {
        let list = |ids: &BTreeMap<String, registry::Instance>| {
            Arc::new(
                ids.values()
                    .map(|i| format!("{} {}:{}", i.id, i.address, i.port))
                    .collect::<Vec<_>>(),
            )
        };
        match changed.services() {
            None => {
                self.lists = model
                    .services()
                    .iter()
                    .map(|(name, ids)| (name.clone(), list(ids)))
                    .collect();
            }
            Some(names) => {
                for name in names {
                    match model.services().get(&name) {
                        Some(ids) => {
                            self.lists.insert(name, list(ids));
                        }
                        None => {
                            self.lists.remove(&name);
                        }
                    }
                }
            }
        }
    }
}

impl StatusDoc {
    /// The document after an apply that took `took` and reported `report`.
    pub fn after_apply(
        model: &Model,
        served: &ServedLists,
        quarantine: &Quarantine,
        file_pending: bool,
        report: &apply::Report,
        took: Duration,
    ) -> StatusDoc {
        StatusDoc {
            revision: model.revision,
            services: served.lists.clone(),
            skipped: model
                .skipped()
                .iter()
                .map(|(k, s)| {
                    let skipped = Skipped {
                        reason: s.reason.to_string(),
                        error: s.message.clone(),
                    };
                    (k.clone(), skipped)
                })
                .collect(),
            quarantined: quarantine
                .messages()
                .map(|(k, msg)| (k.clone(), msg.clone()))
                .collect(),
            file_pending,
            last_apply: LastApply {
                unix_time: crate::metrics::unix_now(),
                ok: report.errors.is_empty(),
                how: report.reload.unwrap_or("unchanged").to_string(),
                deferred: report.deferred,
                written: report.written,
                runtime_changes: report.runtime_changes,
                took_ms: took.as_secs_f64() * 1000.0,
                errors: report.errors.clone(),
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// Flags of `renderer status`.
#[derive(Debug, Parser)]
#[command(
    name = "lb-renderer status",
    about = "Show the services and instances in the registry, skipped records and why, what the running renderer last applied, and every difference between what it serves and the registry.",
    after_help = "Exit status: 0 when the report was made (the renderer serves the registry, is behind, or is not reachable), 1 when etcd cannot be read, 3 on DRIFT: the renderer serves something the registry did not hold at the renderer's own revision (a lost event)."
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Key prefix.
    #[arg(long, env = "RENDERER_PREFIX", default_value = registry::DEFAULT_PREFIX)]
    pub prefix: String,
    /// The running renderer's metrics address (its --metrics-addr).
    #[arg(long, env = "RENDERER_METRICS_ADDR", default_value = "127.0.0.1:9105")]
    pub renderer: String,
}

/// `weight 100`, or `weight 10 (admin; record 100)` when an admin key sets it.
fn weight_of(i: &registry::Instance, admin: Option<&registry::Admin>) -> String {
    match admin.and_then(|a| a.weight) {
        Some(w) if w != i.weight => format!("weight {w} (admin; record {})", i.weight),
        _ => format!("weight {}", i.weight),
    }
}

/// ` DRAIN (leaving)`, ` MAINT (admin: disk swap)`, or nothing while ready.
fn state_of(i: &registry::Instance, admin: Option<&registry::Admin>) -> String {
    let state = crate::model::effective_state(i, admin);
    if state == registry::AdminState::Ready {
        return String::new();
    }
    let asked = admin.is_some_and(|a| a.state() == state);
    let why = match (asked, admin.and_then(|a| a.reason.as_deref())) {
        (true, Some(r)) => format!("admin: {r}"),
        (true, None) => "admin".to_string(),
        (false, _) => "leaving".to_string(),
    };
    format!(" {} ({why})", state.as_str().to_uppercase())
}

/// Why `renderer status` has no report: only the registry is required.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Connect(#[from] registry::etcd::ConnectError),
    #[error("listing {prefix}: {message}")]
    List { prefix: String, message: String },
}

/// Why the running renderer's `/status` could not be read (reported, not fatal).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Http(String),
    #[error("/status answered {0}")]
    Status(reqwest::StatusCode),
    #[error("bad /status answer: {0}")]
    Json(#[from] serde_json::Error),
}

/// Builds the report. Errors only when etcd cannot be read.
pub async fn report(args: &StatusArgs) -> Result<Report, StatusError> {
    let client = args.etcd.connect().await?;
    let (store, kvs) = crate::watch::list(&client, &args.prefix, args.etcd.dial_timeout)
        .await
        .map_err(|e| StatusError::List {
            prefix: args.prefix.clone(),
            message: registry::etcd::error_chain(&e),
        })?;
    let mut model = Model::new(&args.prefix);
    model.reset(
        kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        store.revision,
    );
    let _ = model.take_new_skips();

    let mut out = format!(
        "registry {} at revision {}: {} instance(s) in {} service(s)\n",
        args.etcd.endpoints_display(),
        store.revision,
        model.len(),
        model.services().len()
    );
    for (service, ids) in model.services() {
        out.push_str(&format!("  {service}\n"));
        for i in ids.values() {
            let admin = model.admin_of(service, &i.id);
            out.push_str(&format!(
                "    {:<20} {}:{} {}{}{}\n",
                i.id,
                i.address,
                i.port,
                weight_of(i, admin),
                if i.tags.is_empty() {
                    String::new()
                } else {
                    format!(" tags {}", i.tags.join(","))
                },
                state_of(i, admin),
            ));
        }
    }
    let orphans: Vec<String> = model
        .admin()
        .iter()
        .flat_map(|(service, ids)| {
            ids.iter()
                .filter(|(id, _)| {
                    !model
                        .services()
                        .get(service)
                        .is_some_and(|m| m.contains_key(*id))
                })
                .map(move |(id, a)| {
                    format!(
                        "  {}: {}{}\n",
                        registry::admin_key(&args.prefix, service, id),
                        a.state().as_str(),
                        a.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )
                })
        })
        .collect();
    if !orphans.is_empty() {
        out.push_str(&format!(
            "admin keys that match no registered instance (applied when it registers; `etcdctl del` to drop): {}\n{}",
            orphans.len(),
            orphans.concat()
        ));
    }
    if model.skipped().is_empty() {
        out.push_str("skipped records: none\n");
    } else {
        out.push_str(&format!("skipped records: {}\n", model.skipped().len()));
        for (key, s) in model.skipped() {
            out.push_str(&format!("  {key}: {} ({})\n", s.reason, s.message));
        }
    }
    let mut drift = false;
    match get_status(&args.renderer).await {
        Ok(doc) => {
            let rev = doc.revision;
            let last = &doc.last_apply;
            let age = crate::metrics::unix_now() - last.unix_time;
            out.push_str(&format!(
                "renderer {}: model at revision {rev}, last apply {:.0}s ago: {} via {}, {:.1} ms{}\n",
                args.renderer,
                age,
                if last.ok { "ok" } else { "FAILED" },
                last.how,
                last.took_ms,
                if last.errors.is_empty() {
                    String::new()
                } else {
                    format!("\n  errors: {}", last.errors.join("\n          "))
                }
            ));
            let served = served_by(&doc);
            let now = instances_of(&model);
            if served == now {
                out.push_str(&format!(
                    "served: exactly the registry ({} instance(s))\n",
                    served.len()
                ));
            } else {
                // Compare at the renderer's own revision: behind, or serving what the
                // registry never said at that revision (a lost event)?
                let at_rev =
                    crate::watch::list_at(&client, &args.prefix, Some(rev), args.etcd.dial_timeout)
                        .await;
                let verdict = match at_rev {
                    Ok((_, kvs)) => {
                        let mut then = Model::new(&args.prefix);
                        then.reset(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())), rev);
                        if instances_of(&then) == served {
                            "BEHIND: the renderer serves the registry as it was at its revision; the changes after it are not applied yet (in flight, held by --empty-hold, or applies failing: see last apply)".to_string()
                        } else {
                            drift = true;
                            format!("DRIFT: the renderer serves something the registry did not hold at the renderer's own revision {rev}: etcd did not deliver an event, or the renderer lost one (it repairs this at its next --resync; restart it to repair now)")
                        }
                    }
                    Err(e) => format!(
                        "cannot read the registry at the renderer's revision {rev} ({}): the differences may be in flight",
                        registry::etcd::error_chain(&e)
                    ),
                };
                let lines = differences(&served, &now);
                out.push_str(&format!(
                    "served: {} difference(s) from the registry at revision {}\n  {verdict}\n",
                    lines.len(),
                    store.revision
                ));
                for l in lines {
                    out.push_str(&format!("  {l}\n"));
                }
            }
        }
        Err(e) => out.push_str(&format!(
            "renderer {}: not reachable ({e})\n",
            args.renderer
        )),
    }
    Ok(Report { text: out, drift })
}

/// What `renderer status` found.
pub struct Report {
    pub text: String,
    /// The renderer serves something the registry did not hold at the renderer's revision.
    pub drift: bool,
}

/// `service/id` → `address:port` of every instance a model admits.
fn instances_of(model: &Model) -> BTreeMap<String, String> {
    model
        .services()
        .iter()
        .flat_map(|(service, ids)| {
            ids.values().map(move |i| {
                (
                    format!("{service}/{}", i.id),
                    format!("{}:{}", i.address, i.port),
                )
            })
        })
        .collect()
}

/// `service/id` → `address:port` of what the renderer's `/status` says it serves.
fn served_by(doc: &StatusDoc) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (service, list) in &doc.services {
        for line in list.iter() {
            if let Some((id, endpoint)) = line.split_once(' ') {
                out.insert(format!("{service}/{id}"), endpoint.to_string());
            }
        }
    }
    out
}

/// One line per instance that differs between what is served and the registry.
fn differences(
    served: &BTreeMap<String, String>,
    registry: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, endpoint) in registry {
        match served.get(name) {
            None => out.push(format!("in the registry, not served: {name} {endpoint}")),
            Some(s) if s != endpoint => out.push(format!(
                "served at another address: {name} serves {s}, the registry says {endpoint}"
            )),
            Some(_) => {}
        }
    }
    for (name, endpoint) in served {
        if !registry.contains_key(name) {
            out.push(format!("served, not in the registry: {name} {endpoint}"));
        }
    }
    out
}

async fn get_status(addr: &str) -> Result<StatusDoc, FetchError> {
    let base = if addr.contains("://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr.trim_end_matches('/'))
    };
    let http = |e: reqwest::Error| FetchError::Http(registry::etcd::error_chain(&e));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(http)?;
    let response = client
        .get(format!("{base}/status"))
        .send()
        .await
        .map_err(http)?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    let body = response.text().await.map_err(http)?;
    Ok(serde_json::from_str(&body)?)
}

#[cfg(test)]
mod served_tests {
    use super::*;

    fn put(m: &mut Model, s: &str, i: &str, port: u16) {
        let v = registry::Instance::new(s, i, "10.0.0.1", port).encode();
        m.put(&registry::instance_key("/services", s, i), v.as_bytes());
    }

    fn rebuilt(m: &Model) -> BTreeMap<String, Arc<Vec<String>>> {
        let mut full = ServedLists::default();
        full.update(m, &Changes::All);
        full.lists
    }

    #[test]
    fn a_change_formats_only_its_service() {
        let mut m = Model::new("/services");
        for s in 0..1000 {
            put(&mut m, &format!("svc{s:03}"), "a", 80);
        }
        let mut served = ServedLists::default();
        let booked = m.take_booked();
        served.update(&m, &booked);
        let before = served.lists.clone();
        put(&mut m, "svc500", "b", 81);
        m.delete(&registry::instance_key("/services", "svc001", "a"));
        let booked = m.take_booked();
        served.update(&m, &booked);
        assert_eq!(served.lists, rebuilt(&m));
        // Every other service's list is the very same allocation: not formatted again.
        let fresh: Vec<&String> = served
            .lists
            .iter()
            .filter(|(name, list)| !before.get(*name).is_some_and(|b| Arc::ptr_eq(b, list)))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(fresh, ["svc500"]);
        assert!(!served.lists.contains_key("svc001"));
    }

    proptest::proptest! {
        #[test]
        fn kept_lists_equal_rebuilt_lists(
            steps in proptest::collection::vec((0u8..4, 0u8..5, 0u16..3, proptest::bool::ANY), 1..50)
        ) {
            let mut m = Model::new("/services");
            let mut served = ServedLists::default();
            for (svc, id, port, is_put) in steps {
                let (s, i) = (format!("s{svc}"), format!("i{id}"));
                if is_put {
                    put(&mut m, &s, &i, 80 + port);
                } else {
                    m.delete(&registry::instance_key("/services", &s, &i));
                }
                let booked = m.take_booked();
        served.update(&m, &booked);
                proptest::prop_assert_eq!(&served.lists, &rebuilt(&m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_missing_extra_and_moved_instances() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let served = m(&[
            ("w/a", "10.0.0.1:80"),
            ("w/ghost", "10.0.0.9:80"),
            ("w/b", "10.0.0.2:80"),
        ]);
        let registry = m(&[
            ("w/a", "10.0.0.1:80"),
            ("w/b", "10.0.0.3:80"),
            ("w/new", "[::1]:80"),
        ]);
        assert_eq!(
            differences(&served, &registry),
            vec![
                "served at another address: w/b serves 10.0.0.2:80, the registry says 10.0.0.3:80",
                "in the registry, not served: w/new [::1]:80",
                "served, not in the registry: w/ghost 10.0.0.9:80",
            ]
        );
        assert!(differences(&served, &served).is_empty());
        let doc: StatusDoc = serde_json::from_str(
            r#"{"services": {"w": ["a 10.0.0.1:80", "ghost 10.0.0.9:80"]}, "unknown": 1}"#,
        )
        .unwrap();
        assert_eq!(
            served_by(&doc),
            m(&[("w/a", "10.0.0.1:80"), ("w/ghost", "10.0.0.9:80")])
        );
    }
}
