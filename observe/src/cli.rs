//! The start-up both binaries share: parse flags (usage errors exit 64, `--help` and
//! `--version` exit 0), and run the async main on a runtime, mapping its result to the
//! process exit code.

use std::future::Future;

/// EX_USAGE: bad flags or configuration.
pub const EX_USAGE: i32 = 64;

/// Parses the command line, or prints clap's message and exits (64 on errors).
pub fn parse_or_exit<T: clap::Parser>() -> T {
    parse_from_or_exit(std::env::args_os())
}

/// [`parse_or_exit`] for a subcommand's own arguments (`argv[0]` is its name).
pub fn parse_from_or_exit<T, I, A>(argv: I) -> T
where
    T: clap::Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    match T::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

/// Runs `main` on a multi-threaded runtime with `threads` workers and exits with the code
/// it returns (1 if the runtime cannot start).
pub fn run_and_exit<F: Future<Output = i32>>(name: &str, threads: usize, main: F) -> ! {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(main);
    std::process::exit(code)
}

/// `--version`: the package version and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LB_COMMIT"), ")");

/// A `--metrics-addr` value: `HOST:PORT`, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

/// Parses a `--metrics-addr` flag: `HOST:PORT`, or `off` (or empty) for none. One parser
/// for every binary, so the same value means the same thing everywhere.
pub fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s.trim() {
        "off" | "" => Ok(MetricsAddr(None)),
        a => a
            .parse()
            .map(|a| MetricsAddr(Some(a)))
            .map_err(|_| format!("{a:?}: expected HOST:PORT (e.g. 127.0.0.1:9105) or \"off\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_off_or_host_port() {
        assert_eq!(parse_metrics_addr("off"), Ok(MetricsAddr(None)));
        assert_eq!(parse_metrics_addr(""), Ok(MetricsAddr(None)));
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9105")
                .unwrap()
                .0
                .unwrap()
                .port(),
            9105
        );
        assert!(parse_metrics_addr("[::1]:9").unwrap().0.is_some());
        assert!(parse_metrics_addr("localhost").is_err());
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
    }
}
