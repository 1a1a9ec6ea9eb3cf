//! Command-line flags (raw, as clap parses them) and the validated [`Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use registry::duration::parse_duration;
use registry::etcd::EtcdArgs;
use thiserror::Error;

/// Default check command for templates without their own: HAProxy's config check.
pub const DEFAULT_CHECK: &str = "haproxy -c -f {}";

const AFTER_HELP: &str = "\
Examples:
  # exec mode (containers): render, start HAProxy as a child, reload it on every change
  renderer --template /etc/renderer/haproxy.cfg.hbs:/etc/haproxy/haproxy.cfg \\
           -- haproxy -W -db -f /etc/haproxy/haproxy.cfg

  # HAProxy started elsewhere with `-S /run/haproxy-master.sock`
  renderer --template haproxy.cfg.hbs:/etc/haproxy/haproxy.cfg \\
           --haproxy-master-socket /run/haproxy-master.sock

  # see what would be rendered, change nothing; or what would change in the file
  renderer --template haproxy.cfg.hbs:/dev/null --dry-run
  renderer --template haproxy.cfg.hbs:/etc/haproxy/haproxy.cfg --dry-run --diff

  # before deploying a template: render it against the live registry and run its check
  # (exit 0 pass, 1 fail naming the template and the rejected line); writes nothing
  renderer check --template haproxy.cfg.hbs:/etc/haproxy/haproxy.cfg

  # what the running renderer serves, compared with the registry
  renderer status

Templates get: services (name -> [instance]), instances (all), vars (--var), revision.
An instance is {id, service, address, port, tags, meta, weight}. Helpers: eq, ne,
default, join, json, instances, by_tag, by_meta, sort_by, lower, upper, trim, replace,
split, contains, add, sub, mul, div, mod; partials from --partials DIR.

Exit status: 0 after a graceful stop; HAProxy's status if it exits in exec mode;
64 for bad flags or templates (or fatal etcd setup errors); 1 for other failures
(with --once: any render, check, write or reload failure).";

pub use observe::LogFormat;

/// Raw command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "lb-renderer",
    version = observe::cli::VERSION,
    about = "Watch the registry in etcd, render config files from Handlebars templates, validate them, reload HAProxy.",
    long_about = "Watch the registry in etcd, render config files from Handlebars templates, \
        validate them and reload HAProxy without dropping requests.\n\n\
        Lists <prefix>/ and watches it from that revision. Each change updates an in-memory \
        model; templates are rendered from it, and a file is written only when its bytes \
        change: staged next to the destination, checked (default `haproxy -c -f <staged>`), \
        renamed into place, the previous file kept as <dest>.prev. A config that fails its \
        check never reaches the destination, and HAProxy keeps serving the last good one. \
        Bursts of changes are merged into one apply without delaying the first.",
    after_help = AFTER_HELP
)]
pub struct Args {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Key prefix to watch (<prefix>/<service>/<id>).
    #[arg(long, env = "RENDERER_PREFIX", default_value = registry::DEFAULT_PREFIX)]
    pub prefix: String,

