//! What a client costs the server, whatever it sends or fails to read:
//! anonymous requests are limited before they are stored, stalled readers
//! hold a page, not the job, and a synchronous answer outlives the
//! client's read timeout and an idle-cutting proxy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::suite::server::{setup, shell, Server};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

#[test]
fn requests_without_a_key_are_limited_before_they_cost_storage() {
    let (_t, _repo, s) = setup(&[]);
    let db = s.data.join("agentvm.db");
    let size = || {
        std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(s.data.join("agentvm.db-wal"))
                .map(|m| m.len())
                .unwrap_or(0)
    };
    let before = size();
    let long_id = "x".repeat(3000);
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let (code, _, _) = s.req("POST", &format!("/v1/jobs/{long_id}/cancel"), None, None);
        *codes.entry(code).or_insert(0) += 1;
    }
    // a burst is answered 401 (and audited), the rest 429 (and not)
    assert!(codes.get(&401).copied().unwrap_or(0) <= 20, "{codes:?}");
    assert!(codes.get(&429).copied().unwrap_or(0) >= 250, "{codes:?}");
    // a target longer than any route serves: 414, nothing stored
    let (code, _, _) = s.req(
        "POST",
        &format!("/v1/jobs/{}/cancel", "y".repeat(60_000)),
        None,
        None,
    );
    assert!(code == 414 || code == 429, "{code}");
    let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
    let ev = a["events"].as_array().cloned().unwrap_or_default();
    let denied: Vec<&Value> = ev.iter().filter(|e| e["outcome"] == "denied 401").collect();
    assert!(!denied.is_empty() && denied.len() <= 20, "{}", denied.len());
    assert!(denied
        .iter()
        .all(|e| e["target"].as_str().unwrap_or("").len() <= 256));
    assert!(
        size() < before + 512 * 1024,
        "the database grew by {} bytes",
        size() - before
    );
    // a request with a key still works from the same address
    assert_eq!(s.json("GET", "/v1/jobs", None).0, 200);
}

#[test]
fn stalled_readers_hold_a_page_not_the_job() {
    let (_t, repo, s) = setup(&[]);
    // 24 MiB of output
    let (id, done) = s.run_job(shell(&repo, "head -c 25165824 /dev/zero | tr '\\000' a"));
    assert_eq!(done["status"], "succeeded", "{done}");
    let pid = s.pid();
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(pid);
    // ten readers that ask and never read
    let mut stalled = Vec::new();
    for i in 0..10 {
        let path = match i % 3 {
            0 => format!("/v1/jobs/{id}/logs?follow=true"),
            1 => format!("/v1/jobs/{id}/recording"),
            _ => format!("/v1/jobs/{id}/logs"),
        };
        let mut c = TcpStream::connect(addr(&s)).unwrap();
        let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\n\r\n",
            s.key
        )
        .unwrap();
        // read the head only, then stop reading
        let mut b = [0u8; 512];
        let _ = c.read(&mut b);
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = rss_kib(pid);
    assert!(
        during < before + 96 * 1024,
        "ten stalled readers of a 24 MiB job took the server from {before} to {during} KiB"
    );
    // a key may hold 16 streams: the 17th is refused, not queued
    let mut more = Vec::new();
    for _ in 0..6 {
        let mut c = TcpStream::connect(addr(&s)).unwrap();
        write!(
            c,
            "GET /v1/jobs/{id}/logs?follow=true HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\n\r\n",
            s.key
        )
        .unwrap();
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let mut b = [0u8; 64];
        let n = c.read(&mut b).unwrap_or(0);
        more.push((String::from_utf8_lossy(&b[..n]).into_owned(), c));
    }
    let refused = more
        .iter()
        .filter(|(h, _)| h.starts_with("HTTP/1.1 429"))
        .count();
    assert_eq!(refused, 0, "ten open, six more: sixteen allowed");
    let (code, _, _) = s.req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s.key), None);
    assert_eq!(code, 429, "the seventeenth stream");
    // they leave: the slots come back, and so does the memory's use
    drop(stalled);
    drop(more);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, body) = s.req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s.key), None);
        if code == 200 {
            assert_eq!(body.len(), 24 << 20);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slots never came back ({code})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The old Python client passes the job's timeout as its read timeout.
#[test]
fn a_synchronous_answer_outlives_the_clients_read_timeout() {
    let (_t, repo, s) = setup(&[]);
    let mut b = shell(&repo, "sleep 30");
    b["timeout"] = json!(2);
    let script = format!(
        "import json, sys, urllib.request\n\
         req = urllib.request.Request('{}/agent/run', data=sys.argv[1].encode(), headers={{'X-API-Key': '{}', 'Content-Type': 'application/json'}})\n\
         r = urllib.request.urlopen(req, timeout=2)\n\
         print(json.dumps(json.loads(r.read())))\n",
        s.url, s.key
    );
    let o = std::process::Command::new("python3")
        .args(["-c", &script, &b.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v["success"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("timed out"),
        "{v}"
    );
    let mut keys: Vec<&String> = v
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    keys.sort();
    assert_eq!(keys, ["error", "returncode", "stderr", "stdout", "success"]);
}

/// A proxy in front that gives up after a second of silence (nginx: 60 s).
#[test]
fn a_synchronous_answer_survives_an_idle_cutting_proxy() {
    let (_t, repo, s) = setup(&[]);
    let upstream = addr(&s);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for c in l.incoming().map_while(Result::ok) {
            let up = upstream.clone();
            std::thread::spawn(move || idle_cutting_relay(c, &up, Duration::from_secs(1)));
        }
    });
    let body = shell(&repo, "sleep 3; echo finished").to_string();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        c,
        "POST /agent/run HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        s.key,
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = dechunk(text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or(""));
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("cut by the proxy ({e}):\n{text}"));
    assert_eq!(v["stdout"], "finished\n", "{v}");
    assert_eq!(v["success"], true, "{v}");
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Relay both ways; close when the server has been silent for `idle`.
fn idle_cutting_relay(client: TcpStream, upstream: &str, idle: Duration) {
    let Ok(up) = TcpStream::connect(upstream) else {
        return;
    };
    let (mut c2, mut u2) = match (client.try_clone(), up.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return,
    };
    std::thread::spawn(move || {
        let mut b = [0u8; 8192];
        while let Ok(n) = c2.read(&mut b) {
            if n == 0 || u2.write_all(&b[..n]).is_err() {
                break;
            }
        }
    });
    let (mut client, mut up) = (client, up);
    let _ = up.set_read_timeout(Some(idle));
    let mut b = [0u8; 8192];
    loop {
        match up.read(&mut b) {
            Ok(0) | Err(_) => break, // silent too long, or done
            Ok(n) => {
                if client.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
}
