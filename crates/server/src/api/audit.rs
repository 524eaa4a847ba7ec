//! `/v1/audit`: the audit trail, newest first (admin).

use super::*;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    pub(super) limit: Option<i64>,
    pub(super) cursor: Option<String>,
    /// Only this key's events.
    pub(super) key_id: Option<String>,
    /// Only this action (`job.create`, `egress`, `key.revoke`, ...).
    pub(super) action: Option<String>,
    /// Only this job's events and its egress decisions.
    pub(super) job: Option<String>,
}

/// The audit trail, newest first (admin).
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_audit(
    State(st): S,
    caller: Principal,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    caller.need(Scope::Admin)?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "query", e.body_text()))?;
    let (limit, cursor) = service::page_params(q.limit, q.cursor.as_deref())?;
    let filter = agentvm_store::AuditFilter {
        key_id: q.key_id,
        action: q.action,
        job: q.job,
    };
    let (ev, next_cursor) = st.audit_page(&caller, limit, cursor, &filter).await?;
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
