//! The parent side of the handover: starting the next generation with
//! the fds and the metadata, and waiting for its readiness, its death or
//! the timeout.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::Arc;

use tokio::io::AsyncReadExt;

use super::child::Child;
use super::successor::watch_successor;
use super::{Upgrader, lock};
use crate::error::{Error, Result};
use crate::report::chain;
use crate::{pidfile, protocol, sys};

impl Upgrader {
    pub(super) async fn run_upgrade(&self) -> Result<u32> {
        let launch = &self.inner.launch;
        let rollback = lock(&self.inner.rolling_back).clone();
        let exe = match &rollback {
            // This process's own binary, the inode that runs (replaced or
            // deleted on disk since, maybe): the previous one.
            Some(_) => std::path::PathBuf::from("/proc/self/exe"),
            None => launch.executable()?,
        };
        // The next generation writes the PID file as this process's user:
        // refused now, with the reason, if it cannot (privileges dropped
        // since the start, say).
        if let Some(path) = self.pid_file() {
            pidfile::check(&path)?;
        }
        // Version 2 (the fds over a socket while the child starts) for a
        // large handover to an executable that says it receives it;
        // version 1 (the fds across `exec`) for any other (a small
        // handover, which has nothing to gain from it; an older build; a
        // script).
        let streamed = self.inner.fds.count() > STREAM_ABOVE
            && protocol::executable_speaks(&exe) >= protocol::VERSION_STREAMED;
        let pipe = || sys::pipe_cloexec().map_err(|e| Error::io("cannot create a pipe", e));
        let (parent_r, parent_w) = pipe()?;
        let (ready_r, ready_w) = pipe()?;
        let stream = if streamed {
            Some(
                sys::seqpacket_pair()
                    .map_err(|e| Error::io("cannot create the handover socket pair", e))?,
            )
        } else {
            None
        };
        let handover = protocol::env_value(parent_r.as_raw_fd(), ready_w.as_raw_fd());
        let handover_id = match &stream {
            None => protocol::id_value(&[parent_r.as_fd(), ready_w.as_fd()])?,
            Some((_, theirs)) => {
                protocol::id_value(&[parent_r.as_fd(), ready_w.as_fd(), theirs.as_fd()])?
            }
        };
        let mut argv = launch.args.clone();
        if argv.is_empty() {
            argv.push(exe.clone().into_os_string());
        }
        // `launch.env` holds no protocol variable.
        let mut env = launch.env.clone();
        env.push((protocol::ENV_HANDOVER.into(), handover.into()));
        env.push((protocol::ENV_HANDOVER_ID.into(), handover_id.into()));
        if let Some((_, theirs)) = &stream {
            env.push((
                protocol::ENV_HANDOVER_SOCKET.into(),
                theirs.as_raw_fd().to_string().into(),
            ));
        }

        // The application's state, registered to be handed on with the
        // rest; the guards keep it registered until the child has its
        // copies (spawned, or sent them), and close this process's on
        // return.
        let _state = self.stage_state()?;
        // The channel idle HTTP connections are handed over on.
        #[cfg(feature = "http")]
        let mut conns = self.stage_http_conns();
        let meta = |entries| protocol::Metadata {
            version: if streamed {
                protocol::VERSION_STREAMED
            } else {
                protocol::VERSION_INHERITED
            },
            parent_pid: std::process::id(),
            generation: self.inner.generation.saturating_add(1),
            entries,
            supervisor: None,
            executable: rollback.as_ref().and_then(|_| launch.executable().ok()),
            rollback: rollback.clone(),
        };
        let spawn = |inherit: &[std::os::fd::RawFd]| -> Result<Child> {
            let spec = sys::SpawnSpec {
                exe: &exe,
                argv: &argv,
                env: &env,
                cwd: &launch.start_dir,
                inherit,
            };
            let spawn_error = |source| Error::Spawn {
                path: exe.clone(),
                source,
            };
            match sys::spawn_inheriting(&spec) {
                Some(Ok(pid)) => {
                    Child::spawned(pid).map_err(|e| Error::io("cannot watch the new process", e))
                }
                Some(Err(source)) => Err(spawn_error(source)),
                None => {
                    // fork + exec, the fds made inheritable in the child.
                    let mut cmd = std::process::Command::new(&exe);
                    if let Some(arg0) = argv.first() {
                        cmd.arg0(arg0);
                    }
                    // A process group of its own, as posix_spawn does.
                    cmd.process_group(0);
                    cmd.args(argv.iter().skip(1))
                        .env_clear()
                        .envs(env.iter().map(|(k, v)| (k, v)))
                        .current_dir(&launch.start_dir);
                    sys::inherit_across_exec(&mut cmd, inherit.to_vec());
                    let mut cmd = tokio::process::Command::from(cmd);
                    cmd.kill_on_drop(false);
                    Ok(Child::from_tokio(cmd.spawn().map_err(spawn_error)?))
                }
            }
        };
        let (mut child, payload) = match stream {
            None => {
                // The registry stays locked until the child is spawned, so
                // no fd named in the snapshot can be closed (and its
                // number reused) in between.
                let mut snapshot = self.inner.fds.snapshot()?;
                let mut inherit = std::mem::take(&mut snapshot.fds);
                inherit.push(parent_r.as_raw_fd());
                inherit.push(ready_w.as_raw_fd());
                let mut payload = protocol::encode(&meta(std::mem::take(&mut snapshot.entries)))?;
                // Put the metadata into the pipe before the child exists:
                // it is then complete whatever happens to this process
                // after the spawn (a SIGKILL included). What does not fit
                // is written by a thread once the child reads.
                let written = sys::prefill_pipe(parent_w.as_fd(), &payload);
                payload.drain(..written);
                (ChildGuard(Some(spawn(&inherit)?)), payload)
            }
            Some((mine, theirs)) => {
                // The child starts first, with the protocol's fds alone;
                // the snapshot, the metadata and the fds follow while it
                // loads (its `exec` and start take about as long as they
                // do at a thousand listeners).
                let child = ChildGuard(Some(spawn(&[
                    parent_r.as_raw_fd(),
                    ready_w.as_raw_fd(),
                    theirs.as_raw_fd(),
                ])?));
                drop(theirs);
                let mut snapshot = self.inner.fds.snapshot()?;
                let mut entries = std::mem::take(&mut snapshot.entries);
                let fds = snapshot.fds_of(&entries);
                if fds.len() != entries.len() {
                    return Err(Error::io(
                        "cannot hand the fds on",
                        std::io::Error::other("the snapshot lost an fd"),
                    ));
                }
                for (position, e) in entries.iter_mut().enumerate() {
                    e.fd =
                        std::os::fd::RawFd::try_from(position).unwrap_or(std::os::fd::RawFd::MAX);
                }
                let mut payload = protocol::encode(&meta(entries))?;
                let written = sys::prefill_pipe(parent_w.as_fd(), &payload);
                payload.drain(..written);
                // Sent while the registry is locked: once a packet is
                // sent, the child's copies of its fds exist, whatever
                // the application closes afterwards.
                send_fds(mine, &fds, child.0.as_ref().map_or(0, Child::id));
                (child, payload)
            }
        };
        drop(parent_r);
        drop(ready_w);
        let pid = child.get().id();
        self.phase().spawned(pid);
        tracing::info!(child_pid = pid, executable = %exe.display(), how = child.get().how(), "upgrade: spawned");

        let parent_w = Arc::new(parent_w);
        if !payload.is_empty() {
            send_metadata(Arc::clone(&parent_w), payload, pid);
        }

        let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)
            .map_err(|e| Error::io("cannot watch the readiness pipe", e))?;
        let timeout = self.inner.opts.upgrade_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ready_open = true;
        let mut byte = [0u8; 1];
        // `None` once the child is ready; the error otherwise (the child
        // has then been reaped).
        let failure = loop {
            tokio::select! {
                biased;
                read = ready.read(&mut byte), if ready_open => match read {
                    Ok(1) => break None,
                    Ok(_) => ready_open = false,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "readiness pipe failed");
                        ready_open = false;
                    }
                },
                status = child.get().wait() => {
                    break Some(match status {
                        Ok(s) => match (s.code(), s.signal()) {
                            (_, Some(signal)) => Error::ChildKilled { pid, signal },
                            (Some(code), None) => Error::ChildExited { pid, code: Some(code) },
                            (None, None) => Error::ChildExited { pid, code: None },
                        },
                        Err(e) => Error::io(format!("cannot wait for the new process (pid {pid})"), e),
                    });
                }
                () = &mut deadline => {
                    kill_and_reap(child.get(), pid).await;
                    break Some(Error::Timeout { pid, timeout });
                }
                () = self.inner.stop.cancelled() => {
                    // Committed already (the readiness byte is there)?
                    // Then the new generation stays in charge. Read the
                    // pipe itself (it is non-blocking), not through tokio,
                    // whose cached readiness may not know of the byte yet.
                    if ready_open && matches!(nix::unistd::read(ready.as_fd(), &mut byte), Ok(1)) {
                        tracing::info!(child_pid = pid, "stop requested as the new generation became ready: it stays in charge");
                        break None;
                    }
                    kill_and_reap(child.get(), pid).await;
                    break Some(Error::Stopped);
                }
            }
        };
        if let Some(e) = failure {
            self.reclaim_pid_file(pid);
            return Err(e);
        }
        // The write end of the parent pipe must stay open until this
        // process exits: its closing is how the child learns that its
        // parent has gone. Leak this reference; the kernel closes the fd at
        // exit, however the process ends.
        std::mem::forget(parent_w);
        // The child outlives us. While we live (draining), we watch it: if
        // it dies, the sockets we still hold go to a replacement.
        if let Some(child) = child.disarm() {
            *lock(&self.inner.successor) = Some((pid, child.signaller()));
            tokio::spawn(watch_successor(Arc::downgrade(&self.inner), child, pid));
        }
        #[cfg(feature = "http")]
        self.commit_http_conns(conns.as_mut());
        Ok(pid)
    }

    /// A new process that wrote the PID file but died or was killed before
    /// it told this process it was ready leaves the file naming it: this
    /// process, still in charge, names itself again.
    fn reclaim_pid_file(&self, child: u32) {
        let Some(path) = self.pid_file() else {
            return;
        };
        if pidfile::names(&path, child) {
            match pidfile::write(&path, std::process::id()) {
                Ok(()) => {
                    tracing::info!(child_pid = child, path = %path.display(), "the PID file named the failed new process; it names this one again")
                }
                Err(e) => {
                    tracing::warn!(child_pid = child, error = %chain(&e), "cannot restore the PID file")
                }
            }
        }
    }
}

