//! Test only: a stand-in for HAProxy's master CLI socket, close enough to 2.6/3.0 for the
//! apply choice to be tested without HAProxy — `show proc`, `reload` (which runs the file
//! on disk again), `prompt` sessions and the worker's server commands (`add`/`del`/`set`/
//! `enable server`, `show servers state`, `show stat`). The e2e suites test against the
//! real thing; this only answers the way it does.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const MAINT: u32 = 0x1;
const DRAIN: u32 = 0x8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub id: u32,
    pub addr: String,
    pub port: u16,
    pub weight: u32,
    pub admin: u32,
}

#[derive(Debug, Default)]
pub struct State {
    pub reloads: u32,
    pub failed: u32,
    pub worker: u32,
    /// backend → server name → server.
    pub servers: BTreeMap<String, BTreeMap<String, Server>>,
    /// Worker commands received, without the `@1 `.
    pub commands: Vec<String>,
    /// Answer `add server` with an error.
    pub refuse_add: bool,
    /// Reloads fail (the old worker keeps running).
    pub fail_reload: bool,
}

/// The fake master: serves `socket` until dropped; `config` is the file a reload runs.
pub struct FakeMaster {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeMaster {
    pub fn start(dir: &Path, config: PathBuf) -> FakeMaster {
        let socket = dir.join("master.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(State {
            worker: 100,
            ..Default::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone(), config.clone()));
            }
        });
        FakeMaster {
            socket,
            state,
            task,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// `backend/name` of every server, sorted.
    pub fn names(&self) -> Vec<String> {
        self.with(|s| {
            s.servers
                .iter()
                .flat_map(|(b, m)| m.keys().map(move |n| format!("{b}/{n}")))
                .collect()
        })
    }
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>, config: PathBuf) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut prompt = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim().to_string();
        if line == "prompt" {
            prompt = true;
            let _ = write.write_all(b"\nmaster> ").await;
            continue;
        }
        let answer = answer(&line, &state, &config);
        let mut out = answer.into_bytes();
        if prompt {
            out.extend_from_slice(b"\nmaster> ");
        }
        if write.write_all(&out).await.is_err() {
            return;
        }
        if line == "reload" {
            return; // the master re-executes itself
        }
    }
}

