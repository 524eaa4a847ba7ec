//! What a key may do: a request may narrow its profile's network policy,
//! never widen it (an admin's grant on the key may, and then the job gets
//! none of the profile's secrets); agent flags that redirect traffic are
//! refused; jobs belong to the key that made them.

use std::io::{Read, Write};

use serde_json::{json, Value};

use crate::common::*;
use crate::suite::server::{shell, Server};

/// A loopback service that answers every request with `body`.
fn service(body: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            let mut b = [0u8; 4096];
            let _ = c.read(&mut b);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// A server whose `net` profile may reach 127.0.0.1:`allowed` and whose
/// jobs receive the secret NET_TOKEN.
fn net_server(allowed: u16) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let t = tempdir();
    let root = t.path().join("root");
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let sfile = t.path().join("net.token");
    std::fs::write(&sfile, "sk-net-token-0123456789abcdef\n").unwrap();
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        format!(
            "allowed_roots = [\"{}\"]\n[agents.net]\nargv = [\"sh\", \"-c\", \"{{prompt}}\"]\nenv = [\"NET_TOKEN\"]\nnetwork = \"allow:127.0.0.1:{allowed}\"\n",
            root.display()
        ),
    )
    .unwrap();
    let c = cfg.to_string_lossy().into_owned();
    let sec = format!("NET_TOKEN={}", sfile.display());
    let s = Server::start(&t.path().join("data"), &["--config", &c, "--secret", &sec]);
    (t, repo, s)
}

pub fn new_key(s: &Server, scopes: &[&str], network: Option<&str>) -> (String, String) {
    let mut b = json!({"name": "t", "scopes": scopes});
    if let Some(n) = network {
        b["network"] = json!(n);
    }
    let (code, k) = s.json("POST", "/v1/keys", Some(b));
    assert_eq!(code, 201, "{k}");
    (
        k["id"].as_str().unwrap_or("").to_string(),
        k["key"].as_str().unwrap_or("").to_string(),
    )
}

