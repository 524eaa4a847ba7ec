//! Real agent CLIs, offline, against scripted model servers on loopback.
//! ./test.sh (scripts/install-test-tools.sh) installs each CLI under
//! /opt/agentvm-agents; where one is missing its test is a listed skip.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::suite::server::Server;

const AIDER_VENV: &str = "/opt/agentvm-agents/aider";
const CLAUDE_DIR: &str = "/opt/agentvm-agents/claude";
const CODEX_DIR: &str = "/opt/agentvm-agents/codex";
const OPENCODE_DIR: &str = "/opt/agentvm-agents/opencode";

/// The CLI at `path`, or `None` (a recorded skip) when it is not installed.
fn installed(path: &str) -> Option<PathBuf> {
    let p = PathBuf::from(path);
    if p.exists() {
        return Some(p);
    }
    skip(
        &format!("the real agent CLI {path}, offline against a scripted model"),
        "scripts/install-test-tools.sh installs it (./test.sh runs it as root)",
    );
    None
}

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

/// A scripted model server on the host's loopback: `answer` maps each
/// request (its first line and JSON body) to a status, a content type and a
/// body. Connections are kept alive; POSTs are counted.
fn scripted_model(
    answer: impl Fn(&str, &Value) -> (u16, &'static str, String) + Send + Sync + 'static,
) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    let posts = Arc::new(AtomicUsize::new(0));
    let (posts2, answer) = (posts.clone(), Arc::new(answer));
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let (posts, answer) = (posts2.clone(), answer.clone());
            std::thread::spawn(move || loop {
                let mut r = BufReader::new(match s.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let Some((first, body)) = read_request(&mut r) else {
                    return;
                };
                if first.starts_with("POST") {
                    posts.fetch_add(1, Ordering::SeqCst);
                }
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                let (status, ctype, text) = answer(&first, &req);
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                    text.len()
                );
                let body = if first.starts_with("HEAD") { "" } else { &text };
                if s.write_all(format!("{head}{body}").as_bytes()).is_err() {
                    return;
                }
            });
        }
    });
    (port, posts)
}

/// Server-sent events, each `data: JSON`, with an `event:` line naming its
/// "type" when `named`; `tail` is appended as it is (e.g. "data: [DONE]").
fn sse(events: &[Value], named: bool, tail: &str) -> String {
    let mut s = String::new();
    for e in events {
        if named {
            s += &format!("event: {}\n", e["type"].as_str().unwrap_or(""));
        }
        s += &format!("data: {e}\n\n");
    }
    s + tail
}

/// Assert the job reached the model server at 127.0.0.1:`port` and nothing
/// else: every allowed egress record names it.
fn assert_only_model_egress(egress: &Value, port: u16) {
    let eg = egress.as_array().cloned().unwrap_or_default();
    let allowed: Vec<&Value> = eg.iter().filter(|e| e["allowed"] == true).collect();
    assert!(!allowed.is_empty(), "no allowed egress at all: {eg:?}");
    assert!(
        allowed
            .iter()
            .all(|e| e["host"] == "127.0.0.1" && e["port"] == port),
        "something but the model server was reached: {eg:?}"
    );
    assert!(
        eg.iter()
            .filter(|e| e["allowed"] == false)
            .all(|e| e["reason"].is_string()),
        "a refusal without a reason: {eg:?}"
    );
}

/// What a job run through `agentvm serve` and the compat API left behind.
struct Ran {
    /// The /agent/run body.
    compat: Value,
    /// The job as GET /v1/jobs lists it.
    job: Value,
    /// GET /v1/jobs/{id}/patch.
    patch: String,
}

/// Start `agentvm serve` with `profile` (TOML for one `[agents.NAME]`
/// table, without its header) and the server secret `secret = value`
/// (from a file), run one job of agent `name` on `repo` through
/// /agent/run, and collect what it left.
fn run_through_server(
    name: &str,
    profile: &str,
    (secret, value): (&str, &str),
    repo: &Path,
    prompt: &str,
    extra_args: &[&str],
) -> Ran {
    let t = tempdir();
    let root = repo.parent().unwrap_or(repo);
    let keyf = t.path().join("secret");
    std::fs::write(&keyf, value).unwrap();
    let cfg = t.path().join("agentvm.toml");
    let cfg_text = format!(
        "allowed_roots = [\"{}\"]\n[agents.{name}]\n{profile}",
        root.display()
    );
    std::fs::write(&cfg, cfg_text).unwrap();
    let secret_arg = format!("{secret}={}", keyf.display());
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
        .unwrap();
    let compat: Value = http
        .post(format!("{url}/agent/run"))
        .header("X-API-Key", &admin)
        .json(&json!({"agent": name, "prompt": prompt, "repo_path": repo.to_string_lossy(), "extra_args": extra_args, "timeout": 300}))
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
    assert!(
        !compat.to_string().contains(value)
            && !patch.contains(value)
            && !job.to_string().contains(value),
        "the secret leaked"
    );
    Ran { compat, job, patch }
}

