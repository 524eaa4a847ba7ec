//! `agentvm run`: validate the request, run the sandbox, capture the
//! changes, and report.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agentvm_proto::run::{valid_env_key, EgressOptions, PatchLimits, PIDS_MAX};
use agentvm_proto::{units, NetworkMode, Repo, RunErrorInfo, RunRequest, RunResult, RunStatus};
use agentvm_sandbox::spec::{DEFAULT_DISK, DEFAULT_ROOT_MAPS_TO, HOME_DIR, WORKSPACE_DIR};
use agentvm_sandbox::{
    Ended, ExecFailure, Layers, Limits, Network, RoBind, RunError, SandboxSpec, SetupError,
};
use clap::Args;

use crate::EXIT_SETUP;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// /workspace is a copy-on-write view of DIR; DIR itself is never written.
    #[arg(long, value_name = "DIR", conflicts_with = "repo_fd")]
    repo: Option<PathBuf>,
    /// Like --repo, for a directory the caller already opened (the server
    /// passes the descriptor it checked).
    #[arg(long, value_name = "FD", hide = true, value_parser = clap::value_parser!(i32).range(3..))]
    repo_fd: Option<i32>,
    /// Run on this image (a tag, or a digest or its first 12+ hex digits,
    /// from `agentvm images list`) instead of the host's system
    /// directories.
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// The data directory whose image store --image names from (as
    /// `agentvm serve`'s).
    #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Run the image's own Entrypoint, then its Cmd (or COMMAND, which
    /// replaces the Cmd as with `docker run`), in its WorkingDir.
    #[arg(long, requires = "image")]
    pub image_entrypoint: bool,
    /// Write every change under /workspace as a git-style patch (empty when nothing changed).
    #[arg(long, value_name = "FILE")]
    patch_out: Option<PathBuf>,
    /// Write one JSON object describing how the run ended.
    #[arg(long, value_name = "FILE")]
    result_json: Option<PathBuf>,
    /// none: a private loopback only. host: the host's network (no isolation).
    /// allow:HOST[:PORT],...: only these hosts, through the egress proxy
    /// (names, *.domain, IPs; private and loopback addresses only when named).
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = NetworkMode::parse)]
    network: NetworkMode,
    /// With --network allow: write each proxy decision as a JSON line to FILE.
    #[arg(long, value_name = "FILE")]
    egress_log: Option<PathBuf>,
    /// With --network allow: also write each decision, as it is made, to
    /// the inherited descriptor FD (a pipe; the server streams them live).
    /// Best effort: a line the reader is too slow for is dropped there.
    #[arg(long, value_name = "FD", hide = true, value_parser = clap::value_parser!(i32).range(3..))]
    egress_events_fd: Option<i32>,
    /// With --network allow: record this many connections one by one, then
    /// only count them (tests; the default bounds what a looping program
    /// can make the proxy write).
    #[arg(long, value_name = "N", hide = true, default_value_t = agentvm_proto::egress::RECORD_LIMIT)]
    egress_record_limit: u64,
    /// Memory limit, swap included (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    memory: Option<u64>,
    /// Maximum number of processes and threads.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=PIDS_MAX))]
    pids: Option<u64>,
    /// CPUs to pin to (e.g. 0, 0-1, 0,2).
    #[arg(long, value_name = "LIST", value_parser = units::parse_cpus)]
    cpus: Option<String>,
    /// CPU bandwidth in cores (e.g. 0.5, 2).
    #[arg(long, value_name = "CORES", value_parser = units::parse_cores)]
    cpu_quota: Option<f64>,
    /// What /workspace changes, /tmp, /dev/shm and HOME may add together.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    disk: Option<u64>,
    /// Wall-clock limit (e.g. 30s, 5m); the whole process tree is killed.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    timeout: Option<Duration>,
    /// Set KEY=VALUE in the sandbox (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Copy KEY from this environment into the sandbox (repeatable).
    #[arg(long = "env-pass", value_name = "KEY", value_parser = parse_env_key)]
    env_pass: Vec<String>,
    /// Extra read-only path, e.g. a tool installed outside /usr (repeatable).
    #[arg(long = "ro-bind", value_name = "SRC[:DST]")]
    ro_bind: Vec<String>,
    /// Cgroup (relative to each hierarchy's root) to create the sandbox's cgroup under.
    #[arg(long, value_name = "PATH", env = "AGENTVM_CGROUP_PARENT")]
    cgroup_parent: Option<PathBuf>,
    /// Largest binary file encoded in the patch; larger ones are only marked.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size, default_value = "8M")]
    patch_binary_max: u64,
    /// Largest patch written; a larger one fails the run (exit 125, the
    /// result says why) and --patch-out is left empty.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size, default_value = "1G")]
    patch_max: u64,
    /// DANGEROUS: run without the seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
    /// DANGEROUS: run without landlock.
    #[arg(long)]
    no_landlock: bool,
    /// Run without cgroups; refuses any cgroup limit (--memory, --pids, --cpus, --cpu-quota).
    #[arg(long)]
    no_cgroup: bool,
    /// Run the command on a terminal of the sandbox's own (its size the
    /// caller's terminal's, else 24x80), relayed to this one's stdin and
    /// stdout: for interactive programs (a shell, an agent's TUI).
    #[arg(long, short = 't')]
    tty: bool,
    /// Die when the process that started this one dies (used by the server).
    #[arg(long, hide = true)]
    die_with_parent: bool,
    /// The command and its arguments.
    #[arg(
        last = true,
        required_unless_present = "image_entrypoint",
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// The request these flags make (each already checked by its parser).
    pub fn into_request(self) -> RunRequest {
        let mut req = RunRequest::new(self.command);
        req.repo = match (self.repo, self.repo_fd) {
            (Some(p), _) => Some(Repo::Path(p)),
            (None, Some(n)) => Some(Repo::Fd(n)),
            (None, None) => None,
        };
        req.patch_out = self.patch_out;
        req.result_json = self.result_json;
        req.network = self.network;
        req.egress = EgressOptions {
            log: self.egress_log,
            events_fd: self.egress_events_fd,
            record_limit: self.egress_record_limit,
        };
        req.limits = agentvm_proto::Limits {
            memory: self.memory,
            pids: self.pids,
            cpus: self.cpus,
            cpu_quota: self.cpu_quota,
            disk: self.disk,
            timeout_ms: self
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        req.env = self.env;
        req.env_pass = self.env_pass;
        req.ro_binds = self.ro_bind;
        req.cgroup_parent = self.cgroup_parent;
        req.patch = PatchLimits {
            binary_max: self.patch_binary_max,
            max: self.patch_max,
        };
        req.layers = agentvm_proto::Layers {
            seccomp: !self.no_seccomp,
            landlock: !self.no_landlock,
            cgroup: !self.no_cgroup,
        };
        req.die_with_parent = self.die_with_parent;
        req.tty = self.tty.then(|| {
            let (rows, cols) = crate::tty::own_size().unwrap_or((24, 80));
            agentvm_proto::Tty {
                rows,
                cols,
                console_fd: None,
                raw: false,
            }
        });
        req
    }
}