    /// Template and destination, SRC:DEST, or SRC:DEST:CHECK with a check command of its
    /// own ({} is the staged file). Repeatable (';'-separated in RENDERER_TEMPLATES).
    #[arg(
        long = "template",
        env = "RENDERER_TEMPLATES",
        value_delimiter = ';',
        required = true
    )]
    pub templates: Vec<String>,

    /// Directory of partials: every `NAME.hbs` in it is `{{> NAME}}` in the templates;
    /// read again with the templates on SIGHUP.
    #[arg(long, env = "RENDERER_PARTIALS", value_name = "DIR")]
    pub partials: Option<PathBuf>,

    /// Check command for templates without their own; {} is replaced by the staged file.
    /// Empty string: no check.
    #[arg(long, env = "RENDERER_CHECK_CMD", default_value = DEFAULT_CHECK)]
    pub check_cmd: String,

    /// Template variable KEY=VALUE (as vars.KEY), repeatable (','-separated in RENDERER_VARS).
    #[arg(long = "var", env = "RENDERER_VARS", value_delimiter = ',', value_parser = parse_var)]
    pub vars: Vec<(String, String)>,

    /// File of template variables, one KEY=VALUE per line (`#` comments), e.g. a secret
    /// `cookie_key` kept out of the command line and the environment; repeatable. --var
    /// wins over a file. Read at start.
    #[arg(
        long = "vars-file",
        env = "RENDERER_VARS_FILE",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    pub vars_files: Vec<PathBuf>,

    /// Changes arriving within this time of the last apply are merged into the next one.
    #[arg(long, env = "RENDERER_WAIT_MIN", default_value = "50ms", value_parser = parse_duration)]
    pub wait_min: Duration,

    /// Longest time continuous churn may postpone an apply.
    #[arg(long, env = "RENDERER_WAIT_MAX", default_value = "1s", value_parser = parse_duration)]
    pub wait_max: Duration,

    /// List the whole prefix this often and compare it with what the watch delivered; a
    /// difference (an event etcd did not deliver) is repaired, counted and logged. Every
    /// re-watch is verified this way too. A listing costs etcd about 30 ms CPU at 10 000
    /// instances and 0.8 s at 100 000 (docs/benchmarks.md) (0 = only at re-watches).
    #[arg(long, env = "RENDERER_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,

    /// Render, check, write and reload once, then exit (non-zero on any failure).
    #[arg(long)]
    pub once: bool,

    /// Print the rendered output to stdout; write nothing, reload nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// With --dry-run: print a unified diff of each destination against what would be
    /// written instead of the whole render (nothing when they agree).
    #[arg(long, requires = "dry_run")]
    pub diff: bool,

    /// HAProxy master CLI socket. With an exec-mode command, where HAProxy's `-S` socket
    /// is created [default: next to the first destination]; without, the master of an
    /// HAProxy started elsewhere, reloaded with `reload`.
    #[arg(long, env = "HAPROXY_MASTER_SOCKET", value_name = "PATH")]
    pub haproxy_master_socket: Option<PathBuf>,

    /// Shell command that reloads the consumer of the files (when not using exec mode or
    /// the master socket).
    #[arg(long, env = "RENDERER_RELOAD_CMD", value_name = "CMD")]
    pub reload_cmd: Option<String>,

    /// Timeout of --reload-cmd.
    #[arg(long, env = "RENDERER_RELOAD_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub reload_timeout: Duration,

    /// Apply every change with a reload, never through HAProxy's runtime API.
    #[arg(long, env = "RENDERER_NO_RUNTIME_API")]
    pub no_runtime_api: bool,

    /// Runtime API: a plan with more server changes than this goes through one reload
    /// instead (each change is a few CLI round trips, ~1 ms each; a reload of a small
    /// config is ~100 ms, and a burst that large is rarely latency-sensitive).
    #[arg(
        long,
        env = "RENDERER_RUNTIME_MAX_CHANGES",
        default_value_t = 200,
        value_name = "N"
    )]
    pub runtime_max_changes: usize,

    /// Runtime API: a server whose address is a hostname joining a backend with dynamic
    /// cookies makes HAProxy recompute every server's cookie against every other's
    /// (`enable dynamic-cookie backend`: 0.8 s of the worker's time at 10 000 servers on
    /// 2.6); above this many servers in that backend, reload instead. Servers with IP
    /// addresses get their cookie one at a time and are never limited by this.
    #[arg(
        long,
        env = "RENDERER_RUNTIME_MAX_COOKIE_SERVERS",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub runtime_max_cookie_servers: usize,

    /// Runtime API: how long a leaving server may finish in-flight requests (drain state)
    /// before it is deleted.
    #[arg(long, env = "RENDERER_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Exec mode: time HAProxy gets to finish in-flight requests on shutdown.
    #[arg(long, env = "RENDERER_STOP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub stop_timeout: Duration,

    /// Guard rail: when every instance of a service that had two or more disappears at once,
    /// keep its servers this long, waiting for them to register again, before emptying it
    /// (WARN). etcd before 3.4.28/3.5.11 can revoke every lease at once when a stalled
    /// leader resumes (etcd #15247), and registrars register again within a second; found
    /// by `bench chaos`. Like Eureka's self-preservation, but only for a service emptied.
    /// 0 = off.
    #[arg(long, env = "RENDERER_EMPTY_HOLD", default_value = "3s", value_parser = parse_duration)]
    pub empty_hold: Duration,

    /// Guard rail: refuse to apply a render that leaves SERVICE with fewer than N instances
    /// (keeps the last good config and logs loudly). Repeatable, SERVICE=N.
    #[arg(long = "min-instances", env = "RENDERER_MIN_INSTANCES", value_delimiter = ',', value_parser = parse_min)]
    pub min_instances: Vec<(String, usize)>,

    /// At most this many instances per service reach the templates (lowest ids first), so a
    /// flood of registrations cannot produce a config HAProxy rejects or exhaust memory.
    /// The default leaves room above the 10 000-server backends measured in
    /// docs/benchmarks.md (joins and leaves stay live there).
    #[arg(
        long,
        env = "RENDERER_MAX_INSTANCES_PER_SERVICE",
        default_value_t = 20_000
    )]
    pub max_instances_per_service: usize,

    /// Serve /metrics, /healthz, /readyz and /status on this address ("off" to disable).
    #[arg(long, env = "RENDERER_METRICS_ADDR", default_value = "127.0.0.1:9105", value_parser = observe::cli::parse_metrics_addr)]
    pub metrics_addr: observe::cli::MetricsAddr,

    /// /readyz turns not ready once the etcd watch has been down this long.
    #[arg(long, env = "RENDERER_READY_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub ready_grace: Duration,

    /// The HAProxy version templates see as `haproxy.version` (compare it with
    /// `version_at_least`). Default: asked of the exec-mode command's program, else of
    /// `haproxy` on PATH, with `-v`. Set it when HAProxy runs elsewhere (another host or
    /// container). Unknown counts as the oldest version.
    #[arg(long, env = "HAPROXY_VERSION", value_name = "X.Y[.Z]")]
    pub haproxy_version: Option<String>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Exec mode: the HAProxy command to run as a child (after `--`), e.g.
    /// `haproxy -W -db -f /etc/haproxy/haproxy.cfg`.
    #[arg(last = true, value_name = "HAPROXY")]
    pub command: Vec<String>,
}

