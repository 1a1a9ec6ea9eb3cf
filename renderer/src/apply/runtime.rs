//! Hitless membership: runs a [`Plan`] (server lines only changed) through HAProxy's runtime
//! API instead of a reload — `add server`, `set server` addr/weight/state, drain + `del
//! server` — then checks that the running state matches the file. Anything refused is left
//! to the reload path. The commands themselves are [`crate::haproxy::commands`].

use std::collections::BTreeMap;
use std::time::Duration;

use registry::AdminState;
use thiserror::Error;
use tokio::time::Instant;
use tracing::info;

use super::plan::{Cookie, Plan, Server};
use crate::haproxy::{Command, HaproxyError, MasterCli, ServerRef, ServerState, ServersState};

/// A runtime change HAProxy refused, or a state that does not match afterwards.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("running state does not match the config: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Cli(#[from] HaproxyError),
}

impl Server {
    /// How the runtime API names it.
    fn at(&self) -> ServerRef<'_> {
        ServerRef {
            backend: &self.backend,
            name: &self.name,
        }
    }
}

/// Applies `plan`. Leaves drain first: no new requests, in-flight ones finish (up to
/// `drain_timeout`), then the server is put in maintenance and deleted. Joins are added in
/// maintenance, given their address (and so their dynamic cookie, computed for that one
/// server), then enabled.
pub async fn execute(
    cli: &MasterCli,
    plan: &Plan,
    drain_timeout: Duration,
) -> Result<(), RuntimeError> {
    // New servers first, so that a backend never runs out of servers between a leave and
    // a join of the same plan (removals first left it empty when its last server was
    // replaced by another: 503s); a server replaced under the same name must go first.
    let replaced = |s: &Server| {
        plan.remove
            .iter()
            .any(|r| r.backend == s.backend && r.name == s.name)
    };
    let (later, first): (Vec<&Server>, Vec<&Server>) = plan.add.iter().partition(|s| replaced(s));
    let mut backend_wide: Vec<&str> = Vec::new();
    add_servers(cli, plan, &first, &mut backend_wide).await?;
    for (o, n) in &plan.update {
        cli.set_addr(n.at(), &n.addr, &n.port).await?;
        if let Some(w) = n.weight() {
            cli.set_weight(n.at(), w).await?;
        }
        if o.admin() != n.admin() {
            cli.set_server_state(n.at(), n.admin()).await?;
        }
    }
    // Drain every leaving server at once, then wait for all of them.
    for s in &plan.remove {
        cli.set_server_state(s.at(), AdminState::Drain).await?;
    }
    if !plan.remove.is_empty() {
        wait_drained(cli, &plan.remove, drain_timeout).await?;
    }
    for s in &plan.remove {
        cli.set_server_state(s.at(), AdminState::Maint).await?;
        if s.keywords.iter().any(|k| k == "check") {
            // Stops the check task so the server has no activity left.
            let _ = cli.disable_health(s.at()).await;
        }
        delete(cli, s).await?;
    }
    add_servers(cli, plan, &later, &mut backend_wide).await?;
    for be in backend_wide {
        // A hostname's dynamic cookie is derived only when asked, for the whole backend.
        cli.enable_dynamic_cookie(be).await?;
    }
    Ok(())
}

/// Adds `servers` (in maintenance, address set, health and server enabled); collects the
/// backends that need their dynamic cookies recomputed (hostnames).
async fn add_servers<'a>(
    cli: &MasterCli,
    plan: &'a Plan,
    servers: &[&'a Server],
    backend_wide: &mut Vec<&'a str>,
) -> Result<(), RuntimeError> {
    for s in servers {
        let cookie = plan.cookie(s);
        let (addr, keywords) = match &cookie {
            Cookie::Derived { placeholder } => (*placeholder, s.add_keywords(true)),
            _ => (s.addr.as_str(), s.add_keywords(false)),
        };
        // One round trip for the server's commands. After a refused `add server` the
        // others reach whatever server has that name, if any — one the config does not
        // have, since the plan adds only names it lacks — and the apply reloads from the
        // file at once, which puts it back as written.
        let mut commands = vec![Command::add_server(s.at(), addr, &s.port, &keywords)];
        if matches!(cookie, Cookie::Derived { .. }) {
            commands.push(Command::move_to_addr(s.at(), &s.addr, &s.port));
        }
        if s.keywords.iter().any(|k| k == "check") {
            commands.push(Command::enable_health(s.at()));
        }
        // Drain is HAProxy's own drain flag on top of the line's `weight 0`, so `show
        // stat` says DRAIN.
        match s.admin() {
            AdminState::Maint => {}
            AdminState::Ready => commands.push(Command::enable_server(s.at())),
            AdminState::Drain => {
                commands.push(Command::set_server_state(s.at(), AdminState::Drain))
            }
        }
        cli.run_together(&commands).await?;
        if cookie == Cookie::BackendWide && !backend_wide.contains(&s.backend.as_str()) {
            backend_wide.push(&s.backend);
        }
    }
    Ok(())
}

