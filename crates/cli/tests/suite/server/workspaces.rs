//! Workspaces through the real server: jobs that build on each other,
//! checkpoints, restore, forks, the patch and apply, damage refused, a
//! kill -9 mid-job, and every bad input a clear 4xx.

use super::*;

fn ws_job(ws: &str, prompt: &str) -> Value {
    json!({"agent": "shell", "prompt": prompt, "workspace": ws, "timeout": 60})
}

/// Run a job over `ws`; its status and output.
fn run_in(s: &Server, ws: &str, prompt: &str) -> (String, Value, String) {
    let (code, j) = s.json("POST", "/v1/jobs", Some(ws_job(ws, prompt)));
    assert_eq!(code, 202, "{j}");
    let id = j["id"].as_str().unwrap_or("").to_string();
    let done = s.wait(&id);
    let logs = s.text(&format!("/v1/jobs/{id}/logs"));
    (id, done, logs)
}

fn make(s: &Server, body: Value) -> Value {
    let (code, w) = s.json("POST", "/v1/workspaces", Some(body));
    assert_eq!(code, 201, "{w}");
    w
}

#[test]
fn workspaces_carry_jobs_checkpoints_restores_and_forks() {
    let (t, repo, s) = setup(&[]);
    let repo_s = repo.to_string_lossy().into_owned();
    let before = manifest(&repo);
    let w = make(&s, json!({"name": "w", "repo_path": repo_s}));
    assert_eq!(w["layers"], 0, "{w}");

    // job 1 writes; job 2 sees it; the repo never changes
    let (_, d1, _) = run_in(&s, "w", "echo one > f1.txt && rm a.txt");
    assert_eq!(d1["status"], "succeeded", "{d1}");
    let (j2, d2, out2) = run_in(
        &s,
        "w",
        "cat f1.txt; test -e a.txt || echo a-gone; echo two > f2.txt",
    );
    assert_eq!(d2["status"], "succeeded", "{d2}");
    assert_eq!(out2, "one\na-gone\n");
    let p2 = s.text(&format!("/v1/jobs/{j2}/patch"));
    assert!(
        p2.contains("+++ b/f2.txt") && !p2.contains("f1.txt"),
        "job 2's patch is its own: {p2}"
    );
    assert_eq!(manifest(&repo), before, "the repo changed");
    let (_, w) = s.json("GET", "/v1/workspaces/w", None);
    assert_eq!(w["layers"], 2, "{w}");

    // checkpoint, change, restore: the change is gone
    let (code, c1) = s.json(
        "POST",
        "/v1/workspaces/w/checkpoints",
        Some(json!({"name": "c1"})),
    );
    assert_eq!(code, 201, "{c1}");
    let c1_id = c1["id"].as_str().unwrap_or("").to_string();
    let (code, again) = s.json(
        "POST",
        "/v1/workspaces/w/checkpoints",
        Some(json!({"name": "c1"})),
    );
    assert_eq!(code, 409, "a checkpoint name that exists: {again}");
    run_in(&s, "w", "rm f1.txt && echo three > f3.txt");
    // the diff between two checkpoints turns one state into the other:
    // a copy of the repo brought to c1, then the diff c1 -> c2, is c2
    let (code, c2) = s.json(
        "POST",
        "/v1/workspaces/w/checkpoints",
        Some(json!({"name": "c2"})),
    );
    assert_eq!(code, 201, "{c2}");
    let d = s.text("/v1/workspaces/w/diff?from=c1&to=c2");
    assert!(
        d.contains("deleted file mode") && d.contains("+++ b/f3.txt") && !d.contains("f2.txt"),
        "{d}"
    );
    assert_eq!(
        s.text("/v1/workspaces/w/diff?from=c1"),
        d,
        "c1 to now is c1 to c2"
    );
    assert_eq!(
        s.text(&format!("/v1/workspaces/w/diff?from={c1_id}&to=c1")),
        ""
    );
    let state = |to: &str| {
        let d = tempdir();
        let c = sh(
            d.path(),
            &format!("cp -R {}/. . && rm -rf .git", repo.display()),
        );
        assert!(c.status.success());
        let p = s.text(&format!("/v1/workspaces/w/diff?to={to}"));
        std::fs::write(d.path().join("to.patch"), p).unwrap();
        let a = sh(d.path(), "git apply to.patch && rm to.patch");
        assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
        d
    };
    let (at_c1, at_c2) = (state("c1"), state("c2"));
    std::fs::write(at_c1.path().join("d.patch"), &d).unwrap();
    let a = sh(at_c1.path(), "git apply d.patch && rm d.patch");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(manifest(at_c1.path()), manifest(at_c2.path()));
    let (code, e) = s.json("GET", "/v1/workspaces/w/diff?from=nope", None);
    assert_eq!(code, 404, "{e}");
    let (code, e) = s.json("GET", "/v1/workspaces/w/diff?since=c1", None);
    assert_eq!(code, 422, "{e}");
    let (_, _, ls) = run_in(&s, "w", "ls");
    assert!(ls.contains("f3.txt") && !ls.contains("f1.txt"), "{ls}");
    let (code, r) = s.json(
        "POST",
        "/v1/workspaces/w/restore",
        Some(json!({"checkpoint": "c1"})),
    );
    assert_eq!(code, 200, "{r}");
    let (_, _, ls) = run_in(&s, "w", "ls");
    assert!(
        ls.contains("f1.txt") && ls.contains("f2.txt") && !ls.contains("f3.txt"),
        "{ls}"
    );
    let (_, list) = s.json("GET", "/v1/workspaces/w/checkpoints", None);
    assert_eq!(
        list["checkpoints"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
    assert_eq!(list["checkpoints"][0]["layers"], 2, "{list}");

    // two forks of one checkpoint do not see each other
    make(&s, json!({"name": "fa", "from_checkpoint": c1_id}));
    make(&s, json!({"name": "fb", "from_checkpoint": c1_id}));
    run_in(&s, "fa", "echo a > only-a");
    run_in(&s, "fb", "echo b > only-b");
    let (_, _, la) = run_in(&s, "fa", "ls");
    let (_, _, lb) = run_in(&s, "fb", "ls");
    assert!(
        la.contains("only-a") && !la.contains("only-b") && la.contains("f1.txt"),
        "{la}"
    );
    assert!(lb.contains("only-b") && !lb.contains("only-a"), "{lb}");

    // the workspace's patch is everything against the repo, and applies
    let patch = s.text("/v1/workspaces/w/patch");
    assert!(
        patch.contains("+++ b/f1.txt") && patch.contains("+++ b/f2.txt"),
        "{patch}"
    );
    assert!(
        patch.contains("deleted file") && patch.contains("a/a.txt"),
        "{patch}"
    );
    let copy = t.path().join("copy");
    assert!(sh(
        t.path(),
        &format!("cp -R {} {}", repo.display(), copy.display())
    )
    .status
    .success());
    std::fs::write(t.path().join("w.patch"), &patch).unwrap();
    let o = sh(
        &copy,
        &format!("git apply --check {}", t.path().join("w.patch").display()),
    );
    assert!(o.status.success(), "{o:?}");
    let (code, applied) = s.json("POST", "/v1/workspaces/w/apply", None);
    assert_eq!(code, 201, "{applied}");
    let branch = applied["branch"].as_str().unwrap_or("").to_string();
    let o = sh(&repo, &format!("git show --stat {branch}"));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("f1.txt"),
        "{o:?}"
    );

    // a damaged checkpoint is refused on restore and fork, naming the file
    let layers = s.data.join("layers");
    let damaged = std::fs::read_dir(&layers)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("f1.txt"))
        // a file, not the whiteout of a layer that deleted it
        .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .unwrap_or_else(|| panic!("no layer holds f1.txt"));
    std::fs::write(&damaged, b"0ne\n").unwrap();
    let (code, e) = s.json(
        "POST",
        "/v1/workspaces/w/restore",
        Some(json!({"checkpoint": c1_id})),
    );
    assert_eq!(code, 409, "{e}");
    assert!(e["detail"].as_str().unwrap_or("").contains("f1.txt"), "{e}");
    let (code, e) = s.json(
        "POST",
        "/v1/workspaces",
        Some(json!({"name": "fc", "from_checkpoint": c1_id})),
    );
    assert_eq!(code, 409, "{e}");
    std::fs::write(&damaged, b"one\n").unwrap();

    // the audit trail has it
    let (_, audit) = s.json("GET", "/v1/audit?limit=200", None);
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    for a in [
        "workspace.create",
        "workspace.checkpoint",
        "workspace.restore",
        "workspace.apply",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }

    // deleting a checkpoint (the CLI's, then the API's) keeps what the
    // workspace and the forks made from it need
    let home = tempdir();
    let o = s.cli(
        home.path(),
        &["workspaces", "rm", "w", "--checkpoint", "c2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, e) = s.json("GET", "/v1/workspaces/w/diff?to=c2", None);
    assert_eq!(code, 404, "a deleted checkpoint: {e}");
    let (code, e) = s.json("DELETE", "/v1/workspaces/w/checkpoints/c2", None);
    assert_eq!(code, 404, "deleted twice: {e}");
    let (code, _, _) = s.req(
        "DELETE",
        &format!("/v1/workspaces/w/checkpoints/{c1_id}"),
        Some(&s.key),
        None,
    );
    assert_eq!(code, 204);
    let (_, _, lb) = run_in(&s, "fb", "cat f1.txt");
    assert_eq!(
        lb, "one\n",
        "a fork keeps its layers when its checkpoint goes"
    );
    // deleting the workspace keeps what the forks need
    let (code, _, _) = s.req("DELETE", "/v1/workspaces/w", Some(&s.key), None);
    assert_eq!(code, 204);
    let (_, _, la) = run_in(&s, "fa", "cat f1.txt only-a");
    assert_eq!(la, "one\na\n");
    let (code, e) = s.json(
        "POST",
        "/v1/workspaces",
        Some(json!({"name": "fd", "from_checkpoint": c1_id})),
    );
    assert_eq!(code, 404, "a fork of a deleted checkpoint: {e}");
}

#[test]
fn workspace_bad_input_and_one_writer() {
    let (_t, repo, s) = setup(&[]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "w", "repo_path": repo_s}));
    for (body, code) in [
        (json!({"name": "w", "repo_path": repo_s}), 409),
        (json!({"name": "../x", "repo_path": repo_s}), 422),
        (json!({"name": "x"}), 422),
        (json!({"name": "x", "repo_path": "/etc"}), 403),
        (json!({"name": "x", "from_checkpoint": "cp_nope"}), 404),
        (json!({"name": "x", "repo_path": repo_s, "extra": 1}), 422),
    ] {
        let (got, v) = s.json("POST", "/v1/workspaces", Some(body.clone()));
        assert_eq!(got, code, "{body}: {v}");
    }
    let (code, v) = s.json("GET", "/v1/workspaces/nope", None);
    assert_eq!(code, 404, "{v}");
    let (code, v) = s.json("POST", "/v1/jobs", Some(ws_job("nope", "true")));
    assert_eq!(code, 404, "{v}");
    let both = json!({"agent": "shell", "prompt": "true", "workspace": "w", "repo_path": repo_s});
    let (code, v) = s.json("POST", "/v1/jobs", Some(both));
    assert_eq!(code, 422, "{v}");
    let (code, v) = s.json(
        "POST",
        "/v1/workspaces/w/restore",
        Some(json!({"checkpoint": "nope"})),
    );
    assert_eq!(code, 404, "{v}");
    // another key's workspace is as unknown as none
    let (_, k) = s.json(
        "POST",
        "/v1/keys",
        Some(json!({"name": "other", "scopes": ["run"]})),
    );
    let other = k["key"].as_str().unwrap_or("").to_string();
    let (code, _, _) = s.req("GET", "/v1/workspaces/w", Some(&other), None);
    assert_eq!(code, 404);
    let (code, _, body) = s.req("POST", "/v1/jobs", Some(&other), Some(ws_job("w", "true")));
    assert_eq!(code, 404, "{body}");
    let (code, _, body) = s.req("GET", "/v1/workspaces", Some(&other), None);
    assert_eq!(code, 200);
    assert!(!body.contains("\"w\""), "{body}");
    // one writer: a second job is refused while the first runs, naming it
    let (_, a) = s.json(
        "POST",
        "/v1/jobs",
        Some(ws_job("w", "sleep 3; echo done > d")),
    );
    let a = a["id"].as_str().unwrap_or("").to_string();
    let (code, v) = s.json("POST", "/v1/jobs", Some(ws_job("w", "true")));
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap_or("").contains(&a), "{v}");
    let (code, v) = s.json(
        "POST",
        "/v1/workspaces/w/restore",
        Some(json!({"checkpoint": "x"})),
    );
    assert!(code == 404 || code == 409, "{v}");
    let (code, _, _) = s.req("DELETE", "/v1/workspaces/w", Some(&s.key), None);
    assert_eq!(code, 409, "deleting a workspace a job writes");
    assert_eq!(s.wait(&a)["status"], "succeeded");
    let (_, _, out) = run_in(&s, "w", "cat d");
    assert_eq!(out, "done\n");
}

