//! The template data, kept up to date instead of rebuilt: a join at 10 000 instances
//! patches one object into its service's list (and into `instances`) where a rebuild made
//! 10 000 objects and dropped 10 000 others (~8 of a 10 000-instance apply's milliseconds).
//! Whatever the patching cannot express simply — a full listing, quarantined records, a
//! service over `--max-instances-per-service` — rebuilds, exactly as
//! [`Model::template_data_with`] does.
//!
//! When the templates allow it ([`Renderer::freezes_services`]), a service's list is kept
//! **frozen** — its JSON text, [`freeze_service`] — and thawed only where it renders anew:
//! at 100 000 instances the objects took ~216 MiB, their text ~20. Services over
//! [`FREEZE_AT_MOST`] instances, and those the `instances` helper asks for by name at every
//! render, stay objects.

use std::collections::{BTreeMap, BTreeSet};

use handlebars::Context;
use serde_json::Value;

use crate::model::{instance_json, server_ids, Changes, Model};
use crate::render::{freeze_service, thaw_service, Renderer};

/// Services of up to this many instances are kept frozen: a change to one thaws it to
/// render it (~1 µs an instance), where a larger one would cost more than it saves.
pub const FREEZE_AT_MOST: usize = 500;

/// The rendering context of the last apply, and how it was built.
#[derive(Default)]
pub struct TemplateData {
    ctx: Option<Context>,
    /// The exclusions it was built with (patching needs none).
    excluded: BTreeSet<String>,
    /// Instances the cap left out when it was built (patching needs none).
    cut: usize,
    /// Services the `instances` helper thawed: it reads them at every render, so they
    /// stay thawed.
    hot: BTreeSet<String>,
}

impl TemplateData {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the context up to date with `model`, without the instances in `exclude` and
    /// with at most `cap` per service; returns it with the number the cap left out.
    pub fn update(
        &mut self,
        renderer: &Renderer,
        model: &mut Model,
        vars: &BTreeMap<String, String>,
        exclude: &BTreeSet<String>,
        cap: usize,
    ) -> (&Context, usize) {
        let thawed = renderer.take_thawed();
        if let Some(ctx) = self.ctx.as_mut() {
            for name in &thawed {
                thaw_in_place(ctx, name);
            }
        }
        self.hot.extend(thawed);
        let (freezes, hot) = (renderer.freezes_services(), &self.hot);
        let store = |name: &str, list: Vec<Value>| -> Value {
            if freezes && list.len() <= FREEZE_AT_MOST && !hot.contains(name) {
                freeze_service(&list)
            } else {
                Value::Array(list)
            }
        };
        let changes = model.take_changes();
        let patchable = self.ctx.is_some()
            && exclude.is_empty()
            && self.excluded.is_empty()
            && self.cut == 0
            && model.services().values().all(|m| m.len() <= cap);
        match (changes, patchable, self.ctx.as_mut()) {
            (Changes::Some(set), true, Some(ctx)) => {
                patch(ctx, renderer, model, &set, &store);
                if let Some(root) = ctx.data_mut().as_object_mut() {
                    root.insert("revision".into(), Value::from(model.revision));
                }
                let services: BTreeSet<&str> = set.iter().map(|(s, _)| s.as_str()).collect();
                renderer.services_changed(ctx, services.into_iter());
            }
            _ => {
                let (data, cut) = model.template_data_stored(vars, exclude, cap, &store);
                let ctx = self.ctx.insert(renderer.context(data));
                renderer.services_rebuilt(ctx);
                self.excluded = exclude.clone();
                self.cut = cut;
            }
        }
        let ctx = self.ctx.get_or_insert_with(|| Context::from(Value::Null));
        (ctx, self.cut)
    }
}

/// How many instances service `name` has in `ctx` (frozen or not).
pub fn instances_in(ctx: &Context, name: &str) -> usize {
    match &ctx.data()["services"][name] {
        Value::Array(list) => list.len(),
        Value::String(frozen) => thaw_service(frozen)
            .ok()
            .as_ref()
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
        _ => 0,
    }
}

/// Makes service `name` of `ctx` an array again if it is frozen.
fn thaw_in_place(ctx: &mut Context, name: &str) {
    if let Some(list) = ctx
        .data_mut()
        .get_mut("services")
        .and_then(|s| s.get_mut(name))
    {
        if let Value::String(frozen) = list {
            if let Ok(thawed) = thaw_service(frozen) {
                *list = thawed;
            }
        }
    }
}

