//! The old API and the documents: /health, /agent/run, error shapes, the first admin key, OpenAPI, metrics, schemathesis.

use super::*;

#[test]
fn first_start_makes_a_private_admin_key() {
    let (_t, _r, s) = setup(&[]);
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(s.data.join("admin.key")).unwrap();
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
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
}
