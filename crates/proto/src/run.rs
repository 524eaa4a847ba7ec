//! One sandbox run: what is asked ([`RunRequest`]) and how it ended
//! ([`RunResult`]).

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::egress::{EgressRecord, Unrecorded, RECORD_LIMIT};
use crate::network::NetworkMode;

/// Everything a run needs, already parsed. `agentvm run` builds one from
/// its flags; the server builds one from a job and its profile and hands
/// it to the runner as JSON (`agentvm-run run-request FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The command and its arguments (argv[0] is looked up in the
    /// sandbox's PATH).
    #[serde(with = "os_args")]
    pub command: Vec<OsString>,
    /// What /workspace is a copy-on-write view of.
    #[serde(default)]
    pub repo: Option<Repo>,
    /// A workspace's layers laid over `repo`, newest first (absolute
    /// paths of directories made by `agentvm_workspace::layer`), at most
    /// [`MAX_STACK`]. The patch is of what this run changed over them.
    #[serde(default)]
    pub stack: Vec<PathBuf>,
    /// The image the sandbox runs on instead of the host's system
    /// directories (resolved from the image store by the caller).
    #[serde(default)]
    pub image: Option<ImageRun>,
    /// Save what this run changed as a new layer here (an absolute path
    /// that does not exist yet; its name is the layer's id, its parent the
    /// layer store). Written once the command has ended.
    #[serde(default)]
    pub layer_out: Option<PathBuf>,
    /// Where every change goes as a git-style patch.
    #[serde(default)]
    pub patch_out: Option<PathBuf>,
    /// Where the [`RunResult`] goes, as JSON.
    #[serde(default)]
    pub result_json: Option<PathBuf>,
    #[serde(default)]
    pub network: NetworkMode,
    #[serde(default)]
    pub egress: EgressOptions,
    #[serde(default)]
    pub limits: Limits,
    /// Variables set in the sandbox, in order (a later one wins).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Variables copied from the runner's own environment (secrets travel
    /// this way, never in the request).
    #[serde(default)]
    pub env_pass: Vec<String>,
    /// Extra read-only paths, `SRC[:DST]` (checked by the runner, which
    /// sees the filesystem).
    #[serde(default)]
    pub ro_binds: Vec<String>,
    /// Cgroup (relative to each hierarchy's root) to create the sandbox's
    /// cgroup under.
    #[serde(default)]
    pub cgroup_parent: Option<PathBuf>,
    #[serde(default)]
    pub patch: PatchLimits,
    #[serde(default)]
    pub layers: Layers,
    /// Die when the process that started the runner dies.
    #[serde(default)]
    pub die_with_parent: bool,
    /// With `die_with_parent`: the pid of that process. A runner whose
    /// parent is already someone else when it arms the death signal (the
    /// server died between starting it and then) exits instead of running
    /// a job nobody waits for.
    #[serde(default)]
    pub parent_pid: Option<u32>,
    /// What isolates the command.
    #[serde(default)]
    pub backend: BackendKind,
    /// A terminal for the command instead of the runner's own 0, 1 and 2.
    #[serde(default)]
    pub tty: Option<Tty>,
    /// A SEQPACKET Unix socket the runner inherited at this number: a
    /// forwarder inside the sandbox reads forward requests from it (a
    /// port, two bytes big-endian, with a stream socket attached) and
    /// connects each to that port on the sandbox's own loopback, answering
    /// one byte on the stream (0 open, 1 refused). Not with the host's
    /// network.
    #[serde(default)]
    pub ports_fd: Option<i32>,
    /// A SEQPACKET Unix socket the runner inherited at this number: the
    /// sandbox's supervisor reads pause and resume requests from it and
    /// answers each (the protocol of `agentvm_sandbox::control`); the
    /// sandbox gets a freezer cgroup for it. Needs the cgroup layer.
    #[serde(default)]
    pub control_fd: Option<i32>,
}

/// The most rows or columns a terminal may have.
pub const TTY_MAX: u16 = 1000;

