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
        })
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

    /// Open the job's repo and check that the opened directory lies inside
    /// an allowed root.
    fn open_repo(&self, path: &str) -> Result<std::os::fd::OwnedFd, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let gone =
            || "repo_path is gone or no longer inside an allowed root; nothing ran".to_string();
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|_| gone())?;
        let real = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dir)
        ))
        .map_err(|_| gone())?;
        let inside = self
            .cfg
            .allowed_roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|root| real.starts_with(root));
        if !inside {
            return Err(gone());
        }
        Ok(dir.into())
    }

    fn secret(&self, name: &str) -> Option<&str> {
        self.cfg
            .secrets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Does this job receive its profile's secrets? Only when its network
    /// policy is the profile's or narrower: the secrets are bound to the
    /// profile's hosts, and a job a key's grant let go further (or a
    /// profile that changed since) gets none.
    fn gets_secrets(&self, job: &Job, p: &crate::config::Profile) -> bool {
        match &job.network {
            None => true,
            Some(n) => agentvm_egress::NetworkMode::parse(n)
                .is_ok_and(|want| p.network_mode().covers(&want)),
        }
    }

    /// The supervisor's environment: nearly empty, plus exactly the
    /// variables this job's profile may receive.
    fn child_env(&self, job: &Job) -> Vec<(String, String)> {
        let mut env = vec![(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )];
        for k in ["LANG", "TZ", "TMPDIR", "HOME"] {
            if let Ok(v) = std::env::var(k) {
                env.push((k.into(), v));
            }
        }
        if let Some(p) = self
            .cfg
            .agents
            .get(&job.agent)
            .filter(|p| self.gets_secrets(job, p))
        {
            for k in &p.env {
                if let Some(v) = self
                    .secret(k)
                    .map(str::to_owned)
                    .or_else(|| std::env::var(k).ok())
                {
                    env.push((k.clone(), v));
                }
            }
        }
        env
    }

    /// The typed request for this job's runner: its profile, its own
    /// settings and the server's, each already checked where it entered
    /// (profiles when `serve` started, the job when it was accepted).
    fn request(&self, job: &Job) -> Result<RunRequest, String> {
        let p = self
            .cfg
            .agents
            .get(&job.agent)
            .ok_or_else(|| format!("agent {} is no longer configured", job.agent))?;
        let dir = self.job_dir(&job.id);
        let network = match &job.network {
            Some(n) => NetworkMode::parse(n).map_err(|e| format!("the job's network: {e}"))?,
            None => p.network_mode(),
        };
        let size = |what: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            v.as_deref()
                .map(units::parse_size)
                .transpose()
                .map_err(|e| format!("agent {}: {what}: {e}", job.agent))
        };
        let mut command: Vec<std::ffi::OsString> = Vec::new();
        for part in &p.argv {
            if part == "{prompt}" {
                command.push(job.prompt.clone().into());
            } else {
                command.push(part.into());
            }
        }
        command.extend(job.extra_args.iter().map(Into::into));
        let mut req = RunRequest::new(command);
        req.die_with_parent = true;
        // the directory the runner opened and checked (see execute)
        req.repo = Some(Repo::Fd(REPO_FD));
        req.patch_out = Some(dir.join("patch"));
        req.result_json = Some(dir.join("result.json"));
        req.limits = Limits {
            memory: size("memory", &p.memory)?,
            pids: p.pids,
            disk: size("disk", &p.disk)?,
            timeout_ms: u64::try_from(job.timeout_s)
                .ok()
                .map(|s| s.saturating_mul(1000)),
            ..Limits::default()
        };
        // a larger patch is not even written
        req.patch.max = self.cfg.max_patch;
        if matches!(network, NetworkMode::Allow(_)) {
            // decisions stream back live through a pipe (see execute)
            req.egress.events_fd = Some(EVENTS_FD);
        }
        req.egress.record_limit = self.cfg.egress_record_limit;
        req.network = network;
        req.ro_binds = p.ro_binds.clone();
        req.env = p
            .set_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if self.gets_secrets(job, p) {
            req.env_pass = p
                .env
                .iter()
                .filter(|k| self.secret(k).is_some() || std::env::var_os(k).is_some())
                .cloned()
                .collect();
        }
        req.cgroup_parent = self.cfg.cgroup_parent.clone();
        req.check()?;
        Ok(req)
    }

    async fn run(&self, id: &str) {
        match self.store.mark_running(id).await {
            Ok(true) => {}
            _ => return, // cancelled while queued, or the store failed
        }
        let Ok(Some(job)) = self.store.get_job(id).await else {
            return;
        };
        let (tx, _) = broadcast::channel(256);
        lock(&self.live).insert(id.to_string(), tx.clone());
        let started = Instant::now();
        let finish = self.execute(&job, &tx).await;
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
        lock(&self.running).remove(id);
        let _ = tx.send(Live::End(finish.status));
        lock(&self.live).remove(id);
        let _ = self.finished.send(id.to_string());
    }

    /// Store one piece of output, then fan it out to followers.
    async fn emit(
        &self,
        job: &Job,
        tx: &broadcast::Sender<Live>,
        seq: &mut i64,
        stream: &str,
        data: Vec<u8>,
    ) {
        if data.is_empty() {
            return;
        }
        *seq += 1;
        if let Err(e) = self.store.append_log(job.seq, *seq, stream, &data).await {
            tracing::error!(job = %job.id, error = %e, "storing output failed");
        }
        let _ = tx.send(Live::Chunk(LogChunk {
            seq: *seq,
            stream: stream.into(),
            ts: agentvm_store::now_ms(),
            data,
        }));
    }

    /// One line from the egress event pipe: redact it, store it among the
    /// job's output as stream "egress" (followers get it live, and again
    /// on reconnect), and audit it once it is final.
    async fn egress_decision(
        &self,
        job: &Job,
        line: &[u8],
        audited: &mut std::collections::HashSet<u64>,
        tx: &broadcast::Sender<Live>,
        seq: &mut i64,
    ) {
        let text = self.redactor.redact_str(&String::from_utf8_lossy(line));
        let Some(parsed) = EgressLine::parse(text.as_bytes()) else {
            return;
        };
        if let EgressLine::Record(e) = &parsed {
            if e.phase == Phase::Closed && audited.insert(e.conn) {
                self.audit_egress(job, e).await;
            }
        }
        let Ok(stored) = serde_json::to_vec(&parsed) else {
            return;
        };
        self.emit(job, tx, seq, "egress", stored).await;
    }

    /// A record with every secret the server knows redacted.
    fn redacted(&self, e: &EgressRecord) -> EgressRecord {
        let mut e = e.clone();
        for s in [&mut e.method, &mut e.host] {
            *s = self.redactor.redact_str(s);
        }
        for s in [e.reason.as_mut(), e.address.as_mut()]
            .into_iter()
            .flatten()
        {
            *s = self.redactor.redact_str(s);
        }
        e
    }

    /// An egress decision as an audit row, under the job's key.
    async fn audit_egress(&self, job: &Job, e: &EgressRecord) {
        let (target, outcome) = (e.target(), e.outcome());
        let detail = format!(
            "job {}; {} B up, {} B down",
            job.id, e.bytes_up, e.bytes_down
        );
        let _ = self
            .store
            .audit(
                job.key_id.as_deref(),
                "egress",
                Some(&target),
                None,
                &outcome,
                Some(&detail),
            )
            .await;
    }

    /// Connections past the proxy's record limit: one audit row.
    async fn audit_unrecorded(&self, job: &Job, u: Unrecorded) {
        let outcome = format!(
            "not recorded one by one: {} allowed, {} refused (past the first {} connections)",
            u.allowed, u.refused, u.limit
        );
        let detail = format!("job {}; counted, not recorded", job.id);
        let _ = self
            .store
            .audit(
                job.key_id.as_deref(),
                "egress",
                None,
                None,
                &outcome,
                Some(&detail),
            )
            .await;
    }

    async fn execute(&self, job: &Job, tx: &broadcast::Sender<Live>) -> Finish {
        let Spawned {
            mut child,
            events,
            dir,
        } = match self.spawn(job).await {
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
        self.conclude(
            job,
            &dir,
            status,
            &cancelled,
            &interrupted,
            truncated,
            audited,
        )
        .await
    }

    /// Everything before the runner runs: the repo opened and checked,
    /// the request written, the descriptors placed, the process started.
    /// A failure is the job's end.
    async fn spawn(&self, job: &Job) -> Result<Spawned, Finish> {
        let fail = |msg: String| Finish {
            status: JobStatus::Failed,
            exit_code: None,
            error: Some(msg),
            result: None,
            patch: None,
        };
        // The repo was inside an allowed root when the job was accepted.
        // Open it now, check where the descriptor really points, and hand
        // the sandbox that descriptor: a path swapped at any moment cannot
        // take effect.
        let repo_dir = match self.open_repo(&job.repo_path) {
            Ok(d) => d,
            Err(e) => return Err(fail(e)),
        };
        let req = match self.request(job) {
            Ok(r) => r,
            Err(e) => return Err(fail(e)),
        };
        let dir = self.job_dir(&job.id);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(fail(format!("creating the job directory: {e}")));
        }
        // the request holds the prompt: readable by this user only, and
        // removed with the job directory
        let request_file = dir.join("request.json");
        if let Err(e) = write_private(&request_file, &req) {
            return Err(fail(format!("writing the runner's request: {e}")));
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Finish {
                status: JobStatus::Interrupted,
                exit_code: None,
                error: Some(
                    "interrupted: the server shut down before the job's sandbox started".into(),
                ),
                result: None,
                patch: None,
            });
        }
        // The egress proxy's decisions, live: the write end goes to the
        // child as fd 4 (only when it runs a proxy).
        let events = if req.egress.events_fd.is_some() {
            // both ends close-on-exec; the write end is placed at fd 4 below
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok(p) => Some(p),
                Err(e) => return Err(fail(format!("creating the egress event pipe: {e}"))),
            }
        } else {
            None
        };
        // The descriptors the child inherits, first moved above fd 10 so
        // placing them at 3 and 4 cannot clobber one with the other.
        let repo_hi = match high_fd(&repo_dir) {
            Ok(f) => f,
            Err(e) => return Err(fail(format!("preparing the repo descriptor: {e}"))),
        };
        let (ev_read, ev_write) = match events {
            Some((r, w)) => match high_fd(&w) {
                Ok(w) => (Some(r), Some(w)),
                Err(e) => return Err(fail(format!("preparing the egress event pipe: {e}"))),
            },
            None => (None, None),
        };
        let repo_raw = std::os::fd::AsRawFd::as_raw_fd(&repo_hi);
        let ev_raw = ev_write.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = tokio::process::Command::new(&self.cfg.sandbox_bin);
        // SAFETY: between fork and exec only dup2 runs (async-signal-safe);
        // it puts the checked repo descriptor at fd 3 and the event pipe at
        // fd 4, both without close-on-exec (their sources are >= 10).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(repo_raw, REPO_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(w) = ev_raw {
                    if libc::dup2(w, EVENTS_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawned = cmd
            .arg("run-request")
            .arg(&request_file)
            .env_clear()
            .envs(self.child_env(job))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        // the child holds the only writer now: its end is the stream's end
        drop((repo_dir, repo_hi, ev_write));
        let child = match spawned {
            Ok(c) => c,
            Err(e) => return Err(fail(format!("starting the sandbox: {e}"))),
        };
        Ok(Spawned {
            child,
            events: ev_read,
            dir,
        })
    }

    /// Pump output as it arrives until the runner's pipes close: redact,
    /// store within the output limit, then fan out; egress decisions from
    /// their pipe are stored, streamed and audited as they come. Returns
    /// whether output was cut, and the connections already audited.
    async fn pump(
        &self,
        job: &Job,
        tx: &broadcast::Sender<Live>,
        mut out: Option<tokio::process::ChildStdout>,
        mut err: Option<tokio::process::ChildStderr>,
        events: Option<std::os::fd::OwnedFd>,
    ) -> (bool, std::collections::HashSet<u64>) {
        let mut seq: i64 = 0;
        let mut buf_o = vec![0u8; 32 * 1024];
        let mut buf_e = vec![0u8; 32 * 1024];
        // secrets never reach the store or a follower: redact first
        let (mut red_o, mut red_e) = (self.redactor.stream(), self.redactor.stream());
        let mut ev = events.and_then(|r| tokio::net::unix::pipe::Receiver::from_owned_fd(r).ok());
        let (mut buf_ev, mut ev_line) = (vec![0u8; 8 * 1024], Vec::<u8>::new());
        let mut audited = std::collections::HashSet::new();
        let (mut kept, mut truncated) = (0u64, false);
        let mut ev_lines = 0u64;
        while out.is_some() || err.is_some() || ev.is_some() {
            // once the output has ended, the proxy's last lines are due at once
            let output_done = out.is_none() && err.is_none();
            let (stream, n) = tokio::select! {
                r = async { match out.as_mut() { Some(o) => o.read(&mut buf_o).await, None => std::future::pending().await } } => ("stdout", r),
                r = async { match err.as_mut() { Some(e) => e.read(&mut buf_e).await, None => std::future::pending().await } } => ("stderr", r),
                r = async {
                    match ev.as_mut() {
                        Some(e) if output_done => tokio::time::timeout(Duration::from_secs(2), e.read(&mut buf_ev)).await.unwrap_or(Ok(0)),
                        Some(e) => e.read(&mut buf_ev).await,
                        None => std::future::pending().await,
                    }
                } => ("egress", r),
            };
            if stream == "egress" {
                match n {
                    Ok(0) | Err(_) => ev = None,
                    Ok(n) => {
                        ev_line.extend_from_slice(&buf_ev[..n]);
                        while let Some(i) = ev_line.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = ev_line.drain(..=i).collect();
                            // the proxy writes at most two lines per recorded
                            // connection and a few counts; it parses what the
                            // sandbox sends, so it is not trusted to keep to that
                            ev_lines += 1;
                            if ev_lines
                                > self
                                    .cfg
                                    .egress_record_limit
                                    .saturating_mul(2)
                                    .saturating_add(64)
                            {
                                continue;
                            }
                            self.egress_decision(job, &line, &mut audited, tx, &mut seq)
                                .await;
                        }
                        if ev_line.len() > 1 << 20 {
                            // not a line of ours; the result still has them all
                            ev_line.clear();
                        }
                    }
                }
                continue;
            }
            let data = match n {
                Ok(0) | Err(_) => {
                    if stream == "stdout" {
                        out = None;
                        red_o.finish()
                    } else {
                        err = None;
                        red_e.finish()
                    }
                }
                Ok(n) if stream == "stdout" => red_o.push(&buf_o[..n]),
                Ok(n) => red_e.push(&buf_e[..n]),
            };
            // past the output limit, the pipes are still drained (the
            // command must not block) but nothing more is kept
            if data.is_empty() || truncated {
                continue;
            }
            let room =
                usize::try_from(self.cfg.max_output.saturating_sub(kept)).unwrap_or(usize::MAX);
            let over = data.len() > room;
            let data = if over { data[..room].to_vec() } else { data };
            kept += data.len() as u64;
            self.emit(job, tx, &mut seq, stream, data).await;
            if over {
                truncated = true;
                let note = format!(
                    "\n[agentvm: this job's output passed the server's limit of {} bytes; the rest was discarded]\n",
                    self.cfg.max_output
                );
                self.emit(job, tx, &mut seq, "stderr", note.into_bytes())
                    .await;
            }
        }
        (truncated, audited)
    }

    /// The job's end from what the runner left: its typed result, its
    /// patch (within the limit), the verdict, the remaining audit rows, and
    /// everything redacted.
    #[allow(clippy::too_many_arguments)]
    async fn conclude(
        &self,
        job: &Job,
        dir: &std::path::Path,
        status: std::io::Result<std::process::ExitStatus>,
        cancelled: &AtomicBool,
        interrupted: &AtomicBool,
        truncated: bool,
        audited: std::collections::HashSet<u64>,
    ) -> Finish {
        // what the runner says, typed; anything else is no result at all
        let result: Option<RunResult> = std::fs::read(dir.join("result.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let patch_len = std::fs::metadata(dir.join("patch")).map(|m| m.len()).ok();
        let code = status.as_ref().ok().and_then(|s| s.code());
        let exit_code = result
            .as_ref()
            .map(|r| i64::from(r.exit_code))
            .or(code.map(i64::from));
        let v = crate::verdict::verdict(&crate::verdict::Ending {
            result: result.as_ref(),
            exit_status: code,
            cancelled: cancelled.load(Ordering::SeqCst),
            interrupted: interrupted.load(Ordering::SeqCst),
            timeout_s: job.timeout_s,
            max_patch: self.cfg.max_patch,
            patch_len,
        });
        // a patch past the limit is not written by the runner, nor read here
        let patch = match v.keep_patch {
            true => std::fs::read(dir.join("patch")).ok(),
            false => None,
        };
        let (st, error) = (v.status, v.error);
        // every egress decision joins the audit trail: those not yet
        // audited live (a line the pipe dropped, a connection still open)
        if let Some(eg) = result.as_ref().and_then(|r| r.egress.as_ref()) {
            for e in eg.iter().filter(|e| !audited.contains(&e.conn)) {
                self.audit_egress(job, &self.redacted(e)).await;
            }
        }
        // past the proxy's record limit: one row with the counts
        if let Some(u) = result.as_ref().and_then(|r| r.egress_unrecorded) {
            self.audit_unrecorded(job, u).await;
        }
        // nothing a job produced keeps a secret
        let r = &self.redactor;
        let result = result.map(|res| {
            let mut v = serde_json::to_string(&res)
                .ok()
                .and_then(|t| serde_json::from_str(&r.redact_str(&t)).ok())
                .unwrap_or(serde_json::Value::Null);
            if truncated {
                if let Some(o) = v.as_object_mut() {
                    o.insert("output_truncated".into(), serde_json::Value::Bool(true));
                }
            }
            v
        });
        Finish {
            status: st,
            exit_code,
            error: error.map(|e| r.redact_str(&e)),
            result,
            patch: patch.map(|p| r.redact(&p)),
        }
    }
}

/// A close-on-exec duplicate of `fd` numbered 10 or above.
fn high_fd(fd: &impl std::os::fd::AsRawFd) -> nix::Result<std::os::fd::OwnedFd> {
    let n = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: n was just created and is owned by no one else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(n) })
}

/// Write `v` as JSON to a new file only this user can read.
fn write_private(path: &std::path::Path, v: &impl serde::Serialize) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(&serde_json::to_vec(v).map_err(std::io::Error::other)?)?;
    Ok(())
}
