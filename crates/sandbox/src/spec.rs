//! What a caller asks for: a pure description of one sandbox, validated at
//! construction by the caller (the CLI or the server), consumed by a backend.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Where `/workspace` comes from and where it lives inside the sandbox.
pub const WORKSPACE_DIR: &str = "/workspace";
/// The private, writable home directory inside the sandbox.
pub const HOME_DIR: &str = "/home/agent";
/// The hostname every sandbox gets.
pub const HOSTNAME: &str = "agentvm";

/// Network policy. `Allow` (an egress allowlist through a proxy) is added by
/// the egress crate later; the variant set is kept open for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Network {
    /// A private network namespace with only a loopback interface.
    None,
    /// The host's network namespace (no network isolation at all).
    Host,
    /// A private network namespace whose only way out is the host's Unix
    /// socket `SandboxSpec::proxy_socket`, bridged to [`PROXY_ADDR`] inside
    /// (the egress allowlist proxy listens on that socket).
    #[serde(rename = "allow")]
    Proxied,
}

/// Where the bridge to the egress proxy listens inside the sandbox.
pub const PROXY_ADDR: &str = "127.0.0.1:3128";
/// Where the proxy's socket appears inside the sandbox.
pub const PROXY_SOCKET: &str = "/run/agentvm/egress.sock";

/// Resource limits. `None` means "no limit of this kind".
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Memory limit in bytes (cgroup memory controller, swap included where
    /// the kernel accounts it).
    pub memory: Option<u64>,
    /// Maximum number of tasks (cgroup pids controller).
    pub pids: Option<u64>,
    /// CPU list to pin to, in the kernel's list syntax ("0", "0-1", "0,2").
    pub cpus: Option<String>,
    /// CPU bandwidth in cores (1.5 = one and a half cores).
    pub cpu_quota: Option<f64>,
    /// Bytes that /workspace changes, /tmp, /dev/shm and HOME may add
    /// together (size of the private scratch tmpfs).
    pub disk: u64,
    /// Wall-clock limit; the whole process tree is killed when it expires.
    pub timeout: Option<Duration>,
}

/// Layers a caller may switch off explicitly. Every layer is on by default,
/// and switching one off is printed loudly by the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    pub seccomp: bool,
    pub landlock: bool,
    /// Cgroups are needed only when a cgroup limit is asked for; this flag
    /// lets a caller run limits-free where cgroups are not delegated.
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

/// What the command's descriptors 0, 1 and 2 are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// The caller's own 0, 1 and 2, as they are (pipes, files, a terminal).
    #[default]
    Inherit,
    /// A new terminal that belongs to the sandbox: the command leads a new
    /// session with the terminal's secondary side as its controlling
    /// terminal on 0, 1 and 2. The backend sends the primary side over
    /// `console` (a Unix socket of the caller's: one message "pty" with
    /// the descriptor attached) once the command is started; the caller
    /// reads output and writes input there, and sets the size with
    /// TIOCSWINSZ. The terminal is the sandbox's own (the namespace
    /// backend allocates it from the sandbox's private devpts), so nothing
    /// inside holds a terminal of the host.
    Pty {
        console: std::os::fd::RawFd,
        rows: u16,
        cols: u16,
        /// Raw from the start (cfmakeraw, before the command runs): bytes
        /// pass both ways unchanged, nothing echoes.
        raw: bool,
    },
}

/// An extra read-only bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoBind {
    /// Canonical host path.
    pub src: PathBuf,
    /// Absolute path inside the sandbox.
    pub dst: PathBuf,
}

/// A user inside the sandbox other than root.
#[derive(Debug, Clone, PartialEq)]
pub struct InnerUser {
    /// Its name in the sandbox's /etc/passwd.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl InnerUser {
    /// A user name /etc/passwd can hold as it is (no `:` or newline can
    /// add an entry), not root's ids, not the overflow id.
    pub fn check(&self) -> Result<(), String> {
        let b = self.name.as_bytes();
        let name_ok = !b.is_empty()
            && b.len() <= 32
            && (b[0].is_ascii_lowercase() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(c));
        if !name_ok {
            return Err(format!(
                "user name {:?}: lowercase letters, digits and _-. only, at most 32",
                self.name.chars().take(40).collect::<String>()
            ));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err("a user inside other than root must not have uid or gid 0".into());
        }
        if self.uid == u32::MAX || self.gid == u32::MAX {
            return Err("uid and gid 4294967295 cannot be mapped".into());
        }
        Ok(())
    }
}

