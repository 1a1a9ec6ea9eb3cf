//! `cargo run --release -p bench -- [--quick] [--json FILE] [--svg FILE] [SCENARIO...]`
//!
//! Starts its own etcd, HAProxy + renderer and real web apps on loopback (through the e2e
//! harness), measures from the outside — the clock starts at the etcd write (or the signal)
//! and stops when a real HTTP request through HAProxy is answered by the backend (or no
//! longer is) — and prints a table. Load is bounded (wrk, fixed duration).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

/// mimalloc: a render at 10 000 instances allocates ~100 000 small objects and frees
/// them again; with glibc's malloc that was a third of the time (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod scenarios;
mod stages;
mod stats;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Measure convergence, reload safety, storms, scale and footprint."
)]
struct Args {
    /// Smaller counts and shorter runs (under a minute).
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// Write the convergence latency CDF as SVG.
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
    /// Write the scale scenario's cost-versus-size log-log plot as SVG.
    #[arg(long, value_name = "FILE")]
    scale_svg: Option<std::path::PathBuf>,
    /// Run nothing: take the results of an earlier --json FILE (for --scale-svg).
    #[arg(long, value_name = "FILE")]
    results_from: Option<std::path::PathBuf>,
    /// Load-balancer command template for measuring another tool the same way; the default
    /// is this project's renderer in exec mode. Placeholders: {etcd} {template} {cfg} {dir}
    /// {http_port} {stats_port} {master} (HAProxy must be started with `-S {master}`).
    #[arg(long, value_name = "CMD")]
    lb_cmd: Option<String>,
    /// Run this project's renderer with --no-runtime-api (every change through a checked
    /// reload), to compare the two paths without a hand-written --lb-cmd.
    #[arg(long)]
    no_runtime_api: bool,
    /// `chaos` only: the seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `chaos` only: how long faults are injected (the last 12 s heal).
    #[arg(long, default_value = "90s", value_parser = registry::duration::parse_duration)]
    duration: std::time::Duration,
    /// `chaos` only: freeze load balancer 1's renderer after the first fault, for good; the
    /// run must then report violations (proves the checker can fail).
    #[arg(long)]
    sabotage: bool,
    /// `chaos` only: never kill or freeze load balancer 2's renderer or app 1's registrar,
    /// so their memory and open files are measured over the whole run.
    #[arg(long)]
    spare: bool,
    /// `chaos` only: write the timeline (faults, registry and live sizes) as SVG.
    #[arg(long, value_name = "FILE")]
    timeline_svg: Option<std::path::PathBuf>,
    /// Scenarios to run (default: all but chaos): chaos (a seeded run of random faults
    /// against 3 etcd members, 2 load balancers and 8 registered web apps, with an invariant
    /// checker; exits 1 on a violation, or under --sabotage on none), convergence, deregister, crash, reload, storm,
    /// scale, wide (100 000 instances in 1 000 services; BENCH_WIDE=services,per;
    /// BENCH_WIDE_JOINS=FILE: each join's total and stages as JSON), footprint, outage, frozen (3-member etcd: frozen members and leader), idle
    /// (10 idle minutes against a default etcd; 30 s with --quick), upgrade (a rolling etcd
    /// 3.4.23 → 3.5.16 upgrade, Debian 12 → 13, under wrk with 8 registrars and 2 load
    /// balancers; JSON report; exits 1 if a request failed, a registration was lost or a
    /// member is not 3.5 afterwards), fleet (N registrations through the registrar's lease
    /// code on a 3-member etcd, M watchers, one renderer: etcd CPU/RSS, keep-alive and watch
    /// delivery p99, put → served; BENCH_FLEET_SIZES, BENCH_FLEET_WATCHERS; --json, --svg).
    scenarios: Vec<String>,
}

