//! Talking to HAProxy: its master CLI (`show proc`, `reload`, and commands for the current
//! worker with the `@1` prefix), running it as our child in exec mode, and the ways to
//! reload it — each reload is confirmed, never assumed (a SIGUSR2 sent while the master is
//! still starting has been seen to get lost).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// True when nothing has arrived on `s` and the master has not closed it.
fn still_open(s: &UnixStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Reads one answer of an interactive session, up to and without the prompt.
async fn read_answer(s: &mut UnixStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the master CLI closed the session",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = ends_with_prompt(&buf) {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
    }
}

/// How long one CLI exchange may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reload may take to show up in `show proc` before it is sent again.
const RELOAD_CONFIRM: Duration = Duration::from_secs(10);
/// Reload attempts before giving up.
const RELOAD_ATTEMPTS: u32 = 3;

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

/// The numeric version in `haproxy -v` output (see [`detect_version`]).
pub fn parse_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("HAProxy version ") || l.starts_with("HA-Proxy version "))?;
    let word = line.split_whitespace().nth(2)?;
    let numeric: String = word
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let numeric = numeric.trim_end_matches('.').to_string();
    (!numeric.is_empty()).then_some(numeric)
}

/// The cookie HAProxy derives for a server in a backend with `cookie … dynamic` and
/// `dynamic-cookie-key <key>`: XXH64 (seed 0) of the key, the address's bytes and the
/// port as 4 big-endian bytes, printed as 16 hex digits (`srv_set_dyncookie()` in
/// src/server.c, unchanged from 1.8 to 3.x). `None` for an address that is not an IP
/// literal (HAProxy derives none until it has resolved one).
pub fn dynamic_cookie(key: &str, address: &str, port: u16) -> Option<String> {
    let ip: std::net::IpAddr = address.parse().ok()?;
    let mut buf = Vec::with_capacity(key.len() + 20);
    buf.extend_from_slice(key.as_bytes());
    match ip {
        std::net::IpAddr::V4(v4) => buf.extend_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => buf.extend_from_slice(&v6.octets()),
    }
    buf.extend_from_slice(&u32::from(port).to_be_bytes());
    Some(format!("{:016x}", xxhash_rust::xxh64::xxh64(&buf, 0)))
}

/// Reload or CLI failure.
#[derive(Debug, Error)]
pub enum HaproxyError {
    #[error("master CLI {path}: {source}")]
    Cli {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected `show proc` output: {0:?}")]
    ShowProc(String),
    #[error(
        "HAProxy refused the new config (master reports a failed reload; old workers keep serving)"
    )]
    ReloadFailed,
    #[error("reload not confirmed after {attempts} attempts")]
    NotConfirmed { attempts: u32 },
    #[error("reload command `{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("cannot start HAProxy `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("HAProxy exited before it was ready ({0})")]
    Exited(ExitStatus),
    #[error("HAProxy not ready after {0:?}")]
    NotReady(Duration),
}

/// The master's view of its processes (`show proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcTable {
    pub master_pid: u32,
    /// Reloads so far, failed ones included.
    pub reloads: u32,
    /// Failed reloads so far.
    pub failed: u32,
    /// Current workers (pid, reloads they have survived): the newest has 0.
    pub workers: Vec<(u32, u32)>,
}

impl ProcTable {
    /// Parses HAProxy 2.x `show proc` output.
    pub fn parse(text: &str) -> Option<ProcTable> {
        let mut master = None;
        let mut workers = Vec::new();
        let mut section_current = true;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("# old workers") || line.starts_with("# programs") {
                section_current = false;
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 3 {
                continue;
            }
            let pid: u32 = fields[0].parse().ok()?;
            let reloads: u32 = fields[2].parse().ok()?;
            match fields[1] {
                "master" => {
                    // "0 [failed: 1]"
                    let failed = line
                        .split("[failed:")
                        .nth(1)
                        .and_then(|r| r.split(']').next())
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0);
                    master = Some((pid, reloads, failed));
                }
                "worker" if section_current => workers.push((pid, reloads)),
                _ => {}
            }
        }
        let (master_pid, reloads, failed) = master?;
        Some(ProcTable {
            master_pid,
            reloads,
            failed,
            workers,
        })
    }

    /// The newest current worker.
    pub fn current_worker(&self) -> Option<u32> {
        self.workers.iter().min_by_key(|(_, r)| *r).map(|(p, _)| *p)
    }
}

