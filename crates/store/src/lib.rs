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
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("opening the database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The life of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Interrupted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::TimedOut,
        JobStatus::Cancelled,
        JobStatus::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::TimedOut => "timed_out",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        JobStatus::ALL
            .into_iter()
            .find(|j| j.as_str() == s)
            .ok_or_else(|| format!("unknown job status {s:?}"))
    }
}

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
    pub network: Option<String>,
}

/// A stored job (without its patch and output, which are fetched apart).
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    #[serde(skip)]
    pub seq: i64,
    pub id: String,
    pub agent: String,
    pub prompt: String,
    pub repo_path: String,
    pub timeout_s: i64,
    pub extra_args: Vec<String>,
    pub network: Option<String>,
    pub status: JobStatus,
    pub key_id: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    #[serde(skip)]
    pub supervisor_pid: Option<i64>,
    #[serde(skip)]
    pub supervisor_start: Option<i64>,
}

/// One piece of output, in arrival order.
#[derive(Debug, Clone, Serialize)]
pub struct LogChunk {
    pub seq: i64,
    pub stream: String,
    pub ts: i64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    #[serde(skip)]
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
    pub source: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// What this key's jobs may use beyond their profile's network policy
    /// (`none`, `host`, `allow:...`), granted by an admin.
    pub network: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
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

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

const JOB_COLS: &str = "seq, id, agent, prompt, repo_path, timeout_s, extra_args, network, status, key_id, created_at, started_at, finished_at, exit_code, error, result, supervisor_pid, supervisor_start";

fn job_from(row: &sqlx::sqlite::SqliteRow) -> Result<Job> {
    let status: String = row.try_get("status")?;
    let extra: String = row.try_get("extra_args")?;
    let result: Option<String> = row.try_get("result")?;
    Ok(Job {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        agent: row.try_get("agent")?,
        prompt: row.try_get("prompt")?,
        repo_path: row.try_get("repo_path")?,
        timeout_s: row.try_get("timeout_s")?,
        extra_args: serde_json::from_str(&extra).unwrap_or_default(),
        network: row.try_get("network")?,
        status: status.parse().unwrap_or(JobStatus::Failed),
        key_id: row.try_get("key_id")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        exit_code: row.try_get("exit_code")?,
        error: row.try_get("error")?,
        result: result.and_then(|r| serde_json::from_str(&r).ok()),
        supervisor_pid: row.try_get("supervisor_pid")?,
        supervisor_start: row.try_get("supervisor_start")?,
    })
}

fn key_from(row: &sqlx::sqlite::SqliteRow) -> Result<ApiKey> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        hash: row.try_get("hash")?,
        scopes: scopes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        source: row.try_get("source")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        network: row.try_get("network")?,
    })
}

impl Store {
    /// Open (creating if needed) the database at `path` and migrate it.
    pub async fn open(path: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL survives a killed process; only a power cut can
            // lose the last commits
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ------------------------------------------------------------- jobs

    pub async fn create_job(&self, j: &NewJob) -> Result<Job> {
        let extra = serde_json::to_string(&j.extra_args).unwrap_or_else(|_| "[]".into());
        let row = sqlx::query(&format!(
            "INSERT INTO jobs (id, agent, prompt, repo_path, timeout_s, extra_args, network, status, key_id, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?) RETURNING {JOB_COLS}"
        ))
        .bind(&j.id)
        .bind(&j.agent)
        .bind(&j.prompt)
        .bind(&j.repo_path)
        .bind(j.timeout_s)
        .bind(extra)
        .bind(&j.network)
        .bind(&j.key_id)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        job_from(&row)
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from).transpose()
    }

