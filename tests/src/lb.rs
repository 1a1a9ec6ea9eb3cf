//! The load-balancer side: the renderer in exec mode running real HAProxy with the shipped
//! template on free ports, real web-app backends, and helpers to read HAProxy's state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use renderer::haproxy::ProcTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{bin, eventually, free_port, http, Etcd, Proc};

/// (major, minor) of the `haproxy` on PATH (the one the tests run: Debian 12's 2.6, or
/// Debian 13's 3.0 under scripts/with-debian.sh), for expectations that differ by version.
pub fn haproxy_version() -> (u32, u32) {
    static VERSION: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new("haproxy")
            .arg("-v")
            .output()
            .expect("run haproxy -v");
        let text = String::from_utf8_lossy(&out.stdout);
        let v = renderer::haproxy::parse_version(&text)
            .unwrap_or_else(|| panic!("no version in `haproxy -v`: {text}"));
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    })
}

/// The shipped template.
pub fn template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates/haproxy.cfg.hbs")
}

/// A renderer command rendering `template` to `cfg` with the traffic and stats ports,
/// loopback binds and `runtime_dir` for the admin socket; callers add the reload mode and
/// any other flags.
pub fn renderer_command(
    endpoints: &str,
    template: &Path,
    cfg: &Path,
    (http_port, stats_port): (u16, u16),
    runtime_dir: &Path,
) -> Command {
    let mut cmd = Command::new(bin("lb-renderer"));
    cmd.env("RUST_LOG", "info")
        .args(["--endpoints", endpoints, "--template"])
        .arg(format!("{}:{}", template.display(), cfg.display()))
        .args([
            "--var",
            &format!("http_port={http_port}"),
            "--var",
            &format!("stats_port={stats_port}"),
        ])
        .args([
            "--var",
            "bind_address=127.0.0.1",
            "--var",
            &format!("runtime_dir={}", runtime_dir.display()),
        ]);
    cmd
}

/// renderer + HAProxy (exec mode).
pub struct Lb {
    pub http_port: u16,
    pub stats_port: u16,
    /// The renderer's /metrics, /readyz, /status port (0 for a custom command).
    pub metrics_port: u16,
    pub cfg: PathBuf,
    pub master: PathBuf,
    pub proc: Proc,
}

impl Lb {
    /// Starts `renderer … -- haproxy -W -db -f <cfg>` with the shipped template. `extra`
    /// flags go before `--`.
    pub fn start(dir: &Path, etcd: &Etcd, extra: &[&str]) -> Lb {
        Self::start_with_template(dir, etcd, &template(), extra)
    }

