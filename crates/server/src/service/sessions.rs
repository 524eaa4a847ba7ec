//! Sessions: a request judged (agent or command, repo inside an allowed
//! root, network and limits narrowing only, the session limits) and
//! started; found, listed, attached to, ended, applied and deleted, each by
//! its owner only (admin keys may list, show and end anyone's, never type
//! into them).

use std::path::PathBuf;
use std::sync::Arc;

use agentvm_proto::api::{Applied, SessionRequest, SessionView, ViewerView};
use agentvm_store::{bounded, NewSession, Session, SessionStatus};

use super::jobs::{check_network, check_repo, MAX_ARG_LEN, MAX_EXTRA_ARGS};
use super::{paged, Error, Principal, Result, Service};
use crate::auth::Scope;
use crate::runner::SessionAsk;
use crate::session::host::{Live, StartError};
use crate::session::screen::{AttachError, Attached};

/// The profile sessions with a command (or nothing) run under.
pub const SHELL: &str = "shell";

/// A session name: what `ssh NAME@host` can carry.
pub fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && !n.starts_with('-')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn new_session_id() -> String {
    super::new_id("ses")
}

/// How a door opens a session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opening<'a> {
    /// Attach the caller as its writer from the first byte, through this
    /// door ("ssh").
    pub door: Option<&'a str>,
    /// A terminal with no line discipline (`ssh HOST COMMAND`).
    pub raw: bool,
}

/// A viewer attached through a door.
pub struct Viewer {
    pub live: Arc<Live>,
    pub attached: Attached,
    pub writer: bool,
    /// Attached with `read_only`: never writes, may not take over.
    pub read_only: bool,
}

impl Viewer {
    pub fn writer_allowed(&self) -> bool {
        !self.read_only
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.live.screen().detach(self.attached.id);
        self.live.touch();
    }
}

impl Service {
    /// Validate a session request, start it, audit the outcome.
    pub async fn create_session(&self, p: &Principal, r: &SessionRequest) -> Result<Session> {
        Ok(self.open_session(p, r, Opening::default()).await?.0)
    }