/// The command runs on a terminal of the sandbox's own, `rows` x `cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tty {
    pub rows: u16,
    pub cols: u16,
    /// A Unix socket the runner inherited at this number: the terminal's
    /// primary side is sent there (one message "pty" with the descriptor
    /// attached), for the parent to read and write. Without it the runner
    /// relays between its own stdin and stdout and the terminal.
    #[serde(default)]
    pub console_fd: Option<i32>,
    /// No line discipline (cfmakeraw) from the start: no echo, no line
    /// editing, no signals from keys, output bytes unchanged. What an
    /// `ssh HOST COMMAND` without a terminal expects of its bytes.
    #[serde(default)]
    pub raw: bool,
}

/// The sandbox backends a request may name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Linux namespaces (the default).
    #[default]
    Ns,
}

impl BackendKind {
    /// The backend's name in the sandbox crate.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Ns => "ns",
        }
    }
}

/// The most layers a run may lay over its repo (the sandbox's limit).
pub const MAX_STACK: usize = 64;

/// The directory /workspace shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Repo {
    /// Opened by the runner.
    Path(PathBuf),
    /// Already opened and checked by whoever started the runner, which
    /// inherits it at this descriptor (3 or above).
    Fd(i32),
}

/// The egress proxy's reporting (network allow mode only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressOptions {
    /// Write each decision as a JSON line to this file.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Also write each decision, as it is made, to this inherited
    /// descriptor (a pipe, 3 or above). Best effort.
    #[serde(default)]
    pub events_fd: Option<i32>,
    /// Record this many connections one by one, then only count them.
    #[serde(default = "record_limit")]
    pub record_limit: u64,
}

fn record_limit() -> u64 {
    RECORD_LIMIT
}

impl Default for EgressOptions {
    fn default() -> Self {
        EgressOptions {
            log: None,
            events_fd: None,
            record_limit: RECORD_LIMIT,
        }
    }
}

/// What the sandbox may use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Bytes, swap included.
    #[serde(default)]
    pub memory: Option<u64>,
    /// Processes and threads.
    #[serde(default)]
    pub pids: Option<u64>,
    /// CPUs to pin to, e.g. `0-1` (checked by [`crate::units::parse_cpus`]).
    #[serde(default)]
    pub cpus: Option<String>,
    /// CPU bandwidth in cores.
    #[serde(default)]
    pub cpu_quota: Option<f64>,
    /// What /workspace changes, /tmp, /dev/shm and HOME may add together
    /// (bytes; the sandbox's default when absent).
    #[serde(default)]
    pub disk: Option<u64>,
    /// Wall-clock limit in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The longest timeout a run may ask for (a year, as `--timeout` allows).
pub const TIMEOUT_MAX_MS: u64 = 365 * 24 * 3600 * 1000;

/// The most processes a run may ask for (the kernel's own pid limit).
pub const PIDS_MAX: u64 = 4_194_304;

/// How large the patch may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchLimits {
    /// Largest binary file encoded; larger ones are only marked.
    pub binary_max: u64,
    /// Largest patch written; a larger one fails the run.
    pub max: u64,
}

impl Default for PatchLimits {
    fn default() -> Self {
        PatchLimits {
            binary_max: 8 << 20,
            max: 1 << 30,
        }
    }
}

/// Which layers are in force (all by default; switching one off is loud).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layers {
    pub seccomp: bool,
    pub landlock: bool,
    pub cgroup: bool,
}

impl Default for Layers {
    fn default() -> Self {
        Layers {
            seccomp: true,
            landlock: true,
            cgroup: true,
        }
    }
}

/// Is `k` a variable name a sandbox may be given?
pub fn valid_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An image to run on: its unpacked layers and what its config sets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRun {
    /// `sha256:...`, for the result.
    pub digest: String,
    /// Layer directories, bottom first (as the image lists them).
    pub layers: Vec<PathBuf>,
    /// The config's Env (`KEY=VALUE`), applied before the sandbox's own
    /// variables and --env.
    #[serde(default)]
    pub env: Vec<String>,
    /// The config's `User`, resolved against the image's own passwd and
    /// group: who the command runs as inside (None: root inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<RunUser>,
    /// Where the command starts when it is the image's own (the config's
    /// WorkingDir); None: /workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<PathBuf>,
}

