//! The HTTP surface: the compat API old clients speak (`GET /health`,
//! `POST /agent/run`), the native `/v1` API, OpenAPI and metrics.
//!
//! Errors are `{"detail": ...}` everywhere, as the old FastAPI server sent
//! them; validation errors (422) list which field failed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentvm_egress::NetworkMode;
use agentvm_store::{ApiKey, Job, JobStatus, NewJob, Store, Streams};
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
    /// Requests without a valid key, per client address.
    pub anon: RateLimiter,
    /// Refused anonymous mutations audited, all addresses together.
    pub anon_audit: RateLimiter,
    pub streams: StreamSlots,
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

/// Who is calling: set by [`gate`] for every authenticated request.
#[derive(Clone)]
pub struct Caller {
    pub key: ApiKey,
    pub client: String,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, MISSING_KEY))
    }
}

const MISSING_KEY: &str =
    "Missing API key: send it in the X-API-Key header or as Authorization: Bearer";

fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Read => "read",
        Scope::Run => "run",
        Scope::Admin => "admin",
    }
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        auth::max_scope(&self.key.scopes) == Some(Scope::Admin)
    }

    /// 403 unless the key has `need`.
    fn need(&self, need: Scope) -> ApiResult<()> {
        if auth::max_scope(&self.key.scopes) < Some(need) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("This API key lacks the {} scope", scope_name(need)),
            ));
        }
        Ok(())
    }

    /// Like `need`, for a mutating call: a refusal is audited.
    async fn need_mut(
        &self,
        st: &AppState,
        need: Scope,
        action: &str,
        target: Option<&str>,
    ) -> ApiResult<()> {
        if let Err(e) = self.need(need) {
            let outcome = format!("denied {}", e.status.as_u16());
            self.record(st, action, target, &outcome, None).await;
            return Err(e);
        }
        Ok(())
    }

    /// A job is its creator's; admin keys see every job.
    fn owns(&self, j: &Job) -> bool {
        self.is_admin() || j.key_id.as_deref() == Some(self.key.id.as_str())
    }

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
            Some(&self.key.id),
            action,
            target,
            &self.client,
            outcome,
            detail,
        )
        .await
    }
}

async fn audit(
    st: &AppState,
    key_id: Option<&str>,
    action: &str,
    target: Option<&str>,
    client: &str,
    outcome: &str,
    detail: Option<&str>,
) {
    if let Err(e) = st
        .store
        .audit(key_id, action, target, Some(client), outcome, detail)
        .await
    {
        tracing::error!(error = %e, "writing the audit trail failed");
    }
}

/// The audit name of a mutating route.
fn action_of(method: &axum::http::Method, route: &str) -> Option<&'static str> {
    use axum::http::Method as M;
    Some(match (method, route) {
        (&M::POST, "/agent/run") => "agent.run",
        (&M::POST, "/v1/jobs") => "job.create",
        (&M::DELETE, "/v1/jobs/{id}") => "job.delete",
        (&M::POST, "/v1/jobs/{id}/cancel") => "job.cancel",
        (&M::POST, "/v1/jobs/{id}/apply") => "job.apply",
        (&M::POST, "/v1/keys") => "key.create",
        (&M::DELETE, "/v1/keys/{id}") => "key.revoke",
        _ => return None,
    })
}

/// The longest request target served; longer ones get 414 before any
/// work (nothing about them is stored).
pub const MAX_URI: usize = 4096;

