//! registrar binary: parse flags, set up logging and signals, call [`registrar::run`], map
//! the outcome to an exit code (64 usage/config, 1 runtime failure, the app's status in
//! exec mode).
#![forbid(unsafe_code)]

use observe::cli::EX_USAGE;
use registrar::config::{Args, Config};
use tokio_util::sync::CancellationToken;

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "docker") {
        docker_main();
    }
    let args: Args = observe::cli::parse_or_exit();
    observe::init_logging(args.log_format);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registrar: error: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    observe::cli::run_and_exit("registrar", 1, async {
        let shutdown = CancellationToken::new();
        let (forward, stop_signal) = match registrar::signal::install(shutdown.clone()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("registrar: cannot install signal handlers: {e}");
                return 1;
            }
        };
        let signals = registrar::Signals {
            forward,
            stop_signal,
        };
        match registrar::run(config, shutdown, signals).await {
            Ok(code) => code,
            Err(e @ registrar::Error::EtcdSetup(_)) => {
                eprintln!("registrar: error: {e:#}");
                EX_USAGE
            }
            Err(e) => {
                eprintln!("registrar: error: {e:#}");
                1
            }
        }
    })
}

/// `registrar docker …`: the daemon that registers labelled containers.
fn docker_main() -> ! {
    use registrar::docker::{daemon, DockerArgs, DockerConfig};
    let args: DockerArgs = observe::cli::parse_from_or_exit(std::env::args_os().skip(1));
    observe::init_logging(args.log_format);
    let config = match DockerConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registrar docker: error: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    observe::cli::run_and_exit("registrar docker", 2, async {
        let shutdown = CancellationToken::new();
        let hup = match registrar::signal::install_daemon(shutdown.clone()) {
            Ok(hup) => hup,
            Err(e) => {
                eprintln!("registrar docker: cannot install signal handlers: {e}");
                return 1;
            }
        };
        match daemon::run(config, shutdown, hup).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("registrar docker: error: {e}");
                EX_USAGE
            }
        }
    })
}
