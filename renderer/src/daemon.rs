//! The renderer's loop as a type: registry updates feed the [`Model`]; the [`Coalescer`]
//! says when to apply; an apply renders and brings HAProxy along (live through the runtime
//! API when only servers changed, else check + write + reload); the file of a live state
//! is checked and written in the background, one check at a time, never in front of the
//! next live change.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apply::{self, Applier, CheckDone};

/// How often the master of an HAProxy started elsewhere is asked whether it was restarted.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How soon a file that could not be written (a full disk) is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
use crate::coalesce::Coalescer;
use crate::config::{Config, ReloadMode};
use crate::data::TemplateData;
use crate::error::Error;
use crate::guard::{self, Quarantine};
use crate::metrics;
use crate::model::Model;
use crate::render::Renderer;
use crate::watch::{self, Update};

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
    /// `--empty-hold`: a service lost every instance at once; nothing is applied before
    /// this unless they all come back: (until, service, how many it had).
    hold: Option<(Instant, String, usize)>,
    /// Per service, the most instances applied within the last `--empty-hold` (and when):
    /// a mass revocation reaches the watch as several events, applied one by one, so
    /// "at once" is judged over that window, not over one apply.
    peaks: BTreeMap<String, (usize, Instant)>,
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
        Daemon {
            model: Model::new(&config.prefix),
            data: TemplateData::new(),
            coalescer: Coalescer::new(config.wait_min, config.wait_max),
            config,
            renderer,
            applier,
            synced: false,
            applied_set: Applied::new(),
            quarantine: Quarantine::default(),
            cookie_key_checked: false,
            metrics,
            state,
            check: None,
            next_check_at: Instant::now(),
            next_probe: Instant::now() + PROBE_EVERY,
            next_live_check,
            retry_at: None,
            hold: None,
            peaks: BTreeMap::new(),
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
            if let Some((_, service, had)) = &self.hold {
                let now = self.model.services().get(service).map_or(0, BTreeMap::len);
                if now >= *had {
                    info!(%service, instances = now, "the service's instances are back; applying");
                    self.hold = None;
                }
            }
            let deadline = self
                .coalescer
                .deadline()
                .map(|d| self.hold.as_ref().map_or(d, |h| d.max(h.0)));
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
            Ok(r) => self.trial_render(&r).map(|()| r),
            Err(e) => Err(e),
        };
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
        let hold = self.config.empty_hold;
        if !hold.is_zero() {
            let now = Instant::now();
            if self.hold.is_none() {
                if let Some((service, had)) = emptied(&self.applied_set, &self.peaks, &self.model) {
                    warn!(%service, instances = had, ?hold, "every instance of the service left at once; keeping its servers while they may register again (--empty-hold)");
                    self.hold = Some((now + hold, service, had));
                }
            }
            if let Some((until, service, had)) = &self.hold {
                if now < *until {
                    return Ok(());
                }
                let back = self.model.services().get(service).map_or(0, BTreeMap::len);
                warn!(%service, instances = back, had, "the service did not get its instances back within --empty-hold; applying");
            }
        }
        self.hold = None;
        self.apply().await
    }

    /// Renders and applies the model.
    async fn apply(&mut self) -> Result<(), Error> {
        let started = Instant::now();
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
        let quarantine = &self.quarantine;
        let prefix = &self.config.prefix;
        let admitted = |s: &str, i: &str| {
            quarantine.is_empty() || !quarantine.contains(&registry::instance_key(prefix, s, i))
        };
        let (added, removed) = diff_applied(
            &mut self.applied_set,
            &self.model,
            admitted,
            report.errors.is_empty(),
        );
        if report.errors.is_empty() {
            // Applied without them: their leaving needs no more remembering.
            self.model.take_departed();
        }
        note_peaks(
            &mut self.peaks,
            &self.applied_set,
            Instant::now(),
            self.config.empty_hold,
        );
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
    fn record(&self, report: &apply::Report, took: Duration) {
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
            &self.quarantine,
            self.applier.files_due(),
            report,
            took,
        );
        self.state.set_applied(ok, doc.to_json());
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

/// The instances of the last applied config: service → ids.
type Applied = BTreeMap<String, BTreeSet<String>>;

/// A service with at least one instance applied and none in the model, that had two or
/// more applied within the last `--empty-hold` ([`note_peaks`]), with that many — unless
/// every applied instance left on purpose (deleted while its record said `leaving`): a
/// deliberate stop of the whole service is applied at once.
fn emptied(
    applied: &Applied,
    peaks: &BTreeMap<String, (usize, Instant)>,
    model: &Model,
) -> Option<(String, usize)> {
    applied.iter().find_map(|(name, ids)| {
        let had = peaks.get(name).map_or(0, |p| p.0).max(ids.len());
        let gone = model.services().get(name).is_none_or(|now| now.is_empty());
        let deliberate = model
            .departed()
            .get(name)
            .is_some_and(|left| ids.iter().all(|id| left.contains(id)));
        (had >= 2 && gone && !deliberate).then(|| (name.clone(), had))
    })
}

/// Keeps, per service, the most instances applied within the last `window`.
fn note_peaks(
    peaks: &mut BTreeMap<String, (usize, Instant)>,
    applied: &Applied,
    now: Instant,
    window: Duration,
) {
    peaks.retain(|name, (_, at)| applied.contains_key(name) || now.duration_since(*at) < window);
    for (name, ids) in applied {
        let n = ids.len();
        let peak = peaks.entry(name.clone()).or_insert((n, now));
        if n >= peak.0 || now.duration_since(peak.1) >= window {
            *peak = (n, now);
        }
    }
}

/// What the model admits (`admitted`: not quarantined) that `applied` lacks, and the
/// reverse, as [`some`] lists them; with `commit`, `applied` becomes the model's set.
/// Walks both in order and copies only services that differ: at 100 000 instances,
/// rebuilding the whole set per apply took longer than the render.
fn diff_applied(
    applied: &mut Applied,
    model: &Model,
    admitted: impl Fn(&str, &str) -> bool,
    commit: bool,
) -> (Vec<String>, Vec<String>) {
    let (mut added, mut removed) = (Listing::default(), Listing::default());
    let mut changed: Vec<(String, BTreeSet<String>)> = Vec::new();
    let empty_ids = BTreeMap::new();
    let empty_set = BTreeSet::new();
    let names: BTreeSet<&String> = model.services().keys().chain(applied.keys()).collect();
    for name in names {
        let now = model.services().get(name).unwrap_or(&empty_ids);
        let was = applied.get(name).unwrap_or(&empty_set);
        let mut now_ids = now.keys().filter(|i| admitted(name, i)).peekable();
        let mut was_ids = was.iter().peekable();
        let mut differs = false;
        loop {
            let order = match (now_ids.peek(), was_ids.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(n), Some(w)) => n.cmp(w),
            };
            match order {
                std::cmp::Ordering::Equal => {
                    now_ids.next();
                    was_ids.next();
                }
                std::cmp::Ordering::Less => {
                    if let Some(n) = now_ids.next() {
                        added.push(name, n);
                    }
                    differs = true;
                }
                std::cmp::Ordering::Greater => {
                    if let Some(w) = was_ids.next() {
                        removed.push(name, w);
                    }
                    differs = true;
                }
            }
        }
        if differs && commit {
            let ids = now.keys().filter(|i| admitted(name, i)).cloned().collect();
            changed.push((name.to_string(), ids));
        }
    }
    for (name, ids) in changed {
        if ids.is_empty() {
            applied.remove(&name);
        } else {
            applied.insert(name, ids);
        }
    }
    (added.done(), removed.done())
}

