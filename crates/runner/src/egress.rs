//! Running the egress proxy for one `agentvm run`.
//!
//! The proxy runs in a process of its own, forked while this process is
//! still single-threaded (the sandbox's init is cloned later with a raw
//! clone3, which must not happen in a multi-threaded process). It drops to
//! uid 65534 when started as root, keeps no_new_privs, dies with us, and
//! writes each decision as a JSON line that we read back at the end.

use std::io::{BufRead, BufReader, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use agentvm_egress::{EgressLine, Policy, Proxy, Record, Unrecorded};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

pub struct Running {
    pub socket: PathBuf,
    dir: PathBuf,
    pid: Pid,
    log: std::fs::File,
    record_limit: u64,
}

fn private_dir() -> Result<PathBuf, String> {
    let mut b = [0u8; 8];
    let f = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b).map(|_| f));
    f.map_err(|e| format!("/dev/urandom: {e}"))?;
    let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let d = std::env::temp_dir().join(format!("agentvm-egress-{name}"));
    std::fs::create_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    // traversable by the sandbox's uid, not listable
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| e.to_string())?;
    Ok(d)
}

/// Take the inherited descriptor `fd` as the live decision stream: it must
/// be open for writing; it becomes non-blocking (a slow reader loses lines,
/// never stalls the proxy) and close-on-exec.
pub fn events_pipe(fd: i32) -> Result<std::fs::File, String> {
    // SAFETY: fcntl on an integer descriptor only reads its flags.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(format!("descriptor {fd} is not open"));
    }
    if fl & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(format!("descriptor {fd} is not open for writing"));
    }
    // SAFETY: as above, setting status and descriptor flags.
    let ok = unsafe {
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
            && libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
    };
    if !ok {
        return Err(format!(
            "descriptor {fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the descriptor is open, inherited for this purpose, and owned
    // by nothing else in this process.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Start the proxy for `policy`; decisions also go to `log_to` if given,
/// and to `events` (see [`events_pipe`]) as they are made.
pub fn start(
    policy: Policy,
    log_to: Option<&Path>,
    events: Option<std::fs::File>,
    record_limit: u64,
) -> Result<Running, String> {
    let dir = private_dir()?;
    let socket = dir.join("egress.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // only root and the sandbox's uid may connect
        let _ = std::os::unix::fs::chown(
            &socket,
            Some(agentvm_sandbox::spec::DEFAULT_ROOT_MAPS_TO),
            None,
        );
        let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    } else {
        let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    }
    let log = match log_to {
        Some(p) => std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(p),
        None => tempfile_in(&dir),
    }
    .map_err(|e| format!("egress log: {e}"))?;
    let child_log = log.try_clone().map_err(|e| e.to_string())?;
    // SAFETY: this process is single-threaded here (the CLI starts no
    // thread before the sandbox); the child only sets up and runs the proxy.
    match unsafe { fork() } {
        Err(e) => Err(format!("forking the egress proxy: {e}")),
        Ok(ForkResult::Child) => {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
            // the proxy parses what the sandbox sends: it keeps only its
            // listener and its sinks, never the runner's repo, patch,
            // result or console descriptors
            {
                use std::os::fd::AsRawFd;
                let mut keep = vec![listener.as_raw_fd(), child_log.as_raw_fd()];
                keep.extend(events.as_ref().map(|e| e.as_raw_fd()));
                agentvm_sandbox::fds::close_all_but(&keep);
            }
            if root {
                let id = agentvm_sandbox::spec::DEFAULT_ROOT_MAPS_TO;
                let ok = nix::unistd::setgroups(&[]).is_ok()
                    && nix::unistd::setresgid(id.into(), id.into(), id.into()).is_ok()
                    && nix::unistd::setresuid(id.into(), id.into(), id.into()).is_ok();
                if !ok {
                    // SAFETY: _exit never returns.
                    unsafe { libc::_exit(1) };
                }
                // SAFETY: re-arm after the credential change, which clears it.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
            }
            let _ = agentvm_sandbox::caps::no_new_privs();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (Ok(()), Ok(mut term)) = (
                        listener.set_nonblocking(true),
                        signal(SignalKind::terminate()),
                    ) else {
                        return;
                    };
                    let Ok(l) = tokio::net::UnixListener::from_std(listener) else {
                        return;
                    };
                    let sinks = std::iter::once(child_log).chain(events).collect();
                    let proxy = Proxy::with_record_limit(policy, sinks, record_limit);
                    tokio::select! {
                        _ = proxy.clone().serve_unix(l) => {}
                        // the sandbox has ended: let each connection still
                        // open (now closed at the sandbox's end) write its
                        // final record, then go
                        _ = term.recv() => {
                            proxy.drain(DRAIN).await;
                            proxy.write_unrecorded();
                        }
                    }
                });
            }
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => {
            // the proxy holds the only writer: the reader sees the end of
            // the stream when it ends
            drop((listener, events));
            Ok(Running {
                socket,
                dir,
                pid: child,
                log,
                record_limit,
            })
        }
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(dir.join("decisions.jsonl"))
}

/// How long connections may take to finish once the sandbox has ended.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Running {
    /// Stop the proxy (SIGTERM: it waits up to [`DRAIN`] for connections to
    /// write their final records; SIGKILL after that) and return its
    /// decisions, one per connection: the final (`closed`) record, or the
    /// `open` one of a connection that did not finish; and the count of
    /// connections past the record limit, if any.
    pub fn finish(mut self) -> (Vec<Record>, Option<Unrecorded>) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus};
        let _ = kill(self.pid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + DRAIN + std::time::Duration::from_secs(1);
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Ok(WaitStatus::StillAlive) => {
                    let _ = kill(self.pid, Signal::SIGKILL);
                    let _ = waitpid(self.pid, None);
                    break;
                }
                _ => break,
            }
        }
        let _ = self.log.rewind();
        let mut out: Vec<Record> = Vec::new();
        let mut unrecorded = None;
        let mut at: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        // at most two lines per recorded connection and a few counts: the
        // proxy parses what the sandbox sends, so its log is read with a bound
        let most = self.record_limit.saturating_mul(2).saturating_add(64);
        // and about 1 KiB a line (a record is a few hundred bytes)
        let bytes = most.saturating_mul(1024).saturating_add(1 << 20);
        for line in BufReader::new(std::io::Read::take(&self.log, bytes))
            .split(b'\n')
            .map_while(Result::ok)
            .take(usize::try_from(most).unwrap_or(usize::MAX))
            .filter_map(|l| EgressLine::parse(&l))
        {
            let r = match line {
                // the last count is the final one
                EgressLine::Unrecorded { unrecorded: u } => {
                    unrecorded = Some(u);
                    continue;
                }
                EgressLine::Record(r) => r,
            };
            match at.get(&r.conn).copied() {
                Some(i) => out[i] = r,
                None => {
                    at.insert(r.conn, out.len());
                    out.push(r);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        (out, unrecorded)
    }
}

/// `agentvm egress-proxy`: the proxy on a TCP address, decisions to stderr.
pub fn standalone(allow: &str, listen: std::net::SocketAddr) -> std::process::ExitCode {
    let policy = match Policy::parse(allow) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentvm egress-proxy: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentvm egress-proxy: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let l = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("agentvm egress-proxy: {listen}: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        if let Ok(a) = l.local_addr() {
            eprintln!("agentvm: egress proxy listening on {a}");
        }
        Proxy::new(policy, Vec::new()).serve_tcp(l).await;
        std::process::ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::Running;
    use std::io::Write;

    #[test]
    fn finish_reads_the_proxys_log_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("own");
        std::fs::create_dir(&own).unwrap();
        let mut log = tempfile::tempfile().unwrap();
        // far more lines than a limit of 2 allows: a proxy gone wrong
        for conn in 1..=1000u64 {
            let line = serde_json::json!({"ts": 0, "conn": conn, "phase": "closed",
                "method": "CONNECT", "host": "example.com", "port": 443, "allowed": false,
                "reason": "not allowed", "address": null, "bytes_up": 0, "bytes_down": 0});
            writeln!(log, "{line}").unwrap();
        }
        writeln!(log, "{}", "x".repeat(4 << 20)).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let r = Running {
            socket: own.join("egress.sock"),
            dir: own.clone(),
            pid: nix::unistd::Pid::from_raw(child.id() as i32),
            log,
            record_limit: 2,
        };
        let (records, unrecorded) = r.finish();
        assert_eq!(records.len(), 2 * 2 + 64);
        assert!(unrecorded.is_none());
        assert!(!own.exists(), "its directory is removed");
        // finish reaped it already; this only satisfies the type
        let _ = child.try_wait();
    }
}
