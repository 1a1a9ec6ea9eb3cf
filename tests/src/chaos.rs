//! A seeded chaos run: the whole system under random, overlapping faults, watched by an
//! invariant checker that reads only public interfaces (etcd, each HAProxy's master CLI,
//! the rendered files, HTTP through the load balancers).
//!
//! System: 3 etcd members (the first in a network namespace, so it can be cut off from its
//! peers, or given a slow and lossy link, while clients still reach it), 2 load balancers
//! (HAProxy run on its own, as a supervisor runs it, and a renderer in master-socket mode,
//! so a renderer can crash under a running HAProxy and HAProxy can be restarted under a
//! running renderer; the config directory on a small filesystem of its own, so it can be
//! filled), `apps` web apps each with a registrar
//! beside it (short TTL, HTTP health check), bounded `wrk` load and a prober per load
//! balancer.
//!
//! The fault schedule is a pure function of the seed ([`schedule`]); the system's reactions
//! are timed as they happen. Used by `bench chaos` (long runs, docs/) and by the e2e suite
//! (one short run, plus `sabotage`: a renderer frozen for good must be reported).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, GetOptions};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::lb::{
    config_servers_in, live_servers_at, renderer_command, template, try_live_servers_at, Backend,
};
use crate::load::Load;
use crate::netns::Netns;
use crate::{free_port, http, registrar_command, Proc};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub duration: Duration,
    /// Freeze load balancer 1's renderer after the first fault, for good: the checker must
    /// report it.
    pub sabotage: bool,
    /// Never kill, freeze or restart load balancer 2's renderer or app 1's registrar, so
    /// one of each lives the whole run (its memory and open files start → end are then a
    /// true long-run figure).
    pub spare: bool,
    pub apps: usize,
    /// Registrar lease TTL, seconds.
    pub ttl: u64,
}

impl Options {
    pub fn new(seed: u64, duration: Duration) -> Options {
        Options {
            seed,
            duration,
            sabotage: false,
            spare: false,
            apps: 8,
            ttl: 3,
        }
    }
}

/// The kinds of fault, each injected at least once per run of 90 s or more.
pub const KINDS: [&str; 13] = [
    "etcd_kill",
    "etcd_freeze",
    "etcd_partition",
    "etcd_slow_net",
    "compact_defrag",
    "registrar_kill",
    "registrar_freeze",
    "app_restart",
    "renderer_kill",
    "haproxy_restart",
    "disk_full",
    "burst",
    "poison",
];

/// Size of each load balancer's config filesystem (a tmpfs `disk_full` fills).
const CONF_FS: &str = "4m";

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub kind: &'static str,
    /// Since the start of the fault phase.
    pub at: Duration,
    /// How long it lasts before it is healed (0: instantaneous).
    pub length: Duration,
    /// Member, app or load balancer index (by kind).
    pub target: usize,
}

/// SplitMix64: a small deterministic generator (the schedule must not change with a
/// dependency's version).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (milliseconds).
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The fault schedule for `o`: a fault every ~6 s on average, every kind at least once,
/// some overlapping; at most one etcd member disturbed at a time (quorum stays), and a
/// target (app, load balancer) never has two faults at once.
pub fn schedule(o: &Options) -> Vec<Planned> {
    let mut rng = Rng(o.seed);
    // The last 12 s have no new fault: everything heals and the checker sees quiet.
    let span = o.duration.saturating_sub(Duration::from_secs(12));
    let n = (span.as_secs() / 6).max(KINDS.len() as u64) as usize;
    let mut kinds: Vec<&'static str> = KINDS.to_vec();
    while kinds.len() < n {
        kinds.push(KINDS[rng.below(KINDS.len())]);
    }
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    let slot = span / n as u32;
    let ttl = o.ttl * 1000;
    let mut etcd_free = Duration::ZERO;
    let mut app_free = vec![Duration::ZERO; o.apps];
    let mut lb_free = [Duration::ZERO; 2];
    let mut out = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let mut at = slot * i as u32 + rng.ms(0, slot.as_millis() as u64);
        let length = match kind {
            "etcd_kill" | "etcd_freeze" => rng.ms(2000, 5000),
            "etcd_partition" => rng.ms(3000, 6000),
            "etcd_slow_net" => rng.ms(4000, 8000),
            // The supervisor's restart delay (systemd's RestartSec is 100 ms by default).
            "haproxy_restart" => rng.ms(100, 1500),
            "disk_full" => rng.ms(2000, 5000),
            "compact_defrag" => Duration::ZERO,
            "registrar_kill" | "app_restart" | "renderer_kill" => rng.ms(1000, 3000),
            "registrar_freeze" => rng.ms(ttl + 1000, ttl + 3000),
            _ => rng.ms(2000, 4000), // burst, poison: undone after this long
        };
        let target = match kind {
            "etcd_kill" | "etcd_freeze" => {
                at = at.max(etcd_free);
                etcd_free = at + length + Duration::from_secs(2);
                rng.below(3)
            }
            "etcd_partition" | "etcd_slow_net" => {
                // Member 0: the one in a network namespace.
                at = at.max(etcd_free);
                etcd_free = at + length + Duration::from_secs(2);
                0
            }
            "registrar_kill" | "registrar_freeze" | "app_restart" => {
                let t = if o.spare {
                    1 + rng.below(o.apps - 1)
                } else {
                    rng.below(o.apps)
                };
                at = at.max(app_free[t]);
                app_free[t] = at + length + Duration::from_secs(ttl / 1000 + 2);
                t
            }
            "renderer_kill" | "haproxy_restart" | "disk_full" => {
                // Under --sabotage, load balancer 1's renderer stays frozen: not restarted.
                let t = if o.sabotage || (o.spare && kind == "renderer_kill") {
                    0
                } else {
                    rng.below(2)
                };
                at = at.max(lb_free[t]);
                lb_free[t] = at + length + Duration::from_secs(2);
                t
            }
            _ => 0,
        };
        if at < span {
            out.push(Planned {
                kind,
                at,
                length,
                target,
            });
        }
    }
    out.sort_by_key(|p| p.at);
    out
}

