//! Pause and resume of a live session: every process frozen (the kernel's
//! own CPU counters, the process's and its cgroup's, stand still), input
//! ignored and viewers told, the idle clock stopped; resumed, it runs on. Ending a paused session, and a
//! server killed while one is paused, leave nothing frozen behind.

use tokio_tungstenite::tungstenite::Message;

use super::sessions::{create, next_text, type_in, wait_ended, ws};
use super::*;

/// The pids of processes whose command line contains `mark`.
fn pids_with(mark: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmd).contains(mark) {
            v.push(pid);
        }
    }
    v
}

/// CPU time the kernel has charged to `pid` (user + system, in ticks).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command (which may hold spaces) in parentheses
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after ')'
    n(11) + n(12)
}

/// The freezer state of `pid`'s cgroup, read from the kernel: v1's
/// freezer.state, or v2's cgroup.events.
fn freezer_state(pid: i32) -> String {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut v2 = None;
    for line in cg.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next(), p.next().unwrap_or(""), p.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == "freezer") {
            let f = format!("/sys/fs/cgroup/freezer{path}/freezer.state");
            return std::fs::read_to_string(f)
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        if ctrls.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    // a v2 host: cgroup.events says `frozen 1`, told as v1 would
    match v2 {
        Some(path) => {
            let ev = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cgroup.events"))
                .unwrap_or_default();
            if ev.lines().any(|l| l.trim() == "frozen 1") {
                "FROZEN".into()
            } else {
                "THAWED".into()
            }
        }
        None => String::new(),
    }
}

/// CPU time (ns) the cgroup that holds `pid` has charged, read from the
/// kernel: v1's cpuacct.usage, v2's cpu.stat. Panics unless the cgroup is
/// the sandbox's own (an `agentvm-` one), so the figure is the session's.
fn cgroup_cpu_ns(pid: i32) -> u64 {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    for line in cg.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next(), p.next().unwrap_or(""), p.next().unwrap_or(""));
        let (file, v2) = if ctrls.split(',').any(|c| c == "cpuacct") {
            (format!("/sys/fs/cgroup/cpuacct{path}/cpuacct.usage"), false)
        } else if ctrls.is_empty() && !cg.contains("cpuacct") {
            (format!("/sys/fs/cgroup{path}/cpu.stat"), true)
        } else {
            continue;
        };
        assert!(
            path.contains("/agentvm-"),
            "not the sandbox's own cgroup: {line}"
        );
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        return if v2 {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us * 1000)
                .unwrap_or_else(|| panic!("no usage_usec in {file}"))
        } else {
            text.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{file}: {text}"))
        };
    }
    panic!("no CPU accounting cgroup for {pid}: {cg}")
}

fn cgroup_cpu_while(pid: i32, d: Duration) -> u64 {
    let a = cgroup_cpu_ns(pid);
    std::thread::sleep(d);
    cgroup_cpu_ns(pid).saturating_sub(a)
}

fn sessions_cpu_while(pid: i32, d: Duration) -> u64 {
    let a = cpu_ticks(pid);
    std::thread::sleep(d);
    cpu_ticks(pid).saturating_sub(a)
}