/// A user inside the sandbox other than root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunRequest {
    /// A request for `command` with every default.
    pub fn new(command: Vec<OsString>) -> RunRequest {
        RunRequest {
            command,
            repo: None,
            stack: Vec::new(),
            image: None,
            layer_out: None,
            patch_out: None,
            result_json: None,
            network: NetworkMode::None,
            egress: EgressOptions::default(),
            limits: Limits::default(),
            env: Vec::new(),
            env_pass: Vec::new(),
            ro_binds: Vec::new(),
            cgroup_parent: None,
            patch: PatchLimits::default(),
            layers: Layers::default(),
            die_with_parent: false,
            parent_pid: None,
            backend: BackendKind::Ns,
            tty: None,
            ports_fd: None,
            control_fd: None,
        }
    }

    /// Everything that can be judged without the filesystem: the same
    /// rules `agentvm run`'s flags enforce, for a request that came as JSON.
    pub fn check(&self) -> Result<(), String> {
        if self.command.is_empty() {
            return Err("the request has no command".into());
        }
        if self
            .command
            .iter()
            .any(|a| a.as_encoded_bytes().contains(&0))
        {
            return Err("the command contains a NUL byte".into());
        }
        if let Some(Repo::Fd(n)) = self.repo {
            if n < 3 {
                return Err(format!(
                    "repo fd {n}: not a descriptor the runner may take over"
                ));
            }
        }
        if let Some(n) = self.egress.events_fd {
            if n < 3 {
                return Err(format!(
                    "egress events fd {n}: not a descriptor the runner may take over"
                ));
            }
        }
        if let Some(p) = &self.cgroup_parent {
            if p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
                || p.as_os_str().as_encoded_bytes().contains(&0)
            {
                return Err(format!(
                    "cgroup parent {}: a path inside the cgroup hierarchy, without ..",
                    p.display()
                ));
            }
        }
        if self.stack.len() > MAX_STACK {
            return Err(format!(
                "{} layers over the repo: at most {MAX_STACK}",
                self.stack.len()
            ));
        }
        if let Some(img) = &self.image {
            if img.layers.is_empty() || img.layers.len() > MAX_STACK {
                return Err(format!(
                    "image {}: {} layers; 1 to {MAX_STACK}",
                    img.digest,
                    img.layers.len()
                ));
            }
        }
        let image_layers = self.image.iter().flat_map(|i| i.layers.iter());
        for l in self.stack.iter().chain(&self.layer_out).chain(image_layers) {
            let plain = l.is_absolute()
                && !l
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                && !l.as_os_str().as_encoded_bytes().contains(&0);
            if !plain {
                return Err(format!(
                    "layer {}: an absolute path without ..",
                    l.display()
                ));
            }
        }
        if self.ports_fd.is_some_and(|n| n < 3) {
            return Err("ports fd: not a descriptor the runner may take over".into());
        }
        if self.ports_fd.is_some() && self.network == NetworkMode::Host {
            return Err(
                "ports fd: port forwarding needs the sandbox's own network, not the host's".into(),
            );
        }
        if self.control_fd.is_some_and(|n| n < 3) {
            return Err("control fd: not a descriptor the runner may take over".into());
        }
        if self.control_fd.is_some() && !self.layers.cgroup {
            return Err(
                "control fd: pausing needs a cgroup to freeze, and the cgroup layer is off".into(),
            );
        }
        if let Some(t) = &self.tty {
            if !(1..=TTY_MAX).contains(&t.rows) || !(1..=TTY_MAX).contains(&t.cols) {
                return Err(format!(
                    "terminal {}x{}: rows and columns must be 1 to {TTY_MAX}",
                    t.rows, t.cols
                ));
            }
            if t.console_fd.is_some_and(|n| n < 3) {
                return Err("console fd: not a descriptor the runner may take over".into());
            }
        }
        if let Some(p) = self.limits.pids {
            if !(1..=PIDS_MAX).contains(&p) {
                return Err(format!("pids {p}: expected 1 to {PIDS_MAX}"));
            }
        }
        if let Some(t) = self.limits.timeout_ms {
            if !(1..=TIMEOUT_MAX_MS).contains(&t) {
                return Err(format!("timeout {t} ms: expected 1 ms to a year"));
            }
        }
        for (what, v) in [("memory", self.limits.memory), ("disk", self.limits.disk)] {
            if v == Some(0) {
                return Err(format!("{what} 0: expected at least 1 byte"));
            }
        }
        if let Some(c) = &self.limits.cpus {
            crate::units::parse_cpus(c)?;
        }
        if let Some(q) = self.limits.cpu_quota {
            crate::units::parse_cores(&q.to_string())?;
        }
        for (k, v) in &self.env {
            if !valid_env_key(k) {
                return Err(format!("invalid variable name {k:?}"));
            }
            if v.contains('\0') {
                return Err(format!("the value of {k} contains a NUL byte"));
            }
        }
        if let Some(k) = self.env_pass.iter().find(|k| !valid_env_key(k)) {
            return Err(format!("invalid variable name {k:?}"));
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Exited,
    Signaled,
    Timeout,
    Oom,
    /// The sandbox could not be set up, the command not started, or the
    /// changes not captured ([`RunResult::error`] says which).
    Error,
}

/// The network a run had (the policy itself is in the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    None,
    Host,
    Allow,
}