    /// Jobs newest first, after `cursor` (a seq from a previous page);
    /// only those of the key `owner` when given.
    pub async fn list_jobs(
        &self,
        owner: Option<&str>,
        status: Option<JobStatus>,
        agent: Option<&str>,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR agent = ?2) \
             AND (?3 IS NULL OR seq < ?3) AND (?5 IS NULL OR key_id = ?5) ORDER BY seq DESC LIMIT ?4"
        ))
        .bind(status.map(|s| s.as_str()))
        .bind(agent)
        .bind(cursor)
        .bind(limit)
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from).collect()
    }

    /// Queued jobs, oldest first (the FIFO after a restart).
    pub async fn queued_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE status = 'queued' ORDER BY seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from).collect()
    }

    /// queued -> running; false if the job is no longer queued.
    pub async fn mark_running(&self, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Record the sandbox supervisor's pid and start time (clock ticks since
    /// boot), so a restarted server can make sure it is gone.
    pub async fn set_supervisor(&self, id: &str, pid: i64, start: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET supervisor_pid = ?, supervisor_start = ? WHERE id = ?")
            .bind(pid)
            .bind(start)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn append_log(
        &self,
        job_seq: i64,
        seq: i64,
        stream: &str,
        data: &[u8],
    ) -> Result<()> {
        sqlx::query("INSERT INTO job_logs (job_seq, seq, stream, ts, data) VALUES (?, ?, ?, ?, ?)")
            .bind(job_seq)
            .bind(seq)
            .bind(stream)
            .bind(now_ms())
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every chunk with seq > `after`, in order (tests and small jobs;
    /// the server reads pages: [`Store::logs_page`]).
    pub async fn logs(&self, job_seq: i64, after: i64) -> Result<Vec<LogChunk>> {
        self.logs_page(job_seq, after, Streams::All, i64::MAX).await
    }

    /// At most `limit` chunks with seq > `after` of the given streams, in
    /// order: one bounded page (a chunk is at most one 32 KiB read).
    pub async fn logs_page(
        &self,
        job_seq: i64,
        after: i64,
        streams: Streams<'_>,
        limit: i64,
    ) -> Result<Vec<LogChunk>> {
        let (output, only) = match streams {
            Streams::All => (false, None),
            Streams::Output => (true, None),
            Streams::Only(s) => (false, Some(s)),
        };
        let rows = sqlx::query(
            "SELECT seq, stream, ts, data FROM job_logs WHERE job_seq = ?1 AND seq > ?2 \
             AND (?3 = 0 OR stream IN ('stdout', 'stderr')) AND (?4 IS NULL OR stream = ?4) \
             ORDER BY seq LIMIT ?5",
        )
        .bind(job_seq)
        .bind(after)
        .bind(output)
        .bind(only)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LogChunk {
                    seq: r.try_get("seq")?,
                    stream: r.try_get("stream")?,
                    ts: r.try_get("ts")?,
                    data: r.try_get("data")?,
                })
            })
            .collect()
    }

    /// Record how a running (or queued) job ended; false if it had already
    /// ended. The patch is stored in parts of at most [`PATCH_PART`] bytes,
    /// in the same transaction.
    pub async fn finish_job(&self, id: &str, f: &Finish) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE jobs SET status = ?, exit_code = ?, error = ?, result = ?, patch_bytes = ?, finished_at = ?, \
             supervisor_pid = NULL WHERE id = ? AND status IN ('queued', 'running') RETURNING seq",
        )
        .bind(f.status.as_str())
        .bind(f.exit_code)
        .bind(&f.error)
        .bind(f.result.as_ref().map(|r| r.to_string()))
        .bind(f.patch.as_ref().map(|p| p.len() as i64))
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = r else {
            return Ok(false);
        };
        let seq: i64 = row.try_get("seq")?;
        if let Some(p) = &f.patch {
            for (i, part) in p.chunks(PATCH_PART).enumerate() {
                sqlx::query("INSERT INTO job_patch_parts (job_seq, part, data) VALUES (?, ?, ?)")
                    .bind(seq)
                    .bind(i as i64)
                    .bind(part)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The whole patch: `None` for an unknown job, `Some(None)` when none
    /// was stored.
    pub async fn patch(&self, id: &str) -> Result<Option<Option<Vec<u8>>>> {
        let Some((seq, bytes)) = self.patch_size(id).await? else {
            return Ok(None);
        };
        let Some(bytes) = bytes else {
            return Ok(Some(None));
        };
        let mut out = Vec::with_capacity(bytes.max(0) as usize);
        let mut part = 0;
        while let Some(p) = self.patch_part(seq, part).await? {
            out.extend_from_slice(&p);
            part += 1;
        }
        Ok(Some(Some(out)))
    }

    /// A job's seq and its patch's size (`None`: no patch stored).
    pub async fn patch_size(&self, id: &str) -> Result<Option<(i64, Option<i64>)>> {
        let row = sqlx::query("SELECT seq, patch_bytes FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("seq")?, r.try_get("patch_bytes")?)))
            .transpose()
    }

    /// Part `part` (from 0) of a job's patch, or `None` past the last.
    pub async fn patch_part(&self, job_seq: i64, part: i64) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM job_patch_parts WHERE job_seq = ? AND part = ?")
            .bind(job_seq)
            .bind(part)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("data").map_err(StoreError::from))
            .transpose()
    }

    /// Delete a job that has ended, with its output; false if it is unknown
    /// or still queued/running.
    pub async fn delete_job(&self, id: &str) -> Result<bool> {
        let r =
            sqlx::query("DELETE FROM jobs WHERE id = ? AND status NOT IN ('queued', 'running')")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// After a crash: every job still marked running was interrupted.
    /// Returns those jobs (with their supervisor pids) so leftovers can be
    /// killed.
    pub async fn interrupt_running(&self, why: &str) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE status = 'running'"
        ))
        .fetch_all(&self.pool)
        .await?;
        let jobs: Vec<Job> = rows.iter().map(job_from).collect::<Result<_>>()?;
        sqlx::query(
            "UPDATE jobs SET status = 'interrupted', error = ?, finished_at = ?, supervisor_pid = NULL \
             WHERE status = 'running'",
        )
        .bind(why)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(jobs)
    }

    pub async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let s: String = r.try_get("status")?;
            if let Ok(st) = s.parse() {
                out.push((st, r.try_get("n")?));
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------- keys

    pub async fn insert_key(&self, k: &ApiKey) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, name, hash, scopes, source, created_at, network) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(&k.id)
            .bind(&k.name)
            .bind(&k.hash)
            .bind(k.scopes.join(","))
            .bind(&k.source)
            .bind(k.created_at)
            .bind(&k.network)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn key_by_hash(&self, hash: &[u8]) -> Result<Option<ApiKey>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from).transpose()
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_from).collect()
    }

    pub async fn revoke_key(&self, id: &str) -> Result<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn count_keys(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM api_keys")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    // ------------------------------------------------------------ audit

    #[allow(clippy::too_many_arguments)]
    pub async fn audit(
        &self,
        key_id: Option<&str>,
        action: &str,
        target: Option<&str>,
        client: Option<&str>,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<()> {
        // every field is bounded, whatever a caller passes: an audit row
        // costs the same for a 60 KB path as for a short one
        sqlx::query("INSERT INTO audit (ts, key_id, action, target, client, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(now_ms())
            .bind(key_id.map(|k| bounded(k, 64)))
            .bind(bounded(action, 64))
            .bind(target.map(|t| bounded(t, AUDIT_TARGET_MAX)))
            .bind(client.map(|c| bounded(c, 64)))
            .bind(bounded(outcome, 512))
            .bind(detail.map(|d| bounded(d, AUDIT_DETAIL_MAX)))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Audit events newest first, before `cursor`.
    pub async fn list_audit(&self, cursor: Option<i64>, limit: i64) -> Result<Vec<AuditEvent>> {
        let rows = sqlx::query(
            "SELECT * FROM audit WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2",
        )
        .bind(cursor)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEvent {
                    seq: r.try_get("seq")?,
                    ts: r.try_get("ts")?,
                    key_id: r.try_get("key_id")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    client: r.try_get("client")?,
                    outcome: r.try_get("outcome")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    // ----------------------------------------------------------- backup

    /// A consistent copy of the whole database, taken while it is in use.
    pub async fn backup(&self, to: &Path) -> Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(to.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job(id: &str) -> NewJob {
        NewJob {
            id: id.into(),
            agent: "shell".into(),
            prompt: "echo hi".into(),
            repo_path: "/tmp".into(),
            timeout_s: 60,
            extra_args: vec!["--x".into()],
            key_id: Some("k1".into()),
            network: None,
        }
    }

    #[tokio::test]
    async fn job_lifecycle_and_recovery() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&d.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let a = s
            .create_job(&new_job("a"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let b = s
            .create_job(&new_job("b"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.seq < b.seq);
        assert_eq!(a.status, JobStatus::Queued);
        assert!(s.mark_running("a").await.unwrap_or(false));
        assert!(!s.mark_running("a").await.unwrap_or(true), "running twice");
        s.append_log(a.seq, 1, "stdout", b"one")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.append_log(a.seq, 2, "stderr", b"two")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let logs = s.logs(a.seq, 1).await.unwrap_or_default();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].data, b"two");
        // a deleted running job is refused
        assert!(!s.delete_job("a").await.unwrap_or(true));
        // crash: a is interrupted, b stays queued
        let interrupted = s
            .interrupt_running("server restarted")
            .await
            .unwrap_or_default();
        assert_eq!(interrupted.len(), 1);
        let a2 = s
            .get_job("a")
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("a gone"));
        assert_eq!(a2.status, JobStatus::Interrupted);
        assert_eq!(
            s.logs(a.seq, 0).await.unwrap_or_default().len(),
            2,
            "output kept"
        );
        let q = s.queued_jobs().await.unwrap_or_default();
        assert_eq!(
            q.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        // finishing an ended job does nothing
        let f = Finish {
            status: JobStatus::Succeeded,
            exit_code: Some(0),
            error: None,
            result: None,
            patch: Some(b"p".to_vec()),
        };
        assert!(!s.finish_job("a", &f).await.unwrap_or(true));
        assert!(s.finish_job("b", &f).await.unwrap_or(false));
        assert_eq!(
            s.patch("b").await.ok().flatten().flatten(),
            Some(b"p".to_vec())
        );
        assert!(s.delete_job("b").await.unwrap_or(false));
        assert!(s.get_job("b").await.ok().flatten().is_none());
        // backup is a consistent, openable copy
        let bk = d.path().join("backup.sqlite");
        s.backup(&bk).await.unwrap_or_else(|e| panic!("{e}"));
        let s2 = Store::open(&bk).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(s2.get_job("a").await.ok().flatten().is_some());
    }

    #[tokio::test]
    async fn patches_are_stored_in_parts_and_read_back_whole() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&d.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let j = s
            .create_job(&new_job("p"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let patch: Vec<u8> = (0..(PATCH_PART * 2 + 17)).map(|i| i as u8).collect();
        let f = Finish {
            status: JobStatus::Succeeded,
            exit_code: Some(0),
            error: None,
            result: None,
            patch: Some(patch.clone()),
        };
        assert!(s.finish_job("p", &f).await.unwrap_or(false));
        assert_eq!(
            s.patch_size("p").await.ok().flatten(),
            Some((j.seq, Some(patch.len() as i64)))
        );
        assert_eq!(
            s.patch_part(j.seq, 2).await.ok().flatten().map(|p| p.len()),
            Some(17)
        );
        assert_eq!(s.patch_part(j.seq, 3).await.ok().flatten(), None);
        assert_eq!(s.patch("p").await.ok().flatten().flatten(), Some(patch));
        // a job that ended without a patch
        s.create_job(&new_job("q"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let f = Finish { patch: None, ..f };
        assert!(s.finish_job("q", &f).await.unwrap_or(false));
        assert_eq!(s.patch("q").await.ok().flatten(), Some(None));
        assert_eq!(s.patch("nope").await.ok().flatten(), None);
    }

    /// Patches stored whole by an older version are split into parts by
    /// the migration (its data statements, replayed on such a row).
    #[tokio::test]
    async fn legacy_whole_patches_are_split_by_the_migration() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&d.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.create_job(&new_job("old"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let patch: Vec<u8> = (0..(PATCH_PART + 5)).map(|i| (i % 251) as u8).collect();
        sqlx::query("UPDATE jobs SET status = 'succeeded', patch = ? WHERE id = 'old'")
            .bind(&patch)
            .execute(&s.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let sql = include_str!("../migrations/0003_keys_network_and_patch_parts.sql");
        let data = &sql[sql.find("WITH RECURSIVE").unwrap_or(0)..];
        sqlx::raw_sql(data)
            .execute(&s.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.patch("old").await.ok().flatten().flatten(), Some(patch));
    }

    #[tokio::test]
    async fn audit_fields_are_bounded() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&d.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let long = "é".repeat(40_000);
        s.audit(
            Some(&long),
            &long,
            Some(&long),
            Some(&long),
            &long,
            Some(&long),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let ev = s.list_audit(None, 1).await.unwrap_or_default();
        let e = &ev[0];
        assert!(e.target.as_deref().unwrap_or("").len() <= AUDIT_TARGET_MAX);
        assert!(e.detail.as_deref().unwrap_or("").len() <= AUDIT_DETAIL_MAX);
        assert!(e.action.len() <= 64 && e.outcome.len() <= 512);
        assert!(e.target.as_deref().unwrap_or("").ends_with("..."));
    }

    #[tokio::test]
    async fn jobs_list_by_owner_and_logs_by_page() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&d.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let a = s
            .create_job(&new_job("a"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = new_job("b");
        b.key_id = Some("k2".into());
        s.create_job(&b).await.unwrap_or_else(|e| panic!("{e}"));
        let mine = s
            .list_jobs(Some("k2"), None, None, None, 10)
            .await
            .unwrap_or_default();
        assert_eq!(
            mine.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(
            s.list_jobs(None, None, None, None, 10)
                .await
                .unwrap_or_default()
                .len(),
            2
        );
        for (i, st) in ["stdout", "egress", "stderr", "stdout"].iter().enumerate() {
            s.append_log(a.seq, i as i64 + 1, st, st.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let page = s
            .logs_page(a.seq, 0, Streams::Output, 2)
            .await
            .unwrap_or_default();
        assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 3]);
        let page = s
            .logs_page(a.seq, 3, Streams::Output, 2)
            .await
            .unwrap_or_default();
        assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), [4]);
        let only = s
            .logs_page(a.seq, 0, Streams::Only("stderr"), 10)
            .await
            .unwrap_or_default();
        assert_eq!(only.len(), 1);
    }

    #[tokio::test]
    async fn hostile_strings_are_data() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&d.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let evil = "x'); DROP TABLE jobs; --";
        let mut j = new_job(evil);
        j.agent = evil.into();
        s.create_job(&j).await.unwrap_or_else(|e| panic!("{e}"));
        let got = s
            .list_jobs(None, None, Some(evil), None, 10)
            .await
            .unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, evil);
    }
}
