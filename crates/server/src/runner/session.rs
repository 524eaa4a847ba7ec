//! What a session's runner gets: the same typed RunRequest as a job's
//! (profile limits, network policy, secrets only where the profile covers
//! the session's network), with a terminal whose primary side comes back
//! over a console socket, a control socket for port forwards and one for
//! pause and resume.

use std::os::fd::{AsRawFd, OwnedFd};

use agentvm_proto::run::Tty;
use agentvm_store::Session;

use super::request::{high_fd, write_private};
use super::*;

/// Where the runner inherits the console socket.
const CONSOLE_FD: i32 = 5;
/// Where the runner inherits the port-forward control socket.
const PORTS_FD: i32 = 6;
/// Where the runner inherits the pause control socket.
const CONTROL_FD: i32 = 7;
/// How long a sandbox may take to hand over its terminal.
const CONSOLE_WAIT: Duration = Duration::from_secs(120);

/// A session's limits as its request narrowed them.
#[derive(Debug, Clone, Default)]
pub struct SessionLimits {
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub disk: Option<u64>,
    /// A terminal with no line discipline (`ssh HOST COMMAND` without -t).
    pub raw: bool,
    /// The image's digest (resolved when accepted); `None`: the host's.
    pub image: Option<String>,
}

/// A started session sandbox.
pub struct SessionSandbox {
    pub child: tokio::process::Child,
    /// The primary side of the sandbox's terminal.
    pub primary: OwnedFd,
    /// Our end of the port-forward control socket (none with the host's
    /// network).
    pub ports: Option<OwnedFd>,
    /// Our end of the pause control socket (`agentvm_sandbox::control`).
    pub control: OwnedFd,
}

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

impl Runner {
    /// The directory of a session's files: its recording (kept), and
    /// while it runs its request, result and patch.
    pub fn session_dir(&self, id: &str) -> PathBuf {
        self.sessions_root().join(id)
    }

    /// Where every session's directory is.
    pub fn sessions_root(&self) -> PathBuf {
        self.cfg.data_dir.join("sessions")
    }

