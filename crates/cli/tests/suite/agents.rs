//! Real agent CLIs, offline, against a scripted model server on loopback.
//! aider must pass in CI (`.ci/run` installs it into /opt/agentvm-agents/aider);
//! elsewhere the test is skipped with a note when aider is absent.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::suite::server::Server;

const AIDER_VENV: &str = "/opt/agentvm-agents/aider";

/// Read one HTTP/1.1 request from `r`: its first line and its body. `None`
/// when the connection closed.
fn read_request(r: &mut impl BufRead) -> Option<(String, Vec<u8>)> {
    let mut first = String::new();
    if r.read_line(&mut first).unwrap_or(0) == 0 {
        return None;
    }
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((first, body))
}

/// An OpenAI-compatible chat-completions server that always answers with
/// `reply` (non-streaming), and counts what it was asked.
fn scripted_openai(reply: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let h3 = h2.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(match s.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let Some((first, _body)) = read_request(&mut r) else {
                    return;
                };
                if !first.starts_with("POST") || !first.contains("/chat/completions") {
                    let _ = s.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                }
                h3.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let resp = json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "scripted",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                })
                .to_string();
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{resp}", resp.len()).as_bytes());
            });
        }
    });
    (port, hits)
}

#[test]
fn aider_edits_a_file_through_the_allowlist_and_nothing_else() {
    let aider = Path::new(AIDER_VENV).join("bin/aider");
    if !aider.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "aider is not installed at {AIDER_VENV} (.ci/run installs it)"
        );
        eprintln!("skipping: aider is not installed at {AIDER_VENV}");
        return;
    }
    let (port, hits) = scripted_openai("hello.txt\n```\nhello from the scripted model\n```\n");
    let t = tempdir();
    let root = t.path().join("root");
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(repo.join("hello.txt"), "hello\n").unwrap_or_else(|e| panic!("{e}"));
    let key = "sk-scripted-model-key-0123456789";
    let keyf = t.path().join("openai.key");
    std::fs::write(&keyf, key).unwrap_or_else(|e| panic!("{e}"));
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"allowed_roots = ["{root}"]
[agents.aider]
argv = ["{venv}/bin/aider", "--model", "openai/scripted", "--openai-api-base", "http://127.0.0.1:{port}/v1",
        "--yes-always", "--no-git", "--edit-format", "whole", "--no-check-update", "--no-show-model-warnings",
        "--no-show-release-notes", "--analytics-disable", "--no-pretty", "--no-stream",
        "--chat-history-file", "/tmp/aider.chat.md", "--input-history-file", "/tmp/aider.input",
        "--message", "{{prompt}}"]
ro_binds = ["{venv}"]
env = ["OPENAI_API_KEY"]
set_env = {{ LITELLM_LOCAL_MODEL_COST_MAP = "True" }}
network = "allow:127.0.0.1:{port}"
memory = "2G"
"#,
            root = root.display(),
            venv = AIDER_VENV,
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let secret_arg = format!("OPENAI_API_KEY={}", keyf.display());
    let server = Server::start(
        &t.path().join("data"),
        &[
            "--config",
            cfg.to_str().unwrap_or(""),
            "--secret",
            &secret_arg,
        ],
    );
    let (url, admin) = (server.url.clone(), server.key.clone());
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let r: Value = http
        .post(format!("{url}/agent/run"))
        .header("X-API-Key", &admin)
        .json(&json!({"agent": "aider", "prompt": "change hello.txt", "repo_path": repo.to_string_lossy(), "extra_args": ["hello.txt"], "timeout": 300}))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default();
    let page: Value = http
        .get(format!("{url}/v1/jobs"))
        .header("X-API-Key", &admin)
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default();
    let job = page["jobs"][0].clone();
    let id = job["id"].as_str().unwrap_or("");
    let patch = http
        .get(format!("{url}/v1/jobs/{id}/patch"))
        .header("X-API-Key", &admin)
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    drop(server);
    assert_eq!(r["success"], true, "aider failed: {r}\njob: {job}");
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the scripted model was never asked"
    );
    assert!(
        patch.contains("+++ b/hello.txt") && patch.contains("+hello from the scripted model"),
        "{patch}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("hello.txt")).unwrap_or_default(),
        "hello\n",
        "the host repo changed"
    );
    let egress = job["result"]["egress"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let allowed: Vec<&Value> = egress.iter().filter(|e| e["allowed"] == true).collect();
    assert!(!allowed.is_empty(), "{egress:?}");
    assert!(
        allowed
            .iter()
            .all(|e| e["host"] == "127.0.0.1" && e["port"] == port),
        "something but the model server was reached: {egress:?}"
    );
    assert!(
        !r.to_string().contains(key) && !patch.contains(key) && !job.to_string().contains(key),
        "the API key leaked"
    );
}

