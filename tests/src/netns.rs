//! Test hosts in a network namespace: one veth link to the host (host 10.231.0.1,
//! namespace 10.231.0.2, a /30 that exists only on that link), created by the test and
//! removed on drop. Traffic never leaves this machine.

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
}

impl Netns {
    pub fn create() -> Netns {
        let tag = std::process::id() % 100_000;
        let n = Netns {
            name: format!("lbp{tag}"),
            host_if: format!("lbh{tag}"),
        };
        let peer = format!("lbn{tag}");
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &n.name]);
        ip(&["addr", "add", "10.231.0.1/30", "dev", &n.host_if]);
        ip(&["link", "set", &n.host_if, "up"]);
        ip(&["-n", &n.name, "addr", "add", "10.231.0.2/30", "dev", &peer]);
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
