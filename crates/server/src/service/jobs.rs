//! Jobs: a request judged (agent, repo inside an allowed root, network
//! narrowing only, refused agent flags) and queued; found, listed,
//! followed, cancelled, applied and deleted, each by its owner only.

use std::path::{Path, PathBuf};

use agentvm_proto::api::Applied;
use agentvm_store::{bounded, Job, JobStatus, NetworkMode, NewJob};
use tokio::sync::mpsc;

use super::{paged, Error, Principal, Result, Service, Slot};
use crate::auth::Scope;
use crate::output;
use crate::runner::SubmitError;

pub const MAX_EXTRA_ARGS: usize = 64;
pub const MAX_ARG_LEN: usize = 4096;
pub const MAX_PROMPT: usize = 256 * 1024;
pub const MAX_NETWORK: usize = 4096;

/// One job request as it arrived (its network already parsed).
pub struct Ask<'a> {
    pub agent: &'a str,
    pub prompt: &'a str,
    pub repo_path: &'a str,
    pub timeout: i64,
    pub extra: &'a [String],
    /// As the request gave it: checked for size, then parsed, here.
    pub network: Option<&'a str>,
    /// Run over this workspace (id or name; then `repo_path` is empty).
    pub workspace: Option<&'a str>,
    /// Over `workspace`: read it beside its writer, keep nothing in it.
    pub read_only: bool,
    /// The image (a tag or digest) instead of the profile's.
    pub image: Option<&'a str>,
}

/// What every job request carries, once validated.
struct Valid {
    agent: String,
    prompt: String,
    repo: PathBuf,
    timeout: i64,
    extra_args: Vec<String>,
    /// The job's own network policy; `None`: its profile's.
    network: Option<NetworkMode>,
    /// The image's digest; `None`: the host's system.
    image: Option<String>,
}

/// Which jobs a list shows.
#[derive(Debug, Default)]
pub struct JobFilter<'a> {
    pub status: Option<JobStatus>,
    pub agent: Option<&'a str>,
    pub limit: i64,
    pub cursor: Option<i64>,
}

impl Service {
    fn validate(&self, p: &Principal, a: &Ask) -> Result<Valid> {
        if !(1..=3600).contains(&a.timeout) {
            return Err(Error::invalid(
                "body",
                "timeout",
                "timeout must be between 1 and 3600 seconds",
            ));
        }
        if a.prompt.is_empty() {
            return Err(Error::invalid("body", "prompt", "prompt must not be empty"));
        }
        if a.prompt.len() > MAX_PROMPT || a.prompt.contains('\0') {
            return Err(Error::invalid(
                "body",
                "prompt",
                "prompt must be at most 256 KiB and contain no NUL",
            ));
        }
        if a.extra.len() > MAX_EXTRA_ARGS
            || a.extra
                .iter()
                .any(|x| x.len() > MAX_ARG_LEN || x.contains('\0'))
        {
            return Err(Error::invalid(
                "body",
                "extra_args",
                "at most 64 arguments of at most 4096 bytes, no NUL",
            ));
        }
        if a.read_only && a.workspace.is_none() {
            return Err(Error::invalid(
                "body",
                "read_only",
                "read_only is for a job over a workspace (a job over a repository never writes it)",
            ));
        }
        if a.workspace.is_some() {
            if !a.repo_path.is_empty() {
                return Err(Error::invalid(
                    "body",
                    "workspace",
                    "give repo_path or workspace, not both (a workspace has its repository)",
                ));
            }
        } else if a.repo_path.is_empty() || a.repo_path.contains('\0') {
            return Err(Error::invalid(
                "body",
                "repo_path",
                "repo_path must be a non-empty path",
            ));
        }
        let Some(profile) = self.cfg.agents.get(a.agent) else {
            let valid: Vec<&str> = self.cfg.agents.keys().map(String::as_str).collect();
            return Err(Error::Unknown(format!(
                "Unknown agent '{}'. Valid agents: {}",
                bounded(a.agent, 64),
                valid.join(", ")
            )));
        };
        if let Some((arg, flag)) = profile.refused_arg(a.extra) {
            return Err(Error::Forbidden(format!(
                "extra_args: {} ({flag}) changes where the {} agent's traffic or credentials go; its profile refuses it (refused_args in the server's config)",
                bounded(arg, 64),
                a.agent
            )));
        }
        let network = match a.network {
            None => None,
            Some(n) => Some(check_network(profile, a.agent, n, p)?),
        };
        // over a workspace: chosen in submit
        let image = self.asked_image(profile, a.image, a.workspace.is_some())?;
        let repo = match a.workspace {
            // checked with the workspace, in submit
            Some(_) => PathBuf::new(),
            None => check_repo(&self.roots, a.repo_path)?,
        };
        Ok(Valid {
            agent: a.agent.into(),
            prompt: a.prompt.into(),
            repo,
            timeout: a.timeout,
            extra_args: a.extra.to_vec(),
            network,
            image,
        })
    }

