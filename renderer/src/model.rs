//! The in-memory registry: `service -> id -> Instance`, in `BTreeMap`s so that everything
//! derived from it (template data, rendered bytes) is deterministic. Records that fail
//! the contract are kept aside in `skipped` with the reason, never in the model.

use std::collections::{BTreeMap, BTreeSet};

use registry::{classify, parse_key, Admin, AdminState, Instance, KeyKind};
use serde_json::{json, Value};
use tracing::warn;

/// A record that was not admitted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Stable label (`json`, `invalid`, `too_large`, `schema`, `key_mismatch`, `key_layout`).
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// Registry contents as seen by the renderer.
#[derive(Debug, Default, Clone)]
pub struct Model {
    prefix: String,
    services: BTreeMap<String, BTreeMap<String, Instance>>,
    skipped: BTreeMap<String, Skipped>,
    /// Reasons of records newly skipped since the last [`Model::take_new_skips`].
    new_skips: Vec<&'static str>,
    /// Operators' controls (`<prefix>/_admin/<service>/<id>`), by service and id; kept
    /// whether or not the instance is registered.
    admin: BTreeMap<String, BTreeMap<String, Admin>>,
    /// Instances deleted while their record said `leaving` since the last
    /// [`Model::take_departed`]: stopped on purpose, not lost.
    departed: BTreeMap<String, BTreeSet<String>>,
    /// The etcd revision the model reflects.
    pub revision: i64,
    /// What changed since the last [`Model::take_changes`] (the template data's view).
    changes: Changes,
    /// The same, since the last [`Model::take_booked`] (the bookkeeping's view: the
    /// applied set, `/status`), so that a change to one service books only that service.
    booked: Changes,
    /// Template data without the root's flat `instances` list (no template reads it).
    no_flat_list: bool,
}

/// Instances added, changed or removed since the template data was last brought up to
/// date (see `crate::data`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Changes {
    /// Everything may have changed (a full listing replaced the model).
    #[default]
    All,
    /// These (service, id) pairs.
    Some(BTreeSet<(String, String)>),
}

impl Changes {
    fn insert(&mut self, service: &str, id: &str) {
        if let Changes::Some(set) = self {
            set.insert((service.to_string(), id.to_string()));
        }
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: Changes) {
        match (&mut *self, other) {
            (Changes::All, _) => {}
            (_, Changes::All) => *self = Changes::All,
            (Changes::Some(a), Changes::Some(b)) => a.extend(b),
        }
    }

    /// The services these changes touch; `None` = every service.
    pub fn services(&self) -> Option<BTreeSet<String>> {
        match self {
            Changes::All => None,
            Changes::Some(set) => Some(set.iter().map(|(s, _)| s.clone()).collect()),
        }
    }
}

