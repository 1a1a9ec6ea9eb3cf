//! Command-line flags (raw, as clap parses them) and the validated [`Config`] built from
//! them. Every flag can also come from an environment variable.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use clap::Parser;
use registry::duration::parse_duration;
use registry::etcd::EtcdArgs;
use registry::validate::ValidationError;
use registry::Instance;
use thiserror::Error;

use crate::health::HealthCheck;

const AFTER_HELP: &str = "\
Examples:
  # register this host's web app, keep it registered until SIGTERM
  registrar --service webapp --port 3000

  # run the app as a child; register once it answers /health; on SIGTERM revoke the
  # lease, wait 2s for the load balancer to drain, then stop the app
  registrar --service webapp --port 3000 --health-http http://127.0.0.1:3000/health \\
            --drain 2s -- /usr/local/bin/webapp --port 3000

  # two services of one process under one lease (both records go at once on SIGTERM),
  # registered only while both checks pass
  registrar --register webapp:3000 --register admin:9000 \
            --health-http http://127.0.0.1:3000/health --health-cmd 'test -e /run/app.ready'

  # what is registered, and which lease owns it
  etcdctl get --prefix /services/
  etcdctl lease timetolive <lease-id-in-hex> --keys

Exit status: 0 after a graceful stop; the child's status in exec mode (128+N when it
was killed by signal N); 64 for bad flags or a fatal etcd setup error (authentication,
certificates); 1 for other failures.";

pub use observe::LogFormat;

/// Raw command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "lb-registrar",
    version = observe::cli::VERSION,
    about = "Keep this instance registered in etcd under a TTL lease (optionally running the app as a child).",
    long_about = "Keep this instance registered in etcd under a TTL lease.\n\n\
        Writes <prefix>/<service>/<id> = JSON {id, service, address, port, tags, meta, weight} \
        bound to a lease, keeps the lease alive every TTL/3, re-registers after any lease loss, \
        and revokes the lease on SIGTERM/SIGINT so the load balancer drops the instance at once. \
        If the process dies without revoking, the key disappears after the TTL.\n\n\
        With `-- CMD ARGS...` the app runs as a child: signals are forwarded, the lease is \
        revoked before the child is stopped, and registrar exits with the child's status.",
    after_help = AFTER_HELP
)]
pub struct Args {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Key prefix; the key is <prefix>/<service>/<id>.
    #[arg(long, env = "REGISTRAR_PREFIX", default_value = registry::DEFAULT_PREFIX)]
    pub prefix: String,

    /// Service name ([A-Za-z0-9][A-Za-z0-9._-]{0,62}); with --port. Or use --register.
    #[arg(long, env = "REGISTRAR_SERVICE", requires = "port")]
    pub service: Option<String>,

