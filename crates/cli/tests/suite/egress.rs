//! `agentvm run --network allow:...`: the only way out is the egress proxy.

use std::io::{Read, Write};
use std::net::TcpListener;

use serde_json::Value;

use crate::common::*;

/// An HTTP server on the host's loopback answering "hello from the host".
fn host_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nConnection: close\r\n\r\nhello from the host\n");
        }
    });
    port
}

fn run(who: Who, policy: &str, script: &str, extra: &[&str]) -> (i32, String, Value) {
    let d = out_dir(who);
    let j = d.path().join("r.json");
    let js = j.to_string_lossy().into_owned();
    let net = format!("allow:{policy}");
    let mut args = vec!["run", "--network", &net, "--result-json", &js];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let o = agentvm(who, &args);
    let v: Value =
        serde_json::from_slice(&std::fs::read(&j).unwrap_or_default()).unwrap_or_default();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        v,
    )
}

#[test]
fn allowed_hosts_through_the_proxy_and_nothing_else() {
    let port = host_server();
    for who in runners() {
        let script = format!(
            "curl -s http://127.0.0.1:{port}/; \
             curl -s -D - -o /dev/null http://not-allowed.example/ | tr -d '\\r' | grep -i '^x-agentvm'; \
             curl -s -m 5 --noproxy '*' http://127.0.0.1:{port}/ || echo direct-refused; \
             curl -s -m 5 https://api.example.com/ || echo tunnel-refused"
        );
        let (code, out, v) = run(who, &format!("127.0.0.1:{port}"), &script, &[]);
        assert_eq!(code, 0, "{who:?}: {out}");
        assert!(
            out.contains("hello from the host"),
            "{who:?}: allowed request failed: {out}"
        );
        assert!(
            out.contains("X-AgentVM-Egress-Denied: host-not-allowlisted"),
            "{who:?}: {out}"
        );
        assert!(
            out.contains("direct-refused"),
            "{who:?}: a direct connection got out: {out}"
        );
        assert!(out.contains("tunnel-refused"), "{who:?}: {out}");
        assert_eq!(v["network"], "allow");
        let eg = v["egress"].as_array().cloned().unwrap_or_default();
        let allowed: Vec<&Value> = eg.iter().filter(|r| r["allowed"] == true).collect();
        assert_eq!(allowed.len(), 1, "{who:?}: {eg:?}");
        assert_eq!(allowed[0]["host"], "127.0.0.1");
        assert!(allowed[0]["bytes_down"].as_u64().unwrap_or(0) > 0);
        assert!(
            eg.iter().any(
                |r| r["host"] == "not-allowed.example" && r["reason"] == "host-not-allowlisted"
            ),
            "{eg:?}"
        );
        assert!(
            eg.iter().any(|r| r["method"] == "CONNECT"
                && r["host"] == "api.example.com"
                && r["allowed"] == false),
            "{eg:?}"
        );
    }
}

#[test]
fn a_name_that_resolves_to_loopback_is_refused_unless_the_address_is_named() {
    let port = host_server();
    let (code, out, v) = run(
        Who::Me,
        &format!("localhost:{port}"),
        &format!("curl -s -D - http://localhost:{port}/ | tr -d '\\r'"),
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("X-AgentVM-Egress-Denied: resolves-to-loopback-address"),
        "{out}"
    );
    assert!(!out.contains("hello from the host"), "{out}");
    assert_eq!(v["egress"][0]["allowed"], false);
    // metadata addresses likewise
    let (_, out, _) = run(
        Who::Me,
        "example.com",
        "curl -s -D - http://169.254.169.254/latest/meta-data/ | tr -d '\\r'",
        &[],
    );
    assert!(
        out.contains("X-AgentVM-Egress-Denied: ip-literal-not-allowlisted"),
        "{out}"
    );
}

