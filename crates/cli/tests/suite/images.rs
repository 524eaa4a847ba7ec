//! Images end to end through the CLI: an OCI image the test builds itself
//! (scripts/tiny-image.sh: the host's dash, cat, ls and env and their
//! libraries, plus a program found nowhere else), imported, run on, and
//! the escape checks run once more with an image as the root.

use std::path::Path;

use crate::common::*;

/// Build `image.tar` in `dir` with scripts/tiny-image.sh (an OCI layout's
/// tar, tagged `tiny`, two layers: the second deletes /usr/bin/ls with a
/// whiteout and adds a file), the probe and its libraries in it too.
pub(crate) fn build_image(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tiny-image.sh");
    let o = sh(
        dir,
        &format!("sh '{}' '{}'", script.display(), probe_path().display()),
    );
    assert!(o.status.success(), "building the test image: {o:?}");
}

/// `build_image` with variables for scripts/tiny-image.sh (IMAGE_USER,
/// IMAGE_CONFIG_EXTRA, ETC_LINK).
fn build_image_with(dir: &Path, env: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tiny-image.sh");
    let o = std::process::Command::new("sh")
        .arg(&script)
        .arg(probe_path())
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "building the test image: {o:?}");
}

/// Import `dir`/image.tar as `tag` into a store of `who`'s own under
/// `dir`; that data directory.
fn import_as(who: Who, dir: &Path, tag: &str) -> String {
    let data = dir.join(format!("data-{who:?}"));
    std::fs::create_dir(&data).unwrap();
    if who != Who::Me {
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    }
    let data = data.to_string_lossy().into_owned();
    let tar = dir.join("image.tar").to_string_lossy().into_owned();
    let o = agentvm(
        who,
        &with_data(&data, &["images", "import", &tar, "--tag", tag]),
    );
    assert!(o.status.success(), "{who:?} {o:?}");
    data
}

fn with_data<'a>(data: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend_from_slice(&["--data-dir", data]);
    v
}