/// Open a directory for reading its entries by descriptor (not a file).
fn open_dir(p: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    open_dir_with(p, 0)
}

fn open_dir_with(p: &Path, flags: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | flags)
        .open(p)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                std::io::Error::other("not a directory")
            } else {
                e
            }
        })?;
    Ok(f.into())
}

fn is_dir_fd(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    let f = std::fs::File::from(fd.try_clone()?);
    if f.metadata()?.is_dir() {
        Ok(())
    } else {
        Err(std::io::Error::other("not a directory"))
    }
}

fn parse_env_key(s: &str) -> Result<String, String> {
    if valid_env_key(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid variable name {s:?}: letters, digits and _ only, not starting with a digit"
        ))
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid --env {s:?}: expected KEY=VALUE"))?;
    parse_env_key(k)?;
    if v.contains('\0') {
        return Err("invalid --env: the value contains a NUL byte".into());
    }
    Ok((k.to_string(), v.to_string()))
}

/// Variables passed through from the caller when set (nothing secret).
const ENV_PASS_THROUGH: [&str; 9] = [
    "TERM",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "COLORTERM",
    "NO_COLOR",
    "LANGUAGE",
];
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who the command runs as inside: root, or its image's user.
fn user_name(args: &RunRequest) -> &str {
    args.image
        .as_ref()
        .and_then(|i| i.user.as_ref())
        .map_or("root", |u| u.name.as_str())
}