fn parse_min(s: &str) -> Result<(String, usize), String> {
    let (svc, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SERVICE=N"))?;
    let n = n
        .parse()
        .map_err(|_| format!("{s:?}: N must be a number"))?;
    registry::validate::name("service", svc).map_err(|e| e.to_string())?;
    Ok((svc.to_string(), n))
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// One template and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub source: PathBuf,
    pub dest: PathBuf,
    pub check: Option<String>,
}

/// How HAProxy (or whatever reads the files) is brought to the new config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadMode {
    /// Only write files.
    None,
    /// Run HAProxy as our child; its master CLI socket.
    Exec {
        command: Vec<String>,
        socket: PathBuf,
    },
    /// Reload an HAProxy started elsewhere through its master CLI.
    Master(PathBuf),
    /// Run a shell command.
    Command { command: String, timeout: Duration },
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: EtcdArgs,
    pub prefix: String,
    pub templates: Vec<TemplateSpec>,
    /// `--partials`.
    pub partials: Option<PathBuf>,
    pub vars: BTreeMap<String, String>,
    pub wait_min: Duration,
    pub wait_max: Duration,
    pub empty_hold: Duration,
    pub resync: Option<Duration>,
    pub once: bool,
    pub dry_run: bool,
    /// `--diff` (with `--dry-run`).
    pub diff: bool,
    pub reload: ReloadMode,
    pub runtime_api: bool,
    pub runtime_limits: crate::apply::plan::Limits,
    pub drain_timeout: Duration,
    pub stop_timeout: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub ready_grace: Duration,
    pub min_instances: Vec<(String, usize)>,
    pub max_instances_per_service: usize,
    pub haproxy_version: Option<String>,
}

