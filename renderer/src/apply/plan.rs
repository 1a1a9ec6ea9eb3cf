//! The runtime path's pure half: from the running config's text and the new one's, the
//! server changes that bring HAProxy from one to the other ([`plan`]), or `None` when
//! anything besides backend `server` lines differs (that needs a reload). No I/O:
//! unit-tested without HAProxy; [`super::runtime`] runs and verifies a plan.

use std::collections::BTreeMap;

use registry::AdminState;

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
    pub(crate) fn weight(&self) -> Option<&str> {
        self.keywords
            .windows(2)
            .find(|w| w[0] == "weight")
            .map(|w| w[1].as_str())
    }

    /// The value of a keyword that takes one argument (`cookie`, `id`).
    pub(crate) fn keyword(&self, name: &str) -> Option<&str> {
        self.keywords
            .windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].as_str())
    }

    pub(crate) fn cookie(&self) -> Option<&str> {
        self.keyword("cookie")
    }

    /// Its keywords for `add server`, without `cookie <v>` when HAProxy derives it, and
    /// with the idle-connection pool a server from the config file gets by default.
    /// HAProxy 2.6 gives a server added at runtime no pool at all (`pool-purge-delay` and
    /// `pool-max-conn` 0: it skips `default-server` and the defaults, src/server.c), so
    /// every request to it opened and closed a connection; 3.0 sets these same defaults.
    pub(crate) fn add_keywords(&self, derived_cookie: bool) -> Vec<&str> {
        let mut out = Vec::new();
        let mut words = self.keywords.iter();
        while let Some(k) = words.next() {
            if derived_cookie && k == "cookie" {
                words.next();
                continue;
            }
            // A runtime-added server starts in maintenance anyway; it stays there (no
            // `enable server`) when its line says `disabled`.
            if k == "disabled" {
                continue;
            }
            out.push(k.as_str());
        }
        for (keyword, default) in [("pool-max-conn", "-1"), ("pool-purge-delay", "5s")] {
            if self.keyword(keyword).is_none() {
                out.extend([keyword, default]);
            }
        }
        out
    }

    /// Its keywords without `weight <w>` and `disabled`: what the runtime API cannot
    /// change in place.
    pub(crate) fn keywords_without_state(&self) -> Vec<&str> {
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
            if k == "disabled" {
                continue;
            }
            out.push(k.as_str());
        }
        out
    }

    /// The administrative state its line asks for: `disabled` is maintenance, `weight 0`
    /// is drain (HAProxy's config has no drain keyword; weight 0 takes no new requests
    /// while persistent ones still arrive, as drain does), anything else ready.
    pub fn admin(&self) -> AdminState {
        if self.keywords.iter().any(|k| k == "disabled") {
            AdminState::Maint
        } else if self.weight() == Some("0") {
            AdminState::Drain
        } else {
            AdminState::Ready
        }
    }
}

/// What to change in the running HAProxy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<Server>,
    pub remove: Vec<Server>,
    /// (old, new) with only address, port, weight or state (`disabled`) changed.
    pub update: Vec<(Server, Server)>,
    /// The new config's backends, by name.
    pub backend_info: BTreeMap<String, Backend>,
}

/// What the runtime path needs to know about a backend of the new config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `cookie … dynamic`: HAProxy derives server cookies from `dynamic-cookie-key`.
    pub dynamic_cookie: bool,
    /// The backend's `dynamic-cookie-key` (or the one in `defaults`).
    pub cookie_key: Option<String>,
    /// Servers in the new config.
    pub servers: usize,
}

/// When a plan goes through a reload instead (`--runtime-max-changes`,
/// `--runtime-max-cookie-servers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Above this many server changes in one apply, reload.
    pub max_changes: usize,
    /// A server whose dynamic cookie HAProxy can only derive with `enable dynamic-cookie
    /// backend` (an address that is not an IP literal) makes HAProxy recompute every
    /// server's cookie against every other's: quadratic (2.6: 0.8 s at 10 000 servers,
    /// ~5 000 stalled a worker past its watchdog under load). Above this many servers in
    /// such a backend, reload.
    pub max_cookie_servers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_changes: 200,
            max_cookie_servers: 1000,
        }
    }
}