    /// [`Self::create_session`], the way a door that attaches at once
    /// wants it: `open.door` attaches the caller as the writer before any
    /// output is read; `open.raw` gives the command a terminal with no line
    /// discipline. The viewer is `None` when the session failed to start.
    pub async fn open_session(
        &self,
        p: &Principal,
        r: &SessionRequest,
        open: Opening<'_>,
    ) -> Result<(Session, Option<Viewer>)> {
        const A: &str = "session.create";
        self.need_mut(p, Scope::Run, A, None).await?;
        let (mut new, mut ask, rows, cols) = match self.judge_session(p, r) {
            Ok(v) => v,
            Err(e) => return self.rejected(p, A, None, e).await,
        };
        ask.raw = open.raw;
        if let (None, Some(w)) = (r.image.as_deref(), r.workspace.as_deref()) {
            let agent = r.agent.as_deref().unwrap_or(super::SHELL);
            match self.workspace_image(p, w, agent).await {
                Ok(i) => ask.image = i,
                Err(e) => return self.rejected(p, A, None, e).await,
            }
        }
        let id = new.id.clone();
        // over a workspace: held for this session until it ends
        let held = match r.workspace.as_deref() {
            None if r.read_only => {
                let e = Error::invalid(
                    "body",
                    "read_only",
                    "read_only is for a session over a workspace",
                );
                return self.rejected(p, A, None, e).await;
            }
            None => None,
            Some(_) if r.repo_path.is_some() => {
                let e = Error::invalid(
                    "body",
                    "workspace",
                    "give repo_path or workspace, not both (a workspace has its repository)",
                );
                return self.rejected(p, A, None, e).await;
            }
            Some(w) => match self.hold_workspace(p, w, &id, r.read_only).await {
                Ok((repo, ws)) => {
                    new.repo_path = Some(repo.to_string_lossy().into_owned());
                    ws
                }
                Err(e) => return self.rejected(p, A, None, e).await,
            },
        };
        let let_go = || async {
            if let Some(ws) = &held {
                let _ = self.store.release_workspace(ws, &id, None).await;
            }
            let _ = self.store.drop_reader(&id).await;
        };
        let who = open.door.map(|d| format!("{} ({d})", p.key.id));
        match self
            .sessions
            .start(new, ask, rows, cols, r.record_input, who.as_deref())
            .await
        {
            Ok((live, attached)) => {
                self.record(p, A, Some(&id), "accepted", None).await;
                let s = self.store.get_session(&id).await?.ok_or_else(|| {
                    Error::Internal("internal error: the session was not stored".into())
                })?;
                let viewer = attached.map(|attached| Viewer {
                    live,
                    attached,
                    writer: true,
                    read_only: false,
                });
                Ok((s, viewer))
            }
            Err(StartError::Setup(s)) => {
                let_go().await;
                self.record(p, A, Some(&id), "failed", s.error.as_deref())
                    .await;
                Ok((*s, None))
            }
            Err(e) => {
                let_go().await;
                let e = match e {
                    StartError::Full(n, max, "total") => Error::Busy {
                        msg: format!("The server runs {n} sessions, its limit ({max}); end one or retry later"),
                        retry_s: 30,
                    },
                    StartError::Full(n, max, _) => Error::Busy {
                        msg: format!("You have {n} live sessions, the limit per key ({max}); end one first (agentvm sessions kill NAME)"),
                        retry_s: 30,
                    },
                    StartError::Taken => Error::Conflict(format!(
                        "You already have a live session named {}; attach to it or pick another name",
                        r.name.as_deref().unwrap_or("")
                    )),
                    StartError::Draining => Error::Unavailable {
                        msg: "The server is shutting down and starts no new sessions".into(),
                        retry_s: 10,
                    },
                    StartError::Store(e) => e.into(),
                    StartError::Setup(_) => Error::Internal("internal error".into()),
                };
                self.rejected(p, A, None, e).await
            }
        }
    }

