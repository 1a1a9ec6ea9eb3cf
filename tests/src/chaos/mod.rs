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

//!
//! Files: [`schedule`] (seed → faults), [`system`] (the processes and their bookkeeping),
//! [`inject`] (one fault, then its heal), [`checker`] (the invariants, judged on each look
//! at the system), [`report`] (text, JSON, SVG); this file runs them together.

mod checker;
mod inject;
mod report;
mod schedule;
mod system;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use nix::sys::signal::Signal;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::http;
use crate::lb::{config_servers_in, live_servers_at, try_live_servers_at};
use crate::load::Load;
use crate::netns::Netns;
use checker::{Checker, Observation};
use inject::inject;
pub use report::{Fault, Report, Requests, Sample, Usage, Violation};
pub use schedule::{schedule, Options, Planned, KINDS};
use system::{
    ms_since, processes_under, registry_set, still_running, App, ChaosLb, Ledger, System, SPAWNED,
};

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

    // The checker: a look at every public interface every 100 ms, judged by [`Checker`].
    let mut checker = Checker::new(start);
    let mut next_rss = start;
    while Instant::now() < end + Duration::from_secs(2) {
        let t = Instant::now();
        let at = ms_since(start, t);
        let registry = registry_set(&mut client).await;
        let mut running = [None, None];
        let mut files = [Vec::new(), Vec::new()];
        for i in 0..2 {
            // Servers in maintenance do not serve: left out.
            running[i] = try_live_servers_at(&sys.master[i]).await.map(|live| {
                live.into_iter()
                    .filter(|(_, s)| !s.maint)
                    .map(|(n, s)| (n, (s.addr, s.port, s.weight)))
                    .collect()
            });
            files[i] = config_servers_in(&std::fs::read_to_string(&sys.cfg[i]).unwrap_or_default());
        }
        let (faults_active, last_heal) = {
            let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
            (l.active.len(), l.last_heal)
        };
        let converged = checker.observe(Observation {
            t,
            registry,
            running,
            files,
            faults_active,
            last_heal,
        });
        if converged {
            // Convergence time of healed faults.
            let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = std::mem::take(&mut l.converging);
            for idx in waiting {
                let f = &mut l.done[idx];
                f.converged_ms = Some(at.saturating_sub(f.healed_ms));
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
                checker.note_usage(name, pid, at);
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
                checker.violate(
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
            checker.violate(
                ms_since(start, Instant::now()),
                "request_failed",
                format!("wrk through lb{i}: {} of {} failed", r.failed(), r.requests),
            );
        }
    }
    let rss = checker.judge_usage(ms_since(start, Instant::now()));
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
        checker.violate(
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
        checker.violate(
            ms_since(start, Instant::now()),
            "leaked_process",
            format!("{left:?}"),
        );
    }
    let (mut violations, samples, usage) = checker.finish();
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
