//! Server configuration: TOML file < AGENTVM_* environment < flags (the CLI
//! merges them and hands over a `Config`), and agent profiles.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use agentvm_proto::NetworkMode;
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
    /// "none", "host" or "allow:HOST[:PORT],..." (the egress allowlist),
    /// parsed as it is read.
    #[serde(default)]
    pub network: NetworkMode,
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub pids: Option<u64>,
    #[serde(default)]
    pub disk: Option<String>,
    /// The image its jobs run on (a tag or digest of the image store);
    /// none: the host's system directories. A job's own `image` wins.
    #[serde(default)]
    pub image: Option<String>,
    /// Flags a request's extra_args may not carry: those that change where
    /// the agent's traffic or credentials go (`--flag`, `--flag=value`,
    /// an abbreviation of a long flag, a short flag alone or bundled).
    /// Empty it in the config to allow them.
    #[serde(default)]
    pub refused_args: Vec<String>,
    /// Flags of the agent's own that are prefixes of a refused one and
    /// are allowed when written out exactly (aider's `--model` beside the
    /// refused `--model-settings-file`).
    #[serde(default)]
    pub allowed_args: Vec<String>,
    /// Where the CLI is installed when it is not on the sandbox's PATH
    /// (absolute paths the sandbox shows, e.g. under /opt): the first that
    /// exists is used for a bare argv[0] (see [`find_installed`]).
    #[serde(default)]
    pub search: Vec<String>,
    /// The whole command line a session runs for this agent (its
    /// interactive mode); empty: the profile's program alone. Its first
    /// element is found through `search` like argv's when they are the same.
    #[serde(default)]
    pub interactive: Vec<String>,
}

/// A profile table's network setting, parsed, the error naming the agent.
fn parse_network(name: &str, n: &str) -> Result<NetworkMode, String> {
    NetworkMode::parse(n).map_err(|e| {
        if n.starts_with("allow:") {
            format!("agent {name}: network allow list: {e}")
        } else {
            format!("agent {name}: network must be none, host or allow:HOST[:PORT],...")
        }
    })
}

const BUILTIN: &str = include_str!("profiles.toml");

/// The built-in profiles.
pub fn builtin_profiles() -> BTreeMap<String, Profile> {
    // The embedded file is checked by a unit test; an error here is a bug.
    toml::from_str(BUILTIN).unwrap_or_default()
}

/// A `[agents.NAME]` table of the config file. With `argv` it is a whole
/// profile and nothing is inherited. Without, it changes the built-in
/// profile of that name: `command` replaces the program (argv[0]), `args`
/// go right after it (global options such as a model or provider),
/// `set_env` adds to the built-in's variables, and every other key given
/// replaces the built-in's.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub argv: Option<Vec<String>>,
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub ro_binds: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub set_env: BTreeMap<String, String>,
    pub network: Option<String>,
    pub memory: Option<String>,
    pub pids: Option<u64>,
    pub disk: Option<String>,
    pub image: Option<String>,
    pub refused_args: Option<Vec<String>>,
    pub allowed_args: Option<Vec<String>>,
    pub search: Option<Vec<String>>,
    pub interactive: Option<Vec<String>>,
}

/// The built-in profiles with the config file's `[agents.*]` tables
/// applied (see [`ProfileConfig`]). Errors name the agent.
pub fn profiles(
    tables: BTreeMap<String, ProfileConfig>,
) -> Result<BTreeMap<String, Profile>, String> {
    let mut out = builtin_profiles();
    for (name, t) in tables {
        let network = t
            .network
            .as_deref()
            .map(|n| parse_network(&name, n))
            .transpose()?;
        let p = match t.argv {
            Some(argv) => {
                if t.command.is_some() || !t.args.is_empty() {
                    return Err(format!(
                        "agent {name}: argv is a whole command line; command and args only change a built-in profile's"
                    ));
                }
                Profile {
                    argv,
                    ro_binds: t.ro_binds.unwrap_or_default(),
                    env: t.env.unwrap_or_default(),
                    set_env: t.set_env,
                    network: network.unwrap_or_default(),
                    memory: t.memory,
                    pids: t.pids,
                    disk: t.disk,
                    image: t.image,
                    refused_args: t.refused_args.unwrap_or_default(),
                    allowed_args: t.allowed_args.unwrap_or_default(),
                    search: t.search.unwrap_or_default(),
                    interactive: t.interactive.unwrap_or_default(),
                }
            }
            None => {
                let Some(mut p) = out.get(&name).cloned() else {
                    return Err(format!(
                        "agent {name}: there is no built-in profile of that name to change, so it needs an argv"
                    ));
                };
                if let Some(c) = t.command {
                    if let Some(first) = p.argv.first_mut() {
                        *first = c;
                    }
                }
                let at = 1.min(p.argv.len());
                p.argv.splice(at..at, t.args);
                p.set_env.extend(t.set_env);
                p.ro_binds = t.ro_binds.unwrap_or(p.ro_binds);
                p.env = t.env.unwrap_or(p.env);
                p.network = network.unwrap_or(p.network);
                p.memory = t.memory.or(p.memory);
                p.pids = t.pids.or(p.pids);
                p.disk = t.disk.or(p.disk);
                p.image = t.image.or(p.image);
                p.refused_args = t.refused_args.unwrap_or(p.refused_args);
                p.allowed_args = t.allowed_args.unwrap_or(p.allowed_args);
                p.search = t.search.unwrap_or(p.search);
                p.interactive = t.interactive.unwrap_or(p.interactive);
                p
            }
        };
        p.validate(&name)?;
        out.insert(name, p);
    }
    Ok(out)
}

