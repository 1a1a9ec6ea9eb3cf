//! `registrar docker`: one daemon per Docker host registers the containers that carry an
//! `lb-registry.service` label, for images that cannot carry a registrar. [`labels`] says
//! what a container's labels mean; [`daemon`] follows the engine (events, then a full sync
//! on every (re)connect) and keeps the records under one lease of its own.

pub mod daemon;
mod engine;
pub mod labels;
mod metrics;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use registry::duration::parse_duration;
use registry::etcd::EtcdArgs;

use crate::config::LogFormat;

const AFTER_HELP: &str = "\
Labels (on the containers):
  lb-registry.service=NAME     register this container as an instance of NAME (required)
  lb-registry.port=PORT        the container port (optional when exactly one is exposed)
  lb-registry.id=ID            the instance id (default: the container's name)
  lb-registry.tags=A,B         tags
  lb-registry.meta.KEY=VALUE   meta, one label per key
  lb-registry.weight=W         weight 0-256 (default 100)
  lb-registry.network=NET      which network's address, when the container is on several

Several services per container, one port group each (registrator's SERVICE_<port>_NAME):
  lb-registry.<PORT>.service=NAME   register NAME on container port PORT
  lb-registry.<PORT>.id=ID          its id (default: the container's name)
  lb-registry.<PORT>.tags=A,B       its tags
  lb-registry.<PORT>.meta.KEY=VALUE its meta
  lb-registry.<PORT>.weight=W       its weight
A port group takes nothing from the top-level labels; both may be used together.

Scope: --network NAME registers only containers attached to NAME, with their address on
it; --label-filter KEY[=VALUE] (repeatable, all must match) only containers carrying it.

Lifecycle: start (and healthy, with a HEALTHCHECK) registers; unhealthy, the first stop
signal (docker stop/kill), die, destroy and pause deregister, before the container exits.
Every key is bound to the daemon's lease: a dead daemon's records expire after the TTL. On
start and after losing the Docker socket a full sync registers what is missing and removes
this daemon's stale keys (meta registered-by=docker:OWNER); keys written by in-image
registrars are never touched. A graceful stop leaves the records to their TTL, so a
restarted daemon takes them over without a gap.

Example:
  registrar docker --endpoints http://etcd:2379 --ttl 10s --network lb
  docker run -d --network lb --label lb-registry.service=webapp --label lb-registry.port=3000 my/app
  docker run -d --network lb --label lb-registry.3000.service=webapp \
             --label lb-registry.9000.service=admin my/app";

/// How the record's address is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The container's IP on its network and the container port.
    Container,
    /// --host-address and the host port Docker published for the container port.
    Published,
}

/// Flags of `registrar docker`.
#[derive(Debug, Parser)]
#[command(
    name = "lb-registrar docker",
    version = observe::cli::VERSION,
    about = "Register the Docker containers labelled lb-registry.service=NAME, from the engine's events, under one TTL lease.",
    after_help = AFTER_HELP
)]
pub struct DockerArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Key prefix (<prefix>/<service>/<id>).
    #[arg(long, env = "REGISTRAR_PREFIX", default_value = registry::DEFAULT_PREFIX)]
    pub prefix: String,

    /// Lease TTL: how long the records of a dead daemon stay (at least 2s).
    #[arg(long, env = "REGISTRAR_TTL", default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,

    /// The Docker engine's socket.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock",
        value_name = "unix://PATH"
    )]
    pub docker_host: String,

    /// Which address goes into the records.
    #[arg(long, env = "REGISTRAR_ADDRESS_MODE", value_enum, default_value_t = Mode::Container)]
    pub address_mode: Mode,

    /// This host's address, for --address-mode published.
    #[arg(long, env = "REGISTRAR_HOST_ADDRESS", value_name = "IP")]
    pub host_address: Option<String>,

    /// Register only containers attached to this Docker network, with their address on it
    /// (a container's lb-registry.network label must agree).
    #[arg(long, env = "REGISTRAR_DOCKER_NETWORK", value_name = "NAME")]
    pub network: Option<String>,

    /// Register only containers carrying this label (KEY) or label value (KEY=VALUE);
    /// repeatable, all must match (Docker's own label filter).
    #[arg(
        long = "label-filter",
        env = "REGISTRAR_DOCKER_LABEL_FILTER",
        value_name = "KEY[=VALUE]",
        value_delimiter = ','
    )]
    pub label_filters: Vec<String>,

    /// Marks this daemon's records (meta registered-by=docker:OWNER) [default: the hostname].
    #[arg(long, env = "REGISTRAR_DOCKER_OWNER")]
    pub owner: Option<String>,

    /// Serve /metrics, /healthz and /readyz (ready = synced with Docker and etcd) on
    /// HOST:PORT ("off": none, the default).
    #[arg(long, env = "REGISTRAR_METRICS_ADDR", value_name = "HOST:PORT", value_parser = observe::cli::parse_metrics_addr)]
    pub metrics_addr: Option<observe::cli::MetricsAddr>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Validated `registrar docker` settings.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    pub etcd: EtcdArgs,
    pub prefix: String,
    pub ttl_secs: i64,
    pub socket: String,
    pub mode: labels::AddressMode,
    pub owner: String,
    pub metrics_addr: Option<SocketAddr>,
    /// `--network`.
    pub network: Option<String>,
    /// `--label-filter`, as Docker's `label` filter takes them.
    pub label_filters: Vec<String>,
}

