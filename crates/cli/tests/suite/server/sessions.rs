//! Interactive sessions through the API and the CLI: attach, detach and
//! re-attach with the shell's state intact, one writer at a time, patch and
//! apply, recordings asciinema reads, privacy, limits, idle timeout, slow
//! viewers, restarts and HTTP to a port inside.

use std::net::TcpStream;

use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message, WebSocket};

use super::*;

pub(super) type Ws = WebSocket<TcpStream>;

/// Attach over the WebSocket (`query` such as "?read_only=true").
pub(super) fn ws(s: &Server, key: &str, id: &str, query: &str) -> Result<Ws, (u16, String)> {
    let url = format!(
        "{}/v1/sessions/{id}/attach{query}",
        s.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    let host = s.url.trim_start_matches("http://").to_string();
    let tcp = TcpStream::connect(&host).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    match tungstenite::client::client(req, tcp) {
        Ok((w, _)) => Ok(w),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => Err((
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("attach: {e}"),
    }
}

/// Attach as a browser must: no header of its own, the key offered as
/// the subprotocol `agentvm.key.KEY` beside `agentvm`; the protocol the
/// server chose, or the refusal.
pub(super) fn ws_as_browser(
    s: &Server,
    key: &str,
    id: &str,
) -> Result<(Ws, String), (u16, String)> {
    let url = format!(
        "{}/v1/sessions/{id}/attach",
        s.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("agentvm, agentvm.key.{key}").parse().unwrap(),
    );
    let host = s.url.trim_start_matches("http://").to_string();
    let tcp = TcpStream::connect(&host).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    match tungstenite::client::client(req, tcp) {
        Ok((w, resp)) => {
            let chosen = resp
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            Ok((w, chosen))
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => Err((
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("attach: {e}"),
    }
}

/// The next text message as JSON (binary messages before it are skipped
/// into `out`).
pub(super) fn next_text(w: &mut Ws, out: &mut Vec<u8>) -> Value {
    loop {
        match w.read() {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).unwrap_or(Value::Null),
            Ok(Message::Binary(b)) => out.extend_from_slice(&b),
            Ok(Message::Close(_)) | Err(_) => return Value::Null,
            Ok(_) => {}
        }
    }
}

/// Read terminal bytes until `want` appears in what was read (or 20 s).
pub(super) fn read_until(w: &mut Ws, want: &str) -> String {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match w.read() {
            Ok(Message::Binary(b)) => {
                seen.extend_from_slice(&b);
                if String::from_utf8_lossy(&seen).contains(want) {
                    break;
                }
            }
            Ok(Message::Text(_)) | Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

pub(super) fn type_in(w: &mut Ws, text: &str) {
    w.send(Message::Binary(text.as_bytes().to_vec().into()))
        .unwrap();
}

pub(super) fn create(s: &Server, body: Value) -> Value {
    let (code, v) = s.json("POST", "/v1/sessions", Some(body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["status"], "running", "{v}");
    v
}

/// Poll the session until it has ended.
pub(super) fn wait_ended(s: &Server, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, v) = s.json("GET", &format!("/v1/sessions/{id}"), None);
        if v["status"] != "running" || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn new_key(s: &Server, scopes: &[&str]) -> String {
    let (code, v) = s.json(
        "POST",
        "/v1/keys",
        Some(json!({"name": "other", "scopes": scopes})),
    );
    assert_eq!(code, 201, "{v}");
    v["key"].as_str().unwrap_or("").to_string()
}

#[test]
fn attach_detach_reattach_one_writer_patch_apply_and_recording() {
    let (t, repo, s) = setup(&[]);
    let v = create(
        &s,
        json!({"repo_path": repo.to_string_lossy(), "name": "work", "rows": 30, "cols": 100}),
    );
    let id = v["id"].as_str().unwrap_or("").to_string();
    assert_eq!(v["name"], "work");
    // the first viewer writes
    let mut a = ws(&s, &s.key, "work", "").unwrap();
    let mut junk = Vec::new();
    let hello = next_text(&mut a, &mut junk);
    assert_eq!(
        hello,
        json!({"type": "hello", "session": id, "name": "work", "writer": true, "paused": false})
    );
    type_in(&mut a, "export KEEP=kept-$((6*7)); stty size\r");
    let out = read_until(&mut a, "30 100");
    assert!(out.contains("30 100"), "the size asked for: {out}");
    a.send(Message::Text(
        r#"{"type":"resize","rows":40,"cols":120}"#.into(),
    ))
    .unwrap();
    type_in(&mut a, "stty size\r");
    let out = read_until(&mut a, "40 120");
    assert!(out.contains("40 120"), "resized: {out}");
    // detach: the session goes on, nobody attached
    a.send(Message::Text(r#"{"type":"detach"}"#.into()))
        .unwrap();
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    let (_, v) = s.json("GET", "/v1/sessions/work", None);
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(v["viewers"], json!([]), "{v}");
    // re-attach: the replay first, then the shell as it was left
    let mut b = ws(&s, &s.key, &id, "").unwrap();
    let mut replay = Vec::new();
    let hello = next_text(&mut b, &mut replay);
    assert_eq!(hello["writer"], true);
    type_in(&mut b, "echo \"got $KEEP\"\r");
    let out = read_until(&mut b, "got kept-42");
    assert!(
        out.contains("got kept-42"),
        "state kept across detach: {out}"
    );
    // a read-only watcher: its input is ignored, with a notice
    let mut r = ws(&s, &s.key, &id, "?read_only=true").unwrap();
    let hello = next_text(&mut r, &mut Vec::new());
    assert_eq!(hello["writer"], false);
    type_in(&mut r, "touch /workspace/from-watcher\r");
    let n = next_text(&mut r, &mut Vec::new());
    assert_eq!(n["type"], "notice", "{n}");
    r.send(Message::Text(r#"{"type":"take_over"}"#.into()))
        .unwrap();
    let n = next_text(&mut r, &mut Vec::new());
    assert!(
        n["detail"].as_str().unwrap_or("").contains("read-only"),
        "{n}"
    );
    // a second full viewer takes over: the first then reads only
    let mut c = ws(&s, &s.key, &id, "").unwrap();
    assert_eq!(next_text(&mut c, &mut Vec::new())["writer"], false);
    let (_, v) = s.json("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(v["viewers"].as_array().map(|a| a.len()), Some(3), "{v}");
    c.send(Message::Text(r#"{"type":"take_over"}"#.into()))
        .unwrap();
    assert_eq!(
        next_text(&mut c, &mut Vec::new()),
        json!({"type": "writer", "writer": true})
    );
    assert_eq!(
        next_text(&mut b, &mut Vec::new()),
        json!({"type": "writer", "writer": false})
    );
    type_in(&mut b, "touch /workspace/from-old-writer\r");
    // the new writer changes the repo and exits with a status
    type_in(
        &mut c,
        "echo change >> a.txt; echo new > made.txt; exit 7\r",
    );
    let end = next_text(&mut c, &mut Vec::new());
    assert_eq!(
        end,
        json!({"type": "exit", "status": "exited", "exit_code": 7})
    );
    assert_eq!(
        next_text(&mut r, &mut Vec::new())["type"],
        "exit",
        "watchers are told too"
    );
    let v = wait_ended(&s, &id, Duration::from_secs(20));
    assert_eq!(
        (v["status"].as_str(), v["exit_code"].as_i64()),
        (Some("exited"), Some(7)),
        "{v}"
    );
    // attach to an ended session: a clear 409
    let e = ws(&s, &s.key, &id, "").err();
    assert_eq!(e.as_ref().map(|e| e.0), Some(409), "{e:?}");
    // the patch has the writers' changes, not the watcher's
    let patch = s.text(&format!("/v1/sessions/{id}/patch"));
    assert!(
        patch.contains("made.txt") && patch.contains("a.txt"),
        "{patch}"
    );
    assert!(
        !patch.contains("from-watcher") && !patch.contains("from-old-writer"),
        "{patch}"
    );
    let (code, ap) = s.json("POST", &format!("/v1/sessions/{id}/apply"), None);
    assert_eq!(code, 201, "{ap}");
    assert_eq!(ap["branch"], format!("agentvm/{id}"));
    let shown = sh(&repo, &format!("git show agentvm/{id}:made.txt"));
    assert_eq!(String::from_utf8_lossy(&shown.stdout), "new\n");
    // the recording: header with size and command, o and r events, no i
    let cast = s.text(&format!("/v1/sessions/{id}/recording"));
    let mut lines = cast.lines();
    let head: Value = serde_json::from_str(lines.next().unwrap_or("")).unwrap_or(Value::Null);
    assert_eq!(
        (
            head["version"].as_i64(),
            head["width"].as_i64(),
            head["height"].as_i64()
        ),
        (Some(2), Some(100), Some(30)),
        "{head}"
    );
    assert!(
        head["timestamp"].as_i64().is_some() && head["command"] == "bash",
        "{head}"
    );
    let events: Vec<Value> = lines.filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        events.iter().any(|e| e[1] == "r" && e[2] == "120x40"),
        "resize recorded"
    );
    assert!(
        events.iter().all(|e| e[1] != "i"),
        "input is not recorded by default"
    );
    assert!(events
        .iter()
        .any(|e| e[1] == "o" && e[2].as_str().unwrap_or("").contains("got kept-42")));
    let file = t.path().join("session.cast");
    if let Some(shown) = asciinema_accepts(&file, &cast, "a session's recording") {
        assert!(shown.contains("got kept-42"), "{shown}");
    }
    // the audit trail has the session's story
    let (_, audit) = s.json("GET", "/v1/audit?limit=200", None);
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["target"] == id.as_str())
                .filter_map(|e| e["action"].as_str())
                .collect()
        })
        .unwrap_or_default();
    for a in ["session.create", "session.attach", "session.apply"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    // an ended session is deleted (204), then gone
    let (code, _, _) = s.req("DELETE", &format!("/v1/sessions/{id}"), Some(&s.key), None);
    assert_eq!(code, 204);
    let (code, _) = s.json("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(code, 404);
}

#[test]
fn sessions_are_private_validated_and_limited() {
    let (t, repo, s) = setup(&["--max-sessions-per-key", "2"]);
    let other = new_key(&s, &["run"]);
    let v = create(&s, json!({"name": "mine", "command": ["sleep", "600"]}));
    let id = v["id"].as_str().unwrap_or("").to_string();
    // another key: as unknown as a session that never was
    for (m, p) in [
        ("GET", format!("/v1/sessions/{id}")),
        ("DELETE", format!("/v1/sessions/{id}")),
        ("GET", format!("/v1/sessions/{id}/recording")),
        ("GET", format!("/v1/sessions/{id}/ports/80/")),
    ] {
        let (code, _, body) = s.req(m, &p, Some(&other), None);
        assert_eq!(code, 404, "{m} {p}: {body}");
    }
    assert_eq!(ws(&s, &other, &id, "").err().map(|e| e.0), Some(404));
    let (_, page) = s.json("GET", "/v1/sessions", None);
    assert_eq!(
        page["sessions"].as_array().map(|a| a.len()),
        Some(1),
        "{page}"
    );
    let (_, _, mine) = s.req("GET", "/v1/sessions", Some(&other), None);
    assert_eq!(
        serde_json::from_str::<Value>(&mine).unwrap_or_default()["sessions"],
        json!([])
    );
    // the admin sees it but may not type into it
    let admin_view = s.json("GET", &format!("/v1/sessions/{id}"), None).1;
    assert_eq!(admin_view["id"], id.as_str());
    // bad requests: a clear 4xx and nothing stored
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for (body, code, field) in [
        (json!({"name": "-o"}), 422, "name"),
        (json!({"name": "a b"}), 422, "name"),
        (
            json!({"agent": "shell", "command": ["true"]}),
            422,
            "command",
        ),
        (json!({"command": []}), 422, "command"),
        (json!({"idle_timeout": 0}), 422, "idle_timeout"),
        (json!({"idle_timeout": 99_999_999}), 422, "idle_timeout"),
        (json!({"rows": 0}), 422, "rows"),
        (json!({"bogus": 1}), 422, "bogus"),
        (json!({"agent": "nope"}), 400, ""),
        (json!({"repo_path": outside.to_string_lossy()}), 403, ""),
    ] {
        let (c, v) = s.json("POST", "/v1/sessions", Some(body.clone()));
        assert_eq!(c, code, "{body}: {v}");
        assert!(v.to_string().contains(field), "{body}: {v}");
    }
    // a live name is taken; the limit per key holds
    let (c, v) = s.json("POST", "/v1/sessions", Some(json!({"name": "mine"})));
    assert_eq!(c, 409, "{v}");
    create(
        &s,
        json!({"name": "second", "repo_path": repo.to_string_lossy()}),
    );
    let (c, h, body) = s.req(
        "POST",
        "/v1/sessions",
        Some(&s.key),
        Some(json!({"name": "third"})),
    );
    assert_eq!(c, 429, "{body}");
    assert!(
        h.get("retry-after").is_some() && body.contains("limit per key"),
        "{body}"
    );
    let (_, page) = s.json("GET", "/v1/sessions", None);
    assert_eq!(
        page["sessions"].as_array().map(|a| a.len()),
        Some(2),
        "nothing stored: {page}"
    );
    // attach is a WebSocket: a plain GET is told so
    let (c, _, body) = s.req(
        "GET",
        &format!("/v1/sessions/{id}/attach"),
        Some(&s.key),
        None,
    );
    assert_eq!(c, 426, "{body}");
    // DELETE ends a live one (202, killed), then deletes it (204)
    let (c, _, body) = s.req("DELETE", "/v1/sessions/mine", Some(&s.key), None);
    assert_eq!(c, 202, "{body}");
    let v = wait_ended(&s, &id, Duration::from_secs(20));
    assert_eq!(v["status"], "killed", "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("ended by"),
        "{v}"
    );
}

#[test]
fn idle_sessions_end_and_slow_viewers_are_dropped() {
    let (_t, _repo, s) = setup(&[]);
    // no input and no viewer for its idle timeout: ended
    let v = create(&s, json!({"name": "idle", "idle_timeout": 1}));
    let id = v["id"].as_str().unwrap_or("").to_string();
    let v = wait_ended(&s, &id, Duration::from_secs(30));
    assert_eq!(v["status"], "killed", "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("idle timeout"),
        "{v}"
    );
    // a viewer that never reads while the session prints without end: it
    // is dropped with a notice, the session goes on
    let v = create(
        &s,
        json!({"name": "loud", "command": ["sh", "-c", "while :; do cat /etc/services; done"]}),
    );
    let id = v["id"].as_str().unwrap_or("").to_string();
    let mut w = ws(&s, &s.key, &id, "").unwrap();
    let mut dropped = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let (_, v) = s.json("GET", &format!("/v1/sessions/{id}"), None);
        if v["viewers"] == json!([]) {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "a viewer that never reads is still attached");
    let mut notice = Value::Null;
    loop {
        match w.read() {
            Ok(Message::Text(t)) => notice = serde_json::from_str(&t).unwrap_or_default(),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        notice["detail"]
            .as_str()
            .unwrap_or("")
            .contains("fell too far behind"),
        "{notice}"
    );
    let (_, v) = s.json("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(v["status"], "running", "the session goes on: {v}");
}

#[test]
fn a_restart_interrupts_live_sessions_and_keeps_their_recordings() {
    // a configured secret, typed at the prompt: recorded input is redacted too
    let secret = "sk-typed-in-9f8e7d6c5b4a3928";
    let sdir = tempdir();
    let sfile = sdir.path().join("typed.token");
    std::fs::write(&sfile, secret).unwrap();
    let arg = format!("TYPED_TOKEN={}", sfile.display());
    let (t, _repo, mut s) = setup(&["--secret", &arg]);
    let v = create(&s, json!({"name": "r", "record_input": true}));
    let id = v["id"].as_str().unwrap_or("").to_string();
    let mut w = ws(&s, &s.key, &id, "").unwrap();
    next_text(&mut w, &mut Vec::new());
    type_in(&mut w, &format!(": {secret}; echo typed-$((2+3))\r"));
    read_until(&mut w, "typed-5");
    type_in(&mut w, "echo before-$((1+1))\r");
    read_until(&mut w, "before-2");
    s.signal(libc::SIGTERM);
    assert!(
        s.wait_exit(Duration::from_secs(30)).is_some(),
        "the server did not stop"
    );
    let root = t.path().join("root").to_string_lossy().into_owned();
    let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    let (_, v) = s2.json("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(v["status"], "interrupted", "{v}");
    let cast = s2.text(&format!("/v1/sessions/{id}/recording"));
    // the events of one kind, joined (the redactor may cut output anywhere)
    let events = |kind: &str| {
        cast.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e[1] == kind)
            .filter_map(|e| e[2].as_str().map(String::from))
            .collect::<String>()
    };
    let shown = events("o");
    assert!(shown.contains("before-2"), "{cast}");
    assert!(shown.contains(": [REDACTED]; echo typed-"), "{cast}");
    // asked for, input is recorded too ("i" events)
    let typed = events("i");
    assert!(typed.contains("echo before-$((1+1))"), "{typed:?}");
    assert!(typed.contains(": [REDACTED]; echo typed-"), "{typed:?}");
    assert!(
        !cast.contains(secret),
        "the secret is in the recording: {cast}"
    );
}

/// The server run as an unprivileged user (uid 65534): without a cgroup
/// it may use, a session fails with the reason and how to fix it; with a
/// delegated one, it runs, is recorded and has its patch.
#[test]
fn sessions_run_rootless() {
    if !is_root() {
        return skip(
            "sessions from a server run as uid 65534",
            "switching to uid 65534 needs root: run ./test.sh as root",
        );
    }
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let repo = fixture_repo(Who::Nobody);
    let r = root.join("repo");
    assert!(sh(
        t.path(),
        &format!(
            "cp -R {}/. {} && chown -R {NOBODY}:{NOBODY} {}",
            repo.path().display(),
            r.display(),
            t.path().display()
        ),
    )
    .status
    .success());
    let data = t.path().join("data");
    let root_s = root.to_string_lossy().into_owned();
    let repo_s = r.to_string_lossy().into_owned();
    let cmd = json!(["sh", "-c", "echo made > new.txt; echo rootless-$((6*7))"]);

    let s = Server::start_as(Who::Nobody, &data, &["--allowed-root", &root_s]);
    let (code, v) = s.json(
        "POST",
        "/v1/sessions",
        Some(json!({"repo_path": repo_s, "name": "nocg", "command": cmd})),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("--cgroup-parent"),
        "{v}"
    );
    let id = v["id"].as_str().unwrap_or("").to_string();
    let (code, _, body) = s.req(
        "GET",
        &format!("/v1/sessions/{id}/recording"),
        Some(&s.key),
        None,
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("could not be set up"), "{body}");
    drop(s);

    let s = Server::start_as(
        Who::Nobody,
        &data,
        &[
            "--allowed-root",
            &root_s,
            "--cgroup-parent",
            delegated_cgroup(),
        ],
    );
    // the command ends at once: it may have exited already when the
    // answer is written (`create` would insist on "running")
    let (code, v) = s.json(
        "POST",
        "/v1/sessions",
        Some(json!({"repo_path": repo_s, "name": "rl", "command": cmd})),
    );
    assert_eq!(code, 201, "{v}");
    assert!(v["status"] == "running" || v["status"] == "exited", "{v}");
    let id = v["id"].as_str().unwrap_or("").to_string();
    let v = wait_ended(&s, &id, Duration::from_secs(60));
    assert_eq!(v["status"], "exited", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    let cast = s.text(&format!("/v1/sessions/{id}/recording"));
    assert!(cast.contains("rootless-42"), "{cast}");
    let patch = s.text(&format!("/v1/sessions/{id}/patch"));
    assert!(
        patch.contains("+++ b/new.txt") && patch.contains("+made"),
        "{patch}"
    );
    assert!(!r.join("new.txt").exists(), "the repo itself is untouched");
}

#[test]
fn http_reaches_a_port_inside_and_nothing_else() {
    let (_t, repo, s) = setup(&[]);
    // a server inside that answers with the headers it was sent
    let script = "import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n  def do_GET(s):\n    b=('path=%s\\n%s' % (s.path, s.headers)).encode()\n    s.send_response(200); s.send_header('Set-Cookie','x=1'); s.send_header('Content-Length',str(len(b))); s.end_headers(); s.wfile.write(b)\nh.HTTPServer(('127.0.0.1',8123),H).serve_forever()\n";
    let v = create(
        &s,
        json!({"name": "web", "repo_path": repo.to_string_lossy(), "command": ["python3", "-c", script]}),
    );
    let id = v["id"].as_str().unwrap_or("").to_string();
    let mut got = (0, reqwest::header::HeaderMap::new(), String::new());
    for _ in 0..100 {
        got = s.req(
            "GET",
            &format!("/v1/sessions/{id}/ports/8123/some/page?q=1"),
            Some(&s.key),
            None,
        );
        if got.0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, h, body) = got;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("path=/some/page?q=1\n"), "{body}");
    let lower = body.to_lowercase();
    assert!(
        !lower.contains("x-api-key") && !lower.contains(&s.key),
        "the caller's key went inside: {body}"
    );
    assert!(lower.contains("host: localhost:8123"), "{body}");
    assert!(h.get("set-cookie").is_none(), "{h:?}");
    assert_eq!(
        h.get("content-security-policy")
            .and_then(|v| v.to_str().ok()),
        Some("sandbox allow-scripts allow-forms allow-popups")
    );
    // a port nobody listens on inside (the server's own is one): refused
    let own = s.url.rsplit(':').next().unwrap_or("0").to_string();
    for p in ["8124", own.as_str()] {
        let (code, _, body) = s.req(
            "GET",
            &format!("/v1/sessions/{id}/ports/{p}/"),
            Some(&s.key),
            None,
        );
        assert_eq!(code, 409, "port {p}: {body}");
        assert!(body.contains("nothing listens"), "{body}");
    }
    for p in ["0", "70000", "x"] {
        let (code, _, _) = s.req(
            "GET",
            &format!("/v1/sessions/{id}/ports/{p}/"),
            Some(&s.key),
            None,
        );
        assert_eq!(code, 422, "port {p}");
    }
}

#[test]
fn the_cli_starts_detaches_reattaches_and_lists() {
    let (_t, repo, s) = setup(&[]);
    let cli = |args: &[&str], stdin: &[u8]| {
        use std::io::Write;
        let mut c = Command::new(agentvm_path())
            .args(args)
            .env("AGENTVM_URL", &s.url)
            .env("AGENTVM_API_KEY_FILE", s.data.join("admin.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut i = c.stdin.take().unwrap();
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            for piece in data.split_inclusive(|b| *b == b'\n') {
                let _ = i.write_all(piece);
                std::thread::sleep(Duration::from_millis(400));
            }
            std::thread::sleep(Duration::from_secs(30));
        });
        c.wait_with_output().unwrap()
    };
    let r = repo.to_string_lossy().into_owned();
    let o = cli(
        &["shell", "--repo", &r, "--name", "dev"],
        b"export X=$((40+2))\n~.",
    );
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Enter ~ ."),
        "the detach key is said: {o:?}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("detached from session dev"),
        "{o:?}"
    );
    let o = cli(&["sessions", "list"], b"");
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(list.contains("dev") && list.contains("running"), "{list}");
    let o = cli(&["sessions", "show", "dev", "--json"], b"");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v["status"], "running", "{o:?}");
    let o = cli(
        &["shell", "--attach", "dev"],
        b"echo \"x=$X\" > out.txt; exit 5\n",
    );
    assert_eq!(o.status.code(), Some(5), "the command's exit status: {o:?}");
    let o = cli(&["sessions", "patch", "dev"], b"");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("+x=42"),
        "{o:?}"
    );
    let o = cli(&["sessions", "apply", "dev", "--json"], b"");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(
        v["branch"]
            .as_str()
            .unwrap_or("")
            .starts_with("agentvm/ses_"),
        "{o:?}"
    );
    let o = cli(&["sessions", "kill", "dev"], b"");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already ended"),
        "{o:?}"
    );
    let o = cli(&["shell", "--attach", "nope"], b"");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no live session nope"),
        "{o:?}"
    );
}

/// From a real terminal (script(1) makes one): the session starts at the
/// terminal's size, follows a resize (SIGWINCH), and the terminal is left
/// as it was found (raw mode undone).
#[test]
fn the_cli_shell_follows_the_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        return skip(
            "agentvm shell at a terminal",
            "install script(1) (bsdutils)",
        );
    }
    let (_t, repo, s) = setup(&[]);
    let line = format!(
        "stty rows 33 cols 101; (sleep 2.5; stty rows 40 cols 120 < /dev/tty) & \
         AGENTVM_URL={} AGENTVM_API_KEY_FILE={} {} shell --repo {} -- sh -c 'echo size $(stty size); sleep 5; echo size $(stty size)'; \
         echo rc=$?; stty -a | grep -o -- '-*icanon'",
        s.url,
        s.data.join("admin.key").display(),
        agentvm_path().display(),
        repo.display()
    );
    let o = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    assert!(out.contains("size 33 101"), "the first size: {out}");
    assert!(out.contains("size 40 120"), "the resize: {out}");
    assert!(out.contains("rc=0"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "icanon"),
        "the terminal is restored: {out}"
    );
}

/// A browser cannot put a header on a WebSocket, and the key must stay
/// out of URLs: it offers the key as a subprotocol, and the server answers
/// with `agentvm`, never echoing the key. The subprotocol is a credential
/// only on an upgrade.
#[test]
fn a_browser_attaches_with_its_key_as_a_subprotocol() {
    let (_t, _repo, s) = setup(&[]);
    let v = create(&s, json!({"command": ["sh"]}));
    let id = v["id"].as_str().unwrap_or("").to_string();
    let (mut w, chosen) = ws_as_browser(&s, &s.key, &id).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(chosen, "agentvm", "the key was echoed or nothing chosen");
    let mut out = Vec::new();
    let hello = next_text(&mut w, &mut out);
    assert_eq!(hello["type"], "hello", "{hello}");
    type_in(&mut w, "echo via-$((6*7))\n");
    assert!(read_until(&mut w, "via-42").contains("via-42"));
    drop(w);
    // a wrong key: refused like any other
    assert_eq!(
        ws_as_browser(&s, "avm_wrong", &id).err().map(|e| e.0),
        Some(401)
    );
    // not an upgrade: the header is no credential
    let r = reqwest::blocking::Client::new()
        .get(format!("{}/v1/sessions", s.url))
        .header("sec-websocket-protocol", format!("agentvm.key.{}", s.key))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // the attach is audited, the key nowhere in the trail
    let (_, _, audit) = s.req("GET", "/v1/audit", Some(&s.key.clone()), None);
    assert!(audit.contains("attach"), "{audit}");
    assert!(!audit.contains(&s.key), "the key reached the audit trail");
}