/// Every route but /health and the docs passes here first, before its
/// body is read: the key is checked (and rate-limited) or the request is
/// refused. Requests without a valid key are limited per client address
/// before they cost anything; a refused mutation is audited, within a
/// budget shared by all of them.
pub async fn gate(
    State(st): S,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().to_string().len() > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("The request target is longer than {MAX_URI} bytes"),
        )
        .into_response();
    }
    let client = addr.ip().to_string();
    let presented = auth::presented(req.headers());
    let key = match &presented {
        Some(secret) => {
            let h = auth::hash(secret);
            match st.store.key_by_hash(&h).await {
                Ok(Some(k)) if k.revoked_at.is_none() && auth::same(&k.hash, &h) => Some(k),
                Ok(_) => None,
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        None => None,
    };
    let Some(key) = key else {
        if let Err(wait) = st.anon.check(&client) {
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("Too many requests without a valid API key from this address; retry in {wait} s"),
            )
            .retry(wait)
            .into_response();
        }
        let route = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        if let Some(action) = action_of(req.method(), &route) {
            // the id in the path, if any (the store bounds its length)
            let target = route
                .contains("{id}")
                .then(|| req.uri().path().split('/').nth(3).unwrap_or("").to_string());
            if st.anon_audit.check("anonymous").is_ok() {
                audit(
                    &st,
                    None,
                    action,
                    target.as_deref(),
                    &client,
                    "denied 401",
                    None,
                )
                .await;
            } else {
                st.metrics.unaudited_refusals.inc();
            }
        }
        let msg = if presented.is_some() {
            "Invalid API key"
        } else {
            MISSING_KEY
        };
        return ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response();
    };
    if let Err(wait) = st.limiter.check(&key.id) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Rate limit exceeded for this key; retry in {wait} s"),
        )
        .retry(wait)
        .into_response();
    }
    req.extensions_mut().insert(Caller { key, client });
    next.run(req).await
}

/// Streaming responses (followed logs, log, recording and patch
/// downloads) open at once, per key: each holds a task and a page of
/// output, so a client that opens many and reads none is stopped here.
#[derive(Clone)]
pub struct StreamSlots {
    per_key: usize,
    used: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One open stream; the slot frees itself when the stream ends.
pub struct Slot {
    slots: StreamSlots,
    key: String,
}

impl StreamSlots {
    pub fn new(per_key: usize) -> StreamSlots {
        StreamSlots {
            per_key,
            used: Arc::default(),
        }
    }

    fn take(&self, key: &str) -> ApiResult<Slot> {
        let mut u = match self.used.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let n = u.entry(key.to_string()).or_insert(0);
        if *n >= self.per_key {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This API key already has {} streams open (followed logs, downloads); close one or retry later",
                    self.per_key
                ),
            )
            .retry(5));
        }
        *n += 1;
        Ok(Slot {
            slots: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut u = match self.slots.used.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = u.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                u.remove(&self.key);
            }
        }
    }
}

/// Streams at most this many per key at once.
pub const STREAMS_PER_KEY: usize = 16;

// ---------------------------------------------------------- validation

const MAX_EXTRA_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
const MAX_PROMPT: usize = 256 * 1024;
const MAX_NETWORK: usize = 4096;

/// What every job request carries, once validated.
struct Valid {
    agent: String,
    prompt: String,
    repo: PathBuf,
    timeout: i64,
    extra_args: Vec<String>,
    /// The job's own network policy, canonical; `None`: its profile's.
    network: Option<String>,
}

/// One job request as it arrived.
struct Ask<'a> {
    agent: &'a str,
    prompt: &'a str,
    repo_path: &'a str,
    timeout: i64,
    extra: &'a [String],
    network: Option<&'a str>,
}