impl From<&NetworkMode> for NetworkKind {
    fn from(n: &NetworkMode) -> NetworkKind {
        match n {
            NetworkMode::None => NetworkKind::None,
            NetworkMode::Host => NetworkKind::Host,
            NetworkMode::Allow(_) => NetworkKind::Allow,
        }
    }
}

/// Which layer failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunErrorInfo {
    pub layer: String,
    pub message: String,
}

/// How a run ended: what `--result-json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub status: RunStatus,
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub setup_ms: Option<u64>,
    pub changed_files: Vec<String>,
    pub binary_omitted: Vec<String>,
    /// Changed paths that `apply` refuses (startup files, hooks, CI, ...):
    /// review them before applying the patch by hand.
    pub protected_changes: Vec<String>,
    pub patch_bytes: u64,
    /// The patch passed the patch limit and was not written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub patch_too_large: bool,
    /// The sandbox's disk (its scratch: /workspace changes, /tmp, HOME)
    /// was full, or within 64 KiB of it, when the command ended: writes
    /// past it failed with ENOSPC.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_full: bool,
    /// The sandbox's disk limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limit_bytes: Option<u64>,
    pub oom_kills: u64,
    pub memory_peak_bytes: Option<u64>,
    /// The image it ran on (`sha256:...`); none: the host's system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU time the sandbox's processes used, user and system, where a
    /// cgroup counted it (one is made when a limit asks for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// The memory limit in force (none unless asked for).
    pub memory_limit_bytes: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub network: NetworkKind,
    pub landlock_abi: u32,
    pub layers_disabled: Vec<String>,
    pub error: Option<RunErrorInfo>,
    /// Connections past the record limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_unrecorded: Option<Unrecorded>,
    /// Every decision of the egress proxy (allow mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRecord>>,
}

impl RunResult {
    /// The result of a run that has not got past set-up (yet).
    pub fn setup_failed(req: &RunRequest, exit_code: i32) -> RunResult {
        RunResult {
            status: RunStatus::Error,
            exit_code,
            signal: None,
            duration_ms: 0,
            setup_ms: None,
            changed_files: Vec::new(),
            binary_omitted: Vec::new(),
            protected_changes: Vec::new(),
            patch_bytes: 0,
            patch_too_large: false,
            disk_full: false,
            disk_limit_bytes: None,
            oom_kills: 0,
            memory_peak_bytes: None,
            cpu_ms: None,
            image: req.image.as_ref().map(|i| i.digest.clone()),
            memory_limit_bytes: req.limits.memory,
            timeout_ms: req.limits.timeout_ms,
            network: NetworkKind::from(&req.network),
            landlock_abi: 0,
            layers_disabled: Vec::new(),
            error: None,
            egress_unrecorded: None,
            egress: None,
        }
    }
}

