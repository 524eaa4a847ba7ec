//! `POST /agent/run`: the old API existing clients use, answered when the
//! job ends, with keepalive spaces meanwhile.

use super::*;

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
pub async fn agent_run(State(st): S, caller: Principal, body: Bytes) -> ApiResult<Response> {
    st.need_mut(&caller, Scope::Run, "agent.run", None).await?;
    let req: AgentRunRequest = parse_body(&body)?;
    let extra = req.extra_args.unwrap_or_default();
    let ask = service::Ask {
        agent: &req.agent,
        prompt: &req.prompt,
        repo_path: &req.repo_path,
        timeout: req.timeout,
        extra: &extra,
        network: None,
        workspace: None,
        read_only: false,
        image: None,
    };
    let job = st.submit(&caller, "agent.run", &ask).await?;
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
pub(super) async fn compat_answer(st: Arc<AppState>, job: Job, tx: Tx) {
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
pub(super) fn json_inner(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap_or_default();
    q.get(1..q.len().saturating_sub(1))
        .unwrap_or("")
        .to_string()
}

pub(super) type Tx = tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>;

/// A response body that `produce` writes into from a task of its own,
/// through a channel of a few pieces: when the client stops reading, the
/// task waits; when it goes away, the task's next send fails.
pub(super) fn streamed<F, Fut>(produce: F) -> axum::body::Body
where
    F: FnOnce(Tx) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}
