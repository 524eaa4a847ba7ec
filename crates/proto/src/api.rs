//! What the HTTP API sends and receives, shared by the server (which also
//! derives their OpenAPI schema, with the `schema` feature) and the CLI
//! client (which reads them typed instead of by string key).
//!
//! Requests refuse unknown fields (a typo must not drop a setting);
//! answers accept them, so an older client keeps working against a newer
//! server that says more.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[cfg(feature = "schema")]
use utoipa::ToSchema;

use crate::NetworkMode;

/// A status enum: its names on the wire (snake_case, as `as_str` gives
/// them), `ALL`, `Display` and `FromStr`, written once for each.
macro_rules! status {
    ($(#[$m:meta])* $name:ident, $what:literal, live: $($live:ident)|+;
     $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)?) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "schema", derive(ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vm])* $v),+
        }

        impl $name {
            pub const ALL: [$name; [$($s),+].len()] = [$($name::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s),+
                }
            }

            /// Has it ended?
            pub fn is_final(self) -> bool {
                !matches!(self, $($name::$live)|+)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .into_iter()
                    .find(|j| j.as_str() == s)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " status {:?}"), s))
            }
        }
    };
}

status! {
    /// Where a job is in its life.
    JobStatus, "job", live: Queued | Running;
    Queued = "queued",
    Running = "running",
    Succeeded = "succeeded",
    Failed = "failed",
    TimedOut = "timed_out",
    Cancelled = "cancelled",
    Interrupted = "interrupted",
}

status! {
    /// Where a session is in its life.
    SessionStatus, "session", live: Running;
    Running = "running",
    /// The command exited (`exit` in the shell).
    Exited = "exited",
    /// Ended by DELETE, the idle timeout or the server's shutdown.
    Killed = "killed",
    /// Its sandbox could not be set up.
    Failed = "failed",
    /// The server stopped without ending it (a crash).
    Interrupted = "interrupted",
}

/// `{"detail": "..."}`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct ErrorDetail {
    pub detail: String,
}

/// One failed field, as FastAPI reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct FieldError {
    /// Where: ["body", "<field>"] or ["query", "<param>"].
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// `{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct ValidationError {
    pub detail: Vec<FieldError>,
}

/// Either error body, as a client reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ErrorBody {
    Detail(ErrorDetail),
    Fields(ValidationError),
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorBody::Detail(d) => f.write_str(&d.detail),
            ErrorBody::Fields(v) => {
                let parts: Vec<String> = v
                    .detail
                    .iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e.loc.last().map(String::as_str).unwrap_or(""),
                            e.msg
                        )
                    })
                    .collect();
                f.write_str(&parts.join("; "))
            }
        }
    }
}

pub fn default_timeout() -> i64 {
    600
}

/// The old API's request (`POST /agent/run`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct AgentRunRequest {
    /// One of the configured agents (aider, opencode, claude, codex, shell, ...).
    pub agent: String,
    pub prompt: String,
    /// Absolute path of the repository, inside an allowed root.
    pub repo_path: String,
    /// Seconds, 1 to 3600.
    #[serde(default = "default_timeout")]
    #[cfg_attr(feature = "schema", schema(minimum = 1, maximum = 3600, default = 600))]
    pub timeout: i64,
    #[serde(default)]
    pub extra_args: Option<Vec<String>>,
}

/// The old API's answer: exactly these five keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct AgentRunResponse {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub returncode: i64,
    pub error: Option<String>,
}

/// A new job (`POST /v1/jobs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub agent: String,
    pub prompt: String,
    /// The repository (one of `repo_path` and `workspace`).
    #[serde(default)]
    pub repo_path: String,
    /// Run over this workspace (id or name) instead of `repo_path`: the
    /// job starts from its current state and its changes stay in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// With `workspace`: read it beside whoever writes it. The job runs
    /// over the workspace as it was when accepted and leaves nothing in it
    /// (its own patch is still its changes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    #[serde(default = "default_timeout")]
    #[cfg_attr(feature = "schema", schema(minimum = 1, maximum = 3600, default = 600))]
    pub timeout: i64,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// This job's network policy instead of its profile's: "none",
    /// "host" or "allow:HOST[:PORT],...". It may only narrow the
    /// profile's, unless the key was granted more (admin keys may use
    /// any). At most 4096 bytes. Kept as text here: the server checks
    /// its size before parsing it, and audits a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Run on this image (a tag or digest of the server's image store,
    /// `agentvm images list`) instead of its profile's image or the
    /// host's system directories. Resolved to its digest when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct JobView {
    pub id: String,
    pub agent: String,
    pub prompt: String,
    pub repo_path: String,
    pub timeout_s: i64,
    pub extra_args: Vec<String>,
    /// The job's own network policy (null: its profile's).
    #[cfg_attr(feature = "schema", schema(value_type = Option<String>))]
    pub network: Option<NetworkMode>,
    /// The image it runs on (`sha256:...`; null: the host's system).
    #[serde(default)]
    pub image: Option<String>,
    pub status: JobStatus,
    /// The key that made the job (its owner).
    pub key_id: Option<String>,
    /// Unix time in milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    /// What the sandbox reported (status, duration_ms, changed_files, ...):
    /// a [`crate::RunResult`] for jobs this version ran.
    #[cfg_attr(feature = "schema", schema(value_type = Option<Object>))]
    pub result: Option<serde_json::Value>,
}

