//! Hitless membership: when a new config differs from the running one only in `server`
//! lines, bring HAProxy to it through the runtime API (`add server`, `set server`,
//! drain + `del server`) instead of a reload, then check that the running state matches
//! the file. Anything else — or any refused command — is left to the reload path.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;
use tracing::{debug, info};

use super::haproxy::{HaproxyError, MasterCli};

/// A `server` line of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub backend: String,
    pub name: String,
    pub addr: String,
    pub port: String,
    /// Everything after the address, e.g. `check inter 2s weight 100`.
    pub keywords: Vec<String>,
}

impl Server {
    fn weight(&self) -> Option<&str> {
        self.keywords
            .windows(2)
            .find(|w| w[0] == "weight")
            .map(|w| w[1].as_str())
    }

    fn keywords_without_weight(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut skip = false;
        for k in &self.keywords {
            if skip {
                skip = false;
                continue;
            }
            if k == "weight" {
                skip = true;
                continue;
            }
            out.push(k.as_str());
        }
        out
    }
}

/// What to change in the running HAProxy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<Server>,
    pub remove: Vec<Server>,
    /// (old, new) with only address, port or weight changed.
    pub update: Vec<(Server, Server)>,
    /// Backends with `cookie … dynamic`, and their server count in the new config.
    pub dynamic_cookie_backends: BTreeMap<String, usize>,
}

/// Above this many changes in one apply, a reload is cheaper than that many CLI round trips.
pub const MAX_RUNTIME_CHANGES: usize = 200;
/// HAProxy 2.6 recomputes every server's dynamic cookie, checking each against all others,
/// on `enable dynamic-cookie backend`: quadratic. Measured here, ~5 000 servers stall the
/// worker past its watchdog and it aborts. Larger backends with dynamic cookies reload.
pub const MAX_DYNAMIC_COOKIE_SERVERS: usize = 1000;

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.update.is_empty()
    }

    /// Number of server changes.
    pub fn len(&self) -> usize {
        self.add.len() + self.remove.len() + self.update.len()
    }

    /// Why this plan should go through a reload instead, if it should.
    pub fn too_big(&self) -> Option<String> {
        if self.len() > MAX_RUNTIME_CHANGES {
            return Some(format!(
                "{} server changes at once (bulk: reload)",
                self.len()
            ));
        }
        let touched = self.backends();
        self.dynamic_cookie_backends
            .iter()
            .find(|(be, n)| **n > MAX_DYNAMIC_COOKIE_SERVERS && touched.contains(be))
            .map(|(be, n)| format!("backend {be} has {n} servers with dynamic cookies (runtime cookie update is quadratic in 2.6)"))
    }

    /// Backends this plan touches.
    pub fn backends(&self) -> Vec<String> {
        let mut b: Vec<String> = self
            .add
            .iter()
            .chain(&self.remove)
            .chain(self.update.iter().map(|(_, n)| n))
            .map(|s| s.backend.clone())
            .collect();
        b.sort();
        b.dedup();
        b
    }
}

/// Servers by (backend, name).
type Servers = BTreeMap<(String, String), Server>;

/// Splits a config into its skeleton (every line but backend `server` lines) and the
/// servers by backend.
fn split(config: &str) -> (Vec<&str>, Servers) {
    let (skeleton, servers, _) = split_with_cookies(config);
    (skeleton, servers)
}