/// Arguments as JSON strings when they are UTF-8 (every argument the
/// server sends), as arrays of bytes otherwise: exact either way.
mod os_args {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Arg<'a> {
        Text(std::borrow::Cow<'a, str>),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(v: &[OsString], s: S) -> Result<S::Ok, S::Error> {
        let args: Vec<Arg<'_>> = v
            .iter()
            .map(|a| match a.to_str() {
                Some(t) => Arg::Text(t.into()),
                None => Arg::Bytes(a.as_bytes().to_vec()),
            })
            .collect();
        args.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OsString>, D::Error> {
        let args: Vec<Arg<'de>> = Vec::deserialize(d)?;
        Ok(args
            .into_iter()
            .map(|a| match a {
                Arg::Text(t) => OsString::from(t.into_owned()),
                Arg::Bytes(b) => OsString::from_vec(b),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn req() -> RunRequest {
        let mut r = RunRequest::new(vec!["sh".into(), OsString::from_vec(vec![b'a', 0xff])]);
        r.network = NetworkMode::parse("allow:example.com:443").unwrap_or_default();
        r.limits.memory = Some(1 << 20);
        r.env.push(("A".into(), "b".into()));
        r.repo = Some(Repo::Fd(3));
        r
    }

    #[test]
    fn a_request_survives_json_exactly() {
        let r = req();
        let j = serde_json::to_string(&r).unwrap_or_default();
        assert!(j.contains(r#""command":["sh",[97,255]]"#), "{j}");
        assert!(j.contains(r#""network":"allow:example.com:443""#), "{j}");
        let back: RunRequest = serde_json::from_str(&j).unwrap_or_else(|e| panic!("{e}: {j}"));
        assert_eq!(back, r);
        assert_eq!(back.check(), Ok(()));
    }

    #[test]
    fn check_refuses_what_the_flags_refuse() {
        let tty = |rows, cols, console_fd| {
            Some(Tty {
                rows,
                cols,
                console_fd,
                raw: false,
            })
        };
        let mut ok = req();
        ok.tty = tty(24, 80, Some(5));
        assert!(ok.check().is_ok());
        for t in [
            tty(0, 80, None),
            tty(24, 0, None),
            tty(24, 1001, None),
            tty(24, 80, Some(1)),
        ] {
            let mut r = req();
            r.tty = t;
            assert!(r.check().is_err(), "{t:?} passed");
        }
        let bad: [fn(&mut RunRequest); 12] = [
            |r| r.limits.timeout_ms = Some(0),
            |r| r.limits.memory = Some(0),
            |r| r.limits.disk = Some(0),
            |r| r.command.clear(),
            |r| r.command.push("a\0b".into()),
            |r| r.repo = Some(Repo::Fd(2)),
            |r| r.egress.events_fd = Some(0),
            |r| r.limits.pids = Some(0),
            |r| r.limits.cpus = Some("x".into()),
            |r| r.env.push(("1A".into(), "x".into())),
            |r| r.env_pass.push("A-B".into()),
            |r| r.cgroup_parent = Some("../../etc".into()),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut r = req();
            f(&mut r);
            assert!(r.check().is_err(), "case {i} passed: {r:?}");
        }
    }

    #[test]
    fn a_bad_network_in_json_is_refused_when_read() {
        let j = r#"{"command":["true"],"network":"allow:"}"#;
        assert!(serde_json::from_str::<RunRequest>(j).is_err());
        let j = r#"{"command":["true"],"network":"bridge"}"#;
        assert!(serde_json::from_str::<RunRequest>(j).is_err());
        // a misspelled key is refused, not ignored (it could drop a limit)
        let j = r#"{"command":["true"],"limit":{"memory":1}}"#;
        assert!(serde_json::from_str::<RunRequest>(j).is_err());
        let j = r#"{"command":["true"],"limits":{"memroy":1}}"#;
        assert!(serde_json::from_str::<RunRequest>(j).is_err());
        let j = r#"{"command":["true"]}"#;
        let r: RunRequest = serde_json::from_str(j).unwrap();
        assert_eq!(r.network, NetworkMode::None);
        assert_eq!(r.layers, Layers::default());
    }

    #[test]
    fn results_round_trip() {
        let mut r = RunResult::setup_failed(&req(), 125);
        r.error = Some(RunErrorInfo {
            layer: "mount".into(),
            message: "no".into(),
        });
        let v = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(v["status"], "error");
        assert_eq!(v["network"], "allow");
        assert_eq!(v["error"]["layer"], "mount");
        assert!(v.get("patch_too_large").is_none());
        let back: RunResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
