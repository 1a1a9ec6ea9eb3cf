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

/// WATCHDOG=1 every half `WatchdogSec=`, sent by the loop that does the work: it calls
/// [`Watchdog::pet`] on every turn and sleeps no later than the instant returned.
#[derive(Debug)]
pub struct Watchdog {
    notifier: Notifier,
    /// When the next ping is due; `None` without a watchdog.
    next: Option<tokio::time::Instant>,
}

impl Watchdog {
    /// Due at once when the unit has a watchdog for this process.
    pub fn new(notifier: &Notifier) -> Watchdog {
        Watchdog {
            next: notifier
                .watchdog_interval()
                .map(|_| tokio::time::Instant::now()),
            notifier: notifier.clone(),
        }
    }

    /// Pings if due; returns when the loop must wake for the next ping (`None`: never).
    pub fn pet(&mut self) -> Option<tokio::time::Instant> {
        let (at, every) = (self.next?, self.notifier.watchdog_interval()?);
        let now = tokio::time::Instant::now();
        if now >= at {
            self.notifier.watchdog();
            self.next = Some(now + every);
        }
        self.next
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
    use std::process::Command;

    const TEST: &str = "notify::tests::sends_the_sequence_to_the_notify_socket";

    /// The child half: runs in a process of its own with the environment systemd would
    /// give it (no variable is changed in this process).
    fn child(mode: &str) {
        let n = Notifier::from_env();
        match mode {
            "off" => {
                assert_eq!(n.watchdog_interval(), None);
                n.ready("x");
                n.watchdog();
                n.stopping();
            }
            "foreign-watchdog" => assert_eq!(n.watchdog_interval(), None),
            _ => {
                assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
                n.ready("revision 7, 3 instances\nsecond line");
                n.watchdog();
                n.reloading("reloading templates");
                n.status("ok");
                n.stopping();
            }
        }
    }

    /// The parent half: a datagram socket standing in for systemd's, and one child per
    /// case.
    #[test]
    fn sends_the_sequence_to_the_notify_socket() {
        if let Ok(mode) = std::env::var("OBSERVE_NOTIFY_CHILD") {
            return child(&mode);
        }
        let dir = std::env::temp_dir().join(format!("observe-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let run = |mode: &str, env: &[(&str, String)]| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args(["--exact", TEST, "--nocapture"])
                .env("OBSERVE_NOTIFY_CHILD", mode);
            for v in INHERITED_VARS {
                cmd.env_remove(v);
            }
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "child {mode}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        };
        let recv = || {
            let mut buf = [0u8; 4096];
            let n = sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).to_string()
        };
        let socket = path.display().to_string();

        // Without NOTIFY_SOCKET: nothing is sent.
        run("off", &[("WATCHDOG_USEC", "4000000".into())]);
        sock.set_nonblocking(true).unwrap();
        assert!(sock.recv(&mut [0u8; 16]).is_err(), "nothing sent");
        sock.set_nonblocking(false).unwrap();

        run(
            "send",
            &[
                ("NOTIFY_SOCKET", socket.clone()),
                ("WATCHDOG_USEC", "4000000".into()),
            ],
        );
        assert_eq!(
            recv(),
            "READY=1\nSTATUS=revision 7, 3 instances second line\n"
        );
        assert_eq!(recv(), "WATCHDOG=1\n");
        let msg = recv();
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        assert!(msg.ends_with("\nSTATUS=reloading templates\n"), "{msg}");
        assert_eq!(recv(), "STATUS=ok\n");
        assert_eq!(recv(), "STOPPING=1\n");

        // A watchdog meant for another process (WATCHDOG_PID) is not ours.
        run(
            "foreign-watchdog",
            &[
                ("NOTIFY_SOCKET", socket),
                ("WATCHDOG_USEC", "4000000".into()),
                ("WATCHDOG_PID", "1".into()),
            ],
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
