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
use crate::policy::ProcRule;
use crate::spec::{
    Network, SandboxSpec, Stdio, HOME_DIR, HOSTNAME, PROXY_ADDR, PROXY_SOCKET, WORKSPACE_DIR,
};
use crate::{caps, landlock_layer, seccomp};

mod bridge;
mod command;
pub mod control;
mod init;
mod mounts;
mod ports;
mod protocol;
mod pty;
mod rootfs;
mod supervisor;

use self::bridge::*;
use self::command::*;
use self::init::*;
use self::mounts::*;
use self::ports::*;
pub use self::ports::{PORT_OPEN, PORT_REFUSED};
use self::protocol::*;
pub use self::pty::receive_console;
use self::pty::*;
use self::rootfs::*;
use self::supervisor::*;

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
    /// With layers over the repo (`SandboxSpec::stack`): /workspace as it
    /// was before the command ran (layers and repo, read-only), what the
    /// changes in `upper` are changes of. `None`: that is the repo itself.
    pub base: Option<OwnedFd>,
    pub oom_kills: u64,
    pub memory_peak: Option<u64>,
    /// CPU time the sandbox's processes used, where a cgroup counted it.
    pub cpu_time: Option<Duration>,
    /// Landlock ABI in force for the command (0: layer off).
    pub landlock_abi: u32,
    /// The repo was shown through an idmapped mount (its owner is root
    /// inside); without it, files the sandbox's user does not own are
    /// read-only inside.
    pub repo_idmapped: bool,
    /// A cgroup held the sandbox (only when a limit asked for one).
    pub cgroup: bool,
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
    /// policy/proc.txt, parsed before the clone.
    proc_rules: Vec<crate::policy::ProcRule>,
    system_dirs: Vec<SystemDir>,
    /// A detached, idmapped, read-only clone of the repo (supervisor runs as
    /// root): its owner appears as root inside, so the agent can edit it.
    repo_tree: Option<OwnedFd>,
    /// Detached clones of the workspace's layers (supervisor runs as
    /// root), in `spec.stack`'s order: moved into place inside, since the
    /// layer store is not the sandbox user's to walk. Empty when rootless
    /// (the store is the caller's own, reopened by path inside).
    stack_trees: Vec<OwnedFd>,
    /// The same for the image's layers, in `spec.image`'s order.
    image_trees: Vec<OwnedFd>,
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
    if let Some(u) = &spec.user {
        u.check()
            .map_err(|m| SetupError::new(Layer::Spec, format!("the user inside: {m}")))?;
    }
    if spec.ports_listener.is_some() && spec.network == Network::Host {
        return Err(SetupError::new(
            Layer::Network,
            "port forwarding needs the sandbox's own network: with the host's, its loopback is the host's",
        )
        .into());
    }
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
    if spec.image.len() > crate::spec::MAX_STACK {
        return Err(SetupError::new(
            Layer::Spec,
            format!(
                "an image of {} layers; at most {}",
                spec.image.len(),
                crate::spec::MAX_STACK
            ),
        )
        .into());
    }
    // as root, detached clones (the stores are not the sandbox user's to
    // walk); rootless, reopened inside by path and checked
    let clones = |layers: &[crate::spec::StackLayer]| -> Result<Vec<OwnedFd>, SetupError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Vec::new());
        }
        layers
            .iter()
            .map(|l| rootfs::clone_tree(l.fd, &l.path))
            .collect()
    };
    let stack_trees = clones(&spec.stack)?;
    let image_trees = clones(&spec.image)?;
    let prepared = Prepared {
        repo_tree,
        stack_trees,
        image_trees,
        spec,
        program: argv[0].clone(),
        argv,
        envp,
        filters,
        last_cap: caps::probe_last_cap(),
        etc: crate::etc::prepare(spec.user.as_ref())?,
        proc_rules: crate::policy::proc_rules()?,
        system_dirs: read_system_dirs(),
    };

    let name = format!("agentvm-{}-{}", std::process::id(), unique());
    let cgroup = if spec.layers.cgroup {
        Cgroup::create(
            &spec.limits,
            spec.cgroup_parent.as_deref(),
            &name,
            spec.control.is_some(),
        )?
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
