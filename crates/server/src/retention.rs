//! Recording retention (`--recording-retention DAYS`, the old system's
//! cleanup timer): once an hour, the recordings of sessions that ended
//! more than DAYS ago are removed, and so is the stored output of jobs
//! that finished more than DAYS ago (a job's recording is built from its
//! output, so that is its recording). Records, results and patches stay.
//! Each removal is one audit row (`recording.remove`, no key: the server
//! did it).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentvm_store::{now_ms, SessionStatus, Store};

use crate::service::Service;

/// How often retention runs.
pub const EVERY: Duration = Duration::from_secs(3600);
/// Jobs handled per store call (the sweep goes on until none is left).
const BATCH: i64 = 100;

/// Run retention forever (from a minute after start, then hourly), when a
/// retention period is set.
pub async fn run(svc: Arc<Service>) {
    let Some(days) = svc.cfg.recording_retention_days else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let (s, j) = sweep(&svc.store, &svc.runner.sessions_root(), days, now_ms()).await;
        if s + j > 0 {
            tracing::info!(sessions = s, jobs = j, days, "removed old recordings");
        }
    }
}

/// One pass at time `now` (ms): returns (session recordings, job outputs)
/// removed.
pub async fn sweep(store: &Store, sessions_dir: &Path, days: u32, now: i64) -> (usize, usize) {
    let before = now.saturating_sub(i64::from(days) * 86_400_000);
    let detail = format!("older than the retention period ({days} days)");
    let mut sessions = 0;
    if let Ok(dir) = std::fs::read_dir(sessions_dir) {
        for e in dir.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let rec = e.path().join("recording.cast");
            if !rec.exists() {
                continue;
            }
            let old = match store.get_session(&id).await {
                Ok(Some(s)) => {
                    s.status != SessionStatus::Running && s.ended_at.is_some_and(|t| t < before)
                }
                // a directory with no record (what a deleted session's
                // removal missed): by the file's own age
                Ok(None) => std::fs::metadata(&rec)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .is_some_and(|t| (t.as_millis() as i64) < before),
                Err(_) => false,
            };
            if old && std::fs::remove_file(&rec).is_ok() {
                sessions += 1;
                let _ = store
                    .audit(
                        None,
                        "recording.remove",
                        Some(&id),
                        None,
                        "ok",
                        Some(&detail),
                    )
                    .await;
            }
        }
    }
    let mut jobs = 0;
    loop {
        let ids = match store.drop_logs_before(before, BATCH).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "recording retention: removing old job output failed");
                break;
            }
        };
        for id in &ids {
            let _ = store
                .audit(
                    None,
                    "recording.remove",
                    Some(id),
                    None,
                    "ok",
                    Some(&detail),
                )
                .await;
        }
        jobs += ids.len();
        if (ids.len() as i64) < BATCH {
            break;
        }
    }
    (sessions, jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_store::{Finish, JobStatus, NewJob, NewSession};

    #[tokio::test]
    async fn old_recordings_go_with_an_audit_row_and_records_stay() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("db")).await.unwrap();
        let dir = t.path().join("sessions");
        let session = |id: &str| NewSession {
            id: id.into(),
            name: id.into(),
            owner: "k".into(),
            agent: None,
            command: vec!["bash".into()],
            repo_path: None,
            network: None,
            idle_timeout_s: 60,
        };
        for id in ["ended", "live", "gone"] {
            if id != "gone" {
                store.create_session(&session(id)).await.unwrap();
            }
            std::fs::create_dir_all(dir.join(id)).unwrap();
            std::fs::write(dir.join(id).join("recording.cast"), "{}\n").unwrap();
        }
        store
            .end_session("ended", SessionStatus::Exited, Some(0), None)
            .await
            .unwrap();
        let job = store
            .create_job(&NewJob {
                id: "j".into(),
                agent: "shell".into(),
                prompt: "p".into(),
                repo_path: "/r".into(),
                timeout_s: 1,
                extra_args: vec![],
                key_id: None,
                network: None,
                image: None,
            })
            .await
            .unwrap();
        store.mark_running("j").await.unwrap();
        store
            .append_log(job.seq, 1, "stdout", b"out")
            .await
            .unwrap();
        let f = Finish {
            status: JobStatus::Succeeded,
            exit_code: Some(0),
            error: None,
            result: None,
            patch: Some(b"p".to_vec()),
        };
        store.finish_job("j", &f).await.unwrap();
        // within the period: nothing goes
        assert_eq!(sweep(&store, &dir, 1, now_ms()).await, (0, 0));
        assert!(dir.join("ended/recording.cast").exists());
        // two days on: the ended session's and the orphan's recordings and
        // the job's output go; the live session's stays
        let later = now_ms() + 2 * 86_400_000;
        assert_eq!(sweep(&store, &dir, 1, later).await, (2, 1));
        assert!(!dir.join("ended/recording.cast").exists());
        assert!(!dir.join("gone/recording.cast").exists());
        assert!(dir.join("live/recording.cast").exists());
        assert!(store.logs(job.seq, 0).await.unwrap().is_empty());
        assert!(
            store.get_job("j").await.unwrap().is_some(),
            "the job's record stays"
        );
        assert_eq!(
            store.patch("j").await.unwrap().flatten(),
            Some(b"p".to_vec())
        );
        assert!(store.get_session("ended").await.unwrap().is_some());
        let audit = store
            .list_audit(None, 10, &agentvm_store::AuditFilter::default())
            .await
            .unwrap();
        let removed: Vec<_> = audit
            .iter()
            .filter(|e| e.action == "recording.remove")
            .filter_map(|e| e.target.clone())
            .collect();
        assert_eq!(removed.len(), 3, "{removed:?}");
        // and again: nothing left to remove
        assert_eq!(sweep(&store, &dir, 1, later).await, (0, 0));
    }
}
