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
            let _ = out.write_all(&bytes);
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
