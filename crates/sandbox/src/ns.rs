//! The `ns` backend: Linux namespaces, a minimal pivot_root'ed filesystem,
//! an init process, and the command.
//!
//! Three processes:
//! - the *supervisor* (the caller, on the host) creates the cgroup, clones
//!   the init into fresh namespaces, writes its uid/gid maps, enforces the
//!   timeout and collects the result;
//! - the *init* (pid 1 inside) builds the root filesystem, hands the
//!   supervisor a descriptor to the overlay's upper directory, forks the
//!   command, forwards signals, reaps, and when the command ends takes every
//!   remaining process down with it;
//! - the *command* drops everything (rlimits, no_new_privs, landlock,
//!   capabilities, seccomp, in that order) and execs.
//!
//! The supervisor and init talk over a SOCK_SEQPACKET pair; the command
//! reports a failed exec to init over a close-on-exec pipe.

use std::ffi::{CString, OsStr};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, pivot_root, Pid};
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;
use crate::error::{ExecFailure, Layer, RunError, SetupError};
use crate::spec::{
    Network, SandboxSpec, HOME_DIR, HOSTNAME, PROXY_ADDR, PROXY_SOCKET, WORKSPACE_DIR,
};
use crate::{caps, landlock_layer, seccomp};

/// How a finished command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
    Timeout,
    Oom,
}

/// What a finished sandbox hands back.
#[derive(Debug)]
pub struct Outcome {
    pub ended: Ended,
    /// From the clone of init to the reaping of init.
    pub duration: Duration,
    /// From the clone of init to the command's successful exec.
    pub setup: Duration,
    /// The overlay's upper directory: every change made under /workspace.
    /// It stays readable after the sandbox is gone.
    pub upper: OwnedFd,
    pub oom_kills: u64,
    pub memory_peak: Option<u64>,
    /// Landlock ABI in force for the command (0: layer off).
    pub landlock_abi: u32,
    /// The repo was shown through an idmapped mount (its owner is root
    /// inside); without it, files the sandbox's user does not own are
    /// read-only inside.
    pub repo_idmapped: bool,
    /// A cgroup held the sandbox (only when a limit asked for one).
    pub cgroup: bool,
}

/// Messages from init to the supervisor.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    /// Supervisor to init: maps are written, the cgroup is joined.
    Go,
    /// Sent with the upper directory's descriptor attached.
    Upper,
    Started {
        landlock_abi: u32,
    },
    SetupFailed(SetupError),
    ExecFailed {
        kind: ExecFailure,
        reason: String,
    },
    Finished(Ended),
}

/// Messages from the command child to init (over the exec pipe).
#[derive(Debug, Serialize, Deserialize)]
enum ChildReport {
    Setup(SetupError),
    Exec { kind: ExecFailure, reason: String },
    LandlockAbi(u32),
}

/// Everything the child side needs, prepared before the clone so that no
/// work after it can fail for reasons the supervisor could have checked.
struct Prepared<'a> {
    spec: &'a SandboxSpec,
    argv: Vec<CString>,
    envp: Vec<CString>,
    program: CString,
    filters: Option<seccomp::Filters>,
    last_cap: u32,
    etc: crate::etc::EtcView,
    system_dirs: Vec<SystemDir>,
    /// A detached, idmapped, read-only clone of the repo (supervisor runs as
    /// root): its owner appears as root inside, so the agent can edit it.
    repo_tree: Option<OwnedFd>,
}

enum SystemDir {
    Symlink(&'static str, PathBuf),
    Bind(&'static str),
}

/// Directories of the host that are shown read-only (or recreated as the
/// same symlinks where the host has merged /usr).
const SYSTEM_DIRS: [&str; 8] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
];

fn read_system_dirs() -> Vec<SystemDir> {
    let mut out = Vec::new();
    for d in SYSTEM_DIRS {
        let p = Path::new("/").join(d);
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.file_type().is_symlink() => {
                if let Ok(t) = std::fs::read_link(&p) {
                    out.push(SystemDir::Symlink(d, t));
                }
            }
            Ok(md) if md.is_dir() => out.push(SystemDir::Bind(d)),
            _ => {}
        }
    }
    out
}

fn cstring(s: &OsStr, what: &str) -> Result<CString, SetupError> {
    CString::new(s.as_bytes())
        .map_err(|_| SetupError::new(Layer::Spec, format!("{what} contains a NUL byte")))
}

/// Find `argv0` in the sandbox's PATH, the way execvp would, but with the
/// sandbox's environment rather than ours. Paths are checked from inside,
/// so this runs in the command child.
fn resolve_program(
    argv0: &CString,
    path_var: Option<&[u8]>,
) -> Result<CString, (ExecFailure, String)> {
    let bytes = argv0.as_bytes();
    if bytes.contains(&b'/') {
        return Ok(argv0.clone());
    }
    let path = path_var.unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    let mut saw_eacces = false;
    for dir in path.split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(bytes);
        let Ok(c) = CString::new(full) else { continue };
        match nix::unistd::access(c.as_c_str(), nix::unistd::AccessFlags::X_OK) {
            Ok(()) => {
                if std::fs::metadata(OsStr::from_bytes(c.as_bytes()))
                    .map(|m| m.is_file())
                    .unwrap_or(false)
                {
                    return Ok(c);
                }
                saw_eacces = true;
            }
            Err(nix::errno::Errno::EACCES) => saw_eacces = true,
            Err(_) => {}
        }
    }
    if saw_eacces {
        Err((ExecFailure::NotExecutable, "permission denied".into()))
    } else {
        Err((ExecFailure::NotFound, "command not found".into()))
    }
}

