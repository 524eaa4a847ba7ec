//! `/v1/jobs`: submit, list, show, logs (stored then live), recording,
//! patch, cancel, apply, delete. Each handler parses, calls the service
//! and shapes the answer.

use super::*;

/// A stored job as the API shows it.
pub fn job_view(j: Job) -> JobView {
    JobView {
        id: j.id,
        agent: j.agent,
        prompt: j.prompt,
        repo_path: j.repo_path,
        timeout_s: j.timeout_s,
        extra_args: j.extra_args,
        network: j.network,
        image: j.image,
        status: j.status,
        key_id: j.key_id,
        created_at: j.created_at,
        started_at: j.started_at,
        finished_at: j.finished_at,
        exit_code: j.exit_code,
        error: j.error,
        result: j.result,
    }
}

/// Submit a job; it runs when a slot is free.
#[utoipa::path(post, path = "/v1/jobs", request_body = JobRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail),
        (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail, description = "No such workspace (of yours)"),
        (status = 409, body = ErrorDetail, description = "The workspace is being written by another job or session"),
        (status = 413, description = "Body too large"), (status = 422, body = ValidationError),
        (status = 429, body = ErrorDetail), (status = 503, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_job(State(st): S, caller: Principal, body: Bytes) -> ApiResult<Response> {
    // the scope before the body: a key that may not run learns nothing more
    st.need_mut(&caller, Scope::Run, "job.create", None).await?;
    let req: JobRequest = parse_body(&body)?;
    let ask = service::Ask {
        agent: &req.agent,
        prompt: &req.prompt,
        repo_path: &req.repo_path,
        timeout: req.timeout,
        extra: &req.extra_args,
        network: req.network.as_deref(),
        workspace: req.workspace.as_deref(),
        read_only: req.read_only,
        image: req.image.as_deref(),
    };
    let job = st.submit(&caller, "job.create", &ask).await?;
    let loc = format!("/v1/jobs/{}", job.id);
    let mut r = (StatusCode::ACCEPTED, Json(job_view(job))).into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub(super) status: Option<String>,
    /// Only jobs of this agent.
    pub(super) agent: Option<String>,
    /// 1 to 200, default 50.
    pub(super) limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub(super) cursor: Option<String>,
}

/// List jobs, newest first: the key's own (every job for admin keys).
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery),
    responses((status = 200, body = JobPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_jobs(
    State(st): S,
    caller: Principal,
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
    let (limit, cursor) = service::page_params(q.limit, q.cursor.as_deref())?;
    let f = service::JobFilter {
        status,
        agent: q.agent.as_deref(),
        limit,
        cursor,
    };
    let (jobs, next_cursor) = st.list_jobs(&caller, &f).await?;
    Ok(Json(JobPage {
        jobs: jobs.into_iter().map(job_view).collect(),
        next_cursor,
    }))
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn get_job(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(job_view(st.job(&caller, &id).await?)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Stream as server-sent events until the job ends (resumes from Last-Event-ID).
    pub(super) follow: Option<bool>,
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
    caller: Principal,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    caller.need(Scope::Read)?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "follow", e.body_text()))?;
    if q.follow.unwrap_or(false) {
        let after = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        let rx = st.follow(&caller, &id, after).await?;
        return Ok(Sse::new(sse(rx))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (job, slot) = st.open_stream(&caller, &id).await?;
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

pub(super) fn chunk_event(c: &agentvm_store::LogChunk) -> Event {
    Event::default()
        .id(c.seq.to_string())
        .event(c.stream.clone())
        .data(String::from_utf8_lossy(&c.data))
}

/// The shared stored-then-live stream as server-sent events: one `id:`ed
/// event per chunk, then `event: end`.
fn sse(
    rx: tokio::sync::mpsc::Receiver<output::Item>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    use futures_util::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
        Ok(match item {
            output::Item::Chunk(c) => chunk_event(&c),
            output::Item::End(status) => Event::default()
                .event("end")
                .data(serde_json::json!({ "status": status }).to_string()),
        })
    })
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
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let (job, slot) = st.open_stream(&caller, &id).await?;
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
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let (job, slot) = st.open_patch(&caller, &id).await?;
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
    Ok(diff_response(body))
}

/// Cancel a queued or running job.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 202, body = JobView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn cancel_job(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let job = st.cancel(&caller, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(job_view(job))))
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
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Applied>)> {
    Ok((StatusCode::CREATED, Json(st.apply(&caller, &id).await?)))
}

/// Delete an ended job with its output and patch.
#[utoipa::path(delete, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn delete_job(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    st.delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
