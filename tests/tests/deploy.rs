//! How real deployments start and address a service: symlinked release
//! layouts, a renamed `argv[0]`, a start directory that disappears. The
//! next generation must run the binary, in the directory, that the same
//! *paths* name at upgrade time, and never another program.

use std::path::{Path, PathBuf};
use std::process::Command;

use tableflip_tests::*;

const SVC: &str = env!("CARGO_BIN_EXE_svc");

/// A Capistrano-style layout: `releases/<name>/svc` (each copy a
/// different size, so `exe_size` tells which one runs) and a `current`
/// symlink to one of them.
struct Releases {
    root: Scratch,
}

impl Releases {
    fn new(tag: &str) -> Releases {
        let root = Scratch::new(tag);
        std::fs::create_dir(root.path().join("releases")).expect("mkdir releases");
        Releases { root }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join("releases").join(name)
    }

    fn current(&self) -> PathBuf {
        self.root.path().join("current")
    }

    /// Creates `releases/<name>` with its own copy of the service; returns
    /// the copy's size.
    fn release(&self, name: &str, extra: usize) -> u64 {
        let dir = self.dir(name);
        std::fs::create_dir(&dir).expect("mkdir release");
        install_exe(SVC, &dir.join("svc"), extra);
        file_size(dir.join("svc"))
    }

    /// Points `current` at `releases/<name>`, atomically (a new link
    /// renamed over the old one, as deploy tools do).
    fn point_current(&self, name: &str) {
        let tmp = self.root.path().join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(name), &tmp).expect("symlink");
        std::fs::rename(&tmp, self.current()).expect("rename the link");
    }
}

/// The canonical form of `p`, as `getcwd` reports it.
fn real(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
        .display()
        .to_string()
}

/// Upgrades `old` and returns the new generation's `start` event.
fn upgrade_to(svc: &mut Service, old: u32, addr: &str) -> Event {
    let new = svc.upgrade(old);
    if old == svc.first_pid() {
        finish_upgrade(svc, old, new, addr);
    } else {
        svc.wait_kind("exit", Some(old));
        wait_gone(old);
        assert_eq!(serves(addr), new);
    }
    svc.wait_kind("start", Some(new))
}

/// `cd /srv/app/current && ./app`: after `current` moves to the next
/// release, an upgrade runs the next release's binary in its directory;
/// once the first release is deleted, upgrades still work.
#[test]
fn started_in_a_symlinked_release_directory() {
    let _serial = serial();
    adopt_orphans();
    let r = Releases::new("d-cd");
    let v41 = r.release("v41", 41);
    r.point_current("v41");
    r.root.write("listen", "web tcp 127.0.0.1:0\n");
    let mut cmd = Service::command("./svc", &r.root, &[]);
    // What a shell does for `cd current && ./svc`.
    cmd.current_dir(r.current()).env("PWD", r.current());
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let start = svc.wait_kind("start", Some(first));
    assert_eq!(start.num::<u64>("exe_size"), v41);
    assert_eq!(start.get("cwd"), real(&r.dir("v41")));
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));

    let v42 = r.release("v42", 42);
    r.point_current("v42");
    let second = upgrade_to(&mut svc, first, &addr);
    assert_eq!(
        second.num::<u64>("exe_size"),
        v42,
        "the next release's binary runs: {}",
        second.line
    );
    assert_eq!(second.get("cwd"), real(&r.dir("v42")), "in its directory");

    std::fs::remove_dir_all(r.dir("v41")).expect("delete v41");
    let v43 = r.release("v43", 43);
    r.point_current("v43");
    let third = upgrade_to(&mut svc, second.pid, &addr);
    assert_eq!(third.num::<u64>("exe_size"), v43, "{}", third.line);
    assert_eq!(third.get("cwd"), real(&r.dir("v43")));
    svc.stop(third.pid);
}

