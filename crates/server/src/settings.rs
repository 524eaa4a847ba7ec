//! `agentvm serve`'s settings, declared once: each field is a flag (with
//! its AGENTVM_* variable) and a key of the config file; [`Settings::over`]
//! merges them (flags win) and [`Settings::resolve`] applies every default
//! in one place and checks every value, naming the setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use agentvm_proto::units;
use serde::Deserialize;

use crate::config::{Config, ProfileConfig, SecretSource};

/// The longest idle timeout a session may have.
pub const MAX_IDLE_S: u64 = 7 * 24 * 3600;

/// Every setting, each optional: from the config file, or from flags and
/// the environment.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML config file (every setting below, plus [agents.NAME] profiles).
    #[arg(long, value_name = "FILE", env = "AGENTVM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address and port to listen on [default: 127.0.0.1:8000].
    #[arg(long, value_name = "ADDR:PORT", env = "AGENTVM_LISTEN")]
    pub listen: Option<String>,
    /// Where the database, the first admin key and job files live
    /// [default: /var/lib/agentvm as root, ~/.local/share/agentvm otherwise].
    #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A tree jobs may use as repo_path (repeatable; none by default).
    #[arg(
        long = "allowed-root",
        value_name = "DIR",
        env = "AGENTVM_ALLOWED_ROOTS",
        value_delimiter = ':'
    )]
    #[serde(default)]
    pub allowed_roots: Vec<PathBuf>,
    /// Register the key in FILE as an admin key (from a secrets manager);
    /// only its hash is stored. (The client's AGENTVM_API_KEY_FILE is the
    /// key it sends, not this.)
    #[arg(long, value_name = "FILE", env = "AGENTVM_ADMIN_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, serve HTTPS.
    #[arg(long, value_name = "FILE", env = "AGENTVM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", env = "AGENTVM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Jobs running at once [default: 4].
    #[arg(long, value_name = "N", env = "AGENTVM_MAX_CONCURRENT")]
    pub max_concurrent: Option<usize>,
    /// Jobs that may wait; beyond, 429 [default: 100].
    #[arg(long, value_name = "N", env = "AGENTVM_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Largest request body; beyond, 413 [default: 1M].
    #[arg(long, value_name = "SIZE", env = "AGENTVM_BODY_LIMIT")]
    pub body_limit: Option<String>,
    /// Output kept per job (stdout and stderr together); the rest is
    /// discarded and the job marked output_truncated [default: 64M].
    #[arg(long, value_name = "SIZE", env = "AGENTVM_MAX_OUTPUT")]
    pub max_output: Option<String>,
    /// Largest patch kept per job; a job whose patch is larger fails, its
    /// output kept [default: 64M].
    #[arg(long, value_name = "SIZE", env = "AGENTVM_MAX_PATCH")]
    pub max_patch: Option<String>,
    /// Bytes a workspace's layers may hold, its checkpoints' included: a
    /// job or session over it gets at most what is left as its disk
    /// (ENOSPC inside past it), and none is started once it is used up
    /// (0 or none: no limit) [default: 10G].
    #[arg(long, value_name = "SIZE", env = "AGENTVM_WORKSPACE_QUOTA")]
    pub workspace_quota: Option<String>,
    /// Bytes every workspace's layers may hold together, enforced the same
    /// way (0 or none: no limit beyond the data directory's free space,
    /// which always counts, less 1G kept free) [default: none].
    #[arg(long, value_name = "SIZE", env = "AGENTVM_WORKSPACES_TOTAL")]
    pub workspaces_total: Option<String>,
    /// Requests per minute per key; beyond, 429 (0: no limit) [default: 600].
    #[arg(long, value_name = "N", env = "AGENTVM_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// On SIGTERM, how long running jobs may finish [default: 30s].
    #[arg(long, value_name = "DURATION", env = "AGENTVM_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// A secret for agents, NAME=FILE (repeatable): given to jobs whose
    /// profile lists NAME, redacted from all they produce. Variables a
    /// profile lists that the server's environment holds are secrets too.
    #[arg(long = "secret", value_name = "NAME=FILE")]
    #[serde(skip)]
    pub secret_files: Vec<String>,
    /// Cgroup to create job cgroups under (see `agentvm run --help`).
    #[arg(long, value_name = "PATH", env = "AGENTVM_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Connections of a job recorded one by one; later ones are only
    /// counted [default: 10000].
    #[arg(long, value_name = "N", env = "AGENTVM_EGRESS_RECORD_LIMIT")]
    pub egress_record_limit: Option<u64>,
    /// Sessions live at once, all keys together; beyond, 429 [default: 16].
    #[arg(long, value_name = "N", env = "AGENTVM_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Sessions live at once per key (or SSH identity) [default: 4].
    #[arg(long, value_name = "N", env = "AGENTVM_MAX_SESSIONS_PER_KEY")]
    pub max_sessions_per_key: Option<usize>,
    /// A session with no input and no viewer for this long ends; a
    /// request may ask for less [default: 1h, at most 7d].
    #[arg(long, value_name = "DURATION", env = "AGENTVM_SESSION_IDLE_TIMEOUT")]
    pub session_idle_timeout: Option<String>,
    /// Largest recording kept per session; past it the recording stops,
    /// the session goes on [default: 256M].
    #[arg(long, value_name = "SIZE", env = "AGENTVM_MAX_RECORDING")]
    pub max_recording: Option<String>,
    /// Remove the recordings of sessions and jobs that ended more than
    /// DAYS ago, each removal audited (checked hourly; off by default).
    #[arg(long, value_name = "DAYS", env = "AGENTVM_RECORDING_RETENTION")]
    pub recording_retention: Option<u32>,
    /// Serve SSH on ADDR:PORT: `ssh -p PORT NAME@HOST` attaches to or
    /// starts session NAME (public keys only; off unless given, and only
    /// with --ssh-authorized-keys). The host key is made once in the data
    /// directory.
    #[arg(long, value_name = "ADDR:PORT", env = "AGENTVM_SSH_LISTEN")]
    pub ssh_listen: Option<String>,
    /// The keys SSH accepts, in OpenSSH authorized_keys format; each key's
    /// comment is the identity its sessions and audit events carry.
    #[arg(long, value_name = "FILE", env = "AGENTVM_SSH_AUTHORIZED_KEYS")]
    pub ssh_authorized_keys: Option<PathBuf>,
    /// `[agents.NAME]` profiles (the file only).
    #[arg(skip)]
    #[serde(default)]
    pub agents: BTreeMap<String, ProfileConfig>,
    /// `[secrets] NAME = { file = "..." }` or `{ env = "VAR" }` (the file
    /// only).
    #[arg(skip)]
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
}