/// Run `spec` to completion.
pub fn run(spec: &SandboxSpec) -> Result<Outcome, RunError> {
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstring(a, "an argument"))
        .collect::<Result<_, _>>()?;
    if argv.is_empty() {
        return Err(SetupError::new(Layer::Spec, "no command given").into());
    }
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            CString::new(b).map_err(|_| {
                SetupError::new(Layer::Spec, "an environment variable contains a NUL byte")
            })
        })
        .collect::<Result<_, _>>()?;
    let filters = if spec.layers.seccomp {
        Some(seccomp::compile()?)
    } else {
        None
    };
    let repo_tree = match &spec.repo {
        Some(repo) if nix::unistd::geteuid().is_root() => {
            idmapped_tree(repo, spec.repo_fd, spec.root_maps_to)
        }
        _ => None,
    };
    let prepared = Prepared {
        repo_tree,
        spec,
        program: argv[0].clone(),
        argv,
        envp,
        filters,
        last_cap: caps::probe_last_cap(),
        etc: crate::etc::prepare()?,
        system_dirs: read_system_dirs(),
    };

    let name = format!("agentvm-{}-{}", std::process::id(), unique());
    let cgroup = if spec.layers.cgroup {
        Cgroup::create(&spec.limits, spec.cgroup_parent.as_deref(), &name)?
    } else {
        None
    };
    // the command shares the caller's terminal: whatever it leaves the
    // settings in (raw mode, no echo), the caller gets its own back
    let tty = Terminal::save();
    let result = supervise(&prepared, cgroup.as_ref());
    if let Some(t) = tty {
        t.restore();
    }
    if let Some(cg) = &cgroup {
        cg.destroy();
    }
    result
}

/// The caller's terminal settings, to put back when the sandbox is done.
struct Terminal {
    fd: RawFd,
    termios: nix::sys::termios::Termios,
}

impl Terminal {
    fn save() -> Option<Terminal> {
        [0, 1, 2].into_iter().find_map(|fd| {
            // SAFETY: fds 0-2 are borrowed for the call only.
            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            nix::sys::termios::tcgetattr(b)
                .ok()
                .map(|termios| Terminal { fd, termios })
        })
    }

    fn restore(&self) {
        // from a background process group, tcsetattr would stop us with
        // SIGTTOU unless it is blocked
        let mut ttou = SigSet::empty();
        ttou.add(Signal::SIGTTOU);
        let mut old = SigSet::empty();
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&ttou),
            Some(&mut old),
        );
        // SAFETY: the fd was a terminal of ours when saved; borrowed for
        // the call only.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = nix::sys::termios::tcsetattr(b, nix::sys::termios::SetArg::TCSANOW, &self.termios);
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&old),
            None,
        );
    }
}

fn unique() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// fork(2) into new namespaces. Returns 0 in the child.
fn clone_into(flags: u64) -> Result<i32, SetupError> {
    let mut args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack behaves like
    // fork(2): the child gets a copy of this single-threaded process and
    // continues from here. `args` is a valid clone_args of the given size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        let layer = if flags & libc::CLONE_NEWUSER as u64 != 0 {
            Layer::UserNamespace
        } else {
            Layer::Namespaces
        };
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) => " (user.max_user_namespaces or a namespace limit is exhausted)",
            Some(libc::EPERM) => " (are unprivileged user namespaces allowed? see kernel.unprivileged_userns_clone / apparmor_restrict_unprivileged_userns)",
            _ => "",
        };
        return Err(SetupError::os(layer, "clone3", format!("{e}{hint}")));
    }
    Ok(r as i32)
}

