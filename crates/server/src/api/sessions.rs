//! `/v1/sessions`: start, list, show, end or delete, attach (a WebSocket),
//! patch, apply, recording, and HTTP to a port inside. Each handler
//! parses, calls the service and shapes the answer; the WebSocket's
//! framing is in docs/API.md.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::Request;

use super::*;
use crate::service::sessions::Viewer;
use crate::session::screen::Frame;
use crate::session::terminal::InputError;

/// Bytes one WebSocket message from a viewer may hold.
pub const MAX_WS_MESSAGE: usize = 64 * 1024;

/// Start a session: a shell (or an agent's interactive mode, or a command)
/// on a terminal in its own sandbox, over a copy-on-write view of the
/// repository. It runs until its command exits, DELETE, its idle timeout
/// or the server's shutdown; attach to it with `/attach`.
#[utoipa::path(post, path = "/v1/sessions", request_body = SessionRequest,
    responses((status = 201, body = SessionView, description = "Started (or stored as failed when its sandbox could not be set up: see status and error)"),
        (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail, description = "No such workspace (of yours)"),
        (status = 409, body = ErrorDetail, description = "A live session of yours has that name, or the workspace is being written"),
        (status = 413, description = "Body too large"), (status = 422, body = ValidationError),
        (status = 429, body = ErrorDetail), (status = 503, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_session(State(st): S, caller: Principal, body: Bytes) -> ApiResult<Response> {
    st.need_mut(&caller, Scope::Run, "session.create", None)
        .await?;
    let req: SessionRequest = parse_body(&body)?;
    let s = st.create_session(&caller, &req).await?;
    let loc = format!("/v1/sessions/{}", s.id);
    Ok(created(&loc, st.session_view(s)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct SessionListQuery {
    /// 1 to 200, default 50.
    pub(super) limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub(super) cursor: Option<String>,
}

/// List sessions, newest first: the key's own (everyone's for admin keys).
#[utoipa::path(get, path = "/v1/sessions", params(SessionListQuery),
    responses((status = 200, body = SessionPage), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_sessions(
    State(st): S,
    caller: Principal,
    q: Result<Query<SessionListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<SessionPage>> {
    caller.need(Scope::Read)?;
    let Query(q) = q.map_err(|e| ApiError::field("query", "query", e.body_text()))?;
    let (limit, cursor) = service::page_params(q.limit, q.cursor.as_deref())?;
    let (list, next_cursor) = st.list_sessions(&caller, limit, cursor).await?;
    Ok(Json(SessionPage {
        sessions: list.into_iter().map(|s| st.session_view(s)).collect(),
        next_cursor,
    }))
}

/// One session, by id or by the name of one of the caller's (the live one, else the newest).
#[utoipa::path(get, path = "/v1/sessions/{id}", params(("id" = String, Path, description = "Session id, or the name of one of your sessions (the live one, else the newest)")),
    responses((status = 200, body = SessionView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn get_session(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(st.session_view(st.find_session(&caller, &id).await?)))
}

/// End a live session (202: its command gets SIGHUP, then the sandbox is
/// killed 5 s later; the record says `killed`), or delete an ended one
/// with its recording and patch (204).
#[utoipa::path(delete, path = "/v1/sessions/{id}", params(("id" = String, Path)),
    responses((status = 202, body = SessionView, description = "Ending"), (status = 204, description = "Deleted"),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn delete_session(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(match st.end_session(&caller, &id).await? {
        Some(s) => (StatusCode::ACCEPTED, Json(st.session_view(s))).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AttachQuery {
    /// Watch only: this viewer never writes, even when nobody else does.
    pub(super) read_only: Option<bool>,
}

/// Attach to your own live session over a WebSocket. Binary messages are
/// terminal bytes, both ways; text messages are JSON `AttachMessage`s
/// (server: hello, writer, exit, notice; client: resize, take_over,
/// detach). The server sends `hello`, then the replay of recent output
/// (at most 64 KiB), then live output. One viewer writes at a time: the
/// first, until it detaches or another sends `take_over`. Output waits
/// for a viewer 256 messages behind; one that takes nothing for 2 s gets
/// a notice and is closed; the session goes on.
#[utoipa::path(get, path = "/v1/sessions/{id}/attach", params(("id" = String, Path), AttachQuery),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail, description = "The session has ended"),
        (status = 426, body = ErrorDetail, description = "Not a WebSocket upgrade"), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn attach_session(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<AttachQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::field("query", "read_only", e.body_text()))?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("attach is a WebSocket: {}", e.body_text()),
        )
    })?;
    let viewer = st
        .attach(&caller, &id, "ws", q.read_only.unwrap_or(false))
        .await?;
    // a browser that sent its key as a subprotocol must see one of its
    // offers chosen: `agentvm`, never the one that holds the key
    Ok(ws
        .protocols([crate::auth::WS_PROTOCOL])
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .write_buffer_size(0)
        .on_upgrade(move |sock| view(sock, viewer, st)))
}

fn text(m: &AttachMessage) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

/// One WebSocket viewer, until it detaches, closes, falls behind or the
/// session ends.
async fn view(mut sock: WebSocket, mut v: Viewer, st: Arc<AppState>) {
    let hello = AttachMessage::Hello {
        session: v.live.id.clone(),
        name: v.live.name.clone(),
        writer: v.writer,
        paused: v.live.screen().is_paused(),
    };
    if sock.send(text(&hello)).await.is_err() {
        return;
    }
    let replay = std::mem::take(&mut v.attached.replay);
    if !replay.is_empty() && sock.send(Message::Binary(replay.into())).await.is_err() {
        return;
    }
    let id = v.attached.id;
    let mut writer = v.writer;
    let mut told_read_only = false;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            f = v.attached.frames.recv() => match f {
                Some(Frame::Output(b)) => {
                    if sock.send(Message::Binary(Bytes::copy_from_slice(&b))).await.is_err() {
                        return;
                    }
                }
                Some(Frame::Paused(paused)) => {
                    if sock.send(text(&AttachMessage::Paused { paused })).await.is_err() {
                        return;
                    }
                }
                Some(Frame::End(code)) => {
                    let s = st.store.get_session(&v.live.id).await.ok().flatten();
                    let exit = AttachMessage::Exit {
                        status: s.as_ref().map(|s| s.status).unwrap_or(agentvm_store::SessionStatus::Exited),
                        exit_code: s.and_then(|s| s.exit_code).or(code.map(i64::from)),
                    };
                    let _ = sock.send(text(&exit)).await;
                    let _ = sock.send(Message::Close(None)).await;
                    return;
                }
                None => {
                    if v.attached.lagged() {
                        let n = AttachMessage::Notice {
                            detail: "you fell too far behind the session's output and were detached; the session goes on: attach again".into(),
                        };
                        let _ = sock.send(text(&n)).await;
                    }
                    let _ = sock.send(Message::Close(None)).await;
                    return;
                }
            },
            m = sock.recv() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    _ => return,
                };
                match m {
                    Message::Binary(b) => {
                        v.live.touch();
                        match v.live.term.input(id, &b) {
                            Ok(()) => {}
                            Err(InputError::ReadOnly) => {
                                if !told_read_only {
                                    told_read_only = true;
                                    let n = AttachMessage::Notice {
                                        detail: "you are watching read-only: input is ignored (send take_over to write)".into(),
                                    };
                                    if sock.send(text(&n)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(InputError::Paused) => {
                                if !told_read_only {
                                    told_read_only = true;
                                    let n = AttachMessage::Notice {
                                        detail: "the session is paused: input is ignored until it is resumed".into(),
                                    };
                                    if sock.send(text(&n)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(InputError::Busy) => {
                                let n = AttachMessage::Notice {
                                    detail: "input dropped: the program is not reading its terminal".into(),
                                };
                                if sock.send(text(&n)).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    Message::Text(t) => {
                        let reply = match serde_json::from_str::<AttachMessage>(&t) {
                            Ok(AttachMessage::Resize { rows, cols }) => {
                                match v.live.term.resize(id, rows, cols) {
                                    Ok(()) | Err(InputError::ReadOnly) => None,
                                    Err(_) => Some(format!("resize refused: rows and cols must be 1 to {}", agentvm_proto::run::TTY_MAX)),
                                }
                            }
                            Ok(AttachMessage::TakeOver) => {
                                if !v.writer_allowed() {
                                    Some("this viewer attached read-only and cannot take over".into())
                                } else if v.live.screen().is_paused() {
                                    Some("the session is paused: resume it first".into())
                                } else if v.live.screen().take_over(id) {
                                    v.live.touch();
                                    None
                                } else {
                                    Some("take_over failed: the session has ended".into())
                                }
                            }
                            Ok(AttachMessage::Detach) => {
                                let _ = sock.send(Message::Close(None)).await;
                                return;
                            }
                            Ok(_) => Some("that message is one the server sends, not a viewer".into()),
                            Err(e) => Some(format!("not an attach message: {}", agentvm_store::bounded(&e.to_string(), 200))),
                        };
                        if let Some(detail) = reply {
                            if sock.send(text(&AttachMessage::Notice { detail })).await.is_err() {
                                return;
                            }
                        }
                    }
                    Message::Close(_) => return,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = tick.tick() => {}
        }
        // once the session has ended nobody writes; its viewers are told
        // that by the exit message, never by a "writer: false" before it
        let now = v.live.screen().is_writer(id);
        if now != writer && !v.live.screen().has_ended() {
            writer = now;
            if now {
                told_read_only = false;
            }
            if sock
                .send(text(&AttachMessage::Writer { writer }))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Pause a live session: every process of it is frozen (the freezer
/// cgroup on v1, cgroup.freeze on v2) and uses no CPU, its memory kept;
/// input is ignored and its idle timeout's clock stands still. Viewers
/// stay attached, read-only, and are told. Answers once the kernel says
/// every process is frozen (one stuck in the kernel for 5 s fails it).
#[utoipa::path(post, path = "/v1/sessions/{id}/pause", params(("id" = String, Path)),
    responses((status = 200, body = SessionView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail, description = "Ended, or it could not be frozen (why is said)"),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn pause_session(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<SessionView>> {
    let s = st.pause_session(&caller, &id, true).await?;
    Ok(Json(st.session_view(s)))
}

/// Resume a paused session: its processes run on from where they were.
#[utoipa::path(post, path = "/v1/sessions/{id}/resume", params(("id" = String, Path)),
    responses((status = 200, body = SessionView), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail, description = "Ended"),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn resume_session(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<SessionView>> {
    let s = st.pause_session(&caller, &id, false).await?;
    Ok(Json(st.session_view(s)))
}

/// An ended session's changes as a git patch (empty when it changed
/// nothing).
#[utoipa::path(get, path = "/v1/sessions/{id}/patch", params(("id" = String, Path)),
    responses((status = 200, description = "A git patch", content_type = "text/x-diff", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail, description = "Still running"), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn session_patch(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let (_, patch) = st.session_patch(&caller, &id).await?;
    Ok(diff_response(patch))
}

/// Put an ended session's patch on a new branch `agentvm/<session-id>` of
/// its repository, by the same rules as a job's apply.
#[utoipa::path(post, path = "/v1/sessions/{id}/apply", params(("id" = String, Path)),
    responses((status = 201, body = Applied), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn apply_session(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Applied>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.apply_session(&caller, &id).await?),
    ))
}

/// The session's asciicast v2 recording as written so far (redacted; "o"
/// output and "r" resize events, "i" input only when the session asked
/// for it). 404 once removed by the retention setting.
#[utoipa::path(get, path = "/v1/sessions/{id}/recording", params(("id" = String, Path)),
    responses((status = 200, description = "asciicast v2", content_type = "application/x-asciicast", body = String),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn session_recording(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let s = st.find_session(&caller, &id).await?;
    let file = tokio::fs::File::open(st.recording_path(&s.id))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound if s.status == SessionStatus::Failed => ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "Session {} has no recording: its sandbox could not be set up (see its error)",
                    s.name
                ),
            ),
            std::io::ErrorKind::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "Session {} has no recording (removed after the retention period)",
                    s.name
                ),
            ),
            _ => {
                tracing::error!(session = %s.id, error = %e, "opening a session's recording failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Session {}'s recording could not be read", s.name),
                )
            }
        })?;
    let body = streamed(|tx| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, crate::recording::CONTENT_TYPE)],
        body,
    )
        .into_response())
}

/// Headers never passed to a program inside: the caller's credentials and
/// the hop-by-hop ones.
const NOT_FORWARDED: &[&str] = &[
    "authorization",
    "x-api-key",
    // a browser's key rides in the WebSocket subprotocol list
    "sec-websocket-protocol",
    "cookie",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// HTTP to a port listening on the session's own loopback (a dev server's
/// preview), for the session's owner: the request goes in without the
/// caller's key or cookies, HTTP/1.1, one request per connection, no
/// upgrades; the answer comes back with `Content-Security-Policy: sandbox`
/// (scripts run in an opaque origin that cannot reach this API's) and no
/// `Set-Cookie`.
#[utoipa::path(get, path = "/v1/sessions/{id}/ports/{port}/{path}", params(("id" = String, Path), ("port" = u16, Path), ("path" = String, Path)),
    responses((status = 200, description = "Whatever the program inside answers"),
        (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 404, body = ErrorDetail),
        (status = 409, body = ErrorDetail, description = "Ended, host network, or nothing listens there"),
        (status = 422, body = ValidationError), (status = 429, body = ErrorDetail),
        (status = 502, body = ErrorDetail, description = "The program inside did not answer HTTP")),
    security(("api_key" = [])))]
pub async fn session_port(
    State(st): S,
    caller: Principal,
    UrlPath(parts): UrlPath<Vec<(String, String)>>,
    req: Request,
) -> ApiResult<Response> {
    let get = |k: &str| parts.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let id = get("id").unwrap_or_default();
    let port: u16 = get("port")
        .unwrap_or_default()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::field("path", "port", "a TCP port, 1 to 65535"))?;
    let rest = get("path").unwrap_or_default();
    let stream = st.forward(&caller, &id, port).await?;
    let (mut parts, body) = req.into_parts();
    let mut path = format!("/{}", rest.trim_start_matches('/'));
    if let Some(q) = parts.uri.query() {
        path.push('?');
        path.push_str(q);
    }
    parts.uri = path
        .parse()
        .map_err(|_| ApiError::field("path", "path", "not a valid request path"))?;
    parts.version = axum::http::Version::HTTP_11;
    for h in NOT_FORWARDED {
        parts.headers.remove(*h);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("localhost:{port}")) {
        parts.headers.insert(header::HOST, v);
    }
    let bad_gateway = |e: String| ApiError::new(StatusCode::BAD_GATEWAY, e);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| bad_gateway(format!("port {port} inside the session: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(axum::http::Request::from_parts(parts, body))
        .await
        .map_err(|e| {
            bad_gateway(format!(
                "port {port} inside the session did not answer HTTP: {e}"
            ))
        })?;
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::SET_COOKIE);
    for h in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
        parts.headers.remove(h);
    }
    parts.headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox allow-scripts allow-forms allow-popups"),
    );
    Ok(Response::from_parts(parts, axum::body::Body::new(body)))
}
