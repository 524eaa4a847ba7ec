//! The command line: bad input, exit codes, pass-through of stdio.

use crate::common::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exit_codes_follow_the_command() {
    for who in runners() {
        assert_eq!(
            agentvm(who, &["run", "--", "sh", "-c", "exit 7"])
                .status
                .code(),
            Some(7)
        );
        assert_eq!(agentvm(who, &["run", "--", "true"]).status.code(), Some(0));
        assert_eq!(
            agentvm(who, &["run", "--", "sh", "-c", "kill -TERM $$"])
                .status
                .code(),
            Some(143)
        );
        assert_eq!(
            agentvm(who, &["run", "--", "sh", "-c", "kill -KILL $$"])
                .status
                .code(),
            Some(137)
        );
    }
}

/// What the server hands the runner: one typed request as JSON. A request
/// the runner cannot trust is refused before anything runs, with a clear
/// message and exit 125; a good one runs exactly like `agentvm run`.
#[test]
fn the_runner_takes_one_typed_request() {
    let repo = fixture_repo(Who::Me);
    let dir = tempdir();
    let slim = bin_dir().join("agentvm-run");
    let go = |req: &str| run_request(dir.path(), req);
    let patch = dir.path().join("patch");
    let result = dir.path().join("result.json");
    let good = serde_json::json!({
        "command": ["sh", "-c", "echo $GREETING; echo x >> a.txt; exit 3"],
        "repo": {"path": repo.path()},
        "patch_out": patch,
        "result_json": result,
        "env": [["GREETING", "hello"]],
        "limits": {"timeout_ms": 30000},
    });
    let o = go(&good.to_string());
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    assert!(std::fs::read_to_string(&patch).unwrap().contains("+x\n"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    assert_eq!(r["status"], "exited");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["timeout_ms"], 30000);
    assert_eq!(r["changed_files"], serde_json::json!(["a.txt"]));
    for (bad, says) in [
        ("{not json", "the request"),
        (r#"{"command": []}"#, "no command"),
        (
            r#"{"command": ["true"], "network": "allow:"}"#,
            "allowlist is empty",
        ),
        (
            r#"{"command": ["true"], "network": "bridge"}"#,
            "invalid network mode",
        ),
        (r#"{"command": ["true"], "repo": {"fd": 1}}"#, "repo fd 1"),
        (r#"{"command": ["true"], "limits": {"pids": 0}}"#, "pids 0"),
        (
            r#"{"command": ["true"], "env": [["1A", "x"]]}"#,
            "invalid variable name",
        ),
    ] {
        let o = go(bad);
        assert_eq!(o.status.code(), Some(125), "{bad}: {o:?}");
        assert!(stderr(&o).contains(says), "{bad}: {}", stderr(&o));
    }
    let o = std::process::Command::new(&slim)
        .args(["run-request", "/nonexistent/request.json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(stderr(&o).contains("reading the request"), "{}", stderr(&o));
}

/// A runner started for a parent that is already gone when it arms its
/// death signal (the server died in between) exits without running
/// anything; started by the parent the request names, it runs.
#[test]
fn a_runner_whose_parent_is_gone_runs_nothing() {
    let dir = tempdir();
    let result = dir.path().join("result.json");
    let go = |parent: u32| {
        let req = serde_json::json!({
            "command": ["sh", "-c", "echo ran"],
            "result_json": result,
            "die_with_parent": true,
            "parent_pid": parent,
        });
        run_request(dir.path(), &req.to_string())
    };
    // pid 1 is not the parent: as if the server had died and the runner
    // been handed to init
    let o = go(1);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(stderr(&o).contains("is gone"), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ran"), "{o:?}");
    let o = go(std::process::id());
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ran\n");
}

#[test]
fn the_slim_runner_is_agentvm_run() {
    let slim = bin_dir().join("agentvm-run");
    let code = |args: &[&str]| {
        std::process::Command::new(&slim)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let o = code(&["run", "--", "sh", "-c", "echo inside; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "inside\n");
    assert_eq!(
        code(&["run", "--bogus", "--", "true"]).status.code(),
        Some(125)
    );
    assert_eq!(
        code(&["serve"]).status.code(),
        Some(2),
        "it runs sandboxes only"
    );
    let v = code(&["--version"]);
    assert_eq!(v.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("agentvm-run "));
}

#[test]
fn missing_and_unexecutable_commands() {
    for who in runners() {
        let o = agentvm(who, &["run", "--", "definitely-not-a-command"]);
        assert_eq!(o.status.code(), Some(127), "{o:?}");
        assert!(
            stderr(&o).contains("definitely-not-a-command: command not found"),
            "{o:?}"
        );
        let o = agentvm(who, &["run", "--", "/etc/hostname"]);
        assert_eq!(o.status.code(), Some(126), "{o:?}");
        let o = agentvm(who, &["run", "--", "/no/such/path"]);
        assert_eq!(o.status.code(), Some(127), "{o:?}");
    }
}

#[test]
fn bad_input_is_a_clear_125() {
    let file = tempdir();
    let f = file.path().join("plain");
    std::fs::write(&f, "x").unwrap();
    let fs = f.to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--repo", "/no/such/dir", "--", "true"],
            "--repo /no/such/dir",
        ),
        (vec!["run", "--repo", &fs, "--", "true"], "not a directory"),
        (
            vec!["run", "--frobnicate", "--", "true"],
            "unexpected argument '--frobnicate'",
        ),
        (vec!["run", "--memory", "12Q", "--", "true"], "unknown unit"),
        (
            vec!["run", "--memory", "lots", "--", "true"],
            "invalid size",
        ),
        (
            vec!["run", "--timeout", "soon", "--", "true"],
            "invalid duration",
        ),
        (vec!["run", "--timeout", "0s", "--", "true"], "more than 0"),
        (vec!["run", "--pids", "0", "--", "true"], "--pids"),
        (
            vec!["run", "--cpus", "zero", "--", "true"],
            "invalid CPU list",
        ),
        (
            vec!["run", "--network", "bridge", "--", "true"],
            "invalid network mode",
        ),
        (
            vec!["run", "--env", "NOEQ", "--", "true"],
            "expected KEY=VALUE",
        ),
        (
            vec!["run", "--env-pass", "AGENTVM_SURELY_UNSET", "--", "true"],
            "not set in this environment",
        ),
        (
            vec!["run", "--ro-bind", "/usr:/workspace", "--", "true"],
            "belongs to the sandbox",
        ),
        (
            vec!["run", "--ro-bind", "/no/such/src", "--", "true"],
            "--ro-bind",
        ),
        (
            vec!["run", "--no-cgroup", "--memory", "64M", "--", "true"],
            "--no-cgroup cannot enforce",
        ),
        (
            vec!["run", "--patch-out", "/no/such/dir/p", "--", "true"],
            "--patch-out",
        ),
        (vec!["run"], "COMMAND"),
    ];
    for (args, msg) in cases {
        let o = agentvm(Who::Me, &args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {o:?}");
        assert!(
            stderr(&o).contains(msg),
            "{args:?}: stderr lacks {msg:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn cpus_outside_the_machine_name_the_cgroup_layer() {
    for who in runners() {
        let o = agentvm(who, &["run", "--cpus", "4000", "--", "true"]);
        assert_eq!(o.status.code(), Some(125), "{who:?} {o:?}");
        assert!(stderr(&o).contains("cgroup:"), "{who:?} {}", stderr(&o));
    }
}

#[test]
fn rootless_without_delegation_names_the_cgroup_layer() {
    if !is_root() {
        skip(
            "a rootless run without a delegated cgroup naming the cgroup layer",
            "switching to uid 65534 needs root",
        );
        return;
    }
    // no AGENTVM_CGROUP_PARENT: nobody cannot create cgroups on this host
    let o = command_as(Who::Nobody, &agentvm_path())
        .args(["run", "--memory", "64M", "--", "true"])
        .env_remove("AGENTVM_CGROUP_PARENT")
        .current_dir(bin_dir())
        .output()
        .unwrap();
    if o.status.code() == Some(0) {
        // this host delegates cgroups to everyone (a cgroup v2 user session)
        skip(
            "a rootless run without a delegated cgroup naming the cgroup layer",
            "this host lets every user create cgroups, so the refusal cannot be shown",
        );
        return;
    }
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let e = stderr(&o);
    assert!(e.contains("cgroup:") && e.contains("--no-cgroup"), "{e}");
}

#[test]
fn stdio_passes_through() {
    for who in runners() {
        let o = agentvm_with(
            who,
            &["run", "--", "sh", "-c", "tr a-z A-Z; echo err >&2"],
            &[],
            Some(b"hello\n"),
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), "HELLO\n");
        assert!(stderr(&o).contains("err"));
    }
}

#[test]
fn limits_are_applied() {
    for who in runners() {
        let o = agentvm(
            who,
            &[
                "run",
                "--cpus",
                "0",
                "--cpu-quota",
                "0.5",
                "--memory",
                "100M",
                "--pids",
                "50",
                "--",
                "sh",
                "-c",
                "grep Cpus_allowed_list /proc/self/status",
            ],
        );
        assert!(o.status.success(), "{who:?} {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Cpus_allowed_list:\t0\n"),
            "{who:?} {o:?}"
        );
    }
}

/// The CPU time a run used, counted by its cgroup: a busy loop's is most
/// of its wall time, a sleep's next to nothing.
#[test]
fn the_result_counts_the_cpu_time_the_cgroup_saw() {
    if !is_root() {
        skip(
            "the CPU time in the result",
            "a cgroup of its own needs root here",
        );
        return;
    }
    let d = tempdir();
    let j = d.path().join("r.json");
    let js = j.to_string_lossy().into_owned();
    let cpu = |script: &str| -> serde_json::Value {
        let o = agentvm(
            Who::Me,
            &[
                "run",
                "--memory",
                "200M",
                "--result-json",
                &js,
                "--",
                "sh",
                "-c",
                script,
            ],
        );
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice(&std::fs::read(&j).unwrap_or_default()).unwrap_or_default()
    };
    // spins (in sh and in the date processes it starts) for 400 ms of wall time
    let busy =
        cpu("end=$(($(date +%s%N) + 400000000)); while [ $(date +%s%N) -lt $end ]; do :; done");
    let idle = cpu("sleep 0.4");
    let (b, i) = (busy["cpu_ms"].as_u64(), idle["cpu_ms"].as_u64());
    assert!(b.is_some_and(|b| b >= 100), "busy: {busy}");
    assert!(
        b <= busy["duration_ms"].as_u64().map(|d| 2 * d + 50),
        "more CPU than 2 cores could give: {busy}"
    );
    assert!(i.is_some_and(|i| i < 100), "idle: {idle}");
}

#[test]
fn cgroups_left_by_killed_supervisors_are_swept() {
    if !is_root() {
        skip(
            "the sweep of cgroups left by killed supervisors",
            "making a cgroup parent needs root",
        );
        return;
    }
    let base = std::path::Path::new("/sys/fs/cgroup/memory");
    if !base.join("cgroup.procs").exists() {
        skip(
            "the sweep of cgroups left by killed supervisors",
            "needs a cgroup v1 memory hierarchy (this host has none)",
        );
        return;
    }
    let parent = format!("agentvm-test-sweep-{}", std::process::id());
    let dir = base.join(&parent);
    std::fs::create_dir(&dir).unwrap();
    // a pid that is certainly gone: a child we have reaped
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let dead = c.id();
    let _ = c.wait();
    let me = std::process::id();
    let stale = dir.join(format!("agentvm-{dead}-1"));
    let fresh = dir.join(format!("agentvm-{dead}-2"));
    let live = dir.join(format!("agentvm-{me}-3"));
    let other = dir.join("not-ours");
    for d in [&stale, &fresh, &live, &other] {
        std::fs::create_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    for d in [&stale, &live, &other] {
        let o = sh(
            dir.as_path(),
            &format!("touch -d '10 minutes ago' {}", d.display()),
        );
        assert!(o.status.success(), "{o:?}");
    }
    let o = agentvm(
        Who::Me,
        &[
            "run",
            "--cgroup-parent",
            &parent,
            "--memory",
            "64M",
            "--",
            "true",
        ],
    );
    let left: Vec<bool> = [&stale, &fresh, &live, &other]
        .iter()
        .map(|d| d.exists())
        .collect();
    for d in [&stale, &fresh, &live, &other] {
        let _ = std::fs::remove_dir(d);
    }
    let _ = std::fs::remove_dir(&dir);
    assert!(o.status.success(), "{o:?}");
    // only the old one whose owner is gone went; the run's own is gone too
    assert_eq!(left, [false, true, true, true]);
}

#[test]
fn opt_outs_and_host_network_are_loud() {
    let o = agentvm(
        Who::Me,
        &["run", "--no-seccomp", "--network", "host", "--", "true"],
    );
    assert!(o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("WARNING: the seccomp layer is switched off"),
        "{e}"
    );
    assert!(e.contains("WARNING: --network host"), "{e}");
}

#[test]
fn result_json_describes_the_run() {
    let d = tempdir();
    let j = d.path().join("r.json");
    let js = j.to_string_lossy().into_owned();
    let o = agentvm(
        Who::Me,
        &[
            "run",
            "--result-json",
            &js,
            "--timeout",
            "30s",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&j).unwrap_or_default()).unwrap_or_default();
    assert_eq!(v["status"], "exited");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["signal"], serde_json::Value::Null);
    assert_eq!(v["timeout_ms"], 30000);
    assert!(v["duration_ms"].is_u64());
    assert!(v["changed_files"].is_array());
    assert!(v["landlock_abi"].as_u64().unwrap_or(0) > 0);
    // no limit was asked for: no cgroup, and the result says so
    assert_eq!(v["layers_disabled"], serde_json::json!(["cgroup"]), "{v}");
    assert_eq!(v["memory_limit_bytes"], serde_json::Value::Null);
    // a run that never started still gets a result
    let o = agentvm(Who::Me, &["run", "--result-json", &js, "--", "no-such-cmd"]);
    assert_eq!(o.status.code(), Some(127));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&j).unwrap_or_default()).unwrap_or_default();
    assert_eq!(v["status"], "error");
    assert_eq!(v["exit_code"], 127);
}

#[test]
fn doctor_reports_every_layer() {
    let o = agentvm(Who::Me, &["doctor", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(
        v["default_limits"]
            .as_str()
            .unwrap_or("")
            .starts_with("none"),
        "{v}"
    );
    let layers: Vec<&str> = v["checks"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["layer"].as_str()).collect())
        .unwrap_or_default();
    for l in [
        "user namespace",
        "overlayfs",
        "seccomp",
        "landlock",
        "cgroup",
        "freezer",
        "sandbox",
    ] {
        assert!(layers.contains(&l), "{l} missing: {layers:?}");
    }
    assert_eq!(v["sandbox_ok"], true);
}

#[test]
fn a_terminal_on_stdin_stays_usable() {
    // script(1) gives agentvm a real pseudo-terminal on stdin and stdout.
    let inner = format!(
        "{} run -- sh -c 'test -t 0 && test -t 1 && echo TTY-OK; read x; echo got:$x'",
        agentvm_path().display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("script(1) from util-linux: {e}"));
    {
        use std::io::Write;
        let mut s = child.stdin.take().unwrap_or_else(|| panic!("stdin"));
        s.write_all(b"typed-line\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(s.contains("TTY-OK"), "{s}");
    assert!(s.contains("got:typed-line"), "{s}");
}

/// Whatever the command does to the terminal (raw mode, no echo), the
/// caller's settings are back when agentvm returns.
#[test]
fn the_callers_terminal_settings_are_restored() {
    let inner = format!(
        "stty -g; {} run -- sh -c 'stty raw -echo -icanon'; stty -g",
        agentvm_path().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("script(1) from util-linux: {e}"));
    let s = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = s.lines().filter(|l| l.contains(':')).collect();
    assert_eq!(lines.len(), 2, "{s}");
    assert_eq!(lines[0], lines[1], "the terminal was left changed:\n{s}");
}

#[test]
fn ro_bind_of_a_directory_and_a_file() {
    for who in runners() {
        let d = tempdir();
        std::fs::create_dir_all(d.path().join("tool/bin")).unwrap();
        std::fs::write(
            d.path().join("tool/bin/hello"),
            "#!/bin/sh\necho tool-ran\n",
        )
        .unwrap();
        let _ = sh(d.path(), "chmod -R a+rX tool && chmod +x tool/bin/hello");
        let src = d.path().join("tool").to_string_lossy().into_owned();
        let bind_same = src.clone();
        let o = agentvm(
            who,
            &[
                "run",
                "--ro-bind",
                &bind_same,
                "--",
                "sh",
                "-c",
                &format!("{src}/bin/hello; touch {src}/x 2>/dev/null && echo WROTE"),
            ],
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("tool-ran"), "{who:?}: {o:?}");
        assert!(
            !out.contains("WROTE"),
            "{who:?}: a read-only bind was writable"
        );
        let o = agentvm(
            who,
            &[
                "run",
                "--ro-bind",
                &format!("{src}:/tools/t"),
                "--",
                "/tools/t/bin/hello",
            ],
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("tool-ran"),
            "{who:?}: {o:?}"
        );
    }
}

#[test]
fn agents_lists_profiles_and_what_the_sandbox_can_see() {
    let d = tempdir();
    let cfg = d.path().join("agentvm.toml");
    std::fs::write(
        &cfg,
        "[agents.missing]\nargv = [\"/nonexistent/agent-cli\", \"{prompt}\"]\n",
    )
    .unwrap();
    let o = agentvm(
        Who::Me,
        &["agents", "--json", "--config", cfg.to_str().unwrap_or("")],
    );
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let rows = v.as_array().cloned().unwrap_or_default();
    let find = |n: &str| {
        rows.iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or_default()
    };
    for n in ["aider", "opencode", "claude", "codex", "shell", "missing"] {
        assert!(find(n).is_object(), "{n} missing from {v}");
    }
    assert_eq!(find("shell")["present"], true, "sh is in every sandbox");
    assert_eq!(find("missing")["present"], false);
    // the real CLIs, where the installer put them, told where they are: the
    // sandbox sees each and reports its version
    let installed = [
        ("aider", "/opt/agentvm-agents/aider", "bin/aider", "0.86.2"),
        (
            "claude",
            "/opt/agentvm-agents/claude",
            "node_modules/.bin/claude",
            "2.1.197",
        ),
        (
            "codex",
            "/opt/agentvm-agents/codex",
            "node_modules/.bin/codex",
            "0.169.0",
        ),
        (
            "opencode",
            "/opt/agentvm-agents/opencode",
            "node_modules/.bin/opencode",
            "1.18.33",
        ),
    ];
    let mut text = String::new();
    for (name, dir, bin, _) in installed {
        if std::path::Path::new(dir).join(bin).exists() {
            text +=
                &format!("[agents.{name}]\ncommand = \"{dir}/{bin}\"\nro_binds = [\"{dir}\"]\n");
        } else {
            skip_part(
                &format!("agentvm agents reporting {name} from {dir}"),
                "scripts/install-test-tools.sh installs it",
            );
        }
    }
    std::fs::write(&cfg, &text).unwrap();
    let o = agentvm(
        Who::Me,
        &["agents", "--json", "--config", cfg.to_str().unwrap_or("")],
    );
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    for (name, dir, bin, version) in installed {
        if !std::path::Path::new(dir).join(bin).exists() {
            continue;
        }
        let row = agent_row(&v, name);
        assert_eq!(row["present"], true, "{row}");
        assert!(
            row["version"].as_str().unwrap_or("").contains(version),
            "{row}"
        );
    }
    // with no config at all: found where the docs and the installer put
    // them (the built-in profiles' search paths)
    let o = agentvm(Who::Me, &["agents", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    for (name, dir, bin, version) in installed {
        let path = format!("{dir}/{bin}");
        if !std::path::Path::new(&path).exists() {
            continue;
        }
        let row = agent_row(&v, name);
        assert_eq!(row["command"], path, "{row}");
        assert_eq!(row["present"], true, "{row}");
        assert!(
            row["version"].as_str().unwrap_or("").contains(version),
            "{row}"
        );
    }
}

/// The row of `agentvm agents --json` for the agent `name` (null if none).
fn agent_row(v: &serde_json::Value, name: &str) -> serde_json::Value {
    v.as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or_default()
}

/// `agentvm-run run-request FILE` with `req` written to FILE in `dir`.
pub fn run_request(dir: &std::path::Path, req: &str) -> std::process::Output {
    let f = dir.join("request.json");
    std::fs::write(&f, req).unwrap();
    std::process::Command::new(bin_dir().join("agentvm-run"))
        .arg("run-request")
        .arg(&f)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}
