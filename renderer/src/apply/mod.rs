//! Bringing the outside world to a rendered config: [`file`] stages, checks and writes
//! files atomically; [`plan`] finds the server-only changes between the running config and
//! the new one; [`runtime`] applies such a plan through HAProxy's runtime API without a
//! reload and verifies it; everything else goes through a confirmed reload. Talking to
//! HAProxy itself is [`crate::haproxy`].

pub mod file;
mod live;
pub mod plan;
pub mod runtime;

use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::haproxy::{self, HaproxyChild, HaproxyError, MasterCli, ProcTable};
use crate::metrics::{Metrics, ResultLabel};
use crate::render::Renderer;
use file::FileTarget;

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

    /// Reloads; returns how, for the log, and the master's process table after a master
    /// CLI reload.
    pub async fn reload(&mut self) -> Result<(&'static str, Option<ProcTable>), HaproxyError> {
        match self {
            Reloader::None => Ok(("none", None)),
            Reloader::Exec(None) => Ok(("not started yet", None)),
            Reloader::Exec(Some(child)) => child
                .cli
                .reload()
                .await
                .map(|t| ("master CLI reload", Some(t))),
            Reloader::Master(cli) => cli.reload().await.map(|t| ("master CLI reload", Some(t))),
            Reloader::Command { command, timeout } => {
                haproxy::run_reload_command(command, *timeout)
                    .await
                    .map(|_| ("reload command", None))
            }
        }
    }
}

/// A rendered config, shared rather than copied between what the file holds, what HAProxy
/// runs and the background check (at 100 000 instances each copy was 6 MB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config(std::sync::Arc<Vec<u8>>);

impl std::ops::Deref for Config {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Config {
    fn from(bytes: Vec<u8>) -> Self {
        Config(std::sync::Arc::new(bytes))
    }
}

/// One template and its destination, with the bytes last written there.
pub struct Target {
    /// The template's name in the [`Renderer`].
    pub name: String,
    pub file: FileTarget,
    /// What the destination holds (read at start, then what we wrote): always checked.
    pub last: Option<Config>,
    /// What HAProxy runs: `last`, or a newer state applied through the runtime API whose
    /// file is still to be checked and written (see [`Applier::next_check`]).
    pub running: Option<Config>,
    /// The last render a check rejected after it had been applied live: not applied live
    /// again (it would be rolled back again), only through check + write + reload.
    pub rejected: Option<Config>,
}

impl Target {
    pub fn new(name: String, file: FileTarget) -> Self {
        let last = file.current().map(Config::from);
        Target {
            name,
            file,
            running: last.clone(),
            last,
            rejected: None,
        }
    }

