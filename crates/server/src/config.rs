//! Server configuration: TOML file < AGENTVM_* environment < flags (the CLI
//! merges them and hands over a `Config`), and agent profiles.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// An agent profile: how to run one kind of agent.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// argv template; the element "{prompt}" is replaced by the prompt, as
    /// one argument.
    pub argv: Vec<String>,
    /// Extra read-only binds, "SRC[:DST]".
    #[serde(default)]
    pub ro_binds: Vec<String>,
    /// Names of server environment variables passed to the agent.
    #[serde(default)]
    pub env: Vec<String>,
    /// Fixed variables set for the agent.
    #[serde(default)]
    pub set_env: BTreeMap<String, String>,
    /// "none", "host" or "allow:HOST[:PORT],..." (the egress allowlist).
    #[serde(default = "default_network")]
    pub network: String,
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub pids: Option<u64>,
    #[serde(default)]
    pub disk: Option<String>,
}

fn default_network() -> String {
    "none".into()
}

const BUILTIN: &str = include_str!("profiles.toml");

/// The built-in profiles.
pub fn builtin_profiles() -> BTreeMap<String, Profile> {
    // The embedded file is checked by a unit test; an error here is a bug.
    toml::from_str(BUILTIN).unwrap_or_default()
}

impl Profile {
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if self.argv.is_empty() {
            return Err(format!("agent {name}: argv is empty"));
        }
        if self.argv.iter().filter(|a| *a == "{prompt}").count() != 1 {
            return Err(format!(
                "agent {name}: argv must contain \"{{prompt}}\" exactly once, as a whole element"
            ));
        }
        match self.network.as_str() {
            "none" | "host" => {}
            n => match n.strip_prefix("allow:") {
                Some(list) => {
                    agentvm_egress::Policy::parse(list)
                        .map_err(|e| format!("agent {name}: network allow list: {e}"))?;
                }
                None => {
                    return Err(format!(
                        "agent {name}: network must be none, host or allow:HOST,..."
                    ))
                }
            },
        }
        Ok(())
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    pub api_key_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub body_limit: usize,
    /// Requests per minute per key.
    pub rate_limit: u32,
    pub shutdown_grace_s: u64,
    pub agents: BTreeMap<String, Profile>,
    /// The `agentvm` binary that runs sandboxes (the jailer).
    pub sandbox_bin: PathBuf,
    /// Extra arguments for every `agentvm run` (e.g. --cgroup-parent).
    pub sandbox_args: Vec<String>,
    /// Secrets by name (provider keys): given to a job only when its profile
    /// lists the name, and redacted from everything jobs produce.
    pub secrets: Vec<(String, String)>,
}

/// Where a secret comes from: the server's environment or a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

/// The config file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub allowed_roots: Option<Vec<PathBuf>>,
    pub api_key_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_concurrent: Option<usize>,
    pub max_queue: Option<usize>,
    pub body_limit: Option<String>,
    pub rate_limit: Option<u32>,
    pub shutdown_grace: Option<String>,
    pub cgroup_parent: Option<String>,
    #[serde(default)]
    pub agents: BTreeMap<String, Profile>,
    /// `[secrets] NAME = { file = "..." }` or `{ env = "VAR" }`.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }
}

/// Resolve the secrets: those configured (file or environment), plus every
/// variable a profile may receive that the server's environment holds.
/// Errors name the secret, never its value.
pub fn resolve_secrets(
    configured: &BTreeMap<String, SecretSource>,
    from_flags: &[(String, PathBuf)],
    agents: &BTreeMap<String, Profile>,
) -> Result<Vec<(String, String)>, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let read_file = |name: &str, f: &Path| -> Result<String, String> {
        let v = std::fs::read_to_string(f)
            .map_err(|e| format!("secret {name}: {}: {e}", f.display()))?;
        Ok(v.trim_end_matches(['\n', '\r']).to_string())
    };
    for (name, src) in configured {
        let v = match (&src.file, &src.env) {
            (Some(f), None) => read_file(name, f)?,
            (None, Some(e)) => std::env::var(e)
                .map_err(|_| format!("secret {name}: environment variable {e} is not set"))?,
            _ => return Err(format!("secret {name}: give exactly one of file or env")),
        };
        out.insert(name.clone(), v);
    }
    for (name, f) in from_flags {
        out.insert(name.clone(), read_file(name, f)?);
    }
    for p in agents.values() {
        for name in &p.env {
            if !out.contains_key(name) {
                if let Ok(v) = std::env::var(name) {
                    out.insert(name.clone(), v);
                }
            }
        }
    }
    for (name, v) in &out {
        if v.len() < crate::redact::MIN_SECRET_LEN {
            return Err(format!(
                "secret {name} is shorter than {} characters; it could not be told apart from ordinary output",
                crate::redact::MIN_SECRET_LEN
            ));
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_validate() {
        let p: BTreeMap<String, Profile> =
            toml::from_str(BUILTIN).unwrap_or_else(|e| panic!("{e}"));
        for name in ["aider", "opencode", "claude", "codex", "shell"] {
            let prof = p.get(name).unwrap_or_else(|| panic!("{name} missing"));
            prof.validate(name).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn prompt_must_be_one_whole_element() {
        let mut p = builtin_profiles()
            .remove("shell")
            .unwrap_or_else(|| panic!("shell"));
        p.argv = vec!["sh".into(), "-c".into(), "echo {prompt}".into()];
        assert!(p.validate("x").is_err());
        let mut q = builtin_profiles()
            .remove("shell")
            .unwrap_or_else(|| panic!("shell"));
        q.network = "allow:api.openai.com,127.0.0.1:8080".into();
        assert!(q.validate("q").is_ok());
        q.network = "allow:not a host".into();
        assert!(q.validate("q").is_err());
        q.network = "bridge".into();
        assert!(q.validate("q").is_err());
    }
}
