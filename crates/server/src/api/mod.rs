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
use crate::output::{self, Pages};
use crate::runner::{Runner, SubmitError};

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

mod audit;
mod compat;
mod gate;
mod jobs;
mod keys;
mod ops;
mod validate;

pub use self::audit::*;
pub use self::compat::*;
pub use self::gate::*;
pub use self::jobs::*;
pub use self::keys::*;
pub use self::ops::*;
use self::validate::*;

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
