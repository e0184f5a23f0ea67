//! sip-dispatch: the controller daemon and its CLI.
use clap::Parser as _;
use sip_dispatch::{cli, commands, docs, run};

fn main() -> std::process::ExitCode {
    sip_dispatch::logging::init();
    abort_on_panic();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line that names the problem; clap's usage hint is one `--help` away.
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
            let first = lines.next().unwrap_or("error: invalid arguments");
            // "the following required arguments were not provided:" lists them below.
            match lines.next().filter(|_| first.ends_with(':')) {
                Some(next) => eprintln!("{first} {}", next.trim()),
                None => eprintln!("{first}"),
            }
            let args: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            return std::process::ExitCode::from(commands::usage_error_status(&args));
        }
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        cli::Command::Run(args) => run::run(*args),
        cli::Command::XdpPass(args) => run::xdp_pass(args),
        cli::Command::Decap(args) => run::decap(args),
        cli::Command::Detach(args) => run::detach(args),
        cli::Command::GenerateDocs { out } => docs::generate(&out),
        command => commands::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<commands::Exit>() => {
            let exit = e.downcast_ref::<commands::Exit>();
            if let Some(m) = exit.map(|x| &x.message).filter(|m| !m.is_empty()) {
                eprintln!("sip-dispatch: {m}");
            }
            std::process::ExitCode::from(exit.map_or(1, |x| x.code))
        }
        Err(e) => {
            // One line that names the problem, with its causes.
            eprintln!(
                "{}sip-dispatch: error: {e:#}",
                sip_dispatch::logging::error_prefix()
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// A panic logs one line and aborts, whatever the profile: unwinding would run drops
/// and cleanup of a daemon in an unknown state, and forwarding must outlive a crash
/// (the pinned link and maps stay; the next daemon adopts them).
fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let line = format!(
            "panic in thread {name}{location}: {}; aborting, XDP stays attached with the last tables",
            message.replace('\n', " ")
        );
        if log::log_enabled!(log::Level::Error) {
            log::error!("{line}");
        } else {
            eprintln!("sip-dispatch: {line}");
        }
        std::process::abort();
    }));
}