impl Profile {
    /// The first of `args` this profile refuses, with the flag it matched.
    pub fn refused_arg<'a>(&'a self, args: &'a [String]) -> Option<(&'a str, &'a str)> {
        args.iter().find_map(|a| {
            let name = a.split('=').next().unwrap_or("");
            if self.allowed_args.iter().any(|x| x == name) {
                return None;
            }
            self.refused_args
                .iter()
                .find(|f| flag_matches(f, a))
                .map(|f| (a.as_str(), f.as_str()))
        })
    }

    /// What a session of this agent runs.
    pub fn interactive_argv(&self) -> Vec<String> {
        if self.interactive.is_empty() {
            self.argv.iter().take(1).cloned().collect()
        } else {
            self.interactive.clone()
        }
    }

    pub fn validate(&self, name: &str) -> Result<(), String> {
        if self.interactive.iter().any(|a| a.contains('\0')) {
            return Err(format!("agent {name}: interactive holds a NUL byte"));
        }
        if self.argv.is_empty() {
            return Err(format!("agent {name}: argv is empty"));
        }
        if self.argv.iter().filter(|a| *a == "{prompt}").count() != 1 {
            return Err(format!(
                "agent {name}: argv must contain \"{{prompt}}\" exactly once, as a whole element"
            ));
        }
        for (what, v) in [("memory", &self.memory), ("disk", &self.disk)] {
            if let Some(v) = v {
                crate::units::parse_size(v).map_err(|e| format!("agent {name}: {what}: {e}"))?;
            }
        }
        if let Some(n) = self.pids {
            if !(1..=agentvm_proto::run::PIDS_MAX).contains(&n) {
                return Err(format!(
                    "agent {name}: pids must be 1 to {}",
                    agentvm_proto::run::PIDS_MAX
                ));
            }
        }
        for f in &self.refused_args {
            if !f.starts_with('-') || f == "-" || f == "--" {
                return Err(format!(
                    "agent {name}: refused_args holds {f:?}, which is not a flag"
                ));
            }
        }
        Ok(())
    }
}

/// The sandbox's PATH (what a bare argv[0] is looked up in).
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Directories of the host every sandbox shows read-only.
const SHOWN: [&str; 2] = ["/usr/", "/opt/"];

/// For each profile whose argv[0] is a bare name the sandbox's PATH does
/// not hold, use the first of its `search` paths that is installed (an
/// executable file the sandbox shows: under /usr or /opt, or inside one of
/// the profile's ro_binds). Returns what was found, for the log.
pub fn find_installed(agents: &mut BTreeMap<String, Profile>) -> Vec<(String, String)> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let mut found = Vec::new();
    for (name, p) in agents.iter_mut() {
        let Some(first) = p.argv.first().cloned() else {
            continue;
        };
        if first.contains('/')
            || SANDBOX_PATH
                .split(':')
                .any(|d| exec(&Path::new(d).join(&first)))
        {
            continue;
        }
        let shown = |c: &str| {
            SHOWN.iter().any(|d| c.starts_with(d))
                || p.ro_binds.iter().any(|b| {
                    let dst = b.split_once(':').map(|x| x.1).unwrap_or(b);
                    c.starts_with(&format!("{}/", dst.trim_end_matches('/')))
                })
        };
        if let Some(c) = p
            .search
            .iter()
            .find(|c| shown(c) && exec(Path::new(c)))
            .cloned()
        {
            p.argv[0] = c.clone();
            if p.interactive.first() == Some(&first) {
                p.interactive[0] = c.clone();
            }
            found.push((name.clone(), c));
        }
    }
    found
}

