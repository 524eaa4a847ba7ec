//! Who is calling: the authentication gate before any body is read, and
//! the Principal extractor every keyed handler takes.

use super::*;

/// Who is calling: set by [`gate`] for every authenticated request, and
/// taken by every keyed handler.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, MISSING_KEY))
    }
}

pub(super) const MISSING_KEY: &str =
    "Missing API key: send it in the X-API-Key header or as Authorization: Bearer";

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
                st.audit(None, action, target.as_deref(), &client, "denied 401", None)
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
    req.extensions_mut().insert(Principal { key, client });
    next.run(req).await
}
