//! The supervisor side, on the host: clone init into fresh namespaces,
//! write its uid/gid maps, put it in the cgroup, enforce the timeout, and
//! collect how the command ended.

use super::*;

pub(super) fn unique() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[repr(C)]
#[derive(Default)]
pub(super) struct CloneArgs {
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

/// The threads of this process (from /proc/self/task).
pub(super) fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// fork(2) into new namespaces. Returns 0 in the child.
///
/// Refused unless this process is single-threaded: the child gets only
/// the calling thread, and a lock another thread held at that moment (the
/// allocator's, stdout's) would stay locked in init forever, a sandbox
/// that hangs instead of running. Callers that need a helper (the egress
/// proxy, a terminal relay) fork it first.
pub(super) fn clone_into(flags: u64) -> Result<i32, SetupError> {
    match thread_count() {
        Ok(1) => {}
        Ok(n) => {
            return Err(SetupError::new(
                Layer::Supervisor,
                format!("the sandbox must be started from a single-threaded process, and this one has {n} threads (a bug in the caller)"),
            ))
        }
        Err(e) => return Err(SetupError::os(Layer::Supervisor, "counting threads", e)),
    }
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

pub(super) fn write_map(pid: i32, file: &str, content: &str) -> Result<(), SetupError> {
    std::fs::write(format!("/proc/{pid}/{file}"), content).map_err(|e| {
        SetupError::os(
            Layer::UserNamespace,
            format!("writing {file} {content:?}"),
            e,
        )
    })
}

pub(super) fn supervise(p: &Prepared, cgroup: Option<&Cgroup>) -> Result<Outcome, RunError> {
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
    let mut control = super::control::Control::new(spec.control);
    // a frozen process would hold the signal until thawed
    let kill_child = |control: &mut super::control::Control, sig| {
        control.thaw(cgroup);
        let _ = kill(child, sig);
        let _ = waitpid(child, None);
    };

    // the one id inside: root, or the image's user
    let (iu, ig) = spec.user.as_ref().map_or((0, 0), |u| (u.uid, u.gid));
    let setup = (|| -> Result<(), SetupError> {
        if euid == 0 {
            let id = spec.root_maps_to;
            if id == 0 {
                return Err(SetupError::new(
                    Layer::UserNamespace,
                    "root inside the sandbox must not map to the host's root",
                ));
            }
            write_map(pid, "uid_map", &format!("{iu} {id} 1"))?;
            write_map(pid, "gid_map", &format!("{ig} {id} 1"))?;
        } else {
            write_map(pid, "setgroups", "deny")?;
            write_map(pid, "uid_map", &format!("{iu} {euid} 1"))?;
            write_map(pid, "gid_map", &format!("{ig} {egid} 1"))?;
        }
        if let Some(cg) = cgroup {
            cg.add(pid)?;
        }
        send(&parent_sock, &Report::Go, None)
            .map_err(|e| SetupError::os(Layer::Supervisor, "releasing init", e))
    })();
    if let Err(e) = setup {
        kill_child(&mut control, Signal::SIGKILL);
        return Err(e.into());
    }

    let sigfd = nix::sys::signalfd::SignalFd::with_flags(
        &forward,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| SetupError::os(Layer::Supervisor, "signalfd", e))?;

    let deadline = spec.limits.timeout.map(|t| started + t);
    let mut upper: Option<OwnedFd> = None;
    let mut base: Option<OwnedFd> = None;
    let mut setup_time = None;
    let mut landlock_abi = 0;
    let mut ended: Option<Ended> = None;
    let mut failure: Option<RunError> = None;
    loop {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    kill_child(&mut control, Signal::SIGKILL);
                    ended = Some(Ended::Timeout);
                    break;
                }
                nix::poll::PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32 + 1)
                    .unwrap_or(nix::poll::PollTimeout::MAX)
            }
            None => nix::poll::PollTimeout::NONE,
        };
        let mut fds = vec![
            nix::poll::PollFd::new(parent_sock.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(sigfd.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        if let Some(c) = control.fd() {
            fds.push(nix::poll::PollFd::new(c, nix::poll::PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                kill_child(&mut control, Signal::SIGKILL);
                return Err(SetupError::os(Layer::Supervisor, "poll", e).into());
            }
        }
        let sig_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        let sock_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let control_ready = fds
            .get(2)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty());
        drop(fds);
        if control_ready {
            control.handle(cgroup);
        }
        if sig_ready {
            control.thaw(cgroup);
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
            Ok(Some((Report::Base, fd))) => base = fd,
            Ok(Some((Report::Console, fd))) => {
                let sent = match (p.spec.stdio, &fd) {
                    (Stdio::Pty { console, .. }, Some(fd)) => hand_over(console, fd.as_raw_fd()),
                    _ => Err(std::io::Error::other("a terminal nobody asked for")),
                };
                drop(fd);
                if let Err(e) = sent {
                    kill_child(&mut control, Signal::SIGKILL);
                    return Err(SetupError::os(
                        Layer::Terminal,
                        "handing the terminal to the caller",
                        e,
                    )
                    .into());
                }
            }
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
                kill_child(&mut control, Signal::SIGKILL);
                return Err(SetupError::os(Layer::Supervisor, "reading init's report", e).into());
            }
        }
        if ended.is_some() || failure.is_some() {
            break;
        }
    }
    control.thaw(cgroup);
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
        base,
        oom_kills,
        memory_peak: cgroup.and_then(|c| c.memory_peak()),
        cpu_time: cgroup.and_then(|c| c.cpu_usage()),
        landlock_abi,
        repo_idmapped: p.repo_tree.is_some(),
        cgroup: cgroup.is_some(),
    })
}

/// Run `f` when the guard is dropped.
pub(super) fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
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
