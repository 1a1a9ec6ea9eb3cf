//! Is HAProxy what the applier thinks it is? An HAProxy started elsewhere can be restarted
//! or reloaded under us ([`Applier::haproxy_replaced`]), can run more than its file after
//! a renderer was killed between a live change and its file ([`Applier::adopt`], before
//! the first apply), or can be changed by hand through its runtime API
//! ([`Applier::check_live`], every `--resync`). Each forgets what HAProxy runs, so the
//! next apply reloads it from the registry's config.

use std::time::Duration;

use tracing::{debug, warn};

use super::{runtime, Applier, Reloader, Target};

impl Applier {
    /// An HAProxy started elsewhere (master CLI mode) can be restarted or reloaded under
    /// us by its supervisor or an operator: it then runs the files on disk, without the
    /// live changes whose files were still being checked. Asks the master who it is; when
    /// the master or its reload count changed behind our back, forgets what HAProxy was
    /// told at runtime (it runs the files now) and returns what happened, so the caller
    /// applies again; true when live changes were lost. `None` when nothing changed or the master does not answer (down:
    /// asked again next time).
    pub async fn haproxy_replaced(&mut self) -> Option<(String, bool)> {
        let Reloader::Master(cli) = &self.reloader else {
            return None;
        };
        let table = tokio::time::timeout(Duration::from_secs(2), cli.show_proc())
            .await
            .ok()?
            .inspect_err(|e| debug!(error = %e, "master CLI not answering"))
            .ok()?;
        table.current_worker()?; // no worker yet: starting
        let now = (table.master_pid, table.reloads);
        if std::mem::take(&mut self.reload_unreached) {
            // What HAProxy runs is unknown (`running` is None): the apply reloads it.
            self.known_master = Some(now);
            return Some((
                "HAProxy's master answers again after a reload that could not reach it".into(),
                true,
            ));
        }
        let before = self.known_master.replace(now)?;
        if before == now {
            return None;
        }
        let lost = self.targets.iter().any(Target::file_due);
        for t in &mut self.targets {
            t.running = t.last.clone();
        }
        let what = format!(
            "{} (master pid {} → {}, reloads {} → {}){}",
            if before.0 == now.0 {
                "HAProxy was reloaded by someone else"
            } else {
                "HAProxy was restarted by someone else"
            },
            before.0,
            now.0,
            before.1,
            now.1,
            if lost {
                ": live changes whose files were not written yet are gone from it"
            } else {
                ""
            }
        );
        Some((what, lost))
    }

    /// Before the first apply to an HAProxy started elsewhere (master CLI mode): it runs
    /// what the renderer before us told it, which is the file on disk only if that
    /// renderer wrote the file of every live change before it stopped (a graceful stop
    /// does; a crash between a live change and its file does not). Compares the servers
    /// HAProxy runs with the file's, weights and maintenance included; on any difference
    /// forgets what it runs, so the first apply reloads it from a freshly written file
    /// rather than plan live changes from a file it does not run (which would leave
    /// servers the registry no longer has in HAProxy). A master that does not answer is
    /// asked again at the next apply.
    pub(super) async fn adopt(&mut self) {
        if !matches!(self.reloader, Reloader::Master(_)) {
            self.adopted = true;
            return;
        }
        const WHAT: &str = "HAProxy does not run the config on disk (live changes of a renderer stopped before it wrote their file?); reloading it from the registry's config";
        match self.find_drift(true, WHAT).await {
            Ok(_) => self.adopted = true,
            Err(e) => debug!(error = %e, "cannot compare HAProxy's servers with the file yet"),
        }
    }

    /// Compares the servers HAProxy runs with the state it was given (membership, address
    /// and port; weights and maintenance set by hand through the runtime API are left
    /// alone). Every difference is logged at WARN, counted, and what HAProxy runs
    /// forgotten so the next apply reloads it; returns whether there was one. Nothing to
    /// compare without a master CLI, or while the master does not answer.
    pub async fn check_live(&mut self) -> bool {
        const WHAT: &str =
            "HAProxy runs other servers than it was given; reloading it from the registry's config";
        self.find_drift(false, WHAT)
            .await
            .inspect_err(|e| debug!(error = %e, "cannot compare HAProxy's servers with its config"))
            .unwrap_or(false)
    }

    /// Compares, per target, the servers HAProxy runs with the state it was given
    /// ([`runtime::drift`]; `state`: weights and maintenance too). A target that differs is
    /// logged at WARN as `what` with its differences, counted in
    /// `renderer_haproxy_drift_total` and forgotten (`running = None`: the next apply
    /// reloads HAProxy). True when one differed.
    async fn find_drift(&mut self, state: bool, what: &str) -> Result<bool, runtime::RuntimeError> {
        let Some(cli) = self.reloader.cli() else {
            return Ok(false);
        };
        let mut found = false;
        for t in &mut self.targets {
            let Some(running) = t.running.as_deref() else {
                continue;
            };
            let config = String::from_utf8_lossy(running);
            let differences = Box::pin(runtime::drift(cli, &config, state)).await?;
            if !differences.is_empty() {
                warn!(
                    dest = %t.file.dest.display(),
                    count = differences.len(),
                    differences = ?&differences[..differences.len().min(10)],
                    "{what}"
                );
                self.metrics.haproxy_drift.inc();
                t.running = None;
                found = true;
            }
        }
        Ok(found)
    }
}