/// What resolving needs from outside the settings.
pub struct Host {
    /// The data directory when none is set.
    pub default_data_dir: PathBuf,
    /// What runs each job's sandbox.
    pub sandbox_bin: PathBuf,
}

impl Settings {
    /// The config file's settings.
    pub fn load(path: &Path) -> Result<Settings, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// These settings (a file's) with `flags` on top: a flag or variable
    /// given wins; a list given replaces the file's.
    pub fn over(self, flags: Settings) -> Settings {
        let list = |f: Vec<PathBuf>, base: Vec<PathBuf>| if f.is_empty() { base } else { f };
        Settings {
            config: flags.config.or(self.config),
            listen: flags.listen.or(self.listen),
            data_dir: flags.data_dir.or(self.data_dir),
            allowed_roots: list(flags.allowed_roots, self.allowed_roots),
            api_key_file: flags.api_key_file.or(self.api_key_file),
            tls_cert: flags.tls_cert.or(self.tls_cert),
            tls_key: flags.tls_key.or(self.tls_key),
            max_concurrent: flags.max_concurrent.or(self.max_concurrent),
            max_queue: flags.max_queue.or(self.max_queue),
            body_limit: flags.body_limit.or(self.body_limit),
            max_output: flags.max_output.or(self.max_output),
            max_patch: flags.max_patch.or(self.max_patch),
            workspace_quota: flags.workspace_quota.or(self.workspace_quota),
            workspaces_total: flags.workspaces_total.or(self.workspaces_total),
            rate_limit: flags.rate_limit.or(self.rate_limit),
            shutdown_grace: flags.shutdown_grace.or(self.shutdown_grace),
            secret_files: flags.secret_files,
            cgroup_parent: flags.cgroup_parent.or(self.cgroup_parent),
            egress_record_limit: flags.egress_record_limit.or(self.egress_record_limit),
            max_sessions: flags.max_sessions.or(self.max_sessions),
            max_sessions_per_key: flags.max_sessions_per_key.or(self.max_sessions_per_key),
            session_idle_timeout: flags.session_idle_timeout.or(self.session_idle_timeout),
            max_recording: flags.max_recording.or(self.max_recording),
            recording_retention: flags.recording_retention.or(self.recording_retention),
            ssh_listen: flags.ssh_listen.or(self.ssh_listen),
            ssh_authorized_keys: flags.ssh_authorized_keys.or(self.ssh_authorized_keys),
            agents: self.agents,
            secrets: self.secrets,
        }
    }