fn send(sock: &OwnedFd, msg: &Report, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let iov = [IoSlice::new(&bytes)];
    let fds;
    let cmsg: Vec<ControlMessage> = match fd {
        Some(f) => {
            fds = [f];
            vec![ControlMessage::ScmRights(&fds)]
        }
        None => Vec::new(),
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receive one report; `Ok(None)` on end of stream.
fn recv(sock: &OwnedFd) -> std::io::Result<Option<(Report, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: the kernel just installed this descriptor in
                    // our table for us; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    if n == 0 {
        return Ok(None);
    }
    let r: Report = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
    Ok(Some((r, fd)))
}

fn write_map(pid: i32, file: &str, content: &str) -> Result<(), SetupError> {
    std::fs::write(format!("/proc/{pid}/{file}"), content).map_err(|e| {
        SetupError::os(
            Layer::UserNamespace,
            format!("writing {file} {content:?}"),
            e,
        )
    })
}

fn supervise(p: &Prepared, cgroup: Option<&Cgroup>) -> Result<Outcome, RunError> {
    let spec = p.spec;
    let (parent_sock, child_sock) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| SetupError::os(Layer::Supervisor, "socketpair", e))?;

    // Signals the supervisor forwards, read through a signalfd.
    let mut forward = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        forward.add(s);
    }
    let mut old_mask = SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&forward),
        Some(&mut old_mask),
    )
    .map_err(|e| SetupError::os(Layer::Supervisor, "blocking signals", e))?;
    let restore = scopeguard(move || {
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&old_mask),
            None,
        );
    });

    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let mut flags = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS) as u64;
    if spec.network != Network::Host {
        flags |= libc::CLONE_NEWNET as u64;
    }
    let started = Instant::now();
    let pid = clone_into(flags)?;
    if pid == 0 {
        drop(parent_sock);
        // The init never returns.
        init_main(p, child_sock, euid == 0);
    }
    drop(child_sock);
    let child = Pid::from_raw(pid);
    let kill_child = |sig| {
        let _ = kill(child, sig);
        let _ = waitpid(child, None);
    };

    let setup = (|| -> Result<(), SetupError> {
        if euid == 0 {
            let id = spec.root_maps_to;
            if id == 0 {
                return Err(SetupError::new(
                    Layer::UserNamespace,
                    "root inside the sandbox must not map to the host's root",
                ));
            }
            write_map(pid, "uid_map", &format!("0 {id} 1"))?;
            write_map(pid, "gid_map", &format!("0 {id} 1"))?;
        } else {
            write_map(pid, "setgroups", "deny")?;
            write_map(pid, "uid_map", &format!("0 {euid} 1"))?;
            write_map(pid, "gid_map", &format!("0 {egid} 1"))?;
        }
        if let Some(cg) = cgroup {
            cg.add(pid)?;
        }
        send(&parent_sock, &Report::Go, None)
            .map_err(|e| SetupError::os(Layer::Supervisor, "releasing init", e))
    })();
    if let Err(e) = setup {
        kill_child(Signal::SIGKILL);
        return Err(e.into());
    }

    let sigfd = nix::sys::signalfd::SignalFd::with_flags(
        &forward,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| SetupError::os(Layer::Supervisor, "signalfd", e))?;

    let deadline = spec.limits.timeout.map(|t| started + t);
    let mut upper: Option<OwnedFd> = None;
    let mut setup_time = None;
    let mut landlock_abi = 0;
    let mut ended: Option<Ended> = None;
    let mut failure: Option<RunError> = None;
    loop {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    kill_child(Signal::SIGKILL);
                    ended = Some(Ended::Timeout);
                    break;
                }
                nix::poll::PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32 + 1)
                    .unwrap_or(nix::poll::PollTimeout::MAX)
            }
            None => nix::poll::PollTimeout::NONE,
        };
        let mut fds = [
            nix::poll::PollFd::new(parent_sock.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(sigfd.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                kill_child(Signal::SIGKILL);
                return Err(SetupError::os(Layer::Supervisor, "poll", e).into());
            }
        }
        let sig_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        let sock_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                // A terminal's ^C already reached the command (same process
                // group); forward only what was sent to us explicitly.
                const SI_KERNEL: i32 = 0x80;
                if info.ssi_code != SI_KERNEL {
                    if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                        let _ = kill(child, sig);
                    }
                }
            }
        }
        if !sock_ready {
            continue;
        }
        match recv(&parent_sock) {
            Ok(Some((Report::Upper, fd))) => upper = fd,
            Ok(Some((Report::Started { landlock_abi: abi }, _))) => {
                setup_time = Some(started.elapsed());
                landlock_abi = abi;
            }
            Ok(Some((Report::SetupFailed(e), _))) => failure = Some(e.into()),
            Ok(Some((Report::ExecFailed { kind, reason }, _))) => {
                failure = Some(RunError::Exec {
                    command: String::from_utf8_lossy(p.program.as_bytes()).into_owned(),
                    kind,
                    reason,
                })
            }
            Ok(Some((Report::Finished(e), _))) => ended = Some(e),
            Ok(Some((Report::Go, _))) => {}
            Ok(None) => break,
            Err(e) => {
                kill_child(Signal::SIGKILL);
                return Err(SetupError::os(Layer::Supervisor, "reading init's report", e).into());
            }
        }
        if ended.is_some() || failure.is_some() {
            break;
        }
    }
    // Init exits right after its last report (or was killed): reap it. Its
    // death takes down every process left in its pid namespace.
    if let (Some(Ended::Exited(_) | Ended::Signaled(_)), Some(cg)) = (ended, cgroup) {
        // every other process inside is already dead and reaped
        cg.evict(pid);
    }
    match (ended, &failure) {
        (Some(Ended::Exited(_) | Ended::Signaled(_)), None) => {
            // Init reported the end after it had killed and reaped every
            // other process of the sandbox: nothing of it runs any more.
            // What is left is the kernel tearing its namespaces down when
            // init exits; the caller need not wait for that. Reap init
            // when it is gone, without blocking.
            let _ = kill(child, Signal::SIGKILL);
            if !matches!(
                waitpid(child, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
            ) {
                std::thread::spawn(move || {
                    let _ = waitpid(child, None);
                });
            }
        }
        (Some(Ended::Timeout), _) => {}
        _ => {
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
        }
    }
    let duration = started.elapsed();
    drop(restore);
    if let Some(f) = failure {
        return Err(f);
    }
    let mut ended = match ended {
        Some(e) => e,
        None => {
            return Err(SetupError::new(
                Layer::Supervisor,
                "the sandbox's init ended without reporting how the command ended",
            )
            .into())
        }
    };
    let oom_kills = cgroup.map(|c| c.oom_kills()).unwrap_or(0);
    if oom_kills > 0 && matches!(ended, Ended::Signaled(9)) {
        ended = Ended::Oom;
    }
    let upper = upper.ok_or_else(|| {
        SetupError::new(Layer::Supervisor, "init did not hand over the workspace")
    })?;
    Ok(Outcome {
        ended,
        duration,
        setup: setup_time.unwrap_or(duration),
        upper,
        oom_kills,
        memory_peak: cgroup.and_then(|c| c.memory_peak()),
        landlock_abi,
        repo_idmapped: p.repo_tree.is_some(),
        cgroup: cgroup.is_some(),
    })
}

