//! Workspaces (docs/WORKSPACES.md): a repository's persistent state as a
//! stack of layers, checkpoints of it, forks and restores, the patch of
//! all of it against the repository; and the hold a job over a workspace
//! has on it while it runs.

use std::path::{Path, PathBuf};

use agentvm_proto::api::{
    Applied, CheckpointRequest, CheckpointView, Damage, Verified, WorkspaceRequest, WorkspaceView,
};
use agentvm_store::{bounded, Checkpoint, NewCheckpoint, NewWorkspace, StoreError, Workspace};
use agentvm_workspace::layer;

use super::jobs::check_repo;
use super::{new_id, valid_name, Error, Principal, Result, Service};
use crate::auth::Scope;

/// Layers a stack may have before its oldest are squashed into one.
pub const SQUASH_AT: usize = 48;

fn store_error(what: &str, e: StoreError) -> Error {
    match e {
        StoreError::Taken(t) => Error::Conflict(format!("{t}: choose another {what} name")),
        e => e.into(),
    }
}

fn layer_error(e: layer::LayerError) -> Error {
    match e {
        layer::LayerError::Damaged { id, path, why } => Error::Conflict(format!(
            "The layer {id} is damaged at {path} ({why}); nothing was changed"
        )),
        e => {
            tracing::error!(error = %e, "a workspace layer could not be read or made");
            Error::Internal("a workspace layer could not be read or made".into())
        }
    }
}

impl Service {
    /// Where every layer lives.
    pub fn layer_store(&self) -> PathBuf {
        self.cfg.data_dir.join("layers")
    }

    /// The workspace `id_or_name`, if `p` may see it.
    pub async fn find_workspace(&self, p: &Principal, id_or_name: &str) -> Result<Workspace> {
        p.need(Scope::Read)?;
        let missing = || Error::NotFound(format!("No workspace {}", bounded(id_or_name, 64)));
        if id_or_name.len() > 64 {
            return Err(missing());
        }
        if let Some(w) = self.store.get_workspace(id_or_name).await? {
            if p.is_admin() || w.owner == p.key.id {
                return Ok(w);
            }
            return Err(missing());
        }
        self.store
            .workspace_named(&p.key.id, id_or_name)
            .await?
            .ok_or_else(missing)
    }

    async fn find_checkpoint(&self, w: &Workspace, id_or_name: &str) -> Result<Checkpoint> {
        let missing = || {
            Error::NotFound(format!(
                "No checkpoint {} in workspace {}",
                bounded(id_or_name, 64),
                w.name
            ))
        };
        if id_or_name.len() > 64 {
            return Err(missing());
        }
        if let Some(c) = self.store.get_checkpoint(id_or_name).await? {
            if c.workspace_id == w.id {
                return Ok(c);
            }
        }
        self.store
            .checkpoint_named(&w.id, id_or_name)
            .await?
            .ok_or_else(missing)
    }

    /// Sizes from the manifests (what the layers hold, not what they share).
    fn bytes_of(&self, stack: &[String]) -> u64 {
        crate::runner::layers_bytes(&self.layer_store(), stack)
    }

