//! The two process models, and how a deployment chooses between them.

use std::ffi::OsStr;

use crate::error::{Error, Result};

/// The environment variable that chooses the process model at deploy time,
/// without rebuilding: `supervised` or `replace`. It wins over
/// [`Options::mode`](crate::Options::mode) and over `#[tableflip::main(mode = …)]`.
pub const ENV_MODE: &str = "TABLEFLIP_MODE";

/// How the generations of a service relate to the process that was
/// started: the process model.
///
/// Chosen with [`Options::mode`](crate::Options::mode), `#[tableflip::main(mode
/// = "…")]`, or at deploy time with `TABLEFLIP_MODE=supervised|replace`
/// ([`ENV_MODE`]), which wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Each generation starts the next and exits after its drain, as Go's
    /// tableflip does: the service's PID changes at every upgrade. Process
    /// managers that watch the PID they started (supervisord, runit, s6,
    /// tini, a shell's job control) lose track of the service at the first
    /// upgrade; systemd follows it through `MAINPID=`.
    Replace,
    /// The process that was started stays, at the same PID, for the life
    /// of the service: a small supervisor that holds the listening sockets,
    /// runs no application code, and starts each generation as its child.
    /// `SIGHUP` to it (or to a generation) upgrades; once the new
    /// generation is ready, the old one drains and the supervisor
    /// re-executes itself into the new binary, keeping its PID. A
    /// generation that dies is replaced from the sockets the supervisor
    /// holds, so no connection is refused. Connections and files handed on
    /// ([`Fds::add_conn`](crate::Fds::add_conn),
    /// [`add_file`](crate::Fds::add_file)) are collected from the serving
    /// generation when an upgrade starts and passed to the new one (within
    /// 5 s, or the upgrade timeout if shorter; after that, the upgrade goes
    /// on without them). Linux only.
    Supervised,
}

impl Mode {
    /// The name used by `TABLEFLIP_MODE` and the macro option.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replace => "replace",
            Mode::Supervised => "supervised",
        }
    }

    /// The mode named by `TABLEFLIP_MODE`, if it is set.
    ///
    /// # Errors
    ///
    /// [`Error::Mode`] when it is set to anything but `supervised` or
    /// `replace` (an empty value counts as unset).
    pub fn from_env() -> Result<Option<Mode>> {
        parse_env(std::env::var_os(ENV_MODE).as_deref())
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "replace" => Ok(Mode::Replace),
            "supervised" => Ok(Mode::Supervised),
            other => Err(Error::Mode {
                value: other.to_owned(),
            }),
        }
    }
}

fn parse_env(value: Option<&OsStr>) -> Result<Option<Mode>> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.is_empty() {
        return Ok(None);
    }
    match value.to_str() {
        Some(v) => v.trim().parse().map(Some),
        None => Err(Error::Mode {
            value: value.to_string_lossy().into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_modes_and_rejects_the_rest() {
        let p = |s: &str| parse_env(Some(OsStr::new(s)));
        assert_eq!(p("supervised").ok().flatten(), Some(Mode::Supervised));
        assert_eq!(p("replace").ok().flatten(), Some(Mode::Replace));
        assert_eq!(p(" supervised\n").ok().flatten(), Some(Mode::Supervised));
        assert_eq!(p("").ok().flatten(), None);
        assert_eq!(parse_env(None).ok().flatten(), None);
        let err = p("Supervisor")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("TABLEFLIP_MODE") && err.contains("\"Supervisor\""),
            "{err}"
        );
        assert!(
            err.contains("supervised") && err.contains("replace"),
            "{err}"
        );
    }
}
