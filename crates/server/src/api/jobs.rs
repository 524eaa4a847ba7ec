//! `/v1/jobs`: submit, list, show, logs (stored then live), recording,
//! patch, cancel, apply, delete.

use super::*;

/// A new job.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub(super) agent: String,
    pub(super) prompt: String,
    pub(super) repo_path: String,
    #[serde(default = "default_timeout")]
    #[schema(minimum = 1, maximum = 3600, default = 600)]
    pub(super) timeout: i64,
    #[serde(default)]
    pub(super) extra_args: Vec<String>,
    /// This job's network policy instead of its profile's: "none",
    /// "host" or "allow:HOST[:PORT],...". It may only narrow the
    /// profile's, unless the key was granted more (admin keys may use
    /// any).
    #[serde(default)]
    pub(super) network: Option<String>,
}

/// A job as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    pub(super) id: String,
    pub(super) agent: String,
    pub(super) prompt: String,
    pub(super) repo_path: String,
    pub(super) timeout_s: i64,
    pub(super) extra_args: Vec<String>,
    /// The job's own network policy (null: its profile's).
    pub(super) network: Option<String>,
    /// queued, running, succeeded, failed, timed_out, cancelled, interrupted
    pub(super) status: String,
    /// The key that made the job (its owner).
    pub(super) key_id: Option<String>,
    /// Unix time in milliseconds.
    pub(super) created_at: i64,
    pub(super) started_at: Option<i64>,
    pub(super) finished_at: Option<i64>,
    pub(super) exit_code: Option<i64>,
    pub(super) error: Option<String>,
    /// What the sandbox reported (status, duration_ms, changed_files, ...).
    #[schema(value_type = Option<Object>)]
    pub(super) result: Option<serde_json::Value>,
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
    pub(super) status: Option<String>,
    /// Only jobs of this agent.
    pub(super) agent: Option<String>,
    /// 1 to 200, default 50.
    pub(super) limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub(super) cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobPage {
    pub(super) jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub(super) next_cursor: Option<String>,
}

pub(super) fn page_params(
    limit: Option<i64>,
    cursor: Option<&str>,
) -> ApiResult<(i64, Option<i64>)> {
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
pub(super) async fn find(st: &AppState, caller: &Caller, id: &str) -> ApiResult<Job> {
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

pub(super) fn chunk_event(c: &agentvm_store::LogChunk) -> Event {
    Event::default()
        .id(c.seq.to_string())
        .event(c.stream.clone())
        .data(String::from_utf8_lossy(&c.data))
}

/// The shared stored-then-live stream as server-sent events: one `id:`ed
/// event per chunk, then `event: end`.
pub(super) fn follow(
    st: Arc<AppState>,
    job: Job,
    after: i64,
    slot: Slot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    use futures_util::StreamExt;
    let rx = output::stored_then_live(st.store.clone(), st.runner.clone(), job, after, slot);
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
    pub(super) branch: String,
    pub(super) commit: String,
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