fn validate(st: &AppState, caller: &Caller, a: &Ask) -> ApiResult<Valid> {
    if !(1..=3600).contains(&a.timeout) {
        return Err(ApiError::field(
            "body",
            "timeout",
            "timeout must be between 1 and 3600 seconds",
        ));
    }
    if a.prompt.is_empty() {
        return Err(ApiError::field(
            "body",
            "prompt",
            "prompt must not be empty",
        ));
    }
    if a.prompt.len() > MAX_PROMPT || a.prompt.contains('\0') {
        return Err(ApiError::field(
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
        return Err(ApiError::field(
            "body",
            "extra_args",
            "at most 64 arguments of at most 4096 bytes, no NUL",
        ));
    }
    if a.repo_path.is_empty() || a.repo_path.contains('\0') {
        return Err(ApiError::field(
            "body",
            "repo_path",
            "repo_path must be a non-empty path",
        ));
    }
    let Some(profile) = st.cfg.agents.get(a.agent) else {
        let valid: Vec<&str> = st.cfg.agents.keys().map(String::as_str).collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Unknown agent '{}'. Valid agents: {}",
                agentvm_store::bounded(a.agent, 64),
                valid.join(", ")
            ),
        ));
    };
    if let Some((arg, flag)) = profile.refused_arg(a.extra) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "extra_args: {} ({flag}) changes where the {} agent's traffic or credentials go; its profile refuses it (refused_args in the server's config)",
                agentvm_store::bounded(arg, 64),
                a.agent
            ),
        ));
    }
    let network = match a.network {
        None => None,
        Some(n) => Some(check_network(profile, a.agent, n, caller)?),
    };
    let repo = check_repo(&st.roots, a.repo_path)?;
    Ok(Valid {
        agent: a.agent.into(),
        prompt: a.prompt.into(),
        repo,
        timeout: a.timeout,
        extra_args: a.extra.to_vec(),
        network,
    })
}

/// A job's own network policy may narrow its profile's, never widen it:
/// a key may go beyond the profile only as far as an admin granted it
/// (its `network`), and admin keys may use any policy. Loopback, private
/// and metadata addresses are reachable only when named, so only an
/// admin-set profile or grant can open them. Returns the canonical form.
fn check_network(
    profile: &crate::config::Profile,
    agent: &str,
    n: &str,
    caller: &Caller,
) -> ApiResult<String> {
    if n.len() > MAX_NETWORK {
        return Err(ApiError::field(
            "body",
            "network",
            format!("network must be at most {MAX_NETWORK} bytes"),
        ));
    }
    let want = NetworkMode::parse(n).map_err(|e| ApiError::field("body", "network", e))?;
    let base = profile.network_mode();
    let grant = caller
        .key
        .network
        .as_deref()
        .and_then(|g| NetworkMode::parse(g).ok());
    if caller.is_admin() || base.covers(&want) || grant.is_some_and(|g| g.covers(&want)) {
        return Ok(want.to_string());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "network {want} is wider than the {agent} profile's ({base}): a request may only narrow it; an admin can grant a key more (agentvm keys create --network)"
        ),
    ))
}

