//! renderer: watches the registry in etcd and keeps HAProxy's config in step with it.
//!
//! Data flows one way: [`watch`] (etcd) → [`model`] (BTreeMaps) → [`render`] (Handlebars,
//! pure) → [`apply`] (files, HAProxy; [`haproxy`] speaks HAProxy's CLI and parses what it
//! prints). The [`daemon`] is the loop that owns them;
//! [`coalesce`] decides when it applies, [`guard`] keeps bad renders and records out.
//! [`start`] compiles the templates and builds the applier, [`once`] is `--once`/`--dry-run`,
//! [`metrics`] holds the counters and readiness and serves `/status`, [`status`] is the
//! `/status` document and `renderer status`, [`error`] the fatal failures. `main.rs` only
//! parses flags, sets up logging and signals, and maps the result to an exit code.
//! Modules name each other in one direction only (checked by a unit test: no circle).
#![forbid(unsafe_code)]

pub mod applied;
pub mod apply;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod data;
pub mod error;
pub mod guard;
pub mod haproxy;
pub mod metrics;
pub mod model;
pub mod once;
pub mod render;
pub mod signal;
pub mod start;
pub mod status;
pub mod watch;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::{Args, Config, ReloadMode};
use daemon::Daemon;
pub use error::Error;
use watch::Update;

/// Runs until `shutdown` (or until HAProxy exits in exec mode). Returns the exit code.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<i32, Error> {
    run_with(config, shutdown, None).await
}

/// [`run`] under a service manager: SIGHUPs arrive on `hup` (templates read again), and
/// systemd is told READY/STATUS/WATCHDOG/RELOADING/STOPPING when `NOTIFY_SOCKET` is set.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    hup: Option<mpsc::Receiver<()>>,
) -> Result<i32, Error> {
    let (renderer, targets) = start::load_templates(&config).await?;
    if config.once {
        return once::run(&config, renderer, targets).await;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let state = metrics::State::new(config.ready_grace);
    let tasks = CancellationToken::new();
    observe::serve_if(
        config.metrics_addr,
        || state.endpoint(registry),
        tasks.clone(),
    )
    .await;
    let applier = crate::start::applier(&config, targets, metrics.clone(), false);
    let mut daemon = Daemon::new(
        config.clone(),
        renderer,
        applier,
        metrics.clone(),
        state.clone(),
    );
    if let Some(hup) = hup {
        daemon = daemon.with_service_manager(observe::notify::Notifier::from_env(), hup);
    }
    if daemon.start_haproxy_if_due().await? {
        info!("serving the existing config until the registry is read");
    }
    let (tx, rx) = mpsc::channel::<Update>(256);
    let (live_tx, live_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(metrics::mirror_live(
        live_rx,
        state,
        metrics.clone(),
        tasks.clone(),
    ));
    let watch = watch::follow(config, tx, live_tx, metrics, tasks.clone());
    let result = daemon.run(rx, tokio::spawn(watch), shutdown).await;
    tasks.cancel();
    result
}

/// Layering: modules name each other (`crate::…`) in one direction only — no import
/// circle — so each can be read, and tested, with only what is below it.
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    type Graph = BTreeMap<String, BTreeSet<String>>;

    /// The source of `file` outside comments and its `#[cfg(test)]` tail, as one line.
    fn code(text: &str) -> String {
        let mut out = String::new();
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("#[cfg(test)]") {
                break;
            }
            if !t.starts_with("//") {
                out.push_str(line);
                out.push(' ');
            }
        }
        out
    }

    /// The first path segment of every `crate::` reference in `code`, `crate::{a, b::c}`
    /// giving `a` and `b`.
    fn references(code: &str) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut out = Vec::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let (mut depth, mut start) = (0, 0);
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            out.push(ident(&group[start..j]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.push(ident(&group[start..j]));
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
            } else {
                out.push(ident(rest));
            }
        }
        out.retain(|s| !s.is_empty());
        out
    }

    /// Module → the modules it names. Files are (path under src/, text); an item of the
    /// crate root is resolved through lib.rs's `pub use module::…` to its module.
    fn graph(files: &[(String, String)]) -> Graph {
        let module = |path: &str| -> String {
            let first = path.split('/').next().unwrap_or(path);
            first.trim_end_matches(".rs").to_string()
        };
        let modules: BTreeSet<String> = files.iter().map(|(p, _)| module(p)).collect();
        let mut root_items = BTreeMap::new();
        for (path, text) in files {
            if path != "lib.rs" {
                continue;
            }
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("pub use ") {
                    if let Some((m, items)) = rest.split_once("::") {
                        for item in items.trim_matches(|c| "{};".contains(c)).split(',') {
                            root_items.insert(item.trim().to_string(), m.to_string());
                        }
                    }
                }
            }
        }
        let mut g = Graph::new();
        for (path, text) in files {
            let from = module(path);
            for r in references(&code(text)) {
                let to = if modules.contains(&r) {
                    r
                } else {
                    root_items.get(&r).cloned().unwrap_or_else(|| "lib".into())
                };
                if to != from {
                    g.entry(from.clone()).or_default().insert(to);
                }
            }
        }
        g
    }

    /// A circle of modules, if there is one.
    fn circle(g: &Graph) -> Option<Vec<String>> {
        fn visit(
            g: &Graph,
            m: &str,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|p| p == m) {
                let mut c = path[i..].to_vec();
                c.push(m.to_string());
                return Some(c);
            }
            if done.contains(m) {
                return None;
            }
            path.push(m.to_string());
            for next in g.get(m).into_iter().flatten() {
                if let Some(c) = visit(g, next, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(m.to_string());
            None
        }
        let mut done = BTreeSet::new();
        g.keys()
            .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
    }

    fn sources(dir: &Path, under: &str, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = format!("{under}{}", entry.file_name().to_string_lossy());
            if path.is_dir() {
                sources(&path, &format!("{name}/"), out);
            } else if name.ends_with(".rs") && name != "main.rs" {
                out.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }

    #[test]
    fn no_module_imports_in_a_circle() {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            "",
            &mut files,
        );
        let g = graph(&files);
        assert!(
            g["daemon"].contains("apply") && g["apply"].contains("haproxy"),
            "{g:?}"
        );
        assert_eq!(circle(&g), None, "modules import each other: {g:?}");
    }

    #[test]
    fn a_circle_is_found() {
        let file = |p: &str, t: &str| (p.to_string(), t.to_string());
        let files = [
            file("lib.rs", "pub mod a;\npub use c::{Thing, Other};\n"),
            file(
                "a.rs",
                "use crate::{b::X, model};\n// crate::c in a comment\n",
            ),
            file(
                "b/mod.rs",
                "fn f() -> crate::Thing {}\n#[cfg(test)]\nuse crate::lib;",
            ),
            file("c.rs", "use crate::a::Y;"),
            file("model.rs", ""),
        ];
        let g = graph(&files);
        assert_eq!(
            g["a"],
            BTreeSet::from(["b".into(), "model".into()]),
            "{g:?}"
        );
        assert_eq!(g["b"], BTreeSet::from(["c".into()]), "{g:?}");
        assert_eq!(circle(&g).unwrap(), ["a", "b", "c", "a"]);
        let acyclic = [file("a.rs", "use crate::b;"), file("b.rs", "")];
        assert_eq!(circle(&graph(&acyclic)), None);
    }
}