    /// The server's configuration: every default applied here, every
    /// value checked, errors naming the setting.
    pub fn resolve(self, host: Host) -> Result<Config, String> {
        let listen = match &self.listen {
            Some(s) => s
                .parse::<SocketAddr>()
                .map_err(|e| format!("listen {s:?}: {e}"))?,
            None => SocketAddr::from(([127, 0, 0, 1], 8000)),
        };
        let size = |what: &str, v: &Option<String>, default: u64| match v {
            Some(s) => units::parse_size(s).map_err(|e| format!("{what}: {e}")),
            None => Ok(default),
        };
        let body_limit = usize::try_from(size("body_limit", &self.body_limit, 1 << 20)?)
            .map_err(|_| "body_limit: too large".to_string())?;
        let max_output = size("max_output", &self.max_output, 64 << 20)?;
        let max_patch = size("max_patch", &self.max_patch, 64 << 20)?;
        // "0" or "none": no quota
        let quota = |what: &str, v: &Option<String>, default: Option<u64>| match v.as_deref() {
            Some("0") | Some("none") => Ok(None),
            Some(s) => units::parse_size(s)
                .map(Some)
                .map_err(|e| format!("{what}: {e}")),
            None => Ok(default),
        };
        let workspace_quota = quota("workspace_quota", &self.workspace_quota, Some(10 << 30))?;
        let workspaces_total = quota("workspaces_total", &self.workspaces_total, None)?;
        let grace = match &self.shutdown_grace {
            Some(s) => units::parse_duration(s).map_err(|e| format!("shutdown_grace: {e}"))?,
            None => std::time::Duration::from_secs(30),
        };
        let mut agents = crate::config::profiles(self.agents)?;
        for (name, path) in crate::config::find_installed(&mut agents) {
            eprintln!("agentvm: the {name} agent runs {path}");
        }
        let mut flag_secrets = Vec::new();
        for s in &self.secret_files {
            let (n, f) = s
                .split_once('=')
                .ok_or_else(|| format!("--secret {s:?}: expected NAME=FILE"))?;
            if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("--secret {s:?}: invalid name"));
            }
            flag_secrets.push((n.to_string(), PathBuf::from(f)));
        }
        let secrets = crate::config::resolve_secrets(&self.secrets, &flag_secrets, &agents)?;
        if let Some(c) = &self.cgroup_parent {
            if c.is_empty() || c.contains('\0') || c.split('/').any(|part| part == "..") {
                return Err(format!(
                    "--cgroup-parent {c:?} (cgroup_parent in the config): a path inside the cgroup hierarchy, without .."
                ));
            }
        }
        let idle = match &self.session_idle_timeout {
            Some(s) => units::parse_duration(s)
                .map_err(|e| format!("session_idle_timeout: {e}"))?
                .as_secs(),
            None => 3600,
        };
        if !(1..=MAX_IDLE_S).contains(&idle) {
            return Err(format!(
                "session_idle_timeout: between 1 second and 7 days, not {idle} s"
            ));
        }
        let ssh_listen = match &self.ssh_listen {
            None => None,
            Some(s) => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| format!("ssh_listen {s:?}: {e}"))?,
            ),
        };
        if ssh_listen.is_some() != self.ssh_authorized_keys.is_some() {
            return Err(
                "ssh_listen and ssh_authorized_keys go together: SSH accepts only the keys that file lists".into(),
            );
        }
        if self.recording_retention == Some(0) {
            return Err(
                "recording_retention: at least 1 day (leave it out to keep every recording)".into(),
            );
        }
        let sessions = crate::config::SessionLimits {
            max_total: self.max_sessions.unwrap_or(16).clamp(1, 10_000),
            max_per_key: self.max_sessions_per_key.unwrap_or(4).clamp(1, 10_000),
            idle_timeout_s: idle,
            max_recording: size("max_recording", &self.max_recording, 256 << 20)?,
        };
        Ok(Config {
            sessions,
            recording_retention_days: self.recording_retention,
            ssh_listen,
            ssh_authorized_keys: self.ssh_authorized_keys,
            listen,
            data_dir: self.data_dir.unwrap_or(host.default_data_dir),
            allowed_roots: self.allowed_roots,
            api_key_file: self.api_key_file,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            max_concurrent: self.max_concurrent.unwrap_or(4).clamp(1, 1024),
            max_queue: self.max_queue.unwrap_or(100).clamp(1, 1_000_000),
            body_limit,
            max_output,
            max_patch,
            workspace_quota,
            workspaces_total,
            egress_record_limit: self
                .egress_record_limit
                .unwrap_or(agentvm_proto::egress::RECORD_LIMIT),
            rate_limit: self.rate_limit.unwrap_or(600),
            shutdown_grace_s: grace.as_secs(),
            agents,
            sandbox_bin: host.sandbox_bin,
            cgroup_parent: self.cgroup_parent.map(PathBuf::from),
            secrets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            default_data_dir: "/default".into(),
            sandbox_bin: "/bin/true".into(),
        }
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file: Settings = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nmax_queue = 7\nmax_output = \"1M\"\nallowed_roots = [\"/srv\"]\n",
        )
        .unwrap();
        let flags = Settings {
            max_queue: Some(9),
            ..Settings::default()
        };
        let c = file.over(flags).resolve(host()).unwrap();
        assert_eq!(c.listen.port(), 9000, "the file's");
        assert_eq!(c.max_queue, 9, "the flag's");
        assert_eq!(c.max_output, 1 << 20);
        assert_eq!(c.allowed_roots, [PathBuf::from("/srv")]);
        assert_eq!(c.data_dir, PathBuf::from("/default"));
        assert_eq!(c.max_concurrent, 4);
        assert_eq!(c.max_patch, 64 << 20);
        assert_eq!(c.workspace_quota, Some(10 << 30));
        assert_eq!(c.workspaces_total, None, "no total unless asked");
        let zero: Settings = toml::from_str("workspace_quota = \"0\"").unwrap();
        assert_eq!(
            zero.resolve(host()).unwrap().workspace_quota,
            None,
            "0: no quota"
        );
        assert_eq!(c.shutdown_grace_s, 30);
        assert_eq!(c.egress_record_limit, agentvm_proto::egress::RECORD_LIMIT);
        let roots = Settings {
            allowed_roots: vec!["/a".into()],
            ..Settings::default()
        };
        let file: Settings = toml::from_str("allowed_roots = [\"/srv\"]").unwrap();
        assert_eq!(
            file.over(roots).resolve(host()).unwrap().allowed_roots,
            [PathBuf::from("/a")],
            "a list given replaces the file's"
        );
    }

    #[test]
    fn a_bad_value_names_its_setting() {
        for (toml_text, want) in [
            ("max_output = \"lots\"", "max_output:"),
            ("shutdown_grace = \"soon\"", "shutdown_grace:"),
            ("listen = \"nowhere\"", "listen \"nowhere\""),
            ("cgroup_parent = \"../../etc\"", "--cgroup-parent"),
            ("session_idle_timeout = \"30d\"", "session_idle_timeout:"),
            ("ssh_listen = \"127.0.0.1:2222\"", "ssh_listen and"),
            ("recording_retention = 0", "recording_retention:"),
            ("workspace_quota = \"half\"", "workspace_quota:"),
            ("workspaces_total = \"-1G\"", "workspaces_total:"),
        ] {
            let s: Settings = toml::from_str(toml_text).unwrap();
            let e = s.resolve(host()).unwrap_err();
            assert!(e.starts_with(want), "{toml_text}: {e}");
        }
        assert!(
            toml::from_str::<Settings>("max_qeueu = 1").is_err(),
            "a typo is refused"
        );
        assert!(
            toml::from_str::<Settings>("secret_files = []").is_err(),
            "flags only"
        );
        assert!(
            toml::from_str::<Settings>("config = \"x\"").is_err(),
            "flags only"
        );
    }
}
