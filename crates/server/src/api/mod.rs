//! The HTTP surface: the compat API old clients speak (`GET /health`,
//! `POST /agent/run`), the native `/v1` API, OpenAPI and metrics.
//!
//! Errors are `{"detail": ...}` everywhere, as the old FastAPI server sent
//! them; validation errors (422) list which field failed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use agentvm_proto::api::*;
use agentvm_store::{Job, JobStatus, Streams};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::auth::{self, RateLimiter, Scope};
use crate::metrics::{Metrics, StateLabel};
use crate::output::{self, Pages};
use crate::service::{self, Principal, Service};

/// The HTTP door's state: the service every door shares, and what only
/// this door needs (its metrics and its rate limiters).
pub struct AppState {
    pub svc: Arc<Service>,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    /// Requests without a valid key, per client address.
    pub anon: RateLimiter,
    /// Refused anonymous mutations audited, all addresses together.
    pub anon_audit: RateLimiter,
}

/// Handlers reach the service's parts (`st.store`, `st.runner`, ...)
/// through the state.
impl std::ops::Deref for AppState {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.svc
    }
}

pub type S = State<Arc<AppState>>;

mod audit;
mod compat;
mod gate;
mod jobs;
mod keys;
mod ops;
mod sessions;
mod workspaces;

pub use self::audit::*;
pub use self::compat::*;
pub use self::gate::*;
pub use self::jobs::*;
pub use self::keys::*;
pub use self::ops::*;
pub use self::sessions::*;
pub use self::workspaces::*;

// ------------------------------------------------------------- errors

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

/// The one place a service error becomes an HTTP answer.
impl From<service::Error> for ApiError {
    fn from(e: service::Error) -> Self {
        use service::Error as E;
        let status = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match e {
            E::Invalid { place, field, msg } => ApiError::field(place, &field, msg),
            E::Busy { msg, retry_s } | E::Unavailable { msg, retry_s } => {
                ApiError::new(status, msg).retry(retry_s)
            }
            E::Unknown(m) | E::Forbidden(m) | E::NotFound(m) | E::Conflict(m) | E::Internal(m) => {
                ApiError::new(status, m)
            }
        }
    }
}

impl From<agentvm_store::StoreError> for ApiError {
    fn from(e: agentvm_store::StoreError) -> Self {
        service::Error::from(e).into()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A git patch as the body (jobs, sessions and workspaces alike).
fn diff_response(patch: impl IntoResponse) -> Response {
    (
        [(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")],
        patch,
    )
        .into_response()
}

/// 201 with `body` and a Location header naming what was made.
fn created<T: serde::Serialize>(location: &str, body: T) -> Response {
    let mut r = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

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
    paths(health, agent_run, create_job, list_jobs, get_job, job_logs, job_recording, job_patch, cancel_job, apply_job, delete_job, create_key, list_keys, revoke_key, list_audit, metrics, create_session, list_sessions, get_session, delete_session, attach_session, pause_session, resume_session, session_patch, apply_session, session_recording, session_port, create_workspace, list_workspaces, get_workspace, delete_workspace, create_checkpoint, list_checkpoints, delete_checkpoint, restore_workspace, workspace_patch, workspace_diff, apply_workspace, verify_workspace),
    components(schemas(ErrorDetail, FieldError, ValidationError, Health, AgentRunRequest, AgentRunResponse, JobRequest, JobView, JobStatus, JobPage, JobEnd, Applied, KeyRequest, KeyView, NewKey, AuditEventView, AuditPage, SessionRequest, SessionView, SessionPage, ViewerView, AttachMessage, SessionStatus, WorkspaceRequest, WorkspaceView, WorkspacePage, CheckpointRequest, CheckpointView, CheckpointPage, Verified, Damage)),
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
    }
}
