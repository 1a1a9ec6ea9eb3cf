//! `--once` and `--dry-run`: one listing, one render (and, unless dry, one apply), exit.

use std::io::Write;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::apply::Target;
use crate::config::Config;
use crate::error::Error;
use crate::model::Model;
use crate::render::Renderer;
use crate::{metrics, watch};

/// Returns the exit code: 0 when everything applied.
pub async fn run(config: &Config, renderer: Renderer, targets: Vec<Target>) -> Result<i32, Error> {
    let Some(client) = watch::connect(config, &CancellationToken::new()).await? else {
        return Ok(1);
    };
    let (store, kvs) = watch::list(&client, &config.prefix, config.etcd.dial_timeout)
        .await
        .map_err(|e| Error::EtcdUnavailable(registry::etcd::error_chain(&e)))?;
    let mut model = Model::new(&config.prefix);
    model.reset(
        kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        store.revision,
    );
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
        revision = store.revision,
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