    /// Starts a load balancer from a shell command template (for measuring other tools the
    /// same way): `{etcd}` endpoint, `{template}`, `{cfg}`, `{dir}`, `{http_port}`,
    /// `{stats_port}`, `{master}` (the HAProxy master socket the command must create with
    /// `-S`) are substituted.
    pub fn start_shell(dir: &Path, etcd: &Etcd, template: &Path, command: &str) -> Lb {
        let http_port = free_port();
        let stats_port = free_port();
        let cfg = dir.join("haproxy.cfg");
        let master = dir.join("master.sock");
        let line = command
            .replace("{etcd}", &etcd.endpoint())
            .replace("{template}", &template.display().to_string())
            .replace("{cfg}", &cfg.display().to_string())
            .replace("{dir}", &dir.display().to_string())
            .replace("{http_port}", &http_port.to_string())
            .replace("{stats_port}", &stats_port.to_string())
            .replace("{master}", &master.display().to_string());
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("exec {line}"));
        let proc = Proc::spawn("lb", dir, cmd);
        Lb {
            http_port,
            stats_port,
            metrics_port: 0,
            cfg,
            master,
            proc,
        }
    }

    pub fn start_with_template(dir: &Path, etcd: &Etcd, template: &Path, extra: &[&str]) -> Lb {
        Self::start_on(dir, &etcd.endpoint(), template, extra)
    }

    /// Like [`Lb::start`] against any `--endpoints` value (e.g. every member of a cluster).
    pub fn start_on(dir: &Path, endpoints: &str, template: &Path, extra: &[&str]) -> Lb {
        let http_port = free_port();
        let stats_port = free_port();
        let metrics_port = free_port();
        let cfg = dir.join("haproxy.cfg");
        let master = dir.join("master.sock");
        let mut cmd = renderer_command(endpoints, template, &cfg, (http_port, stats_port), dir);
        cmd.arg("--haproxy-master-socket")
            .arg(&master)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra);
        exec_haproxy(&mut cmd, &cfg);
        let proc = Proc::spawn("renderer", dir, cmd);
        Lb {
            http_port,
            stats_port,
            metrics_port,
            cfg,
            master,
            proc,
        }
    }

    /// Waits until HAProxy answers on the traffic port.
    pub async fn wait_serving(&self) {
        let port = self.http_port;
        eventually(Duration::from_secs(30), "HAProxy answers", || async move {
            http::get(port, "/", None).await.ok()
        })
        .await;
    }

    /// Waits up to `timeout` until the config file's `server <name>` line contains `part`
    /// (a live change reaches the file once its background check is done).
    pub async fn wait_server_line(&self, name: &str, part: &str, timeout: Duration) {
        let head = format!("server {name} ");
        eventually(
            timeout,
            &format!("the file's {head}line has {part:?}"),
            || async {
                self.config()
                    .lines()
                    .any(|l| l.contains(&head) && l.contains(part))
                    .then_some(())
            },
        )
        .await;
    }

    /// The rendered config on disk.
    pub fn config(&self) -> String {
        std::fs::read_to_string(&self.cfg).unwrap_or_default()
    }

    /// One master CLI command.
    pub async fn master_cli(&self, cmd: &str) -> String {
        master_cli(&self.master, cmd).await
    }

    /// (reloads, failed reloads, current worker pid) from the master (retried until the
    /// master answers with a worker).
    pub async fn proc_state(&self) -> (u32, u32, u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = self.proc_state_once().await;
            if state.2 != 0 || std::time::Instant::now() > deadline {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn proc_state_once(&self) -> (u32, u32, u32) {
        let out = self.master_cli("show proc").await;
        ProcTable::parse(&out).map_or((0, 0, 0), |t| {
            (t.reloads, t.failed, t.current_worker().unwrap_or(0))
        })
    }

    /// Server names in the current worker's backend `nodes` (runtime state).
    pub async fn running_servers(&self) -> Vec<String> {
        // BTreeMap keys: already sorted.
        let names: Vec<String> = self.live_servers().await.into_keys().collect();
        names
    }

    /// The current worker's servers in backend `nodes` as HAProxy runs them (`show servers
    /// state`, read by column name): name → (address, port, weight, in maintenance).
    pub async fn live_servers(&self) -> BTreeMap<String, LiveServer> {
        live_servers_at(&self.master).await
    }

    /// Server names in the config file's `server` lines.
    pub fn config_servers(&self) -> Vec<String> {
        config_servers_in(&self.config())
    }

    /// Number of "apply" lines the renderer logged so far.
    pub fn applies(&self) -> usize {
        self.proc
            .log()
            .lines()
            .filter(|l| l.contains(" apply ") || l.contains("apply revision"))
            .count()
    }
}

/// The servers of backend `nodes` in the current worker of the HAProxy whose master CLI is
/// at `master` (`show servers state`, read by column name); empty when it does not answer.
pub async fn live_servers_at(master: &Path) -> BTreeMap<String, LiveServer> {
    try_live_servers_at(master).await.unwrap_or_default()
}

/// [`live_servers_at`], `None` when HAProxy gave no `show servers state` answer (e.g. its
/// master is re-executing for a reload) — which is not the same as no servers.
pub async fn try_live_servers_at(master: &Path) -> Option<BTreeMap<String, LiveServer>> {
    let out = master_cli(master, "@1 show servers state nodes").await;
    let servers = renderer::haproxy::parse_servers_state(&out)?;
    Some(
        servers
            .into_iter()
            .map(|(name, s)| {
                let server = LiveServer {
                    port: s.port.parse().unwrap_or(0),
                    weight: s.weight.parse().unwrap_or(0),
                    maint: s.in_maintenance(),
                    addr: s.addr,
                };
                (name, server)
            })
            .collect(),
    )
}

/// Server names in the `server` lines of a config, sorted.
pub fn config_servers_in(config: &str) -> Vec<String> {
    let mut names: Vec<String> = config
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("server ")
                .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        })
        .collect();
    names.sort();
    names
}