const CLAUDE_DIR: &str = "/opt/agentvm-agents/claude";

/// An Anthropic Messages API server (streaming): the first turn asks for
/// the Write tool, the turn after its result ends the conversation.
fn scripted_anthropic() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let h3 = h2.clone();
            std::thread::spawn(move || loop {
                // keep-alive: serve requests on this connection until it closes
                let mut r = BufReader::new(match s.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let Some((first, body)) = read_request(&mut r) else {
                    return;
                };
                if !first.starts_with("POST") || !first.contains("/v1/messages") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                    continue;
                }
                h3.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                let has_result = req["messages"].as_array().is_some_and(|m| {
                    m.iter().any(|x| {
                        x["content"]
                            .as_array()
                            .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"))
                    })
                });
                let has_write = req["tools"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|x| x["name"] == "Write"));
                let model = req["model"].clone();
                let mut ev = vec![
                    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
                ];
                let stop = if has_write && !has_result {
                    let input = json!({"file_path": "/workspace/from_claude.txt", "content": "written by claude\n"}).to_string();
                    ev.push(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {}}}));
                    ev.push(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": input}}));
                    "tool_use"
                } else {
                    ev.push(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
                    ev.push(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "done"}}));
                    "end_turn"
                };
                ev.push(json!({"type": "content_block_stop", "index": 0}));
                ev.push(json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 1}}));
                ev.push(json!({"type": "message_stop"}));
                let text: String = ev
                    .iter()
                    .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
                    .collect();
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{text}", text.len()).as_bytes());
            });
        }
    });
    (port, hits)
}

#[test]
fn claude_code_writes_a_file_through_the_allowlist_and_nothing_else() {
    let claude = Path::new(CLAUDE_DIR).join("node_modules/.bin/claude");
    if !claude.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "claude-code is not installed at {CLAUDE_DIR} (.ci/run installs it)"
        );
        eprintln!("skipping: claude-code is not installed at {CLAUDE_DIR}");
        return;
    }
    let (port, hits) = scripted_anthropic();
    let repo_dir = tempdir();
    let repo = repo_dir.path();
    std::fs::write(repo.join("f"), "x\n").unwrap_or_else(|e| panic!("{e}"));
    let out = tempdir();
    let (patch, result) = (out.path().join("p"), out.path().join("r.json"));
    let key = "sk-ant-scripted-0123456789abcdef";
    let o = Command::new(agentvm_path())
        .args(["run", "--repo"])
        .arg(repo)
        .arg("--patch-out")
        .arg(&patch)
        .arg("--result-json")
        .arg(&result)
        .args([
            "--network",
            &format!("allow:127.0.0.1:{port}"),
            "--ro-bind",
            CLAUDE_DIR,
            "--memory",
            "2G",
        ])
        .args([
            "--env",
            &format!("ANTHROPIC_BASE_URL=http://127.0.0.1:{port}"),
        ])
        .args(["--env-pass", "ANTHROPIC_API_KEY"])
        .args([
            "--env",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "--env",
            "DISABLE_AUTOUPDATER=1",
            "--timeout",
            "120s",
        ])
        .arg("--")
        .arg(&claude)
        .args(["-p", "create the file", "--permission-mode", "acceptEdits"])
        .env("ANTHROPIC_API_KEY", key)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{o:?}");
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the scripted model was not asked twice (tool use, then the result)"
    );
    let p = std::fs::read_to_string(&patch).unwrap_or_default();
    assert!(
        p.contains("+++ b/from_claude.txt") && p.contains("+written by claude"),
        "{p}\n{o:?}"
    );
    assert!(
        !repo.join("from_claude.txt").exists(),
        "the host repo changed"
    );
    let r: Value =
        serde_json::from_slice(&std::fs::read(&result).unwrap_or_default()).unwrap_or_default();
    let eg = r["egress"].as_array().cloned().unwrap_or_default();
    assert!(
        !eg.is_empty()
            && eg
                .iter()
                .filter(|e| e["allowed"] == true)
                .all(|e| e["host"] == "127.0.0.1" && e["port"] == port),
        "{eg:?}"
    );
}
