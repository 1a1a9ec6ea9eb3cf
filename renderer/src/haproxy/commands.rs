//! The runtime API commands the renderer sends to the current worker (`@1 …` through the
//! master CLI), one typed method each, with the answer that means HAProxy did what was
//! asked (HAProxy 2.6 and 3.0 answer alike; see `cli_parse_*_server()` in src/server.c).
//! Every runtime command line is spelled here and nowhere else.

use std::collections::BTreeMap;
use std::fmt;

use registry::AdminState;
use tracing::debug;

use super::{parse, HaproxyError, MasterCli, ServersState};

/// A server as the runtime API names it: `<backend>/<server>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRef<'a> {
    pub backend: &'a str,
    pub name: &'a str,
}

impl fmt::Display for ServerRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.backend, self.name)
    }
}

/// Answers that mean success for most `set`/`enable` commands: nothing at all.
fn quiet(answer: &str) -> bool {
    answer.is_empty()
}

/// Keeps a refused answer short enough for a log line.
fn short(answer: &str) -> String {
    answer.trim().chars().take(300).collect()
}

/// A runtime command with the answer that means HAProxy did it, to be sent with others
/// ([`MasterCli::run_together`]).
#[derive(Debug, Clone)]
pub struct Command {
    line: String,
    ok: fn(&str) -> bool,
}

impl Command {
    /// `add server <backend>/<name> <addr>:<port> <keywords…>`: the server starts in
    /// maintenance.
    pub fn add_server(s: ServerRef<'_>, addr: &str, port: &str, keywords: &[&str]) -> Command {
        let line = format!("add server {s} {addr}:{port} {}", keywords.join(" "));
        Command {
            line: line.trim_end().to_string(),
            ok: |a| a.contains("New server registered"),
        }
    }

    /// `set server … addr <addr> port <port>` for a server added on a placeholder address:
    /// the IP must change, which is when HAProxy derives its dynamic cookie.
    pub fn move_to_addr(s: ServerRef<'_>, addr: &str, port: &str) -> Command {
        Command {
            line: format!("set server {s} addr {addr} port {port}"),
            ok: |a| a.contains("IP changed"),
        }
    }

    /// `set server … state ready|drain|maint`. Drain is HAProxy's own drain flag (`show
    /// stat` says DRAIN); ready clears drain and maintenance.
    pub fn set_server_state(s: ServerRef<'_>, state: AdminState) -> Command {
        Command {
            line: format!("set server {s} state {}", state.as_str()),
            ok: quiet,
        }
    }

    /// `enable server …`: out of maintenance.
    pub fn enable_server(s: ServerRef<'_>) -> Command {
        Command {
            line: format!("enable server {s}"),
            ok: quiet,
        }
    }

    /// `enable health …`: starts the server's health checks.
    pub fn enable_health(s: ServerRef<'_>) -> Command {
        Command {
            line: format!("enable health {s}"),
            ok: quiet,
        }
    }
}

impl MasterCli {
    /// Sends `commands` to the worker together — one round trip — and checks their answers
    /// in order: `Ok` when each is accepted, else the first refusal. HAProxy runs every one
    /// of them whatever the answers before it, so a batch holds commands that do no harm
    /// after an earlier refusal (the caller reloads from the file on any refusal).
    pub async fn run_together(&self, commands: &[Command]) -> Result<(), HaproxyError> {
        let lines: Vec<&str> = commands.iter().map(|c| c.line.as_str()).collect();
        let answers = self.worker_commands(&lines).await?;
        for (c, answer) in commands.iter().zip(&answers) {
            let answer = answer.trim();
            debug!(command = %c.line, %answer, "runtime API");
            if !(c.ok)(answer) {
                return Err(HaproxyError::Refused {
                    command: c.line.clone(),
                    answer: short(answer),
                });
            }
        }
        Ok(())
    }

    async fn run(&self, command: Command) -> Result<(), HaproxyError> {
        self.run_together(std::slice::from_ref(&command)).await
    }

    /// Sends `command` to the worker: `Ok` when `ok` accepts the (trimmed) answer,
    /// [`HaproxyError::Refused`] otherwise.
    async fn expect(&self, command: String, ok: fn(&str) -> bool) -> Result<(), HaproxyError> {
        self.run(Command { line: command, ok }).await
    }

    /// `add server <backend>/<name> <addr>:<port> <keywords…>`: the server starts in
    /// maintenance, with its health checks stopped.
    pub async fn add_server(
        &self,
        s: ServerRef<'_>,
        addr: &str,
        port: &str,
        keywords: &[&str],
    ) -> Result<(), HaproxyError> {
        self.run(Command::add_server(s, addr, port, keywords)).await
    }

    /// `set server … addr <addr> port <port>`, whether or not anything changes.
    pub async fn set_addr(
        &self,
        s: ServerRef<'_>,
        addr: &str,
        port: &str,
    ) -> Result<(), HaproxyError> {
        self.expect(format!("set server {s} addr {addr} port {port}"), |a| {
            a.is_empty() || a.contains("changed") || a.contains("no need to change")
        })
        .await
    }

    /// `set server … addr <addr> port <port>` for a server added on a placeholder address:
    /// the IP must change, which is when HAProxy derives its dynamic cookie.
    pub async fn move_to_addr(
        &self,
        s: ServerRef<'_>,
        addr: &str,
        port: &str,
    ) -> Result<(), HaproxyError> {
        self.run(Command::move_to_addr(s, addr, port)).await
    }

