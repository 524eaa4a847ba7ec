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

    /// Jobs newest first, after `cursor` (a seq from a previous page).
    pub async fn list_jobs(
        &self,
        status: Option<JobStatus>,
        agent: Option<&str>,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR agent = ?2) \
             AND (?3 IS NULL OR seq < ?3) ORDER BY seq DESC LIMIT ?4"
        ))
        .bind(status.map(|s| s.as_str()))
        .bind(agent)
        .bind(cursor)
        .bind(limit)
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

    /// Output chunks with seq > `after`, in order.
    pub async fn logs(&self, job_seq: i64, after: i64) -> Result<Vec<LogChunk>> {
        let rows = sqlx::query(
            "SELECT seq, stream, ts, data FROM job_logs WHERE job_seq = ? AND seq > ? ORDER BY seq",
        )
        .bind(job_seq)
        .bind(after)
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
    /// ended.
    pub async fn finish_job(&self, id: &str, f: &Finish) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = ?, exit_code = ?, error = ?, result = ?, patch = ?, finished_at = ?, \
             supervisor_pid = NULL WHERE id = ? AND status IN ('queued', 'running')",
        )
        .bind(f.status.as_str())
        .bind(f.exit_code)
        .bind(&f.error)
        .bind(f.result.as_ref().map(|r| r.to_string()))
        .bind(&f.patch)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn patch(&self, id: &str) -> Result<Option<Option<Vec<u8>>>> {
        let row = sqlx::query("SELECT patch FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            r.try_get::<Option<Vec<u8>>, _>("patch")
                .map_err(StoreError::from)
        })
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
        sqlx::query("INSERT INTO api_keys (id, name, hash, scopes, source, created_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&k.id)
            .bind(&k.name)
            .bind(&k.hash)
            .bind(k.scopes.join(","))
            .bind(&k.source)
            .bind(k.created_at)
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
        sqlx::query("INSERT INTO audit (ts, key_id, action, target, client, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(now_ms())
            .bind(key_id)
            .bind(action)
            .bind(target)
            .bind(client)
            .bind(outcome)
            .bind(detail)
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
            .list_jobs(None, Some(evil), None, 10)
            .await
            .unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, evil);
    }
}
