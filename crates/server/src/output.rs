//! A job's output as every front door reads it: stored chunks a page at a
//! time ([`Pages`]), and one "stored, then live" stream
//! ([`stored_then_live`]) that server-sent events consume today and a
//! WebSocket or SSH door can consume unchanged.

use std::sync::Arc;

use agentvm_store::{Job, LogChunk, Store, Streams};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::runner::{Live, Runner};

/// Output chunks are "stdout" and "stderr"; "egress" ones are decisions.
pub fn is_output(c: &LogChunk) -> bool {
    c.stream == "stdout" || c.stream == "stderr"
}

/// Chunks read from the store at a time (each at most 32 KiB).
const PAGE: i64 = 32;

/// A job's stored chunks, a page at a time.
pub struct Pages<'a> {
    store: &'a Store,
    job_seq: i64,
    after: i64,
    streams: Streams<'a>,
}

impl<'a> Pages<'a> {
    pub fn new(store: &'a Store, job_seq: i64, after: i64, streams: Streams<'a>) -> Self {
        Pages {
            store,
            job_seq,
            after,
            streams,
        }
    }

    /// The next page, `None` past the last chunk stored so far (a store
    /// error ends the pages too: it is logged, and the reader sees the
    /// stream end).
    pub async fn next(&mut self) -> Option<Vec<LogChunk>> {
        match self
            .store
            .logs_page(self.job_seq, self.after, self.streams, PAGE)
            .await
        {
            Ok(p) if !p.is_empty() => {
                self.after = p.last().map(|c| c.seq).unwrap_or(self.after);
                Some(p)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "reading a job's output failed");
                None
            }
        }
    }
}

/// One piece of the stream.
#[derive(Debug, Clone)]
pub enum Item {
    /// A chunk, in sequence order, each exactly once.
    Chunk(LogChunk),
    /// The job ended with this status ("deleted" if it went away).
    End(String),
}

/// Every chunk stored after `after`, then the live ones as they come, then
/// [`Item::End`]. A task of its own fills a channel of a few items: when
/// the reader stops reading, the task waits, holding one page at most;
/// when the reader goes away, the task ends. `guard` (a stream slot) is
/// held until then.
pub fn stored_then_live<G: Send + 'static>(
    store: Store,
    runner: Arc<Runner>,
    job: Job,
    after: i64,
    guard: G,
) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let _guard = guard;
        let _ = produce(&store, &runner, &job, after, &tx).await;
    });
    rx
}

/// The reader went away.
struct Gone;

/// Everything stored after `last`, page by page; the new `last`.
async fn catch_up(
    store: &Store,
    job: &Job,
    mut last: i64,
    tx: &mpsc::Sender<Item>,
) -> Result<i64, Gone> {
    let mut pages = Pages::new(store, job.seq, last, Streams::All);
    while let Some(page) = pages.next().await {
        for c in page {
            last = c.seq;
            tx.send(Item::Chunk(c)).await.map_err(|_| Gone)?;
        }
    }
    Ok(last)
}

