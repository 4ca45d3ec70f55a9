//! How this process was started, so that the next generation starts the
//! same way: its arguments, its environment, the directory it started in
//! and its executable, each recorded as the *path* that named it.
//!
//! Paths, not what they resolved to: in a release layout such as
//! `/srv/app/current -> releases/v41`, a service started as
//! `cd /srv/app/current && ./app` must, once `current` points at
//! `releases/v42`, start v42's binary in v42's directory. The kernel
//! resolves symlinks at `exec` and `chdir` time, so recording the logical
//! paths at startup and resolving them again at upgrade time is all it
//! takes.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::unixfile::FileId;
use crate::{protocol, sys, systemd};

/// How this process was started.
#[derive(Debug)]
pub(crate) struct Launch {
    /// `argv`, `argv[0]` included.
    pub(crate) args: Vec<OsString>,
    /// The environment, without the variables of tableflip's protocol and
    /// of socket activation (they describe fds passed to this process
    /// only).
    pub(crate) env: Vec<(OsString, OsString)>,
    /// The directory the service started in, as the shell named it (see
    /// [`logical_dir`]).
    pub(crate) start_dir: PathBuf,
    /// What the next generation runs.
    pub(crate) exe: Executable,
}

/// The executable the next generation runs, chosen at startup.
#[derive(Debug, Clone)]
pub(crate) enum Executable {
    /// A path (absolute, or relative to the start directory), resolved
    /// again at each upgrade, so that a binary replaced at that path is
    /// what runs next.
    Path {
        path: PathBuf,
        /// Where it came from, for the log.
        from: &'static str,
    },
    /// No path names this program's executable.
    Unknown { why: String },
}

impl Launch {
    /// Records how this process was started. `executable` is
    /// `Options::executable`.
    pub(crate) fn capture(executable: Option<&Path>) -> Result<Launch> {
        let cwd = std::env::current_dir()
            .map_err(|e| Error::io("cannot read the current working directory", e))?;
        let pwd = std::env::var_os("PWD");
        let start_dir = logical_dir(&cwd, pwd.as_deref());
        let args: Vec<OsString> = std::env::args_os().collect();
        let env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !is_protocol_var(k))
            .collect();
        let exe = match executable {
            Some(p) => Executable::Path {
                path: start_dir.join(p),
                from: "Options::executable",
            },
            None => {
                let path_var = env
                    .iter()
                    .find(|(k, _)| k == OsStr::new("PATH"))
                    .map(|(_, v)| v.clone());
                choose_executable(
                    &Candidates {
                        exec_fn: sys::exec_fn(),
                        argv0: args.first().cloned(),
                        path_var,
                        running: running_executable(),
                    },
                    &start_dir,
                    |p| is_executable(p).then(|| FileId::of_path(p).ok()).flatten(),
                )
            }
        };
        match &exe {
            Executable::Path { path, from } => {
                tracing::debug!(executable = %path.display(), from, start_dir = %start_dir.display(), "the next generation will run this executable");
            }
            Executable::Unknown { why } => {
                tracing::warn!(
                    "{why}; upgrades will fail until Options::executable names the binary"
                );
            }
        }
        Ok(Launch {
            args,
            env,
            start_dir,
            exe,
        })
    }

    /// The executable to start now, after checking that the start
    /// directory still exists.
    ///
    /// # Errors
    ///
    /// [`Error::StartDirectory`] when the start directory is gone;
    /// [`Error::NoExecutable`] when no path names the executable.
    pub(crate) fn executable(&self) -> Result<PathBuf> {
        self.check_start_dir()?;
        match &self.exe {
            Executable::Path { path, .. } => Ok(self.start_dir.join(path)),
            Executable::Unknown { why } => Err(Error::NoExecutable {
                reason: why.clone(),
            }),
        }
    }

    fn check_start_dir(&self) -> Result<()> {
        match std::fs::metadata(&self.start_dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::StartDirectory {
                path: self.start_dir.clone(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            }),
            Err(e) => Err(Error::StartDirectory {
                path: self.start_dir.clone(),
                source: explain_missing(&self.start_dir, e),
            }),
        }
    }

    /// A path relative to the start directory made absolute (an absolute
    /// one is returned as it is).
    pub(crate) fn resolve(&self, path: &Path) -> PathBuf {
        self.start_dir.join(path)
    }

    /// Where the control socket is (`Options::control_socket`, against
    /// this launch's `$RUNTIME_DIRECTORY` and start directory), if any.
    pub(crate) fn control_socket(&self, wanted: &crate::ctl::ControlSocket) -> Option<PathBuf> {
        let runtime_dir = self
            .env
            .iter()
            .find(|(k, _)| k == "RUNTIME_DIRECTORY")
            .map(|(_, v)| v.as_os_str());
        Some(self.resolve(&wanted.resolve(runtime_dir)?))
    }
}

