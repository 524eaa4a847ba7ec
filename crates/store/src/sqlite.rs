//! The embedded store: SQLite in WAL mode, migrated on open, every
//! statement parameterised. Only this file knows SQL, the pool and the
//! database's side files.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::*;

/// A SQLite database (see [`SqliteStore::open`]).
pub struct SqliteStore {
    pool: SqlitePool,
}

const JOB_COLS: &str = "seq, id, agent, prompt, repo_path, timeout_s, extra_args, network, image, status, key_id, created_at, started_at, finished_at, exit_code, error, result, supervisor_pid, supervisor_start";

/// A stored network policy, parsed: one that no longer parses is refused,
/// never read as "none given" (that would give the job its profile's,
/// perhaps wider, policy).
fn network_from(row: &sqlx::sqlite::SqliteRow, whose: &str) -> Result<Option<NetworkMode>> {
    let s: Option<String> = row.try_get("network")?;
    s.map(|n| {
        NetworkMode::parse(&n).map_err(|why| StoreError::Corrupt {
            what: format!("network policy of {whose}"),
            why,
        })
    })
    .transpose()
}

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
        network: network_from(row, "a job")?,
        image: row.try_get("image")?,
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
        network: network_from(row, "a key")?,
    })
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path` and migrate it.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
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
        Ok(SqliteStore { pool })
    }
}

/// Put the backup `file` in place as the database `db` (the server must
/// not be running): it is first copied beside `db` and opened, so a file
/// that is not an AgentVM database leaves `db` untouched; then the stale
/// write-ahead log and shared-memory files of both go, and the copy is
/// renamed over `db` (atomic on one filesystem).
pub async fn restore(file: &Path, db: &Path) -> std::result::Result<(), String> {
    let side = |p: &Path, ext: &str| std::path::PathBuf::from(format!("{}{ext}", p.display()));
    let staged = side(db, ".restore");
    let clean = |p: &Path| {
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(side(p, ext));
        }
    };
    let _ = std::fs::remove_file(&staged);
    clean(&staged);
    std::fs::copy(file, &staged).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let checked = match SqliteStore::open(&staged).await {
        Ok(s) => {
            let r = s.count_keys().await;
            s.close().await;
            r.map(|_| ()).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&staged);
        clean(&staged);
        return Err(format!("{} is not an AgentVM backup: {e}", file.display()));
    }
    clean(db);
    clean(&staged);
    std::fs::rename(&staged, db).map_err(|e| e.to_string())
}

#[async_trait]
impl Jobs for SqliteStore {
    async fn create_job(&self, j: &NewJob) -> Result<Job> {
        let extra = serde_json::to_string(&j.extra_args).unwrap_or_else(|_| "[]".into());
        let row = sqlx::query(&format!(
            "INSERT INTO jobs (id, agent, prompt, repo_path, timeout_s, extra_args, network, image, status, key_id, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?) RETURNING {JOB_COLS}"
        ))
        .bind(&j.id)
        .bind(&j.agent)
        .bind(&j.prompt)
        .bind(&j.repo_path)
        .bind(j.timeout_s)
        .bind(extra)
        .bind(j.network.as_ref().map(|n| n.to_string()))
        .bind(&j.image)
        .bind(&j.key_id)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        job_from(&row)
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from).transpose()
    }

    async fn list_jobs(
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

    async fn queued_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE status = 'queued' ORDER BY seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from).collect()
    }

    async fn mark_running(&self, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_supervisor(&self, id: &str, pid: i64, start: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET supervisor_pid = ?, supervisor_start = ? WHERE id = ?")
            .bind(pid)
            .bind(start)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish_job(&self, id: &str, f: &Finish) -> Result<bool> {
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

    async fn delete_job(&self, id: &str) -> Result<bool> {
        let r =
            sqlx::query("DELETE FROM jobs WHERE id = ? AND status NOT IN ('queued', 'running')")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn interrupt_running(&self, why: &str) -> Result<Vec<Job>> {
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

    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
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
}

#[async_trait]
impl Output for SqliteStore {
    async fn append_log(&self, job_seq: i64, seq: i64, stream: &str, data: &[u8]) -> Result<()> {
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

    async fn drop_logs_before(&self, before: i64, limit: i64) -> Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, id FROM jobs WHERE status NOT IN ('queued', 'running') \
             AND finished_at IS NOT NULL AND finished_at < ? \
             AND EXISTS (SELECT 1 FROM job_logs WHERE job_seq = jobs.seq) \
             ORDER BY finished_at LIMIT ?",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (seq, _) in &rows {
            sqlx::query("DELETE FROM job_logs WHERE job_seq = ?")
                .bind(seq)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.into_iter().map(|(_, id)| id).collect())
    }

    async fn logs(&self, job_seq: i64, after: i64) -> Result<Vec<LogChunk>> {
        self.logs_page(job_seq, after, Streams::All, i64::MAX).await
    }

    async fn logs_page(
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

    async fn patch(&self, id: &str) -> Result<Option<Option<Vec<u8>>>> {
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

    async fn patch_size(&self, id: &str) -> Result<Option<(i64, Option<i64>)>> {
        let row = sqlx::query("SELECT seq, patch_bytes FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("seq")?, r.try_get("patch_bytes")?)))
            .transpose()
    }

    async fn patch_part(&self, job_seq: i64, part: i64) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM job_patch_parts WHERE job_seq = ? AND part = ?")
            .bind(job_seq)
            .bind(part)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("data").map_err(StoreError::from))
            .transpose()
    }
}

#[async_trait]
impl Keys for SqliteStore {
    async fn insert_key(&self, k: &ApiKey) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, name, hash, scopes, source, created_at, network) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(&k.id)
            .bind(&k.name)
            .bind(&k.hash)
            .bind(k.scopes.join(","))
            .bind(&k.source)
            .bind(k.created_at)
            .bind(k.network.as_ref().map(|n| n.to_string()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn key_by_hash(&self, hash: &[u8]) -> Result<Option<ApiKey>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_from).collect()
    }

    async fn revoke_key(&self, id: &str) -> Result<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn count_keys(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM api_keys")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }
}

#[async_trait]
impl Audit for SqliteStore {
    #[allow(clippy::too_many_arguments)]
    async fn audit(
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

    async fn list_audit(
        &self,
        cursor: Option<i64>,
        limit: i64,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditEvent>> {
        // the job's own events, and its egress decisions ("job ID; ..."),
        // matched by prefix without LIKE (an id's _ would be a wildcard)
        let rows = sqlx::query(
            "SELECT * FROM audit WHERE (?1 IS NULL OR seq < ?1) \
             AND (?3 IS NULL OR key_id = ?3) AND (?4 IS NULL OR action = ?4) \
             AND (?5 IS NULL OR target = ?5 OR substr(detail, 1, length(?5) + 5) = 'job ' || ?5 || ';') \
             ORDER BY seq DESC LIMIT ?2",
        )
        .bind(cursor)
        .bind(limit)
        .bind(filter.key_id.as_deref())
        .bind(filter.action.as_deref())
        .bind(filter.job.as_deref())
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
}

const SESSION_COLS: &str = "seq, id, name, owner, agent, command, repo_path, network, idle_timeout_s, status, created_at, ended_at, exit_code, error, supervisor_pid, supervisor_start";

fn session_from(row: &sqlx::sqlite::SqliteRow) -> Result<Session> {
    let status: String = row.try_get("status")?;
    let command: String = row.try_get("command")?;
    let id: String = row.try_get("id")?;
    Ok(Session {
        seq: row.try_get("seq")?,
        name: row.try_get("name")?,
        owner: row.try_get("owner")?,
        agent: row.try_get("agent")?,
        command: serde_json::from_str(&command).map_err(|e| StoreError::Corrupt {
            what: format!("command of session {}", bounded(&id, 64)),
            why: e.to_string(),
        })?,
        repo_path: row.try_get("repo_path")?,
        network: network_from(row, "a session")?,
        idle_timeout_s: row.try_get("idle_timeout_s")?,
        status: status.parse().map_err(|why| StoreError::Corrupt {
            what: format!("status of session {}", bounded(&id, 64)),
            why,
        })?,
        created_at: row.try_get("created_at")?,
        ended_at: row.try_get("ended_at")?,
        exit_code: row.try_get("exit_code")?,
        error: row.try_get("error")?,
        supervisor_pid: row.try_get("supervisor_pid")?,
        supervisor_start: row.try_get("supervisor_start")?,
        id,
    })
}

#[async_trait]
impl Sessions for SqliteStore {
    async fn create_session(&self, n: &NewSession) -> Result<Session> {
        let command = serde_json::to_string(&n.command).unwrap_or_else(|_| "[]".into());
        let row = sqlx::query(&format!(
            "INSERT INTO sessions (id, name, owner, agent, command, repo_path, network, idle_timeout_s, status, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?) RETURNING {SESSION_COLS}"
        ))
        .bind(&n.id)
        .bind(&n.name)
        .bind(&n.owner)
        .bind(&n.agent)
        .bind(command)
        .bind(&n.repo_path)
        .bind(n.network.as_ref().map(|m| m.to_string()))
        .bind(n.idle_timeout_s)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(r) => session_from(&r),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Taken(
                format!("the session name {}", bounded(&n.name, 64)),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_session(&self, id: &str) -> Result<Option<Session>> {
        let row = sqlx::query(&format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from).transpose()
    }

    async fn session_named(&self, owner: &str, name: &str) -> Result<Option<Session>> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE owner = ? AND name = ? \
             ORDER BY status = 'running' DESC, seq DESC LIMIT 1"
        ))
        .bind(owner)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(session_from).transpose()
    }

    async fn list_sessions(
        &self,
        owner: Option<&str>,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Session>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE (?1 IS NULL OR owner = ?1) \
             AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3"
        ))
        .bind(owner)
        .bind(cursor)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from).collect()
    }

    async fn set_session_supervisor(&self, id: &str, pid: i64, start: i64) -> Result<()> {
        sqlx::query("UPDATE sessions SET supervisor_pid = ?, supervisor_start = ? WHERE id = ?")
            .bind(pid)
            .bind(start)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn end_session(
        &self,
        id: &str,
        status: SessionStatus,
        exit_code: Option<i64>,
        error: Option<&str>,
    ) -> Result<bool> {
        if status == SessionStatus::Running {
            return Ok(false);
        }
        let r = sqlx::query(
            "UPDATE sessions SET status = ?, exit_code = ?, error = ?, ended_at = ?, supervisor_pid = NULL \
             WHERE id = ? AND status = 'running'",
        )
        .bind(status.as_str())
        .bind(exit_code)
        .bind(error.map(|e| bounded(e, AUDIT_DETAIL_MAX).into_owned()))
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn interrupt_sessions(&self, why: &str) -> Result<Vec<Session>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE status = 'running'"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let live: Vec<Session> = rows.iter().map(session_from).collect::<Result<_>>()?;
        sqlx::query(
            "UPDATE sessions SET status = 'interrupted', error = ?, ended_at = ?, supervisor_pid = NULL \
             WHERE status = 'running'",
        )
        .bind(why)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(live)
    }

    async fn delete_session(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sessions WHERE id = ? AND status != 'running'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_session_patch(&self, id: &str, patch: &[u8]) -> Result<()> {
        sqlx::query("UPDATE sessions SET patch = ? WHERE id = ? AND status != 'running'")
            .bind(patch)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn session_patch(&self, id: &str) -> Result<Option<Option<Vec<u8>>>> {
        let row = sqlx::query("SELECT patch FROM sessions WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => None,
            Some(r) => Some(r.try_get::<Option<Vec<u8>>, _>("patch")?),
        })
    }
}

const WORKSPACE_COLS: &str =
    "seq, id, name, owner, repo_path, stack, image, writer, created_at, updated_at";
const CHECKPOINT_COLS: &str = "seq, id, workspace_id, name, stack, created_at";

fn stack_from(row: &sqlx::sqlite::SqliteRow, what: &str, id: &str) -> Result<Vec<String>> {
    let stack: String = row.try_get("stack")?;
    serde_json::from_str(&stack).map_err(|e| StoreError::Corrupt {
        what: format!("layers of {what} {}", bounded(id, 64)),
        why: e.to_string(),
    })
}

fn stack_json(stack: &[String]) -> String {
    serde_json::to_string(stack).unwrap_or_else(|_| "[]".into())
}

fn workspace_from(row: &sqlx::sqlite::SqliteRow) -> Result<Workspace> {
    let id: String = row.try_get("id")?;
    Ok(Workspace {
        seq: row.try_get("seq")?,
        name: row.try_get("name")?,
        owner: row.try_get("owner")?,
        repo_path: row.try_get("repo_path")?,
        stack: stack_from(row, "workspace", &id)?,
        image: row.try_get("image")?,
        writer: row.try_get("writer")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        id,
    })
}

fn checkpoint_from(row: &sqlx::sqlite::SqliteRow) -> Result<Checkpoint> {
    let id: String = row.try_get("id")?;
    Ok(Checkpoint {
        seq: row.try_get("seq")?,
        workspace_id: row.try_get("workspace_id")?,
        name: row.try_get("name")?,
        stack: stack_from(row, "checkpoint", &id)?,
        created_at: row.try_get("created_at")?,
        id,
    })
}

#[async_trait]
impl Workspaces for SqliteStore {
    async fn create_workspace(&self, w: &NewWorkspace) -> Result<Workspace> {
        let now = now_ms();
        let row = sqlx::query(&format!(
            "INSERT INTO workspaces (id, name, owner, repo_path, stack, image, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {WORKSPACE_COLS}"
        ))
        .bind(&w.id)
        .bind(&w.name)
        .bind(&w.owner)
        .bind(&w.repo_path)
        .bind(stack_json(&w.stack))
        .bind(&w.image)
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(r) => workspace_from(&r),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Taken(
                format!("the workspace name {}", bounded(&w.name, 64)),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_workspace(&self, id: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKSPACE_COLS} FROM workspaces WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(workspace_from).transpose()
    }

    async fn workspace_named(&self, owner: &str, name: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKSPACE_COLS} FROM workspaces WHERE owner = ? AND name = ?"
        ))
        .bind(owner)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(workspace_from).transpose()
    }

    async fn list_workspaces(&self, owner: Option<&str>) -> Result<Vec<Workspace>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKSPACE_COLS} FROM workspaces WHERE (?1 IS NULL OR owner = ?1) ORDER BY seq"
        ))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(workspace_from).collect()
    }

    async fn workspace_of_writer(&self, writer: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKSPACE_COLS} FROM workspaces WHERE writer = ?"
        ))
        .bind(writer)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(workspace_from).transpose()
    }

    async fn add_reader(&self, reader: &str, workspace_id: &str, stack: &[String]) -> Result<()> {
        let r = sqlx::query(
            "INSERT INTO workspace_readers (reader, workspace_id, stack, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(reader)
        .bind(workspace_id)
        .bind(stack_json(stack))
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Taken(
                format!("the reader {}", bounded(reader, 64)),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn reader_stack(&self, reader: &str) -> Result<Option<(String, Vec<String>)>> {
        let row = sqlx::query(
            "SELECT reader, workspace_id, stack FROM workspace_readers WHERE reader = ?",
        )
        .bind(reader)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some((
                r.try_get("workspace_id")?,
                stack_from(&r, "reader", reader)?,
            ))),
            None => Ok(None),
        }
    }

    async fn drop_reader(&self, reader: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM workspace_readers WHERE reader = ?")
            .bind(reader)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn list_readers(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT reader FROM workspace_readers ORDER BY created_at, reader")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get("reader").map_err(StoreError::from))
            .collect()
    }

    async fn take_workspace(&self, id: &str, writer: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE workspaces SET writer = ?, updated_at = ? WHERE id = ? AND writer IS NULL",
        )
        .bind(writer)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn release_workspace(
        &self,
        id: &str,
        writer: &str,
        stack: Option<&[String]>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE workspaces SET writer = NULL, stack = COALESCE(?, stack), updated_at = ? \
             WHERE id = ? AND writer = ?",
        )
        .bind(stack.map(stack_json))
        .bind(now_ms())
        .bind(id)
        .bind(writer)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_workspace_stack(&self, id: &str, stack: &[String]) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE workspaces SET stack = ?, updated_at = ? WHERE id = ? AND writer IS NULL",
        )
        .bind(stack_json(stack))
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn delete_workspace(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM workspaces WHERE id = ? AND writer IS NULL")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM checkpoints WHERE workspace_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn create_checkpoint(&self, c: &NewCheckpoint) -> Result<Checkpoint> {
        let row = sqlx::query(&format!(
            "INSERT INTO checkpoints (id, workspace_id, name, stack, created_at) \
             VALUES (?, ?, ?, ?, ?) RETURNING {CHECKPOINT_COLS}"
        ))
        .bind(&c.id)
        .bind(&c.workspace_id)
        .bind(&c.name)
        .bind(stack_json(&c.stack))
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(r) => checkpoint_from(&r),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Taken(
                format!("the checkpoint name {}", bounded(&c.name, 64)),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_checkpoint(&self, id: &str) -> Result<Option<Checkpoint>> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(checkpoint_from).transpose()
    }

    async fn checkpoint_named(&self, workspace_id: &str, name: &str) -> Result<Option<Checkpoint>> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE workspace_id = ? AND name = ?"
        ))
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(checkpoint_from).transpose()
    }

    async fn list_checkpoints(&self, workspace_id: &str) -> Result<Vec<Checkpoint>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE workspace_id = ? ORDER BY seq"
        ))
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(checkpoint_from).collect()
    }

    async fn delete_checkpoint(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM checkpoints WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn layers_in_use(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id, stack FROM workspaces UNION ALL SELECT id, stack FROM checkpoints \
             UNION ALL SELECT reader AS id, stack FROM workspace_readers",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut all = std::collections::BTreeSet::new();
        for r in &rows {
            let id: String = r.try_get("id")?;
            all.extend(stack_from(r, "workspace or checkpoint", &id)?);
        }
        Ok(all.into_iter().collect())
    }
}

#[async_trait]
impl Lifecycle for SqliteStore {
    async fn backup(&self, to: &Path) -> Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(to.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::new_job;

    #[tokio::test]
    async fn sqlite_passes_the_conformance_cases() {
        crate::conformance::run_all(|dir| {
            let db = dir.join("db.sqlite");
            async move { SqliteStore::open(&db).await.map(Store::new) }
        })
        .await;
    }

    /// A backup is a consistent copy that opens as a store; restore puts
    /// it in place and refuses what is not one, leaving the database as
    /// it was.
    #[tokio::test]
    async fn backups_open_and_restore_refuses_strangers() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("db.sqlite");
        let s = SqliteStore::open(&db).await.unwrap();
        s.create_job(&new_job("a")).await.unwrap();
        let bk = d.path().join("backup.sqlite");
        s.backup(&bk).await.unwrap();
        s.create_job(&new_job("b")).await.unwrap();
        s.close().await;
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"not a database").unwrap();
        let e = restore(&junk, &db).await.unwrap_err();
        assert!(e.contains("is not an AgentVM backup"), "{e}");
        let s = SqliteStore::open(&db).await.unwrap();
        assert!(s.get_job("b").await.unwrap().is_some(), "untouched");
        s.close().await;
        restore(&bk, &db).await.unwrap();
        let s = SqliteStore::open(&db).await.unwrap();
        assert!(s.get_job("a").await.unwrap().is_some());
        assert!(
            s.get_job("b").await.unwrap().is_none(),
            "the backup's state"
        );
        assert!(!d.path().join("db.sqlite.restore").exists());
    }

    /// Patches stored whole by an older version are split into parts by
    /// the migration (its data statements, replayed on such a row).
    #[tokio::test]
    async fn legacy_whole_patches_are_split_by_the_migration() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db.sqlite"))
            .await
            .unwrap();
        s.create_job(&new_job("old")).await.unwrap();
        let patch: Vec<u8> = (0..(PATCH_PART + 5)).map(|i| (i % 251) as u8).collect();
        sqlx::query("UPDATE jobs SET status = 'succeeded', patch = ? WHERE id = 'old'")
            .bind(&patch)
            .execute(&s.pool)
            .await
            .unwrap();
        let sql = include_str!("../migrations/0003_keys_network_and_patch_parts.sql");
        let data = &sql[sql.find("WITH RECURSIVE").unwrap_or(0)..];
        sqlx::raw_sql(data).execute(&s.pool).await.unwrap();
        assert_eq!(s.patch("old").await.ok().flatten().flatten(), Some(patch));
    }

    /// A network policy stored typed comes back equal; one that no longer
    /// parses is refused, not read as "none given" (the profile's policy,
    /// which may be wider).
    #[tokio::test]
    async fn stored_network_policies_are_parsed_or_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db.sqlite"))
            .await
            .unwrap();
        let mut j = new_job("n");
        j.network = Some(NetworkMode::parse("allow:api.example.com,10.0.0.1:8080").unwrap());
        s.create_job(&j).await.unwrap();
        assert_eq!(s.get_job("n").await.unwrap().unwrap().network, j.network);
        sqlx::query("UPDATE jobs SET network = 'allow:' WHERE id = 'n'")
            .execute(&s.pool)
            .await
            .unwrap();
        let e = s.get_job("n").await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("network policy of a job"), "{e}");
    }
}