fn build_env(args: &RunRequest) -> Result<Vec<(OsString, OsString)>, String> {
    let mut env: Vec<(String, OsString)> = vec![
        ("PATH".into(), SANDBOX_PATH.into()),
        ("HOME".into(), HOME_DIR.into()),
        ("USER".into(), user_name(args).into()),
        ("LOGNAME".into(), user_name(args).into()),
        ("SHELL".into(), "/bin/sh".into()),
        ("TMPDIR".into(), "/tmp".into()),
        (
            "PWD".into(),
            args.image
                .as_ref()
                .and_then(|i| i.working_dir.as_ref())
                .map_or_else(|| WORKSPACE_DIR.into(), |d| d.as_os_str().to_owned()),
        ),
        ("HOSTNAME".into(), agentvm_sandbox::spec::HOSTNAME.into()),
    ];
    let mut set = |k: &str, v: OsString| {
        env.retain(|(x, _)| x != k);
        env.push((k.to_string(), v));
    };
    // the image's Env (its PATH, its tools' variables), but never what is
    // the sandbox's own: HOME, PWD, TMPDIR, HOSTNAME, the user
    if let Some(img) = &args.image {
        for kv in &img.env {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            if valid_env_key(k)
                && !v.contains('\0')
                && !["HOME", "PWD", "TMPDIR", "HOSTNAME", "USER", "LOGNAME"].contains(&k)
            {
                set(k, v.into());
            }
        }
    }
    for k in ENV_PASS_THROUGH {
        if let Some(v) = std::env::var_os(k) {
            set(k, v);
        }
    }
    if std::env::var_os("LANG").is_none() {
        set("LANG", "C.UTF-8".into());
    }
    if matches!(args.network, NetworkMode::Allow(_)) {
        let url = format!("http://{}", agentvm_sandbox::spec::PROXY_ADDR);
        for k in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "npm_config_proxy",
            "npm_config_https_proxy",
            "PIP_PROXY",
        ] {
            set(k, url.clone().into());
        }
        // nothing bypasses the proxy: the sandbox's own loopback has nothing
        // to offer, and the host's is reached only through the policy
        set("NO_PROXY", "".into());
        set("no_proxy", "".into());
    }
    for k in &args.env_pass {
        match std::env::var_os(k) {
            Some(v) => set(k, v),
            None => {
                return Err(format!(
                    "--env-pass {k}: {k} is not set in this environment"
                ))
            }
        }
    }
    for (k, v) in &args.env {
        set(k, v.into());
    }
    Ok(env.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// Paths a --ro-bind may not cover: they are the sandbox's own.
const RESERVED: [&str; 6] = ["/", "/proc", "/dev", "/tmp", "/etc", HOME_DIR];

fn parse_ro_bind(s: &str) -> Result<RoBind, String> {
    let (src, dst) = match s.split_once(':') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    if src.is_empty() {
        return Err(format!("--ro-bind {s:?}: empty source"));
    }
    let src =
        std::fs::canonicalize(src).map_err(|e| format!("--ro-bind {s:?}: source {src}: {e}"))?;
    let dst = match dst {
        Some(d) => PathBuf::from(d),
        None => src.clone(),
    };
    if !dst.is_absolute()
        || dst
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "--ro-bind {s:?}: destination must be an absolute path without . or .."
        ));
    }
    let ws = Path::new(WORKSPACE_DIR);
    if RESERVED.iter().any(|r| dst == Path::new(r))
        || dst.starts_with(ws)
        || dst.starts_with("/proc")
        || dst.starts_with("/dev")
    {
        return Err(format!(
            "--ro-bind {s:?}: {} belongs to the sandbox and cannot be replaced",
            dst.display()
        ));
    }
    Ok(RoBind { src, dst })
}