/// `repo_path` must be an absolute path to a directory inside an allowed
/// root after every symlink is resolved.
pub fn check_repo(roots: &[PathBuf], repo_path: &str) -> ApiResult<PathBuf> {
    let p = Path::new(repo_path);
    let shown = agentvm_store::bounded(repo_path, 512);
    if !p.is_absolute() {
        return Err(ApiError::field(
            "body",
            "repo_path",
            format!("{shown} is not an absolute path"),
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
            format!("{shown} does not exist or the server cannot read it"),
        )
    })?;
    if !canon.is_dir() {
        return Err(ApiError::field(
            "body",
            "repo_path",
            format!("{shown} is not a directory"),
        ));
    }
    if !roots.iter().any(|r| canon.starts_with(r)) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} is outside the allowed roots ({}); the server's --allowed-root (allowed_roots in its config) decides which trees jobs may use",
                canon.display(),
                list.join(", ")
            ),
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
async fn accept(st: &AppState, caller: &Caller, action: &str, ask: &Ask<'_>) -> ApiResult<Job> {
    let v = match validate(st, caller, ask) {
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
            network: v.network,
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

/// How often a waiting `/agent/run` answer sends a space: well inside any
/// client's read timeout (the old client uses the job's, at least 1 s) and
/// any proxy's idle timeout (nginx: 60 s).
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_millis(500);

/// Run an agent synchronously (the API old clients use). Once the request
/// is accepted the status and headers are sent at once, and the body
/// starts with JSON-insignificant spaces, one every half second, until
/// the job has ended: a client whose read timeout is the job's timeout,
/// and a proxy that cuts silent connections, both see a live connection.
#[utoipa::path(post, path = "/agent/run", request_body = AgentRunRequest,
    responses((status = 200, body = AgentRunResponse), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail),
        (status = 403, body = ErrorDetail), (status = 413, description = "Body too large"), (status = 422, body = ValidationError),
        (status = 429, body = ErrorDetail), (status = 503, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn agent_run(State(st): S, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.need_mut(&st, Scope::Run, "agent.run", None).await?;
    let req: AgentRunRequest = parse_body(&body)?;
    let extra = req.extra_args.unwrap_or_default();
    let ask = Ask {
        agent: &req.agent,
        prompt: &req.prompt,
        repo_path: &req.repo_path,
        timeout: req.timeout,
        extra: &extra,
        network: None,
    };
    let job = accept(&st, &caller, "agent.run", &ask).await?;
    let body = streamed(|tx| compat_answer(st.clone(), job, tx));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            // nginx: pass the spaces on as they come
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response())
}

/// The body of an accepted `/agent/run`: spaces while the job runs, then
/// the five keys, the output read from the store page by page.
async fn compat_answer(st: Arc<AppState>, job: Job, tx: Tx) {
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move { tx.send(Ok(b)).await.is_ok() }
    };
    let id = job.id.clone();
    let wait = st.runner.wait(&id);
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(KEEPALIVE);
    let done = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = tick.tick() => if !send(Bytes::from_static(b" ")).await { return },
        }
    };
    let done = match done {
        Ok(Some(j)) => j,
        Ok(None) => job,
        Err(e) => {
            tracing::error!(job = %job.id, error = %e, "waiting for a job failed");
            let v = serde_json::json!({"success": false, "stdout": "", "stderr": "", "returncode": -1,
                "error": "internal error: the database could not be reached"});
            let _ = send(Bytes::from(v.to_string())).await;
            return;
        }
    };
    let success = done.status == JobStatus::Succeeded;
    if !send(Bytes::from(format!(
        "{{\"success\":{success},\"stdout\":\""
    )))
    .await
    {
        return;
    }
    for (i, stream) in ["stdout", "stderr"].into_iter().enumerate() {
        if i == 1 && !send(Bytes::from_static(b"\",\"stderr\":\"")).await {
            return;
        }
        let mut utf8 = crate::recording::Utf8::default();
        let mut pages = Pages::new(&st.store, done.seq, 0, Streams::Only(stream));
        loop {
            let page = pages.next().await;
            let mut text = String::new();
            for c in page.iter().flatten() {
                text.push_str(&utf8.take(&c.data, false));
            }
            if page.is_none() {
                text.push_str(&utf8.take(&[], true));
            }
            if !text.is_empty() && !send(Bytes::from(json_inner(&text))).await {
                return;
            }
            if page.is_none() {
                break;
            }
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
    let tail = format!(
        "\",\"returncode\":{},\"error\":{}}}",
        done.exit_code.unwrap_or(-1),
        serde_json::to_string(&error).unwrap_or_else(|_| "null".into())
    );
    let _ = send(Bytes::from(tail)).await;
}

/// `s` as the inside of a JSON string (escaped, without the quotes).
fn json_inner(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap_or_default();
    q.get(1..q.len().saturating_sub(1))
        .unwrap_or("")
        .to_string()
}

/// Chunks read from the store at a time (each at most 32 KiB).
const PAGE: i64 = 32;

/// A job's stored chunks, a page at a time.
struct Pages<'a> {
    store: &'a Store,
    job_seq: i64,
    after: i64,
    streams: Streams<'a>,
}

impl<'a> Pages<'a> {
    fn new(store: &'a Store, job_seq: i64, after: i64, streams: Streams<'a>) -> Self {
        Pages {
            store,
            job_seq,
            after,
            streams,
        }
    }

