//! `GET /health` and `GET /metrics`.

use super::*;

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

/// Prometheus metrics (read scope).
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn metrics(State(st): S, caller: Principal) -> ApiResult<Response> {
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