/// Does argument `arg` set the flag `flag`? Long flags match whole
/// (`--x`, `--x=v`) or abbreviated (argparse accepts any unambiguous
/// prefix, so `--openai-api-b` is `--openai-api-base`); a short flag
/// matches alone, with its value attached, or bundled (`-xc`).
fn flag_matches(flag: &str, arg: &str) -> bool {
    if let Some(long) = flag.strip_prefix("--") {
        let Some(given) = arg.strip_prefix("--") else {
            return false;
        };
        let name = given.split('=').next().unwrap_or("");
        !name.is_empty() && long.starts_with(name)
    } else if let Some(short) = flag.strip_prefix('-') {
        match arg.strip_prefix('-') {
            Some(rest) if !rest.starts_with('-') => {
                short.chars().next().is_some_and(|c| rest.contains(c))
            }
            _ => false,
        }
    } else {
        false
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
    /// Bytes of output kept per job.
    pub max_output: u64,
    /// The largest patch stored; a job with a larger one fails.
    pub max_patch: u64,
    /// Bytes one workspace's layers may hold (None: no limit).
    pub workspace_quota: Option<u64>,
    /// Bytes all workspaces' layers may hold together (None: no limit but
    /// the data directory's free space).
    pub workspaces_total: Option<u64>,
    /// Connections per job its egress proxy records one by one.
    pub egress_record_limit: u64,
    /// Requests per minute per key.
    pub rate_limit: u32,
    pub shutdown_grace_s: u64,
    pub agents: BTreeMap<String, Profile>,
    /// The `agentvm` binary that runs sandboxes (the jailer).
    pub sandbox_bin: PathBuf,
    /// The cgroup every job's sandbox cgroup is created under.
    pub cgroup_parent: Option<PathBuf>,
    /// Secrets by name (provider keys): given to a job only when its profile
    /// lists the name, and redacted from everything jobs produce.
    pub secrets: Vec<(String, String)>,
    pub sessions: SessionLimits,
    /// Recordings of what ended more than this many days ago are removed.
    pub recording_retention_days: Option<u32>,
    pub ssh_listen: Option<SocketAddr>,
    pub ssh_authorized_keys: Option<PathBuf>,
}

/// How many sessions, for how long, recorded how far.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_total: usize,
    pub max_per_key: usize,
    /// The default (and longest) idle timeout, in seconds.
    pub idle_timeout_s: u64,
    /// Bytes of recording kept per session.
    pub max_recording: u64,
}