/// Run `f` when the guard is dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    G(Some(f))
}

// ---------------------------------------------------------------- init side

/// Overwrite this process's command line and environment (the copy init
/// inherited from the supervisor: host paths, the repo, flags) so that
/// `/proc/1/cmdline` inside shows only `agentvm-init`. Rust's own copies
/// of argv are not used after this in init.
fn blank_cmdline() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // fields after "(comm)": 48-51 of stat are arg_start, arg_end,
    // env_start, env_end
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return;
    };
    let f: Vec<usize> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // rest starts at field 3
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let title = b"agentvm-init\0";
    for (start, end, text) in [
        (field(48), field(49), &title[..]),
        (field(50), field(51), &b""[..]),
    ] {
        if start == 0 || end <= start {
            continue;
        }
        let len = end - start;
        // SAFETY: [start, end) is this process's own argument (or
        // environment) area as the kernel reports it: mapped, writable
        // stack memory nothing else in init reads any more.
        unsafe {
            let p = start as *mut u8;
            std::ptr::write_bytes(p, 0, len);
            let n = text.len().min(len);
            std::ptr::copy_nonoverlapping(text.as_ptr(), p, n);
        }
    }
}

fn init_main(p: &Prepared, sock: OwnedFd, host_root: bool) -> ! {
    blank_cmdline();
    // Die with the supervisor.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // Every signal is handled synchronously below.
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&SigSet::all()),
        None,
    );
    let code = match init_inner(p, &sock, host_root) {
        Ok(()) => 0,
        Err(e) => {
            let _ = send(&sock, &Report::SetupFailed(e), None);
            1
        }
    };
    // SAFETY: _exit never returns and runs no destructors or atexit
    // handlers that belong to the supervisor.
    unsafe { libc::_exit(code) }
}

fn wait_go(sock: &OwnedFd) -> Result<(), SetupError> {
    match recv(sock) {
        Ok(Some((Report::Go, _))) => Ok(()),
        Ok(Some(_)) => Err(SetupError::new(Layer::Supervisor, "unexpected message")),
        Ok(None) => Err(SetupError::new(
            Layer::Supervisor,
            "the supervisor went away",
        )),
        Err(e) => Err(SetupError::os(
            Layer::Supervisor,
            "waiting for the supervisor",
            e,
        )),
    }
}

fn os(layer: Layer, what: impl std::fmt::Display) -> impl FnOnce(nix::errno::Errno) -> SetupError {
    move |e| SetupError::os(layer, what, e)
}

fn init_inner(p: &Prepared, sock: &OwnedFd, host_root: bool) -> Result<(), SetupError> {
    wait_go(sock)?;
    // Our maps are written: become root of the new user namespace. When the
    // supervisor is the host's root, root's supplementary groups (gid 0
    // among them) must not follow us in.
    if host_root {
        nix::unistd::setgroups(&[]).map_err(os(Layer::UserNamespace, "setgroups"))?;
    }
    nix::unistd::setresgid(0.into(), 0.into(), 0.into())
        .map_err(os(Layer::UserNamespace, "setresgid"))?;
    nix::unistd::setresuid(0.into(), 0.into(), 0.into())
        .map_err(os(Layer::UserNamespace, "setresuid"))?;
    // A change of credentials clears the parent-death signal: arm it again.
    // (Should the supervisor already be gone, the next report to it fails
    // and init exits.)
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // Only now, inside the cgroup the supervisor put us in.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(os(Layer::Namespaces, "unshare(CLONE_NEWCGROUP)"))?;

    let upper = build_root(p)?;
    send(sock, &Report::Upper, Some(upper.as_raw_fd()))
        .map_err(|e| SetupError::os(Layer::Supervisor, "handing over the workspace", e))?;
    drop(upper);

    nix::unistd::sethostname(HOSTNAME).map_err(os(Layer::Namespaces, "sethostname"))?;
    if p.spec.network != Network::Host {
        loopback_up()?;
    }
    if p.spec.network == Network::Proxied {
        start_bridge(p)?;
    }
    // Nothing inside may trace or read init.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong) };

    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(os(Layer::Supervisor, "pipe2"))?;
    // SAFETY: fork in a single-threaded process.
    let child = match unsafe { nix::unistd::fork() } {
        Err(e) => return Err(SetupError::os(Layer::Supervisor, "fork", e)),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            command_main(p, wr)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
    };
    drop(wr);
    let mut buf = Vec::new();
    let _ = std::fs::File::from(rd).read_to_end(&mut buf);
    let mut landlock_abi = 0;
    if !buf.is_empty() {
        // The reports are newline-separated; the last one decides.
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<ChildReport>(line) {
                Ok(ChildReport::LandlockAbi(a)) => landlock_abi = a,
                Ok(ChildReport::Setup(e)) => {
                    let _ = waitpid(child, None);
                    return Err(e);
                }
                Ok(ChildReport::Exec { kind, reason }) => {
                    let _ = waitpid(child, None);
                    let _ = send(sock, &Report::ExecFailed { kind, reason }, None);
                    return Ok(());
                }
                Err(e) => return Err(SetupError::os(Layer::Supervisor, "child report", e)),
            }
        }
    }
    send(sock, &Report::Started { landlock_abi }, None)
        .map_err(|e| SetupError::os(Layer::Supervisor, "reporting the start", e))?;
    // Init keeps no privilege it does not need to reap and kill.
    let _ = caps::no_new_privs();
    let _ = caps::drop_all(p.last_cap);

    let ended = reap_until(child, sock);
    // Take every other process in the namespace down with the command.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while waitpid(Pid::from_raw(-1), None).is_ok() {}
    let _ = send(sock, &Report::Finished(ended), None);
    Ok(())
}