    /// Register service NAME on PORT, repeatable (or comma-separated in
    /// REGISTRAR_REGISTER): one record per service, <prefix>/<NAME>/<id>, all under one
    /// lease. Beside or instead of --service/--port.
    #[arg(
        long = "register",
        env = "REGISTRAR_REGISTER",
        value_name = "NAME:PORT",
        value_delimiter = ',',
        value_parser = parse_register
    )]
    pub register: Vec<(String, u16)>,

    /// Instance id, unique within the service [default: the hostname].
    #[arg(long, env = "REGISTRAR_ID")]
    pub id: Option<String>,

    /// Address the load balancer should connect to: an IP or DNS name, no port
    /// [default: this host's address on the route towards etcd].
    #[arg(long, env = "REGISTRAR_ADDRESS")]
    pub address: Option<String>,

    /// Port the app listens on (1-65535); with --service.
    #[arg(long, env = "REGISTRAR_PORT", requires = "service")]
    pub port: Option<u16>,

    /// Tag, repeatable (or comma-separated in REGISTRAR_TAGS).
    #[arg(long = "tag", env = "REGISTRAR_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,

    /// Metadata KEY=VALUE, repeatable (or comma-separated in REGISTRAR_META).
    #[arg(long = "meta", env = "REGISTRAR_META", value_delimiter = ',', value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,

    /// Load-balancing weight (0-256).
    #[arg(long, env = "REGISTRAR_WEIGHT", default_value_t = registry::instance::DEFAULT_WEIGHT)]
    pub weight: u16,

    /// Lease TTL (at least 2s; whole seconds): how long a crashed instance stays registered.
    #[arg(long, env = "REGISTRAR_TTL", default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,

    /// Register only while GET URL answers 2xx/3xx (http:// or https://; redirects are
    /// followed, up to 5). Repeatable; all checks (http, tcp, cmd) must pass.
    #[arg(long, env = "REGISTRAR_HEALTH_HTTP", value_name = "URL")]
    pub health_http: Vec<String>,

    /// CA certificate(s) (PEM) that an https:// --health-http must be signed by, instead
    /// of the system's roots. A self-signed server certificate (`openssl req -x509`) given
    /// here is accepted when the server presents exactly it, for the names it holds.
    #[arg(
        long,
        env = "REGISTRAR_HEALTH_CACERT",
        value_name = "FILE",
        requires = "health_http"
    )]
    pub health_cacert: Option<std::path::PathBuf>,

    /// Register only while a TCP connect to HOST:PORT succeeds. Repeatable.
    #[arg(long, env = "REGISTRAR_HEALTH_TCP", value_name = "HOST:PORT")]
    pub health_tcp: Vec<String>,

    /// Register only while `sh -c CMD` exits 0 (killed with its children at
    /// --health-timeout, which counts as a failure). Repeatable.
    #[arg(long, env = "REGISTRAR_HEALTH_CMD", value_name = "CMD")]
    pub health_cmd: Vec<String>,

    /// Time between health checks.
    #[arg(long, env = "REGISTRAR_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,

    /// Timeout of one health check.
    #[arg(long, env = "REGISTRAR_HEALTH_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive failed checks before the instance is deregistered.
    #[arg(long, env = "REGISTRAR_HEALTH_FAILS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_fails: u32,

    /// Consecutive passed checks before a deregistered instance is registered again.
    #[arg(long, env = "REGISTRAR_HEALTH_RISES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_rises: u32,

    /// On SIGTERM/SIGINT: time between revoking the lease and signalling the child, so
    /// the load balancer stops sending new requests first.
    #[arg(long, env = "REGISTRAR_DRAIN", default_value = "0s", value_parser = parse_duration)]
    pub drain: Duration,

    /// Exec mode: time the child gets to exit after it is signalled, then SIGKILL.
    #[arg(long, env = "REGISTRAR_KILL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub kill_timeout: Duration,

    /// Serve /metrics, /healthz and /readyz (ready = registered) on HOST:PORT ("off": none,
    /// the default).
    #[arg(long, env = "REGISTRAR_METRICS_ADDR", value_name = "HOST:PORT", value_parser = observe::cli::parse_metrics_addr)]
    pub metrics_addr: Option<observe::cli::MetricsAddr>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Exec mode: the app command to run as a child (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_register(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: the port must be 1-65535"))?;
    Ok((name.to_string(), port))
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: EtcdArgs,
    pub prefix: String,
    /// One record per service, in flag order (--service/--port first); same id, address,
    /// tags, meta and weight.
    pub instances: Vec<Instance>,
    pub ttl_secs: i64,
    /// Every check must pass; empty: always registered.
    pub health: Vec<HealthCheck>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub health_fails: u32,
    pub health_rises: u32,
    pub drain: Duration,
    pub kill_timeout: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub command: Vec<String>,
}

/// Why the flags do not make a usable configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("--ttl {0:?} is too short: etcd leases need at least 2s")]
    TtlTooShort(Duration),
    #[error("--prefix {0:?} must start with '/' and contain no whitespace")]
    Prefix(String),
    #[error("--id not given and the hostname {0:?} is not a valid id; pass --id")]
    Hostname(String),
    #[error("cannot detect this host's address ({0}); pass --address")]
    Address(String),
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    #[error("--health-interval and --health-timeout must be greater than zero")]
    HealthTiming,
    #[error("nothing to register: give --service and --port, or --register NAME:PORT")]
    NoService,
    #[error("service {0:?} is registered twice (--service/--register): each service is one key")]
    DuplicateService(String),
}

