//! Reading what HAProxy prints — `haproxy -v`, `show proc`, `show stat` CSV, `show servers
//! state`, `haproxy -c` — and the one value we compute the way HAProxy does (a dynamic
//! cookie). Pure functions, unit-tested on recorded output.

use std::collections::BTreeMap;

/// The numeric version in `haproxy -v` output (see [`detect_version`]).
pub fn parse_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("HAProxy version ") || l.starts_with("HA-Proxy version "))?;
    let word = line.split_whitespace().nth(2)?;
    let numeric: String = word
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let numeric = numeric.trim_end_matches('.').to_string();
    (!numeric.is_empty()).then_some(numeric)
}

/// The cookie HAProxy derives for a server in a backend with `cookie … dynamic` and
/// `dynamic-cookie-key <key>`: XXH64 (seed 0) of the key, the address's bytes and the
/// port as 4 big-endian bytes, printed as 16 hex digits (`srv_set_dyncookie()` in
/// src/server.c, unchanged from 1.8 to 3.x). `None` for an address that is not an IP
/// literal (HAProxy derives none until it has resolved one).
pub fn dynamic_cookie(key: &str, address: &str, port: u16) -> Option<String> {
    let ip: std::net::IpAddr = address.parse().ok()?;
    let mut buf = Vec::with_capacity(key.len() + 20);
    buf.extend_from_slice(key.as_bytes());
    match ip {
        std::net::IpAddr::V4(v4) => buf.extend_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => buf.extend_from_slice(&v6.octets()),
    }
    buf.extend_from_slice(&u32::from(port).to_be_bytes());
    Some(format!("{:016x}", xxhash_rust::xxh64::xxh64(&buf, 0)))
}

/// The master's view of its processes (`show proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcTable {
    pub master_pid: u32,
    /// Reloads so far, failed ones included.
    pub reloads: u32,
    /// Failed reloads so far.
    pub failed: u32,
    /// Current workers (pid, reloads they have survived): the newest has 0.
    pub workers: Vec<(u32, u32)>,
}

impl ProcTable {
    /// Parses HAProxy 2.x `show proc` output.
    pub fn parse(text: &str) -> Option<ProcTable> {
        let mut master = None;
        let mut workers = Vec::new();
        let mut section_current = true;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("# old workers") || line.starts_with("# programs") {
                section_current = false;
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 3 {
                continue;
            }
            let pid: u32 = fields[0].parse().ok()?;
            let reloads: u32 = fields[2].parse().ok()?;
            match fields[1] {
                "master" => {
                    // "0 [failed: 1]"
                    let failed = line
                        .split("[failed:")
                        .nth(1)
                        .and_then(|r| r.split(']').next())
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0);
                    master = Some((pid, reloads, failed));
                }
                "worker" if section_current => workers.push((pid, reloads)),
                _ => {}
            }
        }
        let (master_pid, reloads, failed) = master?;
        Some(ProcTable {
            master_pid,
            reloads,
            failed,
            workers,
        })
    }

    /// The newest current worker.
    pub fn current_worker(&self) -> Option<u32> {
        self.workers.iter().min_by_key(|(_, r)| *r).map(|(p, _)| *p)
    }
}

/// One server as `show servers state` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub id: Option<u32>,
    pub addr: String,
    pub port: String,
    pub weight: String,
    /// `srv_admin_state`: SRV_ADMF_* flags (include/haproxy/server-t.h).
    pub admin: u32,
}

impl ServerState {
    /// In maintenance, whoever put it there (SRV_ADMF_FMAINT | IMAINT | CMAINT).
    pub fn in_maintenance(&self) -> bool {
        self.admin & 0x23 != 0
    }
}

