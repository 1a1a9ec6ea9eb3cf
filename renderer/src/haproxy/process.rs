//! HAProxy as a process: its version (`haproxy -v`), HAProxy run as our child in
//! master-worker mode (exec mode), and a user's own reload command.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{parse_version, HaproxyError, MasterCli};

/// HAProxy's version from what `program -v` prints ("HAProxy version 3.0.11-1+deb13u4 …"
/// → "3.0.11"); `None` when it cannot be run or says something else.
pub async fn detect_version(program: &str) -> Option<String> {
    let run = Command::new(program)
        .arg("-v")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .ok()?
        .ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// HAProxy run as our child in master-worker mode (exec mode).
pub struct HaproxyChild {
    pid: Pid,
    pub cli: MasterCli,
    /// Set once HAProxy has exited (a task owns the process handle and reaps it).
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl HaproxyChild {
    /// Starts `command`, adding `-S <socket>` (master CLI) unless the command has `-S`.
    pub async fn start(
        command: &[String],
        master_socket: &Path,
    ) -> Result<HaproxyChild, HaproxyError> {
        let (program, args) = command.split_first().ok_or_else(|| HaproxyError::Spawn {
            command: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        observe::notify::scrub(&mut cmd);
        let socket = match args.iter().position(|a| a == "-S") {
            Some(i) => PathBuf::from(
                args.get(i + 1)
                    .map(|s| s.split(',').next().unwrap_or(s).to_string())
                    .unwrap_or_default(),
            ),
            None => {
                let _ = std::fs::remove_file(master_socket);
                cmd.arg("-S").arg(master_socket);
                master_socket.to_path_buf()
            }
        };
        let mut child: Child = cmd.spawn().map_err(|source| HaproxyError::Spawn {
            command: command.join(" "),
            source,
        })?;
        let raw = child.id().unwrap_or(0);
        info!(pid = raw, command = ?command, master_socket = %socket.display(), "started HAProxy");
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            match status {
                Ok(s) => {
                    tx.send_replace(Some(s));
                }
                Err(e) => {
                    warn!(error = %e, "cannot wait for HAProxy");
                    tx.send_replace(Some(std::os::unix::process::ExitStatusExt::from_raw(
                        1 << 8,
                    )));
                }
            }
        });
        Ok(HaproxyChild {
            pid: Pid::from_raw(raw as i32),
            cli: MasterCli::new(socket),
            exit,
        })
    }

    /// A receiver that holds `Some(status)` once HAProxy has exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// Waits until the master answers with a worker, or fails if HAProxy exits first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), HaproxyError> {
        let mut exit = self.exit.clone();
        tokio::select! {
            status = exit.wait_for(Option::is_some) => Err(match status.ok().and_then(|s| *s) {
                Some(s) => HaproxyError::Exited(s),
                None => HaproxyError::NotReady(timeout),
            }),
            r = self.cli.wait_ready(timeout) => r.map(|_| ()),
        }
    }

    /// Resolves when HAProxy exits.
    pub async fn wait(&self) -> ExitStatus {
        let mut exit = self.exit.clone();
        let status = exit.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(1 << 8))
    }

    pub fn signal(&self, sig: Signal) {
        if let Err(e) = kill(self.pid, sig) {
            warn!(signal = %sig, error = %e, "cannot signal HAProxy");
        }
    }

    /// Passes `sig` on and waits up to `timeout` before SIGKILL.
    pub async fn stop(&self, sig: Signal, timeout: Duration) -> ExitStatus {
        observe::process::stop(|s| self.signal(s), self.wait(), sig, timeout, "HAProxy").await
    }
}

/// Runs a user-supplied reload command with a timeout.
pub async fn run_reload_command(command: &str, timeout: Duration) -> Result<(), HaproxyError> {
    let err = |message: String| HaproxyError::Command {
        command: command.to_string(),
        message,
    };
    match observe::process::shell(&[], command, timeout).await {
        Err(e) => Err(err(e.to_string())),
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(err(format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .chars()
                .take(1000)
                .collect::<String>()
        ))),
    }
}
