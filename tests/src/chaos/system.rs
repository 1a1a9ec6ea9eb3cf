//! The system under test: 3 etcd members, 2 load balancers (HAProxy on its own + a
//! renderer through the master CLI, config on a small tmpfs), web apps with registrars, and
//! the bookkeeping of every process a run starts (none may outlive it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::report::Fault;
use crate::cluster::Cluster;
use crate::lb::{renderer_command, template, Backend};
use crate::load::Load;
use crate::netns::Netns;
use crate::{free_port, http, registrar_command, Proc};

/// Size of each load balancer's config filesystem (a tmpfs `disk_full` fills).
pub(super) const CONF_FS: &str = "4m";

/// A registry entry or a running server: address, port, weight.
pub(super) type Server = (String, u16, u32);

/// The registry's valid instances of `webapp`, by id.
pub(super) async fn registry_set(c: &mut Client) -> Option<BTreeMap<String, Server>> {
    let get = c.get("/services/webapp/", Some(GetOptions::new().with_prefix()));
    let resp = tokio::time::timeout(Duration::from_millis(800), get)
        .await
        .ok()?
        .ok()?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        let Some((service, id)) = registry::parse_key("/services", key) else {
            continue;
        };
        if let Ok(i) = registry::Instance::decode(service, id, kv.value()) {
            // A record marked leaving (a graceful stop, just before the revoke) is served
            // drained: weight 0.
            let weight = if i.leaving() { 0 } else { u32::from(i.weight) };
            out.insert(i.id, (i.address, i.port, weight));
        }
    }
    Some(out)
}

/// Every process a run started (PID, name, start time): none may outlive it.
pub(super) static SPAWNED: std::sync::Mutex<Vec<(u32, String, Option<u64>)>> =
    std::sync::Mutex::new(Vec::new());

/// A process's state letter and start time (clock ticks since boot) from `/proc/PID/stat`.
pub(super) fn stat_of(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), starttime field 22.
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Remembers a spawned process, with its start time: over a 2-hour run PIDs are reused
/// (one was, by a kernel worker), so a PID alone does not say the process is still ours.
pub(super) fn remember(pid: u32, name: String) {
    SPAWNED.lock().unwrap_or_else(|e| e.into_inner()).push((
        pid,
        name,
        stat_of(pid).map(|(_, t)| t),
    ));
}

pub(super) fn spawn(name: &str, dir: &Path, cmd: Command) -> Proc {
    let p = Proc::spawn(name, dir, cmd);
    remember(p.pid(), name.to_string());
    p
}

/// Spawned processes still alive (not zombies, and not another process that got the PID).
pub(super) fn still_running() -> Vec<(u32, String)> {
    let spawned = SPAWNED.lock().unwrap_or_else(|e| e.into_inner());
    spawned
        .iter()
        .filter(|(pid, _, started)| {
            stat_of(*pid).is_some_and(|(state, t)| state != 'Z' && Some(t) == *started)
        })
        .map(|(pid, name, _)| (*pid, name.clone()))
        .collect()
}

/// A load balancer: HAProxy on its own (as a system service runs it) and a renderer that
/// reloads it through the master CLI.
pub(super) struct ChaosLb {
    pub(super) dir: PathBuf,
    /// The config directory: a small tmpfs of its own (unmounted when dropped, after
    /// [`Drop`] killed the processes).
    pub(super) conf: crate::Tmpfs,
    pub(super) endpoints: String,
    pub(super) http_port: u16,
    pub(super) stats_port: u16,
    pub(super) metrics_port: u16,
    pub(super) cfg: PathBuf,
    pub(super) master: PathBuf,
    pub(super) haproxy: Proc,
    pub(super) renderer: Option<Proc>,
    pub(super) starts: u32,
}