/// A client for HAProxy's master CLI socket (`-S`).
///
/// Master commands (`show proc`, `reload`) get a connection each. Commands for the worker
/// share one interactive session (`prompt` mode: every answer ends with the master's
/// prompt), which saves a connect per command: 0.09 ms instead of 0.16 ms, four of them
/// per join. The session is checked before each use and opened again when the master
/// closed it (a reload re-executes the master; idle sessions time out).
#[derive(Debug, Clone)]
pub struct MasterCli {
    pub path: PathBuf,
    session: std::sync::Arc<tokio::sync::Mutex<Option<UnixStream>>>,
}

/// True when `answer` ends with the master CLI's prompt (`master> `, or with its
/// decorations: `[0:00:01:02] master[ReloadFailed](xe)> `) on a line of its own.
fn ends_with_prompt(answer: &[u8]) -> Option<usize> {
    let start = answer
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let last = std::str::from_utf8(&answer[start..])
        .ok()?
        .strip_suffix("> ")?;
    let last = match last.strip_prefix('[') {
        Some(rest) => rest.split_once("] ")?.1,
        None => last,
    };
    last.starts_with("master").then_some(start)
}

impl MasterCli {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MasterCli {
            path: path.into(),
            session: Default::default(),
        }
    }

    /// Sends one command line and returns the whole answer.
    pub async fn command(&self, cmd: &str) -> Result<String, HaproxyError> {
        let exchange = async {
            let mut s = UnixStream::connect(&self.path).await?;
            s.write_all(format!("{cmd}\n").as_bytes()).await?;
            // Without the half-close the master keeps the session open for more commands.
            s.shutdown().await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(CLI_TIMEOUT, exchange).await {
            Ok(r) => r.map_err(|source| self.err(source)),
            Err(_) => Err(self.err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to {cmd:?} within {CLI_TIMEOUT:?}"),
            ))),
        }
    }

    /// Sends a command to the current worker (`@1 …`) through the master, on the shared
    /// interactive session.
    pub async fn worker_command(&self, cmd: &str) -> Result<String, HaproxyError> {
        if cmd.contains(['\n', ';']) {
            // One command per exchange: a second one would be answered after our prompt.
            return self.command(&format!("@1 {cmd}")).await;
        }
        let mut session = self.session.lock().await;
        let exchange = async {
            let stream = match session.take() {
                Some(s) if still_open(&s) => s,
                _ => {
                    let mut s = UnixStream::connect(&self.path).await?;
                    s.write_all(b"prompt\n").await?;
                    read_answer(&mut s).await?;
                    s
                }
            };
            let mut stream = stream;
            stream.write_all(format!("@1 {cmd}\n").as_bytes()).await?;
            let answer = read_answer(&mut stream).await?;
            *session = Some(stream);
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(CLI_TIMEOUT, exchange).await {
            Ok(r) => r.map_err(|source| self.err(source)),
            Err(_) => Err(self.err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to {cmd:?} within {CLI_TIMEOUT:?}"),
            ))),
        }
    }

    fn err(&self, source: std::io::Error) -> HaproxyError {
        HaproxyError::Cli {
            path: self.path.display().to_string(),
            source,
        }
    }

    pub async fn show_proc(&self) -> Result<ProcTable, HaproxyError> {
        let out = self.command("show proc").await?;
        ProcTable::parse(&out).ok_or(HaproxyError::ShowProc(out.chars().take(500).collect()))
    }

    /// Waits until the master answers and has a worker.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<ProcTable, HaproxyError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.show_proc().await {
                Ok(t) if !t.workers.is_empty() => return Ok(t),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(_) => return Err(HaproxyError::NotReady(timeout)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reloads and confirms: the master's reload counter must move, without a new failure,
    /// and a new worker must be current. Resends if nothing happened.
    pub async fn reload(&self) -> Result<ProcTable, HaproxyError> {
        let before = self.wait_ready(RELOAD_CONFIRM).await?;
        for attempt in 1..=RELOAD_ATTEMPTS {
            // The master re-executes itself on reload and never answers this command.
            let send = async {
                let mut s = UnixStream::connect(&self.path).await?;
                s.write_all(b"reload\n").await?;
                s.shutdown().await
            };
            if let Err(e) = tokio::time::timeout(CLI_TIMEOUT, send)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "send timed out",
                    ))
                })
            {
                warn!(error = %e, attempt, "could not send reload to the master CLI");
            }
            let deadline = Instant::now() + RELOAD_CONFIRM;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let Ok(now) = self.show_proc().await else {
                    continue;
                };
                if now.reloads <= before.reloads {
                    continue;
                }
                if now.failed > before.failed {
                    return Err(HaproxyError::ReloadFailed);
                }
                if now.current_worker().is_some() && now.current_worker() != before.current_worker()
                {
                    return Ok(now);
                }
            }
            warn!(
                attempt,
                "reload not confirmed by the master; sending it again"
            );
        }
        Err(HaproxyError::NotConfirmed {
            attempts: RELOAD_ATTEMPTS,
        })
    }
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