impl Model {
    /// An empty model for keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Model {
            prefix: prefix.to_string(),
            ..Default::default()
        }
    }

    /// Replaces the whole content (a full listing). Returns true if the admitted
    /// instances changed.
    pub fn reset<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        revision: i64,
    ) -> bool {
        let old_services = std::mem::take(&mut self.services);
        let old_admin = std::mem::take(&mut self.admin);
        let old_skipped = std::mem::take(&mut self.skipped);
        for (key, value) in kvs {
            self.admit(key, value, old_skipped.get(key));
        }
        self.revision = revision;
        for (service, ids) in &mut self.departed {
            if let Some(now) = self.services.get(service) {
                ids.retain(|id| !now.contains_key(id));
            }
        }
        let changed = self.services != old_services || self.admin != old_admin;
        if changed {
            self.changes = Changes::All;
            self.booked = Changes::All;
        }
        changed
    }

    /// Applies a put. Returns true if the admitted instances changed.
    pub fn put(&mut self, key: &str, value: &[u8]) -> bool {
        if let KeyKind::Admin { service, id } = classify(&self.prefix, key) {
            let before = self.admin_of(service, id).cloned();
            let previous_skip = self.skipped.remove(key);
            self.remove_admin(service, id);
            self.admit(key, value, previous_skip.as_ref());
            let changed = self.admin_of(service, id) != before.as_ref();
            return changed && self.admin_changed(service, id);
        }
        if let Some((service, id)) = parse_key(&self.prefix, key) {
            if let Some(ids) = self.departed.get_mut(service) {
                ids.remove(id);
            }
        }
        let before = self.lookup(key).cloned();
        let previous_skip = self.skipped.remove(key);
        self.remove(key);
        self.admit(key, value, previous_skip.as_ref());
        let changed = self.lookup(key) != before.as_ref();
        if changed {
            self.note(key);
        }
        changed
    }

    /// Applies a delete. Returns true if an admitted instance went away.
    pub fn delete(&mut self, key: &str) -> bool {
        self.skipped.remove(key);
        if let KeyKind::Admin { service, id } = classify(&self.prefix, key) {
            return self.remove_admin(service, id) && self.admin_changed(service, id);
        }
        if let Some(inst) = self.lookup(key).filter(|i| i.leaving()) {
            let (service, id) = (inst.service.clone(), inst.id.clone());
            self.departed.entry(service).or_default().insert(id);
        }
        let removed = self.remove(key);
        if removed {
            self.note(key);
        }
        removed
    }

    /// An admin key of (service, id) changed: true (and noted for the template data) when
    /// the instance is registered, so its server changes.
    fn admin_changed(&mut self, service: &str, id: &str) -> bool {
        let registered = self
            .services
            .get(service)
            .is_some_and(|m| m.contains_key(id));
        if registered {
            self.changes.insert(service, id);
            self.booked.insert(service, id);
        }
        registered
    }

    fn remove_admin(&mut self, service: &str, id: &str) -> bool {
        let Some(ids) = self.admin.get_mut(service) else {
            return false;
        };
        let removed = ids.remove(id).is_some();
        if ids.is_empty() {
            self.admin.remove(service);
        }
        removed
    }

    /// The operator's controls for (service, id), if any.
    pub fn admin_of(&self, service: &str, id: &str) -> Option<&Admin> {
        self.admin.get(service)?.get(id)
    }

    /// Every admin key's value, by service and id (registered instances or not).
    pub fn admin(&self) -> &BTreeMap<String, BTreeMap<String, Admin>> {
        &self.admin
    }

    /// Instances deleted while marked `leaving` since the last call, by service: their
    /// departure was deliberate (a graceful stop), not a lost lease.
    pub fn departed(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.departed
    }

    /// Forgets [`Model::departed`] (once a config without them is applied).
    pub fn take_departed(&mut self) -> BTreeMap<String, BTreeSet<String>> {
        std::mem::take(&mut self.departed)
    }

    fn note(&mut self, key: &str) {
        if let Some((service, id)) = parse_key(&self.prefix, key) {
            self.changes.insert(service, id);
            self.booked.insert(service, id);
        }
    }

    /// What changed since the last call (everything, the first time).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::replace(&mut self.changes, Changes::Some(BTreeSet::new()))
    }

    /// What changed since the last call, for the bookkeeping (everything, the first time).
    pub fn take_booked(&mut self) -> Changes {
        std::mem::replace(&mut self.booked, Changes::Some(BTreeSet::new()))
    }

    fn lookup(&self, key: &str) -> Option<&Instance> {
        let (service, id) = parse_key(&self.prefix, key)?;
        self.services.get(service)?.get(id)
    }

    fn remove(&mut self, key: &str) -> bool {
        let Some((service, id)) = parse_key(&self.prefix, key) else {
            return false;
        };
        let Some(instances) = self.services.get_mut(service) else {
            return false;
        };
        let removed = instances.remove(id).is_some();
        if instances.is_empty() {
            self.services.remove(service);
        }
        removed
    }

    /// Decodes and admits one record, or records why it was skipped (warning once per
    /// distinct problem, not on every resync).
    fn admit(&mut self, key: &str, value: &[u8], previous: Option<&Skipped>) {
        if let KeyKind::Admin { service, id } = classify(&self.prefix, key) {
            let valid = registry::validate::name("service", service)
                .and_then(|()| registry::validate::name("id", id))
                .map_err(registry::admin::AdminError::from)
                .and_then(|()| Admin::decode(value));
            match valid {
                Ok(admin) => {
                    self.admin
                        .entry(service.to_string())
                        .or_default()
                        .insert(id.to_string(), admin);
                }
                Err(e) => self.skip(
                    key,
                    Skipped {
                        reason: e.reason(),
                        message: e.to_string(),
                    },
                    previous,
                ),
            }
            return;
        }
        let decoded = match parse_key(&self.prefix, key) {
            None => Err(Skipped {
                reason: "key_layout",
                message: "key is not <prefix>/<service>/<id>".into(),
            }),
            Some((service, id)) => Instance::decode(service, id, value).map_err(|e| Skipped {
                reason: e.reason(),
                message: e.to_string(),
            }),
        };
        match decoded {
            Ok(inst) => {
                self.services
                    .entry(inst.service.clone())
                    .or_default()
                    .insert(inst.id.clone(), inst);
            }
            Err(skip) => self.skip(key, skip, previous),
        }
    }

    /// Keeps `key` aside as skipped, warning unless it was skipped for the same reason.
    fn skip(&mut self, key: &str, skip: Skipped, previous: Option<&Skipped>) {
        if previous != Some(&skip) {
            self.new_skips.push(skip.reason);
            warn!(key = %truncate_key(key), reason = skip.reason, error = %skip.message, "skipping invalid registry record");
        }
        self.skipped.insert(key.to_string(), skip);
    }

    /// Reasons of the records skipped since the last call (each distinct problem once).
    pub fn take_new_skips(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.new_skips)
    }

    /// Records skipped, by key.
    pub fn skipped(&self) -> &BTreeMap<String, Skipped> {
        &self.skipped
    }

    /// Admitted instances by service.
    pub fn services(&self) -> &BTreeMap<String, BTreeMap<String, Instance>> {
        &self.services
    }

    /// Number of admitted instances.
    pub fn len(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum()
    }

    /// True when no instance is admitted.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The data given to templates:
    /// `{services: {name: [instance…]}, instances: [instance…], vars: {…}, revision}`;
    /// instances sorted by id within a service, services by name.
    pub fn template_data(&self, vars: &BTreeMap<String, String>) -> Value {
        self.template_data_with(vars, &BTreeSet::new(), usize::MAX)
            .0
    }

    /// [`template_data`](Self::template_data) without the instances whose keys are in
    /// `exclude` (quarantined) and with at most `max_per_service` instances per service
    /// (the lowest ids). Also returns how many instances the cap left out.
    pub fn template_data_with(
        &self,
        vars: &BTreeMap<String, String>,
        exclude: &BTreeSet<String>,
        max_per_service: usize,
    ) -> (Value, usize) {
        self.template_data_stored(vars, exclude, max_per_service, &|_, list| {
            Value::Array(list)
        })
    }

    /// [`template_data_with`](Self::template_data_with), each service's list stored as
    /// `store(name, list)` makes it (the renderer's template data freezes most of them).
    pub fn template_data_stored(
        &self,
        vars: &BTreeMap<String, String>,
        exclude: &BTreeSet<String>,
        max_per_service: usize,
        store: &dyn Fn(&str, Vec<Value>) -> Value,
    ) -> (Value, usize) {
        let mut cut = 0;
        let mut kept: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        let mut ids: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (name, instances) in &self.services {
            let numbers = server_ids(instances.keys());
            let list: Vec<(&Instance, u32)> = instances
                .values()
                .zip(numbers)
                .filter(|(i, _)| exclude.is_empty() || !exclude.contains(&self.key_of(i)))
                .collect();
            cut += list.len().saturating_sub(max_per_service);
            let (list, numbers): (Vec<&Instance>, Vec<u32>) =
                list.into_iter().take(max_per_service).unzip();
            if !list.is_empty() {
                kept.insert(name.as_str(), list);
                ids.insert(name.as_str(), numbers);
            }
        }
        // Each instance's object is built once; `instances` gets copies (cheaper than
        // building them again: ~2x at 10 000 instances). One service at a time, so that
        // stored smaller, the objects of all of them never exist at once.
        let mut instances: Option<Vec<Value>> = (!self.no_flat_list).then(Vec::new);
        let services: serde_json::Map<String, Value> = kept
            .iter()
            .map(|(name, list)| {
                let list: Vec<Value> = list
                    .iter()
                    .zip(&ids[name])
                    .map(|(i, n)| instance_json(i, *n, self.admin_of(&i.service, &i.id)))
                    .collect();
                if let Some(all) = &mut instances {
                    all.extend(list.iter().cloned());
                }
                (name.to_string(), store(name, list))
            })
            .collect();
        (self.wrap(services, instances, vars), cut)
    }

    /// Whether the template data holds the root's flat `instances` list (a second copy of
    /// every instance: ~200 MiB at 100 000): only when a template may read it
    /// ([`crate::render::Renderer::reads_flat_instances`]). On by default.
    pub fn set_flat_list(&mut self, wanted: bool) {
        self.no_flat_list = !wanted;
    }

    fn wrap(
        &self,
        services: serde_json::Map<String, Value>,
        instances: Option<Vec<Value>>,
        vars: &BTreeMap<String, String>,
    ) -> Value {
        // Moved in, not through json!: the macro serialises its arguments by reference,
        // which deep-copies every instance object again (~13 ms of ~20 at 10 000).
        let mut root = serde_json::Map::new();
        root.insert("services".into(), Value::Object(services));
        if let Some(instances) = instances {
            root.insert("instances".into(), Value::Array(instances));
        }
        root.insert("vars".into(), json!(vars));
        root.insert("revision".into(), json!(self.revision));
        Value::Object(root)
    }
}

