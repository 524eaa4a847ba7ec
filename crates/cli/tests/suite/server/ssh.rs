//! The SSH front door, driven by the real OpenSSH client with generated
//! keys: attach, detach and re-attach with the shell's state kept, exec
//! with its exit status and exact bytes, a window change seen by `stty
//! size`, refused passwords, unknown keys, odd names, sftp and scp, port
//! forwards to inside a session and nowhere else, and a host key kept
//! across a restart.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use super::*;

struct Door {
    t: tempfile::TempDir,
    repo: PathBuf,
    s: Server,
    port: String,
}

fn have_ssh() -> bool {
    let ok = Command::new("ssh").arg("-V").output().is_ok()
        && Command::new("ssh-keygen").arg("--help").output().is_ok();
    if !ok {
        skip(
            "the SSH front door against OpenSSH",
            "install openssh-client (scripts/install-test-tools.sh does)",
        );
    }
    ok
}

fn keygen(path: &Path, comment: &str) {
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

/// A server with SSH on, alice's and bob's keys authorized, a repo in the
/// allowed root, and a known_hosts entry made from the server's host key.
fn door() -> Door {
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let repo = fixture_repo(Who::Me);
    let r = root.join("repo");
    assert!(sh(
        t.path(),
        &format!("cp -R {}/. {}", repo.path().display(), r.display())
    )
    .status
    .success());
    let mut auth = String::new();
    for who in ["alice@test", "bob"] {
        let k = t.path().join(who);
        keygen(&k, who);
        auth += &std::fs::read_to_string(k.with_extension("pub")).unwrap_or_default();
    }
    keygen(&t.path().join("mallory"), "mallory");
    std::fs::write(t.path().join("authorized_keys"), auth).unwrap();
    let s = start(t.path());
    trust(t.path(), &s);
    let port = port_of(&s);
    Door {
        t,
        repo: r,
        s,
        port,
    }
}

fn start(t: &Path) -> Server {
    let root = t.join("root");
    let keys = t.join("authorized_keys");
    Server::start(
        &t.join("data"),
        &[
            "--allowed-root",
            &root.to_string_lossy(),
            "--ssh-listen",
            "127.0.0.1:0",
            "--ssh-authorized-keys",
            &keys.to_string_lossy(),
        ],
    )
}

fn port_of(s: &Server) -> String {
    let (addr, _) = s.ssh.clone().unwrap_or_default();
    addr.rsplit(':').next().unwrap_or("").to_string()
}

/// known_hosts under one alias, from the host key in the data directory:
/// every connection checks the server is the one it was.
fn trust(t: &Path, s: &Server) {
    let o = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(s.data.join("ssh_host_ed25519_key"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let line = format!("agentvm-test {}", String::from_utf8_lossy(&o.stdout));
    std::fs::write(t.join("known_hosts"), line).unwrap();
}

impl Door {
    /// `ssh` as `who`, checking the host key strictly, with `args` after
    /// the options.
    fn ssh(&self, who: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            self.t.path().join("known_hosts").display()
        ))
        .args([
            "-o",
            "HostKeyAlias=agentvm-test",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-i")
        .arg(self.t.path().join(who))
        .args(["-p", &self.port])
        .args(args);
        c
    }

    fn run(&self, who: &str, args: &[&str]) -> Output {
        let mut c = self.ssh(who, args);
        c.stdin(Stdio::null());
        timeout_output(c, Duration::from_secs(60))
    }

    fn repo_env(&self) -> String {
        format!("SetEnv=AGENTVM_REPO={}", self.repo.display())
    }
}

/// Run with a deadline: a hung door fails the test instead of the suite.
fn timeout_output(mut c: Command, within: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "ssh did not finish within {within:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An interactive `ssh -tt`: type lines in, read until a text comes out.
struct Term {
    child: Child,
    out: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Term {
    fn open(mut c: Command) -> Term {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut so = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = so.read(&mut b) {
                if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Term {
            child,
            out: rx,
            seen: Vec::new(),
        }
    }

    fn type_in(&mut self, line: &str) {
        let i = self.child.stdin.as_mut().unwrap();
        i.write_all(line.as_bytes()).unwrap();
        i.flush().unwrap();
    }

    fn expect(&mut self, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if text.contains(want) {
                self.seen.clear();
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(b) => self.seen.extend_from_slice(&b),
                Err(_) => panic!("{want:?} never came; saw {text:?}"),
            }
        }
    }

    /// Close the connection (a detach), as a dropped laptop would.
    fn hang_up(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(Instant::now() < deadline, "ssh did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn session(s: &Server, name: &str) -> Value {
    let (_, v) = s.json("GET", "/v1/sessions?limit=100", None);
    v["sessions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn ssh_attaches_detaches_reattaches_and_runs_commands() {
    if !have_ssh() {
        return;
    }
    let d = door();
    let dest = "work@127.0.0.1";
    // a new session over the repository
    let mut a = Term::open(d.ssh("alice@test", &["-tt", "-o", &d.repo_env(), dest]));
    a.type_in("export KEEP=kept-$((6*7)); echo set-$KEEP; ls /workspace; stty size\n");
    let out = a.expect("24 80");
    assert!(out.contains("set-kept-42"), "{out}");
    assert!(out.contains("b.txt"), "the repo is at /workspace: {out}");
    a.hang_up();
    std::thread::sleep(Duration::from_millis(500));
    let v = session(&d.s, "work");
    assert_eq!(v["status"], "running", "a closed connection detaches: {v}");
    assert_eq!(v["owner"], "ssh:alice@test", "{v}");
    assert_eq!(v["viewers"], json!([]), "{v}");
    // again, without AGENTVM_REPO: the same session, its shell's state kept
    let mut b = Term::open(d.ssh("alice@test", &["-tt", dest]));
    b.type_in("echo again-$KEEP; echo made > /workspace/from-ssh.txt\n");
    b.expect("again-kept-42");
    b.type_in("exit 0\n");
    assert!(b.wait().success());
    // it ended with its shell; its patch has what it wrote
    let v = wait_gone(&d.s, "work");
    assert_eq!(v["status"], "exited", "{v}");
    let id = v["id"].as_str().unwrap_or("");
    let patch = d.s.text(&format!("/v1/sessions/{id}/patch"));
    assert!(patch.contains("from-ssh.txt"), "{patch}");

    // exec: a fresh sandbox, its bytes exact, its status ssh's
    let o = d.run(
        "alice@test",
        &[
            "-o",
            &d.repo_env(),
            dest,
            "printf 'a\\nb\\n'; ls /workspace/b.txt; exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("a\nb\n"),
        "no terminal translation: {out:?}"
    );
    assert!(out.contains("/workspace/b.txt"), "{out:?}");
    let o = d.run(
        "alice@test",
        &[dest, "echo $KEEP; test -e /workspace/from-ssh.txt"],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "a fresh sandbox, an empty workspace: {o:?}"
    );
    // piped input ends a shell's attach once its output is out
    let mut c = d.ssh("alice@test", &["-tt", "piped@127.0.0.1"]);
    c.stdin(Stdio::piped());
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo piped-$((2+3))\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("piped-5"),
        "{o:?}"
    );
    assert_eq!(session(&d.s, "piped")["status"], "running");

    // an exec's session is its connection's: a dropped connection ends it
    let mut c = d.ssh("alice@test", &[dest, "sleep 300"]);
    let mut sleeper = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let find = || {
        let (_, v) = d.s.json("GET", "/v1/sessions?limit=100", None);
        v["sessions"].as_array().and_then(|a| {
            a.iter()
                .find(|x| x["command"].to_string().contains("sleep 300"))
                .cloned()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while find().map(|v| v["status"] == "running") != Some(true) {
        assert!(Instant::now() < deadline, "the exec never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while find().map(|v| v["status"] == "running") == Some(true) {
        assert!(
            Instant::now() < deadline,
            "the exec outlived its connection"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // bob's "work" is his own, not alice's
    let o = d.run("bob", &["work@127.0.0.1", "echo bob"]);
    assert!(o.status.success(), "{o:?}");
    let (_, audit) = d.s.json("GET", "/v1/audit?limit=200", None);
    let events = audit["events"].as_array().cloned().unwrap_or_default();
    let by = |who: &str, action: &str| {
        events
            .iter()
            .any(|e| e["key_id"] == who && e["action"] == action)
    };
    for a in ["ssh.login", "session.create", "session.attach"] {
        assert!(by("ssh:alice@test", a), "{a} by alice in the audit trail");
    }
    assert!(by("ssh:bob", "ssh.login"));
}

/// The live session `name` left the server's live set: its record.
fn wait_gone(s: &Server, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = session(s, name);
        if v["status"] != "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// At a real terminal (script(1)): `ssh -t` sends the terminal's size and
/// its window changes, and `stty size` inside sees both.
#[test]
fn ssh_passes_the_terminal_size_and_its_changes() {
    if !have_ssh() {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        return skip("ssh at a terminal", "install script(1) (bsdutils)");
    }
    let d = door();
    let cmd: Vec<String> = d
        .ssh("alice@test", &["-tt", "size@127.0.0.1"])
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let line = format!(
        "stty rows 30 cols 90; (sleep 3; stty rows 41 cols 132 < /dev/tty) & \
         ssh {} 'echo size $(stty size); sleep 6; echo size $(stty size)'; echo rc=$?",
        cmd.join(" ")
    );
    let mut c = Command::new("script");
    c.args(["-qec", &line, "/dev/null"]).stdin(Stdio::piped());
    let o = timeout_output(c, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    assert!(out.contains("size 30 90"), "the first size: {out}");
    assert!(out.contains("size 41 132"), "the window change: {out}");
    assert!(out.contains("rc=0"), "{out}");
}

#[test]
fn ssh_refuses_passwords_strangers_odd_names_and_file_copies() {
    if !have_ssh() {
        return;
    }
    let d = door();
    let dest = "work@127.0.0.1";
    for method in ["password", "keyboard-interactive"] {
        let o = d.run(
            "alice@test",
            &[
                "-o",
                &format!("PreferredAuthentications={method}"),
                "-o",
                "PubkeyAuthentication=no",
                dest,
                "true",
            ],
        );
        assert_eq!(o.status.code(), Some(255), "{method}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("Permission denied (publickey)"),
            "{method}: {err}"
        );
    }
    let o = d.run("mallory", &[dest, "true"]);
    assert_eq!(o.status.code(), Some(255), "an unknown key: {o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
    // an odd name, a repo outside the allowed roots: one line each
    let o = d.run("alice@test", &["-tt", "a/b@127.0.0.1"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a session name"),
        "{o:?}"
    );
    let o = d.run(
        "alice@test",
        &["-o", "SetEnv=AGENTVM_REPO=/etc", dest, "true"],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("agentvm: ") && err.contains("allowed root"),
        "{err}"
    );
    // sftp and scp are not offered, and say so
    let mut c = Command::new("sftp");
    let args: Vec<String> = d
        .ssh("alice@test", &[])
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // sftp takes ssh's options but -P for the port
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-p" {
            c.arg("-P");
        } else {
            c.arg(&args[i]);
        }
        i += 1;
    }
    c.args(["-b", "/dev/null", dest]).stdin(Stdio::null());
    let o = timeout_output(c, Duration::from_secs(60));
    assert!(!o.status.success(), "sftp: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("subsystem request failed"),
        "{o:?}"
    );
    let o = d.run("alice@test", &[dest, "scp -t /workspace"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("scp is not offered"),
        "{o:?}"
    );
    // one address cannot hold the door shut: connections that never log in
    // count against theirs only
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from("127.0.0.2", &d.port));
    }
    let mut ninth = connect_from("127.0.0.2", &d.port);
    let mut b = [0u8; 64];
    ninth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        ninth.read(&mut b).unwrap_or(0),
        0,
        "the ninth is closed unanswered"
    );
    let mut b = [0u8; 8];
    held[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        held[0].read_exact(&mut b).is_ok() && &b == b"SSH-2.0-",
        "the first eight are served"
    );
    let o = d.run("alice@test", &[dest, "true"]);
    assert!(o.status.success(), "another address still logs in: {o:?}");
    drop(held);
    // a bad authorized_keys file stops the server at start, saying where
    let bad = d.t.path().join("bad_keys");
    let alice = std::fs::read_to_string(d.t.path().join("alice@test.pub")).unwrap_or_default();
    std::fs::write(&bad, format!("command=\"true\" {alice}")).unwrap();
    let o = Command::new(agentvm_path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ssh-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(d.t.path().join("data2"))
        .arg("--ssh-authorized-keys")
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 1") && err.contains("options"), "{err}");
    assert!(!d.t.path().join("data2").exists(), "nothing was made");
    // nothing of this left a session behind
    assert_eq!(session(&d.s, "work"), Value::Null);
}

#[test]
fn ssh_forwards_reach_a_port_inside_and_nothing_else() {
    if !have_ssh() {
        return;
    }
    let d = door();
    let dest = "web@127.0.0.1";
    let mut web = Term::open(d.ssh("alice@test", &["-tt", "-o", &d.repo_env(), dest]));
    web.type_in("cd /workspace && python3 -m http.server 8124 --bind 127.0.0.1\n");
    web.expect("Serving HTTP");
    // -L, as a browser on the laptop would use it
    let local = free_port();
    let mut fwd = d.ssh(
        "alice@test",
        &["-N", "-L", &format!("{local}:localhost:8124"), dest],
    );
    let mut fwd = fwd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{local}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(r) = d.s.http.get(&url).send() {
            break r.text().unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "the forward never answered");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains("b.txt"), "the listing of /workspace: {body}");
    let _ = fwd.kill();
    let _ = fwd.wait();
    // -W: anywhere but the session's own loopback is refused, and so is a
    // port nothing listens on inside (the server's own port, say)
    let server_port = d.s.url.rsplit(':').next().unwrap_or("").to_string();
    for (target, why) in [
        ("10.1.2.3:80".to_string(), "forwards only to localhost"),
        ("example.com:80".to_string(), "forwards only to localhost"),
        (format!("localhost:{server_port}"), "nothing listens"),
        (format!("127.0.0.1:{}", d.port), "nothing listens"),
    ] {
        let o = d.run("alice@test", &["-W", &target, dest]);
        assert_eq!(o.status.code(), Some(255), "{target}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("administratively prohibited") && err.contains(why),
            "{target}: {err}"
        );
    }
    let o = d.run("alice@test", &["-W", "localhost:8124", "nosuch@127.0.0.1"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No session nosuch"),
        "{o:?}"
    );
    // bob cannot reach into alice's session
    let o = d.run("bob", &["-W", "localhost:8124", dest]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No session web"),
        "{o:?}"
    );
    web.hang_up();
}

/// A TCP connection to the door from `source` (one of loopback's many
/// addresses).
fn connect_from(source: &str, port: &str) -> std::net::TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let src: std::net::SocketAddrV4 = format!("{source}:0").parse().unwrap();
    let dst: std::net::SocketAddrV4 = format!("127.0.0.1:{port}").parse().unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(src)).unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst)).unwrap();
    std::net::TcpStream::from(fd)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[test]
fn the_ssh_host_key_is_kept_across_restarts() {
    if !have_ssh() {
        return;
    }
    let d = door();
    let (_, fp1) = d.s.ssh.clone().unwrap_or_default();
    assert!(fp1.starts_with("SHA256:"), "{fp1}");
    let key = d.s.data.join("ssh_host_ed25519_key");
    let mode = std::fs::metadata(&key).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o600));
    // ssh-keygen agrees with the fingerprint the server printed
    let o = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&key)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(&fp1), "{o:?}");
    let Door { t, repo, s, .. } = d;
    drop(s);
    let s = start(t.path());
    let port = port_of(&s);
    let d = Door { t, repo, s, port };
    let (_, fp2) = d.s.ssh.clone().unwrap_or_default();
    assert_eq!(fp1, fp2);
    // the known_hosts written before the restart still checks out
    let o = d.run("alice@test", &["again@127.0.0.1", "echo same"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "same\n");
}
