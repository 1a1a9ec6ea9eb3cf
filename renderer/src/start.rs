//! What every mode does before its first apply: compile the templates (for the HAProxy
//! version the config is for), find the files they render to, and build the applier the
//! flags ask for.

use tracing::{info, warn};

use crate::apply::file::FileTarget;
use crate::apply::{Applier, Reloader, Target};
use crate::config::{Config, ReloadMode};
use crate::error::Error;
use crate::haproxy::MasterCli;
use crate::metrics::Metrics;
use crate::render::{RenderFailure, Renderer};

/// Compiles every template; a broken one stops the start. Templates see the HAProxy
/// version of `--haproxy-version`, or the one the HAProxy we run (or find) says it is.
pub async fn load_templates(config: &Config) -> Result<(Renderer, Vec<Target>), Error> {
    let renderer = compile(config).await?;
    let mut targets = Vec::new();
    for spec in &config.templates {
        let name = spec.source.display().to_string();
        let file = FileTarget::new(spec.dest.clone(), spec.check.clone());
        let stale = file.remove_stale_staged();
        if stale > 0 {
            info!(dest = %spec.dest.display(), stale, "removed staged files left by a renderer that stopped mid-check");
        }
        targets.push(Target::new(name, file));
    }
    Ok((renderer, targets))
}

/// The applier `config` asks for. `once` (--once): no HAProxy of our own to start, so
/// exec mode only writes files.
pub fn applier(config: &Config, targets: Vec<Target>, metrics: Metrics, once: bool) -> Applier {
    let reloader = match &config.reload {
        ReloadMode::None => Reloader::None,
        ReloadMode::Exec { .. } if once => Reloader::None,
        ReloadMode::Exec { .. } => Reloader::Exec(None),
        ReloadMode::Master(path) => Reloader::Master(MasterCli::new(path)),
        ReloadMode::Command { command, timeout } => Reloader::Command {
            command: command.clone(),
            timeout: *timeout,
        },
    };
    Applier::new(
        targets,
        reloader,
        config.runtime_api,
        config.runtime_limits,
        config.drain_timeout,
        metrics,
    )
}

/// Reads and compiles every template (at start, and again on SIGHUP); the first that does
/// not load is the error, naming its file.
pub async fn compile(config: &Config) -> Result<Renderer, RenderFailure> {
    let mut renderer = Renderer::new();
    renderer.set_haproxy_version(&haproxy_version(config).await);
    if let Some(dir) = &config.partials {
        let names = renderer.add_partials_dir(dir)?;
        info!(dir = %dir.display(), partials = ?names, "partials");
    }
    for spec in &config.templates {
        renderer.add_file(&spec.source)?;
    }
    Ok(renderer)
}

/// The version of the HAProxy the config is for ("" when it cannot be told).
async fn haproxy_version(config: &Config) -> String {
    if let Some(v) = &config.haproxy_version {
        return v.clone();
    }
    let program = match &config.reload {
        ReloadMode::Exec { command, .. } => command[0].as_str(),
        _ => "haproxy",
    };
    match crate::haproxy::detect_version(program).await {
        Some(v) => {
            info!(version = %v, %program, "HAProxy version");
            v
        }
        None if matches!(
            config.reload,
            ReloadMode::Exec { .. } | ReloadMode::Master(_)
        ) =>
        {
            warn!(%program, "cannot tell HAProxy's version (`{program} -v`); templates see haproxy.version = \"\" and take the oldest supported path; set --haproxy-version");
            String::new()
        }
        None => String::new(),
    }
}