    /// Validate a job request, queue it, and audit the outcome under
    /// `action` (`job.create`, or `agent.run` for the old API).
    pub async fn submit(&self, p: &Principal, action: &str, ask: &Ask<'_>) -> Result<Job> {
        self.need_mut(p, Scope::Run, action, None).await?;
        let v = match self.validate(p, ask) {
            Ok(v) => v,
            Err(e) => return self.rejected(p, action, None, e).await,
        };
        let id = new_job_id();
        let mut v = v;
        if let (None, Some(w)) = (ask.image, ask.workspace) {
            match self.workspace_image(p, w, ask.agent).await {
                Ok(i) => v.image = i,
                Err(e) => return self.rejected(p, action, None, e).await,
            }
        }
        // over a workspace: held for this job from now until it ends
        let (repo, held) = match ask.workspace {
            None => (v.repo, None),
            Some(w) => match self.hold_workspace(p, w, &id, ask.read_only).await {
                Ok(x) => x,
                Err(e) => return self.rejected(p, action, None, e).await,
            },
        };
        let job = self
            .runner
            .submit(NewJob {
                id: id.clone(),
                agent: v.agent,
                prompt: v.prompt,
                repo_path: repo.to_string_lossy().into_owned(),
                timeout_s: v.timeout,
                extra_args: v.extra_args,
                key_id: Some(p.key.id.clone()),
                network: v.network,
                image: v.image,
            })
            .await
            .map_err(submit_error);
        let job = match job {
            Ok(j) => j,
            Err(e) => {
                if let Some(ws) = held {
                    let _ = self.store.release_workspace(&ws, &id, None).await;
                }
                let _ = self.store.drop_reader(&id).await;
                return Err(e);
            }
        };
        self.record(p, action, Some(&job.id), "accepted", None)
            .await;
        Ok(job)
    }

    /// The job `id`, if it is `p`'s (or `p` is admin): anyone else's is as
    /// unknown as a job that never was.
    pub async fn find(&self, p: &Principal, id: &str) -> Result<Job> {
        let missing = || Error::NotFound(format!("No job {}", bounded(id, 64)));
        // ids are job_ and 16 hex digits: anything else is not looked up
        if id.len() > 64 {
            return Err(missing());
        }
        match self.store.get_job(id).await? {
            Some(j) if p.owns(&j) => Ok(j),
            _ => Err(missing()),
        }
    }

    /// One job, for a reader.
    pub async fn job(&self, p: &Principal, id: &str) -> Result<Job> {
        p.need(Scope::Read)?;
        self.find(p, id).await
    }

    /// Jobs newest first: `p`'s own (every job for admin keys), and the
    /// cursor of the next page.
    pub async fn list_jobs(
        &self,
        p: &Principal,
        f: &JobFilter<'_>,
    ) -> Result<(Vec<Job>, Option<String>)> {
        p.need(Scope::Read)?;
        let owner = (!p.is_admin()).then_some(p.key.id.as_str());
        let jobs = self
            .store
            .list_jobs(owner, f.status, f.agent, f.cursor, f.limit + 1)
            .await?;
        Ok(paged(jobs, f.limit, |j| j.seq))
    }

    /// The job's output, stored then live, then its end; holds one of
    /// `p`'s stream slots until the reader goes away.
    pub async fn follow(
        &self,
        p: &Principal,
        id: &str,
        after: i64,
    ) -> Result<mpsc::Receiver<output::Item>> {
        let (job, slot) = self.open_stream(p, id).await?;
        Ok(output::stored_then_live(
            self.store.clone(),
            self.runner.clone(),
            job,
            after,
            slot,
        ))
    }

    /// A job to read from a stream (its log, recording or patch), with the
    /// stream slot that reading holds.
    pub async fn open_stream(&self, p: &Principal, id: &str) -> Result<(Job, Slot)> {
        let job = self.job(p, id).await?;
        let slot = self.slot(p)?;
        Ok((job, slot))
    }

    /// A job to read the patch of: only once it has ended.
    pub async fn open_patch(&self, p: &Principal, id: &str) -> Result<(Job, Slot)> {
        let job = self.job(p, id).await?;
        if !job.status.is_final() {
            return Err(Error::Conflict(format!(
                "Job {id} is {}; its patch is stored when it ends",
                job.status.as_str()
            )));
        }
        let slot = self.slot(p)?;
        Ok((job, slot))
    }