/// Forward signals to the command and reap everything until it ends.
fn reap_until(child: Pid, sock: &OwnedFd) -> Ended {
    let all = SigSet::all();
    loop {
        // Reap whatever is ready before sleeping again.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ended::Exited(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    return Ended::Signaled(sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        match all.wait() {
            Ok(Signal::SIGCHLD) => continue,
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => {
                // should not happen; avoid a hot loop
                let _ = sock;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn loopback_up() -> Result<(), SetupError> {
    let sock = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(os(Layer::Network, "socket"))?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(SetupError::os(
                Layer::Network,
                "SIOCGIFFLAGS lo",
                std::io::Error::last_os_error(),
            ));
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(SetupError::os(
                Layer::Network,
                "bringing lo up",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- bridge

/// Fork the bridge: a loopback listener inside the sandbox that forwards
/// every connection to the proxy's socket. It is confined like the command
/// (no capabilities, no_new_privs, seccomp) and dies with init. Returns
/// once it listens.
fn start_bridge(p: &Prepared) -> Result<(), SetupError> {
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(os(Layer::Network, "pipe2"))?;
    // SAFETY: fork in a single-threaded process (init).
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SetupError::os(
            Layer::Network,
            "forking the proxy bridge",
            e,
        )),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            let code = match bridge_main(p, wr) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(code) }
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(wr);
            let mut b = [0u8; 1];
            match nix::unistd::read(rd.as_raw_fd(), &mut b) {
                Ok(1) => Ok(()),
                _ => Err(SetupError::new(
                    Layer::Network,
                    format!("the proxy bridge could not listen on {PROXY_ADDR}"),
                )),
            }
        }
    }
}

fn bridge_main(p: &Prepared, ready: OwnedFd) -> Result<(), SetupError> {
    use std::os::unix::net::UnixStream;
    let l = std::net::TcpListener::bind(PROXY_ADDR)
        .map_err(|e| SetupError::os(Layer::Network, PROXY_ADDR, e))?;
    caps::no_new_privs()?;
    caps::drop_all(p.last_cap)?;
    if let Some(f) = &p.filters {
        seccomp::install(f)?;
    }
    let _ = nix::unistd::write(&ready, b"1");
    drop(ready);
    for conn in l.incoming() {
        let Ok(tcp) = conn else { continue };
        std::thread::spawn(move || {
            let Ok(unix) = UnixStream::connect(PROXY_SOCKET) else {
                return;
            };
            let (Ok(mut t2), Ok(mut u2)) = (tcp.try_clone(), unix.try_clone()) else {
                return;
            };
            let (mut t1, mut u1) = (tcp, unix);
            let up = std::thread::spawn(move || {
                pump(&mut t1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Write);
            });
            pump(&mut u2, &mut t2);
            let _ = t2.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        });
    }
    Ok(())
}

/// Copy until end of stream: splice(2) through a pipe (no copy through
/// this process), or a large buffer where splice is not possible.
fn pump<A: Read + AsRawFd, B: Write + AsRawFd>(from: &mut A, to: &mut B) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        // SAFETY: the kernel just gave us these descriptors.
        let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl with an integer argument (best effort).
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
        let splice = |a: RawFd, b: RawFd, n: usize| {
            // SAFETY: splice between descriptors we hold, no offsets.
            unsafe {
                libc::splice(
                    a,
                    std::ptr::null_mut(),
                    b,
                    std::ptr::null_mut(),
                    n,
                    libc::SPLICE_F_MOVE,
                )
            }
        };
        loop {
            let n = splice(from.as_raw_fd(), pw.as_raw_fd(), 1 << 20);
            if n <= 0 {
                if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return;
                }
                break; // not spliceable: copy instead
            }
            let mut left = n as usize;
            while left > 0 {
                let m = splice(pr.as_raw_fd(), to.as_raw_fd(), left);
                if m <= 0 {
                    return;
                }
                left -= m as usize;
            }
        }
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ------------------------------------------------------------ filesystem

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Clone `repo` as a detached mount whose owner (uid and gid of the repo
/// directory) appears as `to`, i.e. root inside the sandbox. Needs the
/// host's root; `None` where the kernel or the filesystem cannot do it (the
/// repo is then bound as it is).
fn idmapped_tree(repo: &Path, repo_fd: Option<RawFd>, to: u32) -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    // the caller's descriptor when there is one (the directory it vetted),
    // else the path
    let (uid, gid) = match repo_fd {
        Some(fd) => {
            let st = nix::sys::stat::fstat(fd).ok()?;
            (st.st_uid, st.st_gid)
        }
        None => {
            let md = std::fs::metadata(repo).ok()?;
            (md.uid(), md.gid())
        }
    };
    let userns = helper_userns(uid, gid, to)?;
    let path = CString::new(repo.as_os_str().as_bytes()).ok()?;
    let (dirfd, name, extra) = match repo_fd {
        Some(fd) => (fd, c"".as_ptr(), libc::AT_EMPTY_PATH as libc::c_uint),
        None => (libc::AT_FDCWD, path.as_ptr(), 0),
    };
    // SAFETY: open_tree with a valid descriptor and a NUL-terminated path;
    // returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dirfd,
            name,
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint | extra,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: empty NUL-terminated path with AT_EMPTY_PATH on our fd; attr
    // is a valid mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    (r == 0).then_some(tree)
}

/// A user namespace whose only mapping is `uid`/`gid` -> `to`, used as
/// the idmapping of a mount. Its one process is gone when this returns.
fn helper_userns(uid: u32, gid: u32, to: u32) -> Option<OwnedFd> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    let pid = clone_into(libc::CLONE_NEWUSER as u64).ok()?;
    if pid == 0 {
        drop(wr);
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(rd.as_raw_fd(), &mut b);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(0) }
    }
    drop(rd);
    let ns = (|| {
        write_map(pid, "uid_map", &format!("{uid} {to} 1")).ok()?;
        write_map(pid, "gid_map", &format!("{gid} {to} 1")).ok()?;
        std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .ok()
            .map(OwnedFd::from)
    })();
    drop(wr);
    let _ = waitpid(Pid::from_raw(pid), None);
    ns
}

