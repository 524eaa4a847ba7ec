//! # agentvm-store: persistence
//!
//! Owns every durable record: jobs, their output as it arrives, their
//! patches, API keys (SHA-256 hashes only, never a secret) and audit events.
//! SQLite in WAL mode is the embedded default; migrations run on open. Every
//! statement is parameterised.
//!
//! It must never: store a key's secret; interpret job content; know about
//! HTTP or sandboxes.

use std::path::Path;

use async_trait::async_trait;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod sqlite;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("opening the database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value this version cannot read (written by hand, or by a
    /// version that knew more): refused rather than read as something else.
    #[error("the stored {what} is unreadable: {why}")]
    Corrupt { what: String, why: String },
    /// A unique name is in use (a live session's, for its owner).
    #[error("{0} is taken")]
    Taken(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub use agentvm_proto::api::{JobStatus, SessionStatus};
pub use agentvm_proto::NetworkMode;

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub agent: String,
    pub prompt: String,
    pub repo_path: String,
    pub timeout_s: i64,
    pub extra_args: Vec<String>,
    pub key_id: Option<String>,
    /// The job's own network policy; `None`: its profile's.
    pub network: Option<NetworkMode>,
    /// The image it runs on (`sha256:...`); `None`: the host's system.
    pub image: Option<String>,
}

/// A stored job (without its patch and output, which are fetched apart).
#[derive(Debug, Clone)]
pub struct Job {
    pub seq: i64,
    pub id: String,
    pub agent: String,
    pub prompt: String,
    pub repo_path: String,
    pub timeout_s: i64,
    pub extra_args: Vec<String>,
    pub network: Option<NetworkMode>,
    /// The image it runs on (`sha256:...`); `None`: the host's system.
    pub image: Option<String>,
    pub status: JobStatus,
    pub key_id: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub supervisor_pid: Option<i64>,
    pub supervisor_start: Option<i64>,
}

/// One piece of output, in arrival order.
#[derive(Debug, Clone)]
pub struct LogChunk {
    pub seq: i64,
    pub stream: String,
    pub ts: i64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
    pub source: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// What this key's jobs may use beyond their profile's network policy
    /// (`none`, `host`, `allow:...`), granted by an admin.
    pub network: Option<NetworkMode>,
}

/// Which audit events a listing keeps: all of these that are set.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub key_id: Option<String>,
    pub action: Option<String>,
    /// A job: the events whose target is it, and its egress decisions
    /// (whose detail starts `job ID;`).
    pub job: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub seq: i64,
    pub ts: i64,
    pub key_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub client: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: JobStatus,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub patch: Option<Vec<u8>>,
}

/// Which chunks of a job's log a page holds.
#[derive(Debug, Clone, Copy)]
pub enum Streams<'a> {
    All,
    /// stdout and stderr (no egress decisions).
    Output,
    Only(&'a str),
}

/// A stored patch's parts are at most this large.
pub const PATCH_PART: usize = 1 << 20;

/// The longest audit target and detail stored (longer ones are cut, and
/// say so).
pub const AUDIT_TARGET_MAX: usize = 256;
pub const AUDIT_DETAIL_MAX: usize = 2048;