/// One server as `show servers state` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub id: Option<u32>,
    pub addr: String,
    pub port: String,
    pub weight: String,
    /// `srv_admin_state`: SRV_ADMF_* flags (include/haproxy/server-t.h).
    pub admin: u32,
}

impl ServerState {
    /// In maintenance, whoever put it there (SRV_ADMF_FMAINT | IMAINT | CMAINT).
    pub fn in_maintenance(&self) -> bool {
        self.admin & 0x23 != 0
    }
}

/// Reads `show stat` CSV by the column names of its header line (`# pxname,svname,…`):
/// one map per row.
pub fn parse_stat(csv: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = csv.lines();
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    let header: Vec<&str> = first.trim_start_matches("# ").split(',').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// A backend's servers by name.
pub type ServersState = std::collections::BTreeMap<String, ServerState>;

/// Reads `show servers state [backend]` by the column names of its header line (`# be_id
/// be_name srv_id srv_name srv_addr … srv_admin_state srv_uweight … srv_port …`), not by
/// position; `None` when the answer has no such header.
pub fn parse_servers_state(out: &str) -> Option<ServersState> {
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .by_ref()
        .find(|l| l.starts_with("# "))
        .map(|l| l.trim_start_matches("# ").split_whitespace().collect())?;
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (c_id, c_name, c_addr, c_port) = (
        col("srv_id")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
    );
    let (c_weight, c_admin) = (col("srv_uweight")?, col("srv_admin_state")?);
    let mut servers = ServersState::new();
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < header.len() || f[0].starts_with('#') {
            continue;
        }
        servers.insert(
            f[c_name].to_string(),
            ServerState {
                id: f[c_id].parse().ok(),
                addr: f[c_addr].to_string(),
                port: f[c_port].to_string(),
                weight: f[c_weight].to_string(),
                admin: f[c_admin].parse().unwrap_or(0),
            },
        );
    }
    Some(servers)
}

/// The `[ALERT]` lines of `haproxy -c` output joined (or the whole output when there are
/// none), at most 2 000 characters.
pub fn check_summary(output: &str) -> String {
    let alerts: Vec<&str> = output.lines().filter(|l| l.contains("ALERT")).collect();
    if alerts.is_empty() {
        output.trim().chars().take(2000).collect()
    } else {
        alerts.join(" | ").chars().take(2000).collect()
    }
}

