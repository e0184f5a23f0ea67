//! `sip-dispatch generate-docs --out DIR` (hidden; packaging): man pages and shell
//! completions from the clap definitions, so they never drift from `--help`.
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

/// The binary's name, in completions and man page names.
const NAME: &str = "sip-dispatch";

/// Writes `DIR/man/sip-dispatch.1` and one page per subcommand
/// (`sip-dispatch-run.1`, `sip-dispatch-backends-drain.1`, ...), and
/// `DIR/completions/{sip-dispatch.bash,_sip-dispatch,sip-dispatch.fish}`.
pub fn generate(out: &Path) -> anyhow::Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    clap_mangen::generate_to(public_command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;

    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut public_command(), NAME, &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}

/// The command line without its hidden subcommands: clap_complete would offer them.
fn public_command() -> clap::Command {
    let full = Cli::command();
    let public = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect::<Vec<_>>();
    clap::Command::new(NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .subcommand_required(true)
        .subcommands(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_cover_the_subcommands_and_hide_this_one() {
        let dir = std::env::temp_dir().join(format!("sd-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate(&dir).unwrap();
        let man = |name: &str| std::fs::read_to_string(dir.join("man").join(name)).unwrap();
        assert!(man("sip-dispatch.1").contains("sip\\-dispatch\\-run(1)"));
        assert!(man("sip-dispatch-run.1").contains("\\-\\-keep\\-attached"));
        assert!(man("sip-dispatch-backends-drain.1").contains("\\-\\-wait"));
        assert!(!dir.join("man/sip-dispatch-generate-docs.1").exists());
        for file in ["sip-dispatch.bash", "_sip-dispatch", "sip-dispatch.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(file)).unwrap();
            assert!(text.contains("keep-attached"), "{file}");
            assert!(!text.contains("generate-docs"), "{file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The example the package installs (examples/eth1.toml) is a config the daemon
    /// accepts, given the flags the unit adds.
    #[test]
    fn the_packaged_example_config_is_valid() {
        use clap::Parser as _;
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/eth1.toml");
        let cli = Cli::try_parse_from([
            "sip-dispatch",
            "run",
            "--config",
            example,
            "--iface",
            "eth1",
            "--keep-attached",
        ])
        .unwrap();
        let crate::cli::Command::Run(args) = cli.command else {
            unreachable!()
        };
        let vip: std::net::IpAddr = "198.18.0.100".parse().unwrap();
        let settings = crate::config::Settings::resolve_on_host(&args, &[vip]).unwrap();
        assert_eq!(settings.iface, "eth1");
        assert!(settings.keep_attached);
    }
}
