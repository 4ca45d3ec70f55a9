//! `tableflip-ctl` as the tests run it, and the macro test service with a
//! control socket (where systemd's `RuntimeDirectory=` would put it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use crate::{Harness, Service, log_to_file, macro_svc_cmd, pid_file_pid, signal, wait_until};

/// What `tableflip-ctl` said: its exit status, its JSON line (`Null` if
/// none), its stderr.
#[derive(Debug)]
pub struct Said {
    pub code: Option<i32>,
    pub json: serde_json::Value,
    pub stderr: String,
}

impl Said {
    /// A string field of the JSON line (`""` if absent).
    pub fn str(&self, key: &str) -> &str {
        self.json[key].as_str().unwrap_or("")
    }

    /// A number field of the JSON line (`u64::MAX` if absent).
    pub fn num(&self, key: &str) -> u64 {
        self.json[key].as_u64().unwrap_or(u64::MAX)
    }

    /// A PID field of the JSON line (0 if absent).
    pub fn pid(&self, key: &str) -> u32 {
        u32::try_from(self.num(key)).unwrap_or(0)
    }
}

/// A running `tableflip-ctl`, killed if the test ends before it does.
#[derive(Debug)]
pub struct Running(Option<std::process::Child>);

impl Running {
    /// Waits for it; what it said.
    pub fn finish(mut self) -> Said {
        let Some(child) = self.0.take() else {
            unreachable!("finished once");
        };
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("tableflip-ctl: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = stdout
            .lines()
            .next()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(serde_json::Value::Null);
        Said {
            code: out.status.code(),
            json,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `ctl` (the `tableflip-ctl` binary) with `args`.
pub fn start_ctl(ctl: &str, args: &[&str]) -> Running {
    let child = Command::new(ctl)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {ctl}: {e}"));
    Running(Some(child))
}

/// Runs `ctl` with `args` to its end.
pub fn run_ctl(ctl: &str, args: &[&str]) -> Said {
    start_ctl(ctl, args).finish()
}

/// The macro test service with a control socket, ready.
#[derive(Debug)]
pub struct CtlService {
    pub svc: Service,
    pub mode: String,
    /// The supervisor (supervised mode) or the first generation.
    pub first_pid: u32,
    /// The first generation.
    pub first: u32,
    /// Its TCP listener's address.
    pub tcp: String,
    /// Its control socket.
    pub socket: String,
    pub pid_file: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl CtlService {
    /// Starts `exe` (a `macro_svc` build) in `mode` with `envs`, its
    /// control socket at `$RUNTIME_DIRECTORY/tableflip.sock` in the
    /// scratch directory, and waits until it is ready.
    pub fn start(h: &Harness, exe: &Path, mode: &str, envs: &[(&str, &str)]) -> CtlService {
        let mut cmd = macro_svc_cmd(exe, &h.ctl, mode);
        let pid_file = h.ctl.path().join("svc.pid");
        cmd.env("RUNTIME_DIRECTORY", h.ctl.path())
            .env("MS_PID_FILE", &pid_file);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let log = log_to_file(&mut cmd, &h.ctl);
        let mut svc = Service::spawn_keeping_stderr(cmd);
        let first_pid = svc.first_pid();
        let first = svc.wait_kind("init-done", None).pid;
        let tcp = svc
            .wait_for("TCP listening", |e| {
                e.kind == "listening" && e.pid == first && e.get("name") == "TCP"
            })
            .get("addr")
            .to_owned();
        let s = CtlService {
            svc,
            mode: mode.to_owned(),
            first_pid,
            first,
            tcp,
            socket: h.ctl.path().join("tableflip.sock").display().to_string(),
            pid_file,
            log,
        };
        let main = s.main_pid(first);
        wait_until("the service is ready", || {
            pid_file_pid(&s.pid_file) == Some(main)
        });
        s
    }

    /// The process the PID file names while `serving` serves.
    pub fn main_pid(&self, serving: u32) -> u32 {
        if self.mode == "supervised" {
            self.first_pid
        } else {
            serving
        }
    }

    /// Whether the log holds `what`.
    pub fn logged(&self, what: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(what))
    }

    /// Stops the service (`serving` serves) with `SIGTERM` and waits until
    /// every process has exited.
    pub fn stop(mut self, serving: u32) {
        if self.mode == "supervised" {
            self.svc.terminate_first();
        } else {
            signal(serving, Signal::SIGTERM);
            self.svc.wait_all_exited();
        }
    }
}