#[test]
fn an_imported_image_is_the_sandboxs_root() {
    let t = tempdir();
    build_image(t.path());
    let data = t.path().join("data");
    let data = data.to_string_lossy().into_owned();
    let tar = t.path().join("image.tar");
    let tar = tar.to_string_lossy().into_owned();

    let o = agentvm(Who::Me, &with_data(&data, &["images", "import", &tar]));
    assert!(o.status.success(), "{o:?}");
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("layer 2/2"),
        "no progress: {o:?}"
    );
    let o = agentvm(Who::Me, &with_data(&data, &["images", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v[0]["digest"], digest.as_str(), "{v}");
    assert_eq!(v[0]["tags"], serde_json::json!(["tiny"]), "{v}");
    let o = agentvm(Who::Me, &with_data(&data, &["images", "show", "tiny"]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("FOO=from-image"),
        "{o:?}"
    );

    // AGENTVM_DATA_DIR finds the same store as --data-dir
    let run = |script: &str, extra: &[&str]| {
        let mut args = vec!["run", "--image", "tiny"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        agentvm_with(Who::Me, &args, &[("AGENTVM_DATA_DIR", &data)], None)
    };
    let o = run("only-in-image", &["--env", "BAR=from-flag"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "only in the image: FOO=from-image BAR=from-flag\n"
    );
    // the image's files, not the host's; the whiteout of layer 2 holds;
    // the sandbox's own /etc/passwd, HOME and /workspace over it
    let o = run(
        "cat /etc/os-release /opt/second-layer; test -e /usr/bin/ls || echo LS-GONE; \
         cat /etc/debian_version 2>&1; test -e /usr/bin/git && echo HOST-GIT; cat /etc/passwd; \
         echo HOME=$HOME; cd /workspace && pwd",
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("ID=agentvm-test-image\nsecond\n"), "{out}");
    assert!(
        out.contains("LS-GONE"),
        "the whiteout did not hide ls: {out}"
    );
    assert!(
        out.contains("root:x:0:0:agent:/home/agent"),
        "not the sandbox's passwd: {out}"
    );
    assert!(
        out.contains("/etc/debian_version: No such file"),
        "the host's /etc shows: {out}"
    );
    assert!(
        !out.contains("HOST-GIT") && !out.contains("image passwd"),
        "{out}"
    );
    assert!(out.contains("HOME=/home/agent\n/workspace\n"), "{out}");
    // the result names the image
    let r = t.path().join("r.json");
    let rs = r.to_string_lossy().into_owned();
    let o = run("true", &["--result-json", &rs]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&r).unwrap_or_default()).unwrap_or_default();
    assert_eq!(v["image"], digest.as_str(), "{v}");
    // a repo over an image: /workspace is the repo's
    let repo = fixture_repo(Who::Me);
    let o = run(
        "echo /workspace/*",
        &["--repo", &repo.path().to_string_lossy()],
    );
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("/workspace/*"),
        "{o:?}"
    );

    // bad names: a clear error, exit 125 (set-up), nothing run
    let o = agentvm_with(
        Who::Me,
        &["run", "--image", "nope", "--", "echo", "RAN"],
        &[("AGENTVM_DATA_DIR", &data)],
        None,
    );
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--image nope: no image nope"),
        "{o:?}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
    let o = agentvm(
        Who::Me,
        &with_data(&data, &["images", "import", "/nonexistent.tar"]),
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an image archive"),
        "{o:?}"
    );

    // doctor names the store and what it holds
    let o = agentvm(Who::Me, &["doctor", "--data-dir", &data]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.contains("images") && l.contains("1 image") && l.contains("tiny")),
        "{out}"
    );
    // which agent CLIs the image provides: a shell, none of the real agents
    let o = agentvm(
        Who::Me,
        &["agents", "--image", "tiny", "--data-dir", &data, "--json"],
    );
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let present = |n: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == n))
            .map(|r| (r["present"].clone(), r["image"].clone()))
    };
    assert_eq!(present("shell"), Some((true.into(), "tiny".into())), "{v}");
    assert_eq!(present("claude").map(|p| p.0), Some(false.into()), "{v}");

    // rm, then gc frees its layers
    let o = agentvm(Who::Me, &with_data(&data, &["images", "rm", "tiny"]));
    assert!(o.status.success(), "{o:?}");
    let o = agentvm(Who::Me, &with_data(&data, &["images", "gc", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v["layers_removed"], 2, "{v}");
    let o = agentvm(Who::Me, &with_data(&data, &["images", "show", "tiny"]));
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// The escape checks once more, as root, with an image as the root.
#[test]
fn the_escape_checks_hold_on_an_image_as_root() {
    if !is_root() {
        skip(
            "the escape checks on an image",
            "run as root (the server's case)",
        );
        return;
    }
    let t = tempdir();
    build_image(t.path());
    let data = t.path().join("data").to_string_lossy().into_owned();
    let tar = t.path().join("image.tar").to_string_lossy().into_owned();
    let o = agentvm(Who::Me, &with_data(&data, &["images", "import", &tar]));
    assert!(o.status.success(), "{o:?}");
    let img: &[&str] = &["--image", "tiny", "--data-dir", &data];
    for (check, arg) in [
        ("status", None),
        ("write-outside", None),
        ("mount", None),
        ("unshare", None),
        ("nested-userns", None),
        ("init", None),
        ("modify_ldt", None),
        ("read", Some("/etc/shadow")),
        ("read", Some("/root")),
    ] {
        let (code, v, all) = probe(Who::Me, img, check, arg);
        assert_eq!(
            v["blocked"], true,
            "{check} {arg:?} on an image: not blocked\n{all}"
        );
        assert_eq!(code, 0, "{check}: exit {code}\n{all}");
    }
}

/// Rootless: an unprivileged user imports into a store of its own and
/// runs on it (the layers are bound from its own descriptors).
#[test]
fn an_unprivileged_user_imports_and_runs_an_image() {
    if !is_root() {
        skip_part("images as uid 65534", "switching to uid 65534 needs root");
    }
    let t = tempdir();
    build_image(t.path());
    let data = t.path().join("data-nobody");
    std::fs::create_dir(&data).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    }
    let data = data.to_string_lossy().into_owned();
    let tar = t.path().join("image.tar").to_string_lossy().into_owned();
    for who in runners().into_iter().rev().take(1) {
        let o = agentvm(who, &with_data(&data, &["images", "import", &tar]));
        assert!(o.status.success(), "{who:?} {o:?}");
        let o = agentvm(
            who,
            &[
                "run",
                "--image",
                "tiny",
                "--data-dir",
                &data,
                "--",
                "only-in-image",
            ],
        );
        assert!(o.status.success(), "{who:?} {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("FOO=from-image"),
            "{who:?} {o:?}"
        );
    }
}

/// The server's jobs and sessions on an image: a job's own `image`, its
/// profile's, a name the store lacks; the job records the digest it was accepted with.
#[test]
fn server_jobs_sessions_and_workspaces_run_on_an_image() {
    use crate::suite::server::Server;
    let t = tempdir();
    build_image(t.path());
    let root = t.path().join("root");
    let repo = fixture_repo(Who::Me);
    let r = root.join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let c = sh(
        t.path(),
        &format!("cp -R {}/. {}", repo.path().display(), r.display()),
    );
    assert!(c.status.success());
    let cfg = t.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        "[agents.tool]\nargv = [\"sh\", \"-c\", \"{prompt}\"]\nimage = \"tiny\"\n",
    )
    .unwrap();
    let root_s = root.to_string_lossy().into_owned();
    let cfg_s = cfg.to_string_lossy().into_owned();
    let s = Server::start(
        &t.path().join("data"),
        &["--allowed-root", &root_s, "--config", &cfg_s],
    );
    let job = |agent: &str, image: Option<&str>| {
        let mut b = serde_json::json!({"agent": agent, "prompt": "only-in-image", "repo_path": r.to_string_lossy(), "timeout": 30});
        if let Some(i) = image {
            b["image"] = i.into();
        }
        s.json("POST", "/v1/jobs", Some(b))
    };
    // the profile names an image the server does not have yet
    let (code, v) = job("tool", None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or("").contains("images import"),
        "{v}"
    );
    // a name the store lacks: a field error
    let (code, v) = job("shell", Some("nope"));
    assert_eq!(code, 422, "{v}");
    assert!(v.to_string().contains("image"), "{v}");

    let data = s.data.to_string_lossy().into_owned();
    let tar = t.path().join("image.tar").to_string_lossy().into_owned();
    let o = agentvm(Who::Me, &["images", "import", &tar, "--data-dir", &data]);
    assert!(o.status.success(), "{o:?}");
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();

    for (agent, image) in [("shell", Some("tiny")), ("tool", None)] {
        let (code, v) = job(agent, image);
        assert_eq!(code, 202, "{v}");
        assert_eq!(v["image"], digest.as_str(), "{v}");
        let id = v["id"].as_str().unwrap_or("").to_string();
        let done = s.wait(&id);
        assert_eq!(done["status"], "succeeded", "{agent}: {done}");
        assert_eq!(done["result"]["image"], digest.as_str(), "{done}");
        let logs = s.text(&format!("/v1/jobs/{id}/logs"));
        assert!(
            logs.contains("only in the image: FOO=from-image"),
            "{agent}: {logs}"
        );
    }
    // a workspace with an image: its jobs run on it, its forks keep it
    let (code, w) = s.json(
        "POST",
        "/v1/workspaces",
        Some(
            serde_json::json!({"name": "wsimg", "repo_path": r.to_string_lossy(), "image": "tiny"}),
        ),
    );
    assert_eq!(code, 201, "{w}");
    assert_eq!(w["image"], digest.as_str(), "{w}");
    let (code, v) = s.json(
        "POST",
        "/v1/jobs",
        Some(serde_json::json!({"agent": "shell", "prompt": "only-in-image > made-on-image", "workspace": "wsimg", "timeout": 30})),
    );
    assert_eq!(
        (code, &v["image"]),
        (202, &serde_json::json!(digest)),
        "{v}"
    );
    let done = s.wait(v["id"].as_str().unwrap_or(""));
    assert_eq!(done["status"], "succeeded", "{done}");
    let (code, c) = s.json(
        "POST",
        "/v1/workspaces/wsimg/checkpoints",
        Some(serde_json::json!({"name": "c1"})),
    );
    assert_eq!(code, 201, "{c}");
    let (code, f) = s.json(
        "POST",
        "/v1/workspaces",
        Some(serde_json::json!({"name": "wsfork", "from_checkpoint": c["id"]})),
    );
    assert_eq!(
        (code, &f["image"]),
        (201, &serde_json::json!(digest)),
        "{f}"
    );
    let (code, v) = s.json(
        "POST",
        "/v1/workspaces",
        Some(
            serde_json::json!({"name": "wsbad", "repo_path": r.to_string_lossy(), "image": "nope"}),
        ),
    );
    assert_eq!(code, 422, "{v}");
    // a session on it (its profile's image, or its own)
    let (code, v) = s.json(
        "POST",
        "/v1/sessions",
        Some(serde_json::json!({"name": "img", "command": ["sh", "-c", "only-in-image"], "image": "tiny"})),
    );
    assert_eq!(code, 201, "{v}");
    let sid = v["id"].as_str().unwrap_or("").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let (_, v) = s.json("GET", &format!("/v1/sessions/{sid}"), None);
        if v["status"] != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cast = s.text(&format!("/v1/sessions/{sid}/recording"));
    assert!(cast.contains("only in the image: FOO=from-image"), "{cast}");
    let (code, v) = s.json(
        "POST",
        "/v1/sessions",
        Some(serde_json::json!({"name": "img2", "command": ["true"], "image": "nope"})),
    );
    assert_eq!(code, 422, "{v}");
    // without one: the host's system, where the program is not
    let (code, v) = job("shell", None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["image"], serde_json::Value::Null, "{v}");
    let done = s.wait(v["id"].as_str().unwrap_or(""));
    assert_eq!(done["status"], "failed", "{done}");
}