/// A fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: &'static str,
    pub target: usize,
    pub at_ms: u64,
    pub healed_ms: u64,
    /// Healed → every load balancer runs the registry's set (and its file lists it).
    pub converged_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub at_ms: u64,
    pub invariant: &'static str,
    pub detail: String,
}

/// One checker sample (for the timeline).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: u64,
    /// Valid instances in the registry (`None`: etcd did not answer in time).
    pub registry: Option<usize>,
    /// Servers each load balancer runs (not in maintenance).
    pub live: [usize; 2],
}

#[derive(Debug, Clone, Default)]
pub struct Requests {
    pub total: u64,
    pub failed: u64,
    /// Prober requests refused by a load balancer whose HAProxy was down because the run
    /// killed it (`haproxy_restart`, until it answers again): expected, not failures.
    pub refused_while_down: u64,
    /// Failed prober requests: (ms, load balancer, faults active then).
    pub failures: Vec<(u64, usize, Vec<String>)>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    pub sabotage: bool,
    pub faults: Vec<Fault>,
    pub violations: Vec<Violation>,
    pub requests: Requests,
    pub samples: Vec<Sample>,
    /// Resident memory at the start and end, MiB, per process ("renderer-0", "registrar-3").
    pub rss: BTreeMap<String, (f64, f64)>,
    /// RSS and open files per process, from its first reading (10 s into the run, or its
    /// start if a fault restarted it) to its last: what a long run shows about leaks.
    pub usage: BTreeMap<String, Usage>,
}

/// One process's resources at its first and last reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub pid: u32,
    /// Seconds into the run of the first and the last reading.
    pub from_s: f64,
    pub to_s: f64,
    pub rss_mib: (f64, f64),
    pub fds: (u32, u32),
}

/// A registry entry or a running server: address, port, weight.
type Server = (String, u16, u32);

