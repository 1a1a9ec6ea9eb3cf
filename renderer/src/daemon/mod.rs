//! The renderer's loop as a type: registry updates feed the [`Model`]; the [`Coalescer`]
//! says when to apply; an apply renders and brings HAProxy along (live through the runtime
//! API when only servers changed, else check + write + reload); the file of a live state
//! is checked and written in the background, one check at a time, never in front of the
//! next live change.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::applied::{diff_applied_in, Applied};
use crate::apply::{self, Applier, CheckDone};
use crate::coalesce::Coalescer;
use crate::config::{Config, ReloadMode};
use crate::data::TemplateData;
use crate::error::Error;
use crate::guard::{self, EmptyHold, Quarantine};
use crate::metrics;
use crate::model::{Changes, Model};
use crate::render::Renderer;
use crate::status::ServedLists;
use crate::watch::{self, Update};

/// How often the master of an HAProxy started elsewhere is asked whether it was restarted.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How soon a file that could not be written (a full disk) is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The loop's state.
pub struct Daemon {
    config: Config,
    renderer: Renderer,
    applier: Applier,
    model: Model,
    /// The template data, patched with each change rather than rebuilt.
    data: TemplateData,
    coalescer: Coalescer,
    /// A full listing has been applied.
    synced: bool,
    /// The instances in the last applied config (for the apply log's added/removed).
    applied_set: Applied,
    /// Changes the applied set has not been brought up to (kept until an apply succeeds).
    unbooked: Changes,
    /// `/status`'s per-service lists, and the changes they have not taken yet.
    served: ServedLists,
    status_stale: Changes,
    quarantine: Quarantine,
    cookie_key_checked: bool,
    metrics: metrics::Metrics,
    state: std::sync::Arc<metrics::State>,
    /// The background file check, when one runs.
    check: Option<JoinHandle<CheckDone>>,
    /// No background check starts before this: each is followed by a pause as long as
    /// it took, so checks of a large config under a storm use at most half a core.
    next_check_at: Instant,
    /// When to ask HAProxy's master (master CLI mode) whether it was restarted under us.
    next_probe: Instant,
    /// When to apply again after a file could not be written (a full disk).
    retry_at: Option<Instant>,
    /// `--empty-hold`.
    hold: EmptyHold,
    /// systemd: READY/STATUS/WATCHDOG/RELOADING/STOPPING (nothing without NOTIFY_SOCKET).
    notifier: observe::notify::Notifier,
    /// READY=1 is due after the next successful apply (the first, or the one after a
    /// SIGHUP's RELOADING=1).
    ready_due: bool,
    /// WATCHDOG=1, sent from this loop only.
    watchdog: observe::notify::Watchdog,
    /// SIGHUPs: read the templates again.
    hup: Option<mpsc::Receiver<()>>,
    /// When HAProxy's servers are next compared with the config it was given (every
    /// `--resync`, like the registry's listing: the same safety net on the other side).
    next_live_check: Option<Instant>,
}

impl Daemon {
    pub fn new(
        config: Config,
        renderer: Renderer,
        applier: Applier,
        metrics: metrics::Metrics,
        state: std::sync::Arc<metrics::State>,
    ) -> Self {
        let next_live_check = config.resync.map(|p| Instant::now() + p);
        let hold = EmptyHold::new(config.empty_hold);
        let mut model = Model::new(&config.prefix);
        model.set_flat_list(renderer.reads_flat_instances());
        Daemon {
            model,
            data: TemplateData::new(),
            coalescer: Coalescer::new(config.wait_min, config.wait_max),
            config,
            renderer,
            applier,
            synced: false,
            applied_set: Applied::new(),
            unbooked: Changes::All,
            served: ServedLists::default(),
            status_stale: Changes::All,
            quarantine: Quarantine::default(),
            cookie_key_checked: false,
            metrics,
            state,
            check: None,
            next_check_at: Instant::now(),
            next_probe: Instant::now() + PROBE_EVERY,
            next_live_check,
            retry_at: None,
            hold,
            notifier: observe::notify::Notifier::disabled(),
            ready_due: true,
            watchdog: observe::notify::Watchdog::new(&observe::notify::Notifier::disabled()),
            hup: None,
        }
    }

