//! Scheduling and running jobs.
//!
//! A FIFO queue of bounded length feeds a fixed number of workers. Each job
//! runs in its own `agentvm run` process (the jailer pattern: the sandbox is
//! set up by a fresh single-threaded process, never by forking this
//! multi-threaded server). Output is stored and fanned out as it arrives; the
//! patch and result are stored when the job ends.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_proto::{
    units, EgressLine, EgressRecord, Limits, NetworkMode, Phase, Repo, RunRequest, RunResult,
    Unrecorded,
};
use agentvm_store::{Finish, Job, JobStatus, LogChunk, NewJob, Store};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, Notify};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::redact::Redactor;

mod record;
mod request;
mod session;

pub use session::{SessionLimits as SessionAsk, SessionSandbox};

/// A started runner: the process, the read end of its egress event pipe,
/// and the job's directory.
struct Spawned {
    child: tokio::process::Child,
    events: Option<std::os::fd::OwnedFd>,
    dir: PathBuf,
}

/// Where the runner inherits the repo directory the server checked.
const REPO_FD: i32 = 3;
/// Where the runner inherits the write end of the egress event pipe.
const EVENTS_FD: i32 = 4;

/// An event of a running job, for followers.
#[derive(Debug, Clone)]
pub enum Live {
    /// Output (stream "stdout" or "stderr") or an egress decision (stream
    /// "egress", one JSON record), stored before it is sent.
    Chunk(LogChunk),
    End(JobStatus),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} jobs waiting)")]
    QueueFull(usize),
    #[error("the server is shutting down")]
    Draining,
    #[error(transparent)]
    Store(#[from] agentvm_store::StoreError),
}

struct Running {
    pid: i32,
    cancelled: Arc<AtomicBool>,
    interrupted: Arc<AtomicBool>,
}

pub struct Runner {
    pub store: Store,
    cfg: Arc<Config>,
    redactor: Redactor,
    metrics: Arc<Metrics>,
    queue: Mutex<VecDeque<String>>,
    depth: AtomicUsize,
    wake: Notify,
    running: Mutex<HashMap<String, Running>>,
    live: Mutex<HashMap<String, broadcast::Sender<Live>>>,
    finished: broadcast::Sender<String>,
    draining: AtomicBool,
    /// Jobs a worker has taken, from before they are marked running until
    /// their end is recorded (the `running` map only knows spawned ones).
    active: AtomicUsize,
    /// The grace period is over: start no more sandboxes.
    stopping: AtomicBool,
    /// Layers jobs over workspaces are making now (not yet on a stack).
    making: Mutex<std::collections::HashSet<String>>,
    /// Held while the set of layers in use changes or is read to remove
    /// the rest: a job starting over a stack, a job's end putting its
    /// layer on one, a fork, and a sweep.
    pub layers_lock: tokio::sync::Mutex<()>,
}

/// A job over a workspace: the stack it starts from, the layer it makes.
pub struct Over {
    /// The workspace; for a reader, with the stack it reads.
    pub ws: agentvm_store::Workspace,
    /// The layer a writer's changes become (empty for a reader).
    pub layer: String,
    /// Reads beside the writer: nothing it does is kept.
    pub reader: bool,
    /// The most its run may write, when a quota sets it (what the
    /// workspace's and the server's quotas have left).
    pub disk: Option<Quota>,
}

/// What a workspace's quotas leave for one run, and why, in words.
#[derive(Debug, Clone)]
pub struct Quota {
    pub left: u64,
    pub why: String,
}

/// Less than this left: no run is started at all.
pub const QUOTA_FLOOR: u64 = 1 << 20;
/// The data directory's filesystem always keeps this much free.
const DISK_RESERVE: u64 = 1 << 30;