#[test]
fn kill_9_mid_job_leaves_the_workspace_as_before_that_job() {
    let (t, repo, mut s) = setup(&[]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "w", "repo_path": repo_s}));
    run_in(&s, "w", "echo kept > kept.txt");
    let marker = format!("1000.{}", std::process::id());
    let (_, a) = s.json(
        "POST",
        "/v1/jobs",
        Some(ws_job(
            "w",
            &format!("echo half > half.txt; echo started; sleep {marker}"),
        )),
    );
    let a = a["id"].as_str().unwrap_or("").to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.text(&format!("/v1/jobs/{a}/logs")) != "started\n" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    s.signal(libc::SIGKILL);
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
    let root = repo
        .parent()
        .unwrap_or(&repo)
        .to_string_lossy()
        .into_owned();
    let s2 = Server::start(&t.path().join("data"), &["--allowed-root", &root]);
    assert_eq!(s2.wait(&a)["status"], "interrupted");
    let (_, w) = s2.json("GET", "/v1/workspaces/w", None);
    assert_eq!(w["writer"], Value::Null, "let go of: {w}");
    assert_eq!(w["layers"], 1, "{w}");
    let (_, d, out) = run_in(
        &s2,
        "w",
        "cat kept.txt; test -e half.txt && echo half-there || echo no-half",
    );
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(out, "kept\nno-half\n");
    // nothing the killed job made is left in the store
    let names: Vec<String> = std::fs::read_dir(s2.data.join("layers"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "the first job's layer and its manifest only: {names:?}"
    );
}

