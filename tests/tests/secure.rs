//! A secured etcd end to end: TLS with client certificates, authentication, and the
//! least-privilege roles made by deploy/etcd-secure.sh. Secrets stay out of logs and help.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::lb::{wait_routed, Backend, Lb};
use e2e::{bin, eventually, temp_dir, Etcd, Proc};

const T: Duration = Duration::from_secs(20);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd-secure.sh")
}

fn run_script(args: &[&str]) {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcd-secure.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TLS + credential flags for `user`, using `ca` as the trusted CA.
fn creds(certs: &Path, user: &str, ca: &Path) -> Vec<String> {
    vec![
        "--cacert".into(),
        ca.display().to_string(),
        "--cert".into(),
        certs.join(format!("{user}.crt")).display().to_string(),
        "--key".into(),
        certs.join(format!("{user}.key")).display().to_string(),
        "--user".into(),
        user.into(),
    ]
}

/// etcdctl as `user` (its password from `certs`; TLS with the registrar's client
/// certificate): (succeeded, stdout + stderr).
fn etcdctl_as(etcd: &Etcd, certs: &Path, user: &str, args: &[&str]) -> (bool, String) {
    let password = std::fs::read_to_string(certs.join(format!("{user}.password"))).unwrap();
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(etcd.endpoint())
        .arg("--cacert")
        .arg(certs.join("ca.crt"))
        .arg("--cert")
        .arg(certs.join("registrar.crt"))
        .arg("--key")
        .arg(certs.join("registrar.key"))
        .arg("--user")
        .arg(format!("{user}:{}", password.trim()))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A registrar of service `webapp` (unless `extra` names another with `--service`).
fn registrar(dir: &Path, name: &str, etcd: &Etcd, extra: &[String], password_file: &Path) -> Proc {
    let mut cmd = e2e::registrar_base(
        &etcd.endpoint(),
        "debug,h2=info,hyper=info,tower=info,rustls=info",
    );
    if !extra.iter().any(|a| a == "--service") {
        cmd.args(["--service", "webapp"]);
    }
    cmd.args(["--address", "127.0.0.1", "--ttl", "3s"])
        .arg("--password-file")
        .arg(password_file)
        .args(extra);
    Proc::spawn(name, dir, cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_auth_and_least_privilege_roles() {
    let dir = temp_dir();
    let certs = dir.path().join("certs");
    run_script(&["certs", certs.to_str().unwrap()]);
    let etcd = Etcd::start_tls(dir.path(), &certs).await;
    run_script(&[
        "auth",
        &etcd.endpoint(),
        certs.to_str().unwrap(),
        "/services",
        "webapp",
        "api",
    ]);
    let ca = certs.join("ca.crt");
    let reg_pw = certs.join("registrar.password");
    let password = std::fs::read_to_string(&reg_pw).unwrap().trim().to_string();

    // The registrar with its own role registers.
    let app = Backend::start(dir.path(), "s1");
    let mut args = creds(&certs, "registrar", &ca);
    args.extend([
        "--port".to_string(),
        app.port.to_string(),
        "--id".into(),
        "s1".into(),
    ]);
    let reg = registrar(dir.path(), "registrar", &etcd, &args, &reg_pw);
    eventually(T, "registered over TLS with auth", || async {
        etcd.etcdctl(&["get", "/services/webapp/s1", "--print-value-only"])
            .contains("\"id\":\"s1\"")
            .then_some(())
    })
    .await;
    assert!(
        !reg.log().contains(&password),
        "password must not be logged"
    );

    // The renderer with its read-only role renders and routes.
    let mut extra = creds(&certs, "renderer", &ca);
    extra.push("--password-file".into());
    extra.push(certs.join("renderer.password").display().to_string());
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let lb = Lb::start(dir.path(), &etcd, &extra_refs);
    lb.wait_serving().await;
    wait_routed(lb.http_port, &["s1"], T).await;

    // A registrar holding the renderer's credentials cannot write: fatal, clear, nothing written.
    let mut args = creds(&certs, "renderer", &ca);
    args.extend([
        "--port".into(),
        "4000".into(),
        "--id".into(),
        "intruder".into(),
    ]);
    let mut bad = registrar(
        dir.path(),
        "registrar-renderer-creds",
        &etcd,
        &args,
        &certs.join("renderer.password"),
    );
    let status = bad.exited(T).await.expect("exits");
    assert_eq!(status.code(), Some(64));
    assert!(bad.log().contains("permission denied"), "{}", bad.log());
    assert!(etcd
        .etcdctl(&["get", "/services/webapp/intruder"])
        .is_empty());

    // Least privilege. The webapp registrar's credentials cannot write another service's
    // records nor admin keys (no lifting its own maintenance); the renderer's cannot write
    // at all; the operator's write admin keys only, and the renderer applies them.
    let webapp = "registrar-webapp";
    let (ok, out) = etcdctl_as(&etcd, &certs, webapp, &["put", "/services/webapp/s7", "{}"]);
    assert!(ok, "{out}");
    etcd.etcdctl(&["del", "/services/webapp/s7"]);
    for (user, key) in [
        (webapp, "/services/api/a1"),
        (webapp, "/services/_admin/webapp/s1"),
        ("renderer", "/services/webapp/s1"),
        ("renderer", "/services/_admin/webapp/s1"),
        ("operator", "/services/webapp/s1"),
        ("registrar-docker", "/services/_admin/webapp/s1"),
    ] {
        let (ok, out) = etcdctl_as(&etcd, &certs, user, &["put", key, "{}"]);
        assert!(
            !ok && out.contains("permission denied"),
            "{user} {key}: {out}"
        );
    }
    let (ok, out) = etcdctl_as(
        &etcd,
        &certs,
        "operator",
        &[
            "put",
            "/services/_admin/webapp/s1",
            r#"{"state":"maint","reason":"ticket 7"}"#,
        ],
    );
    assert!(ok, "{out}");
    // The operator's maintenance applied.
    lb.wait_server_line("s1", " disabled", T).await;
    // A registrar for another service with webapp's credentials: one clear error naming
    // the key and the permission, exit 64, nothing written.
    // (the registrar's client certificate; the user is what the password authenticates)
    let mut args = creds(&certs, "registrar", &ca);
    let user = args.iter().position(|a| a == "--user").unwrap() + 1;
    args[user] = webapp.to_string();
    args.extend(["--port", "4003", "--id", "a1", "--service", "api"].map(String::from));
    let mut p = registrar(
        dir.path(),
        "registrar-other-service",
        &etcd,
        &args,
        &certs.join(format!("{webapp}.password")),
    );
    assert_eq!(p.exited(T).await.expect("exits").code(), Some(64));
    let log = p.log();
    assert!(log.contains("permission denied"), "{log}");
    assert!(log.contains("/services/api/a1"), "{log}");
    assert_eq!(log.matches("ERROR").count(), 1, "{log}");
    assert!(etcd.etcdctl(&["get", "/services/api/a1"]).is_empty());

    // Wrong password: fatal start-up error saying so.
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let mut args = creds(&certs, "registrar", &ca);
    args.extend(["--port".into(), "4001".into(), "--id".into(), "s9".into()]);
    let mut p = registrar(dir.path(), "registrar-wrong-password", &etcd, &args, &wrong);
    assert_eq!(p.exited(T).await.expect("exits").code(), Some(64));
    assert!(p.log().contains("authentication failed"), "{}", p.log());

    // Untrusted server certificate (another CA): fatal start-up error naming the certificate.
    let other = dir.path().join("other-ca");
    run_script(&["certs", other.to_str().unwrap()]);
    let mut args = creds(&certs, "registrar", &other.join("ca.crt"));
    args.extend(["--port".into(), "4002".into(), "--id".into(), "s8".into()]);
    let mut p = registrar(dir.path(), "registrar-wrong-ca", &etcd, &args, &reg_pw);
    assert_eq!(p.exited(T).await.expect("exits").code(), Some(64));
    assert!(
        p.log().to_lowercase().contains("certificate"),
        "{}",
        p.log()
    );
}

#[test]
fn secrets_do_not_show_in_help() {
    let out = Command::new(bin("lb-registrar"))
        .arg("--help")
        .env("ETCD_PASSWORD", "s3cr3t-value")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--password-file"));
    assert!(help.contains("ETCD_PASSWORD"));
    assert!(!help.contains("s3cr3t-value"), "{help}");
}
