//! Shared harness: runs the real `agentvm` binary, as root and again as an
//! unprivileged user (uid 65534) when the tests run as root.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub const NOBODY: u32 = 65534;

/// Who runs `agentvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The test process itself (root in CI).
    Me,
    /// uid/gid 65534 through setpriv, no supplementary groups.
    Nobody,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Every identity the suite runs under.
pub fn runners() -> Vec<Who> {
    if is_root() {
        vec![Who::Me, Who::Nobody]
    } else {
        skip_part(
            "the rootless half (uid 65534) of every sandbox test",
            "switching to uid 65534 needs root: run ./test.sh as root",
        );
        vec![Who::Me]
    }
}

/// The file ./test.sh collects skips in (AGENTVM_SKIPPED).
fn skip_file() -> Option<std::ffi::OsString> {
    std::env::var_os("AGENTVM_SKIPPED").filter(|f| !f.is_empty())
}

fn note_skip(what: &str, how: &str) {
    if let Some(f) = skip_file() {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
        {
            // one write per line: tests run in parallel, and an append
            // made of several writes interleaves with theirs
            let _ = file.write_all(format!("{what} -- {how}\n").as_bytes());
        }
    }
    eprintln!("not run here: {what} ({how})");
}

/// This test cannot run on this machine: `what` is what it would prove,
/// `how` how to get it run. Under ./test.sh the skip is recorded and
/// listed at the end (and the run does not pass as complete); anywhere
/// else the test fails saying so, so that no test that did not run is
/// reported as passed. The caller returns right after.
pub fn skip(what: &str, how: &str) {
    if skip_file().is_none() {
        panic!(
            "not run here: {what} ({how}). Run the suite with ./test.sh, which installs what it can and lists what it could not run (or set AGENTVM_SKIPPED=FILE to have skips listed there instead of failing)"
        );
    }
    note_skip(what, how);
}

/// Part of a test cannot run here (the rest does): recorded like `skip`,
/// never a failure.
pub fn skip_part(what: &str, how: &str) {
    note_skip(what, how);
}

/// A world-readable directory with copies of the binaries, so an
/// unprivileged user can execute them wherever the build tree lives.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("agentvm-test-bin-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (name, src) in [
            ("agentvm", env!("CARGO_BIN_EXE_agentvm")),
            ("agentvm-run", env!("CARGO_BIN_EXE_agentvm-run")),
            ("agentvm-probe", env!("CARGO_BIN_EXE_agentvm-probe")),
        ] {
            let dst = d.join(name);
            let tmp = d.join(format!(".{name}.tmp"));
            std::fs::copy(src, &tmp).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&tmp, &dst).unwrap();
        }
        d
    })
}

pub fn agentvm_path() -> PathBuf {
    bin_dir().join("agentvm")
}

pub fn probe_path() -> PathBuf {
    bin_dir().join("agentvm-probe")
}

/// The host's mount, pid and user namespace ids, for the probe's guard.
pub fn host_ns() -> String {
    ["mnt", "pid", "user"]
        .iter()
        .map(|k| {
            std::fs::read_link(format!("/proc/self/ns/{k}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Cgroup parent delegated to uid 65534 (cgroup v1: one directory per
/// controller, owned by that user), so rootless limits can be tested.
pub fn delegated_cgroup() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let name = "agentvm-test-delegated".to_string();
        for ctrl in ["memory", "pids", "cpu", "cpuset"] {
            let base = Path::new("/sys/fs/cgroup").join(ctrl);
            if !base.exists() {
                continue;
            }
            let d = base.join(&name);
            let _ = std::fs::create_dir(&d);
            if ctrl == "cpuset" {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(base.join(f)).unwrap_or_default();
                    let _ = std::fs::write(d.join(f), v.trim());
                }
            }
            let _ = Command::new("chown")
                .args(["-R", &format!("{NOBODY}:{NOBODY}")])
                .arg(&d)
                .status();
        }
        name
    })
}

/// `agentvm ARGS` as `who`, stdin closed.
pub fn agentvm(who: Who, args: &[&str]) -> Output {
    agentvm_with(who, args, &[], None)
}

/// The program `bin` run as `who` (for uid 65534, through setpriv with no
/// supplementary groups; `bin` must be one `bin_dir` holds).
pub fn command_as(who: Who, bin: &Path) -> Command {
    match who {
        Who::Me => Command::new(bin),
        Who::Nobody => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".into(),
                "--".into(),
            ]);
            c.arg(bin);
            c
        }
    }
}