/// Kills the child if the upgrade future is dropped before the child is
/// ready (tokio reaps a dropped child in the background), so a cancelled
/// upgrade never leaves a half-started generation behind.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn get(&mut self) -> &mut Child {
        match &mut self.0 {
            Some(c) => c,
            None => unreachable!("ChildGuard used after disarm"),
        }
    }

    fn disarm(mut self) -> Option<Child> {
        self.0.take()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if child.try_wait().ok().flatten().is_none() {
                tracing::warn!(
                    child_pid = child.id(),
                    "upgrade cancelled; killing the new process"
                );
                // Reaped by a thread of its own, however long its exit takes
                // (a process with much memory to free), never blocking the
                // thread that dropped the upgrade.
                child.kill_and_forget();
            }
        }
    }
}

async fn kill_and_reap(child: &mut Child, pid: u32) {
    if let Err(e) = child.kill().await {
        tracing::warn!(child_pid = pid, error = %e, "cannot kill the new process");
    }
}

/// The most fds one packet of a version-2 handover carries (the kernel's
/// `SCM_MAX_FD`, unix(7)).
const FDS_PER_PACKET: usize = 253;

/// Above this many fds, a handover uses version 2 (see `run_upgrade`).
/// Below, version 1 costs less: the parent's copies and metadata take
/// about 0.6 ms at 256 fds (measured per step at 1000: 2.3 ms for the
/// copies, 0.35 ms for the metadata), the file actions of the spawn about
/// 0.3 ms, against the version note's read, a socket pair and the child's
/// checks of it; and the metadata still fits in the pipe's 64 KiB, so
/// the handover is complete before the child exists (with version 2 a
/// parent killed in the few milliseconds after the spawn leaves the child
/// without its fds; version 1 had that window too from about 400 fds).
const STREAM_ABOVE: usize = 256;