impl Config {
    /// Validates the flags. Nothing is written anywhere before this succeeds.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        if args.ttl < Duration::from_secs(2) {
            return Err(ConfigError::TtlTooShort(args.ttl));
        }
        // etcd leases are whole seconds; round up so the TTL is never shorter than asked.
        let ttl_secs = args.ttl.as_secs() + u64::from(args.ttl.subsec_nanos() > 0);
        if !args.prefix.starts_with('/') || args.prefix.chars().any(char::is_whitespace) {
            return Err(ConfigError::Prefix(args.prefix));
        }
        let services: Vec<(String, u16)> = args
            .service
            .into_iter()
            .zip(args.port)
            .chain(args.register)
            .collect();
        if services.is_empty() {
            return Err(ConfigError::NoService);
        }
        for (i, (service, _)) in services.iter().enumerate() {
            registry::validate::name("service", service)?;
            if services[..i].iter().any(|(s, _)| s == service) {
                return Err(ConfigError::DuplicateService(service.clone()));
            }
        }
        let id = match args.id {
            Some(id) => id,
            None => {
                let host = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default();
                registry::validate::name("id", &host)
                    .map_err(|_| ConfigError::Hostname(host.clone()))?;
                host
            }
        };
        let address = match args.address {
            Some(a) => a,
            None => detect_address(&args.etcd.endpoints).map_err(ConfigError::Address)?,
        };
        let meta = args.meta.into_iter().collect::<BTreeMap<_, _>>();
        let mut instances = Vec::new();
        for (service, port) in services {
            let mut instance = Instance::new(&service, &id, &address, port);
            instance.tags = args.tags.clone();
            instance.meta = meta.clone();
            instance.weight = args.weight;
            instance.validate()?;
            instances.push(instance);
        }

        let mut health = Vec::new();
        for url in &args.health_http {
            health.push(HealthCheck::http(url, args.health_cacert.as_deref())?);
        }
        for addr in &args.health_tcp {
            health.push(HealthCheck::tcp(addr)?);
        }
        for command in &args.health_cmd {
            health.push(HealthCheck::cmd(command)?);
        }
        if args.health_interval.is_zero() || args.health_timeout.is_zero() {
            return Err(ConfigError::HealthTiming);
        }
        Ok(Config {
            etcd: args.etcd,
            prefix: args.prefix,
            instances,
            ttl_secs: ttl_secs as i64,
            health,
            health_interval: args.health_interval,
            health_timeout: args.health_timeout,
            health_fails: args.health_fails,
            health_rises: args.health_rises,
            drain: args.drain,
            kill_timeout: args.kill_timeout,
            metrics_addr: args.metrics_addr.and_then(|m| m.0),
            command: args.command,
        })
    }

    /// (key, JSON value) of each record.
    pub fn records(&self) -> Vec<(String, String)> {
        self.instances
            .iter()
            .map(|i| {
                let key = registry::instance_key(&self.prefix, &i.service, &i.id);
                (key, i.encode())
            })
            .collect()
    }

    /// The keys, comma-separated (logs, systemd status).
    pub fn keys(&self) -> String {
        let keys: Vec<String> = self.records().into_iter().map(|(k, _)| k).collect();
        keys.join(",")
    }
}

