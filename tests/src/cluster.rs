//! A real etcd cluster on loopback: N members with their own ports and data dirs, which a
//! test can kill, freeze or restart one at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etcd_client::Client;
use nix::sys::signal::Signal;

use crate::{eventually, free_port, Proc};

struct Member {
    name: String,
    /// Address the member listens on (client and peer).
    addr: String,
    /// Network namespace it runs in, if any.
    netns: Option<String>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    starts: u32,
    proc: Option<Proc>,
    /// The etcd binary (`etcd` from PATH unless [`Cluster::upgrade`] changed it).
    program: PathBuf,
}

/// An etcd cluster whose members run as child processes.
pub struct Cluster {
    dir: PathBuf,
    members: Vec<Member>,
}

impl Cluster {
    /// Starts `n` members and waits until every one answers.
    pub async fn start(dir: &Path, n: usize) -> Cluster {
        let placement: Vec<(&str, Option<&str>)> = (0..n).map(|_| ("127.0.0.1", None)).collect();
        Self::start_placed(dir, &placement).await
    }

    /// Starts one member per `(address, network namespace)`; a member in a namespace is run
    /// with `ip netns exec`.
    pub async fn start_placed(dir: &Path, placement: &[(&str, Option<&str>)]) -> Cluster {
        let n = placement.len();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                addr: placement[i].0.to_string(),
                netns: placement[i].1.map(str::to_string),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.join(format!("etcd-m{i}")),
                starts: 0,
                proc: None,
                program: PathBuf::from("etcd"),
            })
            .collect();
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            members,
        };
        for i in 0..n {
            c.launch(i, "new");
        }
        for i in 0..n {
            c.wait_up(i).await;
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.addr, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn launch(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let m = &mut self.members[i];
        let client = format!("http://{}:{}", m.addr, m.client_port);
        let peer = format!("http://{}:{}", m.addr, m.peer_port);
        let mut cmd = match &m.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&m.program);
                c
            }
            None => Command::new(&m.program),
        };
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                state,
            ])
            .args([
                "--initial-cluster-token",
                "e2e-cluster",
                "--logger",
                "zap",
                "--log-level",
            ])
            // E2E_ETCD_LOG=info shows elections and lease revocations when diagnosing.
            .arg(std::env::var("E2E_ETCD_LOG").unwrap_or_else(|_| "warn".into()));
        m.starts += 1;
        m.proc = Some(Proc::spawn(
            &format!("etcd-{}-{}", m.name, m.starts),
            &self.dir,
            cmd,
        ));
    }

    async fn wait_up(&self, i: usize) {
        let ep = self.endpoint(i);
        eventually(
            Duration::from_secs(30),
            &format!("etcd member {i} answers"),
            || {
                let ep = ep.clone();
                async move {
                    let mut c = Client::connect([ep], None).await.ok()?;
                    tokio::time::timeout(Duration::from_secs(1), c.status())
                        .await
                        .ok()?
                        .ok()
                }
            },
        )
        .await;
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "http://{}:{}",
            self.members[i].addr, self.members[i].client_port
        )
    }

    /// Member `i`'s process, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].proc.as_ref().map(Proc::pid)
    }

    pub fn peer_port(&self, i: usize) -> u16 {
        self.members[i].peer_port
    }

    /// All members, comma-separated (for --endpoints).
    pub fn endpoints(&self) -> String {
        (0..self.members.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    /// Index of the current leader, asked of any live member.
    pub async fn leader(&self) -> usize {
        eventually(Duration::from_secs(20), "a leader", || async {
            for i in 0..self.members.len() {
                if self.members[i].proc.is_none() {
                    continue;
                }
                let Ok(mut c) = Client::connect([self.endpoint(i)], None).await else {
                    continue;
                };
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await
                else {
                    continue;
                };
                if s.leader() == 0 {
                    continue;
                }
                let Ok(Ok(list)) =
                    tokio::time::timeout(Duration::from_secs(1), c.member_list()).await
                else {
                    continue;
                };
                let name = list
                    .members()
                    .iter()
                    .find(|m| m.id() == s.leader())
                    .map(|m| m.name().to_string())?;
                return self.members.iter().position(|m| m.name == name);
            }
            None
        })
        .await
    }

    /// A client on the live members.
    pub async fn client(&self) -> Client {
        self.client_without(usize::MAX).await
    }

    /// A client on the live members other than `skip` (e.g. a frozen one).
    pub async fn client_without(&self, skip: usize) -> Client {
        let eps: Vec<String> = (0..self.members.len())
            .filter(|i| *i != skip && self.members[*i].proc.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        Client::connect(eps, None)
            .await
            .expect("connect to the cluster")
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Stops member `i` as an operator does (SIGTERM, waiting up to 20 s for it to exit),
    /// starts `program` on the same data dir and waits until it answers: one step of a
    /// rolling upgrade.
    pub async fn upgrade(&mut self, i: usize, program: &Path) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.signal(Signal::SIGTERM);
            if p.exited(Duration::from_secs(20)).await.is_none() {
                p.kill();
            }
        }
        self.members[i].program = program.to_path_buf();
        self.launch(i, "existing");
        self.wait_up(i).await;
    }

    /// Starts a killed member again on its data dir.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i, "existing");
        self.wait_up(i).await;
    }

    pub fn freeze(&self, i: usize) {
        if let Some(p) = &self.members[i].proc {
            p.signal(Signal::SIGSTOP);
        }
    }

    pub fn thaw(&self, i: usize) {
        if let Some(p) = &self.members[i].proc {
            p.signal(Signal::SIGCONT);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.thaw(i);
        }
    }
}
