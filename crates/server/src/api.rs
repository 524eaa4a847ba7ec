//! The HTTP surface: the compat API old clients speak (`GET /health`,
//! `POST /agent/run`), the native `/v1` API, OpenAPI and metrics.
//!
//! Errors are `{"detail": ...}` everywhere, as the old FastAPI server sent
//! them; validation errors (422) list which field failed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentvm_store::{ApiKey, Job, JobStatus, NewJob, Store};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{self, RateLimiter, Scope};
use crate::config::Config;
use crate::metrics::{Metrics, StateLabel};
use crate::runner::{Live, Runner, SubmitError};

pub struct AppState {
    pub runner: Arc<Runner>,
    pub store: Store,
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    /// Canonical allowed roots.
    pub roots: Vec<PathBuf>,
}

pub type S = State<Arc<AppState>>;

// ------------------------------------------------------------- errors

/// `{"detail": "..."}`
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub detail: String,
}

/// One failed field, as FastAPI reports it.
#[derive(Serialize, ToSchema)]
pub struct FieldError {
    /// Where: ["body", "<field>"] or ["query", "<param>"].
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// `{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`
#[derive(Serialize, ToSchema)]
pub struct ValidationError {
    pub detail: Vec<FieldError>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            body: serde_json::json!({ "detail": detail.into() }),
            retry_after: None,
        }
    }
    pub fn field(place: &str, field: &str, msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: serde_json::json!({ "detail": [{ "loc": [place, field], "msg": msg.into(), "type": "value_error" }] }),
            retry_after: None,
        }
    }
    fn retry(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<agentvm_store::StoreError> for ApiError {
    fn from(e: agentvm_store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the database could not be reached",
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Parse a JSON body, naming the field that failed.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde reports a missing or unknown top-level field at the root:
        // name it from the message ("missing field `prompt`")
        let named = inner.to_string().split('`').nth(1).map(str::to_owned);
        let field = match (path.as_str(), named) {
            (".", Some(f)) => f,
            (".", None) => "body".to_string(),
            _ => path,
        };
        let msg = if inner.is_syntax() || inner.is_eof() {
            format!("invalid JSON: {inner}")
        } else {
            inner.to_string()
        };
        ApiError::field("body", &field, msg)
    })
}

// --------------------------------------------------------------- auth

pub struct Caller {
    pub key: ApiKey,
    pub client: String,
}

/// Authenticate, rate-limit and check the scope of a request.
pub async fn authorize(
    st: &AppState,
    headers: &HeaderMap,
    addr: SocketAddr,
    need: Scope,
) -> ApiResult<Caller> {
    let client = addr.ip().to_string();
    let Some(secret) = auth::presented(headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Missing API key: send it in the X-API-Key header or as Authorization: Bearer",
        ));
    };
    let h = auth::hash(&secret);
    let key = match st.store.key_by_hash(&h).await? {
        Some(k) if k.revoked_at.is_none() && auth::same(&k.hash, &h) => k,
        _ => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid API key")),
    };
    if let Err(wait) = st.limiter.check(&key.id) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Rate limit exceeded for this key; retry in {wait} s"),
        )
        .retry(wait));
    }
    let have = auth::max_scope(&key.scopes);
    if have < Some(need) {
        let name = match need {
            Scope::Read => "read",
            Scope::Run => "run",
            Scope::Admin => "admin",
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("This API key lacks the {name} scope"),
        ));
    }
    Ok(Caller { key, client })
}

async fn audit(
    st: &AppState,
    who: Option<&Caller>,
    action: &str,
    target: Option<&str>,
    client: &str,
    outcome: &str,
    detail: Option<&str>,
) {
    if let Err(e) = st
        .store
        .audit(
            who.map(|c| c.key.id.as_str()),
            action,
            target,
            Some(client),
            outcome,
            detail,
        )
        .await
    {
        tracing::error!(error = %e, "writing the audit trail failed");
    }
}

impl Caller {
    /// Audit a call made with this key from this client.
    async fn record(
        &self,
        st: &AppState,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<&str>,
    ) {
        audit(
            st,
            Some(self),
            action,
            target,
            &self.client,
            outcome,
            detail,
        )
        .await
    }
}