impl DockerConfig {
    /// Checks the flags; the message names the flag.
    pub fn from_args(args: DockerArgs) -> Result<DockerConfig, String> {
        if args.ttl < Duration::from_secs(2) {
            return Err(format!("--ttl {:?} is too short: at least 2s", args.ttl));
        }
        let ttl_secs = args.ttl.as_secs() + u64::from(args.ttl.subsec_nanos() > 0);
        if !args.prefix.starts_with('/') || args.prefix.chars().any(char::is_whitespace) {
            return Err(format!(
                "--prefix {:?} must start with '/' and contain no whitespace",
                args.prefix
            ));
        }
        let socket = args
            .docker_host
            .strip_prefix("unix://")
            .ok_or_else(|| {
                format!(
                    "--docker-host {:?}: only unix:// sockets are supported",
                    args.docker_host
                )
            })?
            .to_string();
        let mode = match (args.address_mode, args.host_address) {
            (Mode::Container, None) => labels::AddressMode::Container,
            (Mode::Container, Some(_)) => {
                return Err("--host-address is for --address-mode published".into())
            }
            (Mode::Published, None) => {
                return Err("--address-mode published needs --host-address".into())
            }
            (Mode::Published, Some(a)) => {
                registry::validate::address(&a).map_err(|e| format!("--host-address: {e}"))?;
                labels::AddressMode::Published { host_address: a }
            }
        };
        let owner = match args.owner {
            Some(o) => o,
            None => nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        registry::validate::word("--owner", &owner, 64, false)
            .map_err(|e| format!("{e} (set --owner)"))?;
        if let Some(net) = &args.network {
            if net.is_empty() || net.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("--network {net:?}: not a network name"));
            }
        }
        for f in &args.label_filters {
            let key = f.split_once('=').map_or(f.as_str(), |(k, _)| k);
            if key.is_empty() || f.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("--label-filter {f:?}: expected KEY or KEY=VALUE"));
            }
        }
        Ok(DockerConfig {
            etcd: args.etcd,
            prefix: args.prefix,
            ttl_secs: ttl_secs as i64,
            socket,
            mode,
            owner,
            metrics_addr: args.metrics_addr.and_then(|m| m.0),
            network: args.network,
            label_filters: args.label_filters,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<DockerConfig, String> {
        let mut v = vec!["lb-registrar docker"];
        v.extend_from_slice(args);
        DockerConfig::from_args(DockerArgs::try_parse_from(v).map_err(|e| e.to_string())?)
    }

    #[test]
    fn flags_are_checked() {
        let c = parse(&["--owner", "h1"]).unwrap();
        assert_eq!(
            (c.socket.as_str(), c.ttl_secs),
            ("/var/run/docker.sock", 10)
        );
        assert_eq!(c.mode, labels::AddressMode::Container);
        let c = parse(&[
            "--address-mode",
            "published",
            "--host-address",
            "192.168.1.10",
            "--owner",
            "h",
        ])
        .unwrap();
        assert!(matches!(c.mode, labels::AddressMode::Published { .. }));
        for bad in [
            &["--address-mode", "published"][..],
            &["--host-address", "10.0.0.1"],
            &["--address-mode", "published", "--host-address", "not an ip"],
            &["--docker-host", "tcp://127.0.0.1:2375"],
            &["--ttl", "1s"],
            &["--owner", "a b"],
            &["--address-mode", "bridge"],
            &["--network", ""],
            &["--label-filter", "=x"],
            &["--label-filter", "a b"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
