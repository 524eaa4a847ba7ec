//! Nothing lost: kill -9, SIGTERM, backup and restore.

use super::*;

/// The allowed root `setup` gives the server: the repo's parent.
fn root_of(repo: &Path) -> String {
    repo.parent().unwrap_or(repo).to_string_lossy().into_owned()
}

/// The server again, on the data directory under `t` that `setup` made.
fn restart(t: &Path, repo: &Path) -> Server {
    Server::start(&t.join("data"), &["--allowed-root", &root_of(repo)])
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
    let s2 = restart(t.path(), &repo);
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
    let s2 = restart(t.path(), &repo);
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
        &["--allowed-root", &root_of(&repo), "--shutdown-grace", "1s"],
    );
    let (_, long) = s3.json("POST", "/v1/jobs", Some(shell(&repo, "sleep 60")));
    let lid3 = long["id"].as_str().unwrap_or("").to_string();
    s3.wait_running(&lid3);
    s3.signal(libc::SIGTERM);
    assert!(s3.wait_exit(Duration::from_secs(30)).is_some());
    let s4 = restart(t.path(), &repo);
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
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // restore refuses while the server runs
    let o = Command::new(agentvm_path())
        .args(["restore", &bks, "--data-dir", &data])
        .output()
        .unwrap();
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
    std::fs::write(&junk, "not a database").unwrap();
    let o = Command::new(agentvm_path())
        .args(["restore", junk.to_str().unwrap_or(""), "--data-dir", &data])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = Command::new(agentvm_path())
        .args(["restore", &bks, "--data-dir", &data])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let s2 = restart(t.path(), &repo);
    let (code, j) = s2.json("GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(code, 200, "{j}");
    assert_eq!(
        s2.req("GET", &format!("/v1/jobs/{id}/logs"), Some(&s2.key), None)
            .2,
        "kept\n"
    );
}

/// SIGTERM right as a worker takes a job: whether the job started before
/// the drain (then it finishes within the grace period) or stayed queued
/// (then it runs after the restart), it must never be cut short.
#[test]
fn sigterm_at_the_moment_a_job_starts_loses_nothing() {
    let (t, repo, s) = setup(&["--shutdown-grace", "20s"]);
    let root = root_of(&repo);
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
        let s2 = restart(t.path(), &repo);
        let done = s2.wait(&id);
        assert_eq!(done["status"], "succeeded", "round {round}: {done}");
    }
}

/// A session still marked running when the server starts was interrupted
/// by the previous stop: it is marked so (its record kept), and a
/// supervisor it left behind, checked by pid and start time, is killed.
#[test]
fn sessions_left_running_are_interrupted_at_start() {
    let t = tempdir();
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // a leftover supervisor: a process of ours, recorded with its start time
    let mut leftover = Command::new("sleep").arg("300").spawn().unwrap();
    let pid = leftover.id() as i64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start: i64 = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = agentvm_store::Store::open(&data.join("agentvm.db"))
            .await
            .unwrap();
        let n = agentvm_store::NewSession {
            id: "s_live".into(),
            name: "work".into(),
            owner: "key_x".into(),
            agent: None,
            command: vec!["bash".into()],
            repo_path: None,
            network: None,
            idle_timeout_s: 600,
        };
        s.create_session(&n).await.unwrap();
        s.set_session_supervisor("s_live", pid, start)
            .await
            .unwrap();
        s.close().await;
    });
    let server = Server::start(&data, &[]);
    let waited = Instant::now();
    while leftover.try_wait().unwrap().is_none() && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        leftover.try_wait().unwrap().is_some(),
        "the leftover supervisor was not killed"
    );
    drop(server);
    rt.block_on(async {
        let s = agentvm_store::Store::open(&data.join("agentvm.db"))
            .await
            .unwrap();
        let x = s.get_session("s_live").await.unwrap().unwrap();
        assert_eq!(x.status, agentvm_store::SessionStatus::Interrupted);
        assert!(x.error.unwrap_or_default().contains("server stopped"));
        s.close().await;
    });
}