/// Bytes the manifests of `layers` say they hold.
pub(crate) fn layers_bytes<'a>(
    store: &std::path::Path,
    layers: impl IntoIterator<Item = &'a String>,
) -> u64 {
    layers
        .into_iter()
        .filter_map(|l| agentvm_workspace::layer::size(store, l).ok())
        .map(|m| m.bytes)
        .sum()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A process's start time in clock ticks since boot (field 22 of
/// /proc/PID/stat), to tell a pid from a later reuse of it.
pub fn start_time(pid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

impl Runner {
    pub fn new(store: Store, cfg: Arc<Config>, metrics: Arc<Metrics>) -> Arc<Runner> {
        let (finished, _) = broadcast::channel(1024);
        let redactor = Redactor::new(cfg.secrets.iter().map(|(_, v)| v.as_str()));
        Arc::new(Runner {
            store,
            redactor,
            cfg,
            metrics,
            queue: Mutex::new(VecDeque::new()),
            depth: AtomicUsize::new(0),
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            finished,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            making: Mutex::new(Default::default()),
            layers_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Layers being made by running jobs (a sweep must leave them).
    pub fn layers_being_made(&self) -> Vec<String> {
        lock(&self.making).iter().cloned().collect()
    }

    fn layer_store(&self) -> PathBuf {
        self.cfg.data_dir.join("layers")
    }

    /// A job over a workspace has ended: what it made goes on the stack
    /// when it ran (succeeded, failed, timed out) and changed something;
    /// otherwise it is dropped. A stack past [`SQUASH_AT`] has its oldest
    /// layers squashed into one first, while the job still holds the
    /// workspace, so the new stack is written in the same update that lets
    /// go of it (no other writer, restore or sweep can come between).
    async fn settle(&self, job: &str, over: &Over, status: JobStatus) {
        let ran = matches!(
            status,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::TimedOut
        );
        self.settle_writer(job, over, ran).await
    }

    /// [`Runner::settle`] for any writer (a job or a session): `ran` says
    /// whether what it made is kept.
    pub(crate) async fn settle_writer(&self, job: &str, over: &Over, ran: bool) {
        use crate::service::workspaces::SQUASH_AT;
        if over.reader {
            // nothing it made is kept; its stack may be swept once unread
            if let Err(e) = self.store.drop_reader(job).await {
                tracing::warn!(job, error = %e, "forgetting a workspace's reader failed; done at the next start");
            }
            return;
        }
        let store = self.layer_store();
        let made = agentvm_workspace::layer::size(&store, &over.layer).ok();
        let keep = ran && made.is_some_and(|m| m.entries > 0);
        let mut stack: Option<Vec<String>> = keep.then(|| {
            std::iter::once(over.layer.clone())
                .chain(over.ws.stack.iter().cloned())
                .collect()
        });
        let mut squashed = None;
        if let Some(s) = stack.as_ref().filter(|s| s.len() > SQUASH_AT) {
            match self.squash_old(s).await {
                Some((next, id)) => {
                    stack = Some(next);
                    squashed = Some(id);
                }
                None if s.len() > agentvm_proto::run::MAX_STACK => {
                    // never a stack no sandbox can mount: this job's
                    // changes are dropped, and its record says nothing of
                    // it, so say it here
                    tracing::error!(job, workspace = %over.ws.id, "the workspace's stack is full and could not be squashed; this job's changes are not kept");
                    stack = None;
                }
                None => {}
            }
        }
        let _named = self.layers_lock.lock().await;
        match self
            .store
            .release_workspace(&over.ws.id, job, stack.as_deref())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(job, workspace = %over.ws.id, "the job did not hold its workspace at its end")
            }
            Err(e) => {
                tracing::error!(job, workspace = %over.ws.id, error = %e, "letting go of a workspace failed")
            }
        }
        if stack.is_none() {
            ok_or_drop(&store, &over.layer);
        }
        let mut making = lock(&self.making);
        making.remove(&over.layer);
        if let Some(id) = &squashed {
            making.remove(id);
        }
    }

    /// The oldest layers of `stack` squashed into one (hard links): the
    /// new stack and the new layer's id, or `None` when it failed.
    async fn squash_old(&self, stack: &[String]) -> Option<(Vec<String>, String)> {
        let keep = crate::service::workspaces::SQUASH_AT / 2;
        let (young, old) = stack.split_at(keep.min(stack.len()));
        let id = crate::service::new_id("sq").replace('_', "-");
        lock(&self.making).insert(id.clone());
        let (store, old, id2) = (self.layer_store(), old.to_vec(), id.clone());
        let made = tokio::task::spawn_blocking(move || {
            agentvm_workspace::layer::squash(&store, &old, &id2)
        })
        .await;
        if matches!(made, Ok(Ok(_))) {
            let mut next: Vec<String> = young.to_vec();
            next.push(id.clone());
            Some((next, id))
        } else {
            tracing::warn!("squashing a deep stack failed; it stays as it is");
            ok_or_drop(&self.layer_store(), &id);
            lock(&self.making).remove(&id);
            None
        }
    }

    /// Let go of the workspace job `id` holds, if it holds one and has
    /// ended (cancelled while queued, or never started): nothing it made
    /// is kept.
    pub async fn release_if_ended(&self, id: &str) {
        if matches!(self.store.reader_stack(id).await, Ok(Some(_)))
            && matches!(self.writer_ended(id).await, Ok(true))
        {
            let _ = self.store.drop_reader(id).await;
        }
        let Ok(Some(ws)) = self.store.workspace_of_writer(id).await else {
            return;
        };
        if matches!(self.writer_ended(id).await, Ok(true)) {
            let _ = self.store.release_workspace(&ws.id, id, None).await;
        }
    }

    /// Has the writer `id` (a job, or a session: `ses_...`) ended, or is
    /// it gone?
    pub async fn writer_ended(&self, id: &str) -> Result<bool, agentvm_store::StoreError> {
        if id.starts_with("ses_") {
            return Ok(match self.store.get_session(id).await? {
                Some(s) => s.status != agentvm_store::SessionStatus::Running,
                None => true,
            });
        }
        Ok(match self.store.get_job(id).await? {
            Some(j) => j.status.is_final(),
            None => true,
        })
    }

    /// A writer (a session) starting over workspace `ws` it holds: the
    /// stack read and the new layer's id claimed under the sweep's lock.
    pub(crate) async fn over_for(
        &self,
        writer: &str,
    ) -> Result<Option<Over>, agentvm_store::StoreError> {
        let _named = self.layers_lock.lock().await;
        let Some(ws) = self.store.workspace_of_writer(writer).await? else {
            return self.reader_over(writer).await;
        };
        let disk = self.quota_left(&ws).await?;
        let layer = crate::service::new_id("l").replace('_', "-");
        lock(&self.making).insert(layer.clone());
        Ok(Some(Over {
            ws,
            layer,
            reader: false,
            disk,
        }))
    }

    /// A reader's workspace with the stack it reads (the workspace as it
    /// was when the reader was accepted, even if deleted since).
    async fn reader_over(&self, reader: &str) -> Result<Option<Over>, agentvm_store::StoreError> {
        let Some((ws_id, stack)) = self.store.reader_stack(reader).await? else {
            return Ok(None);
        };
        let ws = match self.store.get_workspace(&ws_id).await? {
            Some(w) => agentvm_store::Workspace { stack, ..w },
            None => agentvm_store::Workspace {
                seq: 0,
                id: ws_id.clone(),
                name: ws_id,
                owner: String::new(),
                repo_path: String::new(),
                stack,
                image: None,
                writer: None,
                created_at: 0,
                updated_at: 0,
            },
        };
        Ok(Some(Over {
            ws,
            layer: String::new(),
            reader: true,
            disk: None,
        }))
    }

    /// Bytes the workspace's layers (its checkpoints' too) hold.
    pub(crate) async fn workspace_used(
        &self,
        ws: &agentvm_store::Workspace,
    ) -> Result<u64, agentvm_store::StoreError> {
        let mut mine: std::collections::BTreeSet<String> = ws.stack.iter().cloned().collect();
        for c in self.store.list_checkpoints(&ws.id).await? {
            mine.extend(c.stack);
        }
        Ok(layers_bytes(&self.layer_store(), &mine))
    }

    /// What the quotas leave for a run over `ws`: the workspace's own, the
    /// server's total and the data directory's free space (less a
    /// reserve), the least of them. `None`: no quota binds.
    pub(crate) async fn quota_left(
        &self,
        ws: &agentvm_store::Workspace,
    ) -> Result<Option<Quota>, agentvm_store::StoreError> {
        let mut least: Option<Quota> = None;
        let mut consider = |left: u64, why: String| {
            if least.as_ref().is_none_or(|q| left < q.left) {
                least = Some(Quota { left, why });
            }
        };
        if let Some(q) = self.cfg.workspace_quota {
            let used = self.workspace_used(ws).await?;
            consider(
                q.saturating_sub(used),
                format!(
                    "workspace {} holds {used} bytes of its quota of {q} (--workspace-quota)",
                    ws.name
                ),
            );
        }
        if let Some(t) = self.cfg.workspaces_total {
            let all = self.store.layers_in_use().await?;
            let used = layers_bytes(&self.layer_store(), &all);
            consider(
                t.saturating_sub(used),
                format!(
                    "all workspaces hold {used} bytes of the server's {t} (--workspaces-total)"
                ),
            );
        }
        if let Ok(st) = nix::sys::statvfs::statvfs(&self.cfg.data_dir) {
            let free = st.blocks_available().saturating_mul(st.fragment_size());
            consider(
                free.saturating_sub(DISK_RESERVE),
                format!(
                    "the data directory's disk has {free} bytes free, of which {DISK_RESERVE} stay free"
                ),
            );
        }
        Ok(least)
    }

    /// A workspace held by a job that has ended (or is gone) is let go,
    /// its stack as before that job: what the job made is not on it.
    async fn free_workspaces(&self) -> Result<usize, agentvm_store::StoreError> {
        let mut freed = 0;
        for r in self.store.list_readers().await? {
            if self.writer_ended(&r).await? && self.store.drop_reader(&r).await? {
                freed += 1;
            }
        }
        for w in self.store.list_workspaces(None).await? {
            let Some(job) = &w.writer else { continue };
            if self.writer_ended(job).await?
                && self.store.release_workspace(&w.id, job, None).await?
            {
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// After a crash or restart: running jobs are interrupted (their
    /// sandboxes killed if any survived), queued jobs are queued again.
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), agentvm_store::StoreError> {
        let stale = self
            .store
            .interrupt_running("interrupted: the server stopped while the job was running")
            .await?;
        for j in &stale {
            if let (Some(pid), Some(start)) = (j.supervisor_pid, j.supervisor_start) {
                let pid = pid as i32;
                if start_time(pid) == Some(start) {
                    // SAFETY: kill with a pid we recorded and just verified.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = std::fs::remove_dir_all(self.job_dir(&j.id));
        }
        // sessions live only as long as the server that runs them: each
        // still marked running was interrupted (its recording stays)
        let lost = self
            .store
            .interrupt_sessions("interrupted: the server stopped while the session was running")
            .await?;
        for s in &lost {
            if let (Some(pid), Some(start)) = (s.supervisor_pid, s.supervisor_start) {
                let pid = pid as i32;
                if start_time(pid) == Some(start) {
                    // SAFETY: kill with a pid we recorded and just verified.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if !lost.is_empty() {
            tracing::info!(
                sessions = lost.len(),
                "sessions interrupted by the previous stop"
            );
        }
        // after both: a hold of a job or session that was interrupted
        let freed = self.free_workspaces().await?;
        if freed > 0 {
            tracing::info!(
                workspaces = freed,
                "workspaces let go of by jobs and sessions the previous stop interrupted (as before them)"
            );
        }
        let queued = self.store.queued_jobs().await?;
        {
            let mut q = lock(&self.queue);
            for j in &queued {
                q.push_back(j.id.clone());
            }
        }
        self.depth.fetch_add(queued.len(), Ordering::SeqCst);
        self.metrics.queue_depth.set(self.depth() as i64);
        self.wake.notify_waiters();
        Ok((stale.len(), queued.len()))
    }

    pub fn start_workers(self: &Arc<Self>) {
        for _ in 0..self.cfg.max_concurrent.max(1) {
            let me = self.clone();
            tokio::spawn(async move { me.worker().await });
        }
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    pub fn running_count(&self) -> usize {
        lock(&self.running).len()
    }

    async fn worker(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            let next = lock(&self.queue).pop_front();
            match next {
                Some(id) => {
                    self.depth.fetch_sub(1, Ordering::SeqCst);
                    self.metrics.queue_depth.set(self.depth() as i64);
                    // count the job before looking at `draining`: shutdown
                    // sets `draining` before it reads `active`, so either it
                    // waits for this job or this job stays queued
                    self.active.fetch_add(1, Ordering::SeqCst);
                    if self.draining.load(Ordering::SeqCst) {
                        self.active.fetch_sub(1, Ordering::SeqCst);
                        // leave it queued in the store for the next start
                        continue;
                    }
                    self.run(&id).await;
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    if lock(&self.queue).front().is_some() {
                        self.wake.notify_one();
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Accept a job: stored as queued, then queued here.
    pub async fn submit(&self, new: NewJob) -> Result<Job, SubmitError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        let d = self.depth.fetch_add(1, Ordering::SeqCst);
        if d >= self.cfg.max_queue {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(d));
        }
        let job = match self.store.create_job(&new).await {
            Ok(j) => j,
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                return Err(e.into());
            }
        };
        lock(&self.queue).push_back(job.id.clone());
        self.metrics.queue_depth.set(self.depth() as i64);
        self.wake.notify_one();
        Ok(job)
    }

    /// The redactor every job's output passes through.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Subscribe to a job's live events (None when it is not running).
    pub fn follow(&self, id: &str) -> Option<broadcast::Receiver<Live>> {
        lock(&self.live).get(id).map(|s| s.subscribe())
    }

    /// Wait until job `id` has ended; returns it.
    pub async fn wait(&self, id: &str) -> Result<Option<Job>, agentvm_store::StoreError> {
        let mut rx = self.finished.subscribe();
        loop {
            let j = self.store.get_job(id).await?;
            match &j {
                Some(job) if !job.status.is_final() => {}
                _ => return Ok(j),
            }
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Ok(done)) if done == id => {}
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(j),
            }
        }
    }

    /// Cancel a queued or running job. Ok(false) when it had already ended.
    /// A running job gets SIGTERM (forwarded to the command), then SIGKILL
    /// after 5 seconds.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<bool, agentvm_store::StoreError> {
        let running = lock(&self.running)
            .get(id)
            .map(|r| (r.pid, r.cancelled.clone()));
        if let Some((pid, flag)) = running {
            flag.store(true, Ordering::SeqCst);
            // SAFETY: signalling our own child, recorded when spawned.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let me = self.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if lock(&me.running).get(&id).map(|r| r.pid) == Some(pid) {
                    // SAFETY: still our running child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            });
            return Ok(true);
        }
        let f = Finish {
            status: JobStatus::Cancelled,
            exit_code: None,
            error: Some("cancelled before it started".into()),
            result: None,
            patch: None,
        };
        let done = self.store.finish_job(id, &f).await?;
        if done {
            self.release_if_ended(id).await;
            let _ = self.finished.send(id.to_string());
        }
        Ok(done)
    }

    /// Stop taking work; give running jobs `grace`, then stop them and
    /// record them as interrupted. Queued jobs stay queued for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stopping.store(true, Ordering::SeqCst);
        let left: Vec<(i32, Arc<AtomicBool>)> = lock(&self.running)
            .values()
            .map(|r| (r.pid, r.interrupted.clone()))
            .collect();
        for (pid, flag) in &left {
            flag.store(true, Ordering::SeqCst);
            // SAFETY: our own child.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let until = Instant::now() + Duration::from_secs(10);
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("jobs").join(id)
    }

    async fn run(&self, id: &str) {
        match self.store.mark_running(id).await {
            Ok(true) => {}
            _ => {
                // cancelled while queued, or the store failed
                self.release_if_ended(id).await;
                return;
            }
        }
        let Ok(Some(job)) = self.store.get_job(id).await else {
            return;
        };
        let (tx, _) = broadcast::channel(256);
        lock(&self.live).insert(id.to_string(), tx.clone());
        // over a workspace (held for this job when it was accepted): its
        // stack read, and the new layer's id claimed, under the lock a
        // sweep takes
        let over = self.over_for(id).await;
        let started = Instant::now();
        let finish = match &over {
            Ok(o) => self.execute(&job, &tx, o.as_ref()).await,
            // never run a workspace's job over the bare repo
            Err(e) => Finish {
                status: JobStatus::Failed,
                exit_code: None,
                error: Some(format!(
                    "the job's workspace could not be read ({e}); nothing ran"
                )),
                result: None,
                patch: None,
            },
        };
        let over = over.ok().flatten();
        if let Some(o) = &over {
            self.settle(id, o, finish.status).await;
        }
        self.metrics
            .job_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(ms) = finish
            .result
            .as_ref()
            .and_then(|r| r.get("setup_ms"))
            .and_then(|v| v.as_u64())
        {
            self.metrics.sandbox_start.observe(ms as f64 / 1000.0);
        }
        let finish = match self.store.finish_job(id, &finish).await {
            Ok(_) => finish,
            Err(e) => {
                // never leave a job "running": record its end without what
                // could not be stored
                tracing::error!(job = id, error = %e, "recording the end of a job failed");
                let bare = Finish {
                    status: JobStatus::Failed,
                    exit_code: finish.exit_code,
                    error: Some(format!(
                        "the server could not record this job's result and patch ({e}); its output is kept"
                    )),
                    result: None,
                    patch: None,
                };
                if let Err(e) = self.store.finish_job(id, &bare).await {
                    tracing::error!(job = id, error = %e, "recording the end of a job failed twice");
                }
                bare
            }
        };
        let _ = std::fs::remove_dir_all(self.job_dir(id));
        // whatever path the end took, the job holds no workspace now
        self.release_if_ended(id).await;
        lock(&self.running).remove(id);
        let _ = tx.send(Live::End(finish.status));
        lock(&self.live).remove(id);
        let _ = self.finished.send(id.to_string());
    }

    async fn execute(
        &self,
        job: &Job,
        tx: &broadcast::Sender<Live>,
        over: Option<&Over>,
    ) -> Finish {
        let Spawned {
            mut child,
            events,
            dir,
        } = match self.spawn(job, over).await {
            Ok(s) => s,
            Err(finish) => return finish,
        };
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let cancelled = Arc::new(AtomicBool::new(false));
        let interrupted = Arc::new(AtomicBool::new(false));
        lock(&self.running).insert(
            job.id.clone(),
            Running {
                pid,
                cancelled: cancelled.clone(),
                interrupted: interrupted.clone(),
            },
        );
        if let Some(start) = start_time(pid) {
            let _ = self
                .store
                .set_supervisor(&job.id, i64::from(pid), start)
                .await;
        }
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let (truncated, audited) = self.pump(job, tx, out, err, events).await;
        let status = child.wait().await;
        let quota = over
            .and_then(|o| o.disk.as_ref())
            .map(|q| (q.left, q.why.as_str()));
        self.conclude(
            job,
            &dir,
            status,
            &cancelled,
            &interrupted,
            (truncated, quota),
            audited,
        )
        .await
    }
}

/// Remove a layer that was made but will not be used.
fn ok_or_drop(store: &std::path::Path, id: &str) {
    if let Err(e) = agentvm_workspace::layer::remove(store, id) {
        tracing::warn!(layer = id, error = %e, "removing an unused layer failed; a sweep will");
    }
}
