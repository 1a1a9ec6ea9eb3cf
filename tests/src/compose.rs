//! The deploy/ compose stack for the container tests: its own project name and ports on
//! 127.0.0.1, optional profiles, `down -v` on drop (with the last log lines when a test
//! panicked), and the web-app ids answering through HAProxy.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::{eventually, free_port, http};

/// The repository root (where deploy/ is).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// deploy/images.sh (debug binaries) once per test binary: tests in one binary run in
/// parallel.
pub fn build_images() {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return;
    }
    let images = Command::new("bash")
        .arg(root().join("deploy/images.sh"))
        .env("PROFILE", "debug")
        .current_dir(root())
        .output()
        .expect("run deploy/images.sh");
    assert!(
        images.status.success(),
        "deploy/images.sh: {}",
        String::from_utf8_lossy(&images.stderr)
    );
    *built = true;
}

/// One compose project of deploy/docker-compose.yml.
pub struct Stack {
    pub project: String,
    pub http_port: u16,
    pub stats_port: u16,
    profiles: Vec<String>,
}

impl Stack {
    /// A project named `<name><pid>` on free ports, with `profiles` enabled.
    pub fn new(name: &str, profiles: &[&str]) -> Stack {
        Stack {
            project: format!("{name}{}", std::process::id()),
            http_port: free_port(),
            stats_port: free_port(),
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(root())
            .args(["-p", &self.project, "-f", "deploy/docker-compose.yml"]);
        for p in &self.profiles {
            c.args(["--profile", p]);
        }
        c.env("HTTP_PORT", self.http_port.to_string())
            .env("STATS_PORT", self.stats_port.to_string())
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("COOKIE_KEY", "e2e-secret");
        c
    }

    /// `docker-compose ARGS`, which must succeed.
    pub fn compose(&self, args: &[&str]) -> Output {
        let out = self
            .command()
            .args(args)
            .output()
            .expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// What `docker-compose ARGS` printed, trimmed.
    pub fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.compose(args).stdout)
            .trim()
            .to_string()
    }

    /// `docker-compose ARGS` that may fail (polling).
    pub fn try_stdout(&self, args: &[&str]) -> Option<String> {
        let out = self.command().args(args).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Distinct web-app ids answering through HAProxy over `n` requests.
    pub async fn ids(&self, n: usize) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        for _ in 0..n {
            if let Ok(r) = http::get(self.http_port, "/", None).await {
                if let Some(id) = r.instance_id() {
                    seen.insert(id);
                }
            }
        }
        seen
    }

    /// Waits until exactly `count` web apps answer.
    pub async fn wait_ids(&self, count: usize, timeout: Duration) -> BTreeSet<String> {
        eventually(
            timeout,
            &format!("{count} web apps in rotation"),
            || async {
                let seen = self.ids(count * 6).await;
                (seen.len() == count).then_some(seen)
            },
        )
        .await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self.command().args(["logs", "--tail", "40"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = self
            .command()
            .args(["down", "-v", "--timeout", "5"])
            .output();
    }
}