/// A fixture repo (one file, `hello.txt`) inside an allowed root.
fn agent_repo() -> (tempfile::TempDir, PathBuf) {
    let t = tempdir();
    let repo = t.path().join("root/repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("hello.txt"), "hello\n").unwrap();
    (t, repo)
}

/// The job succeeded, the model was asked at least `min_posts` times, the
/// patch adds `line` to `file`, the host repo is as it was, and the only
/// egress allowed was the model server.
fn assert_agent_edit(
    ran: &Ran,
    posts: &AtomicUsize,
    min_posts: usize,
    port: u16,
    repo: &Path,
    file: &str,
    line: &str,
) {
    assert_eq!(
        ran.compat["success"], true,
        "the agent failed: {}\njob: {}",
        ran.compat, ran.job
    );
    assert!(
        posts.load(Ordering::SeqCst) >= min_posts,
        "the scripted model was asked fewer than {min_posts} times\njob: {}",
        ran.job
    );
    assert!(
        ran.patch.contains(&format!("+++ b/{file}")) && ran.patch.contains(&format!("+{line}")),
        "{}\njob: {}",
        ran.patch,
        ran.job
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("hello.txt")).unwrap_or_default(),
        "hello\n",
        "the host repo changed"
    );
    if file != "hello.txt" {
        assert!(!repo.join(file).exists(), "the host repo changed");
    }
    assert_only_model_egress(&ran.job["result"]["egress"], port);
}

#[test]
fn aider_edits_a_file_through_the_allowlist_and_nothing_else() {
    if installed(&format!("{AIDER_VENV}/bin/aider")).is_none() {
        return;
    }
    // OpenAI chat completions, not streamed (--no-stream): a whole-file edit
    let (port, posts) = scripted_model(|first, _req| {
        if !first.starts_with("POST") || !first.contains("/chat/completions") {
            return (404, "text/plain", String::new());
        }
        let reply = "hello.txt\n```\nhello from the scripted model\n```\n";
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        });
        (200, "application/json", body.to_string())
    });
    let (_t, repo) = agent_repo();
    // the built-in profile, told where aider is and which model to use
    let profile = format!(
        r#"command = "{AIDER_VENV}/bin/aider"
args = ["--model", "openai/scripted", "--openai-api-base", "http://127.0.0.1:{port}/v1",
        "--edit-format", "whole", "--no-stream"]
ro_binds = ["{AIDER_VENV}"]
network = "allow:127.0.0.1:{port}"
memory = "2G"
"#
    );
    let key = ("OPENAI_API_KEY", "sk-scripted-model-key-0123456789");
    let ran = run_through_server(
        "aider",
        &profile,
        key,
        &repo,
        "change hello.txt",
        &["hello.txt"],
    );
    assert_agent_edit(
        &ran,
        &posts,
        1,
        port,
        &repo,
        "hello.txt",
        "hello from the scripted model",
    );
}