/// How a new server gets its cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cookie {
    /// As written (`cookie <v>` among its keywords, or none at all).
    AsWritten,
    /// HAProxy derives it (dynamic cookies) when the address is set: the server is added
    /// with `placeholder` as its address, then `set server … addr` gives it the real one
    /// and HAProxy computes that one server's cookie. An explicit `cookie` equal to the
    /// derived value is left out of `add server` (HAProxy < 3.0 refuses the keyword there).
    Derived { placeholder: &'static str },
    /// Only `enable dynamic-cookie backend` derives it (the address is a hostname).
    BackendWide,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.update.is_empty()
    }

    /// Number of server changes.
    pub fn len(&self) -> usize {
        self.add.len() + self.remove.len() + self.update.len()
    }

    /// Why this plan should go through a reload instead, if it should.
    pub fn too_big(&self, limits: &Limits) -> Option<String> {
        if self.len() > limits.max_changes {
            return Some(format!(
                "{} server changes at once, more than --runtime-max-changes {}",
                self.len(),
                limits.max_changes
            ));
        }
        self.add
            .iter()
            .filter(|s| self.cookie(s) == Cookie::BackendWide)
            .filter_map(|s| Some((&s.backend, self.backend_info.get(&s.backend)?.servers)))
            .find(|(_, n)| *n > limits.max_cookie_servers)
            .map(|(be, n)| format!("a server with a hostname joins backend {be}, whose {n} servers (more than --runtime-max-cookie-servers {}) would all get their dynamic cookie recomputed", limits.max_cookie_servers))
    }

    /// How the added server `s` gets its cookie.
    pub(crate) fn cookie(&self, s: &Server) -> Cookie {
        let Some(be) = self.backend_info.get(&s.backend) else {
            return Cookie::AsWritten;
        };
        if !be.dynamic_cookie {
            return Cookie::AsWritten;
        }
        let Ok(ip) = s.addr.parse::<std::net::IpAddr>() else {
            return match s.cookie() {
                Some(_) => Cookie::AsWritten,
                None => Cookie::BackendWide,
            };
        };
        if let Some(written) = s.cookie() {
            let derived = match (&be.cookie_key, s.port.parse::<u16>()) {
                (Some(key), Ok(port)) => crate::haproxy::dynamic_cookie(key, &s.addr, port),
                _ => None,
            };
            if derived.as_deref() != Some(written) {
                return Cookie::AsWritten;
            }
        }
        // Any address of the same family that differs from the real one.
        let placeholder = match ip {
            std::net::IpAddr::V4(a) if a.is_unspecified() => "0.0.0.1",
            std::net::IpAddr::V4(_) => "0.0.0.0",
            std::net::IpAddr::V6(a) if a.is_unspecified() => "::1",
            std::net::IpAddr::V6(_) => "::",
        };
        Cookie::Derived { placeholder }
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
#[cfg(test)]
fn split(config: &str) -> (Vec<&str>, Servers) {
    let lines: Vec<&str> = config.lines().collect();
    split_lines(&lines, None)
}

/// A section header line (`backend x`, `defaults`, …): (kind, name).
fn header(line: &str) -> Option<(&str, &str)> {
    let trimmed = line.trim();
    if line.starts_with(char::is_whitespace) || trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    let mut words = trimmed.split_whitespace();
    Some((words.next().unwrap_or(""), words.next().unwrap_or("")))
}

/// [`split`] of `lines`, which start inside `section` (kind, name).
fn split_lines<'a>(lines: &[&'a str], section: Option<(&str, &str)>) -> (Vec<&'a str>, Servers) {
    let mut skeleton = Vec::new();
    let mut servers = BTreeMap::new();
    let (mut kind, mut name) = section.unwrap_or(("", ""));
    for &line in lines {
        if let Some((k, n)) = header(line) {
            (kind, name) = (k, n);
        }
        if kind == "backend" || kind == "listen" {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"server") {
                if let (Some(server), Some(target)) = (words.get(1), words.get(2)) {
                    if let Some((addr, port)) = target.rsplit_once(':') {
                        let s = Server {
                            backend: name.to_string(),
                            name: server.to_string(),
                            addr: addr.to_string(),
                            port: port.to_string(),
                            keywords: words[3..].iter().map(|w| w.to_string()).collect(),
                        };
                        servers.insert((name.to_string(), server.to_string()), s);
                        continue;
                    }
                }
            }
        }
        skeleton.push(line);
    }
    (skeleton, servers)
}