/// Finds `[<file>:N]` (HAProxy's "parsing [file:N]") in `haproxy -c` output and returns
/// N and line N of the checked `bytes`.
pub fn rejected_line(output: &str, file: &str, bytes: &[u8]) -> Option<(usize, String)> {
    let marker = format!("{file}:");
    let start = output.find(&marker)? + marker.len();
    let digits: String = output[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let n: usize = digits.parse().ok()?;
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().nth(n.checked_sub(1)?)?;
    Some((n, line.trim().chars().take(300).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_prompt_ends_an_answer() {
        assert_eq!(ends_with_prompt(b"master> "), Some(0));
        assert_eq!(
            ends_with_prompt(b"New server registered.\n\nmaster> "),
            Some(24)
        );
        assert_eq!(
            ends_with_prompt(b"x\n[0:00:01:02] master[ReloadFailed](xe)> "),
            Some(2)
        );
        // Not (yet) the end: a worker's line, a partial prompt, a prompt inside a line.
        assert_eq!(ends_with_prompt(b"# be_id be_name srv_id\n1 b> "), None);
        assert_eq!(ends_with_prompt(b"ok\nmaster"), None);
        assert_eq!(ends_with_prompt(b"ok\nsee master> "), None);
    }

    #[test]
    fn version_from_dash_v() {
        let v3 = "HAProxy version 3.0.11-1+deb13u4 2026/10/15 - https://haproxy.org/\nStatus: long-term supported branch\n";
        assert_eq!(parse_version(v3).as_deref(), Some("3.0.11"));
        let v26 = "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/\n";
        assert_eq!(parse_version(v26).as_deref(), Some("2.6.12"));
        assert_eq!(
            parse_version("HA-Proxy version 1.8.19 2019/02/11\n").as_deref(),
            Some("1.8.19")
        );
        assert_eq!(parse_version("sh: haproxy: not found\n"), None);
    }

    #[test]
    fn dynamic_cookies_match_haproxy() {
        // What HAProxy 2.6.12 printed in `show stat` for a server added at runtime with
        // `dynamic-cookie-key k` and then `set server … addr 127.0.0.1 port 3001`.
        assert_eq!(
            dynamic_cookie("k", "127.0.0.1", 3001).as_deref(),
            Some("6a51f14cf3d6d726")
        );
        assert_eq!(dynamic_cookie("k", "web-1.internal", 3001), None);
        assert_ne!(
            dynamic_cookie("k", "127.0.0.1", 3002),
            dynamic_cookie("k", "127.0.0.1", 3001)
        );
    }

    #[test]
    fn parses_show_proc() {
        let text =
            "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
13235           master          2 [failed: 1]   0d00h10m29s     2.6.12-1+deb12u4\n\
# workers\n\
13342           worker          0               0d00h10m24s     2.6.12-1+deb12u4\n\
# old workers\n\
13238           worker          1               0d00h10m28s     2.6.12-1+deb12u4\n\
# programs\n";
        let t = ProcTable::parse(text).unwrap();
        assert_eq!(t.master_pid, 13235);
        assert_eq!((t.reloads, t.failed), (2, 1));
        assert_eq!(t.workers, vec![(13342, 0)]);
        assert_eq!(t.current_worker(), Some(13342));
        assert!(ProcTable::parse("garbage").is_none());
    }
    #[test]
    fn servers_state_is_read_by_column_name() {
        // HAProxy 2.6.12, `show servers state nodes` (columns after srv_port trimmed).
        let out = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n3 nodes 20001 new1 127.0.0.1 2 0 1 1 9 6 3 4 6 0 0 1 - 3001 -\n3 nodes 7 b0 10.0.0.2 2 0 100 100 9 6 3 4 6 0 0 0 - 80 -\n";
        let st = parse_servers_state(out).unwrap();
        assert_eq!(
            st["new1"],
            ServerState {
                id: Some(20001),
                addr: "127.0.0.1".into(),
                port: "3001".into(),
                weight: "1".into(),
                admin: 0,
            }
        );
        assert_eq!(st["b0"].weight, "100");
        assert!(parse_servers_state("garbage\n").is_none());
        assert!(!st["b0"].in_maintenance());
    }

    #[test]
    fn finds_haproxy_style_line_numbers() {
        let out = "[ALERT]    (1) : config : parsing [/tmp/x.cfg:3] : unknown keyword 'evil'";
        assert_eq!(
            rejected_line(out, "/tmp/x.cfg", b"a\nb\n  evil thing\n"),
            Some((3, "evil thing".to_string()))
        );
        assert_eq!(rejected_line("nothing", "/tmp/x.cfg", b"a"), None);
        assert_eq!(
            check_summary("noise\n[ALERT] one\n[ALERT] two\n"),
            "[ALERT] one | [ALERT] two"
        );
    }
}