/// Where a secret comes from: the server's environment or a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
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
        let p: BTreeMap<String, Profile> = toml::from_str(BUILTIN).unwrap();
        for name in ["aider", "opencode", "claude", "codex", "shell"] {
            let prof = p.get(name).unwrap_or_else(|| panic!("{name} missing"));
            prof.validate(name).unwrap();
        }
    }

    fn table(toml_text: &str) -> BTreeMap<String, ProfileConfig> {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_table_without_argv_changes_the_builtin() {
        let p = profiles(table(
            r#"[codex]
command = "/opt/codex/bin/codex"
args = ["-c", "model=m"]
ro_binds = ["/opt/codex"]
network = "allow:api.example.com"
set_env = { EXTRA = "1" }
"#,
        ))
        .unwrap();
        let built = builtin_profiles();
        let (b, c) = (&built["codex"], &p["codex"]);
        assert_eq!(c.argv[0], "/opt/codex/bin/codex");
        assert_eq!(&c.argv[1..3], ["-c", "model=m"]);
        assert_eq!(c.argv[3..], b.argv[1..], "the rest is the built-in's");
        assert_eq!(c.ro_binds, ["/opt/codex"]);
        assert_eq!(c.network.to_string(), "allow:api.example.com");
        assert_eq!(c.env, b.env, "not given: kept");
        assert_eq!(c.memory, b.memory);
        assert_eq!(c.set_env.get("EXTRA").map(String::as_str), Some("1"));
        for (k, v) in &b.set_env {
            assert_eq!(c.set_env.get(k), Some(v), "set_env adds, keeps {k}");
        }
        // untouched profiles stay as built
        assert_eq!(p["aider"], built["aider"]);
    }

    /// A profile whose values the runner would refuse stops the server at
    /// start, naming the profile and the field, not a job at run time.
    #[test]
    fn a_bad_value_names_its_profile_and_field() {
        for (body, want) in [
            ("memory = \"lots\"", "agent codex: memory"),
            ("disk = \"12Q\"", "agent codex: disk"),
            ("pids = 0", "agent codex: pids"),
            ("network = \"allow:\"", "agent codex: network"),
        ] {
            let e = profiles(table(&format!("[codex]\n{body}\n")))
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert!(e.starts_with(want), "{body}: {e}");
        }
    }

    #[test]
    fn a_table_with_argv_is_a_whole_profile() {
        let p = profiles(table(
            r#"[aider]
argv = ["/x/aider", "--message", "{prompt}"]
[mine]
argv = ["tool", "{prompt}"]
"#,
        ))
        .unwrap();
        assert_eq!(p["aider"].argv, ["/x/aider", "--message", "{prompt}"]);
        assert!(p["aider"].env.is_empty() && p["aider"].set_env.is_empty());
        assert_eq!(p["mine"].network, NetworkMode::None);
    }

    #[test]
    fn bad_tables_are_clear_errors() {
        for (text, want) in [
            (
                "[nope]\ncommand = \"x\"\n",
                "agent nope: there is no built-in profile",
            ),
            (
                "[aider]\nargv = [\"a\", \"{prompt}\"]\ncommand = \"b\"\n",
                "agent aider: argv is a whole command line",
            ),
            (
                "[aider]\nnetwork = \"bridge\"\n",
                "agent aider: network must be",
            ),
            ("[x]\nargv = [\"a\"]\n", "agent x: argv must contain"),
        ] {
            let e = profiles(table(text)).err().unwrap_or_default();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        assert!(toml::from_str::<BTreeMap<String, ProfileConfig>>("[a]\nargs2 = []\n").is_err());
    }

    #[test]
    fn a_cli_off_the_path_is_found_where_it_was_installed() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin/mycli");
        std::fs::create_dir_all(t.path().join("bin")).unwrap();
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = t.path().display().to_string();
        let mut p = builtin_profiles()
            .remove("shell")
            .unwrap_or_else(|| panic!("shell"));
        p.argv = vec!["agentvm-no-such-cli".into(), "{prompt}".into()];
        p.search = vec!["/nonexistent/x".into(), bin.display().to_string()];
        let mut agents = BTreeMap::from([("mine".to_string(), p.clone())]);
        // not inside anything the sandbox shows: not used
        assert!(find_installed(&mut agents).is_empty());
        p.ro_binds = vec![dir];
        let mut agents = BTreeMap::from([("mine".to_string(), p)]);
        assert_eq!(find_installed(&mut agents).len(), 1);
        assert_eq!(agents["mine"].argv[0], bin.display().to_string());
        // a command on the sandbox's PATH stays as it is
        let mut agents = builtin_profiles();
        find_installed(&mut agents);
        assert_eq!(agents["shell"].argv[0], "sh");
    }

    #[test]
    fn refused_args_catch_every_spelling() {
        let p = builtin_profiles()
            .remove("aider")
            .unwrap_or_else(|| panic!("aider"));
        for bad in [
            "--openai-api-base",
            "--openai-api-base=http://evil",
            "--openai-api-b",
            "--set-env",
            "-c",
            "-cconf.yml",
        ] {
            let args = vec!["--model".to_string(), "x".into(), bad.to_string()];
            assert!(p.refused_arg(&args).is_some(), "{bad}");
        }
        let ok = vec![
            "--model".to_string(),
            "gpt".into(),
            "--model=x".into(),
            "file.py".into(),
            "--".into(),
        ];
        assert_eq!(p.refused_arg(&ok), None);
        let shell = builtin_profiles()
            .remove("shell")
            .unwrap_or_else(|| panic!("shell"));
        assert_eq!(shell.refused_arg(&["--openai-api-base".to_string()]), None);
        // a bad value fails at start, not when a job runs
        let mut q = shell.clone();
        q.memory = Some("lots".into());
        assert!(q.validate("q").unwrap_err().contains("memory"));
    }

    #[test]
    fn prompt_must_be_one_whole_element() {
        let mut p = builtin_profiles()
            .remove("shell")
            .unwrap_or_else(|| panic!("shell"));
        p.argv = vec!["sh".into(), "-c".into(), "echo {prompt}".into()];
        assert!(p.validate("x").is_err());
        assert!(parse_network("q", "allow:api.openai.com,127.0.0.1:8080").is_ok());
        assert!(parse_network("q", "allow:not a host").is_err());
        assert!(parse_network("q", "bridge").is_err());
    }
}
