//! Log lines on stderr: `[time LEVEL] message` on a terminal or in a file, and
//! `<N>message` when stderr is the journal (systemd's `JOURNAL_STREAM`), where the
//! journal adds the time itself and reads the `<N>` syslog priority (sd-daemon(3)).
use std::io::Write as _;

use log::Level;

/// Sets up the global logger from `RUST_LOG` (default `info`).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if stderr_is_journal() {
        builder
            .format(|buf, record| writeln!(buf, "{}", journal_line(record.level(), record.args())));
    } else {
        builder.format_target(false).format_timestamp_millis();
    }
    builder.init();
}

/// What starts the daemon's last line, the one that says why it failed (written with
/// `eprintln!`, not the logger): `<3>` (error) when stderr is the journal.
pub fn error_prefix() -> &'static str {
    if stderr_is_journal() { "<3>" } else { "" }
}

/// The syslog priority sd-daemon(3) reads from the start of a journal line.
pub fn journal_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One journal line: the priority prefix and the message, without a time or a level
/// name (the journal keeps both).
pub fn journal_line(level: Level, message: &std::fmt::Arguments<'_>) -> String {
    format!("<{}>{message}", journal_priority(level))
}

/// Whether `JOURNAL_STREAM` (`DEV:INODE`, set by systemd for the service's own
/// stdout/stderr) names the file stderr is now: a child whose stderr was redirected
/// inherits the variable, and must not write journal lines into a file.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer it is given, which lives across the
    // call; it is read only after fstat reports success.
    if unsafe { libc::fstat(libc::STDERR_FILENO, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    names_stream(&value.to_string_lossy(), st.st_dev, st.st_ino)
}

/// `JOURNAL_STREAM`'s `DEV:INODE` against a file's device and inode numbers.
pub fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use log::Log as _;

    use super::*;

    /// A writer the logger can own while the test reads what it wrote.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_carry_a_priority_and_no_time() {
        let out = Shared::default();
        let logger = env_logger::Builder::new()
            .filter_level(log::LevelFilter::Trace)
            .format(|buf, record| writeln!(buf, "{}", journal_line(record.level(), record.args())))
            .target(env_logger::Target::Pipe(Box::new(out.clone())))
            .build();
        for (level, text) in [
            (Level::Error, "reload (SIGHUP): bad key"),
            (Level::Warn, "the built-in hash key is in use"),
            (Level::Info, "dispatching 198.18.0.100:5060 on eth1"),
            (Level::Debug, "probe"),
            (Level::Trace, "frame"),
        ] {
            logger.log(
                &log::Record::builder()
                    .level(level)
                    .target("sip_dispatch::controller")
                    .args(format_args!("{text}"))
                    .build(),
            );
        }
        logger.flush();
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            written,
            "<3>reload (SIGHUP): bad key\n\
             <4>the built-in hash key is in use\n\
             <6>dispatching 198.18.0.100:5060 on eth1\n\
             <7>probe\n\
             <7>frame\n"
        );
    }

    #[test]
    fn journal_stream_must_name_this_file() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(!names_stream("8:12345", 8, 12346));
        assert!(!names_stream("9:12345", 8, 12345));
        assert!(!names_stream("", 8, 12345));
        assert!(!names_stream("8", 8, 12345));
        assert!(!names_stream("x:y", 8, 12345));
    }
}