    /// True when HAProxy runs a state whose file is not written yet.
    pub fn file_due(&self) -> bool {
        self.running.is_some() && self.running != self.last
    }
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Report {
    /// Files whose bytes changed and were written.
    pub written: usize,
    /// Files rendered identical to what is in place.
    pub unchanged: usize,
    /// Files whose new state HAProxy runs (runtime API) and whose check and write follow
    /// in the background.
    pub deferred: usize,
    /// How HAProxy was brought along, if it was.
    pub reload: Option<&'static str>,
    /// HAProxy was reloaded.
    pub reloaded: bool,
    /// Servers added, removed or changed through the runtime API.
    pub runtime_changes: usize,
    /// Runtime API attempts that fell back to a reload.
    pub runtime_fallbacks: usize,
    /// Failures (render, check, write, reload), already logged.
    pub errors: Vec<String>,
    /// Lines of rendered configs a check rejected (for quarantine).
    pub rejected_lines: Vec<String>,
    /// A file could not be staged, checked or written for a reason outside the config (a
    /// full disk, a check that could not run): the same apply is worth trying again.
    pub retry: bool,
    /// Where the time went.
    pub timings: Timings,
}

/// Time spent per step of an apply (for the apply log line).
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// Bringing the template data up to date with the registry.
    pub data: Duration,
    /// Handlebars.
    pub render: Duration,
    /// Comparing the new config with the running one.
    pub plan: Duration,
    /// Runtime API commands, up to the last `enable server` (the change is live then).
    pub runtime: Duration,
    /// `show servers state` afterwards.
    pub verify: Duration,
}

/// A file check running in the background: the file of a state HAProxy already runs.
pub struct CheckJob {
    pub index: usize,
    pub file: FileTarget,
    pub bytes: Config,
}

/// A finished [`CheckJob`].
pub struct CheckDone {
    pub index: usize,
    pub bytes: Config,
    pub result: Result<std::path::PathBuf, file::FileError>,
    pub took: Duration,
}

impl CheckJob {
    /// Stages and checks the file (to be passed to [`Applier::finish_check`]).
    pub async fn run(self) -> CheckDone {
        let started = std::time::Instant::now();
        let result = self.file.stage_and_check(&self.bytes, true).await;
        CheckDone {
            index: self.index,
            bytes: self.bytes,
            result,
            took: started.elapsed(),
        }
    }
}

/// What became of a background check.
#[derive(Debug, Default)]
pub struct CheckOutcome {
    /// The file was written.
    pub written: bool,
    /// The check rejected a state HAProxy runs: HAProxy was reloaded from the last good
    /// file (`reloaded`), and the rejected line, if known, is here for quarantine.
    pub rejected: Option<String>,
    pub reloaded: bool,
    /// The file could not be written for a reason outside the config (a full disk):
    /// HAProxy keeps running the state, the check and write are tried again later.
    pub retry: bool,
    /// Failures, already logged.
    pub errors: Vec<String>,
}

/// Renders every target; brings HAProxy to the result through the runtime API when only
/// servers changed (the file's check and write follow in the background), else checks,
/// writes and reloads.
pub struct Applier {
    pub targets: Vec<Target>,
    pub reloader: Reloader,
    /// Apply membership-only changes through the runtime API (no reload).
    pub runtime_api: bool,
    /// When a membership change goes through a reload anyway.
    pub runtime_limits: plan::Limits,
    /// How long a leaving server may keep its in-flight requests.
    pub drain_timeout: Duration,
    pub metrics: Metrics,
    /// (master pid, reload count) of the HAProxy the master CLI showed last, after our own
    /// reloads included: anything else means someone else restarted or reloaded it.
    known_master: Option<(u32, u32)>,
    /// The last reload failed without HAProxy refusing the config (the master could not be
    /// reached, or did not confirm): tried again once the master answers.
    reload_unreached: bool,
    /// What an HAProxy started elsewhere runs was compared with the files it should run
    /// ([`Applier::adopt`]).
    adopted: bool,
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        ResultLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    result: &str,
) {
    family
        .get_or_create(&ResultLabel {
            result: result.to_string(),
        })
        .inc();
}

impl Applier {
    /// An applier for `targets` that tells HAProxy through `reloader`; membership-only
    /// changes go through the runtime API when `runtime_api` (within `runtime_limits`),
    /// leaving servers drain for up to `drain_timeout`.
    pub fn new(
        targets: Vec<Target>,
        reloader: Reloader,
        runtime_api: bool,
        runtime_limits: plan::Limits,
        drain_timeout: Duration,
        metrics: Metrics,
    ) -> Applier {
        Applier {
            targets,
            reloader,
            runtime_api,
            runtime_limits,
            drain_timeout,
            metrics,
            known_master: None,
            reload_unreached: false,
            adopted: false,
        }
    }