/// `s` cut to at most `max` bytes at a character boundary, marked with an
/// ellipsis when cut.
pub fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}...", &s[..end]))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Jobs: their rows and their states (queued, running, final).
#[async_trait]
pub trait Jobs: Send + Sync {
    async fn create_job(&self, j: &NewJob) -> Result<Job>;
    async fn get_job(&self, id: &str) -> Result<Option<Job>>;
    /// Jobs newest first, after `cursor` (a seq from a previous page);
    /// only those of the key `owner` when given.
    async fn list_jobs(
        &self,
        owner: Option<&str>,
        status: Option<JobStatus>,
        agent: Option<&str>,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Job>>;
    /// Queued jobs, oldest first (the FIFO after a restart).
    async fn queued_jobs(&self) -> Result<Vec<Job>>;
    /// queued -> running; false if the job is no longer queued.
    async fn mark_running(&self, id: &str) -> Result<bool>;
    /// Record the sandbox supervisor's pid and start time (clock ticks since
    /// boot), so a restarted server can make sure it is gone.
    async fn set_supervisor(&self, id: &str, pid: i64, start: i64) -> Result<()>;
    /// Record how a running (or queued) job ended; false if it had already
    /// ended. The patch is stored in parts of at most [`PATCH_PART`] bytes,
    /// in the same transaction.
    async fn finish_job(&self, id: &str, f: &Finish) -> Result<bool>;
    /// Delete a job that has ended, with its output; false if it is unknown
    /// or still queued/running.
    async fn delete_job(&self, id: &str) -> Result<bool>;
    /// After a crash: every job still marked running was interrupted.
    /// Returns those jobs (with their supervisor pids) so leftovers can be
    /// killed.
    async fn interrupt_running(&self, why: &str) -> Result<Vec<Job>>;
    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>>;
}

/// A job's output as it arrives, and its patch (stored in parts).
#[async_trait]
pub trait Output: Send + Sync {
    async fn append_log(&self, job_seq: i64, seq: i64, stream: &str, data: &[u8]) -> Result<()>;
    /// Every chunk with seq > `after`, in order (tests and small jobs;
    /// the server reads pages: [`Store::logs_page`]).
    async fn logs(&self, job_seq: i64, after: i64) -> Result<Vec<LogChunk>>;
    /// At most `limit` chunks with seq > `after` of the given streams, in
    /// order: one bounded page (a chunk is at most one 32 KiB read).
    async fn logs_page(
        &self,
        job_seq: i64,
        after: i64,
        streams: Streams<'_>,
        limit: i64,
    ) -> Result<Vec<LogChunk>>;
    /// The whole patch: `None` for an unknown job, `Some(None)` when none
    /// was stored.
    async fn patch(&self, id: &str) -> Result<Option<Option<Vec<u8>>>>;
    /// A job's seq and its patch's size (`None`: no patch stored).
    async fn patch_size(&self, id: &str) -> Result<Option<(i64, Option<i64>)>>;
    /// Part `part` (from 0) of a job's patch, or `None` past the last.
    async fn patch_part(&self, job_seq: i64, part: i64) -> Result<Option<Vec<u8>>>;
    /// Recording retention: remove the output (logs, and so the recording
    /// built from it) of at most `limit` ended jobs that finished before
    /// `before` (ms since the epoch) and still have some, oldest first;
    /// their records, results and patches stay. Returns their ids.
    async fn drop_logs_before(&self, before: i64, limit: i64) -> Result<Vec<String>>;
}

/// API keys: their SHA-256 hashes and scopes, never a secret.
#[async_trait]
pub trait Keys: Send + Sync {
    async fn insert_key(&self, k: &ApiKey) -> Result<()>;
    async fn key_by_hash(&self, hash: &[u8]) -> Result<Option<ApiKey>>;
    async fn list_keys(&self) -> Result<Vec<ApiKey>>;
    async fn revoke_key(&self, id: &str) -> Result<bool>;
    async fn count_keys(&self) -> Result<i64>;
}

/// The audit trail: every field bounded, whatever a caller passes.
#[async_trait]
pub trait Audit: Send + Sync {
    #[allow(clippy::too_many_arguments)]
    async fn audit(
        &self,
        key_id: Option<&str>,
        action: &str,
        target: Option<&str>,
        client: Option<&str>,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<()>;
    /// Audit events newest first, before `cursor`, those `filter` keeps.
    async fn list_audit(
        &self,
        cursor: Option<i64>,
        limit: i64,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditEvent>>;
}

/// A session as it is started.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub name: String,
    /// The key id (or SSH identity) that owns it.
    pub owner: String,
    pub agent: Option<String>,
    pub command: Vec<String>,
    pub repo_path: Option<String>,
    pub network: Option<NetworkMode>,
    pub idle_timeout_s: i64,
}

/// A stored session.
#[derive(Debug, Clone)]
pub struct Session {
    pub seq: i64,
    pub id: String,
    pub name: String,
    pub owner: String,
    pub agent: Option<String>,
    pub command: Vec<String>,
    pub repo_path: Option<String>,
    pub network: Option<NetworkMode>,
    pub idle_timeout_s: i64,
    pub status: SessionStatus,
    pub created_at: i64,
    pub ended_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub supervisor_pid: Option<i64>,
    pub supervisor_start: Option<i64>,
}

/// A workspace as it is made.
#[derive(Debug, Clone)]
pub struct NewWorkspace {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub repo_path: String,
    /// Layer ids, newest first (empty: the repo as it is).
    pub stack: Vec<String>,
    /// The image its jobs and sessions run on unless they name their own.
    pub image: Option<String>,
}

/// A stored workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub seq: i64,
    pub id: String,
    pub name: String,
    pub owner: String,
    pub repo_path: String,
    pub stack: Vec<String>,
    /// The image its jobs and sessions run on unless they name their own.
    pub image: Option<String>,
    /// The job that holds it for writing (queued or running).
    pub writer: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A checkpoint as it is taken.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub stack: Vec<String>,
}

/// A stored checkpoint: a workspace's stack, named and kept.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub seq: i64,
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub stack: Vec<String>,
    pub created_at: i64,
}