    /// The typed request for a session's runner.
    fn session_request(
        &self,
        s: &Session,
        limits: &SessionLimits,
        rows: u16,
        cols: u16,
        ports: bool,
        over: Option<&super::Over>,
    ) -> Result<RunRequest, String> {
        let agent = s.agent.as_deref().unwrap_or(crate::service::SHELL);
        let p = self
            .cfg
            .agents
            .get(agent)
            .ok_or_else(|| format!("agent {agent} is no longer configured"))?;
        let dir = self.session_dir(&s.id);
        let network = s.network.clone().unwrap_or_else(|| p.network.clone());
        let size = |what: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            v.as_deref()
                .map(units::parse_size)
                .transpose()
                .map_err(|e| format!("agent {agent}: {what}: {e}"))
        };
        let mut req = RunRequest::new(s.command.iter().map(Into::into).collect());
        req.die_with_parent = true;
        req.parent_pid = Some(std::process::id());
        if s.repo_path.is_some() {
            req.repo = Some(Repo::Fd(REPO_FD));
            req.patch_out = Some(dir.join("patch"));
        }
        req.result_json = Some(dir.join("result.json"));
        // the request may only narrow the profile's (checked when accepted)
        req.limits = Limits {
            memory: limits.memory.or(size("memory", &p.memory)?),
            pids: limits.pids.or(p.pids),
            disk: limits.disk.or(size("disk", &p.disk)?),
            ..Limits::default()
        };
        req.patch.max = self.cfg.max_patch;
        req.egress.record_limit = self.cfg.egress_record_limit;
        req.network = network;
        req.ro_binds = p.ro_binds.clone();
        req.env = p
            .set_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !req.env.iter().any(|(k, _)| k == "TERM") {
            req.env.push(("TERM".into(), "xterm-256color".into()));
        }
        if self.gets_secrets(s.network.as_ref(), p) {
            req.env_pass = p
                .env
                .iter()
                .filter(|k| self.secret(k).is_some() || std::env::var_os(k).is_some())
                .cloned()
                .collect();
        }
        req.tty = Some(Tty {
            rows,
            cols,
            console_fd: Some(CONSOLE_FD),
            raw: limits.raw,
        });
        if ports {
            req.ports_fd = Some(PORTS_FD);
        }
        req.control_fd = Some(CONTROL_FD);
        req.cgroup_parent = self.cfg.cgroup_parent.clone();
        if let Some(d) = &limits.image {
            req.image = Some(self.image_run(d)?);
        }
        self.lay_over(&mut req, over)?;
        req.check()?;
        Ok(req)
    }

    /// Start a session's sandbox and take its terminal.
    pub async fn spawn_session(
        &self,
        s: &Session,
        limits: &SessionLimits,
        rows: u16,
        cols: u16,
        over: Option<&super::Over>,
    ) -> Result<SessionSandbox, String> {
        if self.stopping.load(Ordering::SeqCst) || self.draining.load(Ordering::SeqCst) {
            return Err("the server is shutting down".into());
        }
        let repo_dir = match &s.repo_path {
            Some(p) => Some(self.open_repo(p)?),
            None => None,
        };
        let agent = s.agent.as_deref().unwrap_or(crate::service::SHELL);
        let network = s
            .network
            .clone()
            .or_else(|| self.cfg.agents.get(agent).map(|p| p.network.clone()));
        let want_ports = network.as_ref() != Some(&NetworkMode::Host);
        let req = self.session_request(s, limits, rows, cols, want_ports, over)?;
        let dir = self.session_dir(&s.id);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("creating the session directory: {e}"))?;
        }
        let request_file = dir.join("request.json");
        write_private(&request_file, &req)
            .map_err(|e| format!("writing the runner's request: {e}"))?;
        let (console_ours, console_theirs) =
            seqpacket_pair().map_err(|e| format!("creating the console socket: {e}"))?;
        let ports = if want_ports {
            Some(seqpacket_pair().map_err(|e| format!("creating the ports socket: {e}"))?)
        } else {
            None
        };
        let (control, control_theirs) =
            seqpacket_pair().map_err(|e| format!("creating the control socket: {e}"))?;
        let hi = |fd: &OwnedFd, what: &str| {
            high_fd(fd).map_err(|e| format!("preparing the {what} descriptor: {e}"))
        };
        let repo_hi = repo_dir.as_ref().map(|d| hi(d, "repo")).transpose()?;
        let console_hi = hi(&console_theirs, "console")?;
        let ports_hi = ports
            .as_ref()
            .map(|(_, theirs)| hi(theirs, "ports"))
            .transpose()?;
        let control_hi = hi(&control_theirs, "control")?;
        let control_raw = control_hi.as_raw_fd();
        let repo_raw = repo_hi.as_ref().map(AsRawFd::as_raw_fd);
        let console_raw = console_hi.as_raw_fd();
        let ports_raw = ports_hi.as_ref().map(AsRawFd::as_raw_fd);
        let mut cmd = tokio::process::Command::new(&self.cfg.sandbox_bin);
        // SAFETY: between fork and exec only dup2 runs (async-signal-safe);
        // the sources are >= 10 and close-on-exec, the copies are not.
        unsafe {
            cmd.pre_exec(move || {
                super::request::dup_into(&[
                    (repo_raw, REPO_FD),
                    (Some(console_raw), CONSOLE_FD),
                    (ports_raw, PORTS_FD),
                    (Some(control_raw), CONTROL_FD),
                ])
            });
        }
        let spawned = cmd
            .arg("run-request")
            .arg(&request_file)
            .env_clear()
            .envs(self.child_env(agent, s.network.as_ref()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        // the child holds the only other ends now
        drop((repo_dir, repo_hi, console_theirs, console_hi, ports_hi));
        drop((control_theirs, control_hi));
        let ports = ports.map(|(ours, theirs)| {
            drop(theirs);
            ours
        });
        let mut child = spawned.map_err(|e| format!("starting the sandbox: {e}"))?;
        let received = tokio::time::timeout(
            CONSOLE_WAIT,
            tokio::task::spawn_blocking(move || {
                use std::os::fd::AsFd;
                agentvm_sandbox::receive_console(console_ours.as_fd())
            }),
        )
        .await;
        let primary = match received {
            Ok(Ok(Ok(Some(fd)))) => fd,
            other => {
                let _ = child.start_kill();
                let mut why = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let mut buf = Vec::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        (&mut err).take(8192).read_to_end(&mut buf),
                    )
                    .await;
                    why = self
                        .redactor
                        .redact_str(String::from_utf8_lossy(&buf).trim());
                }
                let _ = child.wait().await;
                let _ = std::fs::remove_file(&request_file);
                return Err(match other {
                    Err(_) => "the sandbox did not hand over its terminal in time".into(),
                    _ if why.is_empty() => "the sandbox could not be set up".into(),
                    _ => why,
                });
            }
        };
        // the runner has read its request
        let _ = std::fs::remove_file(&request_file);
        Ok(SessionSandbox {
            child,
            primary,
            ports,
            control,
        })
    }
}