    pub async fn apply(&mut self, renderer: &Renderer, ctx: &handlebars::Context) -> Report {
        if !self.adopted {
            // Boxed: run once, it need not make every apply's future larger.
            Box::pin(self.adopt()).await;
        }
        let mut report = Report::default();
        let mut need_reload = false;
        let m = self.metrics.clone();
        for t in &mut self.targets {
            let started = std::time::Instant::now();
            let rendered = renderer.render_with(&t.name, ctx);
            report.timings.render += started.elapsed();
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
            if t.running.as_deref() == Some(bytes.as_slice()) {
                if t.file_due() {
                    report.deferred += 1;
                } else {
                    report.unchanged += 1;
                }
                continue;
            }
            // Membership-only change and a running HAProxy: apply it live, at once. HAProxy
            // validates every command itself; the rest of the file is the one already
            // checked. The file is checked and written in the background after it (never
            // in front of a live change), and a failure there reloads HAProxy from the
            // last good file, so the two cannot drift.
            // A runtime attempt that failed part-way leaves HAProxy between two states: a
            // reload (to the new file, or back to the old one) is then mandatory.
            let mut touched = false;
            let live_ok = self.runtime_api && t.rejected.as_deref() != Some(bytes.as_slice());
            if let (true, Some(cli), Some(old)) =
                (live_ok, self.reloader.cli(), t.running.as_deref())
            {
                let started = std::time::Instant::now();
                let planned = plan::plan(old, &bytes);
                report.timings.plan += started.elapsed();
                match planned {
                    Some(plan) if plan.too_big(&self.runtime_limits).is_some() => {
                        info!(
                            reason = plan.too_big(&self.runtime_limits).unwrap_or_default(),
                            "using a reload instead of the runtime API"
                        );
                    }
                    Some(plan) => {
                        // Who is told: a later restart by someone else must be noticed.
                        if self.known_master.is_none() {
                            if let Ok(t) = cli.show_proc().await {
                                self.known_master = Some((t.master_pid, t.reloads));
                            }
                        }
                        let started = std::time::Instant::now();
                        let executed = runtime::execute(cli, &plan, self.drain_timeout).await;
                        report.timings.runtime += started.elapsed();
                        let verified = std::time::Instant::now();
                        let applied = match executed {
                            Ok(()) => runtime::verify(cli, &plan).await,
                            Err(e) => Err(e),
                        };
                        report.timings.verify += verified.elapsed();
                        m.runtime_seconds.observe(started.elapsed().as_secs_f64());
                        match applied {
                            Ok(()) => {
                                count(&m.runtime_applies, "ok");
                                report.runtime_changes += plan.len();
                                report.deferred += 1;
                                t.running = Some(bytes.into());
                                continue;
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
            // A reload runs the files on disk: this one, and every other whose live state
            // is ahead of its file (written below, before the reload).
            let bytes = Config::from(bytes);
            match check_and_write(t, &bytes, &m).await {
                Ok(()) => {
                    // What HAProxy runs once the reload below has taken.
                    t.running = Some(bytes);
                    report.written += 1;
                    need_reload = true;
                }
                Err(e) => {
                    // Undo a partial live change: HAProxy goes back to the file on disk.
                    need_reload |= touched;
                    report.retry |= !matches!(e, file::FileError::Check { .. });
                    if let file::FileError::Check {
                        offending: Some(line),
                        ..
                    } = &e
                    {
                        report.rejected_lines.push(line.clone());
                    }
                    report.errors.push(e.to_string());
                }
            }
        }
        if need_reload {
            self.flush().await;
            self.reload_into(&mut report).await;
        } else if report.runtime_changes > 0 {
            report.reload = Some("runtime API");
        }
        report
    }

    /// Reloads HAProxy (it then runs the files on disk) and records how in `report`.
    async fn reload_into(&mut self, report: &mut Report) {
        let m = self.metrics.clone();
        let started = std::time::Instant::now();
        let reloaded = self.reloader.reload().await;
        m.reload_seconds.observe(started.elapsed().as_secs_f64());
        match reloaded {
            Ok((how, table)) => {
                self.known_master = table.map(|t| (t.master_pid, t.reloads));
                self.reload_unreached = false;
                count(&m.reloads, "ok");
                report.reload = Some(how);
                report.reloaded = true;
                for t in &mut self.targets {
                    t.running = t.last.clone();
                }
            }
            Err(e) => {
                self.known_master = None;
                self.reload_unreached = matches!(self.reloader, Reloader::Master(_))
                    && !matches!(e, HaproxyError::ReloadFailed);
                count(&m.reloads, "error");
                error!(error = %e, "reload failed; HAProxy keeps its previous config");
                report.errors.push(e.to_string());
                // What it runs is no longer known for sure: the next change reloads.
                for t in &mut self.targets {
                    t.running = None;
                }
            }
        }
    }

    /// Checks and writes, now, every file HAProxy is ahead of (before a reload, at the end
    /// of --once, on shutdown). A file that fails stays as it was.
    pub async fn flush(&mut self) {
        let m = self.metrics.clone();
        for t in &mut self.targets {
            if let (true, Some(bytes)) = (t.file_due(), t.running.clone()) {
                let _ = check_and_write(t, &bytes, &m).await;
            }
        }
    }

    /// The next background check to run: the file of a state HAProxy already runs.
    pub fn next_check(&self) -> Option<CheckJob> {
        self.targets
            .iter()
            .enumerate()
            .find(|(_, t)| t.file_due())
            .and_then(|(index, t)| {
                Some(CheckJob {
                    index,
                    file: t.file.clone(),
                    bytes: t.running.clone()?,
                })
            })
    }

    /// True when some file lags the state HAProxy runs.
    pub fn files_due(&self) -> bool {
        self.targets.iter().any(Target::file_due)
    }

    /// Takes a finished background check: writes the file if it still describes what
    /// HAProxy runs; if the check rejected it, reloads HAProxy from the last good file.
    pub async fn finish_check(&mut self, done: CheckDone) -> CheckOutcome {
        let m = self.metrics.clone();
        m.check_seconds.observe(done.took.as_secs_f64());
        let mut out = CheckOutcome::default();
        let Some(t) = self.targets.get_mut(done.index) else {
            return out;
        };
        let current = t.running.as_ref() == Some(&done.bytes);
        match done.result {
            Ok(staged) if !current => t.file.discard(&staged),
            Ok(staged) => match write(t, &staged, done.bytes, &m) {
                Ok(()) => {
                    debug!(dest = %t.file.dest.display(), took = ?done.took, "config checked and written");
                    out.written = true;
                }
                Err(e) => out.errors.push(e.to_string()),
            },
            // An older state: whatever is wrong with it, the current one gets its own check.
            Err(_) if !current => {}
            // Nothing wrong with the config, the file just cannot be written (a full disk,
            // a check that cannot run): HAProxy keeps what it runs; try again later.
            Err(e) if !matches!(e, file::FileError::Check { .. }) => {
                error!(dest = %t.file.dest.display(), error = %e, "cannot write the config HAProxy runs (applied through the runtime API); HAProxy keeps it, trying again");
                out.errors.push(e.to_string());
                out.retry = true;
            }
            Err(e) => {
                error!(dest = %t.file.dest.display(), error = %e, "rendered config rejected after it was applied through the runtime API; reloading HAProxy from the last good config");
                if let file::FileError::Check {
                    offending: Some(line),
                    ..
                } = &e
                {
                    out.rejected = Some(line.clone());
                }
                out.errors.push(e.to_string());
                t.running = t.last.clone();
                t.rejected = Some(done.bytes);
                let mut report = Report::default();
                self.reload_into(&mut report).await;
                out.reloaded = report.reload.is_some();
                out.errors.extend(report.errors);
            }
        }
        out
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

/// Stages and checks `bytes`, then writes them to `t`'s destination.
async fn check_and_write(
    t: &mut Target,
    bytes: &Config,
    m: &Metrics,
) -> Result<(), file::FileError> {
    let started = std::time::Instant::now();
    let checked = t.file.stage_and_check(bytes, false).await;
    m.check_seconds.observe(started.elapsed().as_secs_f64());
    let staged = checked.inspect_err(|e| {
        error!(dest = %t.file.dest.display(), error = %e, "rendered config rejected; keeping the last good config");
    })?;
    write(t, &staged, bytes.clone(), m)
}

/// Moves a checked, staged file into place; `bytes` (its content) become `t.last`. A file
/// that cannot be written leaves the last good one in place.
fn write(
    t: &mut Target,
    staged: &std::path::Path,
    bytes: Config,
    m: &Metrics,
) -> Result<(), file::FileError> {
    let started = std::time::Instant::now();
    let committed = t.file.commit(staged);
    m.write_seconds.observe(started.elapsed().as_secs_f64());
    if let Err(e) = committed {
        t.file.discard(staged);
        error!(dest = %t.file.dest.display(), error = %e, "cannot write the config; the file keeps the last good one");
        return Err(e);
    }
    t.last = Some(bytes);
    Ok(())
}

/// The apply choice over a fake master CLI ([`fake`]): live through the runtime API, a
/// reload when more than servers changed, a reload when HAProxy refuses a live change, the
/// undo when the file of a partial live change is rejected, a failed reload reported.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::haproxy::fake::FakeMaster;
    use crate::model::Model;
    use std::collections::BTreeMap;

    const TEMPLATE: &str = "global\n    maxconn 100\ndefaults\n    mode http\nbackend web\n    balance {{vars.balance}}\n{{#each services.web}}    server {{id}} {{address}}:{{port}} weight {{weight}} id {{server_id}}\n{{/each}}";

    struct Setup {
        applier: Applier,
        renderer: Renderer,
        model: Model,
        vars: BTreeMap<String, String>,
        fake: FakeMaster,
        dest: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    /// An applier of `target` to the fake HAProxy, live changes on.
    fn applier(target: Target, fake: &FakeMaster, metrics: Metrics) -> Applier {
        Applier::new(
            vec![target],
            Reloader::Master(MasterCli::new(&fake.socket)),
            true,
            plan::Limits::default(),
            Duration::from_secs(1),
            metrics,
        )
    }

    impl Setup {
        /// An applier whose HAProxy (the fake) runs web/a and web/b, applied by a reload.
        async fn new(check: Option<&str>) -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let tpl = dir.path().join("t.hbs");
            std::fs::write(&tpl, TEMPLATE).unwrap();
            let dest = dir.path().join("haproxy.cfg");
            let mut renderer = Renderer::new();
            let name = renderer.add_file(&tpl).unwrap();
            let fake = FakeMaster::start(dir.path(), dest.clone());
            let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
            let target = Target::new(name, FileTarget::new(dest.clone(), check.map(String::from)));
            let applier = applier(target, &fake, metrics);
            let vars = BTreeMap::from([("balance".to_string(), "roundrobin".to_string())]);
            let mut s = Setup {
                applier,
                renderer,
                model: Model::new("/services"),
                vars,
                fake,
                dest,
                _dir: dir,
            };
            s.put("a", 3001);
            s.put("b", 3002);
            let r = s.apply().await;
            assert!(r.reloaded && r.errors.is_empty(), "{r:?}");
            assert_eq!(s.fake.names(), ["web/a", "web/b"]);
            s.fake.with(|f| f.commands.clear());
            s
        }

        fn put(&mut self, id: &str, port: u16) {
            let v = registry::Instance::new("web", id, "10.0.0.1", port).encode();
            self.model.put(
                &registry::instance_key("/services", "web", id),
                v.as_bytes(),
            );
        }

        fn delete(&mut self, id: &str) {
            self.model
                .delete(&registry::instance_key("/services", "web", id));
        }

        async fn apply(&mut self) -> Report {
            let ctx = self.renderer.context(self.model.template_data(&self.vars));
            self.applier.apply(&self.renderer, &ctx).await
        }

        fn reloads(&self) -> u32 {
            self.fake.with(|f| f.reloads)
        }

        /// A renderer killed and started again: a new applier that knows only the file.
        fn restart(&mut self) {
            let old = &self.applier.targets[0];
            let target = Target::new(old.name.clone(), old.file.clone());
            self.applier = applier(target, &self.fake, self.applier.metrics.clone());
        }

        fn file(&self) -> String {
            std::fs::read_to_string(&self.dest).unwrap()
        }
    }

    #[tokio::test]
    async fn a_join_goes_live_and_its_file_follows() {
        let mut s = Setup::new(None).await;
        s.put("c", 3003);
        let r = s.apply().await;
        assert_eq!(
            (r.reload, r.reloaded, r.runtime_changes),
            (Some("runtime API"), false, 1),
            "{r:?}"
        );
        assert_eq!(s.reloads(), 1, "no reload for a join");
        assert_eq!(s.fake.names(), ["web/a", "web/b", "web/c"]);
        let c = s.fake.with(|f| f.servers["web"]["c"].clone());
        assert_eq!(
            (c.addr.as_str(), c.port, c.weight, c.admin),
            ("10.0.0.1", 3003, 100, 0)
        );
        // The file is HAProxy's state only once the background check wrote it.
        assert!(!s.file().contains("server c "));
        assert!(s.applier.files_due());
        let job = s.applier.next_check().unwrap();
        let outcome = s.applier.finish_check(job.run().await).await;
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert!(s.file().contains("server c 10.0.0.1:3003"));
        assert_eq!(s.reloads(), 1);
    }

    #[tokio::test]
    async fn a_renderer_restarted_before_its_file_was_written_removes_the_live_join() {
        let mut s = Setup::new(None).await;
        s.put("c", 3003);
        let r = s.apply().await;
        assert_eq!(r.runtime_changes, 1, "{r:?}");
        // Killed before the file listing c was checked and written; c leaves meanwhile.
        s.restart();
        s.delete("c");
        let r = s.apply().await;
        assert!(
            r.reloaded,
            "HAProxy runs c, the file does not: reload {r:?}"
        );
        assert_eq!(s.fake.names(), ["web/a", "web/b"]);
        assert_eq!(s.applier.metrics.haproxy_drift.get(), 1);
        // A restart over an HAProxy that runs its file keeps the no-reload path.
        s.restart();
        s.put("d", 3004);
        let r = s.apply().await;
        assert_eq!((r.reloaded, r.runtime_changes), (false, 1), "{r:?}");
        assert_eq!(s.applier.metrics.haproxy_drift.get(), 1);
    }

    #[tokio::test]
    async fn a_server_added_by_hand_is_found_and_reloaded_away() {
        let mut s = Setup::new(None).await;
        assert!(!s.applier.check_live().await, "HAProxy runs its config");
        s.fake.with(|f| {
            let a = f.servers["web"]["a"].clone();
            f.servers.get_mut("web").unwrap().insert("ghost".into(), a);
        });
        assert!(s.applier.check_live().await);
        let r = s.apply().await;
        assert!(r.reloaded, "{r:?}");
        assert_eq!(s.fake.names(), ["web/a", "web/b"]);
        // A weight set by hand is left alone.
        s.fake.with(|f| {
            f.servers
                .get_mut("web")
                .unwrap()
                .get_mut("a")
                .unwrap()
                .weight = 7
        });
        assert!(!s.applier.check_live().await);
    }

    #[tokio::test]
    async fn a_leave_drains_then_deletes() {
        let mut s = Setup::new(None).await;
        s.delete("b");
        let r = s.apply().await;
        assert_eq!(
            (r.reload, r.runtime_changes),
            (Some("runtime API"), 1),
            "{r:?}"
        );
        assert_eq!(s.fake.names(), ["web/a"]);
        let commands = s.fake.with(|f| f.commands.clone());
        let at = |c: &str| {
            commands
                .iter()
                .position(|x| x == c)
                .unwrap_or_else(|| panic!("{c} not sent: {commands:?}"))
        };
        assert!(at("set server web/b state drain") < at("set server web/b state maint"));
        assert!(at("set server web/b state maint") < at("del server web/b"));
        assert_eq!(s.reloads(), 1);
    }

    #[tokio::test]
    async fn more_than_servers_changed_reloads() {
        let mut s = Setup::new(None).await;
        s.vars.insert("balance".into(), "leastconn".into());
        s.put("c", 3003);
        let r = s.apply().await;
        assert!(r.reloaded && r.errors.is_empty(), "{r:?}");
        assert_eq!(r.reload, Some("master CLI reload"));
        assert_eq!(s.reloads(), 2);
        assert!(
            s.fake.with(|f| f.commands.is_empty()),
            "no runtime command for a reload"
        );
        assert!(s.file().contains("balance leastconn") && s.file().contains("server c "));
        assert_eq!(s.fake.names(), ["web/a", "web/b", "web/c"]);
    }

    #[tokio::test]
    async fn a_refused_live_change_falls_back_to_a_reload() {
        let mut s = Setup::new(None).await;
        s.fake.with(|f| f.refuse_add = true);
        s.put("c", 3003);
        let r = s.apply().await;
        assert_eq!((r.runtime_fallbacks, r.reloaded), (1, true), "{r:?}");
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(s.reloads(), 2);
        assert_eq!(
            s.fake.names(),
            ["web/a", "web/b", "web/c"],
            "the reload ran the new file"
        );
    }

    #[tokio::test]
    async fn a_partial_live_change_whose_file_is_rejected_is_undone() {
        // The check rejects any file with a server c: the live add was refused half-way,
        // so HAProxy goes back to the last good file by a reload.
        let mut s = Setup::new(Some("! grep -q 'server c ' {}")).await;
        s.fake.with(|f| f.refuse_add = true);
        s.put("c", 3003);
        let r = s.apply().await;
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.reloaded, "undone by a reload: {r:?}");
        assert_eq!(s.reloads(), 2);
        assert_eq!(s.fake.names(), ["web/a", "web/b"]);
        assert!(!s.file().contains("server c "));
    }

    #[tokio::test]
    async fn a_failed_reload_is_reported() {
        let mut s = Setup::new(None).await;
        s.fake.with(|f| f.fail_reload = true);
        s.vars.insert("balance".into(), "leastconn".into());
        let r = s.apply().await;
        assert!(!r.reloaded, "{r:?}");
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("reload"), "{:?}", r.errors);
        assert_eq!(
            s.fake.names(),
            ["web/a", "web/b"],
            "the old worker keeps running"
        );
    }
}