impl Model {
    /// The key an instance is stored under.
    pub fn key_of(&self, i: &Instance) -> String {
        registry::instance_key(&self.prefix, &i.service, &i.id)
    }

    /// The admitted instance stored under `key`.
    pub fn get(&self, key: &str) -> Option<&Instance> {
        self.lookup(key)
    }
}

/// Stable numeric ids for the instances of one service (`server_id` in template data, for
/// HAProxy's `id` server keyword), given their ids in sorted order: a hash of the id in
/// 1..2^31-1, and on a collision the next free number (the first id in sorted order keeps
/// the hashed one). Stable while the instance exists and the same on every load balancer,
/// so a server keeps its number across reloads and runtime changes. HAProxy before 3.1
/// checks server names for duplicates pairwise at load unless servers have an `id`.
pub(crate) fn server_ids<'a>(ids: impl Iterator<Item = &'a String>) -> Vec<u32> {
    const RANGE: u64 = (1 << 31) - 2;
    let mut used = std::collections::HashSet::new();
    ids.map(|id| {
        let mut n = (xxhash_rust::xxh64::xxh64(id.as_bytes(), 0) % RANGE) as u32 + 1;
        while !used.insert(n) {
            n = if u64::from(n) >= RANGE { 1 } else { n + 1 };
        }
        n
    })
    .collect()
}