/// `images build --debian` with the real mmdebstrap, from the mirror the
/// host's apt uses (the one the suite's own packages come from): a
/// minbase of the host's suite plus jq, run on, then the same build again
/// from the cache.
#[test]
fn a_debian_image_is_built_from_debians_packages_and_cached() {
    if !is_root() {
        skip(
            "images build --debian with the real mmdebstrap",
            "run as root (mmdebstrap's unprivileged mode needs subordinate ids)",
        );
        return;
    }
    if !sh(Path::new("/"), "command -v mmdebstrap").status.success() {
        skip(
            "images build --debian with the real mmdebstrap",
            "apt-get install mmdebstrap (scripts/install-test-tools.sh does)",
        );
        return;
    }
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let suite = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .unwrap_or("bookworm")
        .trim_matches('"')
        .to_string();
    // the mirror apt uses must answer (it does wherever apt-get works)
    let mirror =
        agentvm_image::host_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let release = format!("{}/dists/{suite}/Release", mirror.trim_end_matches('/'));
    let answers = sh(
        Path::new("/"),
        &format!("curl -fsS --max-time 20 -o /dev/null '{release}'"),
    );
    if !answers.status.success() {
        skip(
            "images build --debian with the real mmdebstrap",
            &format!("the Debian mirror did not answer ({release}); run where apt-get reaches it"),
        );
        return;
    }
    let t = tempdir();
    let data = t.path().join("data").to_string_lossy().into_owned();
    let build = [
        "images",
        "build",
        "--debian",
        &suite,
        "--packages",
        "jq",
        "debtools",
    ];
    let o = agentvm(Who::Me, &with_data(&data, &build));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{o:?}");
    assert!(err.contains("mmdebstrap: I:"), "no progress: {err}");
    assert!(err.contains("agentvm: built debtools"), "{err}");
    let o = agentvm(
        Who::Me,
        &[
                "run",
                "--image",
                "debtools",
                "--data-dir",
                &data,
                "--",
                "sh",
                "-c",
                "jq --version; cat /etc/debian_version; command -v git || echo NO-GIT; echo '{\"a\":7}' | jq .a",
            ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.starts_with("jq-"), "{out}");
    assert!(out.contains("NO-GIT\n7\n"), "minbase plus jq only: {out}");
    let o = agentvm(Who::Me, &with_data(&data, &["images", "show", "debtools"]));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains(&format!("built:   debian {suite} minbase +jq")),
        "{o:?}"
    );
    // the same build again, under another name: from the cache
    let mut again = build;
    again[6] = "debtools2";
    let o = agentvm(Who::Me, &with_data(&data, &again));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{o:?}");
    assert!(
        err.contains("agentvm: cached debtools, debtools2 (1 layers"),
        "{err}"
    );
    assert!(!err.contains("mmdebstrap: I:"), "ran again: {err}");
    // a package Debian lacks: mmdebstrap's own words, nothing stored
    let o = agentvm(
        Who::Me,
        &with_data(
            &data,
            &[
                "images",
                "build",
                "--debian",
                &suite,
                "--packages",
                "no-such-package-agentvm",
                "bad",
            ],
        ),
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mmdebstrap failed"),
        "{o:?}"
    );
    let o = agentvm(Who::Me, &with_data(&data, &["images", "show", "bad"]));
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// A registry on loopback (crates/cli/tests/registry.py) serving the
/// test image's layout behind a Bearer token service that wants Basic
/// credentials; stopped when dropped.
struct TestRegistry {
    child: std::process::Child,
    port: u16,
}

impl TestRegistry {
    fn start(layout: &Path, user: &str, password: &str) -> TestRegistry {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/registry.py");
        let port_file = layout.with_extension("port");
        let child = std::process::Command::new("python3")
            .arg(script)
            .arg(layout)
            .arg(&port_file)
            .args([user, password])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = None;
        for _ in 0..200 {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                port = p.trim().parse().ok();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let port = port.unwrap_or_else(|| panic!("the test registry did not start"));
        TestRegistry { child, port }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_image_is_pulled_from_a_registry_with_its_digests_checked() {
    let t = tempdir();
    build_image(t.path());
    let password = "pw-7d1c0ffee-secret";
    let reg = TestRegistry::start(&t.path().join("layout"), "tester", password);
    let data = t.path().join("data").to_string_lossy().into_owned();
    let host = format!("127.0.0.1:{}", reg.port);
    let auth = t.path().join("auth.json");
    let b64 = base64_of(&format!("tester:{password}"));
    std::fs::write(
        &auth,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{b64}"}}}}}}"#),
    )
    .unwrap();
    let auth = auth.to_string_lossy().into_owned();
    let pull = |extra: &[&str]| {
        let mut a = vec!["images", "pull", "--plain-http"];
        a.extend_from_slice(extra);
        agentvm_with(
            Who::Me,
            &with_data(&data, &a),
            &[("REGISTRY_AUTH_FILE", ""), ("HOME", "/nonexistent")],
            None,
        )
    };
    let reference = format!("{host}/team/tiny:tiny");
    let o = pull(&["--auth-file", &auth, &reference]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{o:?}");
    assert!(!err.contains(password), "the password was printed: {err}");
    assert!(err.contains("layer 2/2"), "no progress: {err}");
    assert!(err.contains("pin it with"), "{err}");
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = agentvm(
        Who::Me,
        &[
            "run",
            "--image",
            &reference,
            "--data-dir",
            &data,
            "--",
            "only-in-image",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("FOO=from-image"),
        "{o:?}"
    );

    // pinned: the same digest; its layers are not fetched again
    let pinned = format!("{host}/team/tiny@{digest}");
    let o = pull(&["--auth-file", &auth, "--tag", "pinned", &pinned]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest);
    assert!(err.contains("already in the store"), "{err}");
    // a digest the registry lacks; a registry that answers a pin with
    // another manifest
    let zeros = "0".repeat(64);
    let o = pull(&[
        "--auth-file",
        &auth,
        "--tag",
        "wrong",
        &format!("{host}/team/tiny@sha256:{zeros}"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"), "{o:?}");
    let wrong = format!("{host}/lying/tiny@sha256:{zeros}");
    let o = pull(&["--auth-file", &auth, "--tag", "wrong", &wrong]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("digest mismatch"),
        "{o:?}"
    );
    // layers changed on the way, into a store that lacks them
    let other = t.path().join("data2").to_string_lossy().into_owned();
    let pull_into = |data: &str, r: &str| {
        agentvm(
            Who::Me,
            &[
                "images",
                "pull",
                "--plain-http",
                "--auth-file",
                &auth,
                "--data-dir",
                data,
                r,
            ],
        )
    };
    let o = pull_into(&other, &format!("{host}/tampered/tiny:tiny"));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("arrived as"),
        "{o:?}"
    );
    // layers that claim more than the image may hold: refused before a
    // byte of them is fetched
    let o = pull_into(&other, &format!("{host}/huge/tiny:tiny"));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("past the image's limit"), "{err}");
    assert!(!err.contains("layer 1/"), "fetched before refusing: {err}");
    let o = agentvm(Who::Me, &["images", "list", "--json", "--data-dir", &other]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]", "{o:?}");
    // without credentials, and with wrong ones: said, and never echoed
    let o = pull(&["--tag", "x", &reference]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--auth-file"),
        "{o:?}"
    );
    let bad = t.path().join("bad.json");
    let b64 = base64_of("tester:not-the-password-9f");
    std::fs::write(
        &bad,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{b64}"}}}}}}"#),
    )
    .unwrap();
    let o = pull(&[
        "--auth-file",
        &bad.to_string_lossy(),
        "--tag",
        "x",
        &reference,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("not-the-password-9f"), "{err}");
    let o = agentvm(Who::Me, &with_data(&data, &["images", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "{v}");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// An image whose config names a `User`: the command runs as that user
/// inside the sandbox's user namespace (resolved from the image's own
/// passwd), with no capability, still writing /workspace and HOME, still
/// unable to mount or unshare; as root and as uid 65534.
#[test]
fn an_images_user_runs_the_command_inside_the_user_namespace() {
    let t = tempdir();
    build_image_with(t.path(), &[("IMAGE_USER", "builder")]);
    for who in runners() {
        let data = import_as(who, t.path(), "as-builder");
        let repo = fixture_repo(who);
        let out = out_dir(who);
        let patch = out
            .path()
            .join("changes.patch")
            .to_string_lossy()
            .into_owned();
        let o = agentvm(
            who,
            &[
                "run", "--image", "as-builder", "--data-dir", &data,
                "--repo", &repo.path().to_string_lossy(), "--patch-out", &patch, "--",
                "sh", "-c",
                "while read k v rest; do case $k in Uid:|Gid:|CapEff:) echo $k $v;; esac; done < /proc/self/status; \
                 echo USER=$USER; while IFS=: read n x u g rest; do [ $n = builder ] && echo PW=$u:$g; done < /etc/passwd; \
                 echo made > /workspace/by-builder && echo WROTE; echo h > $HOME/h && echo HOME-OK",
            ],
        );
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{who:?} {o:?}");
        assert_eq!(
            s,
            "Uid: 1234\nGid: 1300\nCapEff: 0000000000000000\nUSER=builder\nPW=1234:1300\nWROTE\nHOME-OK\n",
            "{who:?}"
        );
        let p = std::fs::read_to_string(&patch).unwrap_or_default();
        assert!(
            p.contains("+++ b/by-builder"),
            "the user's write is not in the patch: {p}"
        );
        let img: &[&str] = &["--image", "as-builder", "--data-dir", &data];
        for (check, arg) in [
            ("mount", None),
            ("unshare", None),
            ("nested-userns", None),
            ("write-outside", None),
        ] {
            let (code, v, all) = probe(who, img, check, arg);
            assert_eq!(
                v["blocked"], true,
                "{who:?} {check} as the image's user: not blocked\n{all}"
            );
            assert_eq!(code, 0, "{who:?} {check}: exit {code}\n{all}");
        }
    }
}

/// `--image-entrypoint`: the image's Entrypoint and Cmd (a COMMAND
/// replaces the Cmd), in its WorkingDir; without it neither is used.
#[test]
fn the_images_entrypoint_runs_only_when_asked() {
    let t = tempdir();
    let extra = r#","WorkingDir":"/opt","Entrypoint":["/bin/sh","-c"],"Cmd":["echo from-cmd; pwd; echo PWD=$PWD"]"#;
    build_image_with(t.path(), &[("IMAGE_CONFIG_EXTRA", extra)]);
    let data = t.path().join("data").to_string_lossy().into_owned();
    let tar = t.path().join("image.tar").to_string_lossy().into_owned();
    let o = agentvm(
        Who::Me,
        &with_data(&data, &["images", "import", &tar, "--tag", "ep"]),
    );
    assert!(o.status.success(), "{o:?}");
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "--image", "ep", "--data-dir", &data];
        a.extend_from_slice(extra);
        agentvm(Who::Me, &a)
    };
    let o = run(&["--image-entrypoint"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "from-cmd\n/opt\nPWD=/opt\n"
    );
    let o = run(&["--image-entrypoint", "--", "echo replaced; pwd"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "replaced\n/opt\n",
        "{o:?}"
    );
    // not asked: the command given, in /workspace
    let o = run(&["--", "sh", "-c", "pwd"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "/workspace\n", "{o:?}");
    // an image with neither: said
    let plain = tempdir();
    build_image(plain.path());
    let tar = plain
        .path()
        .join("image.tar")
        .to_string_lossy()
        .into_owned();
    let o = agentvm(
        Who::Me,
        &with_data(&data, &["images", "import", &tar, "--tag", "plain"]),
    );
    assert!(o.status.success(), "{o:?}");
    let o = agentvm(
        Who::Me,
        &[
            "run",
            "--image",
            "plain",
            "--data-dir",
            &data,
            "--image-entrypoint",
        ],
    );
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("neither Entrypoint nor Cmd"),
        "{o:?}"
    );
}

/// An image whose /etc is a symlink to a host directory (`/oldroot/...`,
/// the host's root as the sandbox's setup sees it, or `../oldroot/...`):
/// the sandbox must show its own /etc files only, never what the link
/// names. Found by review: the /etc overlay once took the image's etc by
/// a path the kernel resolved through the symlink.
#[test]
fn an_images_etc_symlink_does_not_reach_the_host() {
    let t = tempdir();
    // what an attacker wants to read: a host directory with a secret
    let secret = t.path().join("host-secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("stolen"), "HOST-SECRET-7f3a\n").unwrap();
    sh(
        t.path(),
        "chmod 755 . host-secret; chmod 644 host-secret/stolen",
    );
    for (n, link) in [
        format!("/oldroot{}", secret.display()),
        format!("../oldroot{}", secret.display()),
    ]
    .iter()
    .enumerate()
    {
        let dir = t.path().join(format!("img{n}"));
        std::fs::create_dir(&dir).unwrap();
        build_image_with(&dir, &[("ETC_LINK", link)]);
        for who in runners() {
            let data = import_as(who, &dir, "evil");
            // first: this runs inside a sandbox (its namespaces are not ours)
            let (code, v, all) = probe(
                who,
                &["--image", "evil", "--data-dir", &data],
                "status",
                None,
            );
            assert_eq!(
                (code, v["blocked"].clone()),
                (0, serde_json::json!(true)),
                "{all}"
            );
            let o = agentvm(
                who,
                &[
                    "run",
                    "--image",
                    "evil",
                    "--data-dir",
                    &data,
                    "--",
                    "sh",
                    "-c",
                    "cat /etc/stolen 2>&1; cat /etc/hostname",
                ],
            );
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                !out.contains("HOST-SECRET"),
                "{who:?} {link}: the host directory showed as /etc: {out}"
            );
            assert!(
                out.contains("agentvm"),
                "{who:?} {link}: the sandbox's own /etc is missing: {o:?}"
            );
        }
    }
}