#[test]
fn decisions_stream_to_the_egress_log_and_the_proxy_goes_away() {
    let port = host_server();
    let d = tempdir();
    let tmp = d.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let log = d.path().join("egress.jsonl");
    let ls = log.to_string_lossy().into_owned();
    let net = format!("allow:127.0.0.1:{port}");
    let script = format!(
        "curl -s http://127.0.0.1:{port}/ >/dev/null; curl -s http://nope.example/ >/dev/null"
    );
    let o = agentvm_with(
        Who::Me,
        &[
            "run",
            "--network",
            &net,
            "--egress-log",
            &ls,
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[("TMPDIR", tmp.to_str().unwrap_or(""))],
        None,
    );
    assert!(o.status.success(), "{o:?}");
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // the allowed request opens, then closes; the refusal is final at once
    let phases: Vec<(&str, bool)> = lines
        .iter()
        .map(|l| (l["phase"].as_str().unwrap_or(""), l["allowed"] == true))
        .collect();
    assert_eq!(
        phases,
        [("open", true), ("closed", true), ("closed", false)],
        "{lines:?}"
    );
    assert_eq!(lines[0]["conn"], lines[1]["conn"]);
    // the proxy's socket directory (made under TMPDIR) is gone, and with it
    // the proxy
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_connection_open_when_the_command_ends_still_gets_its_final_record() {
    // an upstream that streams a byte every 50 ms for 20 s
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                for _ in 0..400 {
                    if s.write_all(b"x").is_err() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
        }
    });
    // the download is still running when the command exits and the
    // sandbox kills it
    let script = format!("curl -s -N http://127.0.0.1:{port}/ >/dev/null & sleep 1; exit 0");
    let started = std::time::Instant::now();
    let (code, out, v) = run(Who::Me, &format!("127.0.0.1:{port}"), &script, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the run waited for the stream"
    );
    let eg = v["egress"].as_array().cloned().unwrap_or_default();
    assert_eq!(eg.len(), 1, "{eg:?}");
    assert_eq!(eg[0]["phase"], "closed", "{eg:?}");
    assert_eq!(eg[0]["allowed"], true, "{eg:?}");
    assert!(
        eg[0]["bytes_down"].as_u64().unwrap_or(0) >= 10,
        "the bytes it moved are counted: {eg:?}"
    );
}

#[test]
fn past_the_record_limit_connections_are_only_counted() {
    let port = host_server();
    let script = format!(
        "for i in 1 2 3 4 5; do curl -s http://blocked.example/ >/dev/null; done; curl -s http://127.0.0.1:{port}/"
    );
    let (code, out, v) = run(
        Who::Me,
        &format!("127.0.0.1:{port}"),
        &script,
        &["--egress-record-limit", "2"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("hello from the host"),
        "the policy still holds: {out}"
    );
    let eg = v["egress"].as_array().cloned().unwrap_or_default();
    assert_eq!(eg.len(), 2, "{eg:?}");
    assert_eq!(
        v["egress_unrecorded"],
        serde_json::json!({"allowed": 1, "refused": 3, "limit": 2}),
        "{v}"
    );
    // without the limit's being reached, no such field
    let (_, _, v) = run(Who::Me, &format!("127.0.0.1:{port}"), "true", &[]);
    assert!(v.get("egress_unrecorded").is_none(), "{v}");
}

#[test]
fn bad_allowlists_are_a_clear_125() {
    for bad in ["allow:", "allow:bad host", "allow:x:99999", "allow:*."] {
        let o = agentvm(Who::Me, &["run", "--network", bad, "--", "true"]);
        assert_eq!(o.status.code(), Some(125), "{bad}: {o:?}");
    }
}

/// The egress proxy is a fork of the runner that parses what the sandbox
/// sends: it holds none of the runner's other descriptors (the repo, the
/// patch and result files), so a proxy the sandbox subverted could not
/// write the run's result or read the repo through them.
#[test]
fn the_proxy_holds_none_of_the_runners_descriptors() {
    let repo = fixture_repo(Who::Me);
    let out = out_dir(Who::Me);
    let patch = out.path().join("p.diff");
    let result = out.path().join("r.json");
    let mut child = std::process::Command::new(bin_dir().join("agentvm-run"))
        .args(["run", "--network", "allow:127.0.0.1:9", "--repo"])
        .arg(repo.path())
        .arg("--patch-out")
        .arg(&patch)
        .arg("--result-json")
        .arg(&result)
        .args(["--", "sleep", "3"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let me = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let runner = child.id();
    let started = std::time::Instant::now();
    let mut checked = false;
    while started.elapsed() < std::time::Duration::from_secs(10) && !checked {
        let kids = std::fs::read_to_string(format!("/proc/{runner}/task/{runner}/children"))
            .unwrap_or_default();
        for pid in kids.split_whitespace() {
            // the proxy shares our pid namespace; the sandbox's init does not
            if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&me)
            {
                continue;
            }
            // judged once it runs the proxy (its runtime's threads exist),
            // not in the instant between fork and closing what it inherited
            let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Threads:")
                        .map(|n| n.trim().parse::<u32>().unwrap_or(0))
                })
                .unwrap_or(0);
            if threads < 2 {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let targets: Vec<std::path::PathBuf> = fds
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect();
            for t in &targets {
                assert!(
                    *t != patch && *t != result && !t.starts_with(repo.path()),
                    "the proxy holds {}: {targets:?}",
                    t.display()
                );
            }
            checked = !targets.is_empty();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(checked, "the proxy was never seen");
}