    /// Cancel a queued or running job; the job as it is now.
    pub async fn cancel(&self, p: &Principal, id: &str) -> Result<Job> {
        const A: &str = "job.cancel";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let job = self.find(p, id).await?;
        if job.status.is_final() || !self.runner.cancel(id).await? {
            let e = Error::Conflict(format!(
                "Job {id} has already ended ({})",
                job.status.as_str()
            ));
            return self.rejected(p, A, Some(id), e).await;
        }
        self.record(p, A, Some(id), "accepted", None).await;
        self.find(p, id).await
    }

    /// Put the job's patch on a new branch `agentvm/<job-id>` of its
    /// repository (see `agentvm_workspace::apply_to_branch` for the rules).
    pub async fn apply(&self, p: &Principal, id: &str) -> Result<Applied> {
        const A: &str = "job.apply";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let job = self.find(p, id).await?;
        if !job.status.is_final() {
            return Err(Error::Conflict(format!(
                "Job {id} is {}; apply it when it has ended",
                job.status.as_str()
            )));
        }
        // the repo must still be inside an allowed root
        let repo = check_repo(&self.roots, &job.repo_path).map_err(|_| {
            Error::Conflict(
                "The job's repository is gone or no longer inside an allowed root".into(),
            )
        })?;
        let patch = self.store.patch(id).await?.flatten().unwrap_or_default();
        let branch = format!("agentvm/{id}");
        let message = format!("{}\n\nAgentVM-Job: {id}\n", job.prompt.trim_end());
        self.apply_patch(p, A, id, repo, patch, branch, message)
            .await
    }

    /// Commit `patch` on a new branch of `repo` (see
    /// `agentvm_workspace::apply_to_branch` for the rules), audited under
    /// `action` for `target`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn apply_patch(
        &self,
        p: &Principal,
        action: &str,
        target: &str,
        repo: PathBuf,
        patch: Vec<u8>,
        branch: String,
        message: String,
    ) -> Result<Applied> {
        let b2 = branch.clone();
        let res = tokio::task::spawn_blocking(move || {
            agentvm_workspace::apply_to_branch(&repo, &patch, &b2, &message)
        })
        .await
        .map_err(|_| Error::Internal("internal error while applying".into()))?;
        match res {
            Ok(commit) => {
                self.record(p, action, Some(target), "ok", Some(&branch))
                    .await;
                Ok(Applied { branch, commit })
            }
            Err(e) => {
                use agentvm_workspace::ApplyError as E;
                let err = match e {
                    E::Git(_) => {
                        tracing::error!(target = %target, error = %e, "apply failed");
                        Error::Internal(e.to_string())
                    }
                    _ => Error::Conflict(e.to_string()),
                };
                self.rejected(p, action, Some(target), err).await
            }
        }
    }

    /// Delete an ended job with its output and patch.
    pub async fn delete(&self, p: &Principal, id: &str) -> Result<()> {
        const A: &str = "job.delete";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let job = self.find(p, id).await?;
        if !self.store.delete_job(id).await? {
            let e = Error::Conflict(format!(
                "Job {id} is {}; cancel it first",
                job.status.as_str()
            ));
            return self.rejected(p, A, Some(id), e).await;
        }
        self.record(p, A, Some(id), "ok", None).await;
        Ok(())
    }
}

impl Service {
    /// The image a job or session over workspace `w` runs on when it names
    /// none: the workspace's, else its agent's profile's.
    pub(super) async fn workspace_image(
        &self,
        p: &Principal,
        w: &str,
        agent: &str,
    ) -> Result<Option<String>> {
        let ws = self.find_workspace(p, w).await?;
        if ws.image.is_some() {
            return Ok(ws.image);
        }
        match self
            .cfg
            .agents
            .get(agent)
            .and_then(|pr| pr.image.as_deref())
        {
            Some(name) => Ok(Some(self.resolve_image(name, false)?)),
            None => Ok(None),
        }
    }

    /// The image a request runs on, checked at validation: its own, else
    /// (not over a workspace, whose image is found later with
    /// `workspace_image`) its profile's.
    pub(super) fn asked_image(
        &self,
        profile: &crate::config::Profile,
        asked: Option<&str>,
        over_workspace: bool,
    ) -> Result<Option<String>> {
        match (asked, over_workspace) {
            (Some(name), _) => Ok(Some(self.resolve_image(name, true)?)),
            (None, true) => Ok(None),
            (None, false) => profile
                .image
                .as_deref()
                .map(|name| self.resolve_image(name, false))
                .transpose(),
        }
    }

