//! `/v1/workspaces`: make (over a repository, or a fork of a checkpoint),
//! list, show, delete; checkpoints, restore; the patch of everything a
//! workspace changed, and its apply. Each handler parses, calls the
//! service and shapes the answer (docs/WORKSPACES.md).

use super::*;

const ID: &str = "Workspace id, or the name of one of yours";

/// Make a workspace: a persistent copy-on-write view of a repository
/// (`repo_path`), or a fork of a checkpoint (`from_checkpoint`, verified
/// first). Jobs given `workspace` run over it and leave their changes in it.
#[utoipa::path(post, path = "/v1/workspaces", request_body = WorkspaceRequest,
    responses((status = 201, body = WorkspaceView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail, description = "No such checkpoint"),
        (status = 409, body = ErrorDetail, description = "The name is taken, or the checkpoint is damaged"),
        (status = 413, description = "Body too large"), (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_workspace(State(st): S, caller: Principal, body: Bytes) -> ApiResult<Response> {
    st.need_mut(&caller, Scope::Run, "workspace.create", None)
        .await?;
    let req: WorkspaceRequest = parse_body(&body)?;
    let w = st.create_workspace(&caller, &req).await?;
    let loc = format!("/v1/workspaces/{}", w.id);
    Ok(created(&loc, st.workspace_view(w).await))
}

/// The key's workspaces (everyone's for admin keys), oldest first.
#[utoipa::path(get, path = "/v1/workspaces",
    responses((status = 200, body = WorkspacePage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_workspaces(State(st): S, caller: Principal) -> ApiResult<Json<WorkspacePage>> {
    let list = st.list_workspaces(&caller).await?;
    let mut workspaces = Vec::with_capacity(list.len());
    for w in list {
        workspaces.push(st.workspace_view(w).await);
    }
    Ok(Json(WorkspacePage { workspaces }))
}

/// One workspace: its layers, their size, the job writing it now.
#[utoipa::path(get, path = "/v1/workspaces/{id}", params(("id" = String, Path, description = ID)),
    responses((status = 200, body = WorkspaceView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn get_workspace(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(
        st.workspace_view(st.find_workspace(&caller, &id).await?)
            .await,
    ))
}

/// Delete a workspace and its checkpoints (forks keep what they need).
#[utoipa::path(delete, path = "/v1/workspaces/{id}", params(("id" = String, Path, description = ID)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail, description = "A job is writing it"),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn delete_workspace(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    st.delete_workspace(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Take a checkpoint `{name}`: the workspace as it is now, kept (no copy
/// is made: layers are never written).
#[utoipa::path(post, path = "/v1/workspaces/{id}/checkpoints", params(("id" = String, Path, description = ID)), request_body = CheckpointRequest,
    responses((status = 201, body = CheckpointView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail, description = "The name is taken"),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_checkpoint(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    st.need_mut(&caller, Scope::Run, "workspace.checkpoint", Some(&id))
        .await?;
    let req: CheckpointRequest = parse_body(&body)?;
    let c = st.checkpoint(&caller, &id, &req).await?;
    Ok((StatusCode::CREATED, Json(st.checkpoint_view(c))).into_response())
}

/// The workspace's checkpoints, oldest first, with their sizes.
#[utoipa::path(get, path = "/v1/workspaces/{id}/checkpoints", params(("id" = String, Path, description = ID)),
    responses((status = 200, body = CheckpointPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_checkpoints(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<CheckpointPage>> {
    let list = st.checkpoints(&caller, &id).await?;
    Ok(Json(CheckpointPage {
        checkpoints: list.into_iter().map(|c| st.checkpoint_view(c)).collect(),
    }))
}

/// Put the workspace back to a checkpoint `{checkpoint}` (id or name),
/// once every file of it matches its manifest; refused, naming the file,
/// when one does not.
#[utoipa::path(post, path = "/v1/workspaces/{id}/restore", params(("id" = String, Path, description = ID)), request_body = CheckpointRequest,
    responses((status = 200, body = WorkspaceView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail, description = "A job is writing it, or the checkpoint is damaged"),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn restore_workspace(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Json<WorkspaceView>> {
    st.need_mut(&caller, Scope::Run, "workspace.restore", Some(&id))
        .await?;
    let req: CheckpointRequest = parse_body(&body)?;
    let w = st.restore(&caller, &id, &req).await?;
    Ok(Json(st.workspace_view(w).await))
}

/// Everything the workspace changed against its repository, as a git
/// patch `git apply` reproduces exactly (empty when nothing changed).
#[utoipa::path(get, path = "/v1/workspaces/{id}/patch", params(("id" = String, Path, description = ID)),
    responses((status = 200, description = "A git patch", content_type = "text/x-diff", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn workspace_patch(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let (_, patch) = st.workspace_patch(&caller, &id).await?;
    Ok(diff_response(patch))
}

/// Delete one checkpoint (id or name). Forks made from it, and the
/// workspace itself, keep every layer they name; only layers nothing names
/// any more are removed.
#[utoipa::path(delete, path = "/v1/workspaces/{id}/checkpoints/{checkpoint}",
    params(("id" = String, Path, description = ID), ("checkpoint" = String, Path, description = "Checkpoint id, or its name in this workspace")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail, description = "No such workspace, or no such checkpoint in it"),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn delete_checkpoint(
    State(st): S,
    caller: Principal,
    UrlPath((id, checkpoint)): UrlPath<(String, String)>,
) -> ApiResult<StatusCode> {
    st.delete_checkpoint(&caller, &id, &checkpoint).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    /// A checkpoint (id or name) of this workspace; absent: the
    /// repository as it is.
    pub(super) from: Option<String>,
    /// A checkpoint (id or name) of this workspace; absent: the workspace
    /// now.
    pub(super) to: Option<String>,
}

/// What changed between two states of the workspace, as a git patch that
/// turns `from` into `to` (empty when they are the same). Only the paths
/// either state changed are compared, so the cost follows the changes.
#[utoipa::path(get, path = "/v1/workspaces/{id}/diff", params(("id" = String, Path, description = ID), DiffQuery),
    responses((status = 200, description = "A git patch", content_type = "text/x-diff", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail, description = "No such workspace, or no such checkpoint in it"),
        (status = 409, body = ErrorDetail), (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn workspace_diff(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| {
        let text = e.body_text();
        // the parameter serde names (`unknown field `x``), else both
        let name = text
            .split('`')
            .nth(1)
            .filter(|n| n.len() <= 64)
            .unwrap_or("from")
            .to_string();
        ApiError::field("query", &name, text)
    })?;
    let (_, patch) = st
        .workspace_diff(&caller, &id, q.from.as_deref(), q.to.as_deref())
        .await?;
    Ok(diff_response(patch))
}

/// Put the workspace's patch on a new branch `agentvm/<workspace-id>` of
/// its repository, by the same rules as a job's apply.
#[utoipa::path(post, path = "/v1/workspaces/{id}/apply", params(("id" = String, Path, description = ID)),
    responses((status = 201, body = Applied), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn apply_workspace(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Applied>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.apply_workspace(&caller, &id).await?),
    ))
}

/// Check every layer of the workspace and of its checkpoints against its
/// manifest (paths, modes, sizes, SHA-256 of every file): each damaged
/// layer is named with its first differing path.
#[utoipa::path(post, path = "/v1/workspaces/{id}/verify", params(("id" = String, Path, description = ID)),
    responses((status = 200, body = Verified), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn verify_workspace(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Verified>> {
    Ok(Json(st.verify_workspace(&caller, &id).await?))
}
