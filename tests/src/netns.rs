//! Test hosts in a network namespace: one veth link to the host (host 10.231.0.1,
//! namespace 10.231.0.2, a /30 that exists only on that link; or IPv6 only: fd00:231::1
//! and ::2), created by the test and removed on drop. Traffic never leaves this machine.
//! One IPv4 namespace at a time per machine (the /30 is fixed).

use std::process::Command;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with one veth link to the host: host 10.231.0.1, namespace
/// 10.231.0.2 (a /30 that exists only on this link). Removed on drop.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    /// The namespace's end of the link.
    pub peer_if: String,
}

impl Netns {
    pub fn create() -> Netns {
        Self::create_with(true)
    }

    /// A namespace whose link has only IPv6: host fd00:231::1, namespace fd00:231::2 (a
    /// /64 that exists only on this link; no duplicate address detection, usable at once).
    pub fn create_ipv6_only() -> Netns {
        Self::create_with(false)
    }

    fn create_with(ipv4: bool) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let n = Netns {
            name: format!("lbp{tag}"),
            host_if: format!("lbh{tag}"),
            peer_if: format!("lbn{tag}"),
        };
        let peer = n.peer_if.clone();
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &n.name]);
        if ipv4 {
            ip(&["addr", "add", "10.231.0.1/30", "dev", &n.host_if]);
            ip(&["-n", &n.name, "addr", "add", "10.231.0.2/30", "dev", &peer]);
        } else {
            ip(&["addr", "add", "fd00:231::1/64", "dev", &n.host_if, "nodad"]);
            ip(&[
                "-n",
                &n.name,
                "addr",
                "add",
                "fd00:231::2/64",
                "dev",
                &peer,
                "nodad",
            ]);
        }
        ip(&["link", "set", &n.host_if, "up"]);
        ip(&["-n", &n.name, "link", "set", &peer, "up"]);
        ip(&["-n", &n.name, "link", "set", "lo", "up"]);
        n
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn cut(&self, down: bool) {
        ip(&[
            "link",
            "set",
            &self.host_if,
            if down { "down" } else { "up" },
        ]);
    }
}

impl Netns {
    /// Cuts the etcd member in this namespace (peer port `own`) off from its peers (peer
    /// ports `others`), or heals it (`on` false): iptables in the namespace drops both
    /// directions of every peer connection; clients still reach the member.
    pub fn cut_peers(&self, own: u16, others: &[u16], on: bool) {
        let op = if on { "-A" } else { "-D" };
        let mut rules = vec![("INPUT", "--dport", own), ("OUTPUT", "--sport", own)];
        for p in others {
            rules.push(("OUTPUT", "--dport", *p));
            rules.push(("INPUT", "--sport", *p));
        }
        for (chain, dir, port) in rules {
            let status = Command::new("ip")
                .args([
                    "netns", "exec", &self.name, "iptables", op, chain, "-p", "tcp",
                ])
                .args([dir, &port.to_string(), "-j", "DROP"])
                .status()
                .expect("iptables (apt-get install iptables)");
            assert!(status.success(), "iptables {op} {chain} in {}", self.name);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