/// One sandbox, fully described.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The command and its arguments; argv[0] is looked up in the sandbox's
    /// PATH when it contains no slash.
    pub argv: Vec<OsString>,
    /// The complete environment of the command (nothing else is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// Canonical host directory shown copy-on-write at /workspace; `None`
    /// gives an empty writable /workspace.
    pub repo: Option<PathBuf>,
    /// A descriptor of the caller's for that directory: the sandbox shows
    /// `repo` only if it is still this very directory (same device and
    /// inode), so a path swapped after the caller's checks changes nothing.
    pub repo_fd: Option<std::os::fd::RawFd>,
    /// Layer directories laid over `repo` at /workspace, newest first (a
    /// workspace's state: overlayfs upper trees frozen by
    /// `agentvm_workspace::layer`), at most [`MAX_STACK`]. Read-only.
    pub stack: Vec<StackLayer>,
    /// An image's layers, newest first (directories unpacked by
    /// `agentvm_image`): stacked read-only with overlayfs, they are the
    /// sandbox's system directories and /etc instead of the host's. Empty:
    /// the host's, as always.
    pub image: Vec<StackLayer>,
    pub ro_binds: Vec<RoBind>,
    pub stdio: Stdio,
    pub network: Network,
    pub limits: Limits,
    pub layers: Layers,
    /// Host uid/gid that root inside the sandbox maps to when AgentVM runs
    /// as root (never 0). Ignored when run unprivileged: then root inside is
    /// the calling user.
    pub root_maps_to: u32,
    /// Paths relative to /workspace shown read-only inside: what a shell,
    /// an editor, git or CI would execute later (the runner decides the
    /// set). Each is resolved beneath /workspace without following any
    /// symlink; one that is not there (or is a symlink) is skipped.
    pub protected: Vec<PathBuf>,
    /// With `Network::Proxied`: the host path of the proxy's Unix socket.
    pub proxy_socket: Option<PathBuf>,
    /// One end of the caller's SEQPACKET socket pair (close-on-exec): a
    /// forwarder inside the sandbox's network namespace reads forward
    /// requests from it, each reaching a TCP port on the sandbox's own
    /// loopback (see `ns::ports`). Refused with `Network::Host`, where
    /// that loopback is the host's.
    pub ports_listener: Option<std::os::fd::RawFd>,
    /// Who the command runs as inside the sandbox's user namespace (an
    /// image's `User`); root inside when None. Either way it is the one id
    /// mapped, to the same host id root inside would be: a user inside
    /// changes what the command is called and that it holds no
    /// capability, never what it can reach on the host.
    pub user: Option<InnerUser>,
    /// Where the command starts, an absolute path inside the sandbox;
    /// None: /workspace.
    pub cwd: Option<PathBuf>,
    /// One end of the caller's SEQPACKET socket pair (close-on-exec): the
    /// supervisor reads pause and resume requests from it and answers
    /// each (see `ns::control`). The sandbox gets a freezer cgroup for it.
    pub control: Option<std::os::fd::RawFd>,
    /// Cgroup parent (relative to each hierarchy's root) under which the
    /// sandbox's cgroup is created; `None` uses the caller's own cgroup.
    pub cgroup_parent: Option<PathBuf>,
}

/// The id that root inside a sandbox maps to when AgentVM runs as root:
/// the conventional overflow/nobody id.
pub const DEFAULT_ROOT_MAPS_TO: u32 = 65534;

/// One layer over the repo: opened by the caller (who may reach the
/// layer store, which the sandbox's own user may not), bound from that
/// descriptor; the path is for messages.
#[derive(Debug, Clone)]
pub struct StackLayer {
    pub path: PathBuf,
    pub fd: std::os::fd::RawFd,
}

/// The most layers a sandbox lays over its repo.
pub const MAX_STACK: usize = 64;

/// Default scratch size for `Limits::disk`.
pub const DEFAULT_DISK: u64 = 1 << 30;