/// Authorize a mutating call; failures are audited too.
async fn authorize_mut(
    st: &AppState,
    headers: &HeaderMap,
    addr: SocketAddr,
    need: Scope,
    action: &str,
    target: Option<&str>,
) -> ApiResult<Caller> {
    match authorize(st, headers, addr, need).await {
        Ok(c) => Ok(c),
        Err(e) => {
            let outcome = format!("denied {}", e.status.as_u16());
            audit(
                st,
                None,
                action,
                target,
                &addr.ip().to_string(),
                &outcome,
                None,
            )
            .await;
            Err(e)
        }
    }
}

// ---------------------------------------------------------- validation

const MAX_EXTRA_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
const MAX_PROMPT: usize = 256 * 1024;

/// What every job request carries, once validated.
struct Valid {
    agent: String,
    prompt: String,
    repo: PathBuf,
    timeout: i64,
    extra_args: Vec<String>,
}

fn validate(
    st: &AppState,
    agent: &str,
    prompt: &str,
    repo_path: &str,
    timeout: i64,
    extra: &[String],
) -> ApiResult<Valid> {
    if !(1..=3600).contains(&timeout) {
        return Err(ApiError::field(
            "body",
            "timeout",
            "timeout must be between 1 and 3600 seconds",
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::field(
            "body",
            "prompt",
            "prompt must not be empty",
        ));
    }
    if prompt.len() > MAX_PROMPT || prompt.contains('\0') {
        return Err(ApiError::field(
            "body",
            "prompt",
            "prompt must be at most 256 KiB and contain no NUL",
        ));
    }
    if extra.len() > MAX_EXTRA_ARGS
        || extra
            .iter()
            .any(|a| a.len() > MAX_ARG_LEN || a.contains('\0'))
    {
        return Err(ApiError::field(
            "body",
            "extra_args",
            "at most 64 arguments of at most 4096 bytes, no NUL",
        ));
    }
    if repo_path.is_empty() || repo_path.contains('\0') {
        return Err(ApiError::field(
            "body",
            "repo_path",
            "repo_path must be a non-empty path",
        ));
    }
    if !st.cfg.agents.contains_key(agent) {
        let valid: Vec<&str> = st.cfg.agents.keys().map(String::as_str).collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Unknown agent '{agent}'. Valid agents: {}",
                valid.join(", ")
            ),
        ));
    }
    let repo = check_repo(&st.roots, repo_path)?;
    Ok(Valid {
        agent: agent.into(),
        prompt: prompt.into(),
        repo,
        timeout,
        extra_args: extra.to_vec(),
    })
}

/// `repo_path` must be an absolute path to a directory inside an allowed
/// root after every symlink is resolved.
pub fn check_repo(roots: &[PathBuf], repo_path: &str) -> ApiResult<PathBuf> {
    let p = Path::new(repo_path);
    if !p.is_absolute() {
        return Err(ApiError::field(
            "body",
            "repo_path",
            "repo_path must be an absolute path",
        ));
    }
    if roots.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "No allowed roots are configured: start the server with --allowed-root DIR (or allowed_roots in the config file) to let jobs use repositories under DIR",
        ));
    }
    let canon = std::fs::canonicalize(p).map_err(|_| {
        ApiError::field(
            "body",
            "repo_path",
            "repo_path does not exist or is not accessible",
        )
    })?;
    if !canon.is_dir() {
        return Err(ApiError::field(
            "body",
            "repo_path",
            "repo_path is not a directory",
        ));
    }
    if !roots.iter().any(|r| canon.starts_with(r)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "repo_path is outside the allowed roots",
        ));
    }
    Ok(canon)
}

fn new_job_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("job_{}", hex::encode(b))
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull(n) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("The job queue is full ({n} waiting); retry later"),
        )
        .retry(5),
        SubmitError::Draining => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is shutting down and accepts no new jobs",
        )
        .retry(10),
        SubmitError::Store(e) => e.into(),
    }
}

