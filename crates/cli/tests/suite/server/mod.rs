//! The control plane, end to end: the real `agentvm serve` on loopback.
//! This file holds the harness; the tests are split by concern below.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::common::*;

mod compat;
mod egress;
mod keys;
mod lifecycle;
mod pause;
mod recovery;
mod secrets;
mod sessions;
mod ssh;
mod tls;
mod web;
mod workspaces;

pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub data: PathBuf,
    pub key: String,
    pub http: Client,
    /// With --ssh-listen: the address and the host key's fingerprint it
    /// printed.
    pub ssh: Option<(String, String)>,
}

impl Server {
    /// Start `agentvm serve` on an ephemeral loopback port.
    pub fn start(data: &Path, extra: &[&str]) -> Server {
        Server::start_as(Who::Me, data, extra)
    }

    /// The same, as `who` (uid 65534: the copies in `bin_dir`, through
    /// setpriv, so the server and its sandboxes run rootless).
    pub fn start_as(who: Who, data: &Path, extra: &[&str]) -> Server {
        let mut child = command_as(who, &agentvm_path())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .env("AGENTVM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the server: {e}"));
        let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ssh = None;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                // "agentvm: SSH on ADDR, host key FP, N authorized keys"
                if let Some(rest) = line.strip_prefix("agentvm: SSH on ") {
                    let mut parts = rest.split(", ");
                    let addr = parts.next().unwrap_or("").to_string();
                    let fp = parts.next().unwrap_or("").trim_start_matches("host key ");
                    ssh = Some((addr, fp.to_string()));
                }
                if let Some(u) = line.strip_prefix("agentvm: listening on ") {
                    let _ = tx.send((u.to_string(), ssh.take()));
                }
            }
        });
        let (url, ssh) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the server did not start: {:?}", child.try_wait()));
        let key = std::fs::read_to_string(data.join("admin.key"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let http = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Server {
            child: Some(child),
            url,
            data: data.to_path_buf(),
            key,
            http,
            ssh,
        }
    }

    pub fn req(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut r = self.http.request(m, format!("{}{path}", self.url));
        if let Some(k) = key {
            r = r.header("X-API-Key", k);
        }
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = r.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().unwrap_or_default())
    }

    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (s, _, t) = self.req(method, path, Some(&self.key.clone()), body);
        (s, serde_json::from_str(&t).unwrap_or(Value::Null))
    }

    /// The `agentvm` client against this server with its admin key (HOME
    /// at `home`): run `args`, its output.
    pub fn cli(&self, home: &Path, args: &[&str]) -> std::process::Output {
        Command::new(agentvm_path())
            .args(args)
            .env("AGENTVM_URL", &self.url)
            .env("AGENTVM_API_KEY_FILE", self.data.join("admin.key"))
            .env("HOME", home)
            .output()
            .unwrap()
    }

    /// Poll a job until it has ended.
    pub fn wait(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, j) = self.json("GET", &format!("/v1/jobs/{id}"), None);
            let st = j["status"].as_str().unwrap_or("");
            if !matches!(st, "queued" | "running") || Instant::now() > deadline {
                return j;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submit a job (POST /v1/jobs with `body`) and wait until it ends:
    /// its id and its final record.
    pub fn run_job(&self, body: Value) -> (String, Value) {
        let (_, j) = self.json("POST", "/v1/jobs", Some(body));
        let id = j["id"].as_str().unwrap_or("").to_string();
        let done = self.wait(&id);
        (id, done)
    }

    /// GET `path` with the admin key: the body as text.
    pub fn text(&self, path: &str) -> String {
        self.req("GET", path, Some(&self.key.clone()), None).2
    }

    /// Poll until the job is running (or has ended).
    pub fn wait_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let (_, j) = self.json("GET", &format!("/v1/jobs/{id}"), None);
            if j["status"] != "queued" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&mut self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Wait for the server process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A data dir, an allowed root with a repo in it, and a running server.
pub fn setup(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Server) {
    let t = tempdir();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let repo = fixture_repo(Who::Me);
    let r = root.join("repo");
    let c = sh(
        t.path(),
        &format!("cp -R {}/. {}", repo.path().display(), r.display()),
    );
    assert!(c.status.success());
    let root_s = root.to_string_lossy().into_owned();
    let mut args = vec!["--allowed-root", &root_s];
    args.extend_from_slice(extra);
    let s = Server::start(&t.path().join("data"), &args);
    (t, r, s)
}

pub fn shell(repo: &Path, prompt: &str) -> Value {
    json!({"agent": "shell", "prompt": prompt, "repo_path": repo.to_string_lossy(), "timeout": 30})
}

/// Read server-sent events until `end`: (id, event, data) triples.
pub fn sse(s: &Server, path: &str, last_id: Option<&str>) -> Vec<(String, String, String)> {
    sse_live(s, path, last_id).iter().collect()
}

/// Server-sent events as they arrive, until `end`: (id, event, data)
/// triples from a reader thread.
pub fn sse_live(
    s: &Server,
    path: &str,
    last_id: Option<&str>,
) -> std::sync::mpsc::Receiver<(String, String, String)> {
    let mut r = s
        .http
        .get(format!("{}{path}", s.url))
        .header("X-API-Key", &s.key);
    if let Some(l) = last_id {
        r = r.header("Last-Event-ID", l);
    }
    let resp = r.send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut id, mut ev, mut data) = (String::new(), String::new(), Vec::<String>::new());
        for line in BufReader::new(resp).lines().map_while(Result::ok) {
            if line.is_empty() {
                if !ev.is_empty() || !data.is_empty() {
                    let end = ev == "end";
                    if tx.send((id.clone(), ev.clone(), data.join("\n"))).is_err() || end {
                        break;
                    }
                }
                id.clear();
                ev.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.into();
            } else if let Some(v) = line.strip_prefix("event: ") {
                ev = v.into();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v.into());
            } else if line == "data:" {
                data.push(String::new());
            }
        }
    });
    rx
}
