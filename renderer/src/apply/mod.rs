//! Bringing the outside world to a rendered config: [`file`] stages, checks and writes
//! files atomically; [`haproxy`] talks to HAProxy (master CLI, exec-mode child) and
//! reloads it, confirming that the reload took; [`runtime`] applies membership-only
//! changes through HAProxy's runtime API without a reload.

pub mod file;
pub mod haproxy;
pub mod runtime;

use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::metrics::{Metrics, ResultLabel};
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
    /// The master CLI of a running HAProxy, when there is one to send runtime commands to.
    pub fn cli(&self) -> Option<&MasterCli> {
        match self {
            Reloader::Exec(Some(child)) => Some(&child.cli),
            Reloader::Master(cli) => Some(cli),
            _ => None,
        }
    }

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
    /// Servers added, removed or changed through the runtime API.
    pub runtime_changes: usize,
    /// Runtime API attempts that fell back to a reload.
    pub runtime_fallbacks: usize,
    /// Failures (render, check, write, reload), already logged.
    pub errors: Vec<String>,
    /// Lines of rendered configs a check rejected (for quarantine).
    pub rejected_lines: Vec<String>,
}

/// Renders every target, writes those whose bytes changed, reloads once if any did.
pub struct Applier {
    pub targets: Vec<Target>,
    pub reloader: Reloader,
    /// Apply membership-only changes through the runtime API (no reload).
    pub runtime_api: bool,
    /// When a membership change goes through a reload anyway.
    pub runtime_limits: runtime::Limits,
    /// How long a leaving server may keep its in-flight requests.
    pub drain_timeout: Duration,
    pub metrics: Metrics,
}

impl Applier {
    pub async fn apply(&mut self, renderer: &Renderer, ctx: &handlebars::Context) -> Report {
        let mut report = Report::default();
        let mut need_reload = false;
        let m = self.metrics.clone();
        let count = |family: &prometheus_client::metrics::family::Family<
            ResultLabel,
            prometheus_client::metrics::counter::Counter,
        >,
                     result: &str| {
            family
                .get_or_create(&ResultLabel {
                    result: result.to_string(),
                })
                .inc();
        };
        for t in &mut self.targets {
            let started = std::time::Instant::now();
            let rendered = renderer.render_with(&t.name, ctx);
            m.render_seconds.observe(started.elapsed().as_secs_f64());
            let bytes = match rendered {
                Ok(b) => {
                    count(&m.renders, "ok");
                    b
                }
                Err(e) => {
                    count(&m.renders, "error");
                    error!(template = %t.name, error = %e, "render failed; keeping the last good config");
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            if t.last.as_deref() == Some(bytes.as_slice()) {
                report.unchanged += 1;
                continue;
            }
            // Membership-only change and a running HAProxy: apply it live first. HAProxy
            // validates every command itself; the rest of the file is the one already
            // checked. The file is still checked and written below, and a failure there
            // reloads HAProxy from the last good file, so the two can never drift.
            let mut live = false;
            // A runtime attempt that failed part-way leaves HAProxy between two states: a
            // reload (to the new file, or back to the old one) is then mandatory.
            let mut touched = false;
            if let (true, Some(cli), Some(old)) =
                (self.runtime_api, self.reloader.cli(), t.last.as_deref())
            {
                let old = String::from_utf8_lossy(old);
                let new = String::from_utf8_lossy(&bytes);
                match runtime::plan(&old, &new) {
                    Some(plan) if plan.too_big(&self.runtime_limits).is_some() => {
                        info!(
                            reason = plan.too_big(&self.runtime_limits).unwrap_or_default(),
                            "using a reload instead of the runtime API"
                        );
                    }
                    Some(plan) => {
                        let started = std::time::Instant::now();
                        let applied = match runtime::execute(cli, &plan, self.drain_timeout).await {
                            Ok(()) => runtime::verify(cli, &new, &plan.backends()).await,
                            Err(e) => Err(e),
                        };
                        m.runtime_seconds.observe(started.elapsed().as_secs_f64());
                        match applied {
                            Ok(()) => {
                                live = true;
                                count(&m.runtime_applies, "ok");
                                report.runtime_changes += plan.len();
                            }
                            Err(e) => {
                                touched = true;
                                count(&m.runtime_applies, "fallback");
                                warn!(error = %e, "runtime API change not applied cleanly; falling back to a reload");
                                report.runtime_fallbacks += 1;
                            }
                        }
                    }
                    None => {
                        debug!(dest = %t.file.dest.display(), "more than server lines changed; reload")
                    }
                }
            }
            let started = std::time::Instant::now();
            let checked = t.file.stage_and_check(&bytes).await;
            m.check_seconds.observe(started.elapsed().as_secs_f64());
            let staged = match checked {
                Ok(s) => s,
                Err(e) => {
                    error!(dest = %t.file.dest.display(), error = %e, "rendered config rejected; keeping the last good config");
                    report.errors.push(e.to_string());
                    // Undo a live change: HAProxy goes back to the file on disk.
                    need_reload |= live || touched;
                    if let file::FileError::Check {
                        offending: Some(line),
                        ..
                    } = &e
                    {
                        report.rejected_lines.push(line.clone());
                    }
                    continue;
                }
            };
            let started = std::time::Instant::now();
            let committed = t.file.commit(&staged);
            m.write_seconds.observe(started.elapsed().as_secs_f64());
            if let Err(e) = committed {
                t.file.discard(&staged);
                error!(error = %e, "cannot write the config; keeping the last good config");
                report.errors.push(e.to_string());
                need_reload |= live || touched;
                continue;
            }
            t.last = Some(bytes);
            report.written += 1;
            need_reload |= !live;
        }
        if need_reload {
            let started = std::time::Instant::now();
            let reloaded = self.reloader.reload().await;
            m.reload_seconds.observe(started.elapsed().as_secs_f64());
            match reloaded {
                Ok(how) => {
                    count(&m.reloads, "ok");
                    report.reload = Some(how);
                }
                Err(e) => {
                    count(&m.reloads, "error");
                    error!(error = %e, "reload failed; HAProxy keeps its previous config");
                    report.errors.push(e.to_string());
                }
            }
        } else if report.runtime_changes > 0 {
            report.reload = Some("runtime API");
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
