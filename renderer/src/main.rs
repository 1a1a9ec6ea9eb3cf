//! renderer binary: parse flags, set up logging and signals, call [`renderer::run`], map the
//! outcome to an exit code (64 bad flags/templates, 1 runtime failure, HAProxy's status in
//! exec mode).
#![forbid(unsafe_code)]

use clap::Parser;
use renderer::config::{Args, Config, LogFormat};
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
    init_logging(args.log_format);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("renderer: error: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("renderer: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        if let Err(e) = renderer::signal::install(shutdown.clone()) {
            eprintln!("renderer: cannot install signal handlers: {e}");
            return 1;
        }
        match renderer::run(config, shutdown).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("renderer: error: {e:#}");
                e.exit_code()
            }
        }
    });
    std::process::exit(code);
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