fn move_mount(tree: &OwnedFd, dst: &Path) -> Result<(), SetupError> {
    let c = CString::new(dst.as_os_str().as_bytes())
        .map_err(|_| SetupError::new(Layer::Mounts, "path contains a NUL byte"))?;
    // SAFETY: both paths are NUL-terminated; the fd is ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            format!("attaching the repo at {}", dst.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Make `rel` (beneath the directory `base`) read-only: resolved without
/// following any symlink or leaving `base`, cloned as a detached mount,
/// made read-only, and attached over itself. A path that is not there,
/// or not a plain file or directory, is skipped.
fn bind_ro_beneath(base: &OwnedFd, rel: &Path) -> Result<(), SetupError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd = match nix::fcntl::openat2(base.as_raw_fd(), rel, how) {
        Ok(fd) => fd,
        Err(
            nix::errno::Errno::ENOENT
            | nix::errno::Errno::ELOOP
            | nix::errno::Errno::ENOTDIR
            | nix::errno::Errno::EXDEV,
        ) => return Ok(()),
        Err(e) => {
            return Err(SetupError::os(
                Layer::Mounts,
                format!("opening /workspace/{}", rel.display()),
                e,
            ))
        }
    };
    // SAFETY: openat2 just returned this descriptor; we own it.
    let target = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(target.as_raw_fd()).map_err(os(
        Layer::Mounts,
        format!("checking /workspace/{}", rel.display()),
    ))?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFDIR && fmt != libc::S_IFREG {
        return Ok(());
    }
    let what = || format!("making /workspace/{} read-only", rel.display());
    // SAFETY: open_tree on our descriptor with an empty NUL-terminated
    // path; returns a new fd or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            target.as_raw_fd(),
            c"".as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as u32)
                as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            what(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: empty path with AT_EMPTY_PATH on our fd; attr is a valid
    // mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            what(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors are ours; empty paths with the EMPTY_PATH
    // flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            (libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH) as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            what(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Set attributes on the mount at `path` (and everything below it when
/// `recursive`), leaving every other attribute alone; this keeps the
/// flags the kernel locked on mounts we inherited.
fn set_attr(path: &Path, set: u64, recursive: bool) -> Result<(), SetupError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SetupError::new(Layer::Mounts, "path contains a NUL byte"))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: the path is NUL-terminated and `attr` is a valid mount_attr
    // of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::ENOSYS) {
            " (mount_setattr needs Linux 5.12 or later)"
        } else {
            ""
        };
        return Err(SetupError::os(
            Layer::Mounts,
            format!("making {} read-only", path.display()),
            format!("{e}{hint}"),
        ));
    }
    Ok(())
}

fn do_mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SetupError> {
    mount(src, dst, fstype, flags, data).map_err(|e| {
        SetupError::os(
            Layer::Mounts,
            format!(
                "mounting {} on {}",
                src.map(|s| s.display().to_string())
                    .unwrap_or_else(|| fstype.unwrap_or("?").to_string()),
                dst.display()
            ),
            e,
        )
    })
}

fn bind(src: &Path, dst: &Path, attrs: u64) -> Result<(), SetupError> {
    do_mount(
        Some(src),
        dst,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    if attrs != 0 {
        set_attr(dst, attrs, true)?;
    }
    Ok(())
}

fn mkdir_p(p: &Path) -> Result<(), SetupError> {
    std::fs::create_dir_all(p)
        .map_err(|e| SetupError::os(Layer::Mounts, format!("creating {}", p.display()), e))
}

fn touch(p: &Path) -> Result<(), SetupError> {
    if let Some(d) = p.parent() {
        mkdir_p(d)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(|_| ())
        .map_err(|e| SetupError::os(Layer::Mounts, format!("creating {}", p.display()), e))
}

fn symlink(target: &Path, link: &Path) -> Result<(), SetupError> {
    if let Some(d) = link.parent() {
        mkdir_p(d)?;
    }
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| SetupError::os(Layer::Mounts, format!("linking {}", link.display()), e))
}

fn chmod(p: &Path, mode: u32) -> Result<(), SetupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SetupError::os(Layer::Mounts, format!("chmod {}", p.display()), e))
}

/// The host path `p` as seen from the staging root (where the host's root
/// is mounted at /oldroot).
fn host(p: &Path) -> PathBuf {
    Path::new("/oldroot").join(p.strip_prefix("/").unwrap_or(p))
}

