//! `agentvm run --tty`: the command on a terminal of the sandbox's own.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;

use crate::common::*;

/// `agentvm ARGS` as `who` with a terminal of the host as its stdin and
/// stdout (script(1) makes one): what a person at a terminal runs.
fn at_a_terminal(who: Who, args: &[String], input: &[u8]) -> (i32, String) {
    at_a_terminal_of(who, "", args, input)
}

/// Like `at_a_terminal`, running the shell commands `pre` on that
/// terminal first.
fn at_a_terminal_of(who: Who, pre: &str, args: &[String], input: &[u8]) -> (i32, String) {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let mut line: Vec<String> = Vec::new();
    if who == Who::Nobody {
        line.extend(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
            ]
            .map(String::from),
        );
    }
    line.push(agentvm_path().display().to_string());
    line.extend(args.iter().cloned());
    let cmd = format!(
        "{pre}{}",
        line.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
    );
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"]).current_dir(bin_dir());
    if who == Who::Nobody && is_root() {
        c.env("AGENTVM_CGROUP_PARENT", delegated_cgroup());
    }
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        i.write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).replace('\r', ""),
    )
}

fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Started from a host terminal, the command sees only a terminal of the
/// sandbox's own devpts: no descriptor reaches the host's terminal, it
/// leads its own session, and TIOCSTI is refused there too. The probe
/// first checks it is inside a sandbox (exit 99 otherwise).
#[test]
fn the_terminal_is_the_sandboxs_own_never_the_hosts() {
    if !have_script() {
        return skip("the --tty terminal test", "install script(1) (bsdutils)");
    }
    let host_pts = std::fs::metadata("/dev/pts/ptmx").unwrap().dev();
    for who in runners() {
        let args: Vec<String> = [
            "run".to_string(),
            "--tty".into(),
            "--ro-bind".into(),
            format!("{}:/agentvm-probe", probe_path().display()),
            "--".into(),
            "/agentvm-probe".into(),
            "--host-ns".into(),
            host_ns(),
            "terminal".into(),
            host_pts.to_string(),
        ]
        .to_vec();
        let (code, out) = at_a_terminal(who, &args, b"");
        assert_ne!(
            code, 99,
            "{who:?}: the probe is NOT inside a sandbox: {out}"
        );
        // the report is the last line holding one; what the terminal
        // echoed of the (closed) input may come before it on that line
        let line = out
            .lines()
            .rev()
            .find_map(|l| l.find("{\"").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("{who:?}: no report: {out}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["blocked"], true, "{who:?}: {out}");
        assert!(
            v["detail"].as_str().unwrap().contains("/dev/pts/"),
            "{who:?}: {out}"
        );
        assert_eq!(code, 0, "{who:?}: {out}");
    }
}

/// What is typed reaches the command, what it prints comes back, its exit
/// status is the run's, and its changes are in the patch as without --tty.
#[test]
fn input_output_exit_status_and_patch_go_through_the_terminal() {
    for who in runners() {
        let out = out_dir(who);
        let patch = out.path().join("p.diff");
        let p = patch.to_string_lossy().into_owned();
        let o = agentvm_with(
            who,
            &[
                "run",
                "--tty",
                "--patch-out",
                &p,
                "--",
                "sh",
                "-c",
                "read line; echo \"got:$line\" > said.txt; echo \"said $line\"; exit 7",
            ],
            &[],
            Some(b"hello\n"),
        );
        let stdout = String::from_utf8_lossy(&o.stdout).replace('\r', "");
        assert_eq!(
            o.status.code(),
            Some(7),
            "{who:?}: {stdout} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout.contains("said hello"), "{who:?}: {stdout}");
        let diff = std::fs::read_to_string(&patch).unwrap();
        assert!(diff.contains("+got:hello"), "{who:?}: {diff}");
    }
}

/// The terminal has the caller's size (24x80 when the caller has none).
#[test]
fn the_terminal_has_the_callers_size() {
    if !have_script() {
        return skip("the --tty size test", "install script(1) (bsdutils)");
    }
    let args: Vec<String> = [
        "run",
        "--tty",
        "--",
        "sh",
        "-c",
        "echo size $(stty size); tty",
    ]
    .map(String::from)
    .to_vec();
    let (code, out) = at_a_terminal_of(Who::Me, "stty rows 33 cols 101; ", &args, b"");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("size 33 101"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    // no terminal at all: the default
    let o = agentvm(
        Who::Me,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("size 24 80"), "{out}");
}

/// The server's way: a console socket handed to the runner, on which the
/// terminal's primary side arrives; the parent reads the command's output
/// there. A console descriptor that is not a socket is refused before
/// anything runs.
#[test]
fn a_console_socket_receives_the_terminal() {
    for who in runners() {
        console_socket_receives_the_terminal(who);
    }
}

fn console_socket_receives_the_terminal(who: Who) {
    use std::os::fd::AsRawFd;
    let dir = tempdir();
    let f = dir.path().join("request.json");
    let req = serde_json::json!({
        "command": ["sh", "-c", "echo \"on $(tty)\"; exit 4"],
        "tty": {"rows": 30, "cols": 90, "console_fd": 5},
        "limits": {"timeout_ms": 30000},
    });
    std::fs::write(&f, req.to_string()).unwrap();
    let (child, primary) = runner_with_console(&f, who);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(primary.as_raw_fd(), &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EIO) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("reading the terminal: {e}"),
        }
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{who:?}: {o:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("on /dev/pts/0"), "{who:?}: {text}");
    assert!(
        o.stdout.is_empty(),
        "{who:?}: output went to the terminal only: {o:?}"
    );

    for (fd, says) in [(1, "console fd"), (9, "the console fd 9")] {
        let bad = serde_json::json!({"command": ["true"], "tty": {"rows": 24, "cols": 80, "console_fd": fd}});
        let o = super::cli::run_request(dir.path(), &bad.to_string());
        assert_eq!(o.status.code(), Some(125), "{fd}: {o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(says), "{fd}: {e}");
    }
}

/// The session path end to end, as the server will drive it: the runner
/// with a console socket, the terminal it sends taken over by
/// `session::Terminal`, a writer typing into the sandbox's shell, the
/// output redacted on the screen and in a recording that asciinema's own
/// parser accepts.
#[test]
fn a_sandbox_terminal_drives_a_session_screen_and_recording() {
    for who in runners() {
        sandbox_terminal_drives_a_session(who);
    }
}

fn sandbox_terminal_drives_a_session(who: Who) {
    use agentvm_server::redact::Redactor;
    use agentvm_server::session::screen::{Frame, Screen};
    use agentvm_server::session::terminal::{Recording, Terminal};
    const TOKEN: &str = "sk-agentvm-session-test-9876543210";
    let dir = tempdir();
    let f = dir.path().join("request.json");
    let req = serde_json::json!({
        "command": ["sh", "-c", "read line; echo \"got $line $TOKEN\"; exit 6"],
        "tty": {"rows": 24, "cols": 80, "console_fd": 5},
        "env": [["TOKEN", TOKEN]],
        "limits": {"timeout_ms": 30000},
    });
    std::fs::write(&f, req.to_string()).unwrap();
    let (mut child, primary) = runner_with_console(&f, who);
    let cast = dir.path().join("session.cast");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(async {
        let screen = Arc::new(Screen::new(64 * 1024, 256, 4));
        let rec = Recording::create(&cast, 24, 80, "agentvm session test", "sh", 1 << 20).unwrap();
        let term =
            Terminal::new(primary, screen.clone(), Redactor::new([TOKEN]), Some(rec)).unwrap();
        let (mut me, writes) = screen.attach("test", true).unwrap();
        assert!(writes);
        let pump = tokio::spawn(term.clone().pump());
        term.input(me.id, b"hello\n").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), pump)
            .await
            .unwrap()
            .unwrap();
        screen.end(Some(6));
        let mut seen = Vec::new();
        while let Some(f) = me.frames.recv().await {
            match f {
                Frame::Output(b) => seen.extend_from_slice(&b),
                Frame::End(s) => assert_eq!(s, Some(6)),
                Frame::Paused(p) => panic!("nobody paused it, yet Paused({p})"),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(6), "{who:?}");
    assert!(seen.contains("got hello [REDACTED]"), "{who:?}: {seen:?}");
    assert!(!seen.contains(TOKEN), "{who:?}: {seen:?}");
    let text = std::fs::read_to_string(&cast).unwrap();
    assert!(!text.contains(TOKEN), "{who:?}: {text}");
    let copy = dir.path().join("copy.cast");
    if let Some(shown) = asciinema_accepts(&copy, &text, "a session's recording") {
        assert!(shown.contains("got hello [REDACTED]"), "{who:?}: {shown}");
    }
}

/// `agentvm-run run-request FILE` with a console socket at fd 5, as the
/// server starts a session; returns the process and the terminal's primary
/// side once the sandbox sent it.
fn runner_with_console(
    request: &std::path::Path,
    who: Who,
) -> (std::process::Child, std::os::fd::OwnedFd) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = command_as(who, &bin_dir().join("agentvm-run"));
    cmd.arg("run-request")
        .arg(request)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it gives the child the socket at 5
    // without close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    let primary = agentvm_sandbox::receive_console(ours.as_fd())
        .unwrap()
        .unwrap_or_else(|| panic!("no terminal arrived"));
    (child, primary)
}
