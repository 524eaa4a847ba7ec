//! A job's network: its own allowlist, decisions live, the record limit.

use super::*;

#[test]
fn a_job_may_carry_its_own_egress_policy() {
    let (_t, repo, s) = setup(&[]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
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
    // too long is refused before it is parsed (each rule costs memory)
    let mut long = shell(&repo, "true");
    long["network"] = json!(format!("allow:{}", vec!["a.example"; 2000].join(",")));
    let (code, v) = s.json("POST", "/v1/jobs", Some(long));
    assert_eq!(code, 422, "{v}");
    assert!(v.to_string().contains("at most 4096 bytes"), "{v}");
    // and both refusals are in the audit trail
    let (_, audit) = s.json("GET", "/v1/audit?limit=50", None);
    let refused = audit["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["action"] == "job.create" && x["outcome"] == "rejected 422")
                .count()
        })
        .unwrap_or(0);
    assert!(refused >= 2, "{audit}");
}

#[test]
fn egress_decisions_stream_live_and_join_the_audit_while_the_job_runs() {
    let (_t, repo, s) = setup(&[]);
    // an upstream that holds its answer until the test lets it go
    let (release, held) = std::sync::mpsc::channel::<()>();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
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