    /// The workspace as the API shows it, with what its layers and its
    /// checkpoints' hold against its quota.
    pub async fn workspace_view(&self, w: Workspace) -> WorkspaceView {
        let used = match self.runner.workspace_used(&w).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(workspace = %w.id, error = %e, "reading a workspace's checkpoints failed");
                self.bytes_of(&w.stack)
            }
        };
        WorkspaceView {
            bytes: self.bytes_of(&w.stack),
            used_bytes: used,
            quota_bytes: self.cfg.workspace_quota,
            layers: w.stack.len(),
            id: w.id,
            name: w.name,
            owner: w.owner,
            repo_path: w.repo_path,
            writer: w.writer,
            image: w.image,
            created_at: w.created_at,
            updated_at: w.updated_at,
        }
    }

    pub fn checkpoint_view(&self, c: Checkpoint) -> CheckpointView {
        CheckpointView {
            bytes: self.bytes_of(&c.stack),
            layers: c.stack.len(),
            id: c.id,
            name: c.name,
            workspace: c.workspace_id,
            created_at: c.created_at,
        }
    }

    /// Every layer of `stack`, checked against its manifest (off the
    /// async threads: it reads every byte the layers hold).
    async fn verify_stack(&self, stack: &[String]) -> Result<()> {
        let store = self.layer_store();
        let stack = stack.to_vec();
        tokio::task::spawn_blocking(move || {
            for l in &stack {
                layer::verify(&store, l)?;
            }
            Ok(())
        })
        .await
        .map_err(|_| Error::Internal("internal error while verifying".into()))?
        .map_err(layer_error)
    }

    /// Check every layer of the workspace and of its checkpoints against
    /// its manifest, on demand; each damaged one is named with its first
    /// differing path.
    pub async fn verify_workspace(&self, p: &Principal, id: &str) -> Result<Verified> {
        let w = self.find_workspace(p, id).await?;
        let mut all: Vec<String> = w.stack.clone();
        for c in self.store.list_checkpoints(&w.id).await? {
            all.extend(c.stack);
        }
        all.sort();
        all.dedup();
        let store = self.layer_store();
        let n = all.len();
        let damaged = tokio::task::spawn_blocking(move || {
            let mut damaged = Vec::new();
            for l in &all {
                match layer::verify(&store, l) {
                    Ok(_) => {}
                    Err(layer::LayerError::Damaged { id, path, why }) => damaged.push(Damage {
                        layer: id,
                        path,
                        why,
                    }),
                    Err(e) => damaged.push(Damage {
                        layer: l.clone(),
                        path: "/".into(),
                        why: e.to_string(),
                    }),
                }
            }
            damaged
        })
        .await
        .map_err(|_| Error::Internal("internal error while verifying".into()))?;
        self.record(
            p,
            "workspace.verify",
            Some(&w.id),
            if damaged.is_empty() { "ok" } else { "damaged" },
            None,
        )
        .await;
        Ok(Verified { layers: n, damaged })
    }

    /// A new workspace over a repository, or a fork of a checkpoint.
    pub async fn create_workspace(&self, p: &Principal, r: &WorkspaceRequest) -> Result<Workspace> {
        const A: &str = "workspace.create";
        self.need_mut(p, Scope::Run, A, None).await?;
        let made = async {
            if !valid_name(&r.name) {
                return Err(Error::invalid(
                    "body",
                    "name",
                    "1 to 64 of letters, digits, '.', '_' and '-', not starting with '-'",
                ));
            }
            let (repo, stack) = match (&r.repo_path, &r.from_checkpoint) {
                (Some(path), None) => (check_repo(&self.roots, path)?, Vec::new()),
                (None, Some(cp)) => {
                    // held until the fork names the layers (a sweep waits)
                    let named = self.runner.layers_lock.lock().await;
                    let missing = || Error::NotFound(format!("No checkpoint {}", bounded(cp, 64)));
                    let c = self.store.get_checkpoint(cp).await?.ok_or_else(missing)?;
                    // a checkpoint is as visible as its workspace
                    let from = self.find_workspace(p, &c.workspace_id).await.map_err(|_| missing())?;
                    self.verify_stack(&c.stack).await?;
                    let repo = check_repo(&self.roots, &from.repo_path).map_err(|_| {
                        Error::Conflict("The checkpoint's repository is gone or no longer inside an allowed root".into())
                    })?;
                    let w = self
                        .store
                        .create_workspace(&NewWorkspace {
                            id: new_id("ws"),
                            name: r.name.clone(),
                            owner: p.key.id.clone(),
                            repo_path: repo.to_string_lossy().into_owned(),
                            stack: c.stack,
                            image: match r.image.as_deref() {
                                Some(i) => Some(self.resolve_image(i, true)?),
                                None => from.image.clone(),
                            },
                        })
                        .await
                        .map_err(|e| store_error("workspace", e));
                    drop(named);
                    return w;
                }
                _ => {
                    return Err(Error::invalid(
                        "body",
                        "repo_path",
                        "give repo_path or from_checkpoint (one of them)",
                    ))
                }
            };
            self.store
                .create_workspace(&NewWorkspace {
                    id: new_id("ws"),
                    name: r.name.clone(),
                    owner: p.key.id.clone(),
                    repo_path: repo.to_string_lossy().into_owned(),
                    stack,
                    image: r
                        .image
                        .as_deref()
                        .map(|i| self.resolve_image(i, true))
                        .transpose()?,
                })
                .await
                .map_err(|e| store_error("workspace", e))
        }
        .await;
        match made {
            Ok(w) => {
                let how = r.from_checkpoint.as_deref().map(|c| format!("from {c}"));
                self.record(p, A, Some(&w.id), "ok", how.as_deref()).await;
                Ok(w)
            }
            Err(e) => self.rejected(p, A, None, e).await,
        }
    }

    /// `p`'s workspaces (everyone's for admin keys), oldest first.
    pub async fn list_workspaces(&self, p: &Principal) -> Result<Vec<Workspace>> {
        p.need(Scope::Read)?;
        let owner = (!p.is_admin()).then_some(p.key.id.as_str());
        Ok(self.store.list_workspaces(owner).await?)
    }

    /// Delete a workspace and its checkpoints (not while a job writes it);
    /// layers nobody names any more go with them.
    pub async fn delete_workspace(&self, p: &Principal, id: &str) -> Result<()> {
        const A: &str = "workspace.delete";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let w = self.find_workspace(p, id).await?;
        self.clear_stale_writer(&w).await?;
        if !self.store.delete_workspace(&w.id).await? {
            let e = Error::Conflict(format!(
                "Workspace {} is being written by job {}; delete it when that job has ended",
                w.name,
                w.writer.as_deref().unwrap_or("?")
            ));
            return self.rejected(p, A, Some(&w.id), e).await;
        }
        self.record(p, A, Some(&w.id), "ok", None).await;
        self.sweep_layers().await;
        Ok(())
    }

    /// Delete one checkpoint of the workspace. The layers it named stay
    /// for whatever else names them (the workspace, its other
    /// checkpoints, forks made from it, readers); the rest are swept.
    pub async fn delete_checkpoint(&self, p: &Principal, id: &str, checkpoint: &str) -> Result<()> {
        const A: &str = "workspace.checkpoint.delete";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let w = self.find_workspace(p, id).await?;
        let c = match self.find_checkpoint(&w, checkpoint).await {
            Ok(c) => c,
            Err(e) => return self.rejected(p, A, Some(&w.id), e).await,
        };
        if !self.store.delete_checkpoint(&c.id).await? {
            let e = Error::NotFound(format!("No checkpoint {} in workspace {}", c.name, w.name));
            return self.rejected(p, A, Some(&w.id), e).await;
        }
        self.record(p, A, Some(&w.id), "ok", Some(&c.id)).await;
        self.sweep_layers().await;
        Ok(())
    }

    /// Take a checkpoint: the workspace's stack as it is now, named. No
    /// byte is copied (layers are never written).
    pub async fn checkpoint(
        &self,
        p: &Principal,
        id: &str,
        r: &CheckpointRequest,
    ) -> Result<Checkpoint> {
        const A: &str = "workspace.checkpoint";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let w = self.find_workspace(p, id).await?;
        let name = r.name.as_deref().unwrap_or("");
        if !valid_name(name) || r.checkpoint.is_some() {
            let e = Error::invalid(
                "body",
                "name",
                "the checkpoint's name: 1 to 64 of letters, digits, '.', '_' and '-', not starting with '-'",
            );
            return self.rejected(p, A, Some(&w.id), e).await;
        }
        let c = self
            .store
            .create_checkpoint(&NewCheckpoint {
                id: new_id("cp"),
                workspace_id: w.id.clone(),
                name: name.into(),
                stack: w.stack.clone(),
            })
            .await
            .map_err(|e| store_error("checkpoint", e));
        match c {
            Ok(c) => {
                self.record(p, A, Some(&w.id), "ok", Some(&c.id)).await;
                Ok(c)
            }
            Err(e) => self.rejected(p, A, Some(&w.id), e).await,
        }
    }

    pub async fn checkpoints(&self, p: &Principal, id: &str) -> Result<Vec<Checkpoint>> {
        let w = self.find_workspace(p, id).await?;
        Ok(self.store.list_checkpoints(&w.id).await?)
    }

    /// Put the workspace back to a checkpoint, once every layer of it
    /// checks out; not while a job writes it.
    pub async fn restore(
        &self,
        p: &Principal,
        id: &str,
        r: &CheckpointRequest,
    ) -> Result<Workspace> {
        const A: &str = "workspace.restore";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let w = self.find_workspace(p, id).await?;
        let done = async {
            let Some(which) = r.checkpoint.as_deref() else {
                return Err(Error::invalid(
                    "body",
                    "checkpoint",
                    "the checkpoint to restore (its id or name)",
                ));
            };
            let c = self.find_checkpoint(&w, which).await?;
            self.verify_stack(&c.stack).await?;
            self.clear_stale_writer(&w).await?;
            if !self.store.set_workspace_stack(&w.id, &c.stack).await? {
                return Err(Error::Conflict(format!(
                    "Workspace {} is being written by a job; restore it when that job has ended",
                    w.name
                )));
            }
            Ok(c)
        }
        .await;
        match done {
            Ok(c) => {
                self.record(p, A, Some(&w.id), "ok", Some(&c.id)).await;
                self.sweep_layers().await;
                self.find_workspace(p, &w.id).await
            }
            Err(e) => self.rejected(p, A, Some(&w.id), e).await,
        }
    }

    /// Everything the workspace changed against its repository, as a git
    /// patch (`git apply` reproduces it exactly): its stack squashed into
    /// a scratch layer (hard links), diffed against the repo.
    pub async fn workspace_patch(&self, p: &Principal, id: &str) -> Result<(Workspace, Vec<u8>)> {
        let w = self.find_workspace(p, id).await?;
        let repo = check_repo(&self.roots, &w.repo_path).map_err(|_| {
            Error::Conflict(
                "The workspace's repository is gone or no longer inside an allowed root".into(),
            )
        })?;
        let scratch = self.cfg.data_dir.join("layers-scratch");
        let stack = w.stack.clone();
        let store = self.layer_store();
        let max = self.cfg.max_patch;
        // no sweep removes a layer while it is read
        let _named = self.runner.layers_lock.lock().await;
        let patch =
            tokio::task::spawn_blocking(move || diff_of(&store, &scratch, &[], &stack, &repo, max))
                .await
                .map_err(|_| Error::Internal("internal error while making the patch".into()))??;
        Ok((w, patch))
    }

    /// What changed from checkpoint `from` to checkpoint `to` of the
    /// workspace (ids or names; `from` absent: the repository, `to`
    /// absent: the workspace now), as a git patch that turns the first
    /// state into the second. Each side's stack is squashed (hard links)
    /// and read against the repo; only the paths either changed are
    /// compared.
    pub async fn workspace_diff(
        &self,
        p: &Principal,
        id: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<(Workspace, Vec<u8>)> {
        let w = self.find_workspace(p, id).await?;
        // an empty parameter is an absent one
        let (from, to) = (from.filter(|f| !f.is_empty()), to.filter(|t| !t.is_empty()));
        let from_stack = match from {
            Some(c) => self.find_checkpoint(&w, c).await?.stack,
            None => Vec::new(),
        };
        let to_stack = match to {
            Some(c) => self.find_checkpoint(&w, c).await?.stack,
            None => w.stack.clone(),
        };
        let repo = check_repo(&self.roots, &w.repo_path).map_err(|_| {
            Error::Conflict(
                "The workspace's repository is gone or no longer inside an allowed root".into(),
            )
        })?;
        let scratch = self.cfg.data_dir.join("layers-scratch");
        let store = self.layer_store();
        let max = self.cfg.max_patch;
        // no sweep removes a layer while it is read
        let _named = self.runner.layers_lock.lock().await;
        let patch = tokio::task::spawn_blocking(move || {
            diff_of(&store, &scratch, &from_stack, &to_stack, &repo, max)
        })
        .await
        .map_err(|_| Error::Internal("internal error while making the diff".into()))??;
        Ok((w, patch))
    }

    /// The workspace's patch on a new branch `agentvm/<workspace-id>` of
    /// its repository, by the same rules as a job's apply.
    pub async fn apply_workspace(&self, p: &Principal, id: &str) -> Result<Applied> {
        const A: &str = "workspace.apply";
        self.need_mut(p, Scope::Run, A, Some(id)).await?;
        let (w, patch) = self.workspace_patch(p, id).await?;
        let repo = check_repo(&self.roots, &w.repo_path)?;
        let branch = format!("agentvm/{}", w.id);
        let message = format!(
            "AgentVM workspace {}\n\nAgentVM-Workspace: {}\n",
            w.name, w.id
        );
        self.apply_patch(p, A, &w.id, repo, patch, branch, message)
            .await
    }

    /// Hold workspace `id_or_name` for writer `job` (a job or a session
    /// over it writes it): its repository, and its id to let go of it with.
    pub(super) async fn hold_workspace(
        &self,
        p: &Principal,
        id_or_name: &str,
        job: &str,
        read_only: bool,
    ) -> Result<(PathBuf, Option<String>)> {
        let w = self.find_workspace(p, id_or_name).await?;
        let repo = check_repo(&self.roots, &w.repo_path).map_err(|_| {
            Error::Conflict(
                "The workspace's repository is gone or no longer inside an allowed root".into(),
            )
        })?;
        if read_only {
            // beside any writer: the stack as it is now, kept from the
            // sweep until this reader ends
            let _named = self.runner.layers_lock.lock().await;
            let now = self.store.get_workspace(&w.id).await?.unwrap_or(w);
            self.store.add_reader(job, &now.id, &now.stack).await?;
            return Ok((repo, None));
        }
        self.clear_stale_writer(&w).await?;
        if let Some(q) = self.runner.quota_left(&w).await? {
            if q.left < crate::runner::QUOTA_FLOOR {
                return Err(Error::Conflict(format!(
                    "Workspace {} has no disk left for a job or session: {}. Delete checkpoints or workspaces you no longer need, or raise the quota",
                    w.name, q.why
                )));
            }
        }
        if !self.store.take_workspace(&w.id, job).await? {
            let now = self.store.get_workspace(&w.id).await?;
            return Err(Error::Conflict(format!(
                "Workspace {} is being written by {}; one job or session writes a workspace at a time: start this one when that one has ended",
                w.name,
                now.and_then(|n| n.writer).unwrap_or_else(|| "?".into())
            )));
        }
        Ok((repo, Some(w.id)))
    }

    /// A workspace still held by a job that has ended or is gone (a client
    /// that went away between the hold and the job's record, a lost
    /// race) is let go of: a hold never outlives its job.
    async fn clear_stale_writer(&self, w: &Workspace) -> Result<()> {
        let Some(job) = &w.writer else {
            return Ok(());
        };
        if self.runner.writer_ended(job).await? {
            tracing::warn!(workspace = %w.id, job, "a workspace was still held by a job that has ended; let go of");
            self.store.release_workspace(&w.id, job, None).await?;
        }
        Ok(())
    }

    /// Remove layers no workspace or checkpoint names (and what a crash
    /// left half made). Never fails a request: what stays is tried again.
    pub async fn sweep_layers(&self) {
        let _named = self.runner.layers_lock.lock().await;
        let used = match self.store.layers_in_use().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "listing the layers in use failed; none removed");
                return;
            }
        };
        let busy = self.runner.layers_being_made();
        let store = self.layer_store();
        let r = tokio::task::spawn_blocking(move || {
            layer::sweep(&store, &|id| {
                used.iter().any(|u| u == id) || busy.iter().any(|b| b == id)
            })
        })
        .await;
        match r {
            Ok(Ok(gone)) if !gone.is_empty() => {
                tracing::info!(layers = gone.len(), "removed layers nothing names")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "removing unused layers failed"),
            _ => {}
        }
    }
}

