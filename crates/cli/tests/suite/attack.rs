//! Escape attempts: each runs the probe inside `agentvm run` and asserts the
//! attempt failed and the host is unchanged.

use std::path::Path;

use crate::common::*;

#[test]
fn no_capabilities_no_new_privs_seccomp_on() {
    assert_blocked(&[], "status", None);
}

#[test]
fn cannot_write_outside_workspace_and_tmp() {
    let before: Vec<bool> = [
        "/probe-file",
        "/usr/probe-file",
        "/etc/probe-file",
        "/home/probe-file",
        "/opt/probe-file",
    ]
    .iter()
    .map(|p| Path::new(p).exists())
    .collect();
    assert_blocked(&[], "write-outside", None);
    let after: Vec<bool> = [
        "/probe-file",
        "/usr/probe-file",
        "/etc/probe-file",
        "/home/probe-file",
        "/opt/probe-file",
    ]
    .iter()
    .map(|p| Path::new(p).exists())
    .collect();
    assert_eq!(before, after, "a probe file appeared on the host");
}

#[test]
fn host_secrets_are_not_visible() {
    // Plant secrets where a careless sandbox would show them.
    let tag = format!("{}-{}", std::process::id(), line!());
    let secrets = [
        format!("/root/agentvm-secret-{tag}"),
        format!("/tmp/agentvm-secret-{tag}"),
    ];
    if !is_root() {
        skip_part(
            "host_secrets_are_not_visible for /root",
            "planting a file in /root needs root",
        );
    }
    for s in &secrets {
        if s.starts_with("/root") && !is_root() {
            continue;
        }
        std::fs::write(s, "TOP-SECRET").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    for s in &secrets {
        if Path::new(s).exists() {
            assert_blocked(&[], "read", Some(s));
        }
    }
    for p in [
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/ssh/ssh_host_rsa_key",
        "/etc/sudoers",
    ] {
        assert_blocked(&[], "read", Some(p));
    }
    for s in &secrets {
        let _ = std::fs::remove_file(s);
    }
}

#[test]
fn cannot_reach_host_loopback() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    l.set_nonblocking(true).unwrap();
    assert_blocked(&[], "connect", Some(&port));
    // The same probe does connect with the host's network: the check can fail.
    let (code, v, all) = probe(Who::Me, &["--network", "host"], "connect", Some(&port));
    assert_eq!(v["blocked"], serde_json::Value::Bool(false), "{all}");
    assert_eq!(code, 1, "{all}");
}

#[test]
fn cannot_see_or_signal_host_processes() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    assert_blocked(&[], "signal-host", Some(&pid));
    assert!(child.try_wait().unwrap().is_none(), "the host process died");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn mount_is_refused() {
    assert_blocked(&[], "mount", None);
}

#[test]
fn unshare_and_nested_user_namespaces_are_refused() {
    assert_blocked(&[], "unshare", None);
    assert_blocked(&[], "nested-userns", None);
}

#[test]
fn keyctl_bpf_perf_io_uring_userfaultfd_x32_are_refused() {
    for c in ["keyctl", "bpf", "perf", "io_uring", "userfaultfd", "x32"] {
        assert_blocked(&[], c, None);
    }
}

#[test]
fn vsock_and_other_socket_families_are_refused() {
    // vsock is not isolated by any namespace: on a VM host (this one) it
    // reaches the hypervisor's and the host's ports
    for net in [&["--network", "none"][..], &["--network", "host"][..]] {
        assert_blocked(net, "socket-families", None);
    }
}

#[test]
fn host_paths_and_kernel_details_stay_outside() {
    for who in runners() {
        let repo = fixture_repo(who);
        let r = repo.path().to_string_lossy().into_owned();
        let marker = "--marker-on-the-host-command-line";
        let (code, v, all) = probe(
            who,
            &["--repo", &r, "--env", &format!("X={marker}")],
            "host-info",
            Some(&r),
        );
        assert_eq!(v["blocked"], true, "{who:?}: {all}");
        assert_eq!(code, 0, "{all}");
        let (_, v, all) = probe(
            who,
            &["--env", &format!("X={marker}")],
            "host-info",
            Some(marker),
        );
        assert_eq!(v["blocked"], true, "{who:?}: {all}");
    }
}