#[test]
fn the_cli_makes_checkpoints_forks_and_verifies() {
    let (t, repo, s) = setup(&[]);
    let cli = |args: &[&str]| s.cli(t.path(), args);
    let ok = |args: &[&str]| {
        let o = cli(args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let r = repo.to_string_lossy().into_owned();
    let w: Value =
        serde_json::from_str(&ok(&["workspaces", "--json", "create", "cw", "--repo", &r])).unwrap();
    assert_eq!(w["name"], "cw");
    ok(&[
        "jobs",
        "submit",
        "--agent",
        "shell",
        "--workspace",
        "cw",
        "--wait",
        "echo from-cli > c.txt",
    ]);
    let cp: Value =
        serde_json::from_str(&ok(&["workspaces", "--json", "checkpoint", "cw", "one"])).unwrap();
    assert_eq!(cp["layers"], 1, "{cp}");
    let list = ok(&["workspaces", "checkpoints", "cw"]);
    assert!(list.contains("one"), "{list}");
    let f: Value =
        serde_json::from_str(&ok(&["workspaces", "--json", "fork", "cw", "one", "cw2"])).unwrap();
    assert_eq!(f["layers"], 1, "{f}");
    let patch = ok(&["workspaces", "patch", "cw2"]);
    assert!(patch.contains("+from-cli"), "{patch}");
    let v: Value = serde_json::from_str(&ok(&["workspaces", "--json", "verify", "cw"])).unwrap();
    assert_eq!(v["damaged"].as_array().map(Vec::len), Some(0), "{v}");
    // damage on disk: verify names it and exits 1
    let layer = std::fs::read_dir(s.data.join("layers"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("c.txt"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no layer holds c.txt"));
    std::fs::write(&layer, b"tampered\n").unwrap();
    let o = cli(&["workspaces", "verify", "cw"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("damaged") && said.contains("c.txt"), "{said}");
    let o = cli(&["workspaces", "restore", "cw", "one"]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("c.txt"),
        "{o:?}"
    );
    let list = ok(&["workspaces", "list"]);
    assert!(list.contains("cw2"), "{list}");
    ok(&["workspaces", "rm", "cw2"]);
    let o = cli(&["workspaces", "show", "cw2"]);
    assert!(!o.status.success(), "{o:?}");
}

/// Past 48 layers the oldest are squashed into one: the same files, a
/// shallower stack, and a checkpoint taken before still restores.
#[test]
fn a_deep_stack_is_squashed_and_shows_the_same_files() {
    let (_t, repo, s) = setup(&["--rate-limit", "0"]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "deep", "repo_path": repo_s}));
    let mut ids = Vec::new();
    for i in 0..50 {
        let prompt = match i {
            3 => "rm a.txt; echo 3 > f3".to_string(),
            5 => "rm f1; echo 5 > f5".to_string(),
            _ => format!("echo {i} > f{i}"),
        };
        let (_, done, _) = run_in(&s, "deep", &prompt);
        assert_eq!(done["status"], "succeeded", "{done}");
        ids.push(done["id"].clone());
        if i == 6 {
            let (code, c) = s.json(
                "POST",
                "/v1/workspaces/deep/checkpoints",
                Some(json!({"name": "early"})),
            );
            assert_eq!(code, 201, "{c}");
        }
    }
    let (_, w) = s.json("GET", "/v1/workspaces/deep", None);
    let layers = w["layers"].as_u64().unwrap_or(0);
    assert!(layers < 48, "not squashed: {w}");
    let (_, _, ls) = run_in(&s, "deep", "ls | sort | tr '\\n' ' '; cat f49 f3");
    assert!(
        !ls.contains(" f1 ") && !ls.contains("a.txt"),
        "deletions kept: {ls}"
    );
    assert!(
        ls.contains("f0 ") && ls.contains("f48 ") && ls.ends_with("49\n3\n"),
        "{ls}"
    );
    let (code, r) = s.json(
        "POST",
        "/v1/workspaces/deep/restore",
        Some(json!({"checkpoint": "early"})),
    );
    assert_eq!(code, 200, "{r}");
    let (_, _, ls) = run_in(&s, "deep", "ls | sort | tr '\\n' ' '");
    assert!(
        ls.contains("f6 ") && !ls.contains("f7 ") && !ls.contains(" f1 "),
        "{ls}"
    );
}

/// A job cancelled while it waits in the queue lets go of its workspace
/// at once, and a hold whose job is gone never blocks the next one.
#[test]
fn a_cancelled_queued_job_lets_go_of_its_workspace() {
    let (_t, repo, s) = setup(&["--max-concurrent", "1"]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "w", "repo_path": repo_s}));
    // the only worker is busy
    let (_, busy) = s.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 5")));
    let busy = busy["id"].as_str().unwrap_or("").to_string();
    s.wait_running(&busy);
    let (code, q) = s.json("POST", "/v1/jobs", Some(ws_job("w", "echo never > n")));
    assert_eq!(code, 202, "{q}");
    let q = q["id"].as_str().unwrap_or("").to_string();
    let (_, w) = s.json("GET", "/v1/workspaces/w", None);
    assert_eq!(w["writer"], q.as_str(), "{w}");
    let (code, _, _) = s.req("POST", &format!("/v1/jobs/{q}/cancel"), Some(&s.key), None);
    assert_eq!(code, 202);
    let (_, w) = s.json("GET", "/v1/workspaces/w", None);
    assert_eq!(w["writer"], Value::Null, "still held after the cancel: {w}");
    let (code, _, _) = s.req(
        "POST",
        &format!("/v1/jobs/{busy}/cancel"),
        Some(&s.key),
        None,
    );
    assert_eq!(code, 202);
    let (_, d, out) = run_in(&s, "w", "test -e n && echo there || echo not-there");
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(out, "not-there\n");
}

/// A session over a workspace starts from its state and leaves its
/// changes in it; while it lives, nobody else writes the workspace.
#[test]
fn a_session_over_a_workspace_builds_on_it_and_holds_it() {
    let (_t, repo, s) = setup(&[]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "w", "repo_path": repo_s}));
    run_in(&s, "w", "echo from-job > j.txt");
    let body = json!({"workspace": "w", "name": "sw", "command": ["sh", "-c", "cat j.txt > seen.txt; echo from-session > s.txt; sleep 2"]});
    let (code, v) = s.json("POST", "/v1/sessions", Some(body));
    assert_eq!(code, 201, "{v}");
    let sid = v["id"].as_str().unwrap_or("").to_string();
    assert_eq!(v["repo_path"], repo_s.as_str(), "{v}");
    // held: a job is refused, naming the session
    let (code, e) = s.json("POST", "/v1/jobs", Some(ws_job("w", "true")));
    assert_eq!(code, 409, "{e}");
    assert!(e["detail"].as_str().unwrap_or("").contains(&sid), "{e}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = s.json("GET", &format!("/v1/sessions/{sid}"), None);
        if v["status"] != "running" {
            assert_eq!(v["status"], "exited", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the session did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, w) = s.json("GET", "/v1/workspaces/w", None);
    assert_eq!(w["writer"], Value::Null, "{w}");
    assert_eq!(w["layers"], 2, "{w}");
    let (_, d, out) = run_in(&s, "w", "cat seen.txt s.txt");
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(out, "from-job\nfrom-session\n");
    // both at once is refused
    let both = json!({"workspace": "w", "repo_path": repo_s});
    let (code, v) = s.json("POST", "/v1/sessions", Some(both));
    assert_eq!(code, 422, "{v}");
}

/// A workspace's quota and the server's total bound what its jobs may
/// write: past it, ENOSPC inside and a job error saying which quota; once
/// it is used up, no job starts over it (409); GET reports the use.
#[test]
fn quotas_give_enospc_inside_and_say_which() {
    let (_t, repo, s) = setup(&["--workspace-quota", "3M", "--workspaces-total", "5M"]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "q", "repo_path": repo_s}));
    let (_, d, _) = run_in(&s, "q", "head -c 1048576 /dev/zero > one.bin");
    assert_eq!(d["status"], "succeeded", "{d}");
    let (_, w) = s.json("GET", "/v1/workspaces/q", None);
    assert_eq!(w["quota_bytes"], 3 << 20, "{w}");
    assert_eq!(w["used_bytes"], 1 << 20, "{w}");
    // 2M left: a job writing 5M meets ENOSPC inside and says why
    let (_, d, logs) = run_in(&s, "q", "head -c 5242880 /dev/zero > big.bin");
    assert_eq!(d["status"], "failed", "{d}");
    assert!(logs.contains("No space left on device"), "{logs}");
    let err = d["error"].as_str().unwrap_or("");
    assert!(
        err.contains("its disk (2097152 bytes) was full")
            && err.contains("workspace q holds 1048576 bytes of its quota of 3145728"),
        "{d}"
    );
    assert_eq!(d["result"]["disk_full"], true, "{d}");
    // what it wrote until then is kept: the quota is used up, and the
    // next job is refused before it is queued
    let (code, e) = s.json("POST", "/v1/jobs", Some(ws_job("q", "true")));
    assert_eq!(code, 409, "{e}");
    assert!(
        e["detail"].as_str().unwrap_or("").contains("no disk left"),
        "{e}"
    );
    let (code, e) = s.json("POST", "/v1/sessions", Some(json!({"workspace": "q"})));
    assert_eq!(code, 409, "{e}");
    // the server's total binds a second workspace sooner than its own quota
    make(&s, json!({"name": "r", "repo_path": repo_s}));
    let (_, d, _) = run_in(&s, "r", "head -c 3145728 /dev/zero > big.bin");
    assert_eq!(d["status"], "failed", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap_or("")
            .contains("--workspaces-total"),
        "{d}"
    );
    // deleting what holds the bytes gives them back
    let (code, _) = s.json("DELETE", "/v1/workspaces/q", None);
    assert_eq!(code, 204);
    let (_, d, _) = run_in(&s, "r", "head -c 1048576 /dev/zero > more.bin");
    assert_eq!(d["status"], "succeeded", "{d}");
}