    fn judge_session(
        &self,
        p: &Principal,
        r: &SessionRequest,
    ) -> Result<(NewSession, SessionAsk, u16, u16)> {
        let name = match &r.name {
            Some(n) if valid_name(n) => n.clone(),
            Some(_) => {
                return Err(Error::invalid(
                    "body",
                    "name",
                    "1 to 64 of A-Z a-z 0-9 . _ -, not starting with -",
                ))
            }
            None => {
                let id = new_session_id();
                format!("s{}", &id[4..10])
            }
        };
        if r.agent.is_some() && r.command.is_some() {
            return Err(Error::invalid(
                "body",
                "command",
                "give an agent or a command, not both (a command runs under the shell profile)",
            ));
        }
        let agent = r.agent.as_deref().unwrap_or(SHELL);
        let Some(profile) = self.cfg.agents.get(agent) else {
            let valid: Vec<&str> = self.cfg.agents.keys().map(String::as_str).collect();
            return Err(Error::Unknown(format!(
                "Unknown agent '{}'. Valid agents: {}",
                bounded(agent, 64),
                valid.join(", ")
            )));
        };
        let command = match &r.command {
            Some(c) => {
                if c.is_empty()
                    || c.len() > MAX_EXTRA_ARGS
                    || c.iter().any(|x| x.len() > MAX_ARG_LEN || x.contains('\0'))
                    || c[0].is_empty()
                {
                    return Err(Error::invalid(
                        "body",
                        "command",
                        "1 to 64 arguments of at most 4096 bytes, no NUL, the first not empty",
                    ));
                }
                c.clone()
            }
            None => profile.interactive_argv(),
        };
        let network = match r.network.as_deref() {
            None => None,
            Some(n) => Some(check_network(profile, agent, n, p)?),
        };
        let max_idle = self.cfg.sessions.idle_timeout_s;
        let idle = r.idle_timeout.unwrap_or(max_idle as i64);
        if idle < 1 || idle as u64 > max_idle {
            return Err(Error::invalid(
                "body",
                "idle_timeout",
                format!("idle_timeout must be 1 to {max_idle} seconds (the server's --session-idle-timeout)"),
            ));
        }
        let size_of = |v: &Option<String>| v.as_deref().map(crate::units::parse_size);
        let memory = match &r.memory {
            None => None,
            Some(m) => {
                let want =
                    crate::units::parse_size(m).map_err(|e| Error::invalid("body", "memory", e))?;
                if let Some(Ok(most)) = size_of(&profile.memory) {
                    if want > most {
                        return Err(Error::Forbidden(format!(
                            "memory {m} is more than the {agent} profile allows ({}); a request may only narrow it",
                            profile.memory.as_deref().unwrap_or("")
                        )));
                    }
                }
                Some(want)
            }
        };
        let pids = match r.pids {
            None => None,
            Some(n) => {
                if !(1..=agentvm_proto::run::PIDS_MAX).contains(&n) {
                    return Err(Error::invalid("body", "pids", "pids must be at least 1"));
                }
                if profile.pids.is_some_and(|most| n > most) {
                    return Err(Error::Forbidden(format!(
                        "pids {n} is more than the {agent} profile allows; a request may only narrow it"
                    )));
                }
                Some(n)
            }
        };
        let max = agentvm_proto::run::TTY_MAX;
        let (rows, cols) = (r.rows.unwrap_or(24), r.cols.unwrap_or(80));
        if !(1..=max).contains(&rows) || !(1..=max).contains(&cols) {
            return Err(Error::invalid(
                "body",
                "rows",
                format!("rows and cols must be 1 to {max}"),
            ));
        }
        let repo = match r.repo_path.as_deref() {
            None => None,
            Some(rp) => Some(check_repo(&self.roots, rp)?),
        };
        // over a workspace: chosen in open_session
        let image = self.asked_image(profile, r.image.as_deref(), r.workspace.is_some())?;
        Ok((
            NewSession {
                id: new_session_id(),
                name,
                owner: p.key.id.clone(),
                agent: r.agent.clone(),
                command,
                repo_path: repo.map(|r| r.to_string_lossy().into_owned()),
                network,
                idle_timeout_s: idle,
            },
            SessionAsk {
                memory,
                pids,
                disk: None,
                raw: false,
                image,
            },
            rows,
            cols,
        ))
    }

    /// The session `id` (or the caller's session named so: the live one,
    /// else the newest), if `p` may see it: anyone else's is as unknown as one that never was.
    pub async fn find_session(&self, p: &Principal, id_or_name: &str) -> Result<Session> {
        p.need(Scope::Read)?;
        let missing = || Error::NotFound(format!("No session {}", bounded(id_or_name, 64)));
        if id_or_name.len() > 64 {
            return Err(missing());
        }
        if let Some(s) = self.store.get_session(id_or_name).await? {
            if p.is_admin() || s.owner == p.key.id {
                return Ok(s);
            }
            return Err(missing());
        }
        match self.store.session_named(&p.key.id, id_or_name).await? {
            Some(s) => Ok(s),
            None => Err(missing()),
        }
    }

    /// A session as the API shows it, with who is attached now.
    pub fn session_view(&self, s: Session) -> SessionView {
        let viewers = self
            .sessions
            .get(&s.id)
            .map(|l| {
                l.screen()
                    .viewers()
                    .into_iter()
                    .map(|(_, who, writer)| ViewerView { who, writer })
                    .collect()
            })
            .unwrap_or_default();
        let paused = self
            .sessions
            .get(&s.id)
            .is_some_and(|l| l.paused_since().is_some());
        let recording_bytes = std::fs::metadata(self.recording_path(&s.id))
            .ok()
            .map(|m| m.len());
        SessionView {
            id: s.id,
            name: s.name,
            owner: s.owner,
            agent: s.agent,
            command: s.command,
            repo_path: s.repo_path,
            network: s.network,
            idle_timeout_s: s.idle_timeout_s,
            status: s.status,
            created_at: s.created_at,
            ended_at: s.ended_at,
            exit_code: s.exit_code,
            error: s.error,
            viewers,
            paused,
            recording_bytes,
        }
    }

