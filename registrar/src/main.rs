//! registrar binary: parse flags, set up logging and signals, call [`registrar::run`], map
//! the outcome to an exit code (64 usage/config, 1 runtime failure, the app's status in
//! exec mode).
#![forbid(unsafe_code)]

use clap::Parser;
use registrar::config::{Args, Config, LogFormat};
use tokio_util::sync::CancellationToken;

const EX_USAGE: i32 = 64;

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    observe::init_logging(args.log_format == LogFormat::Json);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registrar: error: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("registrar: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
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
    });
    std::process::exit(code);
}