/// Sends the fds of a version-2 handover over `socket`, in packets of at
/// most [`FDS_PER_PACKET`], each starting with the position of its first
/// fd (`PROTOCOL.md`). What the socket cannot take at once (more packets
/// than its queue holds before the child reads, or too many fds in flight
/// for this user, `ETOOMANYREFS`) is duplicated and sent by a thread, so
/// that the caller can release the fds' owner. A failure other than those
/// ends the sending: the child then lacks fds, and says so as it exits.
/// Returns how many were sent at once (the rest goes from the thread).
fn send_fds(socket: OwnedFd, fds: &[std::os::fd::BorrowedFd<'_>], pid: u32) -> usize {
    let mut sent = 0;
    for chunk in fds.chunks(FDS_PER_PACKET) {
        match send_chunk(&socket, sent, chunk, true) {
            Ok(()) => sent += chunk.len(),
            Err(e) if later(&e) => break,
            Err(e) => {
                tracing::debug!(child_pid = pid, error = %e, "cannot send the handover's fds");
                return sent;
            }
        }
    }
    if sent == fds.len() {
        return sent;
    }
    tracing::debug!(
        child_pid = pid,
        sent,
        left = fds.len() - sent,
        "the handover socket is full until the new process reads: a thread sends the rest"
    );
    let rest: std::io::Result<Vec<OwnedFd>> = fds[sent..]
        .iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect();
    let rest = match rest {
        Ok(rest) => rest,
        Err(e) => {
            tracing::warn!(child_pid = pid, error = %e, "cannot duplicate the handover's fds");
            return sent;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("tableflip-handover-fds".into())
        .spawn(move || {
            let mut position = sent;
            for chunk in rest.chunks(FDS_PER_PACKET) {
                let borrowed: Vec<_> = chunk.iter().map(AsFd::as_fd).collect();
                loop {
                    match send_chunk(&socket, position, &borrowed, false) {
                        Ok(()) => break,
                        // Fds in flight count against this user's
                        // `RLIMIT_NOFILE` until the child takes them.
                        Err(e) if later(&e) => std::thread::sleep(std::time::Duration::from_millis(1)),
                        Err(e) => {
                            tracing::debug!(child_pid = pid, error = %e, "cannot send the handover's fds");
                            return;
                        }
                    }
                }
                position += chunk.len();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(child_pid = pid, error = %e, "cannot start the thread that sends the handover's fds");
    }
    sent
}

/// Whether a failed send may succeed later (the child has not read yet).
fn later(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(nix::libc::ETOOMANYREFS)
}

fn send_chunk(
    socket: &OwnedFd,
    first: usize,
    fds: &[std::os::fd::BorrowedFd<'_>],
    dont_wait: bool,
) -> std::io::Result<()> {
    let first = u32::try_from(first).map_err(|_| std::io::Error::other("too many fds"))?;
    sys::send_packet(socket.as_fd(), &first.to_le_bytes(), fds, dont_wait)
}

/// Writes the metadata from a thread: it may exceed the pipe's buffer, and
/// the child reads it only once it runs.
pub(crate) fn send_metadata(pipe: Arc<OwnedFd>, payload: Vec<u8>, pid: u32) {
    let spawned = std::thread::Builder::new()
        .name("tableflip-handover".into())
        .spawn(move || {
            let mut rest = payload.as_slice();
            while !rest.is_empty() {
                match sys::write_no_sigpipe(pipe.as_fd(), rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => {
                        let mut fds = [nix::poll::PollFd::new(pipe.as_fd(), nix::poll::PollFlags::POLLOUT)];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
                    }
                    Err(e) => {
                        tracing::debug!(child_pid = pid, error = %e, "cannot send the handover metadata");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(child_pid = pid, error = %e, "cannot start the thread that sends the handover");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a small send buffer cannot take at once goes from a thread,
    /// from copies (the caller's fds are closed as soon as `send_fds`
    /// returns): every fd arrives, in order, each packet starting at the
    /// position that follows the last.
    #[test]
    fn fds_beyond_what_the_socket_holds_are_sent_by_a_thread() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        const COUNT: usize = 2000;
        // Room for the fds and their copies.
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
        let Ok((mine, theirs)) = sys::seqpacket_pair() else {
            panic!("socketpair");
        };
        // The smallest send buffer the kernel allows: a few packets.
        socket2::SockRef::from(&mine)
            .set_send_buffer_size(1)
            .unwrap_or_else(|e| panic!("SO_SNDBUF: {e}"));
        // A deadline for the test: a packet that never comes fails it.
        socket2::SockRef::from(&theirs)
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
        // Sockets: each has an inode of its own.
        let files: Vec<OwnedFd> = (0..COUNT)
            .map(|_| {
                std::os::unix::net::UnixDatagram::unbound()
                    .map(OwnedFd::from)
                    .unwrap_or_else(|e| panic!("socket: {e}"))
            })
            .collect();
        let inodes: Vec<u64> = files
            .iter()
            .map(|f| nix::sys::stat::fstat(f).map(|s| s.st_ino).unwrap_or(0))
            .collect();
        let borrowed: Vec<_> = files.iter().map(AsFd::as_fd).collect();
        let at_once = send_fds(mine, &borrowed, 0);
        assert!(
            at_once < COUNT,
            "the socket took all {COUNT} fds at once: no thread"
        );
        drop(borrowed);
        drop(files);
        let mut got = 0;
        let mut packets = 0;
        let mut buf = [0u8; 16];
        while got < COUNT {
            let (len, fds) = match sys::recv_packet(theirs.as_fd(), &mut buf, false) {
                Ok(Some(packet)) => packet,
                other => panic!("after {got} of {COUNT} fds: {other:?}"),
            };
            assert_eq!(len, 4);
            let first = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            assert_eq!(
                first as usize, got,
                "packet {packets} starts where the last ended"
            );
            for fd in &fds {
                let ino = nix::sys::stat::fstat(fd).map(|s| s.st_ino).unwrap_or(1);
                assert_eq!(ino, inodes[got], "fd at position {got}");
                got += 1;
            }
            packets += 1;
        }
        assert_eq!(packets, COUNT.div_ceil(FDS_PER_PACKET));
    }
}
