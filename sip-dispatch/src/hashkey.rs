//! The Call-ID hash key as a secret: read from a key file (mode 0600), created with a
//! random key from the OS at first start, and the warnings for keys that are not secret.
//!
//! Who knows the key can compute which backend a Call-ID lands on, and so aim calls at
//! one backend. Dispatchers that must send a Call-ID to the same backend share the file.
use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{ErrorKind, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use sip_dispatch_common::HashKey;

/// Where the key lives unless `--hash-key-file` says otherwise.
pub const DEFAULT_KEY_FILE: &str = "/var/lib/sip-dispatch/hash-key";

/// Longest key file read (a key is 32 hex digits and a newline).
const MAX_KEY_FILE: u64 = 256;

/// Where the key in force came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// `--hash-key` on the command line.
    Flag,
    /// `hash-key` in the config file.
    ConfigFile,
    /// Read from this key file.
    KeyFile(PathBuf),
    /// This key file does not exist yet: the key is fresh from the OS random source and
    /// [`persist`] writes it at start.
    NewKeyFile(PathBuf),
}

/// The key of `path`: `Ok(None)` when the file does not exist. Refuses a file that is
/// not a regular file, is readable or writable by group or others, or does not hold
/// exactly 32 hex digits (and an optional newline). Errors never show the file's text.
///
/// A symbolic link is followed (the key may live in a secret store linked into place);
/// what it points to must pass the same checks. The type is checked before the file is
/// opened, and opening never blocks (`O_NONBLOCK`): a FIFO or device at the path is
/// refused instead of hanging the start.
pub fn read(path: &Path) -> anyhow::Result<Option<HashKey>> {
    let not_regular = || anyhow::anyhow!("hash key file {} is not a regular file", path.display());
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(not_regular()),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                bail!(
                    "hash key file {} is a symbolic link to a missing file",
                    path.display()
                );
            }
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("hash key file {}", path.display())),
    }
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("hash key file {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("hash key file {}", path.display()))?;
    // Again on what was opened: the path may have been replaced since the check above.
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "hash key file {} has mode {mode:04o}: group and others must have no access (chmod 600 {})",
            path.display(),
            path.display()
        );
    }
    let mut text = Vec::new();
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut text)
        .with_context(|| format!("reading hash key file {}", path.display()))?;
    let digits = text.strip_suffix(b"\n").unwrap_or(&text);
    match std::str::from_utf8(digits).ok().and_then(HashKey::from_hex) {
        Some(key) => Ok(Some(key)),
        None => bail!(
            "hash key file {} is malformed: expected 32 hex digits and a newline ({} bytes found)",
            path.display(),
            text.len()
        ),
    }
}

/// A new key from the OS random source.
pub fn generate() -> anyhow::Result<HashKey> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("reading the OS random source for a hash key: {e}"))?;
    Ok(HashKey::from_bytes(bytes))
}

/// `bytes` as lower-case hex digits, two per byte.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `key` as the 32 hex digits of a key file.
pub fn to_hex(key: HashKey) -> String {
    hex(&key.to_bytes())
}

/// Writes `key` to `path` unless it exists, atomically (a temporary file of mode 0600
/// linked into place), creating the directory with mode 0700 when missing. Returns the
/// key now in the file: another process that wrote it first wins.
pub fn persist(path: &Path, key: HashKey) -> anyhow::Result<HashKey> {
    let text = format!("{}\n", to_hex(key));
    match write_private(path, text.as_bytes(), Placing::LinkIfMissing) {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read(path)?
            .with_context(|| format!("hash key file {} vanished while writing", path.display())),
        Err(e) => Err(e).with_context(|| format!("writing hash key file {}", path.display())),
    }
}

/// How [`write_private`] puts the finished temporary file in place.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Placing {
    /// Linked in: fails with `AlreadyExists` when `path` exists (the first writer wins).
    LinkIfMissing,
    /// Renamed over whatever `path` holds.
    Replace,
}

/// Writes `bytes` to `path` atomically: a temporary file of mode 0600 in the same
/// directory, synced, then put in place and the directory synced, so a crash leaves
/// the old file or the new one, never a part. Creates the directory with mode 0700 when
/// missing.
pub fn write_private(path: &Path, bytes: &[u8], placing: Placing) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let placed = written.and_then(|()| match placing {
        Placing::LinkIfMissing => std::fs::hard_link(&tmp, path),
        Placing::Replace => std::fs::rename(&tmp, path),
    });
    let _ = std::fs::remove_file(&tmp);
    placed?;
    // The file is complete either way; a directory that cannot be synced only makes
    // the rename less durable.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The key in force in the maps a previous daemon left pinned in `pin_dir`, if any: a
/// first start with a key file on a host that still forwards with an older daemon's
/// key (an upgrade from a release without key files) keeps that key, so calls in
/// progress stay where they are.
pub fn pinned_key(pin_dir: &Path) -> Option<HashKey> {
    use aya::maps::{Array, Map, MapData};
    let path = pin_dir.join(sip_dispatch_common::MAP_CONFIG);
    if !path.exists() {
        return None;
    }
    let read = || -> anyhow::Result<HashKey> {
        let data = MapData::from_pin(&path)?;
        let config: Array<MapData, sip_dispatch_common::Config> =
            Array::try_from(Map::Array(data))?;
        let [k0, k1] = config.get(&0, 0)?.hash_key;
        Ok(HashKey { k0, k1 })
    };
    match read() {
        Ok(key) if key != (HashKey { k0: 0, k1: 0 }) => Some(key),
        Ok(_) => None,
        Err(e) => {
            log::warn!("reading the hash key pinned in {}: {e:#}", path.display());
            None
        }
    }
}