impl ChaosLb {
    pub(super) async fn start(dir: &Path, endpoints: &str) -> ChaosLb {
        let conf = crate::Tmpfs::mount(&dir.join("conf"), CONF_FS);
        let (http_port, stats_port, metrics_port) = (free_port(), free_port(), free_port());
        let cfg = conf.path.join("haproxy.cfg");
        let master = dir.join("master.sock");
        // The first config once, then HAProxy from it.
        let mut once = renderer_command(endpoints, &template(), &cfg, (http_port, stats_port), dir);
        once.args(["--metrics-addr", "off", "--once"]);
        let mut once = spawn("renderer-once", dir, once);
        let status = once.exited(Duration::from_secs(60)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", once.log());
        let haproxy = spawn_haproxy(dir, &master, &cfg, 0);
        let mut lb = ChaosLb {
            dir: dir.to_path_buf(),
            conf,
            endpoints: endpoints.to_string(),
            http_port,
            stats_port,
            metrics_port,
            cfg,
            master,
            haproxy,
            renderer: None,
            starts: 0,
        };
        lb.start_renderer();
        lb
    }

    pub(super) fn start_renderer(&mut self) {
        let mut cmd = renderer_command(
            &self.endpoints,
            &template(),
            &self.cfg,
            (self.http_port, self.stats_port),
            &self.dir,
        );
        cmd.arg("--haproxy-master-socket")
            .arg(&self.master)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port));
        self.starts += 1;
        self.renderer = Some(spawn(&format!("renderer-{}", self.starts), &self.dir, cmd));
    }
}

/// HAProxy from `cfg` with its master CLI at `master`, as a supervisor starts it.
pub(super) fn spawn_haproxy(dir: &Path, master: &Path, cfg: &Path, start: u32) -> Proc {
    spawn(
        &format!("haproxy-{start}"),
        dir,
        crate::lb::haproxy_command(Some(master), cfg),
    )
}

impl ChaosLb {
    /// What a supervisor does when HAProxy dies: the master and its workers killed
    /// (systemd kills the whole control group), then, after `gap`, HAProxy started again
    /// from the file on disk. Returns once it answers on the traffic port (or after 15 s).
    pub(super) async fn restart_haproxy(&mut self, gap: Duration) {
        crate::lb::kill_haproxy(&mut self.haproxy);
        tokio::time::sleep(gap).await;
        self.starts += 1;
        self.haproxy = spawn_haproxy(&self.dir, &self.master, &self.cfg, self.starts);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(1), http::get(self.http_port, "/", None))
                    .await
            {
                if r.status == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChaosLb {
    fn drop(&mut self) {
        if let Some(r) = &mut self.renderer {
            r.kill();
        }
        self.haproxy.kill();
    }
}

/// A web app and the registrar beside it.
pub(super) struct App {
    pub(super) dir: PathBuf,
    pub(super) endpoints: String,
    pub(super) id: String,
    pub(super) ttl: String,
    pub(super) backend: Option<Backend>,
    pub(super) port: u16,
    pub(super) registrar: Option<Proc>,
    pub(super) starts: u32,
}

impl App {
    pub(super) fn start(dir: &Path, endpoints: &str, id: &str, ttl: u64) -> App {
        let backend = Backend::start(dir, id);
        remember(backend.proc.pid(), format!("webapp-{id}"));
        let port = backend.port;
        let mut app = App {
            dir: dir.to_path_buf(),
            endpoints: endpoints.to_string(),
            id: id.to_string(),
            ttl: format!("{ttl}s"),
            backend: Some(backend),
            port,
            registrar: None,
            starts: 0,
        };
        app.start_registrar();
        app
    }

    pub(super) fn start_registrar(&mut self) {
        let mut cmd = registrar_command(&self.endpoints, &self.id, self.port, &self.ttl);
        cmd.args([
            "--health-http",
            &format!("http://127.0.0.1:{}/health", self.port),
            "--health-interval",
            "500ms",
            "--drain",
            "1s",
        ]);
        self.starts += 1;
        self.registrar = Some(spawn(
            &format!("registrar-{}-{}", self.id, self.starts),
            &self.dir,
            cmd,
        ));
    }

    /// The web app again, on a new port as a redeploy would be (after a graceful stop): a
    /// change that stays, which a load balancer that stopped following cannot hide.
    pub(super) fn start_backend(&mut self) {
        self.port = free_port();
        let mut cmd = Command::new(crate::bin("webapp"));
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--id",
            &self.id,
        ]);
        self.starts += 1;
        let proc = spawn(
            &format!("webapp-{}-{}", self.id, self.starts),
            &self.dir,
            cmd,
        );
        self.backend = Some(Backend {
            id: self.id.clone(),
            port: self.port,
            proc,
        });
    }
}

/// wrk per load balancer (running), and (load balancer, result) of the stopped ones.
pub(super) type Loads = (Vec<Option<Load>>, Vec<(usize, crate::load::LoadResult)>);