/// What the runtime path needs to know of each backend of a config that `wanted` names:
/// dynamic cookies, the cookie key (its own or `defaults`'), the number of servers. One
/// pass; the lines of other backends are only looked at for a section header (a change
/// to one backend among 1 000 reads that backend's lines, not 100 000 server lines).
fn backend_info<'a>(
    lines: impl IntoIterator<Item = &'a [u8]>,
    wanted: impl Fn(&str) -> bool,
) -> BTreeMap<String, Backend> {
    let mut backends: BTreeMap<String, Backend> = BTreeMap::new();
    let mut defaults_key: Option<String> = None;
    let mut current: Option<String> = None;
    let mut kind = String::new();
    for bytes in lines {
        let indented = bytes.first().is_some_and(u8::is_ascii_whitespace);
        if current.is_none() && kind != "defaults" && indented {
            // Inside a section nobody asked about: not even read as text.
            continue;
        }
        let text = String::from_utf8_lossy(bytes);
        let line = text.trim_end_matches('\r');
        if let Some((k, n)) = header(line) {
            kind = k.to_string();
            current = None;
            if (k == "backend" || k == "listen") && wanted(n) {
                backends.entry(n.to_string()).or_insert_with(|| Backend {
                    cookie_key: defaults_key.clone(),
                    ..Default::default()
                });
                current = Some(n.to_string());
            }
            continue;
        }
        let trimmed = line.trim_start();
        let first = trimmed.split_whitespace().next().unwrap_or("");
        match (kind.as_str(), first, &current) {
            ("defaults", "dynamic-cookie-key", _) => {
                defaults_key = trimmed.split_whitespace().nth(1).map(str::to_string)
            }
            (_, "server", Some(be)) => {
                if let Some(b) = backends.get_mut(be) {
                    b.servers += 1;
                }
            }
            (_, "cookie", Some(be)) if trimmed.split_whitespace().any(|w| w == "dynamic") => {
                if let Some(b) = backends.get_mut(be) {
                    b.dynamic_cookie = true;
                }
            }
            (_, "dynamic-cookie-key", Some(be)) => {
                if let Some(b) = backends.get_mut(be) {
                    b.cookie_key = trimmed.split_whitespace().nth(1).map(str::to_string);
                }
            }
            _ => {}
        }
    }
    backends
}

/// What a config says each backend runs: every `backend` and `listen` section, empty ones
/// included, with its `server` lines; `None` for a section whose servers are not all
/// spelled out one by one (`server-template`), which cannot be compared server by server.
pub fn servers_by_backend(config: &str) -> BTreeMap<String, Option<Vec<Server>>> {
    let lines: Vec<&str> = config.lines().collect();
    let mut out: BTreeMap<String, Option<Vec<Server>>> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in &lines {
        if let Some((kind, name)) = header(line) {
            current = (kind == "backend" || kind == "listen").then_some(name);
            if let Some(be) = current {
                out.entry(be.to_string())
                    .or_insert_with(|| Some(Vec::new()));
            }
        } else if let Some(be) = current {
            if line.split_whitespace().next() == Some("server-template") {
                out.insert(be.to_string(), None);
            }
        }
    }
    for ((backend, _), server) in split_lines(&lines, None).1 {
        if let Some(Some(list)) = out.get_mut(&backend) {
            list.push(server);
        }
    }
    out
}