impl JobView {
    /// The sandbox's report, typed; `None` when there is none or it is
    /// from a version whose shape this one does not know.
    pub fn run_result(&self) -> Option<crate::RunResult> {
        self.result
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
    }
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

/// A job's patch on its new branch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct Applied {
    /// The new branch, `agentvm/<job-id>`.
    pub branch: String,
    pub commit: String,
}

/// The `end` event of a followed job: how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct JobEnd {
    pub status: JobStatus,
}

/// A new session (`POST /v1/sessions`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The repository shown copy-on-write at /workspace (inside an allowed
    /// root); absent: an empty /workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_path: Option<String>,
    /// Over this workspace (id or name) instead of `repo_path`: the
    /// session starts from its state, and what it changed stays in it when
    /// it ends (exit, DELETE, idle timeout; not when the server stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// With `workspace`: read it beside whoever writes it (its state when
    /// the session starts); nothing the session changes is kept in it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// A name for people and for `ssh NAME@host`: 1 to 64 of A-Z a-z 0-9
    /// . _ -, not starting with - (default: generated). Unique among the
    /// owner's live sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Run this agent's interactive mode (its profile's limits, network
    /// and secrets rules). Without `agent` and `command`: a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Run this command (argv, no shell interpolation) under the shell
    /// profile instead; not with `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Narrower than the profile's only: "none", "host" or
    /// "allow:HOST[:PORT],..." (as for jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Seconds with no input and no viewer before it ends (default and
    /// most: the server's --session-idle-timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<i64>,
    /// Memory limit ("512M", "2G"), at most the profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Process limit, at most the profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Run on this image of the server's store (a tag or digest) instead
    /// of its profile's or the host's system directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The terminal's first size (default 24 x 80; 1 to 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Record input too ("i" events, redacted). Off by default: input
    /// holds what people type at password prompts.
    #[serde(default)]
    pub record_input: bool,
}

/// Someone attached to a live session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct ViewerView {
    /// The key id or SSH identity, and the door ("ws", "ssh").
    pub who: String,
    /// Its input reaches the terminal.
    pub writer: bool,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct SessionView {
    pub id: String,
    pub name: String,
    /// The key id (or `ssh:IDENTITY`) that made it.
    pub owner: String,
    pub agent: Option<String>,
    pub command: Vec<String>,
    pub repo_path: Option<String>,
    #[cfg_attr(feature = "schema", schema(value_type = Option<String>))]
    pub network: Option<NetworkMode>,
    pub idle_timeout_s: i64,
    pub status: SessionStatus,
    /// Unix time in milliseconds.
    pub created_at: i64,
    pub ended_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    /// Who is attached now (live sessions only).
    #[serde(default)]
    pub viewers: Vec<ViewerView>,
    /// Paused: every process frozen (no CPU, memory kept), input ignored,
    /// the idle timeout's clock stopped, until resumed.
    #[serde(default)]
    pub paused: bool,
    /// Bytes of recording on disk (null: none kept).
    pub recording_bytes: Option<u64>,
}

/// A new workspace: over a repository, or a fork of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRequest {
    /// 1 to 64 of letters, digits, `.`, `_` and `-`; unique among yours.
    pub name: String,
    /// The repository it is a copy-on-write view of (inside an allowed root).
    #[serde(default)]
    pub repo_path: Option<String>,
    /// Start from this checkpoint (its id) instead: a fork.
    #[serde(default)]
    pub from_checkpoint: Option<String>,
    /// The image its jobs and sessions run on unless they name their own
    /// (a tag or digest of the server's store, kept as its digest); a
    /// fork takes its workspace's unless it names one.
    #[serde(default)]
    pub image: Option<String>,
}

/// A workspace as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct WorkspaceView {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub repo_path: String,
    /// Layers over the repository (one per job that changed something).
    pub layers: usize,
    /// Bytes of file contents its layers hold.
    pub bytes: u64,
    /// Bytes its layers and its checkpoints' hold together: what counts
    /// against its quota.
    #[serde(default)]
    pub used_bytes: u64,
    /// Its quota (the server's `--workspace-quota`; null: none). A job or
    /// session over it may write at most what is left (ENOSPC inside).
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// The job writing it now, if any.
    /// The image its jobs and sessions run on unless they name their
    /// own (`sha256:...`; null: their profile's).
    #[serde(default)]
    pub image: Option<String>,
    pub writer: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Workspaces, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct WorkspacePage {
    pub workspaces: Vec<WorkspaceView>,
}

