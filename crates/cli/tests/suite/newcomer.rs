//! What a new user meets: commands piped into `head`, a missing key, the
//! README's environment, a port already taken, no allowed root, and the
//! agent CLIs where the docs install them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::common::*;
use crate::suite::server::{setup, shell};

/// Run agentvm with its stdout a pipe nobody reads any more.
fn into_closed_pipe(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let mut c = Command::new(agentvm_path());
    c.args(args)
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let (_t, repo, s) = setup(&[]);
    for _ in 0..3 {
        s.run_job(shell(&repo, "true"));
    }
    for args in [
        vec!["jobs", "list", "--server", &s.url, "--api-key", &s.key],
        vec![
            "jobs",
            "list",
            "--json",
            "--server",
            &s.url,
            "--api-key",
            &s.key,
        ],
        vec!["audit", "--server", &s.url, "--api-key", &s.key],
        vec!["keys", "list", "--server", &s.url, "--api-key", &s.key],
        vec!["doctor"],
        vec!["--help"],
        vec!["run", "--help"],
    ] {
        let o = into_closed_pipe(&args, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        use std::os::unix::process::ExitStatusExt;
        assert!(
            o.status.signal() == Some(libc::SIGPIPE) || o.status.success(),
            "{args:?}: {:?}",
            o.status
        );
    }
}

#[test]
fn a_missing_key_says_where_keys_come_from() {
    let t = tempdir();
    let o = Command::new(agentvm_path())
        .args(["jobs", "list", "--server", "http://127.0.0.1:1"])
        .env("HOME", t.path())
        .env("XDG_DATA_HOME", t.path())
        .env_remove("AGENTVM_API_KEY")
        .env_remove("AGENTVM_API_KEY_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("AGENTVM_API_KEY_FILE") && err.contains("--api-key-file"),
        "{err}"
    );
    assert!(
        err.contains("admin.key") && !err.contains("X-API-Key"),
        "{err}"
    );
}

#[test]
fn repo_errors_name_the_path_and_the_roots() {
    let (t, repo, s) = setup(&[]);
    let (code, v) = s.json(
        "POST",
        "/v1/jobs",
        Some(shell(&t.path().join("nope"), "true")),
    );
    assert_eq!(code, 422);
    let msg = v["detail"][0]["msg"].as_str().unwrap_or("");
    assert!(msg.contains("/nope does not exist"), "{v}");
    assert!(!msg.contains("repo_path"), "repeats the field: {msg}");
    let (code, v) = s.json("POST", "/v1/jobs", Some(shell(t.path(), "true")));
    assert_eq!(code, 403);
    let d = v["detail"].as_str().unwrap_or("");
    let root = std::fs::canonicalize(repo.parent().unwrap_or(&repo)).unwrap_or_default();
    assert!(
        d.contains(&root.display().to_string()) && d.contains("--allowed-root"),
        "{d}"
    );
}

/// Start `agentvm serve` with `args` and `env`; its stderr until it says
/// it listens (or exits).
fn serve_until_listening(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, Vec<String>) {
    let mut c = Command::new(agentvm_path());
    c.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c.env("AGENTVM_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let err = child.stderr.take().unwrap_or_else(|| panic!("stderr"));
    let mut lines = Vec::new();
    for l in BufReader::new(err).lines().map_while(Result::ok) {
        let done = l.starts_with("agentvm: listening on ");
        lines.push(l);
        if done {
            break;
        }
    }
    (child, lines)
}

#[test]
fn the_readmes_environment_and_a_fresh_serve_get_along() {
    let t = tempdir();
    let data = t.path().join("data");
    let d = data.to_string_lossy().into_owned();
    // the client's variable names a key the server has not written yet
    let key = data.join("admin.key");
    let k = key.to_string_lossy().into_owned();
    let (mut child, lines) = serve_until_listening(
        &["--listen", "127.0.0.1:0", "--data-dir", &d],
        &[("AGENTVM_API_KEY_FILE", &k)],
    );
    let _ = child.kill();
    let _ = child.wait();
    let all = lines.join("\n");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("agentvm: listening on ")),
        "{all}"
    );
    assert!(key.exists(), "{all}");
    // without an allowed root, it says at once that nothing can run
    assert!(
        all.contains("no job can run yet") && all.contains("--allowed-root"),
        "{all}"
    );
}

#[test]
fn a_port_in_use_fails_before_anything_is_created() {
    let t = tempdir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let data = t.path().join("data");
    let o = Command::new(agentvm_path())
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains("--listen"),
        "{err}"
    );
    assert!(
        !data.join("admin.key").exists() && !data.join("agentvm.db").exists(),
        "{err}"
    );
}
