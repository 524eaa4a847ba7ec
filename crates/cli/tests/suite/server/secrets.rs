//! Provider secrets reach only their agent and never any record.

use super::*;

#[test]
fn secrets_reach_only_their_agent_and_never_any_record() {
    use base64::Engine;
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("repo")).unwrap();
    let secret = "sk-live-4f2a9c1e7b3d8a6f0e5c2b1a9d8e7f6a";
    let other = "other-secret-value-that-must-stay-home";
    let sfile = t.path().join("leaky.token");
    std::fs::write(&sfile, format!("{secret}\n")).unwrap();
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "allowed_roots = [\"{}\"]\n[agents.leaky]\nargv = [\"sh\", \"-c\", \"{{prompt}}\"]\nenv = [\"LEAKY_TOKEN\"]\n",
            root.display()
        ),
    )
    .unwrap();
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
        .unwrap();
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