fn main() {
    let args = Args::parse();
    if let (Some(from), Some(svg)) = (&args.results_from, &args.scale_svg) {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(from).expect("read results"))
                .expect("results JSON");
        let rows: Vec<stats::Row> = json["results"]
            .as_array()
            .map(|r| r.iter().filter_map(stats::Row::from_json).collect())
            .unwrap_or_default();
        std::fs::write(svg, stats::scale_svg(&rows, &SCALE_SERIES)).expect("write SVG");
        return;
    }
    // The harness spawns the release binaries; build them into a target dir of their own so
    // this build and `cargo run -p bench` (different feature sets) do not keep rebuilding
    // each other's artifacts.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target").join("bench-bins");
    // As shipped: the registrar built for size (profile release-small), the rest release.
    let build = |profile: &str, packages: &[&str]| {
        let status = std::process::Command::new(&cargo)
            .current_dir(&root)
            .args(["build", "--profile", profile, "--locked", "--target-dir"])
            .arg(&target)
            .args(packages.iter().flat_map(|p| ["-p", p]))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    };
    build("release", &["renderer", "webapp"]);
    build("release-small", &["registrar"]);
    let bins = target.join("bin");
    std::fs::create_dir_all(&bins).expect("target/bench-bins/bin");
    for (dir, name) in [
        ("release-small", "lb-registrar"),
        ("release", "lb-renderer"),
        ("release", "webapp"),
    ] {
        let dest = bins.join(name);
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(target.join(dir).join(name), &dest).expect("copy a binary");
    }
    e2e::set_bin_dir(bins);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if args.scenarios.iter().any(|s| s == "upgrade") {
        let o = e2e::upgrade::Options {
            to: e2e::upgrade::etcd_of("trixie"),
            apps: 8,
            settle: std::time::Duration::from_secs(10),
        };
        let report = rt.block_on(e2e::upgrade::run(&o));
        let text = serde_json::to_string_pretty(&report).unwrap();
        println!("{text}");
        let failed = report["requests"]["failed"].as_u64().unwrap_or(u64::MAX);
        let lost = report["registrations_lost"].as_u64().unwrap_or(u64::MAX);
        let all_35 = report["versions_after"].as_array().is_some_and(|v| {
            v.iter()
                .all(|x| x.as_str().is_some_and(|s| s.starts_with("3.5")))
        });
        for (goal, met) in [
            ("0 failed requests", failed == 0),
            ("0 registrations lost", lost == 0),
            ("every member 3.5 afterwards", all_35),
        ] {
            eprintln!("goal {goal}: {}", if met { "met" } else { "MISSED" });
        }
        if let Some(path) = &args.json {
            std::fs::write(path, text).expect("write JSON");
        }
        std::process::exit(if failed == 0 && lost == 0 && all_35 {
            0
        } else {
            1
        });
    }
    if args.scenarios.iter().any(|s| s == "fleet") {
        // --results-from FILE: the table and the plot of an earlier run, nothing run.
        let report = match &args.results_from {
            Some(from) => {
                serde_json::from_str(&std::fs::read_to_string(from).expect("read results"))
                    .expect("results JSON")
            }
            None => {
                let grid = scenarios::fleet::Grid::from_env(args.quick);
                rt.block_on(scenarios::fleet::fleet(&grid))
            }
        };
        println!("{}", scenarios::fleet::table(&report));
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&report).unwrap();
            std::fs::write(path, text).expect("write JSON");
        }
        if let Some(path) = &args.svg {
            std::fs::write(path, scenarios::fleet::svg(&report)).expect("write SVG");
        }
        return;
    }
    if args.scenarios.iter().any(|s| s == "chaos") {
        let o = e2e::chaos::Options {
            sabotage: args.sabotage,
            spare: args.spare,
            ..e2e::chaos::Options::new(args.seed, args.duration)
        };
        eprintln!("schedule: {:?}", e2e::chaos::schedule(&o));
        let report = rt.block_on(e2e::chaos::run(&o));
        println!("{}", report.summary());
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&report.json()).unwrap();
            std::fs::write(path, text).expect("write JSON");
        }
        if let Some(path) = &args.timeline_svg {
            std::fs::write(path, report.svg()).expect("write SVG");
        }
        let ok = if o.sabotage {
            !report.violations_of(1).is_empty()
        } else {
            report.violations.is_empty()
        };
        std::process::exit(if ok { 0 } else { 1 });
    }
    let all = [
        "convergence",
        "deregister",
        "crash",
        "reload",
        "storm",
        "scale",
        "wide",
        "footprint",
        "outage",
        "frozen",
        "idle",
    ];
    let chosen: Vec<String> = if args.scenarios.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    let opts = scenarios::Opts {
        quick: args.quick,
        lb_cmd: args.lb_cmd.clone(),
        no_runtime_api: args.no_runtime_api,
    };
    let mut rows = Vec::new();
    let mut latencies = Vec::new();
    for name in &chosen {
        eprintln!("== {name}");
        let started = std::time::Instant::now();
        let result = rt.block_on(scenarios::run(name, &opts, &mut latencies));
        match result {
            Some(mut r) => {
                for row in &r {
                    eprintln!("   {}", row.line());
                }
                rows.append(&mut r);
            }
            None => eprintln!("   unknown scenario {name:?}; known: {all:?}"),
        }
        eprintln!("   ({:.1}s)", started.elapsed().as_secs_f64());
    }
    println!("{}", stats::table(&rows, &machine()));
    if let Some(path) = args.json {
        let json = serde_json::json!({
            "machine": machine(),
            "quick": args.quick,
            "results": rows.iter().map(stats::Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("write JSON");
    }
    if let Some(path) = args.scale_svg {
        std::fs::write(&path, stats::scale_svg(&rows, &SCALE_SERIES)).expect("write SVG");
    }
    if let Some(path) = args.svg {
        std::fs::write(&path, stats::cdf_svg(&latencies)).expect("write SVG");
    }
}

/// The lines of the scale plot: (label, metric prefix in the scale rows).
const SCALE_SERIES: [(&str, &str); 6] = [
    ("render per change", "render per change"),
    ("haproxy -c", "haproxy -c"),
    ("join (live)", "join, put"),
    ("leave (live)", "leave, delete"),
    ("join through a reload", "join through a reload"),
    ("HAProxy floor (same join)", "HAProxy floor"),
];

/// A one-line description of the machine the numbers come from.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let haproxy = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .split(" - ")
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let etcd = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    format!("{cores} cores, {mem} GiB, {cpu}; {haproxy}; {etcd}")
}
