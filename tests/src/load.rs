//! Bounded HTTP load with `wrk` on loopback, and its result.

use std::process::{Child, Command, Stdio};

/// What wrk reported.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    pub raw: String,
}

impl LoadResult {
    pub fn failed(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }
}

/// A running wrk.
pub struct Load {
    child: Child,
}

impl Load {
    /// `wrk` against 127.0.0.1:port for `secs` seconds with `connections` connections;
    /// `close` sends `Connection: close` on every request (new connection per request).
    pub fn start(port: u16, secs: u32, connections: u32, close: bool) -> Load {
        let mut cmd = Command::new("wrk");
        cmd.arg("-t1")
            .arg(format!("-c{connections}"))
            .arg(format!("-d{secs}s"))
            .arg("--timeout")
            .arg("5s");
        if close {
            cmd.arg("-H").arg("Connection: close");
        }
        cmd.arg(format!("http://127.0.0.1:{port}/"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Load {
            child: cmd.spawn().expect("wrk (apt-get install wrk)"),
        }
    }

    /// Stops wrk now (SIGINT: it prints its summary) and parses the summary.
    pub fn stop(self) -> LoadResult {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        self.finish()
    }

    /// Waits for wrk to finish and parses its summary.
    pub fn finish(self) -> LoadResult {
        let out = self.child.wait_with_output().expect("wrk output");
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut r = LoadResult {
            raw: raw.clone(),
            ..Default::default()
        };
        for line in raw.lines() {
            let line = line.trim();
            if line.contains("requests in") {
                r.requests = line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                r.socket_errors = rest
                    .split(',')
                    .filter_map(|p| {
                        p.split_whitespace()
                            .last()
                            .and_then(|n| n.parse::<u64>().ok())
                    })
                    .sum();
            } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = rest.trim().parse().unwrap_or(0);
            }
        }
        r
    }
}
