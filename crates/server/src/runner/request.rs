//! What a job's runner process gets: the repo opened and checked, its
//! environment (secrets only where the profile covers the job's network),
//! the typed RunRequest, the descriptors, the process.

use super::*;

impl Runner {
    /// Open the job's repo and check that the opened directory lies inside
    /// an allowed root.
    pub(super) fn open_repo(&self, path: &str) -> Result<std::os::fd::OwnedFd, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let gone =
            || "repo_path is gone or no longer inside an allowed root; nothing ran".to_string();
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|_| gone())?;
        let real = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dir)
        ))
        .map_err(|_| gone())?;
        let inside = self
            .cfg
            .allowed_roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|root| real.starts_with(root));
        if !inside {
            return Err(gone());
        }
        Ok(dir.into())
    }

    pub(super) fn secret(&self, name: &str) -> Option<&str> {
        self.cfg
            .secrets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Does this job receive its profile's secrets? Only when its network
    /// policy is the profile's or narrower: the secrets are bound to the
    /// profile's hosts, and a job a key's grant let go further (or a
    /// profile that changed since) gets none.
    pub(super) fn gets_secrets(
        &self,
        network: Option<&NetworkMode>,
        p: &crate::config::Profile,
    ) -> bool {
        match network {
            None => true,
            Some(want) => p.network.covers(want),
        }
    }

    /// The supervisor's environment: nearly empty, plus exactly the
    /// variables `agent`'s profile may receive under `network` (a job's
    /// or a session's own policy; `None`: the profile's).
    pub(super) fn child_env(
        &self,
        agent: &str,
        network: Option<&NetworkMode>,
    ) -> Vec<(String, String)> {
        let mut env = vec![(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )];
        for k in ["LANG", "TZ", "TMPDIR", "HOME"] {
            if let Ok(v) = std::env::var(k) {
                env.push((k.into(), v));
            }
        }
        if let Some(p) = self
            .cfg
            .agents
            .get(agent)
            .filter(|p| self.gets_secrets(network, p))
        {
            for k in &p.env {
                if let Some(v) = self
                    .secret(k)
                    .map(str::to_owned)
                    .or_else(|| std::env::var(k).ok())
                {
                    env.push((k.clone(), v));
                }
            }
        }
        env
    }

    /// The typed request for this job's runner: its profile, its own
    /// settings and the server's, each already checked where it entered
    /// (profiles when `serve` started, the job when it was accepted).
    pub(super) fn request(
        &self,
        job: &Job,
        over: Option<&super::Over>,
    ) -> Result<RunRequest, String> {
        let p = self
            .cfg
            .agents
            .get(&job.agent)
            .ok_or_else(|| format!("agent {} is no longer configured", job.agent))?;
        let dir = self.job_dir(&job.id);
        let network = job.network.clone().unwrap_or_else(|| p.network.clone());
        let size = |what: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            v.as_deref()
                .map(units::parse_size)
                .transpose()
                .map_err(|e| format!("agent {}: {what}: {e}", job.agent))
        };
        let mut command: Vec<std::ffi::OsString> = Vec::new();
        for part in &p.argv {
            if part == "{prompt}" {
                command.push(job.prompt.clone().into());
            } else {
                command.push(part.into());
            }
        }
        command.extend(job.extra_args.iter().map(Into::into));
        let mut req = RunRequest::new(command);
        req.die_with_parent = true;
        req.parent_pid = Some(std::process::id());
        // the directory the runner opened and checked (see execute)
        req.repo = Some(Repo::Fd(REPO_FD));
        req.patch_out = Some(dir.join("patch"));
        req.result_json = Some(dir.join("result.json"));
        req.limits = Limits {
            memory: size("memory", &p.memory)?,
            pids: p.pids,
            disk: size("disk", &p.disk)?,
            timeout_ms: Some(
                u64::try_from(job.timeout_s)
                    .map_err(|_| format!("the job's timeout {} s is not valid", job.timeout_s))?
                    .saturating_mul(1000),
            ),
            ..Limits::default()
        };
        // a larger patch is not even written
        req.patch.max = self.cfg.max_patch;
        if matches!(network, NetworkMode::Allow(_)) {
            // decisions stream back live through a pipe (see execute)
            req.egress.events_fd = Some(EVENTS_FD);
        }
        req.egress.record_limit = self.cfg.egress_record_limit;
        req.network = network;
        req.ro_binds = p.ro_binds.clone();
        req.env = p
            .set_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if self.gets_secrets(job.network.as_ref(), p) {
            req.env_pass = p
                .env
                .iter()
                .filter(|k| self.secret(k).is_some() || std::env::var_os(k).is_some())
                .cloned()
                .collect();
        }
        req.cgroup_parent = self.cfg.cgroup_parent.clone();
        if let Some(d) = &job.image {
            req.image = Some(self.image_run(d)?);
        }
        self.lay_over(&mut req, over)?;
        req.check()?;
        Ok(req)
    }

    /// The image `digest` (the job's, resolved when it was accepted) as
    /// the runner takes it: its layers' directories and its Env.
    pub(crate) fn image_run(&self, digest: &str) -> Result<agentvm_proto::run::ImageRun, String> {
        let gone = |e: agentvm_image::ImageError| {
            format!("the image {digest} is no longer in the server's store ({e}); nothing ran")
        };
        let store = agentvm_image::Store::open(&self.cfg.data_dir).map_err(gone)?;
        let img = store.find(digest).map_err(gone)?;
        let layers = img
            .layers
            .iter()
            .map(|l| store.layer_dir(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(gone)?;
        if let Some(l) = layers.iter().find(|l| !l.is_dir()) {
            return Err(format!(
                "the image {digest} lacks its layer {} (was `agentvm images gc` run while it was in use?); nothing ran",
                l.display()
            ));
        }
        let user = store
            .user_of(&img)
            .map_err(|e| format!("{e}; nothing ran"))?;
        Ok(agentvm_proto::run::ImageRun {
            digest: img.digest,
            layers,
            env: img.config.env,
            user: user.map(|u| agentvm_proto::run::RunUser {
                name: u.name,
                uid: u.uid,
                gid: u.gid,
            }),
            // a job's command is its profile's: the image's Entrypoint,
            // Cmd and WorkingDir are not used
            working_dir: None,
        })
    }

    /// A workspace's stack under the request, and where its new layer goes.
    pub(super) fn lay_over(
        &self,
        req: &mut RunRequest,
        over: Option<&super::Over>,
    ) -> Result<(), String> {
        let Some(o) = over else {
            return Ok(());
        };
        // ids come from the server, but a stored one that is not an id
        // must not turn into another path
        if let Some(bad) =
            o.ws.stack
                .iter()
                .find(|l| !agentvm_workspace::layer::valid_id(l))
        {
            return Err(format!(
                "the workspace's stored layers name {}, not a layer id; nothing ran",
                agentvm_store::bounded(bad, 64)
            ));
        }
        if let Some(q) = &o.disk {
            if q.left < super::QUOTA_FLOOR {
                return Err(format!(
                    "no disk is left for it: {}; nothing ran (delete checkpoints or workspaces, or raise the quota)",
                    q.why
                ));
            }
            let asked = req
                .limits
                .disk
                .unwrap_or(agentvm_sandbox::spec::DEFAULT_DISK);
            req.limits.disk = Some(asked.min(q.left));
        }
        let store = self.layer_store();
        req.stack = o.ws.stack.iter().map(|l| store.join(l)).collect();
        if !o.reader {
            req.layer_out = Some(store.join(&o.layer));
        }
        Ok(())
    }

    /// Everything before the runner runs: the repo opened and checked,
    /// the request written, the descriptors placed, the process started.
    /// A failure is the job's end.
    pub(super) async fn spawn(
        &self,
        job: &Job,
        over: Option<&super::Over>,
    ) -> Result<Spawned, Finish> {
        let fail = |msg: String| Finish {
            status: JobStatus::Failed,
            exit_code: None,
            error: Some(msg),
            result: None,
            patch: None,
        };
        // The repo was inside an allowed root when the job was accepted.
        // Open it now, check where the descriptor really points, and hand
        // the sandbox that descriptor: a path swapped at any moment cannot
        // take effect.
        let repo_dir = match self.open_repo(&job.repo_path) {
            Ok(d) => d,
            Err(e) => return Err(fail(e)),
        };
        let req = match self.request(job, over) {
            Ok(r) => r,
            Err(e) => return Err(fail(e)),
        };
        let dir = self.job_dir(&job.id);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(fail(format!("creating the job directory: {e}")));
        }
        // the request holds the prompt: readable by this user only, and
        // removed with the job directory
        let request_file = dir.join("request.json");
        if let Err(e) = write_private(&request_file, &req) {
            return Err(fail(format!("writing the runner's request: {e}")));
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Finish {
                status: JobStatus::Interrupted,
                exit_code: None,
                error: Some(
                    "interrupted: the server shut down before the job's sandbox started".into(),
                ),
                result: None,
                patch: None,
            });
        }
        // The egress proxy's decisions, live: the write end goes to the
        // child as fd 4 (only when it runs a proxy).
        let events = if req.egress.events_fd.is_some() {
            // both ends close-on-exec; the write end is placed at fd 4 below
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok(p) => Some(p),
                Err(e) => return Err(fail(format!("creating the egress event pipe: {e}"))),
            }
        } else {
            None
        };
        // The descriptors the child inherits, first moved above fd 10 so
        // placing them at 3 and 4 cannot clobber one with the other.
        let repo_hi = match high_fd(&repo_dir) {
            Ok(f) => f,
            Err(e) => return Err(fail(format!("preparing the repo descriptor: {e}"))),
        };
        let (ev_read, ev_write) = match events {
            Some((r, w)) => match high_fd(&w) {
                Ok(w) => (Some(r), Some(w)),
                Err(e) => return Err(fail(format!("preparing the egress event pipe: {e}"))),
            },
            None => (None, None),
        };
        let repo_raw = std::os::fd::AsRawFd::as_raw_fd(&repo_hi);
        let ev_raw = ev_write.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = tokio::process::Command::new(&self.cfg.sandbox_bin);
        // SAFETY: between fork and exec only dup2 runs (async-signal-safe);
        // it puts the checked repo descriptor at fd 3 and the event pipe at
        // fd 4, both without close-on-exec (their sources are >= 10).
        unsafe {
            cmd.pre_exec(move || dup_into(&[(Some(repo_raw), REPO_FD), (ev_raw, EVENTS_FD)]));
        }
        let spawned = cmd
            .arg("run-request")
            .arg(&request_file)
            .env_clear()
            .envs(self.child_env(&job.agent, job.network.as_ref()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        // the child holds the only writer now: its end is the stream's end
        drop((repo_dir, repo_hi, ev_write));
        let child = match spawned {
            Ok(c) => c,
            Err(e) => return Err(fail(format!("starting the sandbox: {e}"))),
        };
        Ok(Spawned {
            child,
            events: ev_read,
            dir,
        })
    }
}

/// A close-on-exec duplicate of `fd` numbered 10 or above.
pub(super) fn high_fd(fd: &impl std::os::fd::AsRawFd) -> nix::Result<std::os::fd::OwnedFd> {
    let n = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: n was just created and is owned by no one else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(n) })
}

/// Write `v` as JSON to a new file only this user can read.
pub(super) fn write_private(
    path: &std::path::Path,
    v: &impl serde::Serialize,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(&serde_json::to_vec(v).map_err(std::io::Error::other)?)?;
    Ok(())
}

/// In the child between fork and exec: put each descriptor given at its
/// number (dup2 only, which is async-signal-safe).
pub(super) fn dup_into(
    pairs: &[(Option<std::os::fd::RawFd>, std::os::fd::RawFd)],
) -> std::io::Result<()> {
    for (from, to) in pairs {
        if let Some(f) = from {
            // SAFETY: dup2 on descriptors this process holds.
            if unsafe { libc::dup2(*f, *to) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
