//! HAProxy's dialogue, in one home: the master CLI ([`cli`]), one typed method per runtime
//! command ([`commands`]: no other file spells a runtime command), HAProxy as a process —
//! its version, the exec-mode child, a reload command ([`process`]) — and the parsers of
//! what it prints ([`parse`]). Nothing here knows about templates or the registry.

pub mod cli;
pub mod commands;
#[cfg(test)]
pub(crate) mod fake;
pub mod parse;
pub mod process;

use std::process::ExitStatus;
use std::time::Duration;

use thiserror::Error;

pub use cli::MasterCli;
pub use commands::{Command, ServerRef};
pub use parse::{
    check_summary, dynamic_cookie, parse_servers_state, parse_stat, parse_version, rejected_line,
    ProcTable, ServerState, ServersState,
};
pub use process::{detect_version, run_reload_command, HaproxyChild};

/// Reload or CLI failure.
#[derive(Debug, Error)]
pub enum HaproxyError {
    #[error("master CLI {path}: {source}")]
    Cli {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected `show proc` output: {0:?}")]
    ShowProc(String),
    /// A runtime command that HAProxy answered with something else than success.
    #[error("HAProxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    /// `del server` refused because the server still has connections: worth retrying.
    #[error("HAProxy refused `{command}`: {answer}")]
    StillHasConnections { command: String, answer: String },
    /// A runtime command whose answer could not be read.
    #[error("unexpected `{command}` output: {answer}")]
    Unexpected { command: String, answer: String },
    #[error(
        "HAProxy refused the new config (master reports a failed reload; old workers keep serving)"
    )]
    ReloadFailed,
    #[error("reload not confirmed after {attempts} attempts")]
    NotConfirmed { attempts: u32 },
    #[error("reload command `{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("cannot start HAProxy `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("HAProxy exited before it was ready ({0})")]
    Exited(ExitStatus),
    #[error("HAProxy not ready after {0:?}")]
    NotReady(Duration),
}

#[cfg(test)]
mod tests {
    /// The non-test part of a source file: everything before its `#[cfg(test)]` module.
    fn code(text: &str) -> &str {
        text.find("#[cfg(test)]\nmod tests")
            .map_or(text, |end| &text[..end])
    }

    /// Every `.rs` file under `dir`.
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_other_module_spells_a_runtime_command() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let home = src.join("haproxy");
        let mut files = Vec::new();
        sources(&src, &mut files);
        assert!(files.len() > 20, "{files:?}");
        let commands = [
            "\"add server",
            "\"del server",
            "\"set server",
            "\"enable server",
            "\"enable health",
            "\"disable health",
            "\"shutdown sessions",
            "\"show servers state",
            "\"show stat",
            "\"@1 ",
            "\"enable dynamic-cookie",
        ];
        let mut offenders = Vec::new();
        for file in files.iter().filter(|f| !f.starts_with(&home)) {
            let text = std::fs::read_to_string(file).unwrap();
            for c in commands.iter().filter(|c| code(&text).contains(*c)) {
                offenders.push(format!("{}: {c}", file.display()));
            }
        }
        assert!(
            offenders.is_empty(),
            "runtime commands belong in src/haproxy/commands.rs: {offenders:?}"
        );
        // The check can fail: the home itself spells them.
        let home_text = std::fs::read_to_string(home.join("commands.rs")).unwrap();
        assert!(commands
            .iter()
            .filter(|c| !c.starts_with("\"@1"))
            .all(|c| code(&home_text).contains(*c)));
    }
}