    pub fn recording_path(&self, id: &str) -> PathBuf {
        self.runner.session_dir(id).join("recording.cast")
    }

    /// Sessions newest first: `p`'s own (everyone's for admin keys).
    pub async fn list_sessions(
        &self,
        p: &Principal,
        limit: i64,
        cursor: Option<i64>,
    ) -> Result<(Vec<Session>, Option<String>)> {
        p.need(Scope::Read)?;
        let owner = (!p.is_admin()).then_some(p.key.id.as_str());
        let list = self.store.list_sessions(owner, cursor, limit + 1).await?;
        Ok(paged(list, limit, |s| s.seq))
    }

    /// Attach to the caller's own live session (never another's, admin or
    /// not): the replay, then live frames. `read_only` never writes.
    pub async fn attach(
        &self,
        p: &Principal,
        id_or_name: &str,
        door: &str,
        read_only: bool,
    ) -> Result<Viewer> {
        const A: &str = "session.attach";
        self.need_mut(p, Scope::Run, A, Some(id_or_name)).await?;
        let s = self.find_session(p, id_or_name).await?;
        if s.owner != p.key.id {
            let e = Error::NotFound(format!("No session {}", bounded(id_or_name, 64)));
            return self.rejected(p, A, Some(&s.id), e).await;
        }
        let ended = || {
            Error::Conflict(format!(
                "Session {} has ended ({}); its recording and patch are kept",
                s.name, s.status
            ))
        };
        let Some(live) = self.sessions.get(&s.id) else {
            return self.rejected(p, A, Some(&s.id), ended()).await;
        };
        let who = format!("{} ({door})", p.key.id);
        let (attached, writer) = match live.screen().attach(&who, !read_only) {
            Ok(a) => a,
            Err(AttachError::Ended) => return self.rejected(p, A, Some(&s.id), ended()).await,
            Err(AttachError::Full(n)) => {
                let e = Error::Busy {
                    msg: format!("Session {} has {n} viewers, its limit", s.name),
                    retry_s: 5,
                };
                return self.rejected(p, A, Some(&s.id), e).await;
            }
        };
        live.touch();
        let mode = if writer { "writer" } else { "read-only" };
        self.record(p, A, Some(&s.id), "ok", Some(&format!("{door}, {mode}")))
            .await;
        Ok(Viewer {
            live,
            attached,
            writer,
            read_only,
        })
    }

    /// End `p`'s live session (admin: anyone's); an ended one is deleted
    /// with its recording and patch. Returns the session as it is now,
    /// `None` once deleted.
    pub async fn end_session(&self, p: &Principal, id: &str) -> Result<Option<Session>> {
        const A: &str = "session.delete";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let s = self.find_session(p, id).await?;
        if s.status == SessionStatus::Running {
            let by = format!("ended by {}", p.key.id);
            if !self.sessions.kill(&s.id, &by) {
                // running in the store, but not here: a record a crash left
                let _ = self
                    .store
                    .end_session(
                        &s.id,
                        SessionStatus::Interrupted,
                        None,
                        Some("interrupted: no server runs it"),
                    )
                    .await?;
            }
            self.record(p, A, Some(&s.id), "accepted", Some("ended"))
                .await;
            return Ok(self.store.get_session(&s.id).await?);
        }
        if !self.store.delete_session(&s.id).await? {
            let e = Error::Conflict(format!("Session {} is still running", s.name));
            return self.rejected(p, A, Some(&s.id), e).await;
        }
        let _ = std::fs::remove_dir_all(self.runner.session_dir(&s.id));
        self.record(p, A, Some(&s.id), "ok", Some("deleted")).await;
        Ok(None)
    }

