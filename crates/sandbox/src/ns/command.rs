//! The command side: drop everything (rlimits, no_new_privs, landlock,
//! capabilities, seccomp, in that order) and exec.

use super::*;

pub(super) fn command_main(p: &Prepared, report: OwnedFd, pty: Option<u32>) -> ! {
    let mut out = std::fs::File::from(report);
    let err = match command_setup(p, &mut out, pty) {
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
pub(super) fn command_setup(
    p: &Prepared,
    report: &mut std::fs::File,
    pty: Option<u32>,
) -> Result<ChildReport, SetupError> {
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
    if let Some(n) = pty {
        attach_secondary(n)?;
    }
    match &spec.cwd {
        None => chdir(WORKSPACE_DIR).map_err(os(Layer::Mounts, "chdir /workspace"))?,
        Some(d) => chdir(d.as_path()).map_err(os(
            Layer::Mounts,
            format!("chdir {} (the image's WorkingDir)", d.display()),
        ))?,
    }
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