pub(super) struct System {
    pub(super) cluster: Mutex<Cluster>,
    pub(super) lbs: Vec<Mutex<ChaosLb>>,
    pub(super) apps: Vec<Mutex<App>>,
    pub(super) master: Vec<PathBuf>,
    pub(super) cfg: Vec<PathBuf>,
    pub(super) member_endpoints: Vec<String>,
    pub(super) peer_ports: Vec<u16>,
    /// wrk per load balancer (replaced around a `haproxy_restart`), and the results of
    /// the ones already stopped.
    pub(super) loads: std::sync::Mutex<Loads>,
    /// When the run's load ends.
    pub(super) end: std::sync::OnceLock<Instant>,
    /// Load balancers whose HAProxy the run has killed and that do not answer yet.
    pub(super) down: [std::sync::atomic::AtomicBool; 2],
    /// Member 0's namespace (dropped last: the members run in it).
    pub(super) ns: Netns,
}

impl System {
    /// Cuts member 0 off from its peers, or heals it: iptables in its namespace drops every
    /// peer connection both ways; clients still reach it (it has no quorum, so no leader).
    pub(super) fn partition(&self, on: bool) {
        let others = [self.peer_ports[1], self.peer_ports[2]];
        self.ns.cut_peers(self.peer_ports[0], &others, on);
    }

    /// A lossy link for member 0 (clients and peers alike), or healed: iptables in its
    /// namespace drops `percent` % of TCP segments each way at random. The rules live in
    /// chains of their own (`LOSSY_IN`, `LOSSY_OUT`, jumped to from INPUT/OUTPUT) that
    /// healing flushes: `iptables -D` of a `statistic` rule does not work with the nf_tables
    /// backend (the match's kernel-private state never compares equal), which left every
    /// lossy rule in place — 44 of them (74 % loss on member 0) by the end of a 2-hour run —
    /// and once deleted a partition's rule instead.
    pub(super) fn lossy(&self, on: bool, percent: u32) {
        let ipt = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &self.ns.name, "iptables"])
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("iptables")
                .success()
        };
        let p = format!("{:.2}", f64::from(percent) / 100.0);
        for (chain, from) in [("LOSSY_IN", "INPUT"), ("LOSSY_OUT", "OUTPUT")] {
            if !ipt(&["-n", "-L", chain]) {
                assert!(ipt(&["-N", chain]), "iptables -N {chain}");
                assert!(
                    ipt(&["-A", from, "-j", chain]),
                    "iptables -A {from} -j {chain}"
                );
            }
            let ok = if on {
                ipt(&[
                    "-A",
                    chain,
                    "-p",
                    "tcp",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ])
            } else {
                ipt(&["-F", chain])
            };
            assert!(ok, "iptables {} {chain}", if on { "-A" } else { "-F" });
        }
    }

    /// Stops load balancer `lb`'s wrk (its result is kept) and, with `restart`, starts a
    /// new one for the rest of the run.
    pub(super) fn replace_load(&self, lb: usize, port: u16, restart: bool) {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = loads.0[lb].take() {
            let r = l.stop();
            loads.1.push((lb, r));
        }
        let left = self
            .end
            .get()
            .map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs());
        if restart && left >= 2 {
            loads.0[lb] = Some(Load::start(port, left as u32, 4, false));
        }
    }
}

/// Faults in progress and done, shared by the injectors and the checker.
#[derive(Default)]
pub(super) struct Ledger {
    pub(super) active: Vec<(usize, &'static str, Instant)>,
    pub(super) done: Vec<Fault>,
    /// Index into `done` of faults still waiting for convergence.
    pub(super) converging: Vec<usize>,
    pub(super) last_heal: Option<Instant>,
}

pub(super) fn ms_since(start: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(start).as_millis() as u64
}

/// PIDs of processes whose command line mentions `dir` (what a run leaves behind).
pub(super) fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                out.push((pid, cmdline));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_is_not_a_leaked_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let (state, started) = stat_of(pid).unwrap();
        assert_ne!(state, 'Z');
        SPAWNED.lock().unwrap().clear();
        remember(pid, "mine".into());
        // Another process with this PID (a start time that differs) is not ours.
        SPAWNED.lock().unwrap()[0].2 = Some(started + 1);
        assert!(still_running().is_empty());
        SPAWNED.lock().unwrap()[0].2 = Some(started);
        assert_eq!(still_running(), [(pid, "mine".to_string())]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(still_running().is_empty());
        SPAWNED.lock().unwrap().clear();
    }
}