#[test]
fn modify_ldt_is_refused() {
    assert_blocked(&[], "modify_ldt", None);
}

#[test]
fn tiocsti_is_refused() {
    assert_blocked(&[], "tiocsti", None);
}

#[test]
fn init_is_out_of_reach() {
    assert_blocked(&[], "init", None);
}

#[test]
fn fork_bomb_is_contained_by_pids() {
    assert_blocked(&["--pids", "64", "--timeout", "60s"], "forkbomb", None);
}

#[test]
fn memory_hog_is_killed_as_oom() {
    for who in runners() {
        let dir = out_dir(who);
        let result = dir.path().join("r.json");
        let r = result.to_string_lossy().into_owned();
        let (code, _v, all) = probe(
            who,
            &["--memory", "64M", "--result-json", &r],
            "memhog",
            None,
        );
        assert_eq!(code, 137, "{who:?}: {all}");
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&result).unwrap_or_default()).unwrap_or_default();
        assert_eq!(j["status"], "oom", "{who:?}: {j}");
        assert_eq!(j["exit_code"], 137);
    }
}

#[test]
fn disk_fill_hits_enospc_and_spares_the_host() {
    // the binaries' copy in /tmp is made once, on first use: before measuring
    let _ = bin_dir();
    let host_free_before = free_bytes("/tmp");
    assert_blocked(&["--disk", "16M"], "diskfill", None);
    assert!(
        !Path::new("/tmp/fill").exists(),
        "the sandbox's /tmp/fill reached the host"
    );
    // nothing of it reached the host's /tmp: a leak would be gigabytes (the
    // probe writes up to 4 GiB when it never meets ENOSPC); other tests
    // writing small files meanwhile stay well under the margin
    let after = free_bytes("/tmp");
    assert!(
        after + (64 << 20) >= host_free_before,
        "host /tmp lost space: {host_free_before} -> {after}"
    );
}

fn free_bytes(p: &str) -> u64 {
    let c = std::ffi::CString::new(p).unwrap_or_default();
    // SAFETY: statvfs writes one struct we own.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return 0;
    }
    s.f_bavail * s.f_frsize
}

#[test]
fn timeout_leaves_no_process_behind() {
    for who in runners() {
        let marker = format!("1000.{}{}", std::process::id(), who as u8);
        let script = format!("sleep {marker} & sleep {marker} & exec sleep {marker}");
        let start = std::time::Instant::now();
        let out = agentvm(who, &["run", "--timeout", "1s", "--", "sh", "-c", &script]);
        assert_eq!(out.status.code(), Some(124), "{who:?} {out:?}");
        assert!(start.elapsed().as_secs() < 20);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("timed out"),
            "{out:?}"
        );
        let left: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect();
        assert!(left.is_empty(), "{who:?}: processes left behind: {left:?}");
    }
}

#[test]
fn host_environment_does_not_leak() {
    for who in runners() {
        let probe = probe_path();
        let bind = format!("{}:/agentvm-probe", probe.display());
        let ns = host_ns();
        let out = agentvm_with(
            who,
            &[
                "run",
                "--ro-bind",
                &bind,
                "--",
                "/agentvm-probe",
                "--host-ns",
                &ns,
                "env",
                "AGENTVM_PROBE_SECRET",
            ],
            &[("AGENTVM_PROBE_SECRET", "s3cr3t-value")],
            None,
        );
        assert_eq!(out.status.code(), Some(0), "{who:?} {out:?}");
        // and --env-pass is the way in: the check can fail
        let out = agentvm_with(
            who,
            &[
                "run",
                "--env-pass",
                "AGENTVM_PROBE_SECRET",
                "--ro-bind",
                &bind,
                "--",
                "/agentvm-probe",
                "--host-ns",
                &ns,
                "env",
                "AGENTVM_PROBE_SECRET",
            ],
            &[("AGENTVM_PROBE_SECRET", "s3cr3t-value")],
            None,
        );
        assert_eq!(out.status.code(), Some(1), "{who:?} {out:?}");
    }
}

