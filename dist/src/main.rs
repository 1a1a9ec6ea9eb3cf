//! `cargo run -p dist -- OUT_DIR`: writes the man pages `lb-renderer.1`, `lb-registrar.1`
//! and bash/zsh completions for both binaries into OUT_DIR (scripts/package.sh puts them
//! into the packages). Everything comes from the clap definitions the binaries parse
//! with, so `--help`, the man page and the completions cannot disagree.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// The binaries as their users see them: each with its subcommand (`lb-renderer status`,
/// `lb-registrar docker`), which the binaries dispatch by hand before clap parses.
fn commands() -> Vec<clap::Command> {
    let renderer = renderer::Args::command()
        .subcommand(renderer::status::StatusArgs::command().name("status"))
        .args_conflicts_with_subcommands(true)
        .disable_help_subcommand(true);
    let registrar = registrar::Args::command()
        .subcommand(registrar::docker::DockerArgs::command().name("docker"))
        .args_conflicts_with_subcommands(true)
        .disable_help_subcommand(true);
    vec![renderer, registrar]
}

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: dist OUT_DIR");
        std::process::exit(64);
    };
    if let Err(e) = generate(&out) {
        eprintln!("dist: {e}");
        std::process::exit(1);
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    for mut cmd in commands() {
        cmd.build();
        let name = cmd.get_name().to_string();
        let man = clap_mangen::Man::new(cmd.clone())
            .section("1")
            .manual("lb-registry")
            .source(format!("lb-registry {}", env!("CARGO_PKG_VERSION")));
        let mut page = Vec::new();
        man.render(&mut page)?;
        // Subcommands get their own sections: the page says all there is to say.
        for sub in cmd.get_subcommands() {
            let mut sub_page = Vec::new();
            let full = format!("{name} {}", sub.get_name());
            clap_mangen::Man::new(sub.clone().bin_name(full))
                .render_options_section(&mut sub_page)?;
            page.extend_from_slice(
                format!(
                    ".SH \"{} {}\"\n",
                    name.to_uppercase(),
                    sub.get_name().to_uppercase()
                )
                .as_bytes(),
            );
            if let Some(about) = sub.get_about() {
                page.extend_from_slice(format!("{about}\n").as_bytes());
            }
            page.extend_from_slice(&demote_heading(&sub_page));
        }
        std::fs::write(out.join(format!("{name}.1")), page)?;
        for (shell, file) in [
            (Shell::Bash, name.clone()),
            (Shell::Zsh, format!("_{name}")),
        ] {
            let mut f = std::fs::File::create(out.join(file))?;
            clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut f);
        }
    }
    Ok(())
}

/// The options section of a subcommand as a subsection (the caller has put a section
/// heading naming the subcommand).
fn demote_heading(section: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(section)
        .replacen(".SH OPTIONS", ".SS Options", 1)
        .into_bytes()
}