/// The patch from the state stack `from` lays over `repo` to the one
/// `to` does (an empty stack: the repo itself).
fn diff_of(
    store: &Path,
    scratch: &Path,
    from: &[String],
    to: &[String],
    repo: &Path,
    max: u64,
) -> Result<Vec<u8>> {
    use std::os::fd::AsFd;
    if from == to {
        return Ok(Vec::new());
    }
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "{what}");
        Error::Internal(format!("{what} failed"))
    };
    // each side's stack squashed into a scratch layer that is only read
    // here, then removed (an empty stack: an empty directory)
    let _ = std::fs::create_dir_all(scratch);
    let mut made = Vec::new();
    let mut side = |stack: &[String]| -> Result<std::fs::File> {
        let id = new_id("patch").replace('_', "-");
        made.push(id.clone());
        if stack.is_empty() {
            std::fs::create_dir(layer::path(scratch, &id))
                .map_err(|e| internal("making an empty scratch layer", &e))?;
        } else {
            layer::squash_into(store, stack, scratch, &id).map_err(layer_error)?;
        }
        std::fs::File::open(layer::path(scratch, &id))
            .map_err(|e| internal("opening the squashed layer", &e))
    };
    let result = (|| {
        let lower =
            std::fs::File::open(repo).map_err(|e| internal("opening the repository", &e))?;
        let capture = |upper: &std::fs::File| {
            agentvm_workspace::capture(upper.as_fd(), Some(lower.as_fd()))
                .map_err(|e| internal("reading the workspace's changes", &e))
        };
        let b = capture(&side(to)?)?;
        let opts = agentvm_workspace::PatchOptions {
            max_bytes: max,
            ..Default::default()
        };
        let mut out = Vec::new();
        let rendered = if from.is_empty() {
            agentvm_workspace::render(&b, &opts, &mut out)
        } else {
            let a = capture(&side(from)?)?;
            agentvm_workspace::render_between(&a, &b, &opts, &mut out)
        };
        rendered.map_err(|e| match e {
            agentvm_workspace::RenderError::TooLarge { .. } => Error::Conflict(format!(
                "The patch is larger than this server's limit of {max} bytes"
            )),
            e => internal("rendering the workspace's patch", &e),
        })?;
        Ok(out)
    })();
    for id in made {
        let _ = layer::remove(scratch, &id);
    }
    result
}