    /// Talks to systemd through `notifier` and reads the templates again on each message
    /// of `hup` (SIGHUP).
    pub fn with_service_manager(
        mut self,
        notifier: observe::notify::Notifier,
        hup: mpsc::Receiver<()>,
    ) -> Self {
        self.watchdog = observe::notify::Watchdog::new(&notifier);
        self.notifier = notifier;
        self.hup = Some(hup);
        self
    }

    /// Exec mode with a config already in place (a previous run's last good one): serves
    /// it now rather than wait for etcd.
    pub async fn start_haproxy_if_due(&mut self) -> Result<bool, Error> {
        if let ReloadMode::Exec { command, socket } = &self.config.reload {
            return Ok(self.applier.start_haproxy_if_due(command, socket).await?);
        }
        Ok(false)
    }

    /// Runs until `shutdown`, HAProxy's exit (exec mode) or the end of `source`.
    pub async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Update>,
        mut source: JoinHandle<Result<(), Error>>,
        shutdown: CancellationToken,
    ) -> Result<i32, Error> {
        let far = || Instant::now() + Duration::from_secs(86_400);
        let result = loop {
            let watchdog = self.watchdog.pet();
            self.hold.release_if_back(&self.model);
            let deadline = self.coalescer.deadline().map(|d| self.hold.delay(d));
            if deadline.is_some_and(|d| d <= Instant::now()) && !shutdown.is_cancelled() {
                // Due now: apply without a timer (tokio's timers fire on the next whole
                // millisecond, which was a fifth of a join's put → served).
                while let Ok(u) = rx.try_recv() {
                    self.on_update(u);
                }
                if let Err(e) = self.apply_unless_held().await {
                    break Err(e);
                }
                continue;
            }
            let check_due = self.check.is_none() && self.applier.files_due();
            let mut haproxy_exit = self.applier.haproxy().map(|c| c.exit_watch());
            let exited = async {
                match haproxy_exit.as_mut() {
                    Some(rx) => rx.wait_for(Option::is_some).await.ok().and_then(|s| *s),
                    None => std::future::pending().await,
                }
            };
            let check = async {
                match self.check.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            };
            let hup = async {
                match self.hup.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(0),
                status = exited => {
                    let status = status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(1 << 8));
                    error!(%status, "HAProxy exited; stopping");
                    break Ok(exit_code(status));
                }
                r = &mut source => {
                    break Err(match r {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => Error::EtcdUnavailable("registry follower ended".into()),
                        Err(e) => Error::EtcdUnavailable(format!("registry follower failed: {e}")),
                    });
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                    // Take everything already queued into this apply.
                    while let Ok(u) = rx.try_recv() {
                        self.on_update(u);
                    }
                    if let Err(e) = self.apply_unless_held().await {
                        break Err(e);
                    }
                }
                done = check => {
                    self.check = None;
                    match done {
                        Ok(done) => self.on_check_done(done).await,
                        Err(e) => error!(error = %e, "background config check failed to run"),
                    }
                }
                _ = tokio::time::sleep_until(self.next_check_at), if check_due => {
                    if let Some(job) = self.applier.next_check() {
                        self.check = Some(tokio::spawn(job.run()));
                    }
                }
                u = rx.recv() => match u {
                    Some(u) => self.on_update(u),
                    None => continue,
                },
                Some(()) = hup => self.reload_templates().await,
                _ = tokio::time::sleep_until(self.retry_at.unwrap_or_else(far)), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    self.coalescer.changed(Instant::now());
                }
                _ = tokio::time::sleep_until(self.next_live_check.unwrap_or_else(far)), if self.synced && self.next_live_check.is_some() => {
                    self.next_live_check = self.config.resync.map(|p| Instant::now() + p);
                    if self.applier.check_live().await {
                        self.coalescer.changed(Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(self.next_probe), if self.synced && matches!(self.applier.reloader, crate::apply::Reloader::Master(_)) => {
                    self.next_probe = Instant::now() + PROBE_EVERY;
                    if let Some((what, lost)) = self.applier.haproxy_replaced().await {
                        if lost {
                            warn!("{what}; applying the registry to it again");
                        } else {
                            info!("{what}; applying the registry to it again");
                        }
                        self.coalescer.changed(Instant::now());
                    }
                }
                // Wakes the loop for its watchdog ping (sent at the top of the loop).
                _ = tokio::time::sleep_until(watchdog.unwrap_or_else(far)), if watchdog.is_some() => {}
            }
        };
        self.notifier.stopping();
        self.stop(&result, &shutdown).await;
        result
    }

    /// SIGHUP: reads and compiles every template again and renders it with the current
    /// registry before it replaces the running ones; the result is applied through the
    /// normal path (runtime API or one confirmed reload, nothing if the output is the
    /// same). A template that no longer loads or renders keeps everything as it runs.
    async fn reload_templates(&mut self) {
        self.notifier.reloading("reloading templates (SIGHUP)");
        let candidate = match crate::start::compile(&self.config).await {
            Ok(r) => {
                // The new templates' data: with the flat list if any of them may read it.
                self.model.set_flat_list(r.reads_flat_instances());
                self.trial_render(&r).map(|()| r)
            }
            Err(e) => Err(e),
        };
        if candidate.is_err() {
            self.model
                .set_flat_list(self.renderer.reads_flat_instances());
        }
        let result = match candidate {
            Ok(renderer) => {
                self.renderer = renderer;
                // Rebuilt from the model by the next apply, for the new templates.
                self.data = TemplateData::new();
                if self.synced {
                    // Before the first listing there is nothing to apply yet: it applies
                    // with the new templates when it comes.
                    self.coalescer.changed(Instant::now());
                    self.ready_due = true;
                }
                info!(
                    templates = self.config.templates.len(),
                    "templates reloaded; applying"
                );
                "ok"
            }
            Err(e) => {
                error!(error = %e, "SIGHUP: the templates were not reloaded; keeping the running templates and config");
                self.notifier
                    .ready(&format!("template reload failed, running config kept: {e}"));
                "failed"
            }
        };
        self.metrics
            .template_reloads
            .get_or_create(&metrics::ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Renders every target with `renderer` from the current registry, writing nothing.
    fn trial_render(&self, renderer: &Renderer) -> Result<(), crate::render::RenderFailure> {
        let (data, _) = self.model.template_data_with(
            &self.config.vars,
            &self.quarantine.keys(),
            self.config.max_instances_per_service,
        );
        let ctx = renderer.context(data);
        for t in &self.applier.targets {
            renderer.render_with(&t.name, &ctx)?;
        }
        Ok(())
    }

    /// One line for systemd's STATUS=.
    fn status_line(&self, applied: &str) -> String {
        format!(
            "revision {}, {} instances, last apply: {applied}",
            self.model.revision,
            self.model.len()
        )
    }

    /// Feeds an update to the model and tells the coalescer if anything changed.
    fn on_update(&mut self, u: Update) {
        if apply_update(&mut self.model, u, &mut self.synced, &self.metrics) {
            self.coalescer.changed(Instant::now());
            self.metrics.last_change.set(metrics::unix_now());
        }
    }

    /// [`Daemon::apply`], unless a service that had two or more instances lost all of them
    /// at once: then its servers stay for `--empty-hold`, waiting for them to register
    /// again (the loop re-checks on every change and applies once all of them are back).
    async fn apply_unless_held(&mut self) -> Result<(), Error> {
        if self
            .hold
            .holds(Instant::now(), &self.applied_set, &self.model)
        {
            return Ok(());
        }
        self.apply().await
    }

    /// Renders and applies the model.
    async fn apply(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        // From the arrival of the oldest change taken to this apply's start: the coalescing
        // wait (zero for a change after a quiet period or after a live apply).
        let waited = self
            .coalescer
            .first_pending()
            .map_or(Duration::ZERO, |first| {
                started.saturating_duration_since(first)
            });
        let report = guard::apply_guarded(
            &self.config,
            &mut self.model,
            &mut self.data,
            &mut self.quarantine,
            &mut self.applier,
            &self.renderer,
        )
        .await;
        self.retry_at = report.retry.then(|| Instant::now() + RETRY_EVERY);
        if report.reloaded || !report.errors.is_empty() {
            self.coalescer.applied(Instant::now());
        } else {
            self.coalescer.applied_live();
        }
        self.book();
        let quarantine = &self.quarantine;
        let prefix = &self.config.prefix;
        let admitted = |s: &str, i: &str| {
            quarantine.is_empty() || !quarantine.contains(&registry::instance_key(prefix, s, i))
        };
        // Only the services changed since the applied set was last committed; all of them
        // while anything is quarantined (what is admitted then depends on more).
        let scope = if quarantine.is_empty() {
            self.unbooked.services()
        } else {
            None
        };
        let (added, removed) = diff_applied_in(
            &mut self.applied_set,
            &self.model,
            admitted,
            report.errors.is_empty(),
            scope.as_ref(),
        );
        if report.errors.is_empty() {
            self.unbooked = Changes::Some(Default::default());
        }
        if report.errors.is_empty() {
            // Applied without them: their leaving needs no more remembering.
            self.model.take_departed();
        }
        self.hold.applied(&self.applied_set, Instant::now());
        self.record(&report, started.elapsed());
        if !self.cookie_key_checked && report.errors.is_empty() {
            self.cookie_key_checked = true;
            warn_public_cookie_key(&self.applier);
        }
        info!(
            revision = self.model.revision,
            instances = self.model.len(),
            ?added,
            ?removed,
            written = report.written,
            applied = report.reload.unwrap_or("unchanged"),
            errors = report.errors.len(),
            took = ?started.elapsed(),
            waited = ?waited,
            data = ?report.timings.data,
            render = ?report.timings.render,
            plan = ?report.timings.plan,
            runtime = ?report.timings.runtime,
            verify = ?report.timings.verify,
            "apply"
        );
        let line = self.status_line(report.reload.unwrap_or("unchanged"));
        if self.ready_due && report.errors.is_empty() {
            self.ready_due = false;
            self.notifier.ready(&line);
        } else {
            self.notifier.status(&line);
        }
        self.start_haproxy_if_due().await?;
        Ok(())
    }

    /// A background check finished: the file is written, or HAProxy went back to the last
    /// good file and the record the check blamed is quarantined before the next apply.
    async fn on_check_done(&mut self, done: CheckDone) {
        let started = Instant::now();
        self.next_check_at = started + done.took;
        let outcome = self.applier.finish_check(done).await;
        if outcome.errors.is_empty() {
            return;
        }
        if outcome.retry {
            self.next_check_at = started + RETRY_EVERY;
        }
        let message = outcome.errors.first().cloned().unwrap_or_default();
        let pinned = outcome
            .rejected
            .as_deref()
            .and_then(|line| self.quarantine.pin(&self.model, line, &message));
        if pinned.is_some() {
            // Render again without the quarantined record.
            self.coalescer.changed(Instant::now());
        }
        let report = apply::Report {
            reload: outcome
                .reloaded
                .then_some("rolled back to the last good config"),
            reloaded: outcome.reloaded,
            errors: outcome.errors,
            ..Default::default()
        };
        self.record(&report, started.elapsed());
        info!(
            revision = self.model.revision,
            instances = self.model.len(),
            applied = report.reload.unwrap_or("unchanged"),
            errors = report.errors.len(),
            "apply"
        );
    }

    /// Updates metrics, readiness and `/status` after an apply or a background check.
    fn record(&mut self, report: &apply::Report, took: Duration) {
        self.book();
        self.served.update(&self.model, &self.status_stale);
        self.status_stale = Changes::Some(Default::default());
        let ok = report.errors.is_empty();
        self.metrics.record_apply(
            ok,
            self.model.revision,
            self.model.services().iter().map(|(s, ids)| (s, ids.len())),
            self.quarantine.messages().count(),
            self.applier.targets.first().and_then(|t| t.last.as_deref()),
        );
        let doc = crate::status::StatusDoc::after_apply(
            &self.model,
            &self.served,
            &self.quarantine,
            self.applier.files_due(),
            report,
            took,
        );
        self.state
            .set_applied(ok, std::sync::Arc::new(move || doc.to_json()));
    }

    /// Takes the model's changes since the last look into both bookkeeping queues (the
    /// applied set's and `/status`'s).
    fn book(&mut self) {
        let booked = self.model.take_booked();
        self.status_stale.merge(booked.clone());
        self.unbooked.merge(booked);
    }

    /// Writes the files HAProxy is ahead of; stops HAProxy in exec mode on a clean shutdown.
    async fn stop(&mut self, result: &Result<i32, Error>, shutdown: &CancellationToken) {
        if let Some(check) = self.check.take() {
            check.abort();
        }
        self.applier.flush().await;
        if let Some(child) = self.applier.haproxy() {
            if result.as_ref().is_ok_and(|_| shutdown.is_cancelled()) {
                info!("stopping HAProxy gracefully (SIGUSR1: finish in-flight requests)");
                let status = child.stop(Signal::SIGUSR1, self.config.stop_timeout).await;
                info!(%status, "HAProxy stopped");
            }
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    match observe::process::exit_code(status) {
        Some(0) | None => 1, // HAProxy exiting on its own is a failure for a load balancer.
        Some(c) => c,
    }
}

/// The `dynamic-cookie-key` the shipped template falls back to: public, so anyone can
/// compute which server a cookie pins (and forge one for any server).
const PUBLIC_COOKIE_KEY: &[u8] = b"dynamic-cookie-key lb-registry-change-me";

/// Warns when an applied config uses the shipped, public dynamic-cookie key.
fn warn_public_cookie_key(applier: &Applier) {
    let public = applier.targets.iter().any(|t| {
        t.last.as_deref().is_some_and(|b| {
            b.windows(PUBLIC_COOKIE_KEY.len())
                .any(|w| w == PUBLIC_COOKIE_KEY)
        })
    });
    if public {
        warn!("the config uses the shipped, public dynamic-cookie-key: sticky-session cookies can be predicted and forged; set --var cookie_key=<secret> (the same on every load balancer)");
    }
}

/// Feeds an update to the model; true if something was admitted or removed (or this is
/// the first full listing, which must always be applied).
fn apply_update(
    model: &mut Model,
    update: Update,
    synced: &mut bool,
    m: &metrics::Metrics,
) -> bool {
    let changed = apply_update_inner(model, update, synced);
    for reason in model.take_new_skips() {
        m.records_skipped
            .get_or_create(&metrics::ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
    changed
}

fn apply_update_inner(model: &mut Model, update: Update, synced: &mut bool) -> bool {
    match update {
        Update::Snapshot { revision, kvs } => {
            let changed = model.reset(
                kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                revision,
            );
            let first = !*synced;
            *synced = true;
            changed || first
        }
        Update::Changes { revision, changes } => {
            let mut changed = false;
            for c in changes {
                changed |= match c {
                    watch::Change::Put { key, value } => model.put(&key, &value),
                    watch::Change::Delete { key } => model.delete(&key),
                };
            }
            model.revision = revision;
            changed
        }
    }
}

#[cfg(test)]
mod tests;
