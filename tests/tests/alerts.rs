//! deploy/prometheus/alerts.yml: the rules load, their promtool unit tests pass, and every
//! metric they name is one the binaries export (a renamed metric would otherwise leave an
//! alert that can never fire).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir())
        .output()
        .expect("promtool (Debian's prometheus package; scripts/deps.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_load_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Metric names as Prometheus sees them (`# TYPE name kind`, with `_total` for counters).
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut reg = prometheus_client::registry::Registry::default();
    let _r = renderer::metrics::Metrics::new(&mut reg);
    let _g = registrar::metrics::Metrics::new(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            names.insert(name.to_string());
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {}
            }
        }
    }
    names
}

#[test]
fn every_metric_an_alert_names_is_exported() {
    let rules = std::fs::read_to_string(dir().join("alerts.yml")).unwrap();
    let exported = exported();
    let mut named = BTreeSet::new();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("renderer_") || word.starts_with("registrar_") {
                named.insert(word.to_string());
            }
        }
    }
    assert!(named.len() >= 7, "{named:?}");
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "alerts name metrics nobody exports: {missing:?}\nexported: {exported:?}"
    );
}
