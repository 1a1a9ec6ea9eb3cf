//! systemd's notify protocol (`Type=notify`), through the `sd-notify` crate: `READY=1`
//! once the daemon does its job, `RELOADING=1` … `READY=1` around a SIGHUP, `STATUS=` one
//! line, `WATCHDOG=1` from the loop that does the work, `STOPPING=1`. Without
//! `NOTIFY_SOCKET` in the environment every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// The variables systemd hands the main process; a child (HAProxy, the app, a reload
/// command) must not inherit them, or it could answer for us.
pub const INHERITED_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Removes [`INHERITED_VARS`] from a child's environment.
pub fn scrub(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for v in INHERITED_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Sends notifications to the service manager, if there is one.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// `NOTIFY_SOCKET` was set at start-up.
    enabled: bool,
    /// Half of `WATCHDOG_USEC`, when the unit has `WatchdogSec=` for this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` once.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().map(|d| d / 2),
        }
    }

    /// A notifier that never sends (tests, `--once`).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
        }
    }

    /// How often [`Notifier::watchdog`] must be called: half the unit's `WatchdogSec=`.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled)
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    /// `RELOADING=1` with the monotonic time systemd asks for (253+; older ones ignore
    /// it), and a status line. Follow with [`Notifier::ready`].
    pub fn reloading(&self, status: &str) {
        let line = one_line(status);
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(&line)]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status(&line)]),
        }
    }

    /// `STATUS=` one line.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status))]);
    }

    /// `WATCHDOG=1`: the loop is alive.
    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}

/// A status line: no newline (it would end the field), at most 200 characters.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// The only test in this crate that touches NOTIFY_SOCKET / WATCHDOG_*.
    #[test]
    fn sends_the_sequence_to_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("observe-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let recv = || {
            let mut buf = [0u8; 4096];
            let n = sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).to_string()
        };

        // Without NOTIFY_SOCKET: nothing is sent, no watchdog.
        std::env::remove_var("NOTIFY_SOCKET");
        let off = Notifier::from_env();
        off.ready("x");
        off.watchdog();
        assert_eq!(off.watchdog_interval(), None);
        sock.set_nonblocking(true).unwrap();
        assert!(sock.recv(&mut [0u8; 16]).is_err(), "nothing sent");
        sock.set_nonblocking(false).unwrap();

        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "4000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        let n = Notifier::from_env();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        n.ready("revision 7, 3 instances\nsecond line");
        assert_eq!(
            recv(),
            "READY=1\nSTATUS=revision 7, 3 instances second line\n"
        );
        n.watchdog();
        assert_eq!(recv(), "WATCHDOG=1\n");
        n.reloading("reloading templates");
        let msg = recv();
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        assert!(msg.ends_with("\nSTATUS=reloading templates\n"), "{msg}");
        n.status("ok");
        assert_eq!(recv(), "STATUS=ok\n");
        n.stopping();
        assert_eq!(recv(), "STOPPING=1\n");

        // A watchdog meant for another process (WATCHDOG_PID) is not ours.
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(Notifier::from_env().watchdog_interval(), None);
        for v in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(v);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
