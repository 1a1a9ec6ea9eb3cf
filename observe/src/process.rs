//! Child processes, the same way in both binaries: a shell command bounded in time (the
//! renderer's check and reload commands, like confd's one `runCommand`), a child stopped
//! with a signal and then SIGKILL, and a shell-style exit code.

use std::future::Future;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use thiserror::Error;
use tokio::process::Command;

/// Why a shell command gave no output.
#[derive(Debug, Error)]
pub enum ShellError {
    #[error("cannot run it: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Runs `sh -c line` (behind `prefix`, e.g. `nice -n 19`, when given) with stdin closed,
/// collecting its output; killed when `timeout` passes.
pub async fn shell(prefix: &[&str], line: &str, timeout: Duration) -> Result<Output, ShellError> {
    let mut command = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg("sh");
            c
        }
        None => Command::new("sh"),
    };
    crate::notify::scrub(&mut command);
    let output = command
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, output).await {
        Ok(out) => Ok(out?),
        Err(_) => Err(ShellError::Timeout(timeout)),
    }
}

/// Sends `sig` with `send` and waits for `exited` up to `timeout`; then sends SIGKILL and
/// waits for good. `what` names the child in the warning.
pub async fn stop<T>(
    send: impl Fn(Signal),
    exited: impl Future<Output = T>,
    sig: Signal,
    timeout: Duration,
    what: &str,
) -> T {
    send(sig);
    let mut exited = std::pin::pin!(exited);
    match tokio::time::timeout(timeout, &mut exited).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(?timeout, "{what} did not exit in time; sending SIGKILL");
            send(Signal::SIGKILL);
            exited.await
        }
    }
}

/// Shell-style exit code: the exit code, or 128 + the signal number; `None` when neither
/// is known.
pub fn exit_code(status: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn shell_commands_are_bounded_in_time() {
        let out = shell(
            &[],
            "echo out; echo err >&2; exit 3",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(exit_code(out.status), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let slow = shell(&[], "sleep 5", Duration::from_millis(100)).await;
        assert!(matches!(slow, Err(ShellError::Timeout(_))));
        let niced = shell(&["nice", "-n", "5"], "nice", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&niced.stdout).trim(), "5");
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill() {
        // A child that ignores SIGTERM.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 30"])
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        // Let the shell install its trap first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let send = |s| {
            let _ = nix::sys::signal::kill(pid, s);
        };
        let status = stop(
            send,
            child.wait(),
            Signal::SIGTERM,
            Duration::from_millis(300),
            "test child",
        )
        .await
        .unwrap();
        assert_eq!(exit_code(status), Some(128 + 9));
    }
}