/// Whether `key` is a variable of tableflip's protocol or of socket
/// activation: never handed to the next generation as it is.
fn is_protocol_var(key: &OsStr) -> bool {
    key == OsStr::new(protocol::ENV_HANDOVER)
        || key == OsStr::new(protocol::ENV_HANDOVER_ID)
        || key == OsStr::new(protocol::ENV_HANDOVER_SOCKET)
        || systemd::LISTEN_VARS.iter().any(|v| key == OsStr::new(v))
}

/// The directory the process started in, as a path that the next
/// generation can resolve again: `$PWD` when it is an absolute path that
/// names the same directory as `getcwd()` (shells set it so, keeping the
/// symlinks the user went through, as `pwd -L` prints), else `getcwd()`.
pub(crate) fn logical_dir(cwd: &Path, pwd: Option<&OsStr>) -> PathBuf {
    let Some(pwd) = pwd.map(Path::new) else {
        return cwd.to_owned();
    };
    // As POSIX `pwd -L`: absolute, and no `.` or `..` component.
    let clean = pwd.is_absolute()
        && pwd
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !clean {
        return cwd.to_owned();
    }
    match (FileId::of_path(pwd), FileId::of_path(cwd)) {
        (Ok(a), Ok(b)) if a == b => pwd.to_owned(),
        _ => cwd.to_owned(),
    }
}

/// Where the path of this program's executable may be found.
#[derive(Debug, Default)]
pub(crate) struct Candidates {
    /// The path `execve` was called with (`AT_EXECFN` on Linux).
    pub(crate) exec_fn: Option<OsString>,
    pub(crate) argv0: Option<OsString>,
    pub(crate) path_var: Option<OsString>,
    /// The running executable: its path as the kernel resolved it, and
    /// its identity.
    pub(crate) running: Option<(PathBuf, FileId)>,
}

/// Chooses the executable of the next generation (`identity` gives the
/// identity of an executable file, `None` for anything else): the first
/// path that
/// names the running executable, among the path `execve` was called with,
/// `argv[0]` (resolved against the start directory, or through `PATH` when
/// it has no `/`), and the running executable's own path. Never a path
/// that names another program: `argv[0]` may be any name (`exec -a`,
/// systemd's `ExecStart=@…`, process renaming), and a program of that name
/// on `PATH` must not be started with the service's sockets.
pub(crate) fn choose_executable(
    c: &Candidates,
    start_dir: &Path,
    identity: impl Fn(&Path) -> Option<FileId>,
) -> Executable {
    let Some((running_path, running_id)) = &c.running else {
        // Nothing to compare with: argv[0] as before, unverified.
        return match c
            .argv0
            .as_deref()
            .and_then(|a| resolve_argv0(a, start_dir, c.path_var.as_deref(), &identity))
        {
            Some(path) => Executable::Path {
                path,
                from: "argv[0] (unverified: the running executable is unknown)",
            },
            None => Executable::Unknown {
                why: "neither argv[0] nor the system names this program's executable".to_owned(),
            },
        };
    };
    let is_running = |p: &Path| identity(&start_dir.join(p)) == Some(*running_id);
    if let Some(exec_fn) = c.exec_fn.as_deref().filter(|p| !p.is_empty()) {
        let p = Path::new(exec_fn);
        if is_running(p) {
            return Executable::Path {
                path: p.to_owned(),
                from: "the path it was started with",
            };
        }
    }
    if let Some(argv0) = c.argv0.as_deref() {
        if let Some(p) = resolve_argv0(argv0, start_dir, c.path_var.as_deref(), &identity) {
            if is_running(&p) {
                return Executable::Path {
                    path: p,
                    from: "argv[0]",
                };
            }
        }
        tracing::info!(
            argv0 = ?argv0,
            executable = %running_path.display(),
            "argv[0] does not name this program's executable; upgrades start the executable it was started from"
        );
    }
    Executable::Path {
        path: running_path.clone(),
        from: "the running executable",
    }
}

/// `argv[0]` as a shell resolves a command: a name with a `/` against the
/// start directory, a bare name through `PATH` (the first executable
/// file).
fn resolve_argv0(
    argv0: &OsStr,
    start_dir: &Path,
    path_var: Option<&OsStr>,
    identity: &impl Fn(&Path) -> Option<FileId>,
) -> Option<PathBuf> {
    if argv0.is_empty() {
        return None;
    }
    if argv0.as_encoded_bytes().contains(&b'/') {
        return Some(PathBuf::from(argv0));
    }
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .map(|dir| start_dir.join(dir).join(argv0))
        .find(|candidate| identity(candidate).is_some())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The running executable's path (as the kernel resolved it at `exec`)
/// and identity.
fn running_executable() -> Option<(PathBuf, FileId)> {
    let path = std::env::current_exe().ok()?;
    // `/proc/self/exe` names the inode that runs even once the file is
    // replaced or deleted; its link text then ends in " (deleted)".
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = FileId::of_path(Path::new("/proc/self/exe")).ok()?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let id = FileId::of_path(&path).ok()?;
    let path = match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(stripped) if !path.exists() => PathBuf::from(stripped),
        _ => path,
    };
    Some((path, id))
}