struct Outputs {
    patch: Option<File>,
    result: Option<File>,
}

fn open_out(p: &Path, what: &str) -> Result<File, String> {
    File::create(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("agentvm: {msg}");
    ExitCode::from(EXIT_SETUP)
}

/// `agentvm run FLAGS -- COMMAND`.
pub fn main(args: RunArgs) -> ExitCode {
    execute(args.into_request())
}

/// `agentvm run` on an image the caller resolved (`--image`).
pub fn main_on(args: RunArgs, image: Option<agentvm_proto::run::ImageRun>) -> ExitCode {
    let mut req = args.into_request();
    req.image = image;
    execute(req)
}

/// The largest request file `run-request` reads (a prompt is most of it).
pub const REQUEST_MAX: u64 = 64 << 20;

/// `agentvm-run run-request FILE`: the request the server wrote, as JSON.
pub fn main_request(path: &Path) -> ExitCode {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|f| f.take(REQUEST_MAX + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        return fail(&format!("reading the request {}: {e}", path.display()));
    }
    if bytes.len() as u64 > REQUEST_MAX {
        return fail(&format!(
            "the request {} is larger than {REQUEST_MAX} bytes",
            path.display()
        ));
    }
    let req: RunRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return fail(&format!("the request {}: {e}", path.display())),
    };
    if let Err(e) = req.check() {
        return fail(&format!("the request {}: {e}", path.display()));
    }
    execute(req)
}