/// Read-only use beside a writer: a job or session that reads a busy
/// workspace runs at once, over its state when accepted, and leaves
/// nothing in it; a second writer is still refused.
#[test]
fn readers_run_beside_the_writer_and_leave_nothing() {
    let (_t, repo, s) = setup(&[]);
    let repo_s = repo.to_string_lossy().into_owned();
    make(&s, json!({"name": "w", "repo_path": repo_s}));
    let (_, d, _) = run_in(&s, "w", "echo one > one.txt");
    assert_eq!(d["status"], "succeeded", "{d}");
    // a writer that takes its time
    let (code, wj) = s.json(
        "POST",
        "/v1/jobs",
        Some(ws_job("w", "sleep 2; echo two > two.txt")),
    );
    assert_eq!(code, 202, "{wj}");
    let writer = wj["id"].as_str().unwrap_or("").to_string();
    s.wait_running(&writer);
    let (code, e) = s.json("POST", "/v1/jobs", Some(ws_job("w", "true")));
    assert_eq!(code, 409, "a second writer: {e}");
    // a reader runs now, sees the state, writes only its own patch
    let mut rj = ws_job(
        "w",
        "cat one.txt; test -e two.txt || echo no-two; echo r > r.txt",
    );
    rj["read_only"] = json!(true);
    let (code, r) = s.json("POST", "/v1/jobs", Some(rj));
    assert_eq!(code, 202, "{r}");
    let reader = r["id"].as_str().unwrap_or("").to_string();
    let rd = s.wait(&reader);
    assert_eq!(rd["status"], "succeeded", "{rd}");
    assert_eq!(s.text(&format!("/v1/jobs/{reader}/logs")), "one\nno-two\n");
    assert!(s
        .text(&format!("/v1/jobs/{reader}/patch"))
        .contains("+++ b/r.txt"));
    let (_, w) = s.json("GET", "/v1/workspaces/w", None);
    assert_eq!(w["writer"], json!(writer), "the reader took no hold: {w}");
    // a session may read it too
    let (code, v) = s.json(
        "POST",
        "/v1/sessions",
        Some(json!({"workspace": "w", "read_only": true, "command": ["sh", "-c", "cat one.txt > seen; sleep 30"]})),
    );
    assert_eq!((code, &v["status"]), (201, &json!("running")), "{v}");
    let sid = v["id"].as_str().unwrap_or("").to_string();
    let wd = s.wait(&writer);
    assert_eq!(wd["status"], "succeeded", "{wd}");
    let (code, _) = s.json("DELETE", &format!("/v1/sessions/{sid}"), None);
    assert_eq!(code, 202);
    // the writer's change is kept; the readers' are not
    let (_, _, ls) = run_in(&s, "w", "ls");
    assert!(
        ls.contains("two.txt") && !ls.contains("r.txt") && !ls.contains("seen"),
        "{ls}"
    );
    // read_only is for a workspace only
    let (code, e) = s.json(
        "POST",
        "/v1/jobs",
        Some(json!({"agent": "shell", "prompt": "true", "repo_path": repo_s, "read_only": true})),
    );
    assert_eq!(code, 422, "{e}");
}