fn submit(s: &Server, key: &str, body: Value) -> (u16, Value) {
    let (code, _, text) = s.req("POST", "/v1/jobs", Some(key), Some(body));
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn job(repo: &std::path::Path, network: Option<String>, script: &str) -> Value {
    let mut b = json!({"agent": "net", "prompt": script, "repo_path": repo.to_string_lossy(), "timeout": 30});
    if let Some(n) = network {
        b["network"] = json!(n);
    }
    b
}

fn wait_output(s: &Server, key: &str, id: &str) -> (String, String) {
    let mut status = String::new();
    for _ in 0..600 {
        let (_, _, t) = s.req("GET", &format!("/v1/jobs/{id}"), Some(key), None);
        let v: Value = serde_json::from_str(&t).unwrap_or_default();
        status = v["status"].as_str().unwrap_or("").to_string();
        if !matches!(status.as_str(), "queued" | "running") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (_, _, logs) = s.req("GET", &format!("/v1/jobs/{id}/logs"), Some(key), None);
    (status, logs)
}

const PROBE: &str = "if [ -n \"$NET_TOKEN\" ]; then echo has-secret; else echo no-secret; fi; curl -s -m 5 http://127.0.0.1:PORT/ || echo unreachable";

#[test]
fn a_run_key_may_narrow_the_network_never_widen_it() {
    let ok = service("allowed-service\n");
    let other = service("other-service\n");
    let (_t, repo, s) = net_server(ok);
    let (_, run) = new_key(&s, &["run"], None);
    let probe = |port: u16| PROBE.replace("PORT", &port.to_string());

    // wider than the profile: refused before anything is stored
    for wider in [
        format!("allow:127.0.0.1:{other}"),
        format!("allow:127.0.0.1:{ok},127.0.0.1:{other}"),
        "allow:127.0.0.1".to_string(),
        "allow:169.254.169.254".to_string(),
        "host".to_string(),
    ] {
        let (code, v) = submit(&s, &run, job(&repo, Some(wider.clone()), "true"));
        assert_eq!(code, 403, "{wider}: {v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or("")
                .contains("wider than the net profile's"),
            "{v}"
        );
    }
    // the shell profile has no network at all: a run key cannot give it one
    let mut b = shell(&repo, "true");
    b["network"] = json!(format!("allow:127.0.0.1:{ok}"));
    assert_eq!(submit(&s, &run, b).0, 403);

    // the profile's own policy, or narrower: accepted, with the secret
    let (code, v) = submit(
        &s,
        &run,
        job(&repo, Some(format!("allow:127.0.0.1:{ok}")), &probe(ok)),
    );
    assert_eq!(code, 202, "{v}");
    let (st, logs) = wait_output(&s, &run, v["id"].as_str().unwrap_or(""));
    assert_eq!(st, "succeeded", "{logs}");
    assert!(
        logs.contains("has-secret") && logs.contains("allowed-service"),
        "{logs}"
    );
    let (code, v) = submit(&s, &run, job(&repo, Some("none".into()), &probe(ok)));
    assert_eq!(code, 202, "{v}");
    let (_, logs) = wait_output(&s, &run, v["id"].as_str().unwrap_or(""));
    assert!(logs.contains("unreachable"), "{logs}");

    // an admin's grant on a key widens it, and the job goes without the
    // profile's secrets (they are bound to the profile's hosts)
    let (_, granted) = new_key(&s, &["run"], Some(&format!("allow:127.0.0.1:{other}")));
    let (code, v) = submit(
        &s,
        &granted,
        job(
            &repo,
            Some(format!("allow:127.0.0.1:{other}")),
            &probe(other),
        ),
    );
    assert_eq!(code, 202, "{v}");
    let (st, logs) = wait_output(&s, &granted, v["id"].as_str().unwrap_or(""));
    assert_eq!(st, "succeeded", "{logs}");
    assert!(
        logs.contains("no-secret") && logs.contains("other-service"),
        "{logs}"
    );
    // the grant is no wider than itself
    let (code, _) = submit(&s, &granted, job(&repo, Some("host".into()), "true"));
    assert_eq!(code, 403);

    // admin keys may use any policy
    let (code, v) = submit(&s, &s.key, job(&repo, Some("host".into()), "true"));
    assert_eq!(code, 202, "{v}");
}

#[test]
fn agent_flags_that_redirect_traffic_are_refused() {
    let (_t, repo, s) = crate::suite::server::setup(&[]);
    for (agent, args) in [
        ("aider", vec!["--openai-api-base", "http://127.0.0.1:9/v1"]),
        ("aider", vec!["--openai-api-base=http://127.0.0.1:9/v1"]),
        ("aider", vec!["--openai-api-b", "http://x"]),
        ("aider", vec!["--set-env", "OPENAI_API_BASE=http://x"]),
        ("codex", vec!["-c", "model_providers.x.base_url=http://x"]),
        ("claude", vec!["--settings", "/tmp/s.json"]),
        ("opencode", vec!["--attach", "http://x"]),
    ] {
        let body = json!({"agent": agent, "prompt": "hi", "repo_path": repo.to_string_lossy(), "extra_args": args});
        let (code, v) = s.json("POST", "/v1/jobs", Some(body.clone()));
        assert_eq!(code, 403, "{agent} {args:?}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("refused_args"),
            "{v}"
        );
        // the old API too
        assert_eq!(
            s.json("POST", "/agent/run", Some(body)).0,
            403,
            "{agent} {args:?}"
        );
    }
    // ordinary flags pass
    let body = json!({"agent": "aider", "prompt": "hi", "repo_path": repo.to_string_lossy(), "extra_args": ["--model", "gpt-4o", "file.py"], "timeout": 5});
    assert_eq!(s.json("POST", "/v1/jobs", Some(body)).0, 202);
}

#[test]
fn jobs_belong_to_the_key_that_made_them() {
    let (_t, repo, s) = crate::suite::server::setup(&[]);
    let (a_id, a) = new_key(&s, &["run"], None);
    let (_, b) = new_key(&s, &["run"], None);
    let (_, r) = new_key(&s, &["read"], None);
    let (code, v) = submit(
        &s,
        &a,
        shell(&repo, "echo mine > f.txt; echo private-output"),
    );
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap_or("").to_string();
    assert_eq!(v["key_id"], json!(a_id));
    let (st, logs) = wait_output(&s, &a, &id);
    assert_eq!(
        (st.as_str(), logs.as_str()),
        ("succeeded", "private-output\n")
    );
    // another run key, or a read key: as if the job did not exist
    for other in [&b, &r] {
        for (m, p) in [
            ("GET", format!("/v1/jobs/{id}")),
            ("GET", format!("/v1/jobs/{id}/logs")),
            ("GET", format!("/v1/jobs/{id}/logs?follow=true")),
            ("GET", format!("/v1/jobs/{id}/patch")),
            ("GET", format!("/v1/jobs/{id}/recording")),
        ] {
            let (code, _, body) = s.req(m, &p, Some(other), None);
            assert_eq!(code, 404, "{m} {p}: {body}");
            assert!(!body.contains("private-output"));
        }
        let (_, _, list) = s.req("GET", "/v1/jobs", Some(other), None);
        assert!(!list.contains(&id), "{list}");
    }
    for (m, p) in [
        ("POST", format!("/v1/jobs/{id}/cancel")),
        ("POST", format!("/v1/jobs/{id}/apply")),
        ("DELETE", format!("/v1/jobs/{id}")),
    ] {
        assert_eq!(s.req(m, &p, Some(&b), None).0, 404, "{m} {p}");
    }
    // its owner and admin keys see it
    let (_, _, list) = s.req("GET", "/v1/jobs", Some(&a), None);
    assert!(list.contains(&id));
    let (_, _, list) = s.req("GET", "/v1/jobs", Some(&s.key), None);
    assert!(list.contains(&id));
    assert_eq!(
        s.req("POST", &format!("/v1/jobs/{id}/apply"), Some(&a), None)
            .0,
        201
    );
    assert_eq!(
        s.req("DELETE", &format!("/v1/jobs/{id}"), Some(&s.key), None)
            .0,
        204
    );
}
