//! The one-shot modes: `--once` and `--dry-run` (one listing, one render and, unless dry,
//! one apply, exit), and `renderer check` (render and check, write nothing).

use std::io::Write;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::apply::Target;
use crate::config::Config;
use crate::error::Error;
use crate::model::Model;
use crate::render::Renderer;
use crate::{metrics, watch};

/// The registry as it is now: one listing into a model (`None`: stopped while connecting).
async fn listed(config: &Config) -> Result<Option<(Model, i64)>, Error> {
    let Some(client) = watch::connect(config, &CancellationToken::new()).await? else {
        return Ok(None);
    };
    let (store, kvs) = watch::list(&client, &config.prefix, config.etcd.dial_timeout)
        .await
        .map_err(|e| Error::EtcdUnavailable(registry::etcd::error_chain(&e)))?;
    let mut model = Model::new(&config.prefix);
    model.reset(
        kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        store.revision,
    );
    Ok(Some((model, store.revision)))
}

/// `renderer check`: compiles every template, renders each against the registry as it is
/// now and runs its check command on the render in a private temporary directory. Writes
/// nothing beside the destinations, reloads nothing. Prints one line per template; returns
/// 0 when every template compiled, rendered and passed its check, else 1.
pub async fn check(config: &Config) -> Result<i32, Error> {
    let mut out = std::io::stdout().lock();
    let renderer = match crate::start::compile(config).await {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "FAIL {e}");
            return Ok(1);
        }
    };
    let Some((model, revision)) = listed(config).await? else {
        return Ok(1);
    };
    let ctx = renderer.context(model.template_data(&config.vars));
    let dir = Scratch::new()?;
    let mut failed = 0;
    for spec in &config.templates {
        let name = spec.source.display().to_string();
        let dest = spec.dest.display();
        let line = match renderer.render_with(&name, &ctx) {
            Err(e) => Err(e.to_string()),
            Ok(bytes) => {
                let file_name = spec.dest.file_name().unwrap_or_else(|| "config".as_ref());
                let file = crate::apply::file::FileTarget::new(
                    dir.path.join(file_name),
                    spec.check.clone(),
                );
                let lines = bytecount_lines(&bytes);
                match file.stage_and_check(&bytes, false).await {
                    Ok(staged) => {
                        file.discard(&staged);
                        Ok(match &spec.check {
                            Some(cmd) => format!("{lines} lines, `{cmd}` passed"),
                            None => format!("{lines} lines rendered (no check command)"),
                        })
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let _ = match line {
            Ok(what) => writeln!(out, "ok   {name} -> {dest}: {what}"),
            Err(why) => {
                failed += 1;
                writeln!(out, "FAIL {name} -> {dest}: {why}")
            }
        };
    }
    let _ = writeln!(
        out,
        "{} of {} templates passed against registry revision {revision} ({} instances)",
        config.templates.len() - failed,
        config.templates.len(),
        model.len()
    );
    Ok(i32::from(failed > 0))
}

fn bytecount_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|b| **b == b'\n').count()
}

/// A private temporary directory, removed when dropped.
struct Scratch {
    path: std::path::PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("lb-renderer-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Returns the exit code: 0 when everything applied.
pub async fn run(config: &Config, renderer: Renderer, targets: Vec<Target>) -> Result<i32, Error> {
    let Some((model, revision)) = listed(config).await? else {
        return Ok(1);
    };
    let ctx = renderer.context(model.template_data(&config.vars));
    if config.dry_run {
        let mut out = std::io::stdout().lock();
        for t in &targets {
            let bytes = renderer.render_with(&t.name, &ctx)?;
            if config.diff {
                let old = t.last.as_deref().unwrap_or_default();
                let _ = out.write_all(diff(&t.file.dest, old, &bytes).as_bytes());
            } else {
                let _ = out.write_all(&bytes);
            }
        }
        let _ = out.flush();
        return Ok(0);
    }
    let metrics = metrics::Metrics::new(&mut prometheus_client::registry::Registry::default());
    let mut applier = crate::start::applier(config, targets, metrics, true);
    let report = applier.apply(&renderer, &ctx).await;
    info!(
        revision,
        instances = model.len(),
        written = report.written,
        unchanged = report.unchanged,
        applied = report.reload.unwrap_or("unchanged"),
        "applied once"
    );
    if report.errors.is_empty() {
        Ok(0)
    } else {
        Err(Error::Apply(report.errors.len()))
    }
}

/// A unified diff (3 lines of context) from what `dest` holds to `new`; empty when they
/// agree.
fn diff(dest: &std::path::Path, old: &[u8], new: &[u8]) -> String {
    let (old, new) = (String::from_utf8_lossy(old), String::from_utf8_lossy(new));
    if old == new {
        return String::new();
    }
    let name = dest.display().to_string();
    similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(&name, &format!("{name} (rendered)"))
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn diff_shows_an_added_server_and_nothing_when_equal() {
        let old = "backend nodes\n    server a 10.0.0.1:80\n";
        let new = "backend nodes\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80\n";
        let d = super::diff(
            std::path::Path::new("/etc/haproxy/haproxy.cfg"),
            old.as_bytes(),
            new.as_bytes(),
        );
        assert!(
            d.starts_with(
                "--- /etc/haproxy/haproxy.cfg\n+++ /etc/haproxy/haproxy.cfg (rendered)\n"
            ),
            "{d}"
        );
        assert!(d.contains("\n+    server b 10.0.0.2:80\n"), "{d}");
        assert!(!d.contains("\n-"), "{d}");
        assert_eq!(
            super::diff(std::path::Path::new("x"), old.as_bytes(), old.as_bytes()),
            ""
        );
    }
}