/// Why the flags do not make a usable configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--template {0:?}: expected SRC:DEST or SRC:DEST:CHECK")]
    Template(String),
    #[error("--prefix {0:?} must start with '/' and contain no whitespace")]
    Prefix(String),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("--vars-file {path}: {why}")]
    VarsFile { path: String, why: String },
}

impl Config {
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        if !args.prefix.starts_with('/') || args.prefix.chars().any(char::is_whitespace) {
            return Err(ConfigError::Prefix(args.prefix));
        }
        let default_check = (!args.check_cmd.trim().is_empty()).then(|| args.check_cmd.clone());
        let templates = args
            .templates
            .iter()
            .map(|t| parse_template(t, default_check.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        if args.wait_max < args.wait_min {
            return Err(ConfigError::Conflict(
                "--wait-max must not be shorter than --wait-min",
            ));
        }
        let exclusive = [
            !args.command.is_empty() && args.haproxy_master_socket.is_none(),
            args.reload_cmd.is_some(),
        ];
        if exclusive.iter().filter(|x| **x).count() > 1
            || (args.reload_cmd.is_some() && args.haproxy_master_socket.is_some())
        {
            return Err(ConfigError::Conflict(
                "choose one way to reload: `-- haproxy …` (exec mode), --haproxy-master-socket, or --reload-cmd",
            ));
        }
        if args.once && !args.command.is_empty() {
            return Err(ConfigError::Conflict(
                "--once cannot be combined with exec mode (`-- haproxy …`)",
            ));
        }
        let reload = if !args.command.is_empty() {
            let socket = args.haproxy_master_socket.clone().unwrap_or_else(|| {
                templates[0]
                    .dest
                    .parent()
                    .map(|d| d.join("haproxy-master.sock"))
                    .unwrap_or_else(|| PathBuf::from("haproxy-master.sock"))
            });
            ReloadMode::Exec {
                command: args.command,
                socket,
            }
        } else if let Some(path) = args.haproxy_master_socket {
            ReloadMode::Master(path)
        } else if let Some(command) = args.reload_cmd {
            ReloadMode::Command {
                command,
                timeout: args.reload_timeout,
            }
        } else {
            ReloadMode::None
        };
        Ok(Config {
            etcd: args.etcd,
            prefix: args.prefix,
            templates,
            partials: args.partials,
            vars: {
                let mut vars = BTreeMap::new();
                for path in &args.vars_files {
                    vars.extend(read_vars_file(path)?);
                }
                vars.extend(args.vars);
                vars
            },
            wait_min: args.wait_min,
            wait_max: args.wait_max,
            empty_hold: args.empty_hold,
            resync: (!args.resync.is_zero()).then_some(args.resync),
            once: args.once || args.dry_run,
            dry_run: args.dry_run,
            diff: args.diff,
            reload,
            runtime_api: !args.no_runtime_api,
            runtime_limits: crate::apply::plan::Limits {
                max_changes: args.runtime_max_changes,
                max_cookie_servers: args.runtime_max_cookie_servers,
            },
            drain_timeout: args.drain_timeout,
            stop_timeout: args.stop_timeout,
            metrics_addr: args.metrics_addr.0,
            ready_grace: args.ready_grace,
            min_instances: args.min_instances,
            max_instances_per_service: args.max_instances_per_service.max(1),
            haproxy_version: args.haproxy_version.filter(|v| !v.trim().is_empty()),
        })
    }
}

/// KEY=VALUE lines; blank lines and `#` comments skipped; the value taken as written
/// after the first `=` (no quotes, no trimming of inner spaces).
fn read_vars_file(path: &std::path::Path) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |why: String| ConfigError::VarsFile {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = parse_var(line).map_err(|_| bad(format!("line {}: not KEY=VALUE", n + 1)))?;
        vars.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(vars)
}

fn parse_template(spec: &str, default_check: Option<&str>) -> Result<TemplateSpec, ConfigError> {
    let mut parts = spec.splitn(3, ':');
    let (Some(src), Some(dest)) = (parts.next(), parts.next()) else {
        return Err(ConfigError::Template(spec.to_string()));
    };
    if src.is_empty() || dest.is_empty() {
        return Err(ConfigError::Template(spec.to_string()));
    }
    let check = match parts.next() {
        Some(c) if c.trim().is_empty() => None,
        Some(c) => Some(c.to_string()),
        None => default_check.map(str::to_string),
    };
    Ok(TemplateSpec {
        source: PathBuf::from(src),
        dest: PathBuf::from(dest),
        check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["renderer"];
        v.extend_from_slice(args);
        Config::from_args(Args::try_parse_from(v).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn templates_checks_and_modes() {
        let c = parse(&[
            "--template",
            "a.hbs:/etc/a.cfg",
            "--template",
            "b.hbs:/x/b.cfg:true {}",
            "--var",
            "k=v=w",
        ])
        .unwrap();
        assert_eq!(c.templates[0].check.as_deref(), Some(DEFAULT_CHECK));
        assert_eq!(c.templates[1].check.as_deref(), Some("true {}"));
        assert_eq!(c.vars["k"], "v=w");
        assert_eq!(c.reload, ReloadMode::None);

        let c = parse(&[
            "--template",
            "a:/run/lb/h.cfg",
            "--",
            "haproxy",
            "-W",
            "-f",
            "/run/lb/h.cfg",
        ])
        .unwrap();
        assert_eq!(
            c.reload,
            ReloadMode::Exec {
                command: vec![
                    "haproxy".into(),
                    "-W".into(),
                    "-f".into(),
                    "/run/lb/h.cfg".into()
                ],
                socket: PathBuf::from("/run/lb/haproxy-master.sock")
            }
        );
        let c = parse(&["--template", "a:b", "--check-cmd", ""]).unwrap();
        assert_eq!(c.templates[0].check, None);
    }

    #[test]
    fn vars_files_under_var_flags() {
        let dir = std::env::temp_dir().join(format!("renderer-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret.vars");
        std::fs::write(&f, "# generated\ncookie_key = s3cr=t\n\nservice=web\n").unwrap();
        let path = f.display().to_string();
        let c = parse(&[
            "--template",
            "a:b",
            "--vars-file",
            &path,
            "--var",
            "service=api",
        ])
        .unwrap();
        assert_eq!(c.vars["cookie_key"], "s3cr=t");
        assert_eq!(c.vars["service"], "api", "--var wins over the file");
        std::fs::write(&f, "novalue\n").unwrap();
        let err = parse(&["--template", "a:b", "--vars-file", &path]).unwrap_err();
        assert!(err.contains("line 1: not KEY=VALUE"), "{err}");
        assert!(parse(&["--template", "a:b", "--vars-file", "/nonexistent"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_flags() {
        assert!(parse(&[]).is_err(), "--template is required");
        assert!(parse(&["--template", "nodest"]).is_err());
        assert!(parse(&["--template", "a:b", "--reload-cmd", "x", "--", "haproxy"]).is_err());
        assert!(parse(&["--template", "a:b", "--once", "--", "haproxy"]).is_err());
        assert!(parse(&["--template", "a:b", "--wait-min", "2s", "--wait-max", "1s"]).is_err());
        assert!(parse(&["--template", "a:b", "--var", "novalue"]).is_err());
        assert!(parse(&["--template", "a:b", "--wait-min", "fast"]).is_err());
    }
}