fn answer(line: &str, state: &Arc<Mutex<State>>, config: &Path) -> String {
    let mut s = state.lock().unwrap();
    if line == "show proc" {
        return format!(
            "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
             1               master          {} [failed: {}]   0d00h00m01s     2.6.12\n\
             # workers\n\
             {}             worker          0               0d00h00m01s     2.6.12\n\
             # old workers\n# programs\n\n",
            s.reloads, s.failed, s.worker
        );
    }
    if line == "reload" {
        s.reloads += 1;
        if s.fail_reload {
            s.failed += 1;
        } else {
            s.worker += 1;
            s.servers = parse_config(&std::fs::read_to_string(config).unwrap_or_default());
        }
        return String::new();
    }
    let Some(cmd) = line.strip_prefix("@1 ") else {
        return format!("Unknown command: '{line}'\n");
    };
    s.commands.push(cmd.to_string());
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let split = |id: &str| {
        let (b, n) = id.split_once('/').unwrap();
        (b.to_string(), n.to_string())
    };
    match words.as_slice() {
        ["show", "servers", "state", be] => servers_state(&s, be),
        ["show", "stat", "-1", "2", "-1"] => {
            // Backends are numbered in name order here; a frontend named like a backend is
            // what `show stat <name>` would find first in HAProxy, so ids are what count.
            let mut out = "# pxname,svname,iid\n".to_string();
            for (i, be) in s.servers.keys().enumerate() {
                out.push_str(&format!("{be},BACKEND,{}\n", i + 1));
            }
            out + "\n"
        }
        ["show", "stat", iid, "4", sid] => {
            let mut out = "# pxname,svname,qcur,scur,weight,sid,addr,uweight\n".to_string();
            let be = iid
                .parse::<usize>()
                .ok()
                .and_then(|i| s.servers.keys().nth(i.wrapping_sub(1)))
                .cloned()
                .unwrap_or_default();
            for (name, srv) in s.servers.get(&be).into_iter().flatten() {
                if srv.id.to_string() == *sid {
                    out.push_str(&format!(
                        "{be},{name},0,0,{w},{},{}:{},{w}\n",
                        srv.id,
                        srv.addr,
                        srv.port,
                        w = srv.weight
                    ));
                }
            }
            out + "\n"
        }
        ["add", "server", id, target, rest @ ..] => {
            if s.refuse_add {
                return "Error: the fake refuses this server.\n".into();
            }
            let (be, name) = split(id);
            let (addr, port) = target.rsplit_once(':').unwrap();
            let servers = s.servers.entry(be).or_default();
            let next = servers.values().map(|x| x.id).max().unwrap_or(0) + 1;
            let server = Server {
                id: keyword(rest, "id").unwrap_or(next),
                addr: addr.to_string(),
                port: port.parse().unwrap(),
                weight: keyword(rest, "weight").unwrap_or(1),
                admin: MAINT,
            };
            servers.insert(name, server);
            "New server registered.\n".into()
        }
        ["del", "server", id] => {
            let (be, name) = split(id);
            let servers = s.servers.entry(be).or_default();
            match servers.get(&name) {
                Some(x) if x.admin & MAINT != 0 => {
                    servers.remove(&name);
                    "Server deleted.\n".into()
                }
                Some(_) => "Only servers in maintenance mode can be deleted.\n".into(),
                None => "No such server.\n".into(),
            }
        }
        ["enable", "server", id] | ["set", "server", id, "state", "ready"] => {
            with_server(&mut s, split(id), |x| x.admin &= !(MAINT | DRAIN))
        }
        ["set", "server", id, "state", "drain"] => {
            with_server(&mut s, split(id), |x| x.admin |= DRAIN)
        }
        ["set", "server", id, "state", "maint"] => {
            with_server(&mut s, split(id), |x| x.admin |= MAINT)
        }
        ["set", "server", id, "weight", w] => {
            let w = w.parse().unwrap();
            with_server(&mut s, split(id), |x| x.weight = w)
        }
        ["set", "server", id, "addr", addr, "port", port] => {
            let (addr, port) = (addr.to_string(), port.parse().unwrap());
            with_server(&mut s, split(id), |x| {
                x.addr = addr;
                x.port = port;
            });
            "IP changed from 'a' to 'b', port changed from 'c' to 'd' by 'stats socket command'\n"
                .into()
        }
        ["enable" | "disable", "health", _] | ["shutdown", "sessions", "server", _] => {
            String::new()
        }
        ["enable", "dynamic-cookie", "backend", _] => String::new(),
        _ => format!("Unknown command: '{cmd}'\n"),
    }
}

fn with_server(s: &mut State, (be, name): (String, String), f: impl FnOnce(&mut Server)) -> String {
    match s.servers.get_mut(&be).and_then(|m| m.get_mut(&name)) {
        Some(x) => {
            f(x);
            String::new()
        }
        None => "No such server.\n".into(),
    }
}

fn keyword(words: &[&str], name: &str) -> Option<u32> {
    let i = words.iter().position(|w| *w == name)?;
    words.get(i + 1)?.parse().ok()
}

fn servers_state(s: &State, be: &str) -> String {
    let mut out = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n".to_string();
    for (name, x) in s.servers.get(be).into_iter().flatten() {
        out.push_str(&format!(
            "3 {be} {} {name} {} 2 {} {} {} 9 6 3 4 6 0 0 1 - {} -\n",
            x.id, x.addr, x.admin, x.weight, x.weight, x.port
        ));
    }
    out + "\n"
}

/// The servers a config file declares (what a reload makes HAProxy run).
fn parse_config(text: &str) -> BTreeMap<String, BTreeMap<String, Server>> {
    let mut out: BTreeMap<String, BTreeMap<String, Server>> = BTreeMap::new();
    let mut backend = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["backend", name, ..] => backend = Some(name.to_string()),
            ["server", name, target, rest @ ..] => {
                let Some(be) = &backend else { continue };
                let (addr, port) = target.rsplit_once(':').unwrap();
                let servers = out.entry(be.clone()).or_default();
                let next = servers.len() as u32 + 1;
                servers.insert(
                    name.to_string(),
                    Server {
                        id: keyword(rest, "id").unwrap_or(next),
                        addr: addr.to_string(),
                        port: port.parse().unwrap(),
                        weight: keyword(rest, "weight").unwrap_or(1),
                        admin: 0,
                    },
                );
            }
            [first, ..] if !line.starts_with(' ') && !first.starts_with('#') => backend = None,
            _ => {}
        }
    }
    out
}