/// Reads `show stat` CSV by the column names of its header line (`# pxname,svname,…`):
/// one map per row.
pub fn parse_stat(csv: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = csv.lines();
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    let header: Vec<&str> = first.trim_start_matches("# ").split(',').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The row of server `sid` (its numeric id) in `show stat <backend> 4 <sid>` CSV, by column
/// name; `None` when there is no such server (HAProxy then prints the header alone, or the
/// backend's own row).
pub fn stat_row(csv: &str, sid: u32) -> Option<BTreeMap<String, String>> {
    let sid = sid.to_string();
    parse_stat(csv).into_iter().find(|row| {
        row.get("sid") == Some(&sid) && row.get("svname").is_some_and(|n| n != "BACKEND")
    })
}

/// `show stat -1 2 -1`: each backend's numeric id (`iid`) by name.
/// Reads only the three columns it needs (a map per row of ~100 columns took 20 ms at
/// 1 000 backends).
pub fn backend_ids(csv: &str) -> BTreeMap<String, u32> {
    let mut lines = csv.lines();
    let Some(first) = lines.next() else {
        return BTreeMap::new();
    };
    let header: Vec<&str> = first.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(px), Some(sv), Some(iid)) = (col("pxname"), col("svname"), col("iid")) else {
        return BTreeMap::new();
    };
    let last = px.max(sv).max(iid);
    lines
        .filter_map(|l| {
            let fields: Vec<&str> = l.splitn(last + 2, ',').collect();
            (fields.get(sv) == Some(&"BACKEND"))
                .then(|| Some((fields.get(px)?.to_string(), fields.get(iid)?.parse().ok()?)))
                .flatten()
        })
        .collect()
}

/// A backend's servers by name.
pub type ServersState = BTreeMap<String, ServerState>;

/// Reads `show servers state [backend]` by the column names of its header line (`# be_id
/// be_name srv_id srv_name srv_addr … srv_admin_state srv_uweight … srv_port …`), not by
/// position; `None` when the answer has no such header.
pub fn parse_servers_state(out: &str) -> Option<ServersState> {
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .by_ref()
        .find(|l| l.starts_with("# "))
        .map(|l| l.trim_start_matches("# ").split_whitespace().collect())?;
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (c_id, c_name, c_addr, c_port) = (
        col("srv_id")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
    );
    let (c_weight, c_admin) = (col("srv_uweight")?, col("srv_admin_state")?);
    let mut servers = ServersState::new();
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < header.len() || f[0].starts_with('#') {
            continue;
        }
        servers.insert(
            f[c_name].to_string(),
            ServerState {
                id: f[c_id].parse().ok(),
                addr: f[c_addr].to_string(),
                port: f[c_port].to_string(),
                weight: f[c_weight].to_string(),
                admin: f[c_admin].parse().unwrap_or(0),
            },
        );
    }
    Some(servers)
}

/// The `[ALERT]` lines of `haproxy -c` output joined (or the whole output when there are
/// none), at most 2 000 characters.
pub fn check_summary(output: &str) -> String {
    let alerts: Vec<&str> = output.lines().filter(|l| l.contains("ALERT")).collect();
    if alerts.is_empty() {
        output.trim().chars().take(2000).collect()
    } else {
        alerts.join(" | ").chars().take(2000).collect()
    }
}

