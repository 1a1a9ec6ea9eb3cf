//! Carrying out one planned fault, and healing it.

use std::time::Duration;

use etcd_client::{Client, DeleteOptions};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::schedule::{Planned, Rng};
use super::system::System;

/// Carries out one fault and heals it.
pub(super) async fn inject(sys: &System, p: &Planned) {
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