/// Validate a job request, queue it, and audit the outcome under `action`.
#[allow(clippy::too_many_arguments)]
async fn accept(
    st: &AppState,
    caller: &Caller,
    action: &str,
    agent: &str,
    prompt: &str,
    repo_path: &str,
    timeout: i64,
    extra: &[String],
    network: Option<String>,
) -> ApiResult<Job> {
    let v = match validate(st, agent, prompt, repo_path, timeout, extra) {
        Ok(v) => v,
        Err(e) => {
            let outcome = format!("rejected {}", e.status.as_u16());
            caller.record(st, action, None, &outcome, None).await;
            return Err(e);
        }
    };
    let job = st
        .runner
        .submit(NewJob {
            id: new_job_id(),
            agent: v.agent,
            prompt: v.prompt,
            repo_path: v.repo.to_string_lossy().into_owned(),
            timeout_s: v.timeout,
            extra_args: v.extra_args,
            key_id: Some(caller.key.id.clone()),
            network,
        })
        .await
        .map_err(submit_error)?;
    caller
        .record(st, action, Some(&job.id), "accepted", None)
        .await;
    Ok(job)
}

// ------------------------------------------------------------- health

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always "healthy" when the server answers.
    status: String,
    service: String,
    version: String,
    jobs_running: usize,
    queue_depth: usize,
}

/// Liveness, without a key.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub async fn health(State(st): S) -> Json<Health> {
    Json(Health {
        status: "healthy".into(),
        service: "agentvm".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        jobs_running: st.runner.running_count(),
        queue_depth: st.runner.depth(),
    })
}

// -------------------------------------------------------- /agent/run

fn default_timeout() -> i64 {
    600
}

/// The old API's request.
#[derive(Deserialize, ToSchema)]
pub struct AgentRunRequest {
    /// One of the configured agents (aider, opencode, claude, codex, shell, ...).
    agent: String,
    prompt: String,
    /// Absolute path of the repository, inside an allowed root.
    repo_path: String,
    /// Seconds, 1 to 3600.
    #[serde(default = "default_timeout")]
    #[schema(minimum = 1, maximum = 3600, default = 600)]
    timeout: i64,
    #[serde(default)]
    extra_args: Option<Vec<String>>,
}

/// The old API's answer: exactly these five keys.
#[derive(Serialize, ToSchema)]
pub struct AgentRunResponse {
    success: bool,
    stdout: String,
    stderr: String,
    returncode: i64,
    error: Option<String>,
}

/// Run an agent synchronously (the API old clients use).
#[utoipa::path(post, path = "/agent/run", request_body = AgentRunRequest,
    responses((status = 200, body = AgentRunResponse), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail),
        (status = 403, body = ErrorDetail), (status = 413, description = "Body too large"), (status = 422, body = ValidationError),
        (status = 429, body = ErrorDetail), (status = 503, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn agent_run(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<AgentRunResponse>> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Run, "agent.run", None).await?;
    let req: AgentRunRequest = parse_body(&body)?;
    let extra = req.extra_args.unwrap_or_default();
    let job = accept(
        &st,
        &caller,
        "agent.run",
        &req.agent,
        &req.prompt,
        &req.repo_path,
        req.timeout,
        &extra,
        None,
    )
    .await?;
    let done = st.runner.wait(&job.id).await?.unwrap_or(job);
    let logs = st.store.logs(done.seq, 0).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for c in logs {
        match c.stream.as_str() {
            "stdout" => out.extend_from_slice(&c.data),
            "stderr" => err.extend_from_slice(&c.data),
            _ => {} // egress decisions are not output
        }
    }
    let error = match done.status {
        JobStatus::Succeeded => None,
        JobStatus::TimedOut => Some(format!("Agent timed out after {} seconds", done.timeout_s)),
        _ => Some(
            done.error
                .clone()
                .unwrap_or_else(|| format!("job {}", done.status.as_str())),
        ),
    };
    Ok(Json(AgentRunResponse {
        success: done.status == JobStatus::Succeeded,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        returncode: done.exit_code.unwrap_or(-1),
        error,
    }))
}

// ---------------------------------------------------------------- /v1/jobs

/// A new job.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    agent: String,
    prompt: String,
    repo_path: String,
    #[serde(default = "default_timeout")]
    #[schema(minimum = 1, maximum = 3600, default = 600)]
    timeout: i64,
    #[serde(default)]
    extra_args: Vec<String>,
    /// This job's network policy instead of its profile's: "none",
    /// "allow:HOST[:PORT],..." or (admin scope only) "host".
    #[serde(default)]
    network: Option<String>,
}