/// [`split`], plus the backends that use dynamic cookies.
fn split_with_cookies(config: &str) -> (Vec<&str>, Servers, Vec<String>) {
    let mut skeleton = Vec::new();
    let mut servers = BTreeMap::new();
    let mut dynamic = Vec::new();
    let mut section: Option<(String, String)> = None;
    for line in config.lines() {
        let trimmed = line.trim();
        if !line.starts_with(char::is_whitespace)
            && !trimmed.is_empty()
            && !trimmed.starts_with('#')
        {
            let mut words = trimmed.split_whitespace();
            let kind = words.next().unwrap_or("").to_string();
            let name = words.next().unwrap_or("").to_string();
            section = Some((kind, name));
        }
        let in_backend = matches!(&section, Some((k, _)) if k == "backend" || k == "listen");
        if in_backend
            && trimmed.starts_with("cookie ")
            && trimmed.split_whitespace().any(|w| w == "dynamic")
        {
            dynamic.push(section.as_ref().map(|(_, n)| n.clone()).unwrap_or_default());
        }
        if in_backend && trimmed.starts_with("server ") {
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            if let (Some(name), Some(target)) = (words.get(1), words.get(2)) {
                if let Some((addr, port)) = target.rsplit_once(':') {
                    let backend = section.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
                    let s = Server {
                        backend: backend.clone(),
                        name: name.to_string(),
                        addr: addr.to_string(),
                        port: port.to_string(),
                        keywords: words[3..].iter().map(|w| w.to_string()).collect(),
                    };
                    servers.insert((backend, name.to_string()), s);
                    continue;
                }
            }
        }
        skeleton.push(line);
    }
    (skeleton, servers, dynamic)
}

/// The runtime plan from `old` to `new`, or `None` when anything besides backend `server`
/// lines differs (that needs a reload).
pub fn plan(old: &str, new: &str) -> Option<Plan> {
    let (old_skel, old_servers) = split(old);
    let (new_skel, new_servers, dynamic) = split_with_cookies(new);
    if old_skel != new_skel {
        return None;
    }
    let mut plan = Plan::default();
    for be in dynamic {
        let n = new_servers.values().filter(|s| s.backend == be).count();
        plan.dynamic_cookie_backends.insert(be, n);
    }
    for (key, n) in &new_servers {
        match old_servers.get(key) {
            None => plan.add.push(n.clone()),
            Some(o) if o == n => {}
            Some(o) if o.keywords_without_weight() == n.keywords_without_weight() => {
                plan.update.push((o.clone(), n.clone()))
            }
            Some(o) => {
                plan.remove.push(o.clone());
                plan.add.push(n.clone());
            }
        }
    }
    for (key, o) in &old_servers {
        if !new_servers.contains_key(key) {
            plan.remove.push(o.clone());
        }
    }
    Some(plan)
}

/// A runtime change HAProxy refused, or a state that does not match afterwards.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("HAProxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    #[error("running state does not match the config: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Cli(#[from] HaproxyError),
}