/// `/srv/app/current/app` started by its absolute path, from inside
/// `current`: once `releases/v41` is deleted, the upgrade still works
/// (it used to fail with "cannot start /srv/app/current/svc: No such file
/// or directory", naming a binary that exists), and runs the next release
/// in its directory.
#[test]
fn started_by_absolute_path_through_the_symlink() {
    let _serial = serial();
    adopt_orphans();
    let r = Releases::new("d-abs");
    r.release("v41", 141);
    r.point_current("v41");
    r.root.write("listen", "web tcp 127.0.0.1:0\n");
    let exe = r.current().join("svc");
    let mut cmd = Service::command(&exe.display().to_string(), &r.root, &[]);
    cmd.current_dir(r.current()).env("PWD", r.current());
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));

    let v42 = r.release("v42", 142);
    r.point_current("v42");
    std::fs::remove_dir_all(r.dir("v41")).expect("delete v41");
    let second = upgrade_to(&mut svc, first, &addr);
    assert_eq!(second.num::<u64>("exe_size"), v42, "{}", second.line);
    assert_eq!(second.get("cwd"), real(&r.dir("v42")));
    svc.stop(second.pid);
}

/// The directory the service started in is deleted: the upgrade fails with
/// an error that names that directory, not the executable (which
/// exists), and the service serves on.
#[test]
fn a_deleted_start_directory_is_named() {
    let h = Harness::new("d-gone");
    let ctl = &h.ctl;
    let work = ctl.path().join("work");
    std::fs::create_dir(&work).expect("mkdir work");
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut cmd = Service::command(SVC, ctl, &[]);
    cmd.current_dir(&work);
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    std::fs::remove_dir(&work).expect("rmdir work");
    let err = svc.upgrade_err(first);
    assert_eq!(err.get("kind"), "StartDirectory", "{}", err.line);
    let msg = err.get("msg");
    assert!(
        msg.contains(&work.display().to_string()) && msg.contains("started in"),
        "the error names the directory: {msg}"
    );
    assert!(!msg.contains("cannot start /"), "{msg}");
    assert_eq!(serves(&addr), first, "still serving");
    svc.stop(first);
}

/// `exec -a my-service`, with a *different* program called `my-service`
/// on `PATH`: the upgrade runs the service's own binary, never that
/// program (which would get the service's sockets and environment).
#[test]
fn a_renamed_argv0_never_starts_another_program() {
    let h = Harness::new("d-argv0");
    let ctl = &h.ctl;
    let bin = ctl.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir bin");
    let impostor = bin.join("my-service");
    let marker = ctl.path().join("impostor-ran");
    install_script(
        &impostor,
        &format!(
            "#!/bin/sh\necho ran > {}\nexec sleep 60\n",
            marker.display()
        ),
    );
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Service::command(SVC, ctl, &[("TF_UPGRADE_TIMEOUT_MS", "10000")]);
    std::os::unix::process::CommandExt::arg0(&mut cmd, "my-service");
    cmd.env("PATH", &path);
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    let second = upgrade_to(&mut svc, first, &addr);
    assert_eq!(second.get("gen"), "2", "{}", second.line);
    assert!(!marker.exists(), "the program named like argv[0] never ran");
    svc.stop(second.pid);
}

/// A renamed `argv[0]` that names nothing on `PATH`: the upgrade works
/// (it used to fail with "not found in PATH"), and a binary replaced at
/// the service's path is what runs next.
#[test]
fn a_renamed_argv0_upgrades_to_the_binary_replaced_at_its_path() {
    let h = Harness::new("d-rename");
    let ctl = &h.ctl;
    let exe = ctl.path().join("svc");
    install_exe(SVC, &exe, 5);
    ctl.write("listen", "web tcp 127.0.0.1:0\n");
    let mut cmd = Command::new(&exe);
    // These tests are about the replace mode.
    cmd.env("TABLEFLIP_MODE", "replace");
    cmd.env("TF_CTL", ctl.path()).env("RUST_LOG", "debug");
    std::os::unix::process::CommandExt::arg0(&mut cmd, "renamed-by-a-supervisor");
    let mut svc = Service::spawn(cmd);
    let first = svc.first_pid();
    let addr = svc
        .wait_kind("listening", Some(first))
        .get("addr")
        .to_owned();
    svc.wait_kind("ready", Some(first));
    install_exe(SVC, &exe, 7);
    let size = file_size(&exe);
    let second = upgrade_to(&mut svc, first, &addr);
    assert_eq!(second.num::<u64>("exe_size"), size, "{}", second.line);
    svc.stop(second.pid);
}