/// A job's own network policy: "none" or "allow:..." for any run key,
/// "host" for admin keys only.
fn check_network(n: &str, caller: &Caller) -> ApiResult<()> {
    match n {
        "none" => Ok(()),
        "host" if auth::max_scope(&caller.key.scopes) == Some(Scope::Admin) => Ok(()),
        "host" => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "network \"host\" needs an admin key",
        )),
        _ => match n.strip_prefix("allow:") {
            Some(list) => agentvm_egress::Policy::parse(list)
                .map(|_| ())
                .map_err(|e| ApiError::field("body", "network", e)),
            None => Err(ApiError::field(
                "body",
                "network",
                "network must be none, host or allow:HOST[:PORT],...",
            )),
        },
    }
}

/// A job as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    id: String,
    agent: String,
    prompt: String,
    repo_path: String,
    timeout_s: i64,
    extra_args: Vec<String>,
    /// The job's own network policy (null: its profile's).
    network: Option<String>,
    /// queued, running, succeeded, failed, timed_out, cancelled, interrupted
    status: String,
    key_id: Option<String>,
    /// Unix time in milliseconds.
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    exit_code: Option<i64>,
    error: Option<String>,
    /// What the sandbox reported (status, duration_ms, changed_files, ...).
    #[schema(value_type = Option<Object>)]
    result: Option<serde_json::Value>,
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        JobView {
            id: j.id,
            agent: j.agent,
            prompt: j.prompt,
            repo_path: j.repo_path,
            timeout_s: j.timeout_s,
            extra_args: j.extra_args,
            network: j.network,
            status: j.status.as_str().into(),
            key_id: j.key_id,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            exit_code: j.exit_code,
            error: j.error,
            result: j.result,
        }
    }
}

