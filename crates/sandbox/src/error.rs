//! Errors: a setup failure always names the isolation layer that could not
//! be applied, so the CLI can print it and exit 125.

use serde::{Deserialize, Serialize};

/// The isolation layers, in the order they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    Spec,
    Cgroup,
    UserNamespace,
    Namespaces,
    Mounts,
    Network,
    Rlimits,
    Landlock,
    Capabilities,
    NoNewPrivs,
    Seccomp,
    Exec,
    /// The sandbox's own terminal (`Stdio::Pty`).
    Terminal,
    Supervisor,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Layer::Spec => "spec",
            Layer::Cgroup => "cgroup",
            Layer::UserNamespace => "user namespace",
            Layer::Namespaces => "namespaces",
            Layer::Mounts => "mounts",
            Layer::Network => "network",
            Layer::Rlimits => "rlimits",
            Layer::Landlock => "landlock",
            Layer::Capabilities => "capabilities",
            Layer::NoNewPrivs => "no_new_privs",
            Layer::Seccomp => "seccomp",
            Layer::Exec => "exec",
            Layer::Terminal => "terminal",
            Layer::Supervisor => "supervisor",
        };
        f.write_str(s)
    }
}

/// A sandbox could not be set up.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[error("{layer}: {message}")]
pub struct SetupError {
    pub layer: Layer,
    pub message: String,
}

impl SetupError {
    pub fn new(layer: Layer, message: impl Into<String>) -> Self {
        SetupError {
            layer,
            message: message.into(),
        }
    }

    /// Wrap an OS error with what was being done.
    pub fn os(layer: Layer, what: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        SetupError {
            layer,
            message: format!("{what}: {err}"),
        }
    }
}

/// Why the command itself could not be started (after every layer was up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecFailure {
    /// The command does not exist (exit 127).
    NotFound,
    /// The command exists but cannot be executed (exit 126).
    NotExecutable,
}

/// Everything `run` can fail with before the command ran.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("{command}: {reason}")]
    Exec {
        command: String,
        kind: ExecFailure,
        reason: String,
    },
}
