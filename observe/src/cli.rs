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