/// The registry's valid instances of `webapp`, by id.
async fn registry_set(c: &mut Client) -> Option<BTreeMap<String, Server>> {
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
static SPAWNED: std::sync::Mutex<Vec<(u32, String, Option<u64>)>> =
    std::sync::Mutex::new(Vec::new());

/// A process's state letter and start time (clock ticks since boot) from `/proc/PID/stat`.
fn stat_of(pid: u32) -> Option<(char, u64)> {
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
fn remember(pid: u32, name: String) {
    SPAWNED.lock().unwrap_or_else(|e| e.into_inner()).push((
        pid,
        name,
        stat_of(pid).map(|(_, t)| t),
    ));
}

fn spawn(name: &str, dir: &Path, cmd: Command) -> Proc {
    let p = Proc::spawn(name, dir, cmd);
    remember(p.pid(), name.to_string());
    p
}

/// Spawned processes still alive (not zombies, and not another process that got the PID).
fn still_running() -> Vec<(u32, String)> {
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
struct ChaosLb {
    dir: PathBuf,
    /// The config directory: a small tmpfs of its own (unmounted when dropped, after
    /// [`Drop`] killed the processes).
    conf: crate::Tmpfs,
    endpoints: String,
    http_port: u16,
    stats_port: u16,
    metrics_port: u16,
    cfg: PathBuf,
    master: PathBuf,
    haproxy: Proc,
    renderer: Option<Proc>,
    starts: u32,
}

impl ChaosLb {
    async fn start(dir: &Path, endpoints: &str) -> ChaosLb {
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

    fn start_renderer(&mut self) {
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
fn spawn_haproxy(dir: &Path, master: &Path, cfg: &Path, start: u32) -> Proc {
    spawn(
        &format!("haproxy-{start}"),
        dir,
        crate::lb::haproxy_command(master, cfg),
    )
}

impl ChaosLb {
    /// What a supervisor does when HAProxy dies: the master and its workers killed
    /// (systemd kills the whole control group), then, after `gap`, HAProxy started again
    /// from the file on disk. Returns once it answers on the traffic port (or after 15 s).
    async fn restart_haproxy(&mut self, gap: Duration) {
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
struct App {
    dir: PathBuf,
    endpoints: String,
    id: String,
    ttl: String,
    backend: Option<Backend>,
    port: u16,
    registrar: Option<Proc>,
    starts: u32,
}

impl App {
    fn start(dir: &Path, endpoints: &str, id: &str, ttl: u64) -> App {
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

    fn start_registrar(&mut self) {
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
    fn start_backend(&mut self) {
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
type Loads = (Vec<Option<Load>>, Vec<(usize, crate::load::LoadResult)>);

struct System {
    cluster: Mutex<Cluster>,
    lbs: Vec<Mutex<ChaosLb>>,
    apps: Vec<Mutex<App>>,
    master: Vec<PathBuf>,
    cfg: Vec<PathBuf>,
    member_endpoints: Vec<String>,
    peer_ports: Vec<u16>,
    /// wrk per load balancer (replaced around a `haproxy_restart`), and the results of
    /// the ones already stopped.
    loads: std::sync::Mutex<Loads>,
    /// When the run's load ends.
    end: std::sync::OnceLock<Instant>,
    /// Load balancers whose HAProxy the run has killed and that do not answer yet.
    down: [std::sync::atomic::AtomicBool; 2],
    /// Member 0's namespace (dropped last: the members run in it).
    ns: Netns,
}

impl System {
    /// Cuts member 0 off from its peers, or heals it: iptables in its namespace drops every
    /// peer connection both ways; clients still reach it (it has no quorum, so no leader).
    fn partition(&self, on: bool) {
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
    fn lossy(&self, on: bool, percent: u32) {
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
    fn replace_load(&self, lb: usize, port: u16, restart: bool) {
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
struct Ledger {
    active: Vec<(usize, &'static str, Instant)>,
    done: Vec<Fault>,
    /// Index into `done` of faults still waiting for convergence.
    converging: Vec<usize>,
    last_heal: Option<Instant>,
}

fn ms_since(start: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(start).as_millis() as u64
}

/// Open file descriptors of `pid`.
fn open_fds(pid: u32) -> Option<u32> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u32)
}

/// Resident set size of `pid`, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// PIDs of processes whose command line mentions `dir` (what a run leaves behind).
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
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

/// Runs the system under the schedule for `o.duration` and reports what the checker saw.
pub async fn run(o: &Options) -> Report {
    SPAWNED.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let tmp = crate::temp_dir();
    let dir = tmp.path().to_path_buf();
    let ns = Netns::create();
    let cluster = Cluster::start_placed(
        &dir,
        &[
            ("10.231.0.2", Some(ns.name.as_str())),
            ("10.231.0.1", None),
            ("10.231.0.1", None),
        ],
    )
    .await;
    let endpoints = cluster.endpoints();
    let member_endpoints: Vec<String> = (0..3).map(|i| cluster.endpoint(i)).collect();
    let peer_ports: Vec<u16> = (0..3).map(|i| cluster.peer_port(i)).collect();
    let mut lbs = Vec::new();
    for i in 0..2 {
        lbs.push(ChaosLb::start(&dir.join(format!("lb{i}")), &endpoints).await);
    }
    let apps: Vec<App> = (0..o.apps)
        .map(|i| App::start(&dir, &endpoints, &format!("app{i}"), o.ttl))
        .collect();
    let sys = Arc::new(System {
        master: lbs.iter().map(|l| l.master.clone()).collect(),
        cfg: lbs.iter().map(|l| l.cfg.clone()).collect(),
        cluster: Mutex::new(cluster),
        lbs: lbs.into_iter().map(Mutex::new).collect(),
        apps: apps.into_iter().map(Mutex::new).collect(),
        member_endpoints,
        peer_ports,
        loads: std::sync::Mutex::new((Vec::new(), Vec::new())),
        end: std::sync::OnceLock::new(),
        down: Default::default(),
        ns,
    });
    let mut client = Client::connect(&sys.member_endpoints, None)
        .await
        .expect("connect to the cluster");

    // Warm-up: every app registered and every load balancer running all of them.
    let ports: Vec<u16> = {
        let mut v = Vec::new();
        for lb in &sys.lbs {
            v.push(lb.lock().await.http_port);
        }
        v
    };
    let warm = Instant::now() + Duration::from_secs(60);
    loop {
        let reg = registry_set(&mut client).await.unwrap_or_default();
        let mut all = reg.len() == o.apps;
        for m in &sys.master {
            all &= live_servers_at(m)
                .await
                .values()
                .filter(|s| !s.maint)
                .count()
                == o.apps;
        }
        if all || Instant::now() > warm {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let plan = schedule(o);
    for p in &plan {
        eprintln!(
            "chaos: {:>6} ms +{:>5} ms {} {}",
            p.at.as_millis(),
            p.length.as_millis(),
            p.kind,
            p.target
        );
    }
    let start = Instant::now();
    let end = start + o.duration;
    let ledger = Arc::new(std::sync::Mutex::new(Ledger::default()));

    // Load: wrk (keep-alive) through each load balancer, bounded by the run's length.
    let secs = o.duration.as_secs().max(1) as u32;
    let _ = sys.end.set(end);
    sys.loads.lock().unwrap_or_else(|e| e.into_inner()).0 = ports
        .iter()
        .map(|p| Some(Load::start(*p, secs, 4, false)))
        .collect();

    // Probers: one request every 20 ms through each load balancer, failures timestamped.
    let mut probers = Vec::new();
    for (lb, port) in ports.iter().copied().enumerate() {
        let ledger = ledger.clone();
        let sys = sys.clone();
        probers.push(tokio::spawn(async move {
            let (mut total, mut failures, mut refused) = (0u64, Vec::new(), 0u64);
            while Instant::now() < end {
                let t = Instant::now();
                let down_before = sys.down[lb].load(std::sync::atomic::Ordering::SeqCst);
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(5), http::get(port, "/", None)).await,
                    Ok(Ok(r)) if r.status == 200
                );
                total += 1;
                let down = down_before || sys.down[lb].load(std::sync::atomic::Ordering::SeqCst);
                if !ok && down {
                    // Its HAProxy was killed by the run and does not answer yet.
                    refused += 1;
                } else if !ok {
                    let active: Vec<String> = {
                        let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                        l.active
                            .iter()
                            .map(|(_, k, _)| k.to_string())
                            .chain(
                                l.done
                                    .iter()
                                    .filter(|f| f.healed_ms + 1000 >= ms_since(start, t))
                                    .map(|f| format!("{} (healed)", f.kind)),
                            )
                            .collect()
                    };
                    failures.push((ms_since(start, t), lb, active));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (total, failures, refused)
        }));
    }

    // Injectors: one task per planned fault.
    let mut injectors = Vec::new();
    for (n, p) in plan.iter().cloned().enumerate() {
        let sys = sys.clone();
        let ledger = ledger.clone();
        let sabotage = o.sabotage && n == 0;
        injectors.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + p.at).await;
            let began = Instant::now();
            ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .active
                .push((n, p.kind, began));
            if sabotage {
                if let Some(r) = &sys.lbs[1].lock().await.renderer {
                    r.signal(Signal::SIGSTOP);
                }
            }
            inject(&sys, &p).await;
            let healed = Instant::now();
            let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
            l.active.retain(|(i, _, _)| *i != n);
            l.done.push(Fault {
                kind: p.kind,
                target: p.target,
                at_ms: ms_since(start, began),
                healed_ms: ms_since(start, healed),
                converged_ms: None,
            });
            let idx = l.done.len() - 1;
            l.converging.push(idx);
            l.last_heal = Some(healed);
        }));
    }

    // The checker.
    let bound = Duration::from_secs(3);
    let mut violations: Vec<Violation> = Vec::new();
    let mut samples = Vec::new();
    let mut last_registry: Option<BTreeMap<String, Server>> = None;
    let mut registry_changed = start;
    // Per load balancer and invariant: the open episode (reported once).
    let mut open: BTreeMap<(usize, &'static str), bool> = BTreeMap::new();
    let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
    let mut next_rss = start;
    let violate = |v: &mut Vec<Violation>, at: u64, invariant: &'static str, detail: String| {
        v.push(Violation {
            at_ms: at,
            invariant,
            detail,
        });
    };
    while Instant::now() < end + Duration::from_secs(2) {
        let t = Instant::now();
        let at = ms_since(start, t);
        let reg = registry_set(&mut client).await;
        let mut live = Vec::new();
        let mut files = Vec::new();
        for i in 0..2 {
            live.push(try_live_servers_at(&sys.master[i]).await);
            files.push(config_servers_in(
                &std::fs::read_to_string(&sys.cfg[i]).unwrap_or_default(),
            ));
        }
        // An HAProxy that did not answer (its master re-executing for a reload) is not
        // judged in this sample.
        let answered = [live[0].is_some(), live[1].is_some()];
        let running: Vec<BTreeMap<String, Server>> = live
            .iter()
            .map(|l| {
                l.iter()
                    .flatten()
                    .filter(|(_, s)| !s.maint)
                    .map(|(n, s)| (n.clone(), (s.addr.clone(), s.port, s.weight)))
                    .collect()
            })
            .collect();
        let previous = samples.last().map_or([0, 0], |s: &Sample| s.live);
        samples.push(Sample {
            at_ms: at,
            registry: reg.as_ref().map(BTreeMap::len),
            live: [0, 1].map(|i| {
                if answered[i] {
                    running[i].len()
                } else {
                    previous[i]
                }
            }),
        });
        // Hostile values never reach HAProxy, whatever else is going on.
        for (i, r) in running.iter().enumerate() {
            if let Some(name) = r
                .keys()
                .find(|n| n.starts_with("poison") || n.contains("evil"))
            {
                if !open.insert((i, "hostile"), true).unwrap_or(false) {
                    violate(&mut violations, at, "hostile", format!("lb{i} runs {name}"));
                }
            }
        }
        if let Some(reg) = reg {
            if last_registry.as_ref() != Some(&reg) {
                registry_changed = t;
                last_registry = Some(reg.clone());
            }
            let (active, last_heal) = {
                let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                (l.active.len(), l.last_heal)
            };
            let quiet_since = last_heal.map_or(registry_changed, |h| h.max(registry_changed));
            let quiet = active == 0 && t.saturating_duration_since(quiet_since) > bound;
            let healthy = reg.values().filter(|s| s.2 > 0).count();
            for i in (0..2).filter(|i| answered[*i]) {
                // 3. never emptied while a registered instance is healthy.
                let serving = running[i].values().filter(|s| s.2 > 0).count();
                if healthy > 0 && serving == 0 {
                    if !open.insert((i, "emptied"), true).unwrap_or(false) {
                        violate(
                            &mut violations,
                            at,
                            "emptied",
                            format!("lb{i} serves no instance while the registry has {healthy}"),
                        );
                    }
                } else {
                    open.insert((i, "emptied"), false);
                }
                // 1. quiet → live set = registry.
                let differs = running[i] != reg;
                if quiet && differs {
                    if !open.insert((i, "converged"), true).unwrap_or(false) {
                        let missing: Vec<&String> = reg
                            .keys()
                            .filter(|k| !running[i].contains_key(*k))
                            .collect();
                        let extra: Vec<&String> = running[i]
                            .keys()
                            .filter(|k| !reg.contains_key(*k))
                            .collect();
                        violate(
                            &mut violations,
                            at,
                            "converged",
                            format!(
                                "lb{i}: {} s quiet, live set differs from the registry (missing {:?}, extra {:?}, or other address/weight)",
                                t.saturating_duration_since(quiet_since).as_secs(),
                                missing.iter().take(5).collect::<Vec<_>>(),
                                extra.iter().take(5).collect::<Vec<_>>(),
                            ),
                        );
                    }
                } else if !differs {
                    open.insert((i, "converged"), false);
                }
                // 2. quiet → file = live set.
                let live_names: Vec<String> = running[i].keys().cloned().collect();
                let file_differs = files[i] != live_names;
                if quiet && !differs && file_differs {
                    if !open.insert((i, "file"), true).unwrap_or(false) {
                        violate(
                            &mut violations,
                            at,
                            "file",
                            format!(
                                "lb{i}: the file lists {} servers, HAProxy runs {}",
                                files[i].len(),
                                live_names.len()
                            ),
                        );
                    }
                } else if !file_differs {
                    open.insert((i, "file"), false);
                }
            }
            // Convergence time of healed faults.
            if answered == [true, true]
                && running.iter().all(|r| *r == reg)
                && files
                    .iter()
                    .zip(&running)
                    .all(|(f, r)| f.iter().eq(r.keys()))
            {
                let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                let waiting = std::mem::take(&mut l.converging);
                for idx in waiting {
                    let f = &mut l.done[idx];
                    f.converged_ms = Some(at.saturating_sub(f.healed_ms));
                }
            }
        }
        // 5. memory and open files, once a second: ours, etcd's and HAProxy's (master).
        if t >= next_rss {
            next_rss = t + Duration::from_secs(1);
            let mut pids: Vec<(String, u32)> = Vec::new();
            for (i, lb) in sys.lbs.iter().enumerate() {
                let lb = lb.lock().await;
                if let Some(r) = &lb.renderer {
                    pids.push((format!("renderer-{i}"), r.pid()));
                }
                pids.push((format!("haproxy-{i}"), lb.haproxy.pid()));
            }
            for (i, app) in sys.apps.iter().enumerate() {
                if let Some(r) = &app.lock().await.registrar {
                    pids.push((format!("registrar-{i}"), r.pid()));
                }
            }
            {
                let cluster = sys.cluster.lock().await;
                for i in 0..sys.member_endpoints.len() {
                    if let Some(pid) = cluster.pid(i) {
                        pids.push((format!("etcd-{i}"), pid));
                    }
                }
            }
            for (name, pid) in pids {
                note_usage(&mut usage, name, pid, at);
            }
        }
        tokio::time::sleep_until(t + Duration::from_millis(100)).await;
    }
    for j in injectors {
        let _ = j.await;
    }
    // 4. failed requests, attributed.
    let mut requests = Requests::default();
    for p in probers {
        if let Ok((total, failures, refused)) = p.await {
            requests.total += total;
            requests.failed += failures.len() as u64;
            requests.refused_while_down += refused;
            for (at, lb, active) in failures {
                violate(
                    &mut violations,
                    at,
                    "request_failed",
                    format!("prober through lb{lb}; faults then: {active:?}"),
                );
                requests.failures.push((at, lb, active));
            }
        }
    }
    let (running, stopped) = {
        let mut l = sys.loads.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut l.0), std::mem::take(&mut l.1))
    };
    let finished = running
        .into_iter()
        .enumerate()
        .filter_map(|(i, l)| l.map(|l| (i, l.finish())));
    for (i, r) in stopped.into_iter().chain(finished) {
        requests.total += r.requests;
        requests.failed += r.failed();
        if r.failed() > 0 {
            violate(
                &mut violations,
                ms_since(start, Instant::now()),
                "request_failed",
                format!("wrk through lb{i}: {} of {} failed", r.failed(), r.requests),
            );
        }
    }
    let mut rss = BTreeMap::new();
    for (name, u) in &usage {
        let ours = name.starts_with("renderer") || name.starts_with("registrar");
        if !ours {
            continue;
        }
        let (first, last) = u.rss_mib;
        rss.insert(name.clone(), (first, last));
        if last > (2.0 * first).max(first + 50.0) {
            violate(
                &mut violations,
                ms_since(start, Instant::now()),
                "memory",
                format!("{name}: RSS {first:.1} → {last:.1} MiB"),
            );
        }
        let (first, last) = u.fds;
        if last > 2 * first + 32 {
            violate(
                &mut violations,
                ms_since(start, Instant::now()),
                "open_files",
                format!("{name}: {first} → {last} open files"),
            );
        }
    }
    let faults = {
        let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = std::mem::take(&mut l.done);
        f.sort_by_key(|f| f.at_ms);
        f
    };
    // Thaw whatever the sabotage froze, stop everything, look for leftovers.
    for lb in &sys.lbs {
        if let Some(r) = &lb.lock().await.renderer {
            r.signal(Signal::SIGCONT);
        }
    }
    // Every fault healed: no drop rule left in member 0's namespace.
    let rules = Command::new("ip")
        .args(["netns", "exec", &sys.ns.name, "iptables", "-S"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let left = rules.lines().filter(|l| l.contains("-j DROP")).count();
    if left > 0 {
        violate(
            &mut violations,
            ms_since(start, Instant::now()),
            "fault_not_healed",
            format!("{left} iptables DROP rule(s) left in member 0's namespace"),
        );
    }
    let elapsed = start.elapsed();
    drop(client);
    match Arc::try_unwrap(sys) {
        Ok(sys) => drop(sys),
        Err(_) => panic!("an injector still holds the system"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let leftovers = || {
        let mut l = processes_under(&dir);
        l.extend(still_running());
        l
    };
    let mut left = leftovers();
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftovers();
    }
    if !left.is_empty() {
        violate(
            &mut violations,
            ms_since(start, Instant::now()),
            "leaked_process",
            format!("{left:?}"),
        );
    }
    violations.sort_by_key(|v| v.at_ms);
    Report {
        seed: o.seed,
        duration_s: elapsed.as_secs_f64(),
        sabotage: o.sabotage,
        faults,
        violations,
        requests,
        samples,
        rss,
        usage,
    }
}

/// Records a reading of `pid` as process `name`'s. The first reading is taken 10 s into the
/// run (after start-up), or anew when the name has a new process (a fault restarted it).
fn note_usage(usage: &mut BTreeMap<String, Usage>, name: String, pid: u32, at_ms: u64) {
    let (Some(mib), Some(fds)) = (rss_mib(pid), open_fds(pid)) else {
        return;
    };
    let at = at_ms as f64 / 1000.0;
    match usage.get_mut(&name) {
        Some(u) if u.pid == pid => {
            u.to_s = at;
            u.rss_mib.1 = mib;
            u.fds.1 = fds;
        }
        _ if at_ms >= 10_000 => {
            usage.insert(
                name,
                Usage {
                    pid,
                    from_s: at,
                    to_s: at,
                    rss_mib: (mib, mib),
                    fds: (fds, fds),
                },
            );
        }
        _ => {}
    }
}

/// Carries out one fault and heals it.
async fn inject(sys: &System, p: &Planned) {
    match p.kind {
        "etcd_kill" => {
            sys.cluster.lock().await.kill(p.target);
            tokio::time::sleep(p.length).await;
            sys.cluster.lock().await.restart(p.target).await;
        }
        "etcd_freeze" => {
            sys.cluster.lock().await.freeze(p.target);
            tokio::time::sleep(p.length).await;
            sys.cluster.lock().await.thaw(p.target);
        }
        "etcd_partition" => {
            sys.partition(true);
            tokio::time::sleep(p.length).await;
            sys.partition(false);
        }
        "etcd_slow_net" => {
            // No netem in every kernel (this machine's has none): loss from iptables, and
            // latency with jitter by pausing the member in a duty cycle (stopped 150–450 ms,
            // running 100 ms): every request and raft message waits up to ~0.5 s, and 3 %
            // of segments each way are lost (TCP retransmits after ≥ 200 ms).
            sys.lossy(true, 3);
            let until = Instant::now() + p.length;
            let mut rng = Rng(p.at.as_millis() as u64);
            while Instant::now() < until {
                sys.cluster.lock().await.freeze(0);
                tokio::time::sleep(rng.ms(150, 450)).await;
                sys.cluster.lock().await.thaw(0);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sys.lossy(false, 3);
        }
        "haproxy_restart" => {
            let port = sys.lbs[p.target].lock().await.http_port;
            sys.replace_load(p.target, port, false);
            sys.down[p.target].store(true, std::sync::atomic::Ordering::SeqCst);
            sys.lbs[p.target]
                .lock()
                .await
                .restart_haproxy(p.length)
                .await;
            sys.down[p.target].store(false, std::sync::atomic::Ordering::SeqCst);
            sys.replace_load(p.target, port, true);
        }
        "disk_full" => {
            // The config filesystem filled (the filler takes whatever is left), a change
            // made while it is full (a weight-0 instance joins: live at once, its file
            // cannot be written), then the space freed and the instance gone again.
            let filler = sys.lbs[p.target].lock().await.conf.path.join("filler");
            let _ = std::fs::write(&filler, vec![0u8; 8 << 20]);
            let id = format!("diskfull{}", p.target);
            let key = registry::instance_key("/services", "webapp", &id);
            let mut inst = registry::Instance::new("webapp", &id, "127.0.0.1", 39999);
            inst.weight = 0;
            let client = Client::connect(&sys.member_endpoints, None).await.ok();
            if let Some(mut c) = client.clone() {
                let put = c.put(key.clone(), inst.encode(), None);
                let _ = tokio::time::timeout(Duration::from_secs(2), put).await;
            }
            tokio::time::sleep(p.length).await;
            let _ = std::fs::remove_file(&filler);
            // Time for the file to catch up (retried every second) before the leave.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if let Some(mut c) = client {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.delete(key, None)).await;
            }
        }
        "compact_defrag" => {
            if let Ok(mut c) = Client::connect(&sys.member_endpoints, None).await {
                let op = async {
                    let rev = c.get("/", None).await.ok()?.header()?.revision();
                    c.compact(rev, None).await.ok()?;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), op).await;
            }
            for ep in &sys.member_endpoints {
                let defrag = tokio::process::Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", ep, "--command-timeout=5s", "defrag"])
                    .output();
                let _ = tokio::time::timeout(Duration::from_secs(8), defrag).await;
            }
        }
        "registrar_kill" => {
            if let Some(r) = &mut sys.apps[p.target].lock().await.registrar {
                r.kill();
            }
            tokio::time::sleep(p.length).await;
            sys.apps[p.target].lock().await.start_registrar();
        }
        "registrar_freeze" => {
            if let Some(r) = &sys.apps[p.target].lock().await.registrar {
                r.signal(Signal::SIGSTOP);
            }
            tokio::time::sleep(p.length).await;
            if let Some(r) = &sys.apps[p.target].lock().await.registrar {
                r.signal(Signal::SIGCONT);
            }
        }
        "app_restart" => {
            // Graceful: the registrar revokes, waits its drain, exits; then the app stops.
            let mut app = sys.apps[p.target].lock().await;
            if let Some(r) = &mut app.registrar {
                r.signal(Signal::SIGTERM);
                if r.exited(Duration::from_secs(10)).await.is_none() {
                    r.kill();
                }
            }
            if let Some(b) = &mut app.backend {
                b.proc.signal(Signal::SIGTERM);
                if b.proc.exited(Duration::from_secs(5)).await.is_none() {
                    b.proc.kill();
                }
            }
            app.backend = None;
            drop(app);
            tokio::time::sleep(p.length).await;
            let mut app = sys.apps[p.target].lock().await;
            app.start_backend();
            if let Some(b) = &app.backend {
                b.wait_up().await;
            }
            app.start_registrar();
        }
        "renderer_kill" => {
            if let Some(r) = &mut sys.lbs[p.target].lock().await.renderer {
                r.kill();
            }
            tokio::time::sleep(p.length).await;
            sys.lbs[p.target].lock().await.start_renderer();
        }
        "burst" => {
            // Several hundred changes: 300 weight-0 instances on closed ports, then gone.
            if let Ok(mut c) = Client::connect(&sys.member_endpoints, None).await {
                for i in 0..300u16 {
                    let id = format!("burst{i:03}");
                    let mut inst = registry::Instance::new("webapp", &id, "127.0.0.1", 40000 + i);
                    inst.weight = 0;
                    let key = registry::instance_key("/services", "webapp", &id);
                    let put = c.put(key, inst.encode(), None);
                    let _ = tokio::time::timeout(Duration::from_secs(2), put).await;
                }
                tokio::time::sleep(p.length).await;
                let del = c.delete(
                    "/services/webapp/burst",
                    Some(DeleteOptions::new().with_prefix()),
                );
                let _ = tokio::time::timeout(Duration::from_secs(5), del).await;
            }
        }
        "poison" => {
            // A record that would inject a server line, then its removal.
            let key = registry::instance_key("/services", "webapp", "poison");
            let value = r#"{"id":"poison","service":"webapp","address":"127.0.0.1:1\n    server evil 127.0.0.9","port":80}"#;
            if let Ok(mut c) = Client::connect(&sys.member_endpoints, None).await {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), c.put(key.clone(), value, None))
                        .await;
                tokio::time::sleep(p.length).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), c.delete(key, None)).await;
            }
        }
        other => unreachable!("fault kind {other}"),
    }
}

impl Report {
    pub fn json(&self) -> Value {
        json!({
            "seed": self.seed,
            "duration_s": self.duration_s,
            "sabotage": self.sabotage,
            "faults": self.faults.iter().map(|f| json!({
                "kind": f.kind, "target": f.target, "at_ms": f.at_ms,
                "healed_ms": f.healed_ms, "converged_ms": f.converged_ms,
            })).collect::<Vec<_>>(),
            "violations": self.violations.iter().map(|v| json!({
                "at_ms": v.at_ms, "invariant": v.invariant, "detail": v.detail,
            })).collect::<Vec<_>>(),
            "requests": {
                "total": self.requests.total,
                "failed": self.requests.failed,
                "refused_while_down": self.requests.refused_while_down,
                "failures": self.requests.failures.iter().map(|(at, lb, active)| json!({
                    "at_ms": at, "lb": lb, "faults": active,
                })).collect::<Vec<_>>(),
            },
            "rss_mib": self.rss.iter().map(|(k, (a, b))| (k.clone(), json!([a, b]))).collect::<serde_json::Map<_, _>>(),
            "usage": self.usage.iter().map(|(k, u)| (k.clone(), json!({
                "pid": u.pid, "from_s": u.from_s, "to_s": u.to_s,
                "rss_mib": [u.rss_mib.0, u.rss_mib.1], "open_files": [u.fds.0, u.fds.1],
            }))).collect::<serde_json::Map<_, _>>(),
            "samples": self.samples.iter().map(|s| json!([s.at_ms, s.registry, s.live[0], s.live[1]])).collect::<Vec<_>>(),
        })
    }

    /// Violations of load balancer `lb` ("lb1: …").
    pub fn violations_of(&self, lb: usize) -> Vec<&Violation> {
        let tag = format!("lb{lb}");
        self.violations
            .iter()
            .filter(|v| v.detail.contains(&tag))
            .collect()
    }

    /// One screen: faults per kind with convergence, requests, violations.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "chaos run: seed {}, {:.0} s{}\n\n| fault | count | converged p50 | converged max |\n|---|---:|---:|---:|\n",
            self.seed,
            self.duration_s,
            if self.sabotage { ", SABOTAGE (lb1's renderer frozen after the first fault)" } else { "" }
        );
        for kind in KINDS {
            let of: Vec<&Fault> = self.faults.iter().filter(|f| f.kind == kind).collect();
            let mut conv: Vec<u64> = of.iter().filter_map(|f| f.converged_ms).collect();
            conv.sort_unstable();
            let p50 = conv
                .get(conv.len() / 2)
                .map_or("—".into(), |v| format!("{v} ms"));
            let max = conv.last().map_or("—".into(), |v| format!("{v} ms"));
            let never = of.len() - conv.len();
            let max = if never > 0 {
                format!("{max} ({never} not before the next fault)")
            } else {
                max
            };
            out += &format!("| {kind} | {} | {p50} | {max} |\n", of.len());
        }
        out += &format!(
            "\nrequests: {} total, {} failed ({} refused by a load balancer while the run had its HAProxy down: expected)\nviolations: {}\n",
            self.requests.total,
            self.requests.failed,
            self.requests.refused_while_down,
            self.violations.len()
        );
        for v in self.violations.iter().take(12) {
            out += &format!("  {:>7} ms  {:<15} {}\n", v.at_ms, v.invariant, v.detail);
        }
        if self.violations.len() > 12 {
            out += &format!("  … and {} more\n", self.violations.len() - 12);
        }
        for (name, u) in &self.usage {
            if !name.starts_with("registrar") || name == "registrar-0" {
                out += &format!(
                    "{name}: RSS {:.1} → {:.1} MiB, open files {} → {} ({:.0}–{:.0} s)\n",
                    u.rss_mib.0, u.rss_mib.1, u.fds.0, u.fds.1, u.from_s, u.to_s
                );
            }
        }
        out
    }

    /// SVG timeline: faults as bands, registry and live sizes, failed requests.
    pub fn svg(&self) -> String {
        let (w, left, top) = (1000.0, 130.0, 20.0);
        let row = 14.0;
        let bands_h = row * KINDS.len() as f64;
        let chart_top = top + bands_h + 20.0;
        let chart_h = 200.0;
        let h = chart_top + chart_h + 50.0;
        let total_ms = (self.duration_s * 1000.0).max(1.0);
        let x = |ms: f64| left + (w - left - 20.0) * ms / total_ms;
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="13">chaos run, seed {}: faults (bands), registry and live servers per load balancer, failed requests (red ticks)</text>"#,
            self.seed
        );
        for (i, kind) in KINDS.iter().enumerate() {
            let y = top + row * i as f64;
            s += &format!(r#"<text x="4" y="{}">{kind}</text>"#, y + 10.0);
            for f in self.faults.iter().filter(|f| f.kind == *kind) {
                let (x0, x1) = (x(f.at_ms as f64), x(f.healed_ms as f64));
                s += &format!(
                    r##"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{}" fill="#e8a33d" opacity="0.8"/>"##,
                    (x1 - x0).max(1.5),
                    row - 3.0
                );
            }
        }
        let max = self
            .samples
            .iter()
            .flat_map(|s| [s.registry.unwrap_or(0), s.live[0], s.live[1]])
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let y = |v: f64| chart_top + chart_h - chart_h * v / max;
        s += &format!(
            r##"<rect x="{left}" y="{chart_top}" width="{}" height="{chart_h}" fill="none" stroke="#999"/><text x="4" y="{}">{max:.0} servers</text><text x="4" y="{}">0</text>"##,
            w - left - 20.0,
            chart_top + 10.0,
            chart_top + chart_h
        );
        type Series = (&'static str, &'static str, fn(&Sample) -> Option<usize>);
        let series: [Series; 3] = [
            ("registry", "#333", |s| s.registry),
            ("lb0 live", "#1f77b4", |s| Some(s.live[0])),
            ("lb1 live", "#2ca02c", |s| Some(s.live[1])),
        ];
        for (k, (name, color, f)) in series.iter().enumerate() {
            // At most ~2 000 points a line (a 30-minute run has 18 000 samples).
            let step = (self.samples.len() / 2000).max(1);
            let pts: Vec<String> = self
                .samples
                .iter()
                .step_by(step)
                .filter_map(|smp| {
                    f(smp).map(|v| format!("{:.1},{:.1}", x(smp.at_ms as f64), y(v as f64)))
                })
                .collect();
            s += &format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="{}" points="{}"/>"#,
                if k == 0 { 2.5 } else { 1.2 },
                pts.join(" ")
            );
            s += &format!(
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                left + 10.0 + 90.0 * k as f64,
                h - 10.0
            );
        }
        for (at, _, _) in &self.requests.failures {
            let xx = x(*at as f64);
            s += &format!(
                r#"<line x1="{xx:.1}" x2="{xx:.1}" y1="{}" y2="{}" stroke="red"/>"#,
                chart_top + chart_h,
                chart_top + chart_h + 10.0
            );
        }
        s += &format!(
            r#"<text x="{}" y="{}">0 s</text><text x="{}" y="{}">{:.0} s</text></svg>"#,
            left,
            chart_top + chart_h + 22.0,
            w - 60.0,
            chart_top + chart_h + 22.0,
            self.duration_s
        );
        s
    }
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

    #[test]
    fn same_seed_same_schedule_every_kind_and_quorum_kept() {
        let o = Options::new(7, Duration::from_secs(90));
        let a = schedule(&o);
        assert_eq!(a, schedule(&o));
        assert_ne!(a, schedule(&Options::new(8, Duration::from_secs(90))));
        for kind in KINDS {
            assert!(a.iter().any(|p| p.kind == kind), "{kind} missing: {a:?}");
        }
        let etcd: Vec<&Planned> = a.iter().filter(|p| p.kind.starts_with("etcd")).collect();
        for w in etcd.windows(2) {
            assert!(
                w[0].at + w[0].length <= w[1].at,
                "two members disturbed at once: {w:?}"
            );
        }
        let sabotage = Options {
            sabotage: true,
            ..o.clone()
        };
        assert!(schedule(&sabotage)
            .iter()
            .all(|p| p.kind != "renderer_kill" || p.target == 0));
        let spare = Options {
            spare: true,
            ..o.clone()
        };
        let spared = schedule(&spare);
        for kind in KINDS {
            assert!(spared.iter().any(|p| p.kind == kind), "{kind} missing");
        }
        assert!(spared.iter().all(|p| match p.kind {
            "renderer_kill" => p.target == 0,
            "registrar_kill" | "registrar_freeze" | "app_restart" => p.target != 0,
            _ => true,
        }));
    }
}
