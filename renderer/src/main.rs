//! renderer binary: parse flags, set up logging and signals, call [`renderer::run`], map the
//! outcome to an exit code (64 bad flags/templates, 1 runtime failure, HAProxy's status in
//! exec mode).
#![forbid(unsafe_code)]

use observe::cli::EX_USAGE;
use renderer::config::{Args, Config};
use tokio_util::sync::CancellationToken;

/// mimalloc: a render at 10 000 instances allocates ~100 000 small objects and frees
/// them again; with glibc's malloc that was a third of the time (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("status") => std::process::exit(status()),
        Some("check") => std::process::exit(check()),
        _ => {}
    }
    let args: Args = observe::cli::parse_or_exit();
    observe::init_logging(args.log_format);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("renderer: error: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    observe::cli::run_and_exit("renderer", 2, async {
        let shutdown = CancellationToken::new();
        let hup = match renderer::signal::install(shutdown.clone()) {
            Ok(hup) => hup,
            Err(e) => {
                eprintln!("renderer: cannot install signal handlers: {e}");
                return 1;
            }
        };
        match renderer::run_with(config, shutdown, Some(hup)).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("renderer: error: {e:#}");
                e.exit_code()
            }
        }
    })
}

/// `renderer check [renderer flags]`: renders every template against the registry and runs
/// its check command, writing nothing; 0 when all pass, 1 otherwise, 64 for bad flags.
fn check() -> i32 {
    let argv = std::iter::once("lb-renderer check".to_string()).chain(std::env::args().skip(2));
    let args: Args = observe::cli::parse_from_or_exit(argv);
    observe::init_logging(args.log_format);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("renderer check: error: {e}");
            return EX_USAGE;
        }
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 1;
    };
    match rt.block_on(renderer::once::check(&config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("renderer check: {e:#}");
            1
        }
    }
}

/// `renderer status [flags]`: prints the report; 0, 1 when etcd cannot be read, 3 when the
/// renderer serves something the registry did not hold at the renderer's own revision.
fn status() -> i32 {
    let argv = std::iter::once("lb-renderer status".to_string()).chain(std::env::args().skip(2));
    let args: renderer::status::StatusArgs = observe::cli::parse_from_or_exit(argv);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 1;
    };
    match rt.block_on(renderer::status::report(&args)) {
        Ok(report) => {
            print!("{}", report.text);
            if report.drift {
                3
            } else {
                0
            }
        }
        Err(e) => {
            eprintln!("renderer status: cannot read the registry: {e}");
            1
        }
    }
}