/// Submit a job; it runs when a slot is free.
#[utoipa::path(post, path = "/v1/jobs", request_body = JobRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail),
        (status = 403, body = ErrorDetail), (status = 413, description = "Body too large"), (status = 422, body = ValidationError),
        (status = 429, body = ErrorDetail), (status = 503, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_job(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Run, "job.create", None).await?;
    let req: JobRequest = parse_body(&body)?;
    if let Some(n) = &req.network {
        check_network(n, &caller)?;
    }
    let network = req.network.clone();
    let job = accept(
        &st,
        &caller,
        "job.create",
        &req.agent,
        &req.prompt,
        &req.repo_path,
        req.timeout,
        &req.extra_args,
        network,
    )
    .await?;
    let loc = format!("/v1/jobs/{}", job.id);
    let mut r = (StatusCode::ACCEPTED, Json(JobView::from(job))).into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only jobs in this state.
    status: Option<String>,
    /// Only jobs of this agent.
    agent: Option<String>,
    /// 1 to 200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobPage {
    jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

fn page_params(limit: Option<i64>, cursor: Option<&str>) -> ApiResult<(i64, Option<i64>)> {
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::field(
            "query",
            "limit",
            "limit must be between 1 and 200",
        ));
    }
    let cursor = match cursor {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| ApiError::field("query", "cursor", "invalid cursor"))?,
        ),
    };
    Ok((limit, cursor))
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery),
    responses((status = 200, body = JobPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_jobs(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobPage>> {
    authorize(&st, &headers, addr, Scope::Read).await?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "query", e.body_text()))?;
    let status = match &q.status {
        None => None,
        Some(s) => Some(
            s.parse::<JobStatus>()
                .map_err(|e| ApiError::field("query", "status", e))?,
        ),
    };
    let (limit, cursor) = page_params(q.limit, q.cursor.as_deref())?;
    let jobs = st
        .store
        .list_jobs(status, q.agent.as_deref(), cursor, limit + 1)
        .await?;
    let more = jobs.len() as i64 > limit;
    let jobs: Vec<Job> = jobs.into_iter().take(limit as usize).collect();
    let next_cursor = if more {
        jobs.last().map(|j| j.seq.to_string())
    } else {
        None
    };
    Ok(Json(JobPage {
        jobs: jobs.into_iter().map(JobView::from).collect(),
        next_cursor,
    }))
}

async fn find(st: &AppState, id: &str) -> ApiResult<Job> {
    st.store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("No job {id}")))
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn get_job(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobView>> {
    authorize(&st, &headers, addr, Scope::Read).await?;
    Ok(Json(find(&st, &id).await?.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Stream as server-sent events until the job ends (resumes from Last-Event-ID).
    follow: Option<bool>,
}

/// The job's output: all of it as text, or followed as server-sent events
/// (`event: stdout|stderr`, `id:` the chunk number, then `event: end`).
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("id" = String, Path), LogQuery),
    responses((status = 200, description = "text/plain, or text/event-stream with follow=true", content_type = "text/plain", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn job_logs(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&st, &headers, addr, Scope::Read).await?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "follow", e.body_text()))?;
    let job = find(&st, &id).await?;
    if q.follow.unwrap_or(false) {
        let after = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        return Ok(Sse::new(follow(st.clone(), job, after))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let logs = st.store.logs(job.seq, 0).await?;
    let mut all = Vec::new();
    for c in logs.iter().filter(|c| is_output(c)) {
        all.extend_from_slice(&c.data);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], all).into_response())
}

/// Output chunks are "stdout" and "stderr"; "egress" ones are decisions.
pub fn is_output(c: &agentvm_store::LogChunk) -> bool {
    c.stream == "stdout" || c.stream == "stderr"
}

enum FollowState {
    Start {
        st: Arc<AppState>,
        job: Job,
        after: i64,
    },
    Live {
        st: Arc<AppState>,
        job: Job,
        rx: Option<tokio::sync::broadcast::Receiver<Live>>,
        last: i64,
        pending: std::collections::VecDeque<Event>,
    },
    Done,
}

fn chunk_event(c: &agentvm_store::LogChunk) -> Event {
    Event::default()
        .id(c.seq.to_string())
        .event(c.stream.clone())
        .data(String::from_utf8_lossy(&c.data))
}

fn end_event(status: &str) -> Event {
    Event::default()
        .event("end")
        .data(serde_json::json!({ "status": status }).to_string())
}

/// Stored chunks after `after`, then live ones, then `end`.
fn follow(
    st: Arc<AppState>,
    job: Job,
    after: i64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(FollowState::Start { st, job, after }, |state| async move {
        let mut state = state;
        loop {
            match state {
                FollowState::Done => return None,
                FollowState::Start { st, job, after } => {
                    // subscribe before reading the store, so nothing falls between
                    let rx = st.runner.follow(&job.id);
                    let stored = st.store.logs(job.seq, after).await.unwrap_or_default();
                    let last = stored.last().map(|c| c.seq).unwrap_or(after);
                    let pending = stored.iter().map(chunk_event).collect();
                    state = FollowState::Live {
                        st,
                        job,
                        rx,
                        last,
                        pending,
                    };
                }
                FollowState::Live {
                    st,
                    job,
                    mut rx,
                    mut last,
                    mut pending,
                } => {
                    if let Some(ev) = pending.pop_front() {
                        return Some((
                            Ok(ev),
                            FollowState::Live {
                                st,
                                job,
                                rx,
                                last,
                                pending,
                            },
                        ));
                    }
                    match rx.as_mut() {
                        Some(r) => match r.recv().await {
                            // queued, then sent from `pending` on the next turn
                            Ok(Live::Chunk(c)) if c.seq > last => {
                                last = c.seq;
                                pending.push_back(chunk_event(&c));
                            }
                            Ok(Live::Chunk(_)) => {}
                            Ok(Live::End(s)) => {
                                // anything stored but not yet sent, then the end
                                for c in st.store.logs(job.seq, last).await.unwrap_or_default() {
                                    pending.push_back(chunk_event(&c));
                                }
                                pending.push_back(end_event(s.as_str()));
                                let mut q = pending;
                                let first = q.pop_front();
                                let next = if q.is_empty() {
                                    FollowState::Done
                                } else {
                                    FollowState::Live {
                                        st,
                                        job,
                                        rx: None,
                                        last: i64::MAX,
                                        pending: q,
                                    }
                                };
                                return first.map(|e| (Ok(e), next));
                            }
                            Err(_) => {
                                // lagged or closed: catch up from the store
                                rx = None;
                            }
                        },
                        None => {
                            if last == i64::MAX {
                                return None;
                            }
                            // not running (yet, or any more): poll the store
                            let now = st.store.get_job(&job.id).await.ok().flatten();
                            for c in st.store.logs(job.seq, last).await.unwrap_or_default() {
                                last = c.seq;
                                pending.push_back(chunk_event(&c));
                            }
                            match now {
                                Some(j) if j.status.is_final() => {
                                    pending.push_back(end_event(j.status.as_str()));
                                    last = i64::MAX;
                                }
                                None => {
                                    pending.push_back(end_event("deleted"));
                                    last = i64::MAX;
                                }
                                Some(_) => {
                                    rx = st.runner.follow(&job.id);
                                    if rx.is_none() && pending.is_empty() {
                                        tokio::time::sleep(std::time::Duration::from_millis(100))
                                            .await;
                                    }
                                }
                            }
                        }
                    }
                    state = FollowState::Live {
                        st,
                        job,
                        rx,
                        last,
                        pending,
                    };
                }
            }
        }
    })
}

/// The job's output as an asciicast v2 recording (`asciinema play` reads
/// it); for a running job, what it has printed so far.
#[utoipa::path(get, path = "/v1/jobs/{id}/recording", params(("id" = String, Path)),
    responses((status = 200, description = "asciicast v2: a JSON header line, then one [seconds, \"o\", text] line per output chunk", content_type = "application/x-asciicast", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn job_recording(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, addr, Scope::Read).await?;
    let job = find(&st, &id).await?;
    let chunks = st.store.logs(job.seq, 0).await?;
    let cast = crate::recording::asciicast(&job, &chunks, st.runner.redactor());
    Ok((
        [(header::CONTENT_TYPE, crate::recording::CONTENT_TYPE)],
        cast,
    )
        .into_response())
}

/// The job's changes as a git patch (empty when nothing changed).
#[utoipa::path(get, path = "/v1/jobs/{id}/patch", params(("id" = String, Path)),
    responses((status = 200, description = "A git patch", content_type = "text/x-diff", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn job_patch(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, addr, Scope::Read).await?;
    let job = find(&st, &id).await?;
    if !job.status.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Job {id} is {}; its patch is stored when it ends",
                job.status.as_str()
            ),
        ));
    }
    let patch = st.store.patch(&id).await?.flatten().unwrap_or_default();
    Ok((
        [(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")],
        patch,
    )
        .into_response())
}

/// Cancel a queued or running job.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 202, body = JobView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn cancel_job(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Run, "job.cancel", Some(&id)).await?;
    let job = find(&st, &id).await?;
    if job.status.is_final() || !st.runner.cancel(&id).await? {
        caller
            .record(&st, "job.cancel", Some(&id), "rejected 409", None)
            .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("Job {id} has already ended ({})", job.status.as_str()),
        ));
    }
    caller
        .record(&st, "job.cancel", Some(&id), "accepted", None)
        .await;
    Ok((StatusCode::ACCEPTED, Json(find(&st, &id).await?.into())))
}

