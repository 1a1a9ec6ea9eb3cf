//! Exec mode: the app runs as our child in its own process group (so a terminal's Ctrl-C
//! reaches us first and the lease is revoked before the app stops); we forward signals
//! and report its exit status the way a shell does (128+N for a signal).

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// The running app.
pub struct App {
    child: Child,
    pid: Pid,
}

impl App {
    /// Starts `command` (program + args) with our stdio.
    pub fn spawn(command: &[String]) -> std::io::Result<App> {
        let (program, args) = command.split_first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command")
        })?;
        let mut command = Command::new(program);
        observe::notify::scrub(&mut command);
        let child = command
            .args(args)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let raw = child
            .id()
            .ok_or_else(|| std::io::Error::other("child exited before its pid was read"))?;
        let pid = Pid::from_raw(raw as i32);
        info!(pid = raw, command = ?command, "started app");
        Ok(App { child, pid })
    }

    /// Sends `signal` to the app.
    pub fn signal(&self, signal: Signal) {
        if let Err(e) = kill(self.pid, signal) {
            warn!(%signal, error = %e, "could not signal the app");
        }
    }

    /// Waits for the app to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal`, waits up to `timeout`, then SIGKILLs.
    pub async fn stop(&mut self, signal: Signal, timeout: Duration) -> std::io::Result<ExitStatus> {
        let pid = self.pid;
        let send = move |s: Signal| {
            if let Err(e) = kill(pid, s) {
                warn!(signal = %s, error = %e, "could not signal the app");
            }
        };
        observe::process::stop(send, self.child.wait(), signal, timeout, "the app").await
    }
}

/// Shell-style exit code: the exit code, or 128 + signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    observe::process::exit_code(status).unwrap_or(1)
}