#[test]
fn root_inside_is_never_the_hosts_root() {
    for who in runners() {
        let out = agentvm(
            who,
            &[
                "run",
                "--",
                "cat",
                "/proc/self/uid_map",
                "/proc/self/gid_map",
            ],
        );
        let s = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Vec<&str>> = s.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 2, "{who:?} {s}");
        for l in lines {
            assert_eq!(l[0], "0");
            assert_ne!(l[1], "0", "{who:?}: root inside maps to the host's root");
            assert_eq!(l[2], "1", "{who:?}: more than one id mapped");
            if who == Who::Nobody || is_root() {
                assert_eq!(l[1], NOBODY.to_string());
            }
        }
    }
}

#[test]
fn host_repo_is_never_written() {
    for who in runners() {
        let repo = fixture_repo(who);
        let before = manifest(repo.path());
        let git_before = sh(repo.path(), "git status --porcelain && git rev-parse HEAD");
        let r = repo.path().to_string_lossy().into_owned();
        let out = agentvm(
            who,
            &["run", "--repo", &r, "--", "sh", "-c", "echo x >> a.txt; rm -f b.txt; rm -rf sub; echo n > new; chmod 777 run.sh; touch .git/evil 2>/dev/null; echo '[core]' >> .git/config 2>/dev/null; true"],
        );
        assert!(out.status.success(), "{who:?} {out:?}");
        assert_eq!(
            before,
            manifest(repo.path()),
            "{who:?}: the host repo changed"
        );
        assert_eq!(
            git_before.stdout,
            sh(repo.path(), "git status --porcelain && git rev-parse HEAD").stdout
        );
        assert!(!repo.path().join(".git/evil").exists());
    }
}

#[test]
fn startup_files_and_git_are_read_only_inside() {
    for who in runners() {
        let repo = fixture_repo(who);
        // at the top, nested, behind a symlink, and named by the repo's
        // own config (core.hooksPath), as the review found them
        let o = sh(
            repo.path(),
            "printf 'export A=1\\n' > .envrc && mkdir -p .vscode sub/deep tools hooks .husky \
             && printf '{}' > .vscode/tasks.json && printf 'x\\n' > sub/deep/.envrc \
             && printf 'y\\n' > tools/env.sh && ln -s ../tools/env.sh sub/.envrc \
             && printf '#!/bin/sh\\n' > hooks/pre-commit && printf '#!/bin/sh\\n' > .husky/pre-commit \
             && git config core.hooksPath hooks \
             && git add -A && git -c user.email=t@t -c user.name=t commit -qm rc",
        );
        assert!(o.status.success(), "{o:?}");
        if who == Who::Nobody {
            let _ = std::process::Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(repo.path())
                .status();
        }
        let r = repo.path().to_string_lossy().into_owned();
        let out = agentvm(
            who,
            &["run", "--repo", &r, "--", "sh", "-c",
              "for f in .envrc .vscode/tasks.json .git/config .git/hooks/pre-commit sub/deep/.envrc tools/env.sh hooks/pre-commit .husky/pre-commit; do (echo evil >> $f) 2>/dev/null && echo \"WROTE $f\"; done; echo ok >> a.txt && echo normal-write-ok"],
        );
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            !s.contains("WROTE"),
            "{who:?}: {s}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(s.contains("normal-write-ok"), "{who:?}: {s}");
    }
}