#[derive(Serialize, ToSchema)]
pub struct Applied {
    /// The new branch, `agentvm/<job-id>`.
    branch: String,
    commit: String,
}

/// Put the job's patch on a new branch `agentvm/<job-id>` of its repository,
/// committed with the prompt as the message. Git plumbing only: the work
/// tree, index and HEAD are untouched, no hook runs, protected paths
/// (.git, shell and editor startup files) are refused.
#[utoipa::path(post, path = "/v1/jobs/{id}/apply", params(("id" = String, Path)),
    responses((status = 201, body = Applied), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn apply_job(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Applied>)> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Run, "job.apply", Some(&id)).await?;
    let job = find(&st, &id).await?;
    if !job.status.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Job {id} is {}; apply it when it has ended",
                job.status.as_str()
            ),
        ));
    }
    // the repo must still be inside an allowed root
    let repo = check_repo(&st.roots, &job.repo_path).map_err(|_| {
        ApiError::new(
            StatusCode::CONFLICT,
            "The job's repository is gone or no longer inside an allowed root",
        )
    })?;
    let patch = st.store.patch(&id).await?.flatten().unwrap_or_default();
    let branch = format!("agentvm/{id}");
    let message = format!("{}\n\nAgentVM-Job: {id}\n", job.prompt.trim_end());
    let b2 = branch.clone();
    let res = tokio::task::spawn_blocking(move || {
        agentvm_workspace::apply_to_branch(&repo, &patch, &b2, &message)
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error while applying",
        )
    })?;
    match res {
        Ok(commit) => {
            caller
                .record(&st, "job.apply", Some(&id), "ok", Some(&branch))
                .await;
            Ok((StatusCode::CREATED, Json(Applied { branch, commit })))
        }
        Err(e) => {
            use agentvm_workspace::ApplyError as E;
            let status = match e {
                E::Git(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::CONFLICT,
            };
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(job = %id, error = %e, "apply failed");
            }
            caller
                .record(
                    &st,
                    "job.apply",
                    Some(&id),
                    &format!("rejected {}", status.as_u16()),
                    None,
                )
                .await;
            Err(ApiError::new(status, e.to_string()))
        }
    }
}