/// `service/id` of up to 10 instances, then "… and N more": an apply of 10 000 changes
/// logs one readable line, not 170 kB.
#[derive(Default)]
struct Listing {
    names: Vec<String>,
    more: usize,
}

impl Listing {
    fn push(&mut self, service: &str, id: &str) {
        if self.names.len() < 10 {
            self.names.push(format!("{service}/{id}"));
        } else {
            self.more += 1;
        }
    }

    fn done(mut self) -> Vec<String> {
        if self.more > 0 {
            self.names.push(format!("… and {} more", self.more));
        }
        self.names
    }
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    #[test]
    fn a_service_is_emptied_when_two_or_more_recent_instances_are_all_gone() {
        let mut model = Model::new("/services");
        let key = |s: &str, i: &str| registry::instance_key("/services", s, i);
        let put = |m: &mut Model, s: &str, i: &str| {
            let v = registry::Instance::new(s, i, "10.0.0.1", 80).encode();
            m.put(&key(s, i), v.as_bytes());
        };
        for (s, i) in [("web", "a"), ("web", "b"), ("web", "c"), ("solo", "x")] {
            put(&mut model, s, i);
        }
        let (t0, window) = (Instant::now(), Duration::from_secs(3));
        let mut applied = Applied::new();
        let mut peaks = BTreeMap::new();
        let mut commit = |applied: &mut Applied, model: &Model, at: Instant| {
            diff_applied(applied, model, |_, _| true, true);
            note_peaks(&mut peaks, applied, at, window);
            peaks.clone()
        };
        let p = commit(&mut applied, &model, t0);
        assert_eq!(emptied(&applied, &p, &model), None);
        // A one-instance service leaving is ordinary; some of three leaving too.
        model.delete(&key("solo", "x"));
        model.delete(&key("web", "a"));
        model.delete(&key("web", "b"));
        assert_eq!(emptied(&applied, &p, &model), None);
        // Those removals are applied one by one (as watch events arrive)…
        let p = commit(&mut applied, &model, t0 + Duration::from_millis(10));
        // …and the last one goes: the three of 10 ms ago count.
        model.delete(&key("web", "c"));
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(emptied(&applied, &p, &model), Some(("web".to_string(), 3)));
        // One is back: not empty any more.
        put(&mut model, "web", "b");
        assert_eq!(emptied(&applied, &p, &model), None);
        model.delete(&key("web", "b"));
        // A service that shrank to one long ago and now loses it: ordinary.
        commit(&mut applied, &model, t1 + window);
        put(&mut model, "web", "c");
        let p = commit(&mut applied, &model, t1 + window * 2);
        model.delete(&key("web", "c"));
        assert_eq!(emptied(&applied, &p, &model), None);
    }

