//! What every mode does before its first apply: compile the templates (for the HAProxy
//! version the config is for) and find the files they render to.

use tracing::{info, warn};

use crate::apply::file::FileTarget;
use crate::apply::Target;
use crate::config::{Config, ReloadMode};
use crate::render::{RenderFailure, Renderer};
use crate::Error;

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

/// Reads and compiles every template (at start, and again on SIGHUP); the first that does
/// not load is the error, naming its file.
pub async fn compile(config: &Config) -> Result<Renderer, RenderFailure> {
    let mut renderer = Renderer::new();
    renderer.set_haproxy_version(&haproxy_version(config).await);
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