/// The `id` field of an instance object.
fn id_of(v: &Value) -> &str {
    v.get("id").and_then(Value::as_str).unwrap_or("")
}

fn service_of(v: &Value) -> &str {
    v.get("service").and_then(Value::as_str).unwrap_or("")
}

/// Applies the changed (service, id) pairs of `model` to `ctx`'s `services` and
/// `instances` lists (both kept sorted: by id, and by service then id).
fn patch(
    ctx: &mut Context,
    renderer: &Renderer,
    model: &Model,
    changed: &BTreeSet<(String, String)>,
    store: &dyn Fn(&str, Vec<Value>) -> Value,
) {
    let Some(root) = ctx.data_mut().as_object_mut() else {
        return;
    };
    let mut by_service: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (service, id) in changed {
        by_service.entry(service).or_default().push(id);
    }
    for (service, ids) in by_service {
        let instances = model.services().get(service);
        // Numbers for the service as it is now; a collision can move one besides the
        // changed instance, so they are compared for all of the service's instances.
        let numbers: Vec<u32> = instances.map(|m| server_ids(m.keys())).unwrap_or_default();
        let current = |id: &str| instances.and_then(|m| m.get(id));

        if let Some(Value::Object(services)) = root.get_mut("services") {
            let entry = services
                .entry(service.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::String(frozen) = entry {
                *entry = thaw_service(frozen).unwrap_or_else(|_| Value::Array(Vec::new()));
            }
            if let Value::Array(list) = entry {
                for id in &ids {
                    let at = list.binary_search_by(|v| id_of(v).cmp(id));
                    let admin = model.admin_of(service, id);
                    upsert(list, at, current(id).map(|i| instance_json(i, 0, admin)));
                }
                renumber(list, &numbers);
                if list.is_empty() && !renderer.named_services().contains(service) {
                    services.remove(service);
                } else {
                    let list = std::mem::take(list);
                    *entry = store(service, list);
                }
            }
        }
        if let Some(Value::Array(all)) = root.get_mut("instances") {
            for id in &ids {
                let at = all.binary_search_by(|v| (service_of(v), id_of(v)).cmp(&(service, id)));
                let admin = model.admin_of(service, id);
                upsert(all, at, current(id).map(|i| instance_json(i, 0, admin)));
            }
            let start = all.partition_point(|v| service_of(v) < service);
            let end = all.partition_point(|v| service_of(v) <= service);
            renumber(&mut all[start..end], &numbers);
        }
    }
}

/// Puts `new` at the position a binary search found (`Ok`: there, `Err`: to insert), or
/// removes what is there when `new` is `None`.
fn upsert(list: &mut Vec<Value>, at: Result<usize, usize>, new: Option<Value>) {
    match (at, new) {
        (Ok(i), Some(v)) => list[i] = v,
        (Err(i), Some(v)) => list.insert(i, v),
        (Ok(i), None) => {
            list.remove(i);
        }
        (Err(_), None) => {}
    }
}

/// Sets `server_id` of each object of `list` (one service's instances, sorted by id) to
/// `numbers` (the service's numbers, in the same order).
fn renumber(list: &mut [Value], numbers: &[u32]) {
    for (v, n) in list.iter_mut().zip(numbers) {
        if let Some(obj) = v.as_object_mut() {
            if obj.get("server_id").and_then(Value::as_u64) != Some(u64::from(*n)) {
                obj.insert("server_id".into(), Value::from(*n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(service: &str, id: &str, port: u16) -> String {
        registry::Instance::new(service, id, "10.0.0.1", port).encode()
    }

    /// One step of a random sequence: a put (or a delete) and the next revision.
    fn change(model: &mut Model, service: &str, id: &str, port: u16, put: bool) {
        let key = registry::instance_key("/services", service, id);
        if put {
            model.put(&key, record(service, id, port).as_bytes());
        } else {
            model.delete(&key);
        }
        model.revision += 1;
    }

    proptest! {
        /// Patched data equals rebuilt data after any sequence of puts and deletes.
        #[test]
        fn patching_equals_rebuilding(
            steps in proptest::collection::vec((0u8..3, 0u8..12, 0u16..3, any::<bool>()), 1..60)
        ) {
            let mut renderer = Renderer::new();
            renderer.add("t", "{{#each services.s0}}{{id}}{{/each}}").unwrap();
            let vars = BTreeMap::from([("k".to_string(), "v".to_string())]);
            let none = BTreeSet::new();
            let mut model = Model::new("/services");
            let mut td = TemplateData::new();
            for (svc, id, port, put) in steps {
                change(&mut model, &format!("s{svc}"), &format!("i{id:02}"), 1000 + port, put);
                let patched = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0.data().clone();
                let rebuilt = renderer.context(model.template_data(&vars)).data().clone();
                prop_assert_eq!(patched, rebuilt);
            }
        }
    }

    /// A template with a backend per service, as templates/examples/multi-service.cfg.hbs.
    const PER_SERVICE: &str = "{{#each services}}backend {{@key}}\n{{#each this}}    server {{id}} {{address}}:{{port}} id {{server_id}}\n{{/each}}{{/each}}";

    proptest! {
        /// Rendering the patched, stamped context gives what a cold render of a context
        /// built from scratch gives, after any sequence of puts and deletes.
        #[test]
        fn stamped_renders_equal_cold_renders(
            steps in proptest::collection::vec((0u8..4, 0u8..6, 0u16..3, any::<bool>()), 1..40)
        ) {
            let mut warm = Renderer::new();
            warm.add("t", PER_SERVICE).unwrap();
            let vars = BTreeMap::new();
            let none = BTreeSet::new();
            let mut model = Model::new("/services");
            let mut td = TemplateData::new();
            for (svc, id, port, put) in steps {
                change(&mut model, &format!("s{svc}"), &format!("i{id}"), 1000 + port, put);
                let ctx = td.update(&warm, &mut model, &vars, &none, usize::MAX).0;
                let got = warm.render_with("t", ctx).unwrap();
                let mut cold = Renderer::new();
                cold.add("t", PER_SERVICE).unwrap();
                let want = cold.render_with("t", &cold.context(model.template_data(&vars))).unwrap();
                prop_assert_eq!(String::from_utf8(got).unwrap(), String::from_utf8(want).unwrap());
            }
        }
    }

    /// `ctx`'s data with every frozen service thawed.
    fn thawed(ctx: &Context) -> Value {
        let mut data = ctx.data().clone();
        if let Some(Value::Object(services)) = data.get_mut("services") {
            for list in services.values_mut() {
                if let Value::String(frozen) = list {
                    *list = thaw_service(frozen).unwrap();
                }
            }
        }
        data
    }

    fn frozen(ctx: &Context) -> BTreeSet<String> {
        ctx.data()["services"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v.is_string())
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    proptest! {
        /// Frozen or not, the patched data holds what data rebuilt from scratch holds; and
        /// with a template that allows it, every service is frozen between renders.
        #[test]
        fn frozen_data_thaws_to_the_rebuilt_data(
            steps in proptest::collection::vec((0u8..3, 0u8..12, 0u16..3, any::<bool>()), 1..60)
        ) {
            let mut renderer = Renderer::new();
            renderer.add("t", PER_SERVICE).unwrap();
            prop_assert!(renderer.freezes_services());
            let vars = BTreeMap::new();
            let none = BTreeSet::new();
            let mut model = Model::new("/services");
            let mut td = TemplateData::new();
            for (svc, id, port, put) in steps {
                change(&mut model, &format!("s{svc}"), &format!("i{id:02}"), 1000 + port, put);
                let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
                let rebuilt = renderer.context(model.template_data(&vars)).data().clone();
                prop_assert_eq!(thawed(ctx), rebuilt);
                let all: BTreeSet<String> = model.services().keys().cloned().collect();
                prop_assert_eq!(frozen(ctx), all);
            }
        }
    }

    #[test]
    fn services_the_templates_read_otherwise_or_by_name_stay_thawed() {
        let vars = BTreeMap::new();
        let none = BTreeSet::new();
        let mut model = Model::new("/services");
        for (s, n) in [("a", 3), ("b", 2), ("big", FREEZE_AT_MOST + 1)] {
            for i in 0..n {
                let id = format!("i{i:04}");
                model.put(
                    &registry::instance_key("/services", s, &id),
                    record(s, &id, 80).as_bytes(),
                );
            }
        }
        let hot = "{{#each services}}{{@key}}={{len this}};{{/each}}{{#each (instances \"b\")}}{{id}},{{/each}}";
        for (template, first, then) in [
            // `b` is asked for by name: thawed once it was, `big` is too big.
            (hot, vec!["a", "b"], vec!["a"]),
            // Not cacheable (`@root`): nothing frozen.
            (
                "{{#each services}}{{@root.revision}}{{/each}}",
                vec![],
                vec![],
            ),
            ("{{#each services.a}}{{id}}{{/each}}", vec![], vec![]),
        ] {
            let mut renderer = Renderer::new();
            renderer.add("t", template).unwrap();
            let mut td = TemplateData::new();
            let mut model = model.clone();
            let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
            assert_eq!(
                frozen(ctx),
                first.iter().map(|s| s.to_string()).collect(),
                "{template}"
            );
            let before = renderer.render_with("t", ctx).unwrap();
            let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
            assert_eq!(
                frozen(ctx),
                then.iter().map(|s| s.to_string()).collect(),
                "{template}"
            );
            assert_eq!(
                renderer.render_with("t", ctx).unwrap(),
                before,
                "{template}"
            );
            if template == hot {
                let text = String::from_utf8(before).unwrap();
                assert_eq!(
                    text,
                    format!("a=3;b=2;big={};i0000,i0001,", FREEZE_AT_MOST + 1)
                );
            }
        }
    }

    #[test]
    fn a_join_renders_only_its_own_service() {
        let mut renderer = Renderer::new();
        renderer.add("t", PER_SERVICE).unwrap();
        let vars = BTreeMap::new();
        let none = BTreeSet::new();
        let mut model = Model::new("/services");
        for s in 0..200 {
            for i in 0..10 {
                let (service, id) = (format!("svc{s:03}"), format!("i{i}"));
                let key = registry::instance_key("/services", &service, &id);
                model.put(&key, record(&service, &id, 1000).as_bytes());
            }
        }
        let mut td = TemplateData::new();
        let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
        renderer.render_with("t", ctx).unwrap();
        // Cold: every service block rendered (its lines in it, thawed, are not cached).
        assert_eq!(renderer.take_each_stats(), (0, 200));

        let key = registry::instance_key("/services", "svc100", "new");
        model.put(&key, record("svc100", "new", 2000).as_bytes());
        let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
        let text = String::from_utf8(renderer.render_with("t", ctx).unwrap()).unwrap();
        assert!(text.contains("server new 10.0.0.1:2000"));
        // One join: the 199 other services come from the cache whole, without looking at
        // (or thawing) their instances; svc100 is thawed and rendered.
        let (hits, misses) = renderer.take_each_stats();
        assert_eq!((hits, misses), (199, 1));
        // All 200 kept frozen in between.
        assert_eq!(frozen(td.ctx.as_ref().unwrap()).len(), 200);
    }

    #[test]
    fn the_flat_list_is_there_exactly_for_templates_that_read_it() {
        let vars = BTreeMap::new();
        let none = BTreeSet::new();
        for (template, flat) in [
            ("{{#each instances}}{{service}}/{{id}},{{/each}}", true),
            (PER_SERVICE, false),
        ] {
            let mut renderer = Renderer::new();
            renderer.add("t", template).unwrap();
            assert_eq!(renderer.reads_flat_instances(), flat, "{template}");
            let mut model = Model::new("/services");
            model.set_flat_list(renderer.reads_flat_instances());
            let mut td = TemplateData::new();
            for (s, i) in [("b", "x"), ("a", "y")] {
                let key = registry::instance_key("/services", s, i);
                model.put(&key, record(s, i, 80).as_bytes());
                let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
                assert_eq!(ctx.data().get("instances").is_some(), flat, "{template}");
                renderer.render_with("t", ctx).unwrap();
            }
            let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
            let text = String::from_utf8(renderer.render_with("t", ctx).unwrap()).unwrap();
            if flat {
                assert_eq!(text, "a/y,b/x,");
            }
        }
    }

    #[test]
    fn quarantine_and_caps_rebuild() {
        let renderer = Renderer::new();
        let vars = BTreeMap::new();
        let mut model = Model::new("/services");
        for i in 0..3 {
            let id = format!("i{i}");
            model.put(
                &registry::instance_key("/services", "s", &id),
                record("s", &id, 1000).as_bytes(),
            );
        }
        let mut td = TemplateData::new();
        let none = BTreeSet::new();
        let (_, cut) = td.update(&renderer, &mut model, &vars, &none, 2);
        assert_eq!(cut, 1);
        let key = registry::instance_key("/services", "s", "i0");
        let excluded = BTreeSet::from([key]);
        let (ctx, cut) = td.update(&renderer, &mut model, &vars, &excluded, usize::MAX);
        assert_eq!(cut, 0);
        assert_eq!(instances_in(ctx, "s"), 2);
        let (ctx, _) = td.update(&renderer, &mut model, &vars, &none, usize::MAX);
        assert_eq!(instances_in(ctx, "s"), 3);
    }
}