    /// The digest of the image `name` names in the server's store: a
    /// request's own (`asked`) or its profile's.
    pub(super) fn resolve_image(&self, name: &str, asked: bool) -> Result<String> {
        if name.is_empty() || name.len() > 255 || name.contains('\0') {
            return Err(Error::invalid(
                "body",
                "image",
                "image must be a tag or digest of at most 255 bytes",
            ));
        }
        let found = agentvm_image::Store::open(&self.cfg.data_dir).and_then(|s| s.find(name));
        match found {
            Ok(img) => Ok(img.digest),
            Err(agentvm_image::ImageError::NotFound(_)) if asked => Err(Error::invalid(
                "body",
                "image",
                format!(
                    "no image {} on this server (agentvm images import, then agentvm images list)",
                    bounded(name, 64)
                ),
            )),
            Err(agentvm_image::ImageError::NotFound(_)) => Err(Error::Conflict(format!(
                "the agent's profile names the image {}, which this server does not have (agentvm images import)",
                bounded(name, 64)
            ))),
            Err(e) => Err(Error::Internal(format!("reading the image store: {e}"))),
        }
    }
}

/// A job's own network policy may narrow its profile's, never widen it:
/// a key may go beyond the profile only as far as an admin granted it
/// (its `network`), and admin keys may use any policy. Loopback, private
/// and metadata addresses are reachable only when named, so only an
/// admin-set profile or grant can open them.
pub(super) fn check_network(
    profile: &crate::config::Profile,
    agent: &str,
    n: &str,
    p: &Principal,
) -> Result<NetworkMode> {
    let want = parse_network(n)?;
    let base = &profile.network;
    let grant = p.key.network.as_ref();
    if p.is_admin() || base.covers(&want) || grant.is_some_and(|g| g.covers(&want)) {
        return Ok(want);
    }
    Err(Error::Forbidden(format!(
        "network {want} is wider than the {agent} profile's ({base}): a request may only narrow it; an admin can grant a key more (agentvm keys create --network)"
    )))
}

/// A request's network policy: its size checked before it is parsed.
pub(super) fn parse_network(n: &str) -> Result<NetworkMode> {
    if n.len() > MAX_NETWORK {
        return Err(Error::invalid(
            "body",
            "network",
            format!("network must be at most {MAX_NETWORK} bytes"),
        ));
    }
    NetworkMode::parse(n).map_err(|e| Error::invalid("body", "network", e))
}

/// `repo_path` must be an absolute path to a directory inside an allowed
/// root after every symlink is resolved.
pub fn check_repo(roots: &[PathBuf], repo_path: &str) -> Result<PathBuf> {
    let p = Path::new(repo_path);
    let shown = bounded(repo_path, 512);
    if !p.is_absolute() {
        return Err(Error::invalid(
            "body",
            "repo_path",
            format!("{shown} is not an absolute path"),
        ));
    }
    if roots.is_empty() {
        return Err(Error::Forbidden(
            "No allowed roots are configured: start the server with --allowed-root DIR (or allowed_roots in the config file) to let jobs use repositories under DIR".into(),
        ));
    }
    let canon = std::fs::canonicalize(p).map_err(|_| {
        Error::invalid(
            "body",
            "repo_path",
            format!("{shown} does not exist or the server cannot read it"),
        )
    })?;
    if !canon.is_dir() {
        return Err(Error::invalid(
            "body",
            "repo_path",
            format!("{shown} is not a directory"),
        ));
    }
    if !roots.iter().any(|r| canon.starts_with(r)) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(Error::Forbidden(format!(
            "{} is outside the allowed roots ({}); the server's --allowed-root (allowed_roots in its config) decides which trees jobs may use",
            canon.display(),
            list.join(", ")
        )));
    }
    Ok(canon)
}

fn new_job_id() -> String {
    super::new_id("job")
}

fn submit_error(e: SubmitError) -> Error {
    match e {
        SubmitError::QueueFull(n) => Error::Busy {
            msg: format!("The job queue is full ({n} waiting); retry later"),
            retry_s: 5,
        },
        SubmitError::Draining => Error::Unavailable {
            msg: "The server is shutting down and accepts no new jobs".into(),
            retry_s: 10,
        },
        SubmitError::Store(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A repo accepted after canonicalisation always lies inside a root,
        /// whatever `..`, `.` and `/` sequences the path holds.
        #[test]
        fn accepted_repos_stay_inside_the_roots(parts in proptest::collection::vec(prop_oneof![Just(".."), Just("."), Just("inner"), Just("link"), Just(""), Just("nope")], 0..8)) {
            let t = tempfile::tempdir().unwrap();
            let root = t.path().join("root");
            std::fs::create_dir_all(root.join("inner")).unwrap();
            std::os::unix::fs::symlink(t.path(), root.join("link")).unwrap();
            let root = std::fs::canonicalize(&root).unwrap();
            let p = format!("{}/{}", root.display(), parts.join("/"));
            if let Ok(ok) = check_repo(std::slice::from_ref(&root), &p) {
                prop_assert!(ok.starts_with(&root), "{} escaped to {}", p, ok.display());
            }
        }
    }
}
