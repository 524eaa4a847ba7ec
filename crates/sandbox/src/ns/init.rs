//! The init side, pid 1 inside: build the root filesystem, hand the
//! supervisor the upper directory, fork the command, forward signals, reap,
//! and take every remaining process down when the command ends.

use super::*;

/// Overwrite this process's command line and environment (the copy init
/// inherited from the supervisor: host paths, the repo, flags) so that
/// `/proc/1/cmdline` inside shows only `agentvm-init`. Rust's own copies
/// of argv are not used after this in init.
pub(super) fn blank_cmdline() {
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

pub(super) fn init_main(p: &Prepared, sock: OwnedFd, host_root: bool) -> ! {
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

pub(super) fn wait_go(sock: &OwnedFd) -> Result<(), SetupError> {
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

pub(super) fn os(
    layer: Layer,
    what: impl std::fmt::Display,
) -> impl FnOnce(nix::errno::Errno) -> SetupError {
    move |e| SetupError::os(layer, what, e)
}

pub(super) fn init_inner(p: &Prepared, sock: &OwnedFd, host_root: bool) -> Result<(), SetupError> {
    // the caller's pause control is the supervisor's, not the sandbox's
    if let Some(c) = p.spec.control {
        let _ = nix::unistd::close(c);
    }
    wait_go(sock)?;
    // Our maps are written: become root of the new user namespace. When the
    // supervisor is the host's root, root's supplementary groups (gid 0
    // among them) must not follow us in.
    if host_root {
        nix::unistd::setgroups(&[]).map_err(os(Layer::UserNamespace, "setgroups"))?;
    }
    // An image's user is already who we are (the only id mapped): the
    // calls change nothing then, and keep the capabilities init holds as
    // the namespace's creator for the setup below; the command's exec as
    // a user other than root gains none.
    let (uid, gid) = p.spec.user.as_ref().map_or((0, 0), |u| (u.uid, u.gid));
    nix::unistd::setresgid(gid.into(), gid.into(), gid.into())
        .map_err(os(Layer::UserNamespace, "setresgid"))?;
    nix::unistd::setresuid(uid.into(), uid.into(), uid.into())
        .map_err(os(Layer::UserNamespace, "setresuid"))?;
    // A change of credentials clears the parent-death signal: arm it again.
    // (Should the supervisor already be gone, the next report to it fails
    // and init exits.)
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // Only now, inside the cgroup the supervisor put us in.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(os(Layer::Namespaces, "unshare(CLONE_NEWCGROUP)"))?;

    let built = build_root(p)?;
    if let Some(base) = &built.base {
        send(sock, &Report::Base, Some(base.as_raw_fd()))
            .map_err(|e| SetupError::os(Layer::Supervisor, "handing over the workspace", e))?;
    }
    send(sock, &Report::Upper, Some(built.upper.as_raw_fd()))
        .map_err(|e| SetupError::os(Layer::Supervisor, "handing over the workspace", e))?;
    drop(built);

    nix::unistd::sethostname(HOSTNAME).map_err(os(Layer::Namespaces, "sethostname"))?;
    if p.spec.network != Network::Host {
        loopback_up()?;
    }
    if p.spec.network == Network::Proxied {
        start_bridge(p)?;
    }
    if let Some(l) = p.spec.ports_listener {
        // checked before the clone: never with the host's network
        start_ports(p, l)?;
    }
    // Nothing inside may trace or read init.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong) };

    // the sandbox's own terminal, from its private devpts
    let pty = match p.spec.stdio {
        Stdio::Pty {
            rows, cols, raw, ..
        } => Some(open_primary(rows, cols, raw)?),
        Stdio::Inherit => None,
    };
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(os(Layer::Supervisor, "pipe2"))?;
    // SAFETY: fork in a single-threaded process.
    let child = match unsafe { nix::unistd::fork() } {
        Err(e) => return Err(SetupError::os(Layer::Supervisor, "fork", e)),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            command_main(p, wr, pty.as_ref().map(|(_, n)| *n))
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
    };
    drop(wr);
    if let Some((primary, _)) = pty {
        // the caller gets the only primary side; init keeps none
        send(sock, &Report::Console, Some(primary.as_raw_fd()))
            .map_err(|e| SetupError::os(Layer::Terminal, "handing over the terminal", e))?;
    }
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
pub(super) fn reap_until(child: Pid, sock: &OwnedFd) -> Ended {
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

pub(super) fn loopback_up() -> Result<(), SetupError> {
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
