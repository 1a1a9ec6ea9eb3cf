//! Stamps the build with the commit it was built from, for `--version`: `LB_COMMIT` from
//! the environment (a package built from a tarball sets it), else `git rev-parse`, else
//! "unknown".
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LB_COMMIT");
    let commit = std::env::var("LB_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
    // Rebuild when HEAD moves (a branch checkout or a new commit on it).
    if let Ok(out) = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !dir.is_empty() {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/refs/heads");
        }
    }
    println!(
        "cargo:rustc-env=LB_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
