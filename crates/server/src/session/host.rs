//! The sessions this server runs: started through the runner like jobs,
//! their terminals held here, ended by their command, DELETE, the idle
//! timeout or the server's shutdown, and recorded in the store with their
//! exit status and patch.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_proto::RunResult;
use agentvm_store::{NewSession, Session, SessionStatus, Store, StoreError};
use tokio::io::AsyncReadExt;

use super::screen::{Attached, Screen, REPLAY, VIEWER_QUEUE};
use super::terminal::{Recording, Terminal};
use crate::config::Config;
use crate::runner::{Runner, SessionAsk};

/// Viewers one session may have at once.
pub const MAX_VIEWERS: usize = 16;
/// How long an ended session's command gets after SIGHUP before the
/// sandbox is killed (its patch is then lost).
const HANGUP_GRACE: Duration = Duration::from_secs(5);
/// How long a pause or resume may take (the supervisor gives a freeze 5 s).
const CONTROL_WAIT: Duration = Duration::from_secs(10);
/// How often the idle timeout is checked.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// Bytes of the runner's own messages kept (the tail) for the session's
/// error.
const STDERR_TAIL: usize = 8192;

/// Why a session could not start.
#[derive(Debug)]
pub enum StartError {
    /// Too many sessions: (live, the limit, whose limit: "total" or "key").
    Full(usize, usize, &'static str),
    /// A live session of the owner's has that name.
    Taken,
    Draining,
    /// The sandbox could not be set up; the session is stored as failed.
    Setup(Box<Session>),
    Store(StoreError),
}

/// A running session.
pub struct Live {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub term: Arc<Terminal>,
    /// Our end of the sandbox's port-forward control socket.
    ports: Option<Mutex<OwnedFd>>,
    /// Our end of the pause control socket; one request at a time.
    control: tokio::sync::Mutex<tokio::io::unix::AsyncFd<OwnedFd>>,
    /// Since when it is paused (the idle clock stands still meanwhile).
    paused: Mutex<Option<Instant>>,
    pid: i32,
    idle: Duration,
    /// The last input, attach or detach.
    active: Mutex<Instant>,
    /// Why the server ended it (None: its command did).
    ending: Mutex<Option<(SessionStatus, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Live {
    pub fn screen(&self) -> &Arc<Screen> {
        self.term.screen()
    }

    /// Input, an attach or a detach: the idle clock starts again.
    pub fn touch(&self) {
        *lock(&self.active) = Instant::now();
    }

    fn idle_for(&self) -> Option<Duration> {
        if !self.screen().viewers().is_empty() || self.paused_since().is_some() {
            return None;
        }
        Some(lock(&self.active).elapsed())
    }

    /// End it: SIGHUP (the terminal hung up) to the command through the
    /// runner, then SIGKILL if it does not go. The first reason given is
    /// the one recorded.
    fn end(&self, status: SessionStatus, why: String) {
        {
            let mut e = lock(&self.ending);
            if e.is_some() {
                return;
            }
            *e = Some((status, why));
        }
        let pid = self.pid;
        if pid <= 0 {
            return;
        }
        // SAFETY: signalling our own child, recorded when spawned; it is
        // reaped only by this session's task, which removes it from the
        // live map first.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    }

    /// Since when the session is paused, if it is.
    pub fn paused_since(&self) -> Option<Instant> {
        *lock(&self.paused)
    }

    /// Freeze (`pause`) or thaw every process of the session, through its
    /// supervisor; returns once the kernel says it is done. Ok(false): it
    /// already was. Paused, nobody writes and the idle clock stands still;
    /// resumed, the idle clock starts again from zero. Runs as a task of
    /// its own, so a caller that goes away never cuts an exchange in half.
    pub async fn set_paused(self: &Arc<Self>, pause: bool) -> Result<bool, String> {
        let me = self.clone();
        tokio::spawn(async move { me.pause_or_resume(pause).await })
            .await
            .unwrap_or_else(|_| Err("internal error while pausing".into()))
    }

    async fn pause_or_resume(&self, pause: bool) -> Result<bool, String> {
        use agentvm_sandbox::control;
        let ctl = self.control.lock().await;
        if lock(&self.ending).is_some() {
            return Err("the session is ending".into());
        }
        if self.paused_since().is_some() == pause {
            return Ok(false);
        }
        let ask = if pause {
            control::PAUSE
        } else {
            control::RESUME
        };
        let answer = exchange(&ctl, ask).await?;
        match answer.first() {
            Some(&control::PAUSED) if pause => {
                // an end that came meanwhile (its SIGHUP may have reached
                // the supervisor before this request did) must find it
                // running: a frozen task would hold even SIGKILL
                if lock(&self.ending).is_some() {
                    let _ = exchange(&ctl, control::RESUME).await;
                    return Err("the session is ending".into());
                }
                *lock(&self.paused) = Some(Instant::now());
                self.screen().set_paused(true);
                Ok(true)
            }
            Some(&control::RESUMED) if !pause => {
                *lock(&self.paused) = None;
                self.touch();
                self.screen().set_paused(false);
                Ok(true)
            }
            Some(&control::FAILED) => Err(String::from_utf8_lossy(&answer[1..]).into_owned()),
            None => Err("the session's supervisor went away".into()),
            _ => Err("the session's supervisor answered something else".into()),
        }
    }

    /// A signal from the writer for the command: INT, TERM, HUP or QUIT,
    /// which the runner forwards (anything else would hit the runner
    /// itself and lose the session's patch). False if not passed.
    pub fn signal(&self, sig: i32) -> bool {
        if ![libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT].contains(&sig)
            || self.pid <= 0
            || lock(&self.ending).is_some()
            || self.paused_since().is_some()
        {
            return false;
        }
        // SAFETY: signalling our own child (see `end`).
        unsafe { libc::kill(self.pid, sig) == 0 }
    }

    /// A stream connected to `port` on the sandbox's own loopback, or why
    /// not.
    pub async fn forward(&self, port: u16) -> Result<tokio::net::UnixStream, String> {
        use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags};
        use nix::sys::socket::{SockFlag, SockType};
        let Some(ctl) = &self.ports else {
            return Err("this session shares the host's network: it has no loopback of its own to forward to".into());
        };
        if port == 0 {
            return Err("port 0 is not a port".into());
        }
        // its forwarder is frozen too: nothing would answer
        if self.paused_since().is_some() {
            return Err("the session is paused: resume it to reach its ports".into());
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("creating a forward socket: {e}"))?;
        {
            let ctl = lock(ctl);
            let fds = [theirs.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let b = port.to_be_bytes();
            let iov = [std::io::IoSlice::new(&b)];
            sendmsg::<()>(
                ctl.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(|e| format!("the session's forwarder is not there ({e})"))?;
        }
        drop(theirs);
        let std = std::os::unix::net::UnixStream::from(ours);
        std.set_nonblocking(true)
            .map_err(|e| format!("preparing a forward socket: {e}"))?;
        let mut s = tokio::net::UnixStream::from_std(std)
            .map_err(|e| format!("preparing a forward socket: {e}"))?;
        let mut answer = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer)).await {
            Ok(Ok(_)) if answer[0] == agentvm_sandbox::PORT_OPEN => Ok(s),
            Ok(Ok(_)) => Err(format!("nothing listens on port {port} inside the session")),
            _ => Err("the session's forwarder did not answer".into()),
        }
    }
}

/// Every live session of this server.
pub struct SessionHost {
    runner: Arc<Runner>,
    store: Store,
    cfg: Arc<Config>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Sessions counted against the limits: live ones and ones starting.
    counts: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    draining: AtomicBool,
    /// Session tasks not yet finished (shutdown waits for them).
    tasks: AtomicUsize,
}

/// A slot against the limits, given back when dropped.
struct Slot<'a> {
    host: &'a SessionHost,
    owner: String,
    kept: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.host.release(&self.owner);
        }
    }
}