/// Finds `[<file>:N]` (HAProxy's "parsing [file:N]") in `haproxy -c` output and returns
/// N and line N of the checked `bytes`.
pub fn rejected_line(output: &str, file: &str, bytes: &[u8]) -> Option<(usize, String)> {
    let marker = format!("{file}:");
    let start = output.find(&marker)? + marker.len();
    let digits: String = output[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let n: usize = digits.parse().ok()?;
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().nth(n.checked_sub(1)?)?;
    Some((n, line.trim().chars().take(300).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_ids_come_from_backend_rows_only() {
        // `frontend pool` + `backend pool`: only the backend's row counts.
        let csv =
            "# pxname,svname,qcur,iid\npool,FRONTEND,,2\npool,BACKEND,0,3\nstats,BACKEND,0,4\n\n";
        let ids = backend_ids(csv);
        assert_eq!(ids.get("pool"), Some(&3));
        assert_eq!(ids.get("stats"), Some(&4));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn version_from_dash_v() {
        let v3 = "HAProxy version 3.0.11-1+deb13u4 2026/10/15 - https://haproxy.org/\nStatus: long-term supported branch\n";
        assert_eq!(parse_version(v3).as_deref(), Some("3.0.11"));
        let v26 = "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/\n";
        assert_eq!(parse_version(v26).as_deref(), Some("2.6.12"));
        assert_eq!(
            parse_version("HA-Proxy version 1.8.19 2019/02/11\n").as_deref(),
            Some("1.8.19")
        );
        assert_eq!(parse_version("sh: haproxy: not found\n"), None);
    }

    #[test]
    fn dynamic_cookies_match_haproxy() {
        // What HAProxy 2.6.12 printed in `show stat` for a server added at runtime with
        // `dynamic-cookie-key k` and then `set server … addr 127.0.0.1 port 3001`.
        assert_eq!(
            dynamic_cookie("k", "127.0.0.1", 3001).as_deref(),
            Some("6a51f14cf3d6d726")
        );
        assert_eq!(dynamic_cookie("k", "web-1.internal", 3001), None);
        assert_ne!(
            dynamic_cookie("k", "127.0.0.1", 3002),
            dynamic_cookie("k", "127.0.0.1", 3001)
        );
    }

    #[test]
    fn parses_show_proc() {
        let text =
            "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
13235           master          2 [failed: 1]   0d00h10m29s     2.6.12-1+deb12u4\n\
# workers\n\
13342           worker          0               0d00h10m24s     2.6.12-1+deb12u4\n\
# old workers\n\
13238           worker          1               0d00h10m28s     2.6.12-1+deb12u4\n\
# programs\n";
        let t = ProcTable::parse(text).unwrap();
        assert_eq!(t.master_pid, 13235);
        assert_eq!((t.reloads, t.failed), (2, 1));
        assert_eq!(t.workers, vec![(13342, 0)]);
        assert_eq!(t.current_worker(), Some(13342));
        assert!(ProcTable::parse("garbage").is_none());
    }
    #[test]
    fn servers_state_is_read_by_column_name() {
        // HAProxy 2.6.12, `show servers state nodes` (columns after srv_port trimmed).
        let out = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n3 nodes 20001 new1 127.0.0.1 2 0 1 1 9 6 3 4 6 0 0 1 - 3001 -\n3 nodes 7 b0 10.0.0.2 2 0 100 100 9 6 3 4 6 0 0 0 - 80 -\n";
        let st = parse_servers_state(out).unwrap();
        assert_eq!(
            st["new1"],
            ServerState {
                id: Some(20001),
                addr: "127.0.0.1".into(),
                port: "3001".into(),
                weight: "1".into(),
                admin: 0,
            }
        );
        assert_eq!(st["b0"].weight, "100");
        assert!(parse_servers_state("garbage\n").is_none());
        assert!(!st["b0"].in_maintenance());
    }

    #[test]
    fn a_stat_row_is_read_by_column_name() {
        let csv = "# pxname,svname,qcur,scur,weight,sid,addr,uweight\nnodes,s2,0,3,1,20001,127.0.0.1:3001,1\n\n";
        let row = stat_row(csv, 20001).unwrap();
        assert_eq!(row["scur"], "3");
        assert_eq!(row["addr"], "127.0.0.1:3001");
        assert!(stat_row(csv, 7).is_none());
        assert!(stat_row("# pxname,svname,sid\n", 1).is_none());
    }

    #[test]
    fn finds_haproxy_style_line_numbers() {
        let out = "[ALERT]    (1) : config : parsing [/tmp/x.cfg:3] : unknown keyword 'evil'";
        assert_eq!(
            rejected_line(out, "/tmp/x.cfg", b"a\nb\n  evil thing\n"),
            Some((3, "evil thing".to_string()))
        );
        assert_eq!(rejected_line("nothing", "/tmp/x.cfg", b"a"), None);
        assert_eq!(
            check_summary("noise\n[ALERT] one\n[ALERT] two\n"),
            "[ALERT] one | [ALERT] two"
        );
    }
}
