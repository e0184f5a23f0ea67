//! sip-dispatch: the controller daemon and its CLI.
use clap::Parser as _;
use sip_dispatch::{cli, commands, run};

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .format_timestamp_millis()
        .init();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line that names the problem; clap's usage hint is one `--help` away.
            let rendered = e.render().to_string();
            eprintln!(
                "{}",
                rendered
                    .lines()
                    .next()
                    .unwrap_or("error: invalid arguments")
            );
            return std::process::ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        cli::Command::Run(args) => run::run(*args),
        cli::Command::XdpPass(args) => run::xdp_pass(args),
        cli::Command::Detach(args) => run::detach(args),
        command => commands::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that names the problem, with its causes.
            eprintln!("sip-dispatch: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