/// `del server`. HAProxy 2.6 refuses it while the server has idle connections (3.0 closes
/// them itself), and those are only purged every `pool-purge-delay`: on that refusal the
/// server's address is changed to a placeholder, which makes HAProxy drop its idle
/// connections at once, and the delete is retried for up to a second.
async fn delete(cli: &MasterCli, s: &Server) -> Result<(), RuntimeError> {
    match cli.del_server(s.at()).await {
        Err(HaproxyError::StillHasConnections { .. }) => {}
        done => return done.map_err(RuntimeError::from),
    }
    let placeholder = if s.addr.contains(':') {
        "::"
    } else {
        "0.0.0.0"
    };
    let _ = cli.drop_idle_connections(s.at(), placeholder).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match cli.del_server(s.at()).await {
            Err(HaproxyError::StillHasConnections { .. }) if Instant::now() < deadline => {}
            done => return done.map_err(RuntimeError::from),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until none of `servers` has a current session.
async fn wait_drained(
    cli: &MasterCli,
    servers: &[Server],
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + timeout;
    // Each server is asked about by its numeric id: `show stat` of a whole backend is
    // ~300 bytes per server (10 000 servers: 3 MB, 100 ms of the worker's time per poll).
    let ids = numeric_ids(cli, servers).await?;
    loop {
        let mut busy = Vec::new();
        for (s, sid) in servers.iter().zip(&ids) {
            if sessions(cli, &s.backend, *sid).await? > 0 {
                busy.push(s.at());
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = busy.iter().map(ToString::to_string).collect();
            info!(
                busy = ?names,
                ?timeout,
                "drain timeout: removing servers with sessions left"
            );
            for s in busy {
                let _ = cli.shutdown_sessions(s).await;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The numeric ids (`srv_id`) of `servers`: their `id` keyword, else what HAProxy gave them
/// (`show servers state`, once per backend that needs it).
async fn numeric_ids(cli: &MasterCli, servers: &[Server]) -> Result<Vec<u32>, RuntimeError> {
    let mut states: BTreeMap<&str, ServersState> = BTreeMap::new();
    let mut ids = Vec::new();
    for s in servers {
        if let Some(id) = s.keyword("id").and_then(|v| v.parse().ok()) {
            ids.push(id);
            continue;
        }
        if !states.contains_key(s.backend.as_str()) {
            let state = cli.show_servers_state(&s.backend).await?;
            states.insert(&s.backend, state);
        }
        let id = states[s.backend.as_str()]
            .get(&s.name)
            .and_then(|row| row.id)
            .ok_or_else(|| {
                RuntimeError::Mismatch(format!(
                    "{}/{} is not running (show servers state)",
                    s.backend, s.name
                ))
            })?;
        ids.push(id);
    }
    Ok(ids)
}

/// Current sessions (`scur`) of server `sid` of `backend`.
async fn sessions(cli: &MasterCli, backend: &str, sid: u32) -> Result<u64, RuntimeError> {
    let iid = backend_id(&cli.backend_ids().await?, backend)?;
    Ok(cli
        .show_stat_server(iid, sid)
        .await?
        .and_then(|r| r.get("scur")?.parse().ok())
        .unwrap_or(0))
}

/// `backend`'s numeric id in `ids`; a backend HAProxy does not run is a mismatch.
fn backend_id(ids: &BTreeMap<String, u32>, backend: &str) -> Result<u32, RuntimeError> {
    ids.get(backend)
        .copied()
        .ok_or_else(|| RuntimeError::Mismatch(format!("backend {backend} is not running")))
}

/// Checks that HAProxy runs what `plan` meant: every added or updated server with the
/// config's address, port and weight, no removed one. Servers with an `id` are asked
/// about one by one (`show stat <backend id> 4 <id>`, ~0.3 ms each); otherwise the backend's
/// whole `show servers state` is read (~750 kB and ~25 ms at 10 000 servers), which
/// also checks the backend's server count.
pub async fn verify(cli: &MasterCli, plan: &Plan) -> Result<(), RuntimeError> {
    let present: Vec<&Server> = plan
        .add
        .iter()
        .chain(plan.update.iter().map(|(_, n)| n))
        .collect();
    let gone: Vec<&Server> = plan
        .remove
        .iter()
        .filter(|s| {
            !present
                .iter()
                .any(|p| p.backend == s.backend && p.name == s.name)
        })
        .collect();
    let id = |s: &Server| s.keyword("id").and_then(|v| v.parse::<u32>().ok());
    if present.iter().chain(&gone).all(|s| id(s).is_some()) {
        let backends = cli.backend_ids().await?;
        for s in &present {
            let iid = backend_id(&backends, &s.backend)?;
            let row = cli.show_stat_server(iid, id(s).unwrap_or(0)).await?;
            let want = endpoint(&s.addr, &s.port);
            let weight = s.weight().unwrap_or("1");
            let maint = s.admin() == AdminState::Maint;
            let ok = row.as_ref().is_some_and(|r| {
                r.get("svname").map(String::as_str) == Some(s.name.as_str())
                    && (s.addr.parse::<std::net::IpAddr>().is_err() || r.get("addr") == Some(&want))
                    && r.get("uweight").map(String::as_str) == Some(weight)
                    && r.get("status").is_some_and(|st| st.starts_with("MAINT")) == maint
            });
            if !ok {
                return Err(RuntimeError::Mismatch(format!(
                    "{}/{}: running {row:?}, config {want} weight {weight}{}",
                    s.backend,
                    s.name,
                    if maint { " disabled" } else { "" }
                )));
            }
        }
        for s in &gone {
            let iid = backend_id(&backends, &s.backend)?;
            let row = cli.show_stat_server(iid, id(s).unwrap_or(0)).await?;
            if row.is_some_and(|r| r.get("svname") == Some(&s.name)) {
                return Err(RuntimeError::Mismatch(format!(
                    "{}/{}: still running after its removal",
                    s.backend, s.name
                )));
            }
        }
        return Ok(());
    }
    for be in plan.backends() {
        let running = cli.show_servers_state(&be).await?;
        let want = plan.backend_info.get(&be).map_or(0, |b| b.servers);
        if running.len() != want {
            return Err(RuntimeError::Mismatch(format!(
                "backend {be}: {} servers running, {want} in the config",
                running.len()
            )));
        }
        if let Some(s) = gone
            .iter()
            .filter(|s| s.backend == be)
            .find(|s| running.contains_key(&s.name))
        {
            return Err(RuntimeError::Mismatch(format!(
                "{be}/{}: still running after its removal",
                s.name
            )));
        }
        for s in present.iter().filter(|s| s.backend == be) {
            let Some(r) = running.get(&s.name) else {
                return Err(RuntimeError::Mismatch(format!(
                    "{be}/{}: not running",
                    s.name
                )));
            };
            if let Some(d) = differs(s, r, true) {
                return Err(RuntimeError::Mismatch(d));
            }
        }
    }
    Ok(())
}

/// How the running server `r` differs from the config's `s`: address (IP literals only:
/// a hostname resolves at runtime), port and — with `state` — weight and maintenance.
/// `None` when it runs as configured.
fn differs(s: &Server, r: &ServerState, state: bool) -> Option<String> {
    let ip = |a: &str| a.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok();
    let addr_ok = ip(&s.addr).is_none() || ip(&s.addr) == ip(&r.addr);
    let weight = s.weight().unwrap_or("1");
    let maint = s.admin() == AdminState::Maint;
    let state_ok = !state || (weight == r.weight && maint == r.in_maintenance());
    if addr_ok && s.port == r.port && state_ok {
        return None;
    }
    let (running, config) = if state {
        (
            format!(
                " weight {}{}",
                r.weight,
                if r.in_maintenance() {
                    " in maintenance"
                } else {
                    ""
                }
            ),
            format!(" weight {weight}{}", if maint { " disabled" } else { "" }),
        )
    } else {
        Default::default()
    };
    Some(format!(
        "{}/{}: running {}:{}{running}, config {}:{}{config}",
        s.backend, s.name, r.addr, r.port, s.addr, s.port
    ))
}

/// How one backend's running servers differ from the config's list of them.
fn compare(backend: &str, config: &[Server], running: &ServersState, state: bool) -> Vec<String> {
    let mut out = Vec::new();
    for s in config {
        match running.get(&s.name) {
            None => out.push(format!("{backend}/{}: in the config, not running", s.name)),
            Some(r) => out.extend(differs(s, r, state)),
        }
    }
    // A set, not a scan per running server: 10 000 × 10 000 name comparisons took longer
    // than HAProxy's answer.
    let configured: std::collections::BTreeSet<&str> =
        config.iter().map(|s| s.name.as_str()).collect();
    for name in running.keys() {
        if !configured.contains(name.as_str()) {
            out.push(format!("{backend}/{name}: running, not in the config"));
        }
    }
    out
}

/// Compares what HAProxy runs with `config`, backend by backend (`show servers state`,
/// ~25 ms at 10 000 servers): servers running that the config does not have, servers of
/// the config that do not run, servers at another address or port, and — with `state` —
/// another weight or maintenance state. Every difference, named; empty when HAProxy runs
/// the config. A backend of the config HAProxy does not know is a difference; a backend
/// with a `server-template` is not compared.
pub async fn drift(
    cli: &MasterCli,
    config: &str,
    state: bool,
) -> Result<Vec<String>, RuntimeError> {
    let mut out = Vec::new();
    for (backend, servers) in super::plan::servers_by_backend(config) {
        let Some(servers) = servers else { continue };
        match cli.show_servers_state(&backend).await {
            Ok(running) => out.extend(compare(&backend, &servers, &running, state)),
            // No such backend (its header is missing from the answer).
            Err(HaproxyError::Unexpected { .. }) => {
                out.push(format!("backend {backend}: in the config, not running"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// `addr:port` as HAProxy's `show stat` writes it: an IPv6 address in brackets
/// (`[::1]:3000`), where the config's `server` line reads `::1:3000`.
fn endpoint(addr: &str, port: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(line: &str) -> Server {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (addr, port) = w[1].rsplit_once(':').unwrap();
        Server {
            backend: "b".into(),
            name: w[0].into(),
            addr: addr.into(),
            port: port.into(),
            keywords: w[2..].iter().map(|s| s.to_string()).collect(),
        }
    }

    fn state(addr: &str, port: &str, weight: &str, admin: u32) -> ServerState {
        ServerState {
            id: None,
            addr: addr.into(),
            port: port.into(),
            weight: weight.into(),
            admin,
        }
    }

    #[test]
    fn drift_names_ghosts_missing_and_moved_servers() {
        let config = [
            server("a 10.0.0.1:80 weight 10"),
            server("b ::1:81"),
            server("c web:82 disabled"),
            server("d 10.0.0.4:84"),
        ];
        let mut running = ServersState::new();
        running.insert("a".into(), state("10.0.0.1", "80", "10", 0));
        running.insert("b".into(), state("::1", "81", "1", 0));
        // A hostname resolves at runtime: its address is not compared.
        running.insert("c".into(), state("10.9.9.9", "82", "1", 1));
        running.insert("ghost".into(), state("10.0.0.9", "89", "1", 0));
        assert_eq!(
            compare("b", &config, &running, true),
            [
                "b/d: in the config, not running",
                "b/ghost: running, not in the config"
            ]
        );
        running.insert("a".into(), state("10.0.0.2", "80", "3", 0));
        running.insert("c".into(), state("10.9.9.9", "82", "1", 0));
        let all = compare("b", &config, &running, true);
        assert_eq!(all.len(), 4, "{all:?}");
        assert_eq!(
            all[0],
            "b/a: running 10.0.0.2:80 weight 3, config 10.0.0.1:80 weight 10"
        );
        assert_eq!(
            all[1],
            "b/c: running 10.9.9.9:82 weight 1, config web:82 weight 1 disabled"
        );
        // Without the state, weight and maintenance are not compared; addresses are.
        let membership = compare("b", &config, &running, false);
        assert_eq!(membership.len(), 3, "{membership:?}");
        assert_eq!(
            membership[0],
            "b/a: running 10.0.0.2:80, config 10.0.0.1:80"
        );
        running.clear();
        for s in &config {
            running.insert(
                s.name.clone(),
                state(
                    &s.addr,
                    &s.port,
                    s.weight().unwrap_or("1"),
                    if s.admin() == AdminState::Maint { 1 } else { 0 },
                ),
            );
        }
        assert_eq!(compare("b", &config, &running, true), Vec::<String>::new());
    }

    #[test]
    fn ipv6_endpoints_are_bracketed_as_show_stat_writes_them() {
        assert_eq!(endpoint("::1", "3000"), "[::1]:3000");
        assert_eq!(endpoint("10.0.0.1", "80"), "10.0.0.1:80");
    }
}