    /// The next page, `None` past the last chunk stored so far (a store
    /// error ends the pages too: it is logged, and the client sees the
    /// stream end).
    async fn next(&mut self) -> Option<Vec<agentvm_store::LogChunk>> {
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

type Tx = tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>;

/// A response body that `produce` writes into from a task of its own,
/// through a channel of a few pieces: when the client stops reading, the
/// task waits; when it goes away, the task's next send fails.
fn streamed<F, Fut>(produce: F) -> axum::body::Body
where
    F: FnOnce(Tx) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
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
    /// "host" or "allow:HOST[:PORT],...". It may only narrow the
    /// profile's, unless the key was granted more (admin keys may use
    /// any).
    #[serde(default)]
    network: Option<String>,
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
    /// The key that made the job (its owner).
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
pub async fn create_job(State(st): S, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.need_mut(&st, Scope::Run, "job.create", None).await?;
    let req: JobRequest = parse_body(&body)?;
    let ask = Ask {
        agent: &req.agent,
        prompt: &req.prompt,
        repo_path: &req.repo_path,
        timeout: req.timeout,
        extra: &req.extra_args,
        network: req.network.as_deref(),
    };
    let job = accept(&st, &caller, "job.create", &ask).await?;
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

/// List jobs, newest first: the key's own (every job for admin keys).
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery),
    responses((status = 200, body = JobPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_jobs(
    State(st): S,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobPage>> {
    caller.need(Scope::Read)?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "query", e.body_text()))?;
    let status = match &q.status {
        None => None,
        Some(s) => Some(
            s.parse::<JobStatus>()
                .map_err(|e| ApiError::field("query", "status", e))?,
        ),
    };
    let (limit, cursor) = page_params(q.limit, q.cursor.as_deref())?;
    let owner = (!caller.is_admin()).then_some(caller.key.id.as_str());
    let jobs = st
        .store
        .list_jobs(owner, status, q.agent.as_deref(), cursor, limit + 1)
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

/// The job `id`, if it is the caller's (or the caller is admin): anyone
/// else's is as unknown as a job that never was.
async fn find(st: &AppState, caller: &Caller, id: &str) -> ApiResult<Job> {
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No job {}", agentvm_store::bounded(id, 64)),
        )
    };
    // ids are job_ and 16 hex digits: anything else is not looked up
    if id.len() > 64 {
        return Err(missing());
    }
    match st.store.get_job(id).await? {
        Some(j) if caller.owns(&j) => Ok(j),
        _ => Err(missing()),
    }
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn get_job(
    State(st): S,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobView>> {
    caller.need(Scope::Read)?;
    Ok(Json(find(&st, &caller, &id).await?.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Stream as server-sent events until the job ends (resumes from Last-Event-ID).
    follow: Option<bool>,
}

/// The job's output: all of it as text, or followed as server-sent events
/// (`event: stdout|stderr`, `id:` the chunk number, then `event: end`).
/// Both are read from the store a page at a time, as fast as the client
/// reads; a key has at most 16 such streams open at once.
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("id" = String, Path), LogQuery),
    responses((status = 200, description = "text/plain, or text/event-stream with follow=true", content_type = "text/plain", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn job_logs(
    State(st): S,
    caller: Caller,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    caller.need(Scope::Read)?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "follow", e.body_text()))?;
    let job = find(&st, &caller, &id).await?;
    let slot = st.streams.take(&caller.key.id)?;
    if q.follow.unwrap_or(false) {
        let after = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        return Ok(Sse::new(follow(st.clone(), job, after, slot))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let body = streamed(|tx| async move {
        let _slot = slot;
        let mut pages = Pages::new(&st.store, job.seq, 0, Streams::Output);
        while let Some(page) = pages.next().await {
            for c in page {
                if tx.send(Ok(Bytes::from(c.data))).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

/// Output chunks are "stdout" and "stderr"; "egress" ones are decisions.
pub fn is_output(c: &agentvm_store::LogChunk) -> bool {
    c.stream == "stdout" || c.stream == "stderr"
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

/// Stored chunks after `after`, then live ones, then `end`. A task of its
/// own produces the events into a small channel: when the client stops
/// reading, the channel fills and the task waits, holding one page at
/// most; when the client goes away, the task ends.
fn follow(
    st: Arc<AppState>,
    job: Job,
    after: i64,
    slot: Slot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(8);
    tokio::spawn(async move {
        let _slot = slot;
        let _ = follow_into(&st, &job, after, &tx).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Everything stored after `last`, page by page; the new `last`.
async fn catch_up(
    st: &AppState,
    job: &Job,
    mut last: i64,
    tx: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
) -> Result<i64, ()> {
    let mut pages = Pages::new(&st.store, job.seq, last, Streams::All);
    while let Some(page) = pages.next().await {
        for c in &page {
            last = c.seq;
            tx.send(Ok(chunk_event(c))).await.map_err(|_| ())?;
        }
    }
    Ok(last)
}

async fn follow_into(
    st: &AppState,
    job: &Job,
    after: i64,
    tx: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), ()> {
    // subscribe before reading the store, so nothing falls between
    let mut live = st.runner.follow(&job.id);
    let mut last = catch_up(st, job, after, tx).await?;
    loop {
        match live.as_mut() {
            Some(rx) => match rx.recv().await {
                Ok(Live::Chunk(c)) if c.seq == last + 1 => {
                    last = c.seq;
                    tx.send(Ok(chunk_event(&c))).await.map_err(|_| ())?;
                }
                // a gap (every chunk is stored before it is sent)
                Ok(Live::Chunk(c)) if c.seq > last => last = catch_up(st, job, last, tx).await?,
                Ok(Live::Chunk(_)) => {}
                Ok(Live::End(s)) => {
                    catch_up(st, job, last, tx).await?;
                    tx.send(Ok(end_event(s.as_str()))).await.map_err(|_| ())?;
                    return Ok(());
                }
                // lagged behind the live channel: the store has it all
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    last = catch_up(st, job, last, tx).await?
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => live = None,
            },
            None => {
                // not running (yet, or any more): look at the store
                let now = st.store.get_job(&job.id).await.map_err(|_| ())?;
                last = catch_up(st, job, last, tx).await?;
                match now {
                    Some(j) if j.status.is_final() => {
                        last = catch_up(st, job, last, tx).await?;
                        let _ = last;
                        tx.send(Ok(end_event(j.status.as_str())))
                            .await
                            .map_err(|_| ())?;
                        return Ok(());
                    }
                    None => {
                        tx.send(Ok(end_event("deleted"))).await.map_err(|_| ())?;
                        return Ok(());
                    }
                    Some(_) => {
                        live = st.runner.follow(&job.id);
                        if live.is_none() {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
    }
}

/// The job's output as an asciicast v2 recording (`asciinema play` reads
/// it); for a running job, what it has printed so far. Built page by page
/// as the client reads.
#[utoipa::path(get, path = "/v1/jobs/{id}/recording", params(("id" = String, Path)),
    responses((status = 200, description = "asciicast v2: a JSON header line, then one [seconds, \"o\", text] line per output chunk", content_type = "application/x-asciicast", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn job_recording(
    State(st): S,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    caller.need(Scope::Read)?;
    let job = find(&st, &caller, &id).await?;
    let slot = st.streams.take(&caller.key.id)?;
    let body = streamed(|tx| async move {
        let _slot = slot;
        let (mut cast, head) = crate::recording::Cast::new(&job, st.runner.redactor());
        if tx.send(Ok(Bytes::from(head))).await.is_err() {
            return;
        }
        let mut pages = Pages::new(&st.store, job.seq, 0, Streams::Output);
        while let Some(page) = pages.next().await {
            let text: String = page.iter().map(|c| cast.push(c)).collect();
            if !text.is_empty() && tx.send(Ok(Bytes::from(text))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Bytes::from(cast.finish()))).await;
    });
    Ok((
        [(header::CONTENT_TYPE, crate::recording::CONTENT_TYPE)],
        body,
    )
        .into_response())
}

/// The job's changes as a git patch (empty when nothing changed), sent a
/// stored part at a time.
#[utoipa::path(get, path = "/v1/jobs/{id}/patch", params(("id" = String, Path)),
    responses((status = 200, description = "A git patch", content_type = "text/x-diff", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn job_patch(
    State(st): S,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    caller.need(Scope::Read)?;
    let job = find(&st, &caller, &id).await?;
    if !job.status.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Job {id} is {}; its patch is stored when it ends",
                job.status.as_str()
            ),
        ));
    }
    let slot = st.streams.take(&caller.key.id)?;
    let body = streamed(|tx| async move {
        let _slot = slot;
        let mut part = 0;
        while let Ok(Some(p)) = st.store.patch_part(job.seq, part).await {
            if tx.send(Ok(Bytes::from(p))).await.is_err() {
                return;
            }
            part += 1;
        }
    });
    Ok(([(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")], body).into_response())
}

/// Cancel a queued or running job.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 202, body = JobView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn cancel_job(
    State(st): S,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    caller
        .need_mut(&st, Scope::Run, "job.cancel", Some(&id))
        .await?;
    let job = find(&st, &caller, &id).await?;
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
    Ok((
        StatusCode::ACCEPTED,
        Json(find(&st, &caller, &id).await?.into()),
    ))
}

#[derive(Serialize, ToSchema)]
pub struct Applied {
    /// The new branch, `agentvm/<job-id>`.
    branch: String,
    commit: String,
}

/// Put the job's patch on a new branch `agentvm/<job-id>` of its repository,
/// committed with the prompt as the message. Git plumbing only: the work
/// tree, index and HEAD are untouched, no hook runs, and a change to a
/// protected path (startup files, hooks, editor tasks, CI workflows, what
/// the repo's config names) is refused, judged on the tree git would
/// commit.
#[utoipa::path(post, path = "/v1/jobs/{id}/apply", params(("id" = String, Path)),
    responses((status = 201, body = Applied), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn apply_job(
    State(st): S,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Applied>)> {
    caller
        .need_mut(&st, Scope::Run, "job.apply", Some(&id))
        .await?;
    let job = find(&st, &caller, &id).await?;
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
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    caller
        .need_mut(&st, Scope::Run, "job.delete", Some(&id))
        .await?;
    let job = find(&st, &caller, &id).await?;
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
    /// What this key's jobs may use beyond their profile's network policy
    /// ("none", "host" or "allow:HOST[:PORT],..."); absent: only narrower.
    #[serde(default)]
    network: Option<String>,
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
    /// The key's network grant, if any.
    network: Option<String>,
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
            network: k.network,
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
    caller: Caller,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<NewKey>)> {
    caller
        .need_mut(&st, Scope::Admin, "key.create", None)
        .await?;
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
    let network = match &req.network {
        None => None,
        Some(n) if n.len() > MAX_NETWORK => {
            return Err(ApiError::field(
                "body",
                "network",
                format!("network must be at most {MAX_NETWORK} bytes"),
            ))
        }
        Some(n) => Some(
            NetworkMode::parse(n)
                .map_err(|e| ApiError::field("body", "network", e))?
                .to_string(),
        ),
    };
    let secret = auth::new_secret();
    let key = ApiKey {
        id: auth::new_key_id(),
        name: name.clone(),
        hash: auth::hash(&secret),
        scopes: scopes.clone(),
        source: "api".into(),
        created_at: agentvm_store::now_ms(),
        revoked_at: None,
        network: network.clone(),
    };
    st.store.insert_key(&key).await?;
    caller
        .record(
            &st,
            "key.create",
            Some(&key.id),
            "ok",
            Some(&match &network {
                Some(n) => format!("{}; network {n}", scopes.join(",")),
                None => scopes.join(","),
            }),
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
pub async fn list_keys(State(st): S, caller: Caller) -> ApiResult<Json<Vec<KeyView>>> {
    caller.need(Scope::Admin)?;
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
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    caller
        .need_mut(&st, Scope::Admin, "key.revoke", Some(&id))
        .await?;
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
    caller: Caller,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    caller.need(Scope::Admin)?;
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
pub async fn metrics(State(st): S, caller: Caller) -> ApiResult<Response> {
    caller.need(Scope::Read)?;
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