impl SessionHost {
    pub fn new(runner: Arc<Runner>, store: Store, cfg: Arc<Config>) -> Arc<SessionHost> {
        Arc::new(SessionHost {
            runner,
            store,
            cfg,
            live: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            tasks: AtomicUsize::new(0),
        })
    }

    /// The live session `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        lock(&self.live).get(id).cloned()
    }

    /// Sessions live or starting.
    pub fn count(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    fn reserve(&self, owner: &str) -> Result<Slot<'_>, StartError> {
        let limits = &self.cfg.sessions;
        let mut counts = lock(&self.counts);
        let total = self.total.load(Ordering::SeqCst);
        if total >= limits.max_total {
            return Err(StartError::Full(total, limits.max_total, "total"));
        }
        let mine = counts.get(owner).copied().unwrap_or(0);
        if mine >= limits.max_per_key {
            return Err(StartError::Full(mine, limits.max_per_key, "key"));
        }
        counts.insert(owner.to_string(), mine + 1);
        self.total.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            host: self,
            owner: owner.to_string(),
            kept: false,
        })
    }

    fn release(&self, owner: &str) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(owner);
            }
        }
        self.total.fetch_sub(1, Ordering::SeqCst);
    }

    /// Start a session: stored as running, its sandbox started, its
    /// terminal taken; it then runs on its own until it ends. `first`
    /// attaches a viewer (the writer) before any output is read, so it
    /// misses none of it, however much comes at once.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        self: &Arc<Self>,
        new: NewSession,
        limits: SessionAsk,
        rows: u16,
        cols: u16,
        record_input: bool,
        first: Option<&str>,
    ) -> Result<(Arc<Live>, Option<Attached>), StartError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(StartError::Draining);
        }
        let mut slot = self.reserve(&new.owner)?;
        let s = match self.store.create_session(&new).await {
            Ok(s) => s,
            Err(StoreError::Taken(_)) => return Err(StartError::Taken),
            Err(e) => return Err(StartError::Store(e)),
        };
        let s2 = s.clone();
        let fail = |why: String| async move {
            let _ = self
                .store
                .end_session(&s2.id, SessionStatus::Failed, None, Some(&why))
                .await;
            let stored = self.store.get_session(&s2.id).await.ok().flatten();
            StartError::Setup(Box::new(stored.unwrap_or(Session {
                status: SessionStatus::Failed,
                error: Some(why),
                ..s2
            })))
        };
        // over a workspace the service holds for this session: its stack
        // read, its new layer claimed (let go of on every failure below)
        let over = match self.runner.over_for(&s.id).await {
            Ok(o) => o,
            Err(e) => return Err(fail(format!("reading the session's workspace: {e}")).await),
        };
        let sid = s.id.clone();
        let drop_over = |over: Option<crate::runner::Over>| {
            let sid = sid.clone();
            async move {
                if let Some(o) = over {
                    self.runner.settle_writer(&sid, &o, false).await;
                }
            }
        };
        let sb = match self
            .runner
            .spawn_session(&s, &limits, rows, cols, over.as_ref())
            .await
        {
            Ok(sb) => sb,
            Err(why) => {
                drop_over(over).await;
                return Err(fail(why).await);
            }
        };
        let mut child = sb.child;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        if let Some(start) = crate::runner::start_time(pid) {
            let _ = self
                .store
                .set_session_supervisor(&s.id, i64::from(pid), start)
                .await;
        }
        let dir = self.runner.session_dir(&s.id);
        let rec = match Recording::create(
            &dir.join("recording.cast"),
            rows,
            cols,
            &s.name,
            &shown_command(&s.command),
            self.cfg.sessions.max_recording,
        ) {
            Ok(r) if record_input => Some(r.with_input()),
            Ok(r) => Some(r),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                drop_over(over).await;
                return Err(fail(format!("creating the session's recording: {e}")).await);
            }
        };
        let screen = Arc::new(Screen::new(REPLAY, VIEWER_QUEUE, MAX_VIEWERS));
        let term = match Terminal::new(sb.primary, screen, self.runner.redactor().clone(), rec) {
            Ok(t) => t,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                drop_over(over).await;
                return Err(fail(format!("taking the session's terminal: {e}")).await);
            }
        };
        let control = match nonblocking(sb.control) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                drop_over(over).await;
                return Err(fail(format!("taking the session's control socket: {e}")).await);
            }
        };
        let live = Arc::new(Live {
            id: s.id.clone(),
            owner: s.owner.clone(),
            name: s.name.clone(),
            term: term.clone(),
            ports: sb.ports.map(Mutex::new),
            control: tokio::sync::Mutex::new(control),
            paused: Mutex::new(None),
            pid,
            idle: Duration::from_secs(u64::try_from(s.idle_timeout_s).unwrap_or(1).max(1)),
            active: Mutex::new(Instant::now()),
            ending: Mutex::new(None),
        });
        let first = first.and_then(|who| live.screen().attach(who, true).ok().map(|(a, _)| a));
        lock(&self.live).insert(s.id.clone(), live.clone());
        slot.kept = true;
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        let l2 = live.clone();
        let stderr = child.stderr.take();
        tokio::spawn(async move {
            me.run(l2, child, stderr, dir, over).await;
            me.tasks.fetch_sub(1, Ordering::SeqCst);
        });
        Ok((live, first))
    }

    /// A session from its start to its record in the store.
    async fn run(
        &self,
        live: Arc<Live>,
        mut child: tokio::process::Child,
        stderr: Option<tokio::process::ChildStderr>,
        dir: PathBuf,
        over: Option<crate::runner::Over>,
    ) {
        let pump = tokio::spawn(live.term.clone().pump());
        // the runner's own messages, the tail kept (a bounded buffer)
        let tail = tokio::spawn(async move {
            let mut kept: Vec<u8> = Vec::new();
            if let Some(mut e) = stderr {
                let mut buf = [0u8; 4096];
                while let Ok(n) = e.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    kept.extend_from_slice(&buf[..n]);
                    let over = kept.len().saturating_sub(STDERR_TAIL);
                    kept.drain(..over);
                }
            }
            kept
        });
        let mut hung_up: Option<Instant> = None;
        let status = loop {
            tokio::select! {
                st = child.wait() => break st.ok(),
                _ = tokio::time::sleep(IDLE_TICK) => {
                    if let Some(idle) = live.idle_for() {
                        if idle >= live.idle {
                            live.end(SessionStatus::Killed, format!(
                                "ended after {} s with no input and no viewer (its idle timeout)",
                                live.idle.as_secs()
                            ));
                        }
                    }
                    if lock(&live.ending).is_some() {
                        let t = *hung_up.get_or_insert_with(Instant::now);
                        if t.elapsed() >= HANGUP_GRACE {
                            let _ = child.start_kill();
                        }
                    }
                }
            }
        };
        // every process of the sandbox is gone: the terminal closes
        let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
        let said = tail.await.unwrap_or_default();
        let result: Option<RunResult> = std::fs::read(dir.join("result.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let patch = std::fs::read(dir.join("patch")).ok();
        let ending = lock(&live.ending).clone();
        let code = result.as_ref().map(|r| r.exit_code);
        let (status_now, why) = match (&ending, &result) {
            (Some((st, why)), _) => (*st, Some(why.clone())),
            (None, Some(r)) if r.status == agentvm_proto::RunStatus::Error => (
                SessionStatus::Failed,
                r.error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.layer, e.message)),
            ),
            (None, Some(_)) => (SessionStatus::Exited, None),
            (None, None) => {
                let said = self
                    .runner
                    .redactor()
                    .redact_str(String::from_utf8_lossy(&said).trim());
                let why = match status {
                    _ if !said.is_empty() => said,
                    Some(st) => format!("the sandbox ended without a result ({st})"),
                    None => "the sandbox ended without a result".to_string(),
                };
                (SessionStatus::Failed, Some(why))
            }
        };
        // out of the live map before anything else can signal its pid
        lock(&self.live).remove(&live.id);
        let id = live.id.clone();
        // its changes onto its workspace before its record says it ended
        // (once it does, its hold looks stale to anyone who takes it); an
        // interrupted or failed one leaves none
        if let Some(o) = &over {
            let ran = matches!(status_now, SessionStatus::Exited | SessionStatus::Killed);
            self.runner.settle_writer(&id, o, ran).await;
        }
        match self
            .store
            .end_session(&id, status_now, code.map(i64::from), why.as_deref())
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(session = %id, error = %e, "recording the end of a session failed")
            }
        }
        if let Some(p) = patch.filter(|p| !p.is_empty()) {
            if let Err(e) = self.store.set_session_patch(&id, &p).await {
                tracing::error!(session = %id, error = %e, "storing a session's patch failed");
            }
        }
        live.screen().end(code);
        for f in ["patch", "result.json", "request.json"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        self.release(&live.owner);
        tracing::info!(session = %id, status = %status_now, "session ended");
    }

    /// End a live session (DELETE, or a kill from the CLI).
    pub fn kill(&self, id: &str, why: &str) -> bool {
        match self.get(id) {
            Some(l) => {
                l.end(SessionStatus::Killed, why.to_string());
                true
            }
            None => false,
        }
    }

    /// Stop starting sessions and end every live one, recorded as
    /// interrupted (recording and patch kept); returns once they are
    /// recorded or `within` has passed.
    pub async fn shutdown(&self, within: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        let live: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        for l in &live {
            l.end(
                SessionStatus::Interrupted,
                "interrupted: the server shut down".into(),
            );
        }
        let until = Instant::now() + within;
        while self.tasks.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One request to the session's supervisor and its answer (at most
/// [`CONTROL_WAIT`]). An answer left over from an exchange that timed out
/// is read and dropped first, so each request gets its own answer.
async fn exchange(ctl: &tokio::io::unix::AsyncFd<OwnedFd>, ask: u8) -> Result<Vec<u8>, String> {
    use nix::sys::socket::{recv, send, MsgFlags};
    let mut buf = [0u8; 512];
    while let Ok(n) = recv(ctl.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        if n == 0 {
            return Err("the session's supervisor went away".into());
        }
    }
    let answer = tokio::time::timeout(CONTROL_WAIT, async {
        loop {
            let mut g = ctl.writable().await.map_err(|e| e.to_string())?;
            match g.try_io(|fd| {
                send(fd.as_raw_fd(), &[ask], MsgFlags::MSG_NOSIGNAL).map_err(std::io::Error::from)
            }) {
                Ok(r) => {
                    r.map_err(|e| e.to_string())?;
                    break;
                }
                Err(_) => continue,
            };
        }
        loop {
            let mut g = ctl.readable().await.map_err(|e| e.to_string())?;
            match g.try_io(|fd| {
                recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(std::io::Error::from)
            }) {
                Ok(r) => return r.map(|n| buf[..n].to_vec()).map_err(|e| e.to_string()),
                Err(_) => continue,
            }
        }
    })
    .await;
    match answer {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(format!("the session's supervisor is not there ({e})")),
        Err(_) => Err("the session's supervisor did not answer in time".into()),
    }
}

fn nonblocking(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    super::terminal::set_nonblocking(&fd)?;
    // SAFETY: the AsyncFd owns the descriptor; nothing else closes or
    // replaces it while registered.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// A command line as a header shows it.
pub fn shown_command(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