/// One server as HAProxy runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveServer {
    pub addr: String,
    pub port: u16,
    pub weight: u32,
    pub maint: bool,
}

/// Registers `n` instances `{prefix}{i:05}` of `service` on 127.0.0.1, ports from 10000
/// up (closed: nothing listens there), weight 0 (in the config, never sent traffic), in
/// transactions of 100 puts.
pub async fn put_filler(etcd: &Etcd, service: &str, prefix: &str, n: usize) {
    put_filler_on(etcd, service, prefix, n, |i| 10000 + (i % 50000) as u16).await
}

/// [`put_filler`] with instance `i` on port `port(i)`.
pub async fn put_filler_on(
    etcd: &Etcd,
    service: &str,
    prefix: &str,
    n: usize,
    port: impl Fn(usize) -> u16,
) {
    let mut c = etcd.client().await;
    put_filler_via(&mut c, service, prefix, n, port).await
}

/// [`put_filler_on`] through a client of the caller's (e.g. on a cluster).
pub async fn put_filler_via(
    c: &mut etcd_client::Client,
    service: &str,
    prefix: &str,
    n: usize,
    port: impl Fn(usize) -> u16,
) {
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let id = format!("{prefix}{i:05}");
                let mut inst = registry::Instance::new(service, &id, "127.0.0.1", port(*i));
                inst.weight = 0;
                etcd_client::TxnOp::put(
                    registry::instance_key("/services", service, &id),
                    inst.encode(),
                    None,
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("filler txn");
    }
}

/// Sends one command to an HAProxy CLI socket and returns the answer.
pub async fn master_cli(path: &Path, cmd: &str) -> String {
    let fut = async {
        let mut s = UnixStream::connect(path).await.ok()?;
        s.write_all(format!("{cmd}\n").as_bytes()).await.ok()?;
        s.shutdown().await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A real web app backend on a free loopback port.
pub struct Backend {
    pub id: String,
    pub port: u16,
    pub proc: Proc,
}

impl Backend {
    pub fn start(dir: &Path, id: &str) -> Backend {
        let port = free_port();
        let mut cmd = Command::new(bin("webapp"));
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--id",
            id,
        ]);
        let proc = Proc::spawn(&format!("webapp-{id}"), dir, cmd);
        Backend {
            id: id.to_string(),
            port,
            proc,
        }
    }

    /// Waits until the backend answers.
    pub async fn wait_up(&self) {
        let port = self.port;
        eventually(Duration::from_secs(10), "backend answers", || async move {
            http::get(port, "/health", None).await.ok()
        })
        .await;
    }
}

/// Writes an instance record as a registrar would (without a lease).
pub async fn put_instance(etcd: &Etcd, service: &str, id: &str, port: u16) {
    let value = registry::Instance::new(service, id, "127.0.0.1", port).encode();
    etcd.put(&registry::instance_key("/services", service, id), &value)
        .await;
}