/// Run one checked request: validate what needs the filesystem, run the
/// sandbox, capture the changes, and report.
pub fn execute(args: RunRequest) -> ExitCode {
    if args.die_with_parent {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        // armed only now: a parent that died before this never sends it
        let parent = nix::unistd::getppid().as_raw();
        if args
            .parent_pid
            .is_some_and(|p| i64::from(p) != i64::from(parent))
        {
            return fail("the process that started this runner is gone; nothing was run");
        }
    }
    // --- validate everything before anything runs
    // The repo is opened once; the sandbox's lower layer and the capture both
    // go through this descriptor, so swapping the path afterwards changes
    // nothing.
    let repo_dir = match args.repo.clone() {
        None => None,
        Some(Repo::Path(r)) => match open_dir(&r) {
            Ok(fd) => Some(fd),
            Err(e) => return fail(&format!("--repo {}: {e}", r.display())),
        },
        Some(Repo::Fd(n)) if n < 3 => {
            return fail(&format!(
                "--repo-fd {n}: not a descriptor this process may take over"
            ))
        }
        Some(Repo::Fd(n)) => {
            // SAFETY: the caller handed us this descriptor for this purpose;
            // we own it from here on.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(n) };
            match is_dir_fd(&fd) {
                Ok(()) => Some(fd),
                Err(e) => return fail(&format!("--repo-fd {n}: {e}")),
            }
        }
    };
    // where the descriptor really is (the sandbox checks it is the same
    // directory), and a path to read the original files through
    let repo_via_fd: Option<PathBuf> = repo_dir
        .as_ref()
        .map(|fd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
    let repo: Option<PathBuf> = match &repo_via_fd {
        None => None,
        Some(p) => match std::fs::read_link(p) {
            Ok(real) => Some(real),
            Err(e) => return fail(&format!("--repo: {e}")),
        },
    };
    // a workspace's layers, opened here (the sandbox's user may not walk
    // the layer store) without following a symlink; bound from these
    let mut stack = Vec::new();
    for l in &args.stack {
        match open_dir_with(l, libc::O_NOFOLLOW) {
            Ok(fd) => stack.push((l.clone(), fd)),
            Err(e) => {
                // the layer's id, not where the server keeps it
                let id = l
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                return fail(&format!("the workspace layer {id}: {e}"));
            }
        }
    }
    // the image's layers, newest first for overlayfs, opened the same way
    let mut image = Vec::new();
    if let Some(img) = &args.image {
        for l in img.layers.iter().rev() {
            match open_dir_with(l, libc::O_NOFOLLOW) {
                Ok(fd) => image.push((l.clone(), fd)),
                Err(e) => {
                    return fail(&format!(
                        "the image {}'s layer {}: {e}",
                        img.digest,
                        l.display()
                    ))
                }
            }
        }
    }
    let env = match build_env(&args) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let ro_binds = match args
        .ro_binds
        .iter()
        .map(|s| parse_ro_bind(s))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let limits = Limits {
        memory: args.limits.memory,
        pids: args.limits.pids,
        cpus: args.limits.cpus.clone(),
        cpu_quota: args.limits.cpu_quota,
        disk: args.limits.disk.unwrap_or(DEFAULT_DISK),
        timeout: args.limits.timeout_ms.map(Duration::from_millis),
    };
    let layers = Layers {
        seccomp: args.layers.seccomp,
        landlock: args.layers.landlock,
        cgroup: args.layers.cgroup,
    };
    if !layers.cgroup && !agentvm_sandbox::cgroup::needed(&limits).is_empty() {
        return fail("--no-cgroup cannot enforce --memory, --pids, --cpus or --cpu-quota; drop one or the other");
    }
    let mut disabled: Vec<String> = Vec::new();
    if !layers.seccomp {
        disabled.push("seccomp".into());
    }
    if !layers.landlock {
        disabled.push("landlock".into());
    }
    if !layers.cgroup {
        disabled.push("cgroup".into());
    }
    for d in &disabled {
        eprintln!("agentvm: WARNING: the {d} layer is switched off for this run; the sandbox is weaker than the default");
    }
    if args.network == NetworkMode::Host {
        eprintln!("agentvm: WARNING: --network host: the command shares the host's network (it can reach every address and local service the host can)");
    }
    let mut outs = Outputs {
        patch: None,
        result: None,
    };
    if let Some(p) = &args.patch_out {
        match open_out(p, "--patch-out") {
            Ok(f) => outs.patch = Some(f),
            Err(e) => return fail(&e),
        }
    }
    if let Some(p) = &args.result_json {
        match open_out(p, "--result-json") {
            Ok(f) => outs.result = Some(f),
            Err(e) => return fail(&e),
        }
    }

    // What a shell, an editor, git or CI would run later: found in the
    // repo now, shown read-only inside, and named in the result if the
    // patch touches it.
    let (scan, protected) = match (&repo_dir, &repo_via_fd, &repo) {
        (Some(fd), Some(_), Some(real)) => {
            use std::os::fd::AsFd;
            let mut extra = agentvm_workspace::protect::config_paths(real, Some(fd.as_fd()));
            match agentvm_workspace::protect::existing(fd.as_fd(), real, &extra) {
                Ok(scan) => {
                    extra.extend(scan.targets.iter().cloned());
                    (scan, agentvm_workspace::Protected::new(extra))
                }
                Err(e) => return fail(&format!("--repo: looking for protected files: {e}")),
            }
        }
        _ => Default::default(),
    };
    let spec = SandboxSpec {
        argv: args.command.clone(),
        env,
        repo: repo.clone(),
        repo_fd: repo_dir.as_ref().map(|fd| fd.as_raw_fd()),
        stack: stack_layers(&stack),
        image: stack_layers(&image),
        ro_binds,
        stdio: agentvm_sandbox::Stdio::Inherit,
        network: match args.network {
            NetworkMode::None => Network::None,
            NetworkMode::Host => Network::Host,
            NetworkMode::Allow(_) => Network::Proxied,
        },
        limits: limits.clone(),
        layers,
        root_maps_to: DEFAULT_ROOT_MAPS_TO,
        cgroup_parent: args.cgroup_parent.clone(),
        proxy_socket: None,
        ports_listener: None,
        control: None,
        cwd: args.image.as_ref().and_then(|i| i.working_dir.clone()),
        user: args.image.as_ref().and_then(|i| i.user.as_ref()).map(|u| {
            agentvm_sandbox::InnerUser {
                name: u.name.clone(),
                uid: u.uid,
                gid: u.gid,
            }
        }),
        protected: scan.paths,
    };
    let mut result = RunResult::setup_failed(&args, EXIT_SETUP as i32);
    result.layers_disabled = disabled;

    let mut spec = spec;
    let events = match args.egress.events_fd.map(crate::egress::events_pipe) {
        Some(Err(e)) => return fail(&format!("--egress-events-fd: {e}")),
        Some(Ok(f)) => Some(f),
        None => None,
    };
    let proxy = match &args.network {
        NetworkMode::Allow(policy) => {
            match crate::egress::start(
                policy.clone(),
                args.egress.log.as_deref(),
                events,
                args.egress.record_limit,
            ) {
                Ok(p) => {
                    spec.proxy_socket = Some(p.socket.clone());
                    Some(p)
                }
                Err(e) => return fail(&format!("sandbox setup failed: network: {e}")),
            }
        }
        NetworkMode::None | NetworkMode::Host => None,
    };
    // a terminal: sent to the server's console socket, or relayed here
    let mut relay = None;
    let mut console_end = None;
    if let Some(t) = args.tty {
        let console = match t.console_fd {
            Some(n) => match crate::tty::is_socket(n) {
                Ok(()) => n,
                Err(e) => return fail(&format!("the console fd {n}: {e}")),
            },
            None => match crate::tty::console_pair() {
                Ok((ours, theirs)) => match crate::tty::Relay::start(theirs, &ours) {
                    Ok(r) => {
                        relay = Some(r);
                        let n = ours.as_raw_fd();
                        console_end = Some(ours);
                        n
                    }
                    Err(e) => return fail(&format!("sandbox setup failed: terminal: {e}")),
                },
                Err(e) => return fail(&format!("sandbox setup failed: terminal: {e}")),
            },
        };
        spec.stdio = agentvm_sandbox::Stdio::Pty {
            console,
            rows: t.rows,
            cols: t.cols,
            raw: t.raw,
        };
    }
    if let Some(n) = args.ports_fd {
        match crate::tty::is_seqpacket_socket(n) {
            Ok(()) => spec.ports_listener = Some(n),
            Err(e) => return fail(&format!("the ports fd {n}: {e}")),
        }
    }
    if let Some(n) = args.control_fd {
        match crate::tty::is_seqpacket_socket(n) {
            Ok(()) => spec.control = Some(n),
            Err(e) => return fail(&format!("the control fd {n}: {e}")),
        }
    }
    let outcome = match agentvm_sandbox::backend::by_name(args.backend.name()) {
        Some(b) => b.run(&spec),
        None => {
            return fail(&format!(
                "the {} backend is not in this build",
                args.backend.name()
            ))
        }
    };
    drop(console_end);
    // the proxy first: a descriptor of the terminal the sandbox sent it
    // (over its socket) would otherwise keep the relay waiting
    if let Some(p) = proxy {
        let (records, unrecorded) = p.finish();
        result.egress = Some(records);
        result.egress_unrecorded = unrecorded;
    }
    // the relay ends when the terminal does (or at once if none was
    // sent), within a bound whatever still holds it
    if let Some(r) = relay {
        r.finish(crate::tty::DRAIN);
    }
    let code: i32 = match outcome {
        Err(RunError::Setup(e)) => {
            report_setup_error(&e, &mut result);
            EXIT_SETUP as i32
        }
        Err(RunError::Exec {
            command,
            kind,
            reason,
        }) => {
            eprintln!("agentvm: {command}: {reason}");
            let code = match kind {
                ExecFailure::NotFound => 127,
                ExecFailure::NotExecutable => 126,
            };
            result.exit_code = code;
            result.error = Some(RunErrorInfo {
                layer: "exec".into(),
                message: format!("{command}: {reason}"),
            });
            code
        }
        Ok(o) => {
            let (status, code, signal) = match o.ended {
                Ended::Exited(c) => (RunStatus::Exited, c, None),
                Ended::Signaled(s) => (RunStatus::Signaled, 128 + s, Some(s)),
                Ended::Timeout => (RunStatus::Timeout, 124, None),
                Ended::Oom => (RunStatus::Oom, 137, Some(9)),
            };
            if o.ended == Ended::Timeout {
                eprintln!(
                    "agentvm: timed out after {}",
                    humanize(limits.timeout.unwrap_or_default())
                );
            }
            if o.ended == Ended::Oom {
                eprintln!("agentvm: killed: the sandbox exceeded its memory limit");
            }
            result.status = status;
            result.exit_code = code;
            result.signal = signal;
            result.duration_ms = o.duration.as_millis() as u64;
            result.setup_ms = Some(o.setup.as_millis() as u64);
            result.oom_kills = o.oom_kills;
            result.memory_peak_bytes = o.memory_peak;
            result.cpu_ms = o.cpu_time.map(|t| t.as_millis() as u64);
            result.landlock_abi = o.landlock_abi;
            result.disk_limit_bytes = Some(limits.disk);
            // the scratch filesystem the upper lives on holds /tmp and HOME
            // too: near empty of room, the command's writes met ENOSPC
            if let Ok(st) = nix::sys::statvfs::fstatvfs(&o.upper) {
                let free = st.blocks_available().saturating_mul(st.fragment_size());
                if free < 64 * 1024 {
                    result.disk_full = true;
                    eprintln!(
                        "agentvm: the sandbox's disk ({} bytes) is full: writes past it failed with ENOSPC",
                        limits.disk
                    );
                }
            }
            if !o.cgroup && !result.layers_disabled.iter().any(|l| l == "cgroup") {
                // no limit asked for one: say so, the sandbox is unbounded
                // in memory, processes and CPU
                result.layers_disabled.push("cgroup".into());
            }
            if outs.patch.is_some() || outs.result.is_some() {
                // with layers over the repo, the changes are of what the
                // sandbox showed before the command: the base, not the repo
                let before = o.base.as_ref().or(repo_dir.as_ref());
                if let Err(e) = capture(&args, &o.upper, before, &protected, &mut outs, &mut result)
                {
                    eprintln!("agentvm: capturing the changes failed: {e}");
                    result.status = RunStatus::Error;
                    result.error = Some(RunErrorInfo {
                        layer: "capture".into(),
                        message: e,
                    });
                    if let Some(f) = outs.patch.as_mut() {
                        // never leave a partial patch someone could apply
                        let _ = f.set_len(0);
                    }
                    return finish(&mut outs, &result, EXIT_SETUP as i32);
                }
                if !result.protected_changes.is_empty() {
                    eprintln!(
                        "agentvm: note: the patch changes files that run by themselves later ({}); `agentvm jobs apply` refuses them, review them before applying the patch yourself",
                        result.protected_changes.join(", ")
                    );
                }
            }
            // after the capture: what it refuses (a path too long, too many
            // changes) is never kept either
            if let Some(out) = &args.layer_out {
                if let Err(e) = save_layer(&o.upper, out, limits.disk) {
                    eprintln!("agentvm: saving the workspace's changes failed: {e}");
                    result.status = RunStatus::Error;
                    result.error = Some(RunErrorInfo {
                        layer: "workspace".into(),
                        message: e,
                    });
                    return finish(&mut outs, &result, EXIT_SETUP as i32);
                }
            }
            code
        }
    };
    finish(&mut outs, &result, code)
}

// the runner checks a request against the sandbox's own limit
const _: () = assert!(agentvm_proto::run::MAX_STACK == agentvm_sandbox::MAX_STACK);

/// Opened layer directories as the sandbox takes them (the descriptors
/// stay ours, open until the run ends).
fn stack_layers(v: &[(PathBuf, std::os::fd::OwnedFd)]) -> Vec<agentvm_sandbox::StackLayer> {
    v.iter()
        .map(|(path, fd)| agentvm_sandbox::StackLayer {
            path: path.clone(),
            fd: fd.as_raw_fd(),
        })
        .collect()
}

/// Save the upper directory as the layer `out` (its parent is the store).
fn save_layer(
    upper: &std::os::fd::OwnedFd,
    out: &std::path::Path,
    disk: u64,
) -> Result<(), String> {
    use std::os::fd::AsFd;
    let (Some(store), Some(id)) = (out.parent(), out.file_name().and_then(|n| n.to_str())) else {
        return Err(format!(
            "layer {}: not a path in a layer store",
            out.display()
        ));
    };
    agentvm_workspace::layer::save(
        upper.as_fd(),
        store,
        id,
        agentvm_workspace::layer::Bounds::with_bytes(disk),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Write the result (whatever happened, there is one) and exit.
fn finish(outs: &mut Outputs, result: &RunResult, code: i32) -> ExitCode {
    if let Some(f) = outs.result.as_mut() {
        match serde_json::to_vec_pretty(result) {
            Ok(mut bytes) => {
                bytes.push(b'\n');
                if let Err(e) = f.write_all(&bytes) {
                    eprintln!("agentvm: writing the result: {e}");
                }
            }
            Err(e) => eprintln!("agentvm: encoding the result: {e}"),
        }
    }
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Capture every change into --patch-out and the result, streaming: the
/// host's memory does not follow the files' sizes.
fn capture(
    args: &RunRequest,
    upper: &std::os::fd::OwnedFd,
    repo: Option<&std::os::fd::OwnedFd>,
    protected: &agentvm_workspace::Protected,
    outs: &mut Outputs,
    result: &mut RunResult,
) -> Result<(), String> {
    use std::os::fd::AsFd;
    let cap = agentvm_workspace::capture(upper.as_fd(), repo.map(|r| r.as_fd()))
        .map_err(|e| e.to_string())?;
    result.changed_files = cap
        .changes
        .iter()
        .map(|c| c.path().to_string_lossy().into_owned())
        .collect();
    result.protected_changes =
        agentvm_workspace::apply::refused_paths(cap.changes.iter().map(|c| c.path()), protected);
    let opts = agentvm_workspace::PatchOptions {
        binary_max: args.patch.binary_max,
        max_bytes: args.patch.max,
    };
    let rendered = match outs.patch.as_mut() {
        Some(f) => {
            let mut w = std::io::BufWriter::with_capacity(256 * 1024, &*f);
            let r = agentvm_workspace::render(&cap, &opts, &mut w);
            drop(w);
            r.and_then(|r| {
                // a regular file is made durable; a pipe or /dev/null has
                // nothing to sync
                if f.metadata().is_ok_and(|m| m.is_file()) {
                    f.sync_all()
                        .map_err(agentvm_workspace::RenderError::Write)?;
                }
                Ok(r)
            })
        }
        None => agentvm_workspace::render(&cap, &opts, &mut std::io::sink()),
    };
    let r = match rendered {
        Ok(r) => r,
        Err(e) => {
            result.patch_too_large = matches!(e, agentvm_workspace::RenderError::TooLarge { .. });
            return Err(e.to_string());
        }
    };
    result.binary_omitted = r.binary_omitted;
    result.patch_bytes = r.bytes;
    Ok(())
}

fn report_setup_error(e: &SetupError, result: &mut RunResult) {
    eprintln!("agentvm: sandbox setup failed: {e}");
    result.error = Some(RunErrorInfo {
        layer: e.layer.to_string(),
        message: e.message.clone(),
    });
}

fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_parsing() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("1A=x").is_err());
        assert!(parse_env("A-B=x").is_err());
        assert!(parse_env_key("_OK9").is_ok());
    }

    #[test]
    fn ro_bind_rules() {
        assert!(parse_ro_bind("/usr/bin:/opt/tools").is_ok());
        assert!(parse_ro_bind("/usr/bin:relative").is_err());
        assert!(parse_ro_bind("/usr/bin:/workspace/x").is_err());
        assert!(parse_ro_bind("/usr/bin:/proc/x").is_err());
        assert!(parse_ro_bind("/usr/bin:/opt/../etc").is_err());
        assert!(parse_ro_bind("/nonexistent-agentvm-path").is_err());
        assert!(parse_ro_bind("/usr/bin:/").is_err());
    }
}