    #[test]
    fn applied_set_follows_the_model_and_lists_the_difference() {
        let mut model = Model::new("/services");
        let put = |m: &mut Model, s: &str, i: &str| {
            let v = registry::Instance::new(s, i, "10.0.0.1", 80).encode();
            m.put(&registry::instance_key("/services", s, i), v.as_bytes());
        };
        for i in ["a", "b", "c"] {
            put(&mut model, "web", i);
        }
        let mut applied = Applied::new();
        let all = |_: &str, _: &str| true;
        let (added, removed) = diff_applied(&mut applied, &model, all, true);
        assert_eq!((added.len(), removed.len()), (3, 0));
        model.delete(&registry::instance_key("/services", "web", "b"));
        put(&mut model, "api", "x");
        // Not committed (the apply failed): the difference stays.
        for _ in 0..2 {
            let (added, removed) = diff_applied(&mut applied, &model, all, false);
            assert_eq!(
                (added, removed),
                (vec!["api/x".to_string()], vec!["web/b".to_string()])
            );
        }
        let (added, _) = diff_applied(&mut applied, &model, all, true);
        assert_eq!(added, ["api/x"]);
        assert_eq!(
            diff_applied(&mut applied, &model, all, true),
            (vec![], vec![])
        );
        // A quarantined instance is not applied: it counts as removed.
        let (_, removed) = diff_applied(&mut applied, &model, |s, i| (s, i) != ("web", "c"), true);
        assert_eq!(removed, ["web/c"]);
        // Many changes: ten names, then a count.
        for i in 0..25 {
            put(&mut model, "bulk", &format!("i{i:02}"));
        }
        let (added, _) = diff_applied(&mut applied, &model, all, true);
        assert_eq!(added.len(), 11);
        assert_eq!(added[10], "… and 16 more");
    }
}