    /// `set server … addr <placeholder>`: HAProxy closes the server's idle connections at
    /// once when its address changes (`srv_cleanup_connections()`). Any answer will do.
    pub async fn drop_idle_connections(
        &self,
        s: ServerRef<'_>,
        placeholder: &str,
    ) -> Result<(), HaproxyError> {
        self.expect(format!("set server {s} addr {placeholder}"), |_| true)
            .await
    }

    /// `set server … weight <w>`.
    pub async fn set_weight(&self, s: ServerRef<'_>, weight: &str) -> Result<(), HaproxyError> {
        self.expect(format!("set server {s} weight {weight}"), quiet)
            .await
    }

    /// `set server … state ready|drain|maint`. Drain is HAProxy's own drain flag (`show
    /// stat` says DRAIN); ready clears drain and maintenance.
    pub async fn set_server_state(
        &self,
        s: ServerRef<'_>,
        state: AdminState,
    ) -> Result<(), HaproxyError> {
        self.run(Command::set_server_state(s, state)).await
    }

    /// `enable server …`: out of maintenance.
    pub async fn enable_server(&self, s: ServerRef<'_>) -> Result<(), HaproxyError> {
        self.run(Command::enable_server(s)).await
    }

    /// `enable health …`: starts the server's health checks.
    pub async fn enable_health(&self, s: ServerRef<'_>) -> Result<(), HaproxyError> {
        self.run(Command::enable_health(s)).await
    }

    /// `disable health …`: stops the check task. Any answer will do (a server without
    /// checks has none to stop).
    pub async fn disable_health(&self, s: ServerRef<'_>) -> Result<(), HaproxyError> {
        self.expect(format!("disable health {s}"), |_| true).await
    }

    /// `del server …`. While the server still has connections (2.6 keeps idle ones until
    /// `pool-purge-delay`) HAProxy refuses with [`HaproxyError::StillHasConnections`],
    /// which is worth retrying; any other refusal is [`HaproxyError::Refused`].
    pub async fn del_server(&self, s: ServerRef<'_>) -> Result<(), HaproxyError> {
        let command = format!("del server {s}");
        let answer = self.worker_command(&command).await?;
        debug!(%command, answer = %answer.trim(), "runtime API");
        if answer.contains("Server deleted") {
            Ok(())
        } else if answer.contains("still has connections") {
            Err(HaproxyError::StillHasConnections {
                command,
                answer: short(&answer),
            })
        } else {
            Err(HaproxyError::Refused {
                command,
                answer: short(&answer),
            })
        }
    }

    /// `shutdown sessions server …`: ends the server's sessions. Any answer will do.
    pub async fn shutdown_sessions(&self, s: ServerRef<'_>) -> Result<(), HaproxyError> {
        self.expect(format!("shutdown sessions server {s}"), |_| true)
            .await
    }

    /// `enable dynamic-cookie backend <backend>`: HAProxy derives every server's dynamic
    /// cookie again (the only way for a server whose address is a hostname).
    pub async fn enable_dynamic_cookie(&self, backend: &str) -> Result<(), HaproxyError> {
        self.expect(format!("enable dynamic-cookie backend {backend}"), quiet)
            .await
    }

    /// `show servers state <backend>`, by server name.
    pub async fn show_servers_state(&self, backend: &str) -> Result<ServersState, HaproxyError> {
        let command = format!("show servers state {backend}");
        let out = self.worker_command(&command).await?;
        parse::parse_servers_state(&out).ok_or_else(|| HaproxyError::Unexpected {
            command,
            answer: out.chars().take(200).collect(),
        })
    }

    /// The numeric ids of the running backends by name (`show stat -1 2 -1`: one BACKEND
    /// row per backend). Servers are asked about by their backend's id, not its name:
    /// `show stat <name>` looks the name up among all proxies and finds a frontend of the
    /// same name (`frontend pool` + `backend pool`) as readily as the backend.
    pub async fn backend_ids(&self) -> Result<BTreeMap<String, u32>, HaproxyError> {
        // Ids change only with the config, i.e. with a reload or a restart: asked once per
        // master CLI session (a CSV row per backend: ~0.4 MB at 1 000 backends).
        let csv = self.worker_command_per_session("show stat -1 2 -1").await?;
        Ok(parse::backend_ids(&csv))
    }

    /// The `show stat <iid> 4 <sid>` row of server `sid` of the backend whose id is `iid`
    /// ([`backend_ids`](Self::backend_ids)) by column name; `None` when the backend has no
    /// such server. ~0.3 ms, where a whole backend's `show stat` is ~300 bytes per server.
    pub async fn show_stat_server(
        &self,
        iid: u32,
        sid: u32,
    ) -> Result<Option<BTreeMap<String, String>>, HaproxyError> {
        let csv = self
            .worker_command(&format!("show stat {iid} 4 {sid}"))
            .await?;
        Ok(parse::stat_row(&csv, sid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_named_backend_slash_name() {
        let s = ServerRef {
            backend: "nodes",
            name: "web-1",
        };
        assert_eq!(s.to_string(), "nodes/web-1");
        assert_eq!(short(&format!("  {}  ", "x".repeat(400))).len(), 300);
    }
}