/// What an operator should hear at start about `key` from `origin`, one line each.
pub fn warnings(key: HashKey, origin: &KeyOrigin) -> Vec<String> {
    let mut out = Vec::new();
    if origin == &KeyOrigin::Flag {
        out.push(
            "the hash key is given with --hash-key: every local user can read it in \
             /proc/PID/cmdline; put it in a --hash-key-file (mode 0600) instead"
                .to_owned(),
        );
    }
    if key == HashKey::DEFAULT {
        out.push(format!(
            "the hash key is the built-in public key {}: anyone can compute which backend \
             a Call-ID goes to and aim calls at one backend; use a secret key (--hash-key-file)",
            to_hex(key)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-hashkey-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write(path: &Path, text: &[u8], mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn first_start_creates_the_file_and_later_starts_reuse_it() {
        let d = dir("create");
        let path = d.join("sub").join("hash-key");
        assert_eq!(read(&path).unwrap(), None);
        let key = generate().unwrap();
        assert_ne!(key, generate().unwrap(), "two random keys differ");
        assert_eq!(persist(&path, key).unwrap(), key);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&d.join("sub")), 0o700);
        assert_eq!(read(&path).unwrap(), Some(key));
        // A second start (or a race lost) keeps the key already there.
        let other = generate().unwrap();
        assert_eq!(persist(&path, other).unwrap(), key);
        assert_eq!(read(&path).unwrap(), Some(key));
        assert_eq!(
            std::fs::read_dir(d.join("sub")).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_key_file_is_32_hex_digits() {
        let d = dir("format");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("k");
        write(&path, b"000102030405060708090a0b0c0d0e0f\n", 0o600);
        assert_eq!(
            read(&path).unwrap(),
            HashKey::from_hex("000102030405060708090a0b0c0d0e0f")
        );
        write(&path, b"000102030405060708090A0B0C0D0E0F", 0o400);
        assert!(read(&path).unwrap().is_some(), "no newline, upper case");
        for bad in [
            &b""[..],
            b"\n",
            b"0001020304050607",
            b"000102030405060708090a0b0c0d0e0fff\n",
            b"000102030405060708090a0b0c0d0e0g\n",
            b"000102030405060708090a0b0c0d0e0f\n\n",
            b" 000102030405060708090a0b0c0d0e0f\n",
            b"\xff\xfe000102030405060708090a0b0c0d0e",
        ] {
            write(&path, bad, 0o600);
            let e = format!("{:#}", read(&path).unwrap_err());
            assert!(
                e.contains(&path.display().to_string()) && e.contains("malformed"),
                "{bad:?}: {e}"
            );
            assert!(!e.contains("0a0b"), "the error shows no key material: {e}");
        }
        let big = vec![b'0'; 100_000];
        write(&path, &big, 0o600);
        assert!(read(&path).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        let d = dir("mode");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("k");
        for mode in [0o640, 0o604, 0o644, 0o660, 0o606, 0o601] {
            write(&path, b"000102030405060708090a0b0c0d0e0f\n", mode);
            let e = format!("{:#}", read(&path).unwrap_err());
            assert!(
                e.contains(&path.display().to_string()) && e.contains(&format!("{mode:04o}")),
                "{mode:o}: {e}"
            );
        }
        let e = format!("{:#}", read(&d).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_at_once_and_a_symlink_is_followed() {
        let d = dir("types");
        std::fs::create_dir_all(&d).unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: opening it for reading would block forever.
        let e = format!("{:#}", read(&fifo).unwrap_err());
        assert_eq!(
            e,
            format!("hash key file {} is not a regular file", fifo.display())
        );
        let target = d.join("target");
        write(&target, b"000102030405060708090a0b0c0d0e0f\n", 0o600);
        let link = d.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read(&link).unwrap(), read(&target).unwrap());
        let to_fifo = d.join("to-fifo");
        std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
        assert!(format!("{:#}", read(&to_fifo).unwrap_err()).contains("not a regular file"));
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
        let e = format!("{:#}", read(&dangling).unwrap_err());
        assert!(e.contains("symbolic link to a missing file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hex_is_two_lower_case_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0, 0x0a, 0xff]), "000aff");
    }

    #[test]
    fn keys_that_are_not_secret_are_warned_about() {
        let secret = HashKey::from_hex("000102030405060708090a0b0c0d0e0f").unwrap();
        let file = KeyOrigin::KeyFile("/k".into());
        assert!(warnings(secret, &file).is_empty());
        let w = warnings(secret, &KeyOrigin::Flag);
        assert!(w.len() == 1 && w[0].contains("/proc/PID/cmdline"), "{w:?}");
        let w = warnings(HashKey::DEFAULT, &file);
        assert!(
            w.len() == 1 && w[0].contains("7369702d64697370617463682d763121"),
            "{w:?}"
        );
        assert_eq!(warnings(HashKey::DEFAULT, &KeyOrigin::Flag).len(), 2);
        assert_eq!(to_hex(HashKey::DEFAULT), "7369702d64697370617463682d763121");
    }
}
