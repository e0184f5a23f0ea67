//! Running short-lived commands (`ip`, `ethtool`, ...) and turning failures into errors
//! that name the command line and quote its stderr.
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// The command line of `cmd` as a shell user would type it (for error messages).
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        s.push(' ');
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
            s.push_str(&format!("'{}'", arg.replace('\'', r"'\''")));
        } else {
            s.push_str(&arg);
        }
    }
    s
}

/// Runs `cmd` to completion (stdin closed) and returns its output; a non-zero exit status
/// is an error carrying the command line and stderr.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` and returns its stdout as text (see [`output`]).
pub fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output(cmd)?.stdout).into_owned())
}

/// Runs `program args...` and checks it succeeded.
pub fn run<I, S>(program: &str, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    output(Command::new(program).args(args)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_line_and_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c 'echo oops >&2; exit 3'"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn stdout_is_returned() {
        assert_eq!(stdout(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }
}