/// Refines a "not found" error about `path`: names the first component
/// that does not exist, and the symlink that points at it, if any.
pub(crate) fn explain_missing(path: &Path, err: io::Error) -> io::Error {
    if err.kind() != io::ErrorKind::NotFound {
        return err;
    }
    let mut prefix = PathBuf::new();
    for component in path.components() {
        prefix.push(component);
        if std::fs::metadata(&prefix).is_ok() {
            continue;
        }
        let what = match std::fs::read_link(&prefix) {
            Ok(target) => format!(
                "{} is a symlink to {}, which does not exist",
                prefix.display(),
                target.display()
            ),
            Err(_) => format!("{} does not exist", prefix.display()),
        };
        return io::Error::new(io::ErrorKind::NotFound, what);
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: FileId = FileId { dev: 1, ino: 42 };
    const OTHER: FileId = FileId { dev: 1, ino: 7 };

    fn running() -> Option<(PathBuf, FileId)> {
        Some((PathBuf::from("/srv/app/releases/v41/app"), RUNNING))
    }

    /// A fake file system: `/srv/app/current/app` and `/usr/bin/app` are
    /// the running binary; `/usr/bin/other` is another program.
    fn fs(p: &Path) -> Option<FileId> {
        match p.to_str()? {
            "/srv/app/current/app" | "/srv/app/current/./app" | "/usr/bin/app" => Some(RUNNING),
            "/usr/bin/other" | "/bin/my-service" => Some(OTHER),
            _ => None,
        }
    }

    fn chosen(e: &Executable) -> Option<&Path> {
        match e {
            Executable::Path { path, .. } => Some(path),
            Executable::Unknown { .. } => None,
        }
    }

    #[test]
    fn the_path_it_was_started_with_wins() {
        let c = Candidates {
            exec_fn: Some("./app".into()),
            argv0: Some("my-service".into()),
            running: running(),
            ..Candidates::default()
        };
        let e = choose_executable(&c, Path::new("/srv/app/current"), fs);
        assert_eq!(chosen(&e), Some(Path::new("./app")));
    }

    #[test]
    fn a_renamed_argv0_never_starts_another_program() {
        // `exec -a my-service`, with a `my-service` on PATH that is
        // another program, and no AT_EXECFN.
        let c = Candidates {
            argv0: Some("my-service".into()),
            path_var: Some("/bin:/usr/bin".into()),
            running: running(),
            ..Candidates::default()
        };
        let e = choose_executable(&c, Path::new("/"), fs);
        assert_eq!(chosen(&e), Some(Path::new("/srv/app/releases/v41/app")));
    }

    #[test]
    fn argv0_through_path_when_it_is_the_running_binary() {
        let c = Candidates {
            argv0: Some("app".into()),
            path_var: Some("/bin:/usr/bin".into()),
            running: running(),
            ..Candidates::default()
        };
        let e = choose_executable(&c, Path::new("/"), fs);
        assert_eq!(chosen(&e), Some(Path::new("/usr/bin/app")));
    }

    #[test]
    fn relative_argv0_against_the_logical_start_dir() {
        let c = Candidates {
            argv0: Some("./app".into()),
            running: running(),
            ..Candidates::default()
        };
        let e = choose_executable(&c, Path::new("/srv/app/current"), fs);
        assert_eq!(chosen(&e), Some(Path::new("./app")));
    }

    #[test]
    fn pwd_is_kept_only_when_it_names_the_working_directory() {
        let here = std::env::current_dir().unwrap_or_default();
        let tmp = std::env::temp_dir();
        assert_eq!(logical_dir(&here, Some(here.as_os_str())), here);
        assert_eq!(logical_dir(&here, None), here);
        if FileId::of_path(&tmp).ok() != FileId::of_path(&here).ok() {
            assert_eq!(logical_dir(&here, Some(tmp.as_os_str())), here);
        }
        assert_eq!(logical_dir(&here, Some(OsStr::new("relative"))), here);
        let dotted = here.join("..").join(here.file_name().unwrap_or_default());
        assert_eq!(logical_dir(&here, Some(dotted.as_os_str())), here);
    }

    #[test]
    fn missing_components_are_named() {
        let e = explain_missing(
            Path::new("/nonexistent-tableflip/a/b"),
            io::Error::from(io::ErrorKind::NotFound),
        );
        assert!(
            e.to_string()
                .contains("/nonexistent-tableflip does not exist"),
            "{e}"
        );
    }
}