/// Delete an ended job with its output and patch.
#[utoipa::path(delete, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn delete_job(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Run, "job.delete", Some(&id)).await?;
    let job = find(&st, &id).await?;
    if !st.store.delete_job(&id).await? {
        caller
            .record(&st, "job.delete", Some(&id), "rejected 409", None)
            .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("Job {id} is {}; cancel it first", job.status.as_str()),
        ));
    }
    caller
        .record(&st, "job.delete", Some(&id), "ok", None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

// --------------------------------------------------------------- keys

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// A label for people, 1 to 100 characters.
    name: String,
    /// Any of read, run, admin.
    scopes: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct KeyView {
    id: String,
    name: String,
    scopes: Vec<String>,
    /// "api", "bootstrap" or "file".
    source: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> Self {
        KeyView {
            id: k.id,
            name: k.name,
            scopes: k.scopes,
            source: k.source,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct NewKey {
    id: String,
    name: String,
    scopes: Vec<String>,
    /// The secret, shown this once and never again.
    key: String,
}

/// Create an API key (admin). The secret is in the answer, once.
#[utoipa::path(post, path = "/v1/keys", request_body = KeyRequest,
    responses((status = 201, body = NewKey), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 413, description = "Body too large"), (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_key(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<NewKey>)> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Admin, "key.create", None).await?;
    let req: KeyRequest = parse_body(&body)?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::field(
            "body",
            "name",
            "name must be 1 to 100 printable characters",
        ));
    }
    let mut scopes: Vec<String> = Vec::new();
    for s in &req.scopes {
        if Scope::parse(s).is_none() {
            return Err(ApiError::field(
                "body",
                "scopes",
                format!("unknown scope {s:?}: use read, run or admin"),
            ));
        }
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::field("body", "scopes", "give at least one scope"));
    }
    let secret = auth::new_secret();
    let key = ApiKey {
        id: auth::new_key_id(),
        name: name.clone(),
        hash: auth::hash(&secret),
        scopes: scopes.clone(),
        source: "api".into(),
        created_at: agentvm_store::now_ms(),
        revoked_at: None,
    };
    st.store.insert_key(&key).await?;
    caller
        .record(
            &st,
            "key.create",
            Some(&key.id),
            "ok",
            Some(&scopes.join(",")),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(NewKey {
            id: key.id,
            name,
            scopes,
            key: secret,
        }),
    ))
}

/// List API keys (admin); secrets are never shown.
#[utoipa::path(get, path = "/v1/keys",
    responses((status = 200, body = Vec<KeyView>), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_keys(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<KeyView>>> {
    authorize(&st, &headers, addr, Scope::Admin).await?;
    Ok(Json(
        st.store
            .list_keys()
            .await?
            .into_iter()
            .map(KeyView::from)
            .collect(),
    ))
}

/// Revoke an API key (admin). The last active admin key cannot be revoked.
#[utoipa::path(delete, path = "/v1/keys/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    let caller = authorize_mut(&st, &headers, addr, Scope::Admin, "key.revoke", Some(&id)).await?;
    let keys = st.store.list_keys().await?;
    let Some(target) = keys.iter().find(|k| k.id == id && k.revoked_at.is_none()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No active key {id}"),
        ));
    };
    let admins = keys
        .iter()
        .filter(|k| k.revoked_at.is_none() && auth::max_scope(&k.scopes) == Some(Scope::Admin))
        .count();
    if auth::max_scope(&target.scopes) == Some(Scope::Admin) && admins <= 1 {
        caller
            .record(&st, "key.revoke", Some(&id), "rejected 409", None)
            .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "This is the last active admin key; create another admin key first",
        ));
    }
    st.store.revoke_key(&id).await?;
    caller
        .record(&st, "key.revoke", Some(&id), "ok", None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

// -------------------------------------------------------------- audit

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEventView {
    seq: i64,
    ts: i64,
    key_id: Option<String>,
    action: String,
    target: Option<String>,
    client: Option<String>,
    outcome: String,
    detail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    events: Vec<AuditEventView>,
    next_cursor: Option<String>,
}

/// The audit trail, newest first (admin).
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_audit(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    authorize(&st, &headers, addr, Scope::Admin).await?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "query", e.body_text()))?;
    let (limit, cursor) = page_params(q.limit, q.cursor.as_deref())?;
    let ev = st.store.list_audit(cursor, limit + 1).await?;
    let more = ev.len() as i64 > limit;
    let ev: Vec<_> = ev.into_iter().take(limit as usize).collect();
    let next_cursor = if more {
        ev.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    Ok(Json(AuditPage {
        events: ev
            .into_iter()
            .map(|e| AuditEventView {
                seq: e.seq,
                ts: e.ts,
                key_id: e.key_id,
                action: e.action,
                target: e.target,
                client: e.client,
                outcome: e.outcome,
                detail: e.detail,
            })
            .collect(),
        next_cursor,
    }))
}