#[test]
fn protected_changes_are_named_in_the_result() {
    let repo = fixture_repo(Who::Me);
    let out_dir = out_dir(Who::Me);
    let res = out_dir.path().join("r.json");
    let r = repo.path().to_string_lossy().into_owned();
    let j = res.to_string_lossy().into_owned();
    let out = agentvm(
        Who::Me,
        &["run", "--repo", &r, "--result-json", &j, "--", "sh", "-c",
          "mkdir -p a/b .github/workflows && echo x > a/b/.envrc && echo y > .github/workflows/ci.yml && echo z > ok.txt"],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&res).unwrap_or_default()).unwrap_or_default();
    assert_eq!(
        v["protected_changes"],
        serde_json::json!([".github/workflows/ci.yml", "a/b/.envrc"]),
        "{v}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("apply` refuses them"));
}

/// A sparse file's apparent size is no measure of the host's memory: a
/// terabyte of holes in a 64 MiB sandbox is marked in the patch, never
/// read, and the runner stays small.
#[test]
fn sparse_files_cost_the_host_no_memory() {
    for who in runners() {
        let repo = fixture_repo(who);
        let out_dir = out_dir(who);
        let patch = out_dir.path().join("p");
        let res = out_dir.path().join("r.json");
        let r = repo.path().to_string_lossy().into_owned();
        let (p, j) = (
            patch.to_string_lossy().into_owned(),
            res.to_string_lossy().into_owned(),
        );
        let args = ["run", "--repo", &r, "--patch-out", &p, "--result-json", &j, "--memory", "256M", "--disk", "64M",
            "--", "sh", "-c", "truncate -s 2G two && truncate -s 1T tera && printf 'text first\\n' > t && truncate -s 1G t"];
        let (status, maxrss_kib) = run_measured(who, &args);
        assert_eq!(status, Some(0), "{who:?}");
        assert!(
            maxrss_kib < 64 * 1024,
            "{who:?}: the runner took {maxrss_kib} KiB"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&res).unwrap_or_default()).unwrap_or_default();
        assert_eq!(v["status"], "exited", "{v}");
        assert_eq!(
            v["binary_omitted"],
            serde_json::json!(["t", "tera", "two"]),
            "{v}"
        );
    }
}

/// Run agentvm as `who` and return its exit code and the largest resident
/// size of it and everything it waited for (KiB).
fn run_measured(who: Who, args: &[&str]) -> (Option<i32>, i64) {
    let mut cmd = command_as(who, &agentvm_path());
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if who == Who::Nobody {
        cmd.env("AGENTVM_CGROUP_PARENT", delegated_cgroup());
    }
    // reaped by wait4 below (std's wait would lose the rusage)
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for the child we just spawned.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert!(r > 0, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, ru.ru_maxrss)
}

/// A directory chain deeper than git can check out fails the run, saying
/// so; one deeper than PATH_MAX from /proc but within git's limit is
/// captured. Nothing vanishes from the patch while the run "succeeds".
#[test]
fn deep_paths_are_captured_or_fail_the_run_never_dropped() {
    for who in runners() {
        let repo = fixture_repo(who);
        let out_dir = out_dir(who);
        let patch = out_dir.path().join("p");
        let res = out_dir.path().join("r.json");
        let r = repo.path().to_string_lossy().into_owned();
        let (p, j) = (
            patch.to_string_lossy().into_owned(),
            res.to_string_lossy().into_owned(),
        );
        let n = "d".repeat(199);
        let deep = |levels: usize| {
            format!("for i in $(seq {levels}); do mkdir {n} && cd {n}; done; echo deep > f")
        };
        let out = agentvm(
            who,
            &[
                "run",
                "--repo",
                &r,
                "--patch-out",
                &p,
                "--result-json",
                &j,
                "--",
                "sh",
                "-c",
                &deep(20),
            ],
        );
        assert!(out.status.success(), "{who:?} {out:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&res).unwrap_or_default()).unwrap_or_default();
        assert_eq!(
            v["changed_files"].as_array().map(|a| a.len()),
            Some(1),
            "{who:?}"
        );
        let out = agentvm(
            who,
            &[
                "run",
                "--repo",
                &r,
                "--patch-out",
                &p,
                "--result-json",
                &j,
                "--",
                "sh",
                "-c",
                &deep(25),
            ],
        );
        assert_eq!(out.status.code(), Some(125), "{who:?} {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("longer than git can check out"),
            "{out:?}"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&res).unwrap_or_default()).unwrap_or_default();
        assert_eq!(v["status"], "error", "{v}");
        assert_eq!(v["error"]["layer"], "capture", "{v}");
        assert_eq!(
            std::fs::read(&patch).unwrap_or_default(),
            b"",
            "a partial patch was left"
        );
    }
}