#[test]
fn pause_freezes_every_process_and_resume_continues() {
    let (_t, _repo, s) = setup(&[]);
    let mark = format!("pausemark{}", std::process::id());
    let cmd = format!("while :; do :; done # {mark}");
    let v = create(
        &s,
        json!({"name": "busy", "idle_timeout": 3, "command": ["sh", "-c", cmd]}),
    );
    let id = v["id"].as_str().unwrap_or("").to_string();
    let mut pid = None;
    for _ in 0..100 {
        pid = pids_with(&mark).first().copied();
        if pid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = pid.expect("the busy loop never started");
    // an attached viewer keeps the idle clock from running meanwhile
    let mut w = ws(&s, &s.key, &id, "").unwrap();
    let hello = next_text(&mut w, &mut Vec::new());
    assert_eq!(hello["paused"], false, "{hello}");
    assert!(
        sessions_cpu_while(pid, Duration::from_millis(500)) > 2,
        "the busy loop does not run"
    );
    assert!(
        cgroup_cpu_while(pid, Duration::from_millis(500)) > 50_000_000,
        "the session's cgroup counts no CPU for the busy loop"
    );

    let (code, v) = s.json("POST", &format!("/v1/sessions/{id}/pause"), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["paused"], true, "{v}");
    assert_eq!(freezer_state(pid), "FROZEN");
    assert_eq!(
        sessions_cpu_while(pid, Duration::from_secs(1)),
        0,
        "a paused session used CPU"
    );
    assert_eq!(
        cgroup_cpu_while(pid, Duration::from_secs(1)),
        0,
        "a paused session's cgroup was charged CPU"
    );
    // the viewer is told, and its input is not taken
    let told = next_text(&mut w, &mut Vec::new());
    assert_eq!(told, json!({"type": "paused", "paused": true}));
    type_in(&mut w, "x");
    let n = next_text(&mut w, &mut Vec::new());
    assert!(n["detail"].as_str().unwrap_or("").contains("paused"), "{n}");
    // pausing again changes nothing; a late viewer sees it paused and
    // cannot take over
    let (code, v) = s.json("POST", &format!("/v1/sessions/{id}/pause"), None);
    assert_eq!((code, &v["paused"]), (200, &json!(true)), "{v}");
    let mut w2 = ws(&s, &s.key, &id, "").unwrap();
    let hello = next_text(&mut w2, &mut Vec::new());
    assert_eq!(
        (&hello["paused"], &hello["writer"]),
        (&json!(true), &json!(false)),
        "{hello}"
    );
    w2.send(Message::Text(r#"{"type":"take_over"}"#.into()))
        .unwrap();
    let n = next_text(&mut w2, &mut Vec::new());
    assert!(n["detail"].as_str().unwrap_or("").contains("paused"), "{n}");
    // its ports answer at once that it is paused (its forwarder is frozen)
    let t0 = Instant::now();
    let (code, _, body) = s.req(
        "GET",
        &format!("/v1/sessions/{id}/ports/8080/"),
        Some(&s.key),
        None,
    );
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("paused") && t0.elapsed() < Duration::from_secs(5),
        "{body}"
    );
    drop((w, w2));
    // no viewer for longer than its idle timeout: paused, the clock stands
    std::thread::sleep(Duration::from_secs(5));
    let (_, v) = s.json("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(
        (&v["status"], &v["paused"]),
        (&json!("running"), &json!(true)),
        "{v}"
    );

    // the CLI resumes it; the loop runs on
    let home = tempdir();
    let out = s.cli(home.path(), &["sessions", "resume", &id, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(v["paused"], false, "{v}");
    assert_eq!(freezer_state(pid), "THAWED");
    assert!(
        sessions_cpu_while(pid, Duration::from_millis(500)) > 2,
        "the loop did not run on after resume"
    );
    assert!(
        cgroup_cpu_while(pid, Duration::from_millis(500)) > 50_000_000,
        "the session's cgroup counts no CPU after resume"
    );
    // the idle clock starts again at resume: it ends 3 s later
    let v = wait_ended(&s, &id, Duration::from_secs(30));
    assert_eq!(v["status"], "killed", "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("idle"), "{v}");
    assert!(pids_with(&mark).is_empty(), "the loop outlived its session");

    // the control socket never reaches the command
    let v = create(
        &s,
        json!({"name": "fds", "command": ["sh", "-c", "ls -l /proc/self/fd/ > /tmp/fds; cat /tmp/fds; echo fds-done; sleep 30"]}),
    );
    let fid = v["id"].as_str().unwrap_or("").to_string();
    let mut w = ws(&s, &s.key, &fid, "").unwrap();
    let seen = super::sessions::read_until(&mut w, "fds-done");
    assert!(seen.contains("fds-done"), "{seen}");
    assert!(
        !seen.contains("socket:"),
        "a socket reached the command: {seen}"
    );
    drop(w);
    let _ = s.json("DELETE", &format!("/v1/sessions/{fid}"), None);

    // an ended session cannot be paused; another key's is not there
    let (code, v) = s.json("POST", &format!("/v1/sessions/{id}/pause"), None);
    assert_eq!(code, 409, "{v}");
    let (code, v) = s.json("POST", "/v1/sessions/ses_nope/resume", None);
    assert_eq!(code, 404, "{v}");
    let other = super::sessions::new_key(&s, &["run", "read"]);
    let v = create(&s, json!({"name": "mine", "command": ["sleep", "600"]}));
    let id2 = v["id"].as_str().unwrap_or("").to_string();
    let (code, _, body) = s.req(
        "POST",
        &format!("/v1/sessions/{id2}/pause"),
        Some(&other),
        None,
    );
    assert_eq!(code, 404, "{body}");

    // a paused session can still be ended: it is thawed to take its signal
    let out = s.cli(home.path(), &["sessions", "pause", &id2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused"));
    let (code, v) = s.json("DELETE", &format!("/v1/sessions/{id2}"), None);
    assert_eq!(code, 202, "{v}");
    let v = wait_ended(&s, &id2, Duration::from_secs(30));
    assert_eq!(v["status"], "killed", "{v}");

    // the audit trail has each
    let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
    let actions: Vec<String> = a["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|x| x["action"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for want in ["session.pause", "session.resume"] {
        assert!(
            actions.iter().any(|x| x == want),
            "no {want} in {actions:?}"
        );
    }
}

/// A server killed while a session is paused leaves its processes frozen
/// with their SIGKILL pending (v1's freezer holds it); the next start
/// thaws them and they go.
#[test]
fn a_server_killed_while_paused_leaves_nothing_frozen() {
    let (t, _repo, mut s) = setup(&[]);
    let mark = format!("frozenmark{}", std::process::id());
    let cmd = format!("while :; do :; done # {mark}");
    let v = create(&s, json!({"name": "f", "command": ["sh", "-c", cmd]}));
    let id = v["id"].as_str().unwrap_or("").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_with(&mark).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = *pids_with(&mark).first().expect("the loop never started");
    let (code, v) = s.json("POST", &format!("/v1/sessions/{id}/pause"), None);
    assert_eq!(code, 200, "{v}");
    s.signal(libc::SIGKILL);
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
    std::thread::sleep(Duration::from_millis(500));
    // the runner died with the server, its sandbox still frozen (v1 holds
    // the SIGKILL init's parent-death signal sent); on v2 it is gone
    let frozen_left = freezer_state(pid) == "FROZEN";
    let v1 = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .contains("freezer");
    assert!(
        frozen_left || !v1,
        "a v1-frozen sandbox should outlive its killed server until the sweep"
    );
    let root = t.path().join("root").to_string_lossy().into_owned();
    let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_with(&mark).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        pids_with(&mark).is_empty(),
        "a paused session's process outlived the server's restart (frozen left behind: {frozen_left})"
    );
    let (_, v) = s2.json("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(v["status"], "interrupted", "{v}");
}
