//! A real single-member etcd on free loopback ports in a temp dir, restartable on the
//! same data dir, freezable (SIGSTOP) and killable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use nix::sys::signal::Signal;

use crate::{eventually, free_port, Proc};

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_dir: PathBuf,
    starts: u32,
    /// Certificates dir (deploy/etcd-secure.sh layout) when etcd serves TLS.
    tls: Option<PathBuf>,
    /// Extra addresses (besides 127.0.0.1) the client port listens on.
    extra_listen: Vec<String>,
    pub proc: Option<Proc>,
}

/// One stored key.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub lease: i64,
}

impl Etcd {
    /// Starts etcd in `dir` and waits until it answers.
    pub async fn start(dir: &Path) -> Etcd {
        Self::start_with(dir, None).await
    }

    /// Starts etcd serving TLS with client-certificate authentication, using the
    /// certificates `deploy/etcd-secure.sh certs` made in `certs`. The test's own client
    /// authenticates as `root` by certificate.
    pub async fn start_tls(dir: &Path, certs: &Path) -> Etcd {
        Self::start_with(dir, Some(certs.to_path_buf())).await
    }

    /// Starts etcd listening on 127.0.0.1 and on `addresses` (e.g. the host side of a veth
    /// link to a test network namespace).
    pub async fn start_listening(dir: &Path, addresses: &[&str]) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: dir.join("etcd-data"),
            log_dir: dir.to_path_buf(),
            starts: 0,
            tls: None,
            extra_listen: addresses.iter().map(|a| a.to_string()).collect(),
            proc: None,
        };
        e.launch().await;
        e
    }

    async fn start_with(dir: &Path, tls: Option<PathBuf>) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: dir.join("etcd-data"),
            log_dir: dir.to_path_buf(),
            starts: 0,
            tls,
            extra_listen: Vec::new(),
            proc: None,
        };
        e.launch().await;
        e
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        let certs = self.tls.as_ref()?;
        let read = |n: &str| std::fs::read(certs.join(n)).expect("read certificate");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("ca.crt")))
            .identity(etcd_client::Identity::from_pem(
                read("root.crt"),
                read("root.key"),
            ));
        Some(etcd_client::ConnectOptions::new().with_tls(tls))
    }

    async fn launch(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("e2e")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(
                std::iter::once(self.endpoint())
                    .chain(
                        self.extra_listen
                            .iter()
                            .map(|a| format!("http://{a}:{}", self.client_port)),
                    )
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("e2e={peer}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        if let Some(certs) = &self.tls {
            cmd.arg("--cert-file")
                .arg(certs.join("server.crt"))
                .arg("--key-file")
                .arg(certs.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(certs.join("ca.crt"))
                .arg("--client-cert-auth");
        }
        self.starts += 1;
        let name = format!("etcd-{}", self.starts);
        self.proc = Some(Proc::spawn(&name, &self.log_dir, cmd));
        let ep = self.endpoint();
        let opts = self.connect_options();
        eventually(Duration::from_secs(20), "etcd answers", || {
            let (ep, opts) = (ep.clone(), opts.clone());
            async move {
                let mut c = Client::connect([ep], opts).await.ok()?;
                tokio::time::timeout(Duration::from_secs(1), c.status())
                    .await
                    .ok()?
                    .ok()
            }
        })
        .await;
    }

    /// A client for the test's own reads and writes.
    pub async fn client(&self) -> Client {
        Client::connect([self.endpoint()], self.connect_options())
            .await
            .expect("connect to etcd")
    }

    /// SIGTERM and wait (graceful stop; data kept).
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGTERM);
            if p.exited(Duration::from_secs(10)).await.is_none() {
                p.kill();
            }
        }
    }

    /// SIGKILL (crash; data kept).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts again on the same data dir and ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// Starts again after [`stop`](Self::stop) / [`kill`](Self::kill).
    pub async fn start_again(&mut self) {
        assert!(self.proc.is_none(), "etcd still running");
        self.launch().await;
    }

    /// Wipes the data dir and starts an empty etcd on the same ports (store replaced).
    pub async fn replace_with_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        self.launch().await;
    }

    pub fn freeze(&self) {
        if let Some(p) = &self.proc {
            p.signal(Signal::SIGSTOP);
        }
    }

    pub fn thaw(&self) {
        if let Some(p) = &self.proc {
            p.signal(Signal::SIGCONT);
        }
    }

    /// All keys under `prefix`.
    pub async fn get_prefix(&self, prefix: &str) -> Vec<Kv> {
        let mut c = self.client().await;
        let resp = c
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .expect("etcd get");
        resp.kvs()
            .iter()
            .map(|kv| Kv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: String::from_utf8_lossy(kv.value()).into_owned(),
                lease: kv.lease(),
            })
            .collect()
    }

    /// The value under `key`, if any.
    pub async fn get(&self, key: &str) -> Option<Kv> {
        let mut c = Client::connect([self.endpoint()], self.connect_options())
            .await
            .ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(2), c.get(key, None))
            .await
            .ok()?
            .ok()?;
        resp.kvs().first().map(|kv| Kv {
            key: key.to_string(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
        })
    }

    pub async fn put(&self, key: &str, value: &str) {
        self.client()
            .await
            .put(key, value, None)
            .await
            .expect("etcd put");
    }

    pub async fn delete(&self, key: &str) {
        self.client()
            .await
            .delete(key, None)
            .await
            .expect("etcd delete");
    }

    /// Remaining TTL of a lease (-1 when it does not exist).
    pub async fn lease_ttl(&self, lease: i64) -> i64 {
        let mut c = self.client().await;
        c.lease_time_to_live(lease, None)
            .await
            .map(|r| r.ttl())
            .unwrap_or(-1)
    }

    /// Keys attached to a lease, as `etcdctl lease timetolive --keys` shows them.
    pub async fn lease_keys(&self, lease: i64) -> Vec<String> {
        let mut c = self.client().await;
        let opts = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
        c.lease_time_to_live(lease, Some(opts))
            .await
            .map(|r| {
                r.keys()
                    .iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `etcdctl` against this etcd and returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        if let Some(certs) = &self.tls {
            cmd.arg("--cacert")
                .arg(certs.join("ca.crt"))
                .arg("--cert")
                .arg(certs.join("root.crt"))
                .arg("--key")
                .arg(certs.join("root.key"));
        }
        let out = cmd.args(args).output().expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Proc's own Drop kills by PID; thaw first so a frozen etcd can die.
        self.thaw();
    }
}