/// The state an instance is served in: the operator's (`maint` > `drain` > `ready`), and
/// `drain` at least while its record says `leaving`.
pub fn effective_state(i: &Instance, admin: Option<&Admin>) -> AdminState {
    let asked = admin.map_or(AdminState::Ready, Admin::state);
    match (asked, i.leaving()) {
        (AdminState::Ready, true) => AdminState::Drain,
        (s, _) => s,
    }
}

/// One instance as templates see it: its record, with `weight` the one to serve it with —
/// 0 while it drains, else the operator's when an admin key sets one, else the record's
/// (`record_weight`) —, `state` (`ready`, `drain`, `maint`: see [`effective_state`]),
/// `leaving`, and `admin_reason` (`""` if none).
pub(crate) fn instance_json(i: &Instance, server_id: u32, admin: Option<&Admin>) -> Value {
    let state = effective_state(i, admin);
    let weight = match state {
        AdminState::Drain => 0,
        _ => admin.and_then(|a| a.weight).unwrap_or(i.weight),
    };
    json!({
        "server_id": server_id,
        "id": i.id,
        "service": i.service,
        "address": i.address,
        "port": i.port,
        "tags": i.tags,
        "meta": i.meta,
        "weight": weight,
        "record_weight": i.weight,
        "state": state.as_str(),
        "leaving": i.leaving(),
        "admin_reason": admin.and_then(|a| a.reason.as_deref()).unwrap_or(""),
    })
}