/// The loop driven in-process, in paused time: a file target without a check, no HAProxy.
#[cfg(test)]
mod loop_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::watch::Change;
    use clap::Parser;

    struct Harness {
        tx: mpsc::Sender<Update>,
        dest: std::path::PathBuf,
        metrics: metrics::Metrics,
        shutdown: CancellationToken,
        task: JoinHandle<Result<i32, Error>>,
        hup: mpsc::Sender<()>,
        tpl: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn value(service: &str, id: &str) -> Vec<u8> {
        registry::Instance::new(service, id, "10.0.0.1", 80)
            .encode()
            .into_bytes()
    }

    fn put(id: &str) -> Change {
        Change::Put {
            key: registry::instance_key("/services", "web", id),
            value: value("web", id),
        }
    }

    /// `id`'s record marked `leaving` (what a registrar writes before it revokes).
    fn leaving(id: &str) -> Change {
        let mut inst = registry::Instance::new("web", id, "10.0.0.1", 8080);
        inst.state = Some(registry::RecordState::Leaving);
        Change::Put {
            key: registry::instance_key("/services", "web", id),
            value: inst.encode().into_bytes(),
        }
    }

    fn delete(id: &str) -> Change {
        Change::Delete {
            key: registry::instance_key("/services", "web", id),
        }
    }

    async fn start(extra: &[&str]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("t.hbs");
        std::fs::write(
            &tpl,
            "{{#each services}}{{@key}}:{{#each this}} {{id}}{{/each}}\n{{/each}}",
        )
        .unwrap();
        let dest = dir.path().join("out.cfg");
        let spec = format!("{}:{}", tpl.display(), dest.display());
        let mut args = vec![
            "renderer",
            "--template",
            &spec,
            "--check-cmd",
            "",
            "--haproxy-version",
            "2.6",
        ];
        args.extend_from_slice(extra);
        let config = Config::from_args(crate::Args::try_parse_from(args).unwrap()).unwrap();
        let (renderer, targets) = crate::start::load_templates(&config).await.unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = metrics::Metrics::new(&mut registry);
        let state = metrics::State::new(config.ready_grace);
        let applier = crate::start::applier(&config, targets, metrics.clone(), false);
        let (hup, hup_rx) = mpsc::channel(1);
        let mut daemon = Daemon::new(config, renderer, applier, metrics.clone(), state)
            .with_service_manager(observe::notify::Notifier::disabled(), hup_rx);
        let (tx, rx) = mpsc::channel(16);
        let source = tokio::spawn(std::future::pending::<Result<(), Error>>());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move { daemon.run(rx, source, stop).await });
        Harness {
            tx,
            dest,
            metrics,
            shutdown,
            task,
            hup,
            tpl,
            _dir: dir,
        }
    }

    impl Harness {
        fn file(&self) -> String {
            std::fs::read_to_string(&self.dest).unwrap_or_default()
        }

        fn applies(&self) -> u64 {
            self.metrics
                .applies
                .get_or_create(&metrics::ResultLabel {
                    result: "ok".into(),
                })
                .get()
        }

        async fn snapshot(&self, ids: &[&str]) {
            let kvs = ids
                .iter()
                .map(|id| {
                    (
                        registry::instance_key("/services", "web", id),
                        value("web", id),
                    )
                })
                .collect();
            self.tx
                .send(Update::Snapshot { revision: 1, kvs })
                .await
                .unwrap();
        }

        async fn changes(&self, revision: i64, changes: Vec<Change>) {
            self.tx
                .send(Update::Changes { revision, changes })
                .await
                .unwrap();
        }

        /// Advances paused time in 5 ms steps until the file reads `want`; returns how long
        /// that took. Panics after `limit`.
        async fn until_file(&self, want: &str, limit: Duration) -> Duration {
            let started = Instant::now();
            while self.file() != want {
                assert!(
                    started.elapsed() <= limit,
                    "file is {:?}, not {want:?}, after {limit:?}",
                    self.file()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            started.elapsed()
        }

        /// Advances paused time by `period`, asserting the file stays `want` throughout.
        async fn file_stays(&self, want: &str, period: Duration) {
            let end = Instant::now() + period;
            while Instant::now() < end {
                assert_eq!(self.file(), want);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            assert_eq!(self.task.await.unwrap().unwrap(), 0);
        }
    }

    /// The first change after a quiet period is applied at once; a storm of changes (one
    /// every 50 ms for 2 s) is merged into applies at least --wait-min apart and never
    /// more than --wait-max after the first change they hold, and nothing is lost. (Without HAProxy every apply counts as a
    /// reload: writing files is all there is.)
    #[tokio::test(start_paused = true)]
    async fn changes_are_applied_at_once_and_storms_coalesced() {
        let h = start(&["--wait-min", "100ms", "--wait-max", "400ms"]).await;
        h.snapshot(&["a", "b"]).await;
        let took = h.until_file("web: a b\n", Duration::from_secs(1)).await;
        assert!(took < Duration::from_millis(20), "applied after {took:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.applies(), 1);
        // Quiet for a second: the next change goes at once.
        h.changes(2, vec![put("c")]).await;
        let took = h.until_file("web: a b c\n", Duration::from_secs(1)).await;
        assert!(took < Duration::from_millis(20), "applied after {took:?}");
        let mut times = vec![Instant::now()];
        let mut seen = h.applies();
        let mut want = "web: a b c".to_string();
        for i in 0..40 {
            let id = format!("x{i:02}");
            want.push_str(&format!(" {id}"));
            h.changes(10 + i, vec![put(&id)]).await;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if h.applies() > seen {
                    seen = h.applies();
                    times.push(Instant::now());
                }
            }
        }
        want.push('\n');
        h.until_file(&want, Duration::from_millis(500)).await;
        let storm = seen - 2;
        assert!(
            (4..=20).contains(&storm),
            "{storm} applies for 40 changes in 2 s"
        );
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(95),
                "applies {gap:?} apart in a storm"
            );
            // --wait-max counts from the first change not yet applied, which arrives up to
            // one interval (50 ms) after the previous apply.
            assert!(
                gap <= Duration::from_millis(460),
                "{gap:?} without an apply in a storm"
            );
        }
        h.stop().await;
    }

    /// Every instance of a service leaving at once keeps its servers for --empty-hold while
    /// they may come back; all back → nothing changes; gone for good → applied after it.
    #[tokio::test(start_paused = true)]
    async fn a_service_emptied_at_once_is_held() {
        let h = start(&["--wait-min", "10ms", "--empty-hold", "3s"]).await;
        h.snapshot(&["a", "b", "c"]).await;
        h.until_file("web: a b c\n", Duration::from_secs(1)).await;
        // All three revoked (a leader resuming revokes every lease): held.
        h.changes(2, vec![delete("a"), delete("b"), delete("c")])
            .await;
        h.file_stays("web: a b c\n", Duration::from_secs(2)).await;
        // They register again within the hold: released, the file never changed.
        h.changes(3, vec![put("a"), put("b")]).await;
        h.file_stays("web: a b c\n", Duration::from_millis(200))
            .await;
        h.changes(4, vec![put("c")]).await;
        h.file_stays("web: a b c\n", Duration::from_secs(4)).await;
        // Gone for good (arriving as separate events): applied once the hold ends.
        h.changes(5, vec![delete("a")]).await;
        h.until_file("web: b c\n", Duration::from_secs(1)).await;
        h.changes(6, vec![delete("b")]).await;
        h.changes(7, vec![delete("c")]).await;
        h.file_stays("web: b c\n", Duration::from_millis(2900))
            .await;
        h.until_file("", Duration::from_secs(1)).await;
        h.stop().await;
    }

    /// SIGHUP reads the templates again: an edited one is applied with the registry as it
    /// is; one that no longer compiles or renders keeps the running config and counts as a
    /// failed reload; fixed, the next SIGHUP applies it.
    #[tokio::test(start_paused = true)]
    async fn sighup_reloads_templates_and_keeps_the_config_when_one_is_broken() {
        let h = start(&["--wait-min", "10ms"]).await;
        h.snapshot(&["a", "b"]).await;
        h.until_file("web: a b\n", Duration::from_secs(1)).await;
        let reloads = |result: &str| {
            h.metrics
                .template_reloads
                .get_or_create(&metrics::ResultLabel {
                    result: result.into(),
                })
                .get()
        };
        std::fs::write(&h.tpl, "{{#each services.web}}{{id}};{{/each}}\n").unwrap();
        h.hup.send(()).await.unwrap();
        h.until_file("a;b;\n", Duration::from_secs(1)).await;
        assert_eq!(reloads("ok"), 1);
        // Does not compile: kept, and changes go on being applied with the old one.
        std::fs::write(&h.tpl, "{{#each services.web}}{{id}};\n").unwrap();
        h.hup.send(()).await.unwrap();
        h.changes(2, vec![put("c")]).await;
        h.until_file("a;b;c;\n", Duration::from_secs(1)).await;
        assert_eq!(reloads("failed"), 1);
        // Compiles but does not render (strict mode: an unknown variable).
        std::fs::write(&h.tpl, "{{nonexistent.field}}\n").unwrap();
        h.hup.send(()).await.unwrap();
        h.file_stays("a;b;c;\n", Duration::from_millis(200)).await;
        assert_eq!(reloads("failed"), 2);
        std::fs::write(&h.tpl, "{{#each services.web}}{{id}}|{{/each}}\n").unwrap();
        h.hup.send(()).await.unwrap();
        h.until_file("a|b|c|\n", Duration::from_secs(1)).await;
        assert_eq!(reloads("ok"), 2);
        h.stop().await;
    }

    /// Every instance stopped on purpose (each record marked `leaving`, then deleted) is a
    /// deliberate act: applied at once, not held. One lost without the mark among them
    /// keeps the hold.
    #[tokio::test(start_paused = true)]
    async fn a_service_stopped_on_purpose_is_emptied_at_once() {
        let h = start(&["--wait-min", "10ms", "--empty-hold", "3s"]).await;
        h.snapshot(&["a", "b", "c"]).await;
        h.until_file("web: a b c\n", Duration::from_secs(1)).await;
        h.changes(2, vec![leaving("a"), leaving("b"), leaving("c")])
            .await;
        h.changes(3, vec![delete("a"), delete("b"), delete("c")])
            .await;
        let took = h.until_file("", Duration::from_secs(1)).await;
        assert!(took < Duration::from_millis(100), "{took:?}");
        // Back, then two leave on purpose and one loses its lease: held.
        h.changes(4, vec![put("a"), put("b"), put("c")]).await;
        h.until_file("web: a b c\n", Duration::from_secs(1)).await;
        h.changes(5, vec![leaving("a"), leaving("b")]).await;
        h.changes(6, vec![delete("a"), delete("b"), delete("c")])
            .await;
        h.file_stays("web: a b c\n", Duration::from_secs(2)).await;
        h.until_file("", Duration::from_secs(2)).await;
        h.stop().await;
    }

    /// With --empty-hold 0 the same revocation is applied at once.
    #[tokio::test(start_paused = true)]
    async fn without_a_hold_an_emptied_service_is_applied_at_once() {
        let h = start(&["--wait-min", "10ms", "--empty-hold", "0s"]).await;
        h.snapshot(&["a", "b", "c"]).await;
        h.until_file("web: a b c\n", Duration::from_secs(1)).await;
        h.changes(2, vec![delete("a"), delete("b"), delete("c")])
            .await;
        let took = h.until_file("", Duration::from_secs(1)).await;
        assert!(took < Duration::from_millis(100), "{took:?}");
        h.stop().await;
    }
}