/// The runtime plan from `old` to `new`, or `None` when anything besides backend `server`
/// lines differs (that needs a reload). Only the lines between the common beginning and
/// the common end of the two configs are parsed: at 10 000 servers, a join touches one.
pub fn plan(old: impl AsRef<[u8]>, new: impl AsRef<[u8]>) -> Option<Plan> {
    let (old, new) = (old.as_ref(), new.as_ref());
    // The common beginning and end are found by comparing bytes in blocks (memcmp), then
    // widened to whole lines: nothing is read as text but the part that differs (reading
    // two 6 MB configs as UTF-8 took ~10 ms at 100 000 servers).
    let (pre, suf) = common_lines(old, new);
    let (old_mid, new_mid) = (
        String::from_utf8_lossy(&old[pre..old.len() - suf]),
        String::from_utf8_lossy(&new[pre..new.len() - suf]),
    );
    let o: Vec<&str> = old_mid.lines().collect();
    let n: Vec<&str> = new_mid.lines().collect();
    // The section the differing lines start in (the same in both: the lines before agree):
    // the last line before them that is a section header.
    let header_line = byte_lines_rev(&new[..pre])
        .filter(|l| {
            l.first()
                .is_some_and(|c| !c.is_ascii_whitespace() && *c != b'#')
        })
        .map(String::from_utf8_lossy)
        .find(|l| header(l.trim_end_matches('\r')).is_some());
    let section = header_line
        .as_deref()
        .and_then(|l| header(l.trim_end_matches('\r')));
    let (old_skel, old_servers) = split_lines(&o, section);
    let (new_skel, new_servers) = split_lines(&n, section);
    if old_skel != new_skel {
        return None;
    }
    let mut plan = Plan::default();
    for (key, n) in &new_servers {
        match old_servers.get(key) {
            None => plan.add.push(n.clone()),
            Some(o) if o == n => {}
            Some(o) if o.keywords_without_state() == n.keywords_without_state() => {
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
    let touched = plan.backends();
    plan.backend_info = backend_info(byte_lines(new), |b| touched.iter().any(|t| t == b));
    Some(plan)
}

/// The lines of `text` (without their `\n`), found with memchr: a closure per byte was
/// ~5 ms over a 6 MB config.
fn byte_lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', text)
        .chain(std::iter::once(text.len()))
        .filter_map(move |end| {
            let line = text.get(start..end)?;
            start = end + 1;
            Some(line)
        })
}

/// [`byte_lines`] from the last line to the first.
fn byte_lines_rev(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut end = text.len();
    memchr::memrchr_iter(b'\n', text)
        .map(|p| p + 1)
        .chain(std::iter::once(0))
        .filter_map(move |start| {
            let line = text.get(start..end)?;
            end = start.saturating_sub(1);
            Some(line)
        })
}

/// (bytes, bytes): the longest beginning and end of `a` and `b` made of whole lines that
/// are the same in both and do not overlap.
fn common_lines(a: &[u8], b: &[u8]) -> (usize, usize) {
    const BLOCK: usize = 4096;
    let most = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= most && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    while i < most && a[i] == b[i] {
        i += 1;
    }
    // Back to the start of the line the first difference is in.
    let pre = a[..i]
        .iter()
        .rposition(|c| *c == b'\n')
        .map_or(0, |p| p + 1);
    let most = most - pre;
    let mut j = 0;
    while j + BLOCK <= most
        && a[a.len() - j - BLOCK..a.len() - j] == b[b.len() - j - BLOCK..b.len() - j]
    {
        j += BLOCK;
    }
    while j < most && a[a.len() - j - 1] == b[b.len() - j - 1] {
        j += 1;
    }
    // Forward to the start of a line inside the common end (the same place in both),
    // unless it begins a line in both already.
    let (start, b_start) = (a.len() - j, b.len() - j);
    let line_start = |s: &[u8], at: usize| at == 0 || s[at - 1] == b'\n';
    if line_start(a, start) && line_start(b, b_start) {
        return (pre, j);
    }
    let suf = a[start..]
        .iter()
        .position(|c| *c == b'\n')
        .map_or(0, |p| a.len() - (start + p + 1));
    (pre, suf)
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
    fn drain_and_maintenance_are_changes_in_place() {
        let old = cfg(&[
            "server a 10.0.0.1:80 check weight 100 id 1",
            "server b 10.0.0.2:80 check weight 100 id 2",
            "server c 10.0.0.3:80 check weight 0 id 3 disabled",
        ]);
        let new = cfg(&[
            "server a 10.0.0.1:80 check weight 0 id 1",
            "server b 10.0.0.2:80 check weight 100 id 2 disabled",
            "server c 10.0.0.3:80 check weight 100 id 3",
            "server d 10.0.0.4:80 check weight 100 id 4 disabled",
        ]);
        let p = plan(&old, &new).unwrap();
        assert!(p.remove.is_empty(), "{p:?}");
        let states: Vec<(&str, AdminState, AdminState)> = p
            .update
            .iter()
            .map(|(o, n)| (n.name.as_str(), o.admin(), n.admin()))
            .collect();
        assert_eq!(
            states,
            [
                ("a", AdminState::Ready, AdminState::Drain),
                ("b", AdminState::Ready, AdminState::Maint),
                ("c", AdminState::Maint, AdminState::Ready),
            ]
        );
        assert_eq!(p.add[0].admin(), AdminState::Maint);
        assert!(!p.add[0].add_keywords(false).contains(&"disabled"));
    }

    #[test]
    fn keyword_changes_replace_the_server_and_other_changes_need_a_reload() {
        let old = cfg(&["server a 10.0.0.1:80 check"]);
        let p = plan(&old, cfg(&["server a 10.0.0.1:80 check backup"])).unwrap();
        assert_eq!((p.add.len(), p.remove.len()), (1, 1));
        assert!(plan(&old, old.replace("maxconn 10", "maxconn 20")).is_none());
        assert!(plan(&old, format!("{old}backend other\n")).is_none());
    }

    #[test]
    fn bulk_plans_reload() {
        let limits = Limits::default();
        let old = cfg(&[]);
        let many: Vec<String> = (0..=limits.max_changes)
            .map(|i| format!("server n{i} 10.0.0.1:{} check", 1000 + i))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(plan(&old, cfg(&refs)).unwrap().too_big(&limits).is_some());
        assert!(plan(&old, cfg(&refs[..3]))
            .unwrap()
            .too_big(&limits)
            .is_none());
    }

    fn with_dynamic_cookies(c: String) -> String {
        c.replace(
            "balance roundrobin",
            "balance roundrobin\n    cookie S insert dynamic\n    dynamic-cookie-key k",
        )
    }

    #[test]
    fn joins_get_their_dynamic_cookie_one_server_at_a_time() {
        let limits = Limits::default();
        let big: Vec<String> = (0..=limits.max_cookie_servers)
            .map(|i| format!("server n{i} 10.0.0.1:{} check", 1000 + i))
            .collect();
        let refs: Vec<&str> = big.iter().map(String::as_str).collect();
        let old = with_dynamic_cookies(cfg(&refs[1..]));
        // An IP address: HAProxy derives the cookie when the address is set, whatever the
        // backend's size.
        let p = plan(&old, with_dynamic_cookies(cfg(&refs))).unwrap();
        assert_eq!(p.backend_info["nodes"].servers, big.len());
        assert_eq!(p.backend_info["nodes"].cookie_key.as_deref(), Some("k"));
        assert_eq!(
            p.cookie(&p.add[0]),
            Cookie::Derived {
                placeholder: "0.0.0.0"
            }
        );
        assert!(p.too_big(&limits).is_none());
        // The derived value written out is left to HAProxy; another value is passed on.
        let derived = crate::haproxy::dynamic_cookie("k", "10.0.0.9", 80).unwrap();
        let join = |cookie: &str| {
            let line = format!("server j 10.0.0.9:80 check cookie {cookie}");
            let p = plan(&old, with_dynamic_cookies(cfg(&[&line]))).unwrap();
            let s = p.add.iter().find(|s| s.name == "j").unwrap().clone();
            (p.cookie(&s), s.add_keywords(true).join(" "))
        };
        assert_eq!(
            join(&derived),
            (
                Cookie::Derived {
                    placeholder: "0.0.0.0"
                },
                "check pool-max-conn -1 pool-purge-delay 5s".to_string()
            )
        );
        assert_eq!(join("other").0, Cookie::AsWritten);
        // A hostname needs the backend-wide recomputation: only for small backends.
        let mut with_host = refs.clone();
        with_host[0] = "server n0 web-0.internal:80 check";
        let p = plan(&old, with_dynamic_cookies(cfg(&with_host))).unwrap();
        assert_eq!(p.cookie(&p.add[0]), Cookie::BackendWide);
        assert!(p.too_big(&limits).unwrap().contains("dynamic cookie"));
        // Without dynamic cookies nothing is derived.
        let p = plan(cfg(&[]), cfg(&["server a 10.0.0.1:80 cookie a"])).unwrap();
        assert_eq!(p.cookie(&p.add[0]), Cookie::AsWritten);
        assert_eq!(
            p.add[0].add_keywords(false),
            [
                "cookie",
                "a",
                "pool-max-conn",
                "-1",
                "pool-purge-delay",
                "5s"
            ]
        );
    }

    #[test]
    fn a_join_among_a_thousand_backends_describes_only_its_own() {
        let config = |extra: &str| {
            let mut c = String::from("defaults\n    dynamic-cookie-key d\n");
            for b in 0..1000 {
                c.push_str(&format!("backend be{b:04}\n    cookie S insert dynamic\n"));
                for i in 0..5 {
                    c.push_str(&format!("    server s{i} 10.0.{}.{i}:80 check\n", b % 250));
                }
                if b == 500 {
                    c.push_str(extra);
                }
            }
            c
        };
        let p = plan(config(""), config("    server new 10.9.9.9:80 check\n")).unwrap();
        assert_eq!(p.add.len(), 1);
        assert_eq!(p.backend_info.len(), 1, "{:?}", p.backend_info.keys());
        let be = &p.backend_info["be0500"];
        assert_eq!(be.servers, 6);
        assert!(be.dynamic_cookie);
        assert_eq!(be.cookie_key.as_deref(), Some("d"));
    }

    #[test]
    fn the_cookie_key_may_come_from_defaults() {
        let c = "defaults\n    dynamic-cookie-key d\nbackend b\n    cookie S insert dynamic\n    server x 10.0.0.1:80\n";
        let lines: Vec<&str> = c.lines().collect();
        let backends = backend_info(lines.iter().map(|l| l.as_bytes()), |_| true);
        assert_eq!(backends["b"].cookie_key.as_deref(), Some("d"));
        assert!(backends["b"].dynamic_cookie);
    }

    #[test]
    fn servers_by_backend_lists_empty_backends_and_skips_templates() {
        let c = "defaults\n    mode http\nfrontend f\n    bind :80\nbackend a\n    server a1 10.0.0.1:80 check\n    server a2 ::1:81\nbackend empty\n    balance roundrobin\nbackend t\n    server-template w 3 web:80\nlisten l\n    server l1 h:1\n";
        let got = servers_by_backend(c);
        let names = |b: &str| -> Option<Vec<String>> {
            got[b].as_ref().map(|v| {
                v.iter()
                    .map(|s| format!("{}@{}:{}", s.name, s.addr, s.port))
                    .collect()
            })
        };
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "empty", "l", "t"]);
        assert_eq!(names("a").unwrap(), ["a1@10.0.0.1:80", "a2@::1:81"]);
        assert_eq!(names("empty").unwrap(), Vec::<String>::new());
        assert_eq!(names("l").unwrap(), ["l1@h:1"]);
        assert_eq!(names("t"), None);
    }

    #[test]
    fn ipv6_addresses_split_at_the_last_colon() {
        let (_, s) = split("backend b\n    server x ::1:3000 check\n");
        let p = plan(
            "backend b\n    cookie S insert dynamic\n",
            "backend b\n    cookie S insert dynamic\n    server x ::1:3000 check\n",
        )
        .unwrap();
        assert_eq!(p.cookie(&p.add[0]), Cookie::Derived { placeholder: "::" });
        let x = &s[&("b".to_string(), "x".to_string())];
        assert_eq!((x.addr.as_str(), x.port.as_str()), ("::1", "3000"));
    }

    /// The plan from whole-config splits (what `plan` computed before it parsed only the
    /// differing lines).
    fn plan_whole(old: &str, new: &str) -> Option<(Vec<String>, Vec<String>, Vec<String>)> {
        let (os, oserv) = split(old);
        let (ns, nserv) = split(new);
        if os != ns {
            return None;
        }
        let name = |s: &Server| format!("{}/{}", s.backend, s.name);
        let mut add = Vec::new();
        let mut remove = Vec::new();
        let mut update = Vec::new();
        for (k, n) in &nserv {
            match oserv.get(k) {
                None => add.push(name(n)),
                Some(o) if o == n => {}
                Some(o) if o.keywords_without_state() == n.keywords_without_state() => {
                    update.push(name(n))
                }
                Some(o) => {
                    remove.push(name(o));
                    add.push(name(n));
                }
            }
        }
        for (k, o) in &oserv {
            if !nserv.contains_key(k) {
                remove.push(name(o));
            }
        }
        add.sort();
        remove.sort();
        update.sort();
        Some((add, remove, update))
    }

    #[test]
    fn byte_lines_split_like_split_on_newline() {
        for text in ["", "a", "a\n", "a\nb", "a\n\nb\n", "\n"] {
            let want: Vec<&[u8]> = text.as_bytes().split(|b| *b == b'\n').collect();
            let got: Vec<&[u8]> = byte_lines(text.as_bytes()).collect();
            assert_eq!(got, want, "{text:?}");
            let mut back: Vec<&[u8]> = byte_lines_rev(text.as_bytes()).collect();
            back.reverse();
            assert_eq!(back, want, "{text:?} reversed");
        }
    }

    proptest::proptest! {
        /// The byte-level search finds what comparing whole lines finds.
        #[test]
        fn common_lines_agree_with_a_line_by_line_comparison(
            a in proptest::collection::vec(0u8..4, 0..40),
            b in proptest::collection::vec(0u8..4, 0..40),
        ) {
            let text = |v: &[u8]| v.iter().map(|x| format!("    server s{x} 10.0.0.{x}:80\n")).collect::<String>();
            let (ta, tb) = (text(&a), text(&b));
            let (o, n): (Vec<&str>, Vec<&str>) = (ta.lines().collect(), tb.lines().collect());
            let pre = o.iter().zip(&n).take_while(|(x, y)| x == y).count();
            let most = o.len().min(n.len()) - pre;
            let suf = o.iter().rev().zip(n.iter().rev()).take(most).take_while(|(x, y)| x == y).count();
            let bytes = |lines: &[&str]| lines.iter().map(|l| l.len() + 1).sum::<usize>();
            let want = (bytes(&o[..pre]), bytes(&o[o.len() - suf..]));
            proptest::prop_assert_eq!(common_lines(ta.as_bytes(), tb.as_bytes()), want);
        }

        #[test]
        fn parsing_only_the_differing_lines_plans_the_same(
            a in proptest::collection::btree_map(0u8..30, 0u8..3, 0..20),
            b in proptest::collection::btree_map(0u8..30, 0u8..3, 0..20),
            c in proptest::collection::btree_map(0u8..30, 0u8..3, 0..20),
            d in proptest::collection::btree_map(0u8..30, 0u8..3, 0..20),
            both in proptest::bool::ANY,
            skel_change in 0u8..6,
        ) {
            let backend = |name: &str, servers: &std::collections::BTreeMap<u8, u8>, extra: &str| {
                let mut s = format!("backend {name}\n    balance roundrobin{extra}\n");
                for (i, v) in servers {
                    s.push_str(&format!("    server s{i} 10.0.0.{i}:{} check weight {}\n", 80 + u16::from(*v % 2), 10 * (1 + u32::from(*v))));
                }
                s
            };
            let old = format!("global\n    maxconn 10\n{}{}frontend f\n    bind :80\n", backend("one", &a, ""), backend("two", &b, ""));
            let extra = if skel_change == 0 { "\n    option httpchk" } else { "" };
            let two = if both { &d } else { &b };
            let new = format!("global\n    maxconn 10\n{}{}frontend f\n    bind :80\n", backend("one", &c, extra), backend("two", two, ""));
            let p = plan(&old, &new);
            let want = plan_whole(&old, &new);
            proptest::prop_assert_eq!(p.is_some(), want.is_some());
            if let (Some(p), Some((add, remove, update))) = (p, want) {
                let name = |s: &Server| format!("{}/{}", s.backend, s.name);
                let mut got_add: Vec<String> = p.add.iter().map(name).collect();
                let mut got_remove: Vec<String> = p.remove.iter().map(name).collect();
                let mut got_update: Vec<String> = p.update.iter().map(|(_, n)| name(n)).collect();
                got_add.sort();
                got_remove.sort();
                got_update.sort();
                proptest::prop_assert_eq!(got_add, add);
                proptest::prop_assert_eq!(got_remove, remove);
                proptest::prop_assert_eq!(got_update, update);
                // Exactly the backends the plan touches are described.
                let described: Vec<String> = p.backend_info.keys().cloned().collect();
                proptest::prop_assert_eq!(&described, &p.backends());
                if let Some(one) = p.backend_info.get("one") {
                    proptest::prop_assert_eq!(one.servers, c.len());
                }
                if let Some(b) = p.backend_info.get("two") {
                    proptest::prop_assert_eq!(b.servers, two.len());
                }
            }
        }
    }
}