/// Keys come from the store and may be hostile too: bound what reaches the log.
fn truncate_key(key: &str) -> String {
    key.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(service: &str, id: &str, port: u16) -> String {
        Instance::new(service, id, "10.0.0.1", port).encode()
    }

    #[test]
    fn puts_deletes_and_change_detection() {
        let mut m = Model::new("/services");
        assert!(m.put("/services/web/b", rec("web", "b", 80).as_bytes()));
        assert!(m.put("/services/web/a", rec("web", "a", 80).as_bytes()));
        assert!(
            !m.put("/services/web/a", rec("web", "a", 80).as_bytes()),
            "identical re-put"
        );
        assert!(m.put("/services/web/a", rec("web", "a", 81).as_bytes()));
        let data = m.template_data(&BTreeMap::new());
        let ids: Vec<_> = data["services"]["web"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].clone())
            .collect();
        assert_eq!(ids, vec!["a", "b"], "sorted by id");
        assert_eq!(data["instances"].as_array().unwrap().len(), 2);
        assert!(m.delete("/services/web/a"));
        assert!(!m.delete("/services/web/a"));
        assert!(m.delete("/services/web/b"));
        assert!(m.is_empty());
    }

    #[test]
    fn admin_keys_steer_instances_and_outlive_them() {
        let mut m = Model::new("/services");
        let state = |m: &Model| {
            let d = m.template_data(&BTreeMap::new());
            let i = &d["services"]["web"][0];
            (
                i["state"].clone(),
                i["weight"].clone(),
                i["admin_reason"].clone(),
            )
        };
        // An admin key for an instance not registered: kept, changes nothing served.
        assert!(!m.put(
            "/services/_admin/web/a",
            br#"{"state":"maint","reason":"disk swap"}"#
        ));
        assert_eq!(m.admin()["web"]["a"].state(), AdminState::Maint);
        assert!(m.put("/services/web/a", rec("web", "a", 80).as_bytes()));
        assert_eq!(state(&m), (json!("maint"), json!(100), json!("disk swap")));
        // The instance re-registers (a restart): still in maintenance.
        assert!(m.delete("/services/web/a"));
        assert!(m.put("/services/web/a", rec("web", "a", 80).as_bytes()));
        assert_eq!(state(&m).0, json!("maint"));
        assert!(m.put("/services/_admin/web/a", br#"{"state":"drain","weight":7}"#));
        assert_eq!(state(&m), (json!("drain"), json!(0), json!("")));
        assert!(m.put("/services/_admin/web/a", br#"{"state":"ready","weight":7}"#));
        assert_eq!(state(&m), (json!("ready"), json!(7), json!("")));
        assert!(m.put("/services/_admin/web/a", br#"{"state":"drain","weight":7}"#));
        assert!(
            !m.put("/services/_admin/web/a", br#"{"weight":7,"state":"drain"}"#),
            "same controls"
        );
        // Deleting the key gives the instance back to its record.
        assert!(m.delete("/services/_admin/web/a"));
        assert_eq!(state(&m), (json!("ready"), json!(100), json!("")));
        // A hostile admin value is skipped, never served.
        assert!(!m.put("/services/_admin/web/a", br#"{"state":"up; evil"}"#));
        assert_eq!(m.skipped()["/services/_admin/web/a"].reason, "json");
        assert!(!m.put("/services/_admin/-x/a", br#"{}"#));
        assert_eq!(m.skipped()["/services/_admin/-x/a"].reason, "invalid");
        assert_eq!(state(&m).0, json!("ready"));
        // A full listing keeps admin keys apart from instances.
        let rec_a = rec("web", "a", 80);
        let kvs = [
            ("/services/web/a", rec_a.as_bytes()),
            ("/services/_admin/web/a", &br#"{"state":"maint"}"#[..]),
        ];
        assert!(m.reset(kvs, 9));
        assert_eq!(m.len(), 1);
        assert_eq!(state(&m).0, json!("maint"));
    }

    #[test]
    fn a_leaving_instance_is_drained_and_its_delete_is_deliberate() {
        let mut m = Model::new("/services");
        m.put("/services/web/a", rec("web", "a", 80).as_bytes());
        m.put("/services/web/b", rec("web", "b", 80).as_bytes());
        let mut leaving = Instance::new("web", "a", "10.0.0.1", 80);
        leaving.state = Some(registry::RecordState::Leaving);
        assert!(m.put("/services/web/a", leaving.encode().as_bytes()));
        let d = m.template_data(&BTreeMap::new());
        assert_eq!(d["services"]["web"][0]["state"], "drain");
        assert_eq!(d["services"]["web"][0]["leaving"], true);
        m.delete("/services/web/a");
        m.delete("/services/web/b");
        assert_eq!(
            m.departed()["web"].iter().collect::<Vec<_>>(),
            ["a"],
            "b left without the mark: lost, not departed"
        );
        // Registered again: no longer departed.
        m.put("/services/web/a", rec("web", "a", 80).as_bytes());
        assert!(m.departed()["web"].is_empty());
        assert!(m.take_departed().contains_key("web") && m.departed().is_empty());
    }

    #[test]
    fn invalid_records_are_skipped_and_replace_valid_ones() {
        let mut m = Model::new("/services");
        m.put("/services/web/a", rec("web", "a", 80).as_bytes());
        // A valid record overwritten by garbage leaves the model.
        assert!(m.put("/services/web/a", b"{not json"));
        assert!(m.is_empty());
        assert_eq!(m.skipped()["/services/web/a"].reason, "json");
        assert!(!m.put("/services/web/x/y", b"{}"));
        assert_eq!(m.skipped()["/services/web/x/y"].reason, "key_layout");
        let evil = r#"{"id":"e","service":"web","address":"1.2.3.4\n    server evil 6.6.6.6:80","port":80}"#;
        assert!(!m.put("/services/web/e", evil.as_bytes()));
        assert_eq!(m.skipped()["/services/web/e"].reason, "invalid");
        // Fixing the record admits it and clears the skip.
        assert!(m.put("/services/web/e", rec("web", "e", 80).as_bytes()));
        assert!(!m.skipped().contains_key("/services/web/e"));
    }

    #[test]
    fn data_excludes_quarantined_and_caps_per_service() {
        let mut m = Model::new("/services");
        for id in ["a", "b", "c", "d"] {
            m.put(
                &format!("/services/web/{id}"),
                rec("web", id, 80).as_bytes(),
            );
        }
        m.put("/services/api/x", rec("api", "x", 80).as_bytes());
        let exclude: BTreeSet<String> = ["/services/web/b".to_string()].into();
        let (data, cut) = m.template_data_with(&BTreeMap::new(), &exclude, 2);
        let ids: Vec<_> = data["services"]["web"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].clone())
            .collect();
        assert_eq!(
            ids,
            vec!["a", "c"],
            "b quarantined, d over the cap (lowest ids kept)"
        );
        assert_eq!(cut, 1);
        assert_eq!(data["instances"].as_array().unwrap().len(), 3);
        assert_eq!(
            crate::guard::culprit(&m, "server c 10.0.0.1:80 check bogus", &BTreeSet::new())
                .as_deref(),
            Some("/services/web/c")
        );
        assert_eq!(
            crate::guard::culprit(&m, "unrelated line", &BTreeSet::new()),
            None
        );
    }

    #[test]
    fn reset_reports_changes_only_when_content_differs() {
        let mut m = Model::new("/services");
        let a = rec("web", "a", 80);
        let kvs = vec![("/services/web/a", a.as_bytes())];
        assert!(m.reset(kvs.clone(), 5));
        assert!(!m.reset(kvs, 9), "same content at a new revision");
        assert_eq!(m.revision, 9);
        assert!(m.reset(Vec::new(), 10));
    }

    #[test]
    fn server_ids_are_stable_distinct_and_in_range() {
        let names: Vec<String> = (0..20_000).map(|i| format!("n{i:05}")).collect();
        let all = server_ids(names.iter());
        let distinct: BTreeSet<u32> = all.iter().copied().collect();
        assert_eq!(distinct.len(), names.len());
        assert!(all.iter().all(|n| (1..(1 << 31) - 1).contains(n)));
        // Another instance leaving does not renumber the rest (no collision here).
        let fewer = server_ids(names.iter().skip(1));
        assert_eq!(&all[1..], &fewer[..]);
        // A collision: the same name twice gets the next number.
        let twice = ["a".to_string(), "a".to_string()];
        let ids = server_ids(twice.iter());
        assert_eq!(ids[1], ids[0] + 1);
    }
}