async fn send(
    cli: &MasterCli,
    command: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<(), RuntimeError> {
    let answer = cli.worker_command(command).await?;
    let answer = answer.trim();
    debug!(%command, %answer, "runtime API");
    if ok(answer) {
        Ok(())
    } else {
        Err(RuntimeError::Refused {
            command: command.to_string(),
            answer: answer.chars().take(300).collect(),
        })
    }
}

/// Answers that mean success: nothing, or HAProxy's confirmations.
fn quiet(answer: &str) -> bool {
    answer.is_empty()
}

/// Applies `plan`. Leaves drain first: no new requests, in-flight ones finish (up to
/// `drain_timeout`), then the server is put in maintenance and deleted.
pub async fn execute(
    cli: &MasterCli,
    plan: &Plan,
    drain_timeout: Duration,
) -> Result<(), RuntimeError> {
    // Drain every leaving server at once, then wait for all of them.
    for s in &plan.remove {
        send(
            cli,
            &format!("set server {}/{} state drain", s.backend, s.name),
            quiet,
        )
        .await?;
    }
    if !plan.remove.is_empty() {
        wait_drained(cli, &plan.remove, drain_timeout).await?;
    }
    for s in &plan.remove {
        let id = format!("{}/{}", s.backend, s.name);
        send(cli, &format!("set server {id} state maint"), quiet).await?;
        if s.keywords.iter().any(|k| k == "check") {
            // Stops the check task so the server has no activity left.
            let _ = send(cli, &format!("disable health {id}"), |_| true).await;
        }
        send(cli, &format!("del server {id}"), |a| {
            a.contains("Server deleted")
        })
        .await?;
    }
    for (_, n) in &plan.update {
        let id = format!("{}/{}", n.backend, n.name);
        send(
            cli,
            &format!("set server {id} addr {} port {}", n.addr, n.port),
            |a| a.is_empty() || a.contains("changed") || a.contains("no need to change"),
        )
        .await?;
        if let Some(w) = n.weight() {
            send(cli, &format!("set server {id} weight {w}"), quiet).await?;
        }
    }
    let mut cookies: Vec<String> = Vec::new();
    for s in &plan.add {
        let id = format!("{}/{}", s.backend, s.name);
        let cmd = format!(
            "add server {id} {}:{} {}",
            s.addr,
            s.port,
            s.keywords.join(" ")
        );
        send(cli, cmd.trim_end(), |a| a.contains("New server registered")).await?;
        if s.keywords.iter().any(|k| k == "check") {
            send(cli, &format!("enable health {id}"), quiet).await?;
        }
        send(cli, &format!("enable server {id}"), quiet).await?;
        cookies.push(s.backend.clone());
    }
    cookies.dedup();
    for be in cookies {
        // Dynamic cookies (`cookie … dynamic` + `dynamic-cookie-key`) are derived for new
        // servers only when asked; a backend without them answers with an error we ignore.
        let _ = send(cli, &format!("enable dynamic-cookie backend {be}"), |_| {
            true
        })
        .await;
    }
    Ok(())
}

/// Waits until none of `servers` has a current session.
async fn wait_drained(
    cli: &MasterCli,
    servers: &[Server],
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let busy = busy_servers(cli, servers).await?;
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            info!(
                ?busy,
                ?timeout,
                "drain timeout: removing servers with sessions left"
            );
            for id in busy {
                let _ = send(cli, &format!("shutdown sessions server {id}"), |_| true).await;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `backend/name` of the servers among `servers` with current sessions (`show stat` scur).
async fn busy_servers(cli: &MasterCli, servers: &[Server]) -> Result<Vec<String>, RuntimeError> {
    let csv = cli.worker_command("show stat -1 4 -1").await?;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(px), Some(sv), Some(scur)) = (col("pxname"), col("svname"), col("scur")) else {
        return Err(RuntimeError::Mismatch(
            "unexpected `show stat` output".into(),
        ));
    };
    let mut busy = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(b), Some(n), Some(c)) = (f.get(px), f.get(sv), f.get(scur)) else {
            continue;
        };
        if c.parse::<u64>().unwrap_or(0) > 0
            && servers.iter().any(|s| s.backend == *b && s.name == *n)
        {
            busy.push(format!("{b}/{n}"));
        }
    }
    Ok(busy)
}