    /// Pause (freeze every process of) or resume `p`'s live session
    /// (admin: anyone's). Pausing a paused one, or resuming a running one,
    /// changes nothing and says so in the audit trail.
    pub async fn pause_session(&self, p: &Principal, id: &str, pause: bool) -> Result<Session> {
        let a = if pause {
            "session.pause"
        } else {
            "session.resume"
        };
        self.need_mut(p, Scope::Run, a, Some(id)).await?;
        let s = self.find_session(p, id).await?;
        let Some(live) = self.sessions.get(&s.id) else {
            let e = Error::Conflict(format!(
                "Session {} has ended ({}): only a live session can be {}",
                s.name,
                s.status,
                if pause { "paused" } else { "resumed" }
            ));
            return self.rejected(p, a, Some(&s.id), e).await;
        };
        match live.set_paused(pause).await {
            Ok(changed) => {
                let how = match (changed, pause) {
                    (true, _) => None,
                    (false, true) => Some("already paused"),
                    (false, false) => Some("not paused"),
                };
                self.record(p, a, Some(&s.id), "ok", how).await;
                Ok(s)
            }
            Err(why) => {
                let e = Error::Conflict(format!(
                    "Session {} could not be {}: {why}",
                    s.name,
                    if pause { "paused" } else { "resumed" }
                ));
                self.rejected(p, a, Some(&s.id), e).await
            }
        }
    }

    /// An ended session's patch (empty when it changed nothing).
    pub async fn session_patch(&self, p: &Principal, id: &str) -> Result<(Session, Vec<u8>)> {
        let s = self.find_session(p, id).await?;
        if s.status == SessionStatus::Running {
            return Err(Error::Conflict(format!(
                "Session {} is running; its patch is captured when it ends",
                s.name
            )));
        }
        let patch = self
            .store
            .session_patch(&s.id)
            .await?
            .flatten()
            .unwrap_or_default();
        Ok((s, patch))
    }

    /// Put an ended session's patch on a new branch `agentvm/<session-id>`
    /// of its repository, by the same rules as a job's.
    pub async fn apply_session(&self, p: &Principal, id: &str) -> Result<Applied> {
        const A: &str = "session.apply";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let (s, patch) = self.session_patch(p, id).await?;
        let Some(repo_path) = &s.repo_path else {
            let e = Error::Conflict(format!(
                "Session {} had no repository (an empty /workspace): there is nothing to apply it to",
                s.name
            ));
            return self.rejected(p, A, Some(&s.id), e).await;
        };
        let repo = check_repo(&self.roots, repo_path).map_err(|_| {
            Error::Conflict(
                "The session's repository is gone or no longer inside an allowed root".into(),
            )
        })?;
        let branch = format!("agentvm/{}", s.id);
        let message = format!("Session {}\n\nAgentVM-Session: {}\n", s.name, s.id);
        self.apply_patch(p, A, &s.id, repo, patch, branch, message)
            .await
    }

    /// A stream to `port` inside `p`'s own live session.
    pub async fn forward(
        &self,
        p: &Principal,
        id_or_name: &str,
        port: u16,
    ) -> Result<tokio::net::UnixStream> {
        const A: &str = "session.forward";
        self.need_mut(p, Scope::Run, A, Some(id_or_name)).await?;
        let s = self.find_session(p, id_or_name).await?;
        let missing = || Error::NotFound(format!("No session {}", bounded(id_or_name, 64)));
        if s.owner != p.key.id {
            return self.rejected(p, A, Some(&s.id), missing()).await;
        }
        let Some(live) = self.sessions.get(&s.id) else {
            let e = Error::Conflict(format!("Session {} has ended", s.name));
            return self.rejected(p, A, Some(&s.id), e).await;
        };
        match live.forward(port).await {
            Ok(st) => {
                self.record(p, A, Some(&s.id), "ok", Some(&format!("port {port}")))
                    .await;
                Ok(st)
            }
            Err(why) => {
                let e = Error::Conflict(why);
                self.rejected(p, A, Some(&s.id), e).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_what_ssh_users_can_carry() {
        for ok in ["work", "a", "fix-42", "x.y_z", &"n".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-o", "a b", "a/b", "ü", "a@b", &"n".repeat(65), "..\n"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
