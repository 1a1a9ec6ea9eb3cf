//! The one harness for integration tests (and the benchmarks): free loopback ports,
//! temp dirs, and real etcd / HAProxy / registrar / renderer / web-app processes that
//! are killed by PID when their handle is dropped.
//!
//! Tests wait on events or poll with a deadline ([`eventually`]); nothing here sleeps
//! to synchronise.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

pub mod chaos;
pub mod cluster;
pub mod compose;
pub mod etcd;
pub mod gate;
pub mod http;
pub mod lb;
pub mod load;
pub mod netns;
pub mod proc;
pub mod upgrade;

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use etcd::Etcd;
pub use proc::Proc;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that was free a moment ago and that this process has not handed out
/// before (tests run in parallel threads).
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        let mut set = HANDED_OUT.lock().unwrap();
        if set.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// A fresh temp dir, removed on drop (kept, with every process log, when `E2E_KEEP=1`).
pub fn temp_dir() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix("lb-e2e-")
        .tempdir()
        .expect("temp dir");
    if std::env::var_os("E2E_KEEP").is_some() {
        eprintln!("keeping {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`bin`] look in `dir` instead of next to the running executable (the bench builds
/// the binaries into a target dir of their own).
pub fn set_bin_dir(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

/// Path of a workspace binary (`registrar`, `renderer`, `webapp`), built by
/// `cargo build --workspace` before the tests run (the README's test command does it).
pub fn bin(name: &str) -> PathBuf {
    let dir = match BIN_DIR.get() {
        Some(d) => d.clone(),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
            let mut dir = exe.parent().expect("target dir").to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir = dir.parent().expect("target dir").to_path_buf();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The registrar binary talking to the etcd at `endpoints` (comma-separated), logging at
/// `log` (a `RUST_LOG` filter); callers add every other flag.
pub fn registrar_base(endpoints: &str, log: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("lb-registrar"));
    cmd.env("RUST_LOG", log).args(["--endpoints", endpoints]);
    cmd
}

/// A registrar keeping `webapp/<id>` at 127.0.0.1:`port` with `--ttl ttl` in the etcd at
/// `endpoints` (comma-separated), logging at INFO; callers add flags.
pub fn registrar_command(endpoints: &str, id: &str, port: u16, ttl: &str) -> std::process::Command {
    let mut cmd = registrar_base(endpoints, "info");
    cmd.args([
        "--service",
        "webapp",
        "--id",
        id,
        "--address",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--ttl",
        ttl,
    ]);
    cmd
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts `check` keeps returning true for `period` (polling); for "X must not happen" checks.
pub async fn stays<F, Fut>(period: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        assert!(check().await, "expected to hold for {period:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small tmpfs mounted at `path` (created if missing) for the life of the value: a
/// filesystem a test can fill. Unmounted on drop (lazily: a process still holding a file
/// there does not keep it).
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: `256k`, `4m`); needs root.
    pub fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create the mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount a tmpfs on {} (root)",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