#[test]
fn claude_code_writes_a_file_through_the_allowlist_and_nothing_else() {
    let Some(claude) = installed(&format!("{CLAUDE_DIR}/node_modules/.bin/claude")) else {
        return;
    };
    // The Anthropic Messages API, streamed: the first turn asks for the Write
    // tool, the turn after its result ends the conversation. Anything else
    // (claude's HEAD / reachability check) gets an empty 200.
    let (port, posts) = scripted_model(|first, req| {
        if !first.starts_with("POST") || !first.contains("/v1/messages") {
            return (200, "text/plain", String::new());
        }
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
        let mut ev = vec![
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": req["model"], "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
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
        (200, "text/event-stream", sse(&ev, true, ""))
    });
    let (_t, repo) = agent_repo();
    // the built-in profile, told where claude is and where its API lives
    let profile = format!(
        r#"command = "{claude}"
ro_binds = ["{CLAUDE_DIR}"]
set_env = {{ ANTHROPIC_BASE_URL = "http://127.0.0.1:{port}" }}
network = "allow:127.0.0.1:{port}"
memory = "2G"
"#,
        claude = claude.display()
    );
    let key = ("ANTHROPIC_API_KEY", "sk-ant-scripted-0123456789abcdef");
    let ran = run_through_server("claude", &profile, key, &repo, "create the file", &[]);
    // tool use, then the turn that carries the tool's result
    assert_agent_edit(
        &ran,
        &posts,
        2,
        port,
        &repo,
        "from_claude.txt",
        "written by claude",
    );
}

#[test]
fn codex_runs_a_command_through_the_allowlist_and_nothing_else() {
    let Some(codex) = installed(&format!("{CODEX_DIR}/node_modules/.bin/codex")) else {
        return;
    };
    // The OpenAI Responses API, streamed: the first turn calls codex's
    // exec_command tool to write a file, the turn that carries the
    // command's output ends with a message.
    let (port, posts) = scripted_model(|first, req| {
        if !first.starts_with("POST") || !first.contains("/v1/responses") {
            return (404, "text/plain", String::new());
        }
        let has_output = req["input"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x["type"] == "function_call_output"));
        let has_exec = req["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x["name"] == "exec_command"));
        let item = if has_exec && !has_output {
            let args = json!({"cmd": "printf 'written by codex\\n' > from_codex.txt"}).to_string();
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command", "arguments": args, "status": "completed"})
        } else {
            json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": "done", "annotations": []}]})
        };
        let usage = json!({"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2});
        let ev = [
            json!({"type": "response.created", "response": {"id": "resp_1"}}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            json!({"type": "response.completed", "response": {"id": "resp_1", "usage": usage}}),
        ];
        (200, "text/event-stream", sse(&ev, true, ""))
    });
    let (_t, repo) = agent_repo();
    // the built-in profile, told where codex is and which provider to use
    let profile = format!(
        r#"command = "{codex}"
args = ["-c", "model=scripted", "-c", "model_provider=scripted",
        "-c", 'model_providers.scripted={{name="scripted",base_url="http://127.0.0.1:{port}/v1",env_key="OPENAI_API_KEY",wire_api="responses"}}']
ro_binds = ["{CODEX_DIR}"]
network = "allow:127.0.0.1:{port}"
memory = "2G"
"#,
        codex = codex.display()
    );
    let key = ("OPENAI_API_KEY", "sk-scripted-codex-key-0123456789");
    let ran = run_through_server("codex", &profile, key, &repo, "create from_codex.txt", &[]);
    assert_agent_edit(
        &ran,
        &posts,
        2,
        port,
        &repo,
        "from_codex.txt",
        "written by codex",
    );
}

#[test]
fn opencode_writes_a_file_through_the_allowlist_and_nothing_else() {
    let Some(opencode) = installed(&format!("{OPENCODE_DIR}/node_modules/.bin/opencode")) else {
        return;
    };
    // OpenAI-compatible chat completions, streamed: a request that offers
    // the write tool and carries no tool result gets a call to write; any
    // other (the result, or opencode's title request) gets "done".
    let (port, posts) = scripted_model(|first, req| {
        if !first.starts_with("POST") || !first.contains("/chat/completions") {
            return (404, "text/plain", String::new());
        }
        let has_write = req["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x["function"]["name"] == "write"));
        let has_result = req["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x["role"] == "tool"));
        let (delta, finish) = if has_write && !has_result {
            let args = json!({"filePath": "/workspace/from_opencode.txt", "content": "written by opencode\n"}).to_string();
            let call = json!({"index": 0, "id": "call_1", "type": "function", "function": {"name": "write", "arguments": args}});
            (
                json!({"role": "assistant", "tool_calls": [call]}),
                "tool_calls",
            )
        } else {
            (json!({"role": "assistant", "content": "done"}), "stop")
        };
        let chunk = |choices: Value, extra: Value| {
            let mut c = json!({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": req["model"], "choices": choices});
            if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            c
        };
        let ev = [
            chunk(
                json!([{"index": 0, "delta": delta, "finish_reason": null}]),
                json!({}),
            ),
            chunk(
                json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
                json!({}),
            ),
            chunk(
                json!([]),
                json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
            ),
        ];
        (
            200,
            "text/event-stream",
            sse(&ev, false, "data: [DONE]\n\n"),
        )
    });
    let (_t, repo) = agent_repo();
    let config = json!({
        "provider": {"scripted": {
            "npm": "@ai-sdk/openai-compatible", "name": "scripted",
            "options": {"baseURL": format!("http://127.0.0.1:{port}/v1"), "apiKey": "{env:OPENAI_API_KEY}"},
            "models": {"m": {"name": "m", "tool_call": true}}}},
        "model": "scripted/m", "autoupdate": false, "share": "disabled",
        "permission": {"edit": "allow", "bash": "allow"}
    });
    // the built-in profile, told where opencode is and its provider
    let profile = format!(
        r#"command = "{opencode}"
ro_binds = ["{OPENCODE_DIR}"]
set_env = {{ OPENCODE_CONFIG_CONTENT = '{config}' }}
network = "allow:127.0.0.1:{port}"
memory = "2G"
"#,
        opencode = opencode.display()
    );
    let key = ("OPENAI_API_KEY", "sk-scripted-opencode-key-0123456789");
    let ran = run_through_server(
        "opencode",
        &profile,
        key,
        &repo,
        "create from_opencode.txt",
        &[],
    );
    assert_agent_edit(
        &ran,
        &posts,
        2,
        port,
        &repo,
        "from_opencode.txt",
        "written by opencode",
    );
}
