//! The instances of the last applied config, and what an apply added and removed (for the
//! apply log and `--empty-hold`).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Model;

/// The instances of the last applied config: service → ids.
pub type Applied = BTreeMap<String, BTreeSet<String>>;

/// What the model admits (`admitted`: not quarantined) that `applied` lacks, and the
/// reverse, as [`some`] lists them; with `commit`, `applied` becomes the model's set.
/// Walks both in order and copies only services that differ: at 100 000 instances,
/// rebuilding the whole set per apply took longer than the render.
pub fn diff_applied(
    applied: &mut Applied,
    model: &Model,
    admitted: impl Fn(&str, &str) -> bool,
    commit: bool,
) -> (Vec<String>, Vec<String>) {
    diff_applied_in(applied, model, admitted, commit, None)
}

/// [`diff_applied`] over the services in `scope` only (`None`: all): the caller knows
/// the others have not changed since `applied` was last committed (a join among 100 000
/// instances in 1 000 services walks one service's ids, not 100 000).
pub fn diff_applied_in(
    applied: &mut Applied,
    model: &Model,
    admitted: impl Fn(&str, &str) -> bool,
    commit: bool,
    scope: Option<&BTreeSet<String>>,
) -> (Vec<String>, Vec<String>) {
    let (mut added, mut removed) = (Listing::default(), Listing::default());
    let mut changed: Vec<(String, BTreeSet<String>)> = Vec::new();
    let empty_ids = BTreeMap::new();
    let empty_set = BTreeSet::new();
    let names: BTreeSet<&String> = match scope {
        Some(scope) => scope.iter().collect(),
        None => model.services().keys().chain(applied.keys()).collect(),
    };
    for name in names {
        let now = model.services().get(name).unwrap_or(&empty_ids);
        let was = applied.get(name).unwrap_or(&empty_set);
        let mut now_ids = now.keys().filter(|i| admitted(name, i)).peekable();
        let mut was_ids = was.iter().peekable();
        let mut differs = false;
        loop {
            let order = match (now_ids.peek(), was_ids.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(n), Some(w)) => n.cmp(w),
            };
            match order {
                std::cmp::Ordering::Equal => {
                    now_ids.next();
                    was_ids.next();
                }
                std::cmp::Ordering::Less => {
                    if let Some(n) = now_ids.next() {
                        added.push(name, n);
                    }
                    differs = true;
                }
                std::cmp::Ordering::Greater => {
                    if let Some(w) = was_ids.next() {
                        removed.push(name, w);
                    }
                    differs = true;
                }
            }
        }
        if differs && commit {
            let ids = now.keys().filter(|i| admitted(name, i)).cloned().collect();
            changed.push((name.to_string(), ids));
        }
    }
    for (name, ids) in changed {
        if ids.is_empty() {
            applied.remove(&name);
        } else {
            applied.insert(name, ids);
        }
    }
    (added.done(), removed.done())
}

/// `service/id` of up to 10 instances, then "… and N more": an apply of 10 000 changes
/// logs one readable line, not 170 kB.
#[derive(Default)]
struct Listing {
    names: Vec<String>,
    more: usize,
}

impl Listing {
    fn push(&mut self, service: &str, id: &str) {
        if self.names.len() < 10 {
            self.names.push(format!("{service}/{id}"));
        } else {
            self.more += 1;
        }
    }

    fn done(mut self) -> Vec<String> {
        if self.more > 0 {
            self.names.push(format!("… and {} more", self.more));
        }
        self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(m: &mut Model, service: &str, id: &str) {
        let v = registry::Instance::new(service, id, "10.0.0.1", 80).encode();
        m.put(
            &registry::instance_key("/services", service, id),
            v.as_bytes(),
        );
    }

    #[test]
    fn a_scope_walks_only_its_services() {
        let mut model = Model::new("/services");
        for s in 0..1000 {
            put(&mut model, &format!("svc{s:03}"), "a");
        }
        let mut applied = Applied::new();
        let all = |_: &str, _: &str| true;
        assert_eq!(diff_applied(&mut applied, &model, all, true).0.len(), 11);
        put(&mut model, "svc500", "b");
        put(&mut model, "svc900", "b");
        // Only svc500 in scope: svc900's join is not looked at (not listed, not committed).
        let scope = BTreeSet::from(["svc500".to_string()]);
        let (added, _) = diff_applied_in(&mut applied, &model, all, true, Some(&scope));
        assert_eq!(added, ["svc500/b"]);
        assert!(!applied["svc900"].contains("b"));
        // The full walk finds what the scope left out, and the scoped result agrees with it.
        assert_eq!(
            diff_applied(&mut applied, &model, all, true).0,
            ["svc900/b"]
        );
    }

    #[test]
    fn applied_set_follows_the_model_and_lists_the_difference() {
        let mut model = Model::new("/services");
        for i in ["a", "b", "c"] {
            put(&mut model, "web", i);
        }
        let mut applied = Applied::new();
        let all = |_: &str, _: &str| true;
        let (added, removed) = diff_applied(&mut applied, &model, all, true);
        assert_eq!((added.len(), removed.len()), (3, 0));
        model.delete(&registry::instance_key("/services", "web", "b"));
        put(&mut model, "api", "x");
        // Not committed (the apply failed): the difference stays.
        for _ in 0..2 {
            let (added, removed) = diff_applied(&mut applied, &model, all, false);
            assert_eq!(
                (added, removed),
                (vec!["api/x".to_string()], vec!["web/b".to_string()])
            );
        }
        let (added, _) = diff_applied(&mut applied, &model, all, true);
        assert_eq!(added, ["api/x"]);
        assert_eq!(
            diff_applied(&mut applied, &model, all, true),
            (vec![], vec![])
        );
        // A quarantined instance is not applied: it counts as removed.
        let (_, removed) = diff_applied(&mut applied, &model, |s, i| (s, i) != ("web", "c"), true);
        assert_eq!(removed, ["web/c"]);
        // Many changes: ten names, then a count.
        for i in 0..25 {
            put(&mut model, "bulk", &format!("i{i:02}"));
        }
        let (added, _) = diff_applied(&mut applied, &model, all, true);
        assert_eq!(added.len(), 11);
        assert_eq!(added[10], "… and 16 more");
    }
}