/// Which instance ids answered `n` requests through `port`.
pub async fn served_ids(port: u16, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        if let Ok(r) = http::get(port, "/", None).await {
            if let Some(id) = r.instance_id() {
                *seen.entry(id).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Polls until exactly `ids` (and nothing else) answer through `port`.
pub async fn wait_routed(port: u16, ids: &[&str], timeout: Duration) {
    let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    eventually(timeout, &format!("exactly {want:?} served"), || {
        let want = want.clone();
        async move {
            let seen: Vec<String> = served_ids(port, want.len().max(1) * 4)
                .await
                .into_keys()
                .collect();
            (seen == want).then_some(())
        }
    })
    .await;
}

impl Drop for Lb {
    /// HAProxy is the renderer's child and would outlive a SIGKILLed renderer: ask the
    /// renderer to stop it gracefully, then kill whatever the master reports by PID.
    fn drop(&mut self) {
        let pids = blocking_proc_pids(&self.master);
        self.proc.signal(nix::sys::signal::Signal::SIGCONT);
        self.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.proc.wait_timeout(Duration::from_secs(5));
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Master and worker PIDs from `show proc`, without an async runtime.
fn blocking_proc_pids(master: &Path) -> Vec<u32> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(master) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"show proc\n");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A load balancer as a system service runs it: HAProxy on its own (master CLI at
/// `master`) from `cfg`, and renderers that talk to it (`--haproxy-master-socket`), each
/// started by the test.
pub struct Standalone {
    pub dir: PathBuf,
    pub endpoints: String,
    pub http_port: u16,
    pub stats_port: u16,
    pub cfg: PathBuf,
    pub master: PathBuf,
}

impl Standalone {
    /// Writes the first config once (`--once`); HAProxy and renderers are started with
    /// [`Standalone::haproxy`] and [`Standalone::renderer`].
    pub async fn prepare(dir: &Path, etcd: &Etcd) -> Standalone {
        let s = Standalone {
            dir: dir.to_path_buf(),
            endpoints: etcd.endpoint(),
            http_port: free_port(),
            stats_port: free_port(),
            cfg: dir.join("haproxy.cfg"),
            master: dir.join("master.sock"),
        };
        let mut once = s.renderer_only("renderer-once", &["--once"]);
        assert_eq!(
            once.exited(Duration::from_secs(30))
                .await
                .and_then(|x| x.code()),
            Some(0),
            "{}",
            once.log()
        );
        s
    }

    fn renderer_only(&self, name: &str, extra: &[&str]) -> Proc {
        let mut cmd = renderer_command(
            &self.endpoints,
            &template(),
            &self.cfg,
            (self.http_port, self.stats_port),
            &self.dir,
        );
        cmd.args(["--metrics-addr", "off"]).args(extra);
        Proc::spawn(name, &self.dir, cmd)
    }

    /// A renderer driving this HAProxy through its master CLI, with `extra` flags.
    pub fn renderer(&self, name: &str, extra: &[&str]) -> Proc {
        let master = self.master.display().to_string();
        let mut args = vec!["--haproxy-master-socket", master.as_str()];
        args.extend_from_slice(extra);
        self.renderer_only(name, &args)
    }

    /// HAProxy from the file on disk, as its supervisor starts it.
    pub fn haproxy(&self, name: &str) -> Proc {
        Proc::spawn(
            name,
            &self.dir,
            haproxy_command(Some(&self.master), &self.cfg),
        )
    }
}

/// What a supervisor does to a dead or stuck HAProxy (systemd kills the whole control
/// group): the master and every worker SIGKILLed.
pub fn kill_haproxy(master: &mut Proc) {
    let workers = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", master.pid()))
        .unwrap_or_default();
    master.kill();
    for pid in workers
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// HAProxy from `cfg` in the foreground, the one way the suites start it: in master-worker
/// mode with its master CLI at `master` (how a system service runs it), or without a
/// master (`None`: one process, as a hand-run `haproxy -f` would).
pub fn haproxy_command(master: Option<&Path>, cfg: &Path) -> Command {
    let mut hp = Command::new("haproxy");
    if let Some(master) = master {
        hp.args(["-W", "-S"]).arg(master);
    }
    hp.arg("-db").arg("-f").arg(cfg);
    hp
}

/// Exec mode for a renderer command: the renderer starts HAProxy from `cfg` as its child
/// (master-worker, `-db`) once the first config is written.
pub fn exec_haproxy<'a>(renderer: &'a mut Command, cfg: &Path) -> &'a mut Command {
    renderer.args(["--", "haproxy", "-W", "-db", "-f"]).arg(cfg)
}