/// A checkpoint to take, or the one to restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// To take: its name (unique in the workspace). Same rules as a workspace's.
    #[serde(default)]
    pub name: Option<String>,
    /// To restore: the checkpoint's id or name.
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// A checkpoint as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct CheckpointView {
    pub id: String,
    pub name: String,
    pub workspace: String,
    pub layers: usize,
    /// Bytes of file contents its layers hold.
    pub bytes: u64,
    pub created_at: i64,
}

/// A workspace's checkpoints, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct CheckpointPage {
    pub checkpoints: Vec<CheckpointView>,
}

/// What a verify found: every layer of a workspace and of its checkpoints
/// checked against its manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct Verified {
    /// Layers checked.
    pub layers: usize,
    /// Each layer that differs from its manifest (empty: all sound).
    pub damaged: Vec<Damage>,
}

/// A layer that is not what its manifest says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct Damage {
    pub layer: String,
    /// The first path that differs.
    pub path: String,
    pub why: String,
}

/// One page of sessions, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct SessionPage {
    pub sessions: Vec<SessionView>,
    pub next_cursor: Option<String>,
}

/// A text message on the attach WebSocket (terminal bytes travel as
/// binary messages, both ways). See docs/API.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AttachMessage {
    /// Server first: which session, and whether this viewer writes.
    Hello {
        session: String,
        name: String,
        writer: bool,
        /// The session is paused: nobody's input counts until it resumes.
        #[serde(default)]
        paused: bool,
    },
    /// Server: this viewer's right to write changed.
    Writer { writer: bool },
    /// Server: the session was paused (every process frozen, input
    /// ignored) or resumed.
    Paused { paused: bool },
    /// Server: the session ended (the socket closes next).
    Exit {
        status: SessionStatus,
        exit_code: Option<i64>,
    },
    /// Server: something the viewer should know (dropped input, being
    /// dropped for falling behind).
    Notice { detail: String },
    /// Client: the terminal's new size (the writer's only).
    Resize { rows: u16, cols: u16 },
    /// Client: become the writer (the previous one reads only).
    TakeOver,
    /// Client: leave; the session goes on.
    Detach,
}

/// A new API key (`POST /v1/keys`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// A label for people, 1 to 100 characters.
    pub name: String,
    /// Any of read, run, admin.
    pub scopes: Vec<String>,
    /// What this key's jobs may use beyond their profile's network policy
    /// ("none", "host" or "allow:HOST[:PORT],..."); absent: only narrower.
    /// At most 4096 bytes, checked before it is parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// An API key as the API shows it (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// "api", "bootstrap" or "file".
    pub source: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// The key's network grant, if any.
    #[cfg_attr(feature = "schema", schema(value_type = Option<String>))]
    pub network: Option<NetworkMode>,
}

/// A key just made: its secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct NewKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// The secret, shown this once and never again.
    pub key: String,
}

/// One audited action.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct AuditEventView {
    pub seq: i64,
    pub ts: i64,
    pub key_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub client: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// One page of the audit trail, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct AuditPage {
    pub events: Vec<AuditEventView>,
    pub next_cursor: Option<String>,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(ToSchema))]
pub struct Health {
    /// Always "healthy" when the server answers.
    pub status: String,
    pub service: String,
    pub version: String,
    pub jobs_running: usize,
    pub queue_depth: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_through_serde_and_parse() {
        for s in JobStatus::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<JobStatus>(&j).unwrap(), s);
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
        assert!("done".parse::<JobStatus>().is_err());
        for s in SessionStatus::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(s.as_str().parse::<SessionStatus>().unwrap(), s);
            assert_eq!(s.is_final(), s != SessionStatus::Running);
        }
    }

    #[test]
    fn a_job_request_refuses_unknown_fields() {
        let ok: JobRequest = serde_json::from_str(
            r#"{"agent":"shell","prompt":"p","repo_path":"/r","network":"allow:example.com"}"#,
        )
        .unwrap();
        assert_eq!(ok.timeout, 600);
        assert_eq!(ok.network.as_deref(), Some("allow:example.com"));
        let e = serde_json::from_str::<JobRequest>(
            r#"{"agent":"shell","prompt":"p","repo_path":"/r","netwrok":"host"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("netwrok"), "{e}");
    }

    #[test]
    fn answers_accept_fields_a_newer_server_adds() {
        let v = serde_json::json!({"id": "k", "name": "n", "scopes": ["read"], "source": "api",
            "created_at": 1, "revoked_at": null, "network": null, "expires_at": 5});
        let k: KeyView = serde_json::from_value(v).unwrap();
        assert_eq!(k.id, "k");
    }

    #[test]
    fn either_error_body_reads_as_text() {
        let a: ErrorBody = serde_json::from_str(r#"{"detail":"No job x"}"#).unwrap();
        assert_eq!(a.to_string(), "No job x");
        let b: ErrorBody = serde_json::from_str(
            r#"{"detail":[{"loc":["body","timeout"],"msg":"too long","type":"value_error"}]}"#,
        )
        .unwrap();
        assert_eq!(b.to_string(), "timeout: too long");
    }
}