pub fn agentvm_with(who: Who, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    let mut cmd = command_as(who, &agentvm_path());
    cmd.args(args).current_dir(bin_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if who == Who::Nobody && args.first() == Some(&"run") && is_root() {
        cmd.env("AGENTVM_CGROUP_PARENT", delegated_cgroup());
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning agentvm: {e}"));
    if let Some(data) = stdin {
        use std::io::Write;
        let mut s = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
        s.write_all(data).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Run the probe inside a sandbox: `agentvm run EXTRA... -- probe CHECK ARG`.
pub fn probe(
    who: Who,
    extra: &[&str],
    check: &str,
    arg: Option<&str>,
) -> (i32, serde_json::Value, String) {
    let probe = probe_path();
    let bind = format!("{}:/agentvm-probe", probe.display());
    let ns = host_ns();
    let mut args = vec!["run", "--ro-bind", &bind];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "/agentvm-probe", "--host-ns", &ns, check]);
    if let Some(a) = arg {
        args.push(a);
    }
    let out = agentvm(who, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(
        code, 99,
        "{who:?}: the probe is NOT inside a sandbox: {stdout}"
    );
    let line = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or(serde_json::Value::Null);
    (code, v, format!("stdout: {stdout}\nstderr: {stderr}"))
}

/// Assert the probe's check was blocked, for every runner.
pub fn assert_blocked(extra: &[&str], check: &str, arg: Option<&str>) {
    for who in runners() {
        let (code, v, all) = probe(who, extra, check, arg);
        assert_eq!(
            v["blocked"],
            serde_json::Value::Bool(true),
            "{who:?} {check}: not blocked\n{all}"
        );
        assert_eq!(code, 0, "{who:?} {check}: exit {code}\n{all}");
    }
}

/// A fresh world-readable temporary directory (nobody must reach it).
pub fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("agentvm-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

pub fn sh(dir: &Path, script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        // fixtures may belong to uid 65534 while the tests run as root
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*")
        .output()
        .unwrap()
}

/// A small git repo owned by `who`, world-readable.
pub fn fixture_repo(who: Who) -> tempfile::TempDir {
    let d = tempdir();
    let out = sh(
        d.path(),
        "git init -q . && printf 'hello\\n' > a.txt && printf 'one\\ntwo\\nthree\\n' > b.txt \
         && mkdir -p sub/deep && printf 'z\\n' > sub/c && printf 'deep\\n' > sub/deep/d && printf '#!/bin/sh\\n' > run.sh \
         && chmod +x run.sh && ln -s a.txt link && printf 'no newline' > nonl && mkdir olddir && printf 'x\\n' > olddir/f \
         && git add -A && git -c user.email=t@t -c user.name=t commit -qm init",
    );
    assert!(out.status.success(), "{out:?}");
    if who == Who::Nobody {
        let _ = Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(d.path())
            .status();
    }
    d
}

/// Shell that prints a stable description of the tree under the current
/// directory: path, type, mode bits and content hash (.git left out). Run
/// both inside the sandbox and on the host, so the two can be compared.
pub const MANIFEST_SH: &str =
    "find . -path ./.git -prune -o -mindepth 1 -print | LC_ALL=C sort | while IFS= read -r f; do \
   if [ -L \"$f\" ]; then echo \"L $f -> $(readlink \"$f\")\"; \
   elif [ -d \"$f\" ]; then echo \"D $f\"; \
   else echo \"F $f $(stat -c %a \"$f\") $(sha256sum < \"$f\" | cut -c1-16)\"; fi; done";

pub fn manifest(dir: &Path) -> String {
    String::from_utf8_lossy(&sh(dir, MANIFEST_SH).stdout).into_owned()
}

/// A temporary directory `who` may write its outputs (patch, result) to.
pub fn out_dir(who: Who) -> tempfile::TempDir {
    let d = tempdir();
    if who == Who::Nobody {
        let _ = Command::new("chown")
            .arg(format!("{NOBODY}:{NOBODY}"))
            .arg(d.path())
            .status();
    }
    d
}

/// The real asciinema reads the recording `cast` (saved to `file`):
/// `asciinema cat` and `asciinema play` (sped up, idle time cut) both
/// succeed, and each prints what `cat` does; returns that text. Without
/// asciinema the part is listed as not run.
pub fn asciinema_accepts(file: &Path, cast: &str, what: &str) -> Option<String> {
    std::fs::write(file, cast).unwrap();
    let mut text = None;
    for args in [&["cat"][..], &["play", "-s", "1000", "-i", "0.01"][..]] {
        match Command::new("asciinema")
            .args(args)
            .arg(file)
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) => {
                assert!(o.status.success(), "asciinema {args:?} on {what}: {o:?}");
                let out = String::from_utf8_lossy(&o.stdout).into_owned();
                match &text {
                    None => text = Some(out),
                    Some(cat) => assert_eq!(&out, cat, "asciinema play and cat on {what}"),
                }
            }
            Err(e) => {
                skip_part(
                    &format!("asciinema's own parser on {what} ({e})"),
                    "pip install asciinema==2.4.0 (scripts/install-test-tools.sh does)",
                );
                return None;
            }
        }
    }
    text
}