/// Build the sandbox's root and pivot into it. Returns the overlay's upper
/// directory, which the supervisor reads the changes from.
fn build_root(p: &Prepared) -> Result<OwnedFd, SetupError> {
    let spec = p.spec;
    let none: Option<&Path> = None;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // Nothing we do here may propagate back to the host.
    do_mount(
        none,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;

    // A staging tmpfs becomes the root for a moment; the host's root stays
    // reachable at /oldroot so every bind source is read by its host path.
    let stage = Path::new("/tmp");
    do_mount(
        none,
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700,size=64k"),
    )?;
    mkdir_p(&stage.join("oldroot"))?;
    chdir(stage).map_err(os(Layer::Mounts, "chdir to the staging root"))?;
    pivot_root(".", "oldroot").map_err(os(Layer::Mounts, "pivot_root into the staging root"))?;
    chdir("/").map_err(os(Layer::Mounts, "chdir /"))?;

    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // The new root: read-only once built.
    let root = Path::new("/newroot");
    mkdir_p(root)?;
    do_mount(
        none,
        root,
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=0755,size=16m"),
    )?;
    // The scratch tmpfs holds everything the sandbox may write; its size is
    // the disk limit.
    let scratch = Path::new("/scratch");
    mkdir_p(scratch)?;
    let data = format!("mode=0755,size={}", spec.limits.disk.max(4096));
    do_mount(none, scratch, Some("tmpfs"), nosuid_nodev, Some(&data))?;
    for (d, mode) in [
        ("upper", 0o755),
        ("work", 0o700),
        ("tmp", 0o1777),
        ("home", 0o700),
        ("shm", 0o1777),
    ] {
        mkdir_p(&scratch.join(d))?;
        chmod(&scratch.join(d), mode)?;
    }

    // System directories, read-only (or the same symlinks the host has).
    let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    for d in &p.system_dirs {
        match d {
            SystemDir::Symlink(name, target) => symlink(target, &root.join(name))?,
            SystemDir::Bind(name) => {
                let dst = root.join(name);
                mkdir_p(&dst)?;
                bind(&host(Path::new("/").join(name).as_path()), &dst, ro)?;
            }
        }
    }

    // /etc: the prepared allowlist view, with a few host directories on top.
    let etc = root.join("etc");
    mkdir_p(&etc)?;
    bind(&host(&p.etc.dir), &etc, ro)?;
    for name in &p.etc.bind_dirs {
        bind(&host(&Path::new("/etc").join(name)), &etc.join(name), ro)?;
    }

    // Writable areas, all on the scratch tmpfs.
    let tmp = root.join("tmp");
    mkdir_p(&tmp)?;
    bind(&scratch.join("tmp"), &tmp, 0)?;
    let home = root.join(HOME_DIR.trim_start_matches('/'));
    mkdir_p(&home)?;
    bind(&scratch.join("home"), &home, 0)?;

    // /workspace: overlay of the repo (read-only lower) and the scratch upper.
    let lower = Path::new("/lower");
    mkdir_p(lower)?;
    if let Some(tree) = &p.repo_tree {
        move_mount(tree, lower)?;
    } else if let Some(repo) = &spec.repo {
        // Reopen the repo inside this namespace, check it is the directory
        // the caller vetted, and bind from the open descriptor: nothing can
        // be swapped between the check and the mount.
        let opened = nix::fcntl::open(
            &host(repo),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(os(
            Layer::Mounts,
            format!("opening the repo {}", repo.display()),
        ))?;
        // SAFETY: open just returned this descriptor; we own it.
        let opened = unsafe { OwnedFd::from_raw_fd(opened) };
        if let Some(fd) = spec.repo_fd {
            let a = nix::sys::stat::fstat(fd)
                .map_err(os(Layer::Mounts, "checking the repo descriptor"))?;
            let b = nix::sys::stat::fstat(opened.as_raw_fd())
                .map_err(os(Layer::Mounts, "checking the repo"))?;
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
                return Err(SetupError::new(
                    Layer::Mounts,
                    format!(
                        "the repo {} was replaced while the sandbox was being set up",
                        repo.display()
                    ),
                ));
            }
        }
        let via = PathBuf::from(format!("/oldroot/proc/self/fd/{}", opened.as_raw_fd()));
        bind(&via, lower, ro)?;
    }
    let ws = root.join(WORKSPACE_DIR.trim_start_matches('/'));
    mkdir_p(&ws)?;
    do_mount(
        Some(Path::new("overlay")),
        &ws,
        Some("overlay"),
        nosuid_nodev,
        Some("lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work,userxattr"),
    )?;
    // What a shell, an editor, git or CI would run later: read-only inside
    // (new files can still be made, but apply refuses to carry them out).
    if !spec.protected.is_empty() {
        let wsfd = nix::fcntl::open(
            &ws,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(os(Layer::Mounts, "opening /workspace"))?;
        // SAFETY: open just returned this descriptor; we own it.
        let wsfd = unsafe { OwnedFd::from_raw_fd(wsfd) };
        for rel in &spec.protected {
            bind_ro_beneath(&wsfd, rel)?;
        }
    }
    // The repo's own git directory is read-only inside.
    let git = ws.join(".git");
    if let Ok(md) = std::fs::symlink_metadata(&git) {
        if md.is_dir() || md.is_file() {
            bind(&git, &git, ro)?;
        }
    }

    // /dev: a few device nodes of the host, a private devpts and /dev/shm.
    // /dev: a directory of the (soon read-only) root holding a few device
    // nodes of the host, a private devpts and /dev/shm.
    let dev = root.join("dev");
    mkdir_p(&dev)?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let d = dev.join(n);
        touch(&d)?;
        bind(
            &host(&Path::new("/dev").join(n)),
            &d,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        )?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    do_mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    symlink(Path::new("pts/ptmx"), &dev.join("ptmx"))?;
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    bind(
        &scratch.join("shm"),
        &shm,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
    )?;
    for (n, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(Path::new(t), &dev.join(n))?;
    }

    // A fresh /proc for the new pid namespace, with the kernel's knobs
    // read-only and its most revealing files masked.
    let proc_ = root.join("proc");
    mkdir_p(&proc_)?;
    do_mount(
        Some(Path::new("proc")),
        &proc_,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    for n in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
        let path = proc_.join(n);
        if path.exists() {
            bind(&path, &path, ro)?;
        }
    }
    // Files the host's root owns with mode 0400 (kcore, kmsg, kpage*,
    // vmallocinfo, ...) are already unreadable to root of a user namespace;
    // these are world-readable and tell too much about the host.
    for n in [
        "keys",
        "key-users",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "kallsyms",
        // the host's kernel command line, build config and boot id
        "cmdline",
        "config.gz",
        "sys/kernel/random/boot_id",
    ] {
        let path = proc_.join(n);
        if path.exists() {
            bind(&dev.join("null"), &path, ro)?;
        }
    }
    for n in ["acpi", "scsi"] {
        let path = proc_.join(n);
        if path.is_dir() {
            do_mount(
                none,
                &path,
                Some("tmpfs"),
                nosuid_nodev,
                Some("size=0,mode=0555"),
            )?;
            set_attr(&path, ro, false)?;
        }
    }

    // The egress proxy's socket, the sandbox's only way out.
    if spec.network == Network::Proxied {
        let sock = spec
            .proxy_socket
            .as_ref()
            .ok_or_else(|| SetupError::new(Layer::Network, "allow mode without a proxy socket"))?;
        let dst = root.join(PROXY_SOCKET.trim_start_matches('/'));
        touch(&dst)?;
        bind(
            &host(sock),
            &dst,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )?;
    }

    // Extra read-only binds the caller asked for.
    for b in &spec.ro_binds {
        let dst = root.join(b.dst.strip_prefix("/").unwrap_or(&b.dst));
        if !dst.exists() {
            // the host's paths are under /oldroot at this point
            if host(&b.src).is_dir() {
                mkdir_p(&dst)?;
            } else {
                touch(&dst)?;
            }
        }
        bind(&host(&b.src), &dst, ro)?;
    }

    // The upper directory, for the supervisor.
    let upper = nix::fcntl::open(
        "/scratch/upper",
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(os(Layer::Mounts, "opening the upper directory"))?;
    // SAFETY: open just returned this descriptor; we own it.
    let upper = unsafe { OwnedFd::from_raw_fd(upper) };

    // Into the new root; the staging root (and the host's) goes away.
    chdir(root).map_err(os(Layer::Mounts, "chdir to the new root"))?;
    pivot_root(".", ".").map_err(os(Layer::Mounts, "pivot_root into the new root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(os(Layer::Mounts, "detaching the host's root"))?;
    chdir("/").map_err(os(Layer::Mounts, "chdir /"))?;
    set_attr(Path::new("/"), ro, false)?;
    Ok(upper)
}

// ----------------------------------------------------------- command side

fn command_main(p: &Prepared, report: OwnedFd) -> ! {
    let mut out = std::fs::File::from(report);
    let err = match command_setup(p, &mut out) {
        Ok(e) => e,
        Err(e) => ChildReport::Setup(e),
    };
    if let Ok(mut line) = serde_json::to_vec(&err) {
        line.push(b'\n');
        let _ = out.write_all(&line);
    }
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(127) }
}

/// Apply every layer to this process and exec. Returns only on failure.
fn command_setup(p: &Prepared, report: &mut std::fs::File) -> Result<ChildReport, SetupError> {
    let spec = p.spec;
    // Signals: default dispositions, nothing blocked (both survive exec).
    for s in Signal::iterator() {
        if s != Signal::SIGKILL && s != Signal::SIGSTOP {
            // SAFETY: installing SIG_DFL is always sound.
            let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl) };
        }
    }
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    chdir(WORKSPACE_DIR).map_err(os(Layer::Mounts, "chdir /workspace"))?;
    // Only stdin, stdout and stderr cross the exec.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(os(Layer::Rlimits, "RLIMIT_CORE"))?;

    caps::no_new_privs()?;
    if spec.layers.landlock {
        let abi = landlock_layer::restrict(&["/workspace", "/tmp", HOME_DIR, "/dev"])?;
        if let Ok(mut line) = serde_json::to_vec(&ChildReport::LandlockAbi(abi)) {
            line.push(b'\n');
            let _ = report.write_all(&line);
        }
    }
    caps::drop_all(p.last_cap)?;

    let path_var = p
        .envp
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="));
    let program = match resolve_program(&p.program, path_var) {
        Ok(prog) => prog,
        Err((kind, reason)) => return Ok(ChildReport::Exec { kind, reason }),
    };
    if let Some(f) = &p.filters {
        seccomp::install(f)?;
    }
    let e = nix::unistd::execve(&program, &p.argv, &p.envp).err();
    let (kind, reason) = match e {
        Some(nix::errno::Errno::ENOENT) => (
            ExecFailure::NotFound,
            "no such file or directory".to_string(),
        ),
        Some(e) => (ExecFailure::NotExecutable, e.desc().to_lowercase()),
        None => (ExecFailure::NotExecutable, "exec returned".to_string()),
    };
    Ok(ChildReport::Exec { kind, reason })
}
