//! Bringing the outside world to a rendered config: [`file`] stages, checks and writes
//! files atomically; [`haproxy`] talks to HAProxy (master CLI, exec-mode child) and
//! reloads it, confirming that the reload took.

pub mod file;
pub mod haproxy;

use std::time::Duration;

use serde_json::Value;
use tracing::{error, info};

use crate::render::Renderer;
use file::FileTarget;
use haproxy::{HaproxyChild, HaproxyError, MasterCli};

/// How the consumer of the files is told about a new config.
pub enum Reloader {
    /// Only write files.
    None,
    /// HAProxy is our child (exec mode); `None` until the first config exists.
    Exec(Option<HaproxyChild>),
    /// An HAProxy started elsewhere, through its master CLI.
    Master(MasterCli),
    /// A shell command.
    Command { command: String, timeout: Duration },
}

impl Reloader {
    /// Reloads; returns how, for the log.
    pub async fn reload(&mut self) -> Result<&'static str, HaproxyError> {
        match self {
            Reloader::None => Ok("none"),
            Reloader::Exec(None) => Ok("not started yet"),
            Reloader::Exec(Some(child)) => child.cli.reload().await.map(|_| "master CLI reload"),
            Reloader::Master(cli) => cli.reload().await.map(|_| "master CLI reload"),
            Reloader::Command { command, timeout } => {
                haproxy::run_reload_command(command, *timeout)
                    .await
                    .map(|_| "reload command")
            }
        }
    }
}

/// One template and its destination, with the bytes last written there.
pub struct Target {
    /// The template's name in the [`Renderer`].
    pub name: String,
    pub file: FileTarget,
    /// What the destination holds (read at start, then what we wrote).
    pub last: Option<Vec<u8>>,
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Report {
    /// Files whose bytes changed and were written.
    pub written: usize,
    /// Files rendered identical to what is in place.
    pub unchanged: usize,
    /// How HAProxy was brought along, if it was.
    pub reload: Option<&'static str>,
    /// Failures (render, check, write, reload), already logged.
    pub errors: Vec<String>,
}

/// Renders every target, writes those whose bytes changed, reloads once if any did.
pub struct Applier {
    pub targets: Vec<Target>,
    pub reloader: Reloader,
}

impl Applier {
    pub async fn apply(&mut self, renderer: &Renderer, data: &Value) -> Report {
        let mut report = Report::default();
        for t in &mut self.targets {
            let bytes = match renderer.render(&t.name, data) {
                Ok(b) => b,
                Err(e) => {
                    error!(template = %t.name, error = %e, "render failed; keeping the last good config");
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            if t.last.as_deref() == Some(bytes.as_slice()) {
                report.unchanged += 1;
                continue;
            }
            let staged = match t.file.stage_and_check(&bytes).await {
                Ok(s) => s,
                Err(e) => {
                    error!(dest = %t.file.dest.display(), error = %e, "rendered config rejected; keeping the last good config");
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            if let Err(e) = t.file.commit(&staged) {
                t.file.discard(&staged);
                error!(error = %e, "cannot write the config; keeping the last good config");
                report.errors.push(e.to_string());
                continue;
            }
            t.last = Some(bytes);
            report.written += 1;
        }
        if report.written > 0 {
            match self.reloader.reload().await {
                Ok(how) => report.reload = Some(how),
                Err(e) => {
                    error!(error = %e, "reload failed; HAProxy keeps its previous config");
                    report.errors.push(e.to_string());
                }
            }
        }
        report
    }

    /// True when every destination holds a config (HAProxy can be started from them).
    pub fn all_written(&self) -> bool {
        self.targets.iter().all(|t| t.last.is_some())
    }

    /// Exec mode: starts HAProxy once every destination has a config.
    pub async fn start_haproxy_if_due(
        &mut self,
        command: &[String],
        socket: &std::path::Path,
    ) -> Result<bool, HaproxyError> {
        if !matches!(self.reloader, Reloader::Exec(None)) || !self.all_written() {
            return Ok(false);
        }
        let mut child = HaproxyChild::start(command, socket).await?;
        child.wait_ready(Duration::from_secs(30)).await?;
        info!("HAProxy is up");
        self.reloader = Reloader::Exec(Some(child));
        Ok(true)
    }

    /// The exec-mode child, if running.
    pub fn haproxy(&self) -> Option<&HaproxyChild> {
        match &self.reloader {
            Reloader::Exec(Some(c)) => Some(c),
            _ => None,
        }
    }
}