/// The local address of the route towards the first etcd endpoint: the address other
/// hosts on that network reach this one on. A UDP `connect` only picks a route; no packet
/// is sent.
fn detect_address(endpoints: &[String]) -> Result<String, String> {
    let endpoint = endpoints.first().ok_or("no etcd endpoint")?;
    let hostport = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let target: SocketAddr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve etcd endpoint {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("etcd endpoint {hostport} has no address"))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    sock.connect(target).map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?.ip();
    if local.is_unspecified() {
        return Err("no route towards etcd".into());
    }
    Ok(local.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut v = vec![
            "registrar",
            "--service",
            "webapp",
            "--id",
            "s1",
            "--port",
            "3000",
        ];
        v.extend_from_slice(extra);
        let a = Args::try_parse_from(v).map_err(|e| e.to_string())?;
        Config::from_args(a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_detection() {
        let c = args(&["--endpoints", "http://127.0.0.1:2379"]).unwrap();
        assert_eq!(c.instances[0].address, "127.0.0.1");
        assert_eq!(c.ttl_secs, 10);
        assert_eq!(c.keys(), "/services/webapp/s1");
        assert!(c.command.is_empty());
    }

    #[test]
    fn exec_mode_and_meta() {
        let c = args(&[
            "--address",
            "10.0.0.5",
            "--meta",
            "zone=a",
            "--tag",
            "v1",
            "--tag",
            "v2",
            "--ttl",
            "2500ms",
            "--",
            "sleep",
            "10",
        ])
        .unwrap();
        assert_eq!(c.command, vec!["sleep", "10"]);
        assert_eq!(c.instances[0].meta["zone"], "a");
        assert_eq!(c.instances[0].tags, vec!["v1", "v2"]);
        assert_eq!(c.ttl_secs, 3);
    }

    #[test]
    fn several_services_share_the_id_address_and_checks() {
        let c = args(&[
            "--address",
            "10.0.0.5",
            "--register",
            "admin:9000",
            "--register",
            "metrics:9100",
            "--health-cmd",
            "true",
            "--health-tcp",
            "127.0.0.1:3000",
        ])
        .unwrap();
        let keys: Vec<(String, u16)> = c
            .instances
            .iter()
            .map(|i| (format!("{}/{}@{}", i.service, i.id, i.address), i.port))
            .collect();
        assert_eq!(
            keys,
            [
                ("webapp/s1@10.0.0.5".to_string(), 3000),
                ("admin/s1@10.0.0.5".to_string(), 9000),
                ("metrics/s1@10.0.0.5".to_string(), 9100),
            ]
        );
        assert_eq!(
            c.keys(),
            "/services/webapp/s1,/services/admin/s1,/services/metrics/s1"
        );
        assert_eq!(c.health.len(), 2);
        // --register alone, no --service/--port.
        let a = Args::try_parse_from([
            "registrar",
            "--id",
            "x",
            "--address",
            "10.0.0.5",
            "--register",
            "a:1",
        ])
        .unwrap();
        assert_eq!(Config::from_args(a).unwrap().keys(), "/services/a/x");
    }

    #[test]
    fn invalid_values_are_refused() {
        for bad in [
            &["--register", "webapp:4000"][..],
            &["--register", "admin"],
            &["--register", "admin:0"],
            &["--register", "ad min:80"],
            &["--health-cmd", " "],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
        let none = Args::try_parse_from(["registrar", "--id", "x", "--address", "10.0.0.5"]);
        assert!(matches!(
            Config::from_args(none.unwrap()),
            Err(ConfigError::NoService)
        ));
        assert!(Args::try_parse_from(["registrar", "--service", "a"]).is_err());
        assert!(Args::try_parse_from(["registrar", "--port", "80"]).is_err());
        for bad in [
            &["--address", "10.0.0.1:3000"][..],
            &["--ttl", "ten"],
            &["--ttl", "1s"],
            &["--meta", "novalue"],
            &["--tag", "a b"],
            &["--weight", "300"],
            &["--health-http", "ftp://x/"],
            &["--health-cacert", "/nonexistent"],
            &["--prefix", "services"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
        let a = Args::try_parse_from(["registrar", "--service", "a b", "--port", "1", "--id", "x"]);
        assert!(Config::from_args(a.unwrap()).is_err());
        assert!(Args::try_parse_from(["registrar", "--service", "a", "--port", "70000"]).is_err());
    }
}