async fn produce(
    store: &Store,
    runner: &Runner,
    job: &Job,
    after: i64,
    tx: &mpsc::Sender<Item>,
) -> Result<(), Gone> {
    let end = |s: &str| Item::End(s.to_string());
    // subscribe before reading the store, so nothing falls between
    let mut live = runner.follow(&job.id);
    let mut last = catch_up(store, job, after, tx).await?;
    loop {
        match live.as_mut() {
            Some(rx) => match rx.recv().await {
                Ok(Live::Chunk(c)) if c.seq == last + 1 => {
                    last = c.seq;
                    tx.send(Item::Chunk(c)).await.map_err(|_| Gone)?;
                }
                // a gap (every chunk is stored before it is sent)
                Ok(Live::Chunk(c)) if c.seq > last => last = catch_up(store, job, last, tx).await?,
                Ok(Live::Chunk(_)) => {}
                Ok(Live::End(s)) => {
                    catch_up(store, job, last, tx).await?;
                    tx.send(end(s.as_str())).await.map_err(|_| Gone)?;
                    return Ok(());
                }
                // lagged behind the live channel: the store has it all
                Err(RecvError::Lagged(_)) => last = catch_up(store, job, last, tx).await?,
                Err(RecvError::Closed) => live = None,
            },
            None => {
                // not running (yet, or any more): look at the store
                let now = store.get_job(&job.id).await.map_err(|_| Gone)?;
                last = catch_up(store, job, last, tx).await?;
                match now {
                    Some(j) if j.status.is_final() => {
                        catch_up(store, job, last, tx).await?;
                        tx.send(end(j.status.as_str())).await.map_err(|_| Gone)?;
                        return Ok(());
                    }
                    None => {
                        tx.send(end("deleted")).await.map_err(|_| Gone)?;
                        return Ok(());
                    }
                    Some(_) => {
                        live = runner.follow(&job.id);
                        if live.is_none() {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_store::{Finish, JobStatus, NewJob};

    fn config(dir: &std::path::Path) -> crate::config::Config {
        crate::config::Config {
            listen: ([127, 0, 0, 1], 0).into(),
            data_dir: dir.to_path_buf(),
            allowed_roots: Vec::new(),
            api_key_file: None,
            tls_cert: None,
            tls_key: None,
            max_concurrent: 1,
            max_queue: 1,
            body_limit: 1 << 20,
            max_output: 1 << 20,
            max_patch: 1 << 20,
            workspace_quota: None,
            workspaces_total: None,
            egress_record_limit: 10,
            rate_limit: 60,
            shutdown_grace_s: 1,
            agents: Default::default(),
            sandbox_bin: "/nonexistent".into(),
            cgroup_parent: None,
            secrets: Vec::new(),
            sessions: crate::config::SessionLimits {
                max_total: 1,
                max_per_key: 1,
                idle_timeout_s: 60,
                max_recording: 1 << 20,
            },
            recording_retention_days: None,
            ssh_listen: None,
            ssh_authorized_keys: None,
        }
    }

    async fn collect(mut rx: mpsc::Receiver<Item>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(i) = rx.recv().await {
            out.push(match i {
                Item::Chunk(c) => format!(
                    "{} {} {}",
                    c.seq,
                    c.stream,
                    String::from_utf8_lossy(&c.data)
                ),
                Item::End(s) => format!("end {s}"),
            });
        }
        out
    }

    /// Without root or a sandbox: a finished job's stream is every stored
    /// chunk after the cursor, in order, then its end; a deleted job ends
    /// as "deleted".
    #[tokio::test]
    async fn stored_then_live_replays_from_the_cursor_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let runner = Runner::new(
            store.clone(),
            Arc::new(config(dir.path())),
            Arc::new(crate::metrics::Metrics::new()),
        );
        let job = store
            .create_job(&NewJob {
                id: "j1".into(),
                agent: "shell".into(),
                prompt: "p".into(),
                repo_path: "/r".into(),
                timeout_s: 10,
                extra_args: Vec::new(),
                key_id: None,
                network: None,
                image: None,
            })
            .await
            .unwrap();
        for (seq, stream, data) in [(1, "stdout", "a"), (2, "egress", "{}"), (3, "stderr", "b")] {
            store
                .append_log(job.seq, seq, stream, data.as_bytes())
                .await
                .unwrap();
        }
        assert!(store.mark_running("j1").await.unwrap());
        let done = Finish {
            status: JobStatus::Succeeded,
            exit_code: Some(0),
            error: None,
            result: None,
            patch: None,
        };
        store.finish_job("j1", &done).await.unwrap();
        let all = collect(stored_then_live(
            store.clone(),
            runner.clone(),
            job.clone(),
            0,
            (),
        ))
        .await;
        assert_eq!(
            all,
            ["1 stdout a", "2 egress {}", "3 stderr b", "end succeeded"]
        );
        let rest = collect(stored_then_live(
            store.clone(),
            runner.clone(),
            job.clone(),
            2,
            (),
        ))
        .await;
        assert_eq!(rest, ["3 stderr b", "end succeeded"]);
        store.delete_job("j1").await.unwrap();
        let gone = collect(stored_then_live(store.clone(), runner, job, 3, ())).await;
        assert_eq!(gone, ["end deleted"]);
    }
}