/// Checks that the running servers of every backend in `backends` are exactly the ones in
/// `config` (names, addresses, ports, weights), using `show servers state`.
pub async fn verify(
    cli: &MasterCli,
    config: &str,
    backends: &[String],
) -> Result<(), RuntimeError> {
    let (_, want) = split(config);
    for be in backends {
        let out = cli
            .worker_command(&format!("show servers state {be}"))
            .await?;
        let mut running: BTreeMap<String, (String, String, String)> = BTreeMap::new();
        for line in out.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 19 || f[0].starts_with('#') {
                continue;
            }
            // be_id be_name srv_id srv_name srv_addr op admin uweight iweight … srv_port(18)
            running.insert(
                f[3].to_string(),
                (f[4].to_string(), f[18].to_string(), f[7].to_string()),
            );
        }
        let expected: BTreeMap<String, (String, String, String)> = want
            .values()
            .filter(|s| &s.backend == be)
            .map(|s| {
                (
                    s.name.clone(),
                    (
                        s.addr.clone(),
                        s.port.clone(),
                        s.weight().unwrap_or("1").to_string(),
                    ),
                )
            })
            .collect();
        if running.keys().ne(expected.keys()) {
            return Err(RuntimeError::Mismatch(format!(
                "backend {be}: running {:?}, config {:?}",
                running.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>()
            )));
        }
        for (name, (addr, port, weight)) in &expected {
            let (raddr, rport, rweight) = &running[name];
            // Hostnames resolve to an IP at runtime; compare addresses only for IP literals.
            let addr_ok = addr.parse::<std::net::IpAddr>().is_err() || addr == raddr;
            if !addr_ok || port != rport || weight != rweight {
                return Err(RuntimeError::Mismatch(format!(
                    "{be}/{name}: running {raddr}:{rport} weight {rweight}, config {addr}:{port} weight {weight}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "global\n    maxconn 10\nbackend nodes\n    balance roundrobin\n";

    fn cfg(servers: &[&str]) -> String {
        let mut s = BASE.to_string();
        for line in servers {
            s.push_str(&format!("    {line}\n"));
        }
        s.push_str("frontend f\n    bind :80\n");
        s
    }

    #[test]
    fn server_only_changes_make_a_plan() {
        let old = cfg(&[
            "server a 10.0.0.1:80 check weight 100",
            "server b 10.0.0.2:80 check weight 100",
        ]);
        let new = cfg(&[
            "server b 10.0.0.2:81 check weight 50",
            "server c 10.0.0.3:80 check weight 100",
        ]);
        let p = plan(&old, &new).unwrap();
        assert_eq!(
            p.add.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(
            p.remove.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].1.port, "81");
        assert_eq!(p.backends(), ["nodes"]);
        assert!(plan(&old, &old).unwrap().is_empty());
    }

    #[test]
    fn keyword_changes_replace_the_server_and_other_changes_need_a_reload() {
        let old = cfg(&["server a 10.0.0.1:80 check"]);
        let p = plan(&old, &cfg(&["server a 10.0.0.1:80 check backup"])).unwrap();
        assert_eq!((p.add.len(), p.remove.len()), (1, 1));
        assert!(plan(&old, &old.replace("maxconn 10", "maxconn 20")).is_none());
        assert!(plan(&old, &format!("{old}backend other\n")).is_none());
    }

    #[test]
    fn bulk_and_large_dynamic_cookie_plans_reload() {
        let old = cfg(&[]);
        let many: Vec<String> = (0..=MAX_RUNTIME_CHANGES)
            .map(|i| format!("server n{i} 10.0.0.1:{} check", 1000 + i))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(plan(&old, &cfg(&refs)).unwrap().too_big().is_some());
        assert!(plan(&old, &cfg(&refs[..3])).unwrap().too_big().is_none());
        let big: Vec<String> = (0..=MAX_DYNAMIC_COOKIE_SERVERS)
            .map(|i| format!("server n{i} 10.0.0.1:{} check", 1000 + i))
            .collect();
        let refs: Vec<&str> = big.iter().map(String::as_str).collect();
        let with_cookie = |c: String| {
            c.replace(
                "balance roundrobin",
                "balance roundrobin\n    cookie S insert dynamic",
            )
        };
        let old = with_cookie(cfg(&refs[1..]));
        let new = with_cookie(cfg(&refs));
        let p = plan(&old, &new).unwrap();
        assert_eq!(p.len(), 1);
        assert!(p.too_big().unwrap().contains("dynamic cookies"));
    }

    #[test]
    fn ipv6_addresses_split_at_the_last_colon() {
        let (_, s) = split("backend b\n    server x ::1:3000 check\n");
        let x = &s[&("b".to_string(), "x".to_string())];
        assert_eq!((x.addr.as_str(), x.port.as_str()), ("::1", "3000"));
    }
}
