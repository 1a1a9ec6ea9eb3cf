//! The Debian packages as operators run them: `scripts/package.sh` builds them (release,
//! lintian-clean), `scripts/systemd-check.sh` installs them into a booted Debian root
//! (systemd-nspawn) holding only Debian's haproxy, etcd-server and systemd, and checks,
//! through the units: served through Debian's haproxy.service, no WARN on a healthy start,
//! `systemctl reload` applies a template edit without restarting the renderer or HAProxy,
//! a broken template keeps the running config with an ERROR naming the file, a frozen
//! renderer is restarted by the watchdog, the registrar's reload re-puts its record, and
//! `systemctl stop lb-registrar@w1` takes the instance out within 3 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use e2e::bin;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds both packages once per test binary; their paths.
fn packages() -> &'static (String, String) {
    static DEBS: OnceLock<(String, String)> = OnceLock::new();
    DEBS.get_or_init(|| {
        let out = Command::new("scripts/package.sh")
            .current_dir(workspace())
            .output()
            .expect("scripts/package.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/package.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        let [.., renderer, registrar] = lines[..] else {
            panic!("scripts/package.sh printed no package paths: {stdout}");
        };
        assert!(renderer.contains("lb-renderer_") && registrar.contains("lb-registrar_"));
        (
            workspace().join(renderer).display().to_string(),
            workspace().join(registrar).display().to_string(),
        )
    })
}

fn check(suite: &str) {
    let (renderer, registrar) = packages();
    let out = Command::new("scripts/systemd-check.sh")
        .current_dir(workspace())
        .args([suite, renderer, registrar])
        .arg(bin("webapp"))
        .output()
        .expect("scripts/systemd-check.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The per-check lines, for the test log.
    for line in stderr
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL"))
    {
        eprintln!("{line}");
    }
    assert!(
        out.status.success(),
        "systemd-check {suite} failed:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("systemd-check {suite}: 8 passed, 0 failed")),
        "{stderr}"
    );
}

#[test]
fn packages_run_under_systemd_on_debian_12() {
    check("bookworm");
}

#[test]
fn packages_run_under_systemd_on_debian_13() {
    check("trixie");
}