/// Workspaces and their checkpoints; a workspace's name is unique for its
/// owner, a checkpoint's for its workspace. One writer at a time.
#[async_trait]
pub trait Workspaces: Send + Sync {
    /// [`StoreError::Taken`] when the owner has one of that name.
    async fn create_workspace(&self, w: &NewWorkspace) -> Result<Workspace>;
    async fn get_workspace(&self, id: &str) -> Result<Option<Workspace>>;
    async fn workspace_named(&self, owner: &str, name: &str) -> Result<Option<Workspace>>;
    /// Oldest first; `owner` `None`: everyone's.
    async fn list_workspaces(&self, owner: Option<&str>) -> Result<Vec<Workspace>>;
    /// The workspace job `writer` holds, if any.
    async fn workspace_of_writer(&self, writer: &str) -> Result<Option<Workspace>>;
    /// Hold it for `writer`; false when someone else does.
    async fn take_workspace(&self, id: &str, writer: &str) -> Result<bool>;
    /// Let go of it (if `writer` holds it), with its new stack if given;
    /// false when `writer` did not hold it.
    async fn release_workspace(
        &self,
        id: &str,
        writer: &str,
        stack: Option<&[String]>,
    ) -> Result<bool>;
    /// A new stack while nobody writes it (restore, squash); false when busy.
    async fn set_workspace_stack(&self, id: &str, stack: &[String]) -> Result<bool>;
    /// Remove it and its checkpoints, unless someone writes it.
    async fn delete_workspace(&self, id: &str) -> Result<bool>;
    /// [`StoreError::Taken`] when the workspace has one of that name.
    async fn create_checkpoint(&self, c: &NewCheckpoint) -> Result<Checkpoint>;
    async fn get_checkpoint(&self, id: &str) -> Result<Option<Checkpoint>>;
    async fn checkpoint_named(&self, workspace_id: &str, name: &str) -> Result<Option<Checkpoint>>;
    /// Oldest first.
    async fn list_checkpoints(&self, workspace_id: &str) -> Result<Vec<Checkpoint>>;
    /// `reader` (a job or session) reads `stack` of workspace
    /// `workspace_id` beside its writer: the layers stay in use until
    /// [`Workspaces::drop_reader`].
    async fn add_reader(&self, reader: &str, workspace_id: &str, stack: &[String]) -> Result<()>;
    /// The workspace and stack `reader` reads, if it is a reader.
    async fn reader_stack(&self, reader: &str) -> Result<Option<(String, Vec<String>)>>;
    /// `reader` has ended; false if it was not one.
    async fn drop_reader(&self, reader: &str) -> Result<bool>;
    /// Every reader, oldest first.
    async fn list_readers(&self) -> Result<Vec<String>>;
    async fn delete_checkpoint(&self, id: &str) -> Result<bool>;
    /// Every layer id a workspace or checkpoint names.
    async fn layers_in_use(&self) -> Result<Vec<String>>;
}

/// Interactive sessions: their rows and states; a live session's name is
/// unique for its owner.
#[async_trait]
pub trait Sessions: Send + Sync {
    /// A new running session; [`StoreError::Taken`] when the owner has a
    /// live one of that name.
    async fn create_session(&self, s: &NewSession) -> Result<Session>;
    async fn get_session(&self, id: &str) -> Result<Option<Session>>;
    /// The owner's session of that name: the live one, else the newest.
    async fn session_named(&self, owner: &str, name: &str) -> Result<Option<Session>>;
    /// Newest first, after `cursor`; only `owner`'s when given.
    async fn list_sessions(
        &self,
        owner: Option<&str>,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Session>>;
    async fn set_session_supervisor(&self, id: &str, pid: i64, start: i64) -> Result<()>;
    /// running -> `status`; false if it had already ended.
    async fn end_session(
        &self,
        id: &str,
        status: SessionStatus,
        exit_code: Option<i64>,
        error: Option<&str>,
    ) -> Result<bool>;
    /// After a crash: every session still running was interrupted;
    /// returns them (with their supervisor pids) so leftovers can be killed.
    async fn interrupt_sessions(&self, why: &str) -> Result<Vec<Session>>;
    /// Delete an ended session; false if unknown or still running.
    async fn delete_session(&self, id: &str) -> Result<bool>;
    /// Store the patch of what a session changed (once it has ended).
    async fn set_session_patch(&self, id: &str, patch: &[u8]) -> Result<()>;
    /// The session's patch: `None` for an unknown session, `Some(None)`
    /// when none was captured.
    async fn session_patch(&self, id: &str) -> Result<Option<Option<Vec<u8>>>>;
}

/// A consistent copy while in use, and closing.
#[async_trait]
pub trait Lifecycle: Send + Sync {
    /// A consistent copy of the whole database, taken while it is in use.
    async fn backup(&self, to: &Path) -> Result<()>;
    async fn close(&self);
}

/// Everything a store does.
pub trait Backend: Jobs + Output + Keys + Audit + Sessions + Workspaces + Lifecycle {}

impl<T: Jobs + Output + Keys + Audit + Sessions + Workspaces + Lifecycle> Backend for T {}

/// The store the server holds: any [`Backend`], shared. Its methods are
/// the backend's (`store.get_job(id).await`).
#[derive(Clone)]
pub struct Store(std::sync::Arc<dyn Backend>);

impl Store {
    pub fn new(b: impl Backend + 'static) -> Store {
        Store(std::sync::Arc::new(b))
    }

    /// The embedded default: open (creating if needed) the SQLite database
    /// at `path` and migrate it.
    pub async fn open(path: &Path) -> Result<Store> {
        SqliteStore::open(path).await.map(Store::new)
    }
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}