// ------------------------------------------------------------ metrics

/// Prometheus metrics (read scope).
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn metrics(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    authorize(&st, &headers, addr, Scope::Read).await?;
    let counts: std::collections::HashMap<JobStatus, i64> =
        st.store.count_by_status().await?.into_iter().collect();
    for s in JobStatus::ALL {
        st.metrics
            .jobs
            .get_or_create(&StateLabel {
                state: s.as_str().into(),
            })
            .set(counts.get(&s).copied().unwrap_or(0));
    }
    st.metrics.queue_depth.set(st.runner.depth() as i64);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response())
}

// ------------------------------------------------------------ openapi

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey as K, ApiKeyValue, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(K::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "AgentVM", description = "Run coding agents in sandboxes. Every route but /health, /openapi.json and /docs needs an API key (X-API-Key or Authorization: Bearer)."),
    paths(health, agent_run, create_job, list_jobs, get_job, job_logs, job_recording, job_patch, cancel_job, apply_job, delete_job, create_key, list_keys, revoke_key, list_audit, metrics),
    components(schemas(ErrorDetail, FieldError, ValidationError, Health, AgentRunRequest, AgentRunResponse, JobRequest, JobView, JobPage, Applied, KeyRequest, KeyView, NewKey, AuditEventView, AuditPage)),
    modifiers(&SecurityAddon)
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes arrive, parsing gives a value or a 422 naming a
        /// place, never a panic.
        #[test]
        fn body_parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            match parse_body::<AgentRunRequest>(&Bytes::from(body)) {
                Ok(_) => {}
                Err(e) => {
                    prop_assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
                    prop_assert!(e.body["detail"][0]["loc"][0] == "body");
                }
            }
        }

        /// Well-formed JSON with hostile field values: still a value or a 422.
        #[test]
        fn json_shapes_never_panic(agent in ".{0,40}", prompt in ".{0,200}", timeout in any::<i64>(), n in 0usize..80) {
            let body = serde_json::json!({"agent": agent, "prompt": prompt, "repo_path": "/x", "timeout": timeout, "extra_args": vec!["a"; n]});
            let r = parse_body::<AgentRunRequest>(&Bytes::from(body.to_string()));
            prop_assert!(r.is_ok());
        }

        /// A repo accepted after canonicalisation always lies inside a root,
        /// whatever `..`, `.` and `/` sequences the path holds.
        #[test]
        fn accepted_repos_stay_inside_the_roots(parts in proptest::collection::vec(prop_oneof![Just(".."), Just("."), Just("inner"), Just("link"), Just(""), Just("nope")], 0..8)) {
            let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let root = t.path().join("root");
            std::fs::create_dir_all(root.join("inner")).unwrap_or_else(|e| panic!("{e}"));
            std::os::unix::fs::symlink(t.path(), root.join("link")).unwrap_or_else(|e| panic!("{e}"));
            let root = std::fs::canonicalize(&root).unwrap_or_else(|e| panic!("{e}"));
            let p = format!("{}/{}", root.display(), parts.join("/"));
            if let Ok(ok) = check_repo(std::slice::from_ref(&root), &p) {
                prop_assert!(ok.starts_with(&root), "{} escaped to {}", p, ok.display());
            }
        }
    }
}
