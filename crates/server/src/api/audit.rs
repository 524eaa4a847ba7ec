//! `/v1/audit`: the audit trail, newest first (admin).

use super::*;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    pub(super) limit: Option<i64>,
    pub(super) cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEventView {
    pub(super) seq: i64,
    pub(super) ts: i64,
    pub(super) key_id: Option<String>,
    pub(super) action: String,
    pub(super) target: Option<String>,
    pub(super) client: Option<String>,
    pub(super) outcome: String,
    pub(super) detail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    pub(super) events: Vec<AuditEventView>,
    pub(super) next_cursor: Option<String>,
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
