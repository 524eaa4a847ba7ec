//! Who is calling: the authentication gate before any body is read, the
//! Caller extractor every handler takes, the audit of refusals, and the
//! per-key stream slots.

use super::*;

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

pub(super) const MISSING_KEY: &str =
    "Missing API key: send it in the X-API-Key header or as Authorization: Bearer";

pub(super) fn scope_name(s: Scope) -> &'static str {
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
    pub(super) fn need(&self, need: Scope) -> ApiResult<()> {
        if auth::max_scope(&self.key.scopes) < Some(need) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("This API key lacks the {} scope", scope_name(need)),
            ));
        }
        Ok(())
    }

    /// Like `need`, for a mutating call: a refusal is audited.
    pub(super) async fn need_mut(
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
    pub(super) fn owns(&self, j: &Job) -> bool {
        self.is_admin() || j.key_id.as_deref() == Some(self.key.id.as_str())
    }

    /// Audit a call made with this key from this client.
    pub(super) async fn record(
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

pub(super) async fn audit(
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
pub(super) fn action_of(method: &axum::http::Method, route: &str) -> Option<&'static str> {
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
    pub(super) per_key: usize,
    pub(super) used: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One open stream; the slot frees itself when the stream ends.
pub struct Slot {
    pub(super) slots: StreamSlots,
    pub(super) key: String,
}

impl StreamSlots {
    pub fn new(per_key: usize) -> StreamSlots {
        StreamSlots {
            per_key,
            used: Arc::default(),
        }
    }

    pub(super) fn take(&self, key: &str) -> ApiResult<Slot> {
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
