//! The PID file, replaced atomically.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;

/// Writes `pid` to `path` atomically: a temporary file in the same
/// directory (mode 0644, a name no other user can predict, created
/// exclusively) takes the place of `path` (see [`replace`]).
///
/// Not synced to disk (no `fsync` of the file or the directory): a PID
/// file needs atomic replacement, which `rename` gives, not durability
/// across a power loss, after which the PID it names means nothing. On a
/// disk-backed directory the two `fsync`s cost readiness about 2 ms
/// (BENCHMARKS.md, "Readiness and the PID file's disk").
///
/// A reader sees either the old or the new content, never a partial one.
/// Neither `rename` nor the exchange follows a symlink at `path` (the
/// symlink itself is replaced), so a symlink planted at the PID file's
/// path can never redirect the write.
pub(crate) fn write(path: &Path, pid: u32) -> Result<()> {
    let fail = |source: std::io::Error| Error::PidFile {
        path: path.to_owned(),
        source,
    };
    let dir = directory_of(path);
    let file_name = path.file_name().ok_or_else(|| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{:016x}.tmp", random()));
        let tmp = dir.join(tmp_name);
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp);
        match opened {
            Ok(file) => break (tmp, file),
            // Someone made that name meanwhile: another one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 8 => {
                attempts += 1;
            }
            Err(e) => return Err(fail(e)),
        }
    };
    let result = (|| {
        // The umask may have narrowed the mode: set it exactly.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        // One write(2), not one per formatted piece.
        file.write_all(format!("{pid}\n").as_bytes())?;
        replace(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

/// Puts the file `tmp` in the place of `path`, atomically: a reader of
/// `path` finds the previous content or the new one, never a partial or
/// missing file.
///
/// Where it can, by exchanging the two names (`renameat2` with
/// `RENAME_EXCHANGE`, rename(2), Linux 3.15) and then removing the
/// previous file, now under `tmp`'s name. A plain `rename` over an
/// existing file makes ext4 write the new file's data out then and there
/// (its `auto_da_alloc` default, ext4(5)): 0.3–0.4 ms of disk before the
/// new generation could say it is ready, which a PID file (meaningless
/// after a reboot) does not need. The exchange is not the pattern ext4
/// flushes for. A plain `rename` where the exchange is not possible: no
/// file at `path` yet, or a filesystem or kernel without it.
fn replace(tmp: &Path, path: &Path) -> std::io::Result<()> {
    match sys::rename_exchange(tmp, path) {
        Ok(()) => match fs::remove_file(tmp) {
            Ok(()) => Ok(()),
            // What was at `path` is no file (a directory, say): put it
            // back, and let `rename` refuse as it always did.
            Err(_) => {
                sys::rename_exchange(tmp, path)?;
                fs::rename(tmp, path)
            }
        },
        Err(_) => fs::rename(tmp, path),
    }
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// 64 unpredictable bits, from the standard library's randomly seeded
/// hasher (no dependency for a file name).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// Checks that this process will be able to replace the PID file at
/// `path`, for the conditions that never go away by themselves: a
/// directory this user cannot write (privileges dropped, a root-owned
/// `/run`), or a file another user owns in a sticky directory such as
/// `/tmp` (planted there first, it would make every `ready()` fail). A
/// missing directory is not checked here: it may yet be created.
///
/// # Errors
///
/// [`Error::PidFile`], saying which condition holds and what to do.
pub(crate) fn check(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let fail = |why: String| Error::PidFile {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
    };
    let dir = directory_of(path);
    let Ok(dir_meta) = fs::metadata(&dir) else {
        return Ok(());
    };
    if !dir_meta.is_dir() {
        return Ok(());
    }
    let euid = nix::unistd::geteuid();
    let access = nix::unistd::faccessat(
        nix::fcntl::AT_FDCWD,
        &dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    );
    if access.is_err() {
        return Err(fail(format!(
            "its directory {} is not writable by this process (uid {euid}), so the PID file can never be replaced; if the service drops privileges after it starts, give that user a directory of its own (systemd's RuntimeDirectory=, /run/<service>/)",
            dir.display()
        )));
    }
    const S_ISVTX: u32 = 0o1000;
    let sticky = dir_meta.mode() & S_ISVTX != 0;
    if let Ok(file) = fs::symlink_metadata(path) {
        let mine = file.uid() == euid.as_raw() || dir_meta.uid() == euid.as_raw();
        if sticky && !mine && !euid.is_root() {
            return Err(fail(format!(
                "it belongs to uid {} in the sticky directory {}, where this process (uid {euid}) can never replace it; remove it, or use a directory of the service's own (systemd's RuntimeDirectory=, /run/<service>/) rather than a shared one such as /tmp",
                file.uid(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Whether the PID file at `path` names `pid`.
pub(crate) fn names(path: &Path, pid: u32) -> bool {
    fs::read_to_string(path).is_ok_and(|content| content.trim() == pid.to_string())
}

/// Removes the PID file if it still names `pid`.
pub(crate) fn remove_if_ours(path: &Path, pid: u32) {
    if names(path, pid) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tableflip-pidfile-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert!(fs::create_dir_all(&dir).is_ok());
        dir
    }

    #[test]
    fn writes_pid_with_mode_0644() {
        let dir = scratch("mode");
        let path = dir.join("svc.pid");
        assert!(write(&path, 1234).is_ok());
        assert_eq!(fs::read_to_string(&path).ok().as_deref(), Some("1234\n"));
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o644));
        assert!(write(&path, 99).is_ok());
        assert_eq!(fs::read_to_string(&path).ok().as_deref(), Some("99\n"));
        let leftovers = fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(leftovers, 1, "no temporary file is left behind");
        // A temporary name someone planted does not stop the write.
        for _ in 0..3 {
            assert!(write(&path, 5).is_ok());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn never_follows_a_symlink() {
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        assert!(fs::write(&victim, "precious").is_ok());
        let path = dir.join("svc.pid");
        assert!(std::os::unix::fs::symlink(&victim, &path).is_ok());
        assert!(write(&path, 7).is_ok());
        assert_eq!(
            fs::read_to_string(&victim).ok().as_deref(),
            Some("precious")
        );
        assert_eq!(fs::read_to_string(&path).ok().as_deref(), Some("7\n"));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A directory where the PID file should be is refused, and left in
    /// place with its content (the exchange puts it back), with no
    /// temporary file left behind.
    #[test]
    fn a_directory_at_the_path_is_refused_and_left_in_place() {
        let dir = scratch("directory");
        let path = dir.join("svc.pid");
        assert!(fs::create_dir(&path).is_ok());
        assert!(fs::write(path.join("inside"), "kept").is_ok());
        let err = write(&path, 7)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("svc.pid"), "{err}");
        assert_eq!(
            fs::read_to_string(path.join("inside")).ok().as_deref(),
            Some("kept")
        );
        let names: Vec<String> = fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(names, ["svc.pid"], "nothing else in the directory");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let err = write(Path::new("/nonexistent-tableflip-dir/x.pid"), 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/nonexistent-tableflip-dir/x.pid"), "{err}");
    }
}
