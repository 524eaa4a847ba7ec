//! The CLI as a client of `agentvm serve`: `agentvm jobs ...`, `agentvm keys ...`.
//!
//! The server URL and key come from flags, else AGENTVM_URL / AGENTVM_API_KEY
//! (or AGENTVM_API_KEY_FILE), else ~/.config/agentvm/client.toml
//! (`url = "..."`, `api_key_file = "..."`), else http://127.0.0.1:8000.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentvm_proto::api::{
    Applied, AuditEventView, AuditPage, ErrorBody, JobEnd, JobPage, JobRequest, JobStatus, JobView,
    KeyRequest, KeyView, NewKey,
};
use agentvm_proto::NetworkMode;
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Server URL [env AGENTVM_URL; default http://127.0.0.1:8000].
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// API key [env AGENTVM_API_KEY]. Prefer --api-key-file: flags show up in `ps`.
    #[arg(long, global = true, value_name = "KEY")]
    api_key: Option<String>,
    /// File holding the API key [env AGENTVM_API_KEY_FILE].
    #[arg(long, global = true, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Submit a job.
    Submit {
        /// Agent profile (aider, opencode, claude, codex, shell, ...).
        #[arg(long)]
        agent: String,
        /// Repository (inside the server's allowed roots).
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Seconds, 1 to 3600.
        #[arg(long, default_value_t = 600)]
        timeout: i64,
        /// This job's network instead of the profile's: none, host or
        /// allow:HOST[:PORT],..., no wider than the profile's unless the
        /// key was granted more.
        #[arg(long, value_name = "MODE", value_parser = NetworkMode::parse)]
        network: Option<NetworkMode>,
        /// Wait until the job ends (a spinner shows progress); exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
        /// Stream the job's output until it ends; exit 0 only if it succeeded.
        #[arg(long, short = 'f')]
        follow: bool,
        /// With -f: also print each egress decision, as it is made, to stderr.
        #[arg(long, requires = "follow")]
        egress: bool,
        /// The prompt.
        prompt: String,
        /// Extra arguments for the agent.
        #[arg(last = true)]
        extra_args: Vec<String>,
    },
    /// List jobs, newest first.
    List {
        /// queued, running, succeeded, failed, timed_out, cancelled or interrupted.
        #[arg(long, value_parser = str::parse::<JobStatus>)]
        status: Option<JobStatus>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one job.
    Show { id: String },
    /// Print a job's output; -f follows it until it ends.
    Logs {
        id: String,
        #[arg(long, short = 'f')]
        follow: bool,
        /// With -f: also print each egress decision, as it is made, to stderr.
        #[arg(long, requires = "follow")]
        egress: bool,
    },
    /// Print (or save) a job's patch.
    Patch {
        id: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print (or save) a job's output as an asciicast v2 recording
    /// (`asciinema play FILE` replays it).
    Recording {
        id: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Cancel a queued or running job.
    Cancel { id: String },
    /// Put an ended job's patch on a new branch agentvm/<id> of its repo
    /// (no hook runs; the work tree is untouched).
    Apply { id: String },
    /// Delete an ended job and its output.
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// read, run or admin (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// What this key's jobs may use beyond their profile's network
        /// policy: none, host or allow:HOST[:PORT],... (without it a
        /// key's jobs may only narrow their profile's).
        #[arg(long, value_name = "MODE", value_parser = NetworkMode::parse)]
        network: Option<NetworkMode>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key.
    Revoke { id: String },
}

struct Client {
    url: String,
    key: Option<String>,
    http: reqwest::Client,
    json: bool,
}

#[derive(serde::Deserialize, Default)]
struct ClientFile {
    url: Option<String>,
    api_key_file: Option<PathBuf>,
}

fn read_key_file(p: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading the API key from {}: {e}", p.display()))
}

/// An API path from its segments and query: every value is exactly one
/// percent-encoded segment or parameter, so an id such as `../keys` or
/// `x?limit=1` names a job that does not exist instead of another route.
/// `.` and `..`, which URL parsers resolve even when encoded, are refused.
fn api_path(segments: &[&str], query: &[(&str, &str)]) -> Result<String, String> {
    if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
        return Err(format!("{bad:?} is not an id"));
    }
    let mut u = reqwest::Url::parse("http://agentvm.invalid/").map_err(|e| e.to_string())?;
    u.path_segments_mut()
        .map_err(|()| "the base URL cannot hold a path".to_string())?
        .extend(segments);
    if !query.is_empty() {
        u.query_pairs_mut().extend_pairs(query);
    }
    let mut out = u.path().to_string();
    if let Some(q) = u.query() {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

impl Client {
    fn new(c: &Conn) -> Result<Client, String> {
        let file: ClientFile = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/agentvm/client.toml"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| toml::from_str(&t).map_err(|e| format!("~/.config/agentvm/client.toml: {e}")))
            .transpose()?
            .unwrap_or_default();
        let url = c
            .server
            .clone()
            .or_else(|| std::env::var("AGENTVM_URL").ok())
            .or(file.url)
            .unwrap_or_else(|| "http://127.0.0.1:8000".into())
            .trim_end_matches('/')
            .to_string();
        let key = match (&c.api_key, &c.api_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(f)) => Some(read_key_file(f)?),
            (None, None) => match (
                std::env::var("AGENTVM_API_KEY"),
                std::env::var_os("AGENTVM_API_KEY_FILE"),
            ) {
                (Ok(k), _) => Some(k),
                (_, Some(f)) => Some(read_key_file(&PathBuf::from(f))?),
                _ => match &file.api_key_file {
                    Some(f) => Some(read_key_file(f)?),
                    // a server of this user's on the embedded defaults wrote
                    // its first admin key here
                    None => {
                        let local = crate::serve::default_data_dir().join("admin.key");
                        std::fs::read_to_string(&local)
                            .ok()
                            .map(|s| s.trim().to_string())
                    }
                },
            },
        };
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Err(format!(
                "no API key: pass --api-key-file FILE or set AGENTVM_API_KEY_FILE (a new server writes its first admin key to {}/admin.key, or /var/lib/agentvm/admin.key when it runs as root; an admin makes more with `agentvm keys create`)",
                crate::serve::default_data_dir().display()
            ));
        };
        let key = Some(key);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            url,
            key,
            http,
            json: c.json,
        })
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.url));
        match &self.key {
            Some(k) => r.header("X-API-Key", k),
            None => r,
        }
    }

    /// Send; a 429 (rate limit, full queue) is retried after its
    /// Retry-After, a few times, saying so on stderr; any other non-2xx
    /// answer becomes one clear line.
    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        let mut r = r;
        let mut retries = 0;
        let resp = loop {
            let again = r.try_clone();
            let resp = r.send().await.map_err(|e| {
                if e.is_connect() {
                    format!(
                        "cannot reach the server at {} (is `agentvm serve` running?)",
                        self.url
                    )
                } else {
                    e.to_string()
                }
            })?;
            match again {
                Some(next) if resp.status().as_u16() == 429 && retries < MAX_RETRIES => {
                    let secs = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(1)
                        .clamp(1, 60);
                    eprintln!("agentvm: the server is busy (429); trying again in {secs} s");
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    retries += 1;
                    r = next;
                }
                _ => break resp,
            }
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<ErrorBody>(&body)
            .map(|e| e.to_string())
            .unwrap_or(body);
        if status.as_u16() == 401 {
            return Err(format!(
                "the server at {} refused the API key ({detail}): it was revoked, or it belongs to another server; pass the right one with --api-key-file or AGENTVM_API_KEY_FILE",
                self.url
            ));
        }
        Err(format!(
            "{} {}: {detail}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        read(self.send(self.req(reqwest::Method::GET, path)).await?).await
    }

    async fn call<T: DeserializeOwned>(&self, r: reqwest::RequestBuilder) -> Result<T, String> {
        read(self.send(r).await?).await
    }
}

/// How often a 429 is retried before it is reported.
const MAX_RETRIES: u32 = 5;

/// An answer read as the type the API says it is.
async fn read<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, String> {
    let b = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    serde_json::from_slice(&b)
        .map_err(|e| format!("the server's answer is not what this client expects: {e}"))
}

fn print_json<T: Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let now = agentvm_store::now_ms();
    let s = ((now - ms) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn status_exit(status: JobStatus) -> ExitCode {
    if status == JobStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One egress decision as a line for a person: the decision when it is
/// made, nothing more for an allowed connection's end.
fn egress_line(data: &str) -> Option<String> {
    use agentvm_proto::{EgressLine, Phase};
    match EgressLine::parse(data.as_bytes())? {
        EgressLine::Unrecorded { unrecorded: u } => Some(format!(
            "agentvm: egress: past the first {} connections, decisions are only counted: {} allowed, {} refused so far",
            u.limit, u.allowed, u.refused
        )),
        EgressLine::Record(r) if r.allowed && r.phase == Phase::Open => {
            Some(format!("agentvm: egress {} allowed", r.target()))
        }
        EgressLine::Record(r) if !r.allowed => Some(format!(
            "agentvm: egress {} refused ({})",
            r.target(),
            r.reason.as_deref().unwrap_or("?")
        )),
        EgressLine::Record(_) => None,
    }
}

/// Follow a job's SSE stream, printing output to stdout/stderr (and, with
/// `egress`, the proxy's decisions); resumes after a dropped connection.
/// Returns the final status.
async fn follow(c: &Client, id: &str, egress: bool) -> Result<JobStatus, String> {
    use futures_util::StreamExt;
    let mut last: Option<String> = None;
    for _attempt in 0..20 {
        let mut r = c.req(
            reqwest::Method::GET,
            &api_path(&["v1", "jobs", id, "logs"], &[("follow", "true")])?,
        );
        if let Some(l) = &last {
            r = r.header("Last-Event-ID", l);
        }
        let resp = c.send(r).await?;
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let (mut ev, mut eid, mut data) = (String::new(), None::<String>, Vec::<String>::new());
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find('\n') {
                let line = buf[..pos].trim_end_matches('\r').to_string();
                buf.drain(..=pos);
                if line.is_empty() {
                    let text = data.join("\n");
                    match ev.as_str() {
                        "stdout" => {
                            print!("{text}");
                            let _ = std::io::stdout().flush();
                        }
                        "stderr" => eprint!("{text}"),
                        "egress" if egress => {
                            if let Some(l) = egress_line(&text) {
                                eprintln!("{l}");
                            }
                        }
                        "end" => {
                            return serde_json::from_str::<JobEnd>(&text)
                                .map(|e| e.status)
                                .map_err(|e| format!("the job's end event is unreadable: {e}"));
                        }
                        _ => {}
                    }
                    if eid.is_some() {
                        last = eid.take();
                    }
                    ev.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    eid = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("lost the connection to the server while following the job".into())
}

/// Poll until the job ends, with a spinner on a terminal.
async fn wait(c: &Client, id: &str) -> Result<JobView, String> {
    let tty = std::io::stderr().is_terminal() && !c.json;
    let frames = ['|', '/', '-', '\\'];
    let start = Instant::now();
    let mut i = 0usize;
    loop {
        let j: JobView = c.get(&api_path(&["v1", "jobs", id], &[])?).await?;
        let st = j.status;
        if st.is_final() {
            if tty {
                eprint!("\r\x1b[2K");
            }
            return Ok(j);
        }
        if tty {
            eprint!(
                "\r{} {id} {st} {:.1}s",
                frames[i % 4],
                start.elapsed().as_secs_f64()
            );
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rt() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn finish(r: Result<ExitCode, String>) -> ExitCode {
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentvm: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn jobs(conn: Conn, cmd: JobsCmd) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(jobs_inner(&c, cmd))
    })())
}

/// GET /v1/jobs/{id}/{what} to `output`, or to stdout (as {"id", what}
/// with --json). Written as it arrives: memory does not follow its size.
async fn download(
    c: &Client,
    id: &str,
    what: &str,
    output: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let resp = c
        .send(c.req(
            reqwest::Method::GET,
            &api_path(&["v1", "jobs", id, what], &[])?,
        ))
        .await?;
    if c.json && output.is_none() {
        let b = resp.bytes().await.map_err(|e| e.to_string())?;
        print_json(&json!({"id": id, what: String::from_utf8_lossy(&b)}));
        return Ok(ExitCode::SUCCESS);
    }
    let mut sink: Box<dyn Write> = match &output {
        Some(f) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(f).map_err(|e| format!("{}: {e}", f.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    copy_body(resp, &mut *sink)
        .await
        .map_err(|e| match &output {
            Some(f) => format!("{}: {e}", f.display()),
            None => e,
        })?;
    Ok(ExitCode::SUCCESS)
}

/// Copy a response body to `out` piece by piece.
async fn copy_body(resp: reqwest::Response, out: &mut dyn Write) -> Result<(), String> {
    use futures_util::StreamExt;
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| format!("reading the answer: {e}"))?;
        out.write_all(&piece).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

async fn jobs_inner(c: &Client, cmd: JobsCmd) -> Result<ExitCode, String> {
    use reqwest::Method;
    match cmd {
        JobsCmd::Submit {
            agent,
            repo,
            timeout,
            network,
            wait: w,
            follow: f,
            egress,
            prompt,
            extra_args,
        } => {
            let repo = std::fs::canonicalize(&repo).unwrap_or(repo);
            let body = JobRequest {
                agent,
                prompt,
                repo_path: repo.to_string_lossy().into_owned(),
                timeout,
                extra_args,
                network,
            };
            let job: JobView = c.call(c.req(Method::POST, "/v1/jobs").json(&body)).await?;
            let id = job.id.clone();
            if f {
                let st = follow(c, &id, egress).await?;
                if c.json {
                    print_json(
                        &c.get::<JobView>(&api_path(&["v1", "jobs", &id], &[])?)
                            .await?,
                    );
                } else {
                    eprintln!("agentvm: {id} {st}");
                }
                return Ok(status_exit(st));
            }
            if w {
                let j = wait(c, &id).await?;
                if c.json {
                    print_json(&j);
                } else {
                    println!(
                        "{id} {}{}",
                        j.status,
                        j.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                }
                return Ok(status_exit(j.status));
            }
            if c.json {
                print_json(&job);
            } else {
                println!("{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::List {
            status,
            agent,
            limit,
        } => {
            let limit = limit.to_string();
            let mut q = vec![("limit", limit.as_str())];
            if let Some(s) = status {
                q.push(("status", s.as_str()));
            }
            if let Some(a) = &agent {
                q.push(("agent", a));
            }
            let page: JobPage = c.get(&api_path(&["v1", "jobs"], &q)?).await?;
            if c.json {
                print_json(&page);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<22} {:<12} {:<10} {:<10} {:>5}  PROMPT",
                "ID", "STATUS", "AGENT", "CREATED", "EXIT"
            );
            for j in &page.jobs {
                let prompt: String = j
                    .prompt
                    .chars()
                    .take(40)
                    .map(|ch| if ch.is_control() { ' ' } else { ch })
                    .collect();
                println!(
                    "{:<22} {:<12} {:<10} {:<10} {:>5}  {prompt}",
                    j.id,
                    j.status.as_str(),
                    j.agent,
                    ago(Some(j.created_at)),
                    j.exit_code
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Show { id } => {
            let j: JobView = c.get(&api_path(&["v1", "jobs", &id], &[])?).await?;
            if c.json {
                print_json(&j);
            } else {
                let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                for (k, v) in [
                    ("id", j.id.clone()),
                    ("status", j.status.to_string()),
                    ("agent", j.agent.clone()),
                    ("repo_path", j.repo_path.clone()),
                    ("prompt", j.prompt.clone()),
                    ("timeout_s", j.timeout_s.to_string()),
                    ("exit_code", opt(j.exit_code.map(|e| e.to_string()))),
                    ("error", opt(j.error.clone())),
                ] {
                    println!("{k:<12} {v}");
                }
                println!("{:<12} {}", "created", ago(Some(j.created_at)));
                if let Some(r) = j.run_result() {
                    for e in r.egress.iter().flatten() {
                        println!(
                            "{:<12} {} {} ({} B up, {} B down)",
                            "egress",
                            e.target(),
                            e.outcome(),
                            e.bytes_up,
                            e.bytes_down
                        );
                    }
                    println!("{:<12} {}", "changed", r.changed_files.join(" "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Logs {
            id,
            follow: f,
            egress,
        } => {
            if f {
                let st = follow(c, &id, egress).await?;
                return Ok(status_exit(st));
            }
            download(c, &id, "logs", None).await
        }
        JobsCmd::Patch { id, output } => download(c, &id, "patch", output).await,
        JobsCmd::Recording { id, output } => download(c, &id, "recording", output).await,
        JobsCmd::Cancel { id } => {
            let j: JobView = c
                .call(c.req(
                    Method::POST,
                    &api_path(&["v1", "jobs", &id, "cancel"], &[])?,
                ))
                .await?;
            if c.json {
                print_json(&j);
            } else {
                println!("{id} cancelling");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Apply { id } => {
            let v: Applied = c
                .call(c.req(Method::POST, &api_path(&["v1", "jobs", &id, "apply"], &[])?))
                .await?;
            if c.json {
                print_json(&v);
            } else {
                println!("branch {} at {}", v.branch, v.commit);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Delete { id } => {
            c.send(c.req(Method::DELETE, &api_path(&["v1", "jobs", &id], &[])?))
                .await?;
            if c.json {
                print_json(&json!({"id": id, "deleted": true}));
            } else {
                println!("{id} deleted");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn audit(conn: Conn, limit: i64, job: Option<String>) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(audit_inner(&c, limit, job))
    })())
}

/// Page through /v1/audit until `limit` events (of `job`, if given) are
/// collected or the trail ends.
async fn audit_inner(c: &Client, limit: i64, job: Option<String>) -> Result<ExitCode, String> {
    let mut out: Vec<AuditEventView> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "200")];
        if let Some(cur) = &cursor {
            q.push(("cursor", cur));
        }
        let path = api_path(&["v1", "audit"], &q)?;
        let page: AuditPage = c.get(&path).await?;
        for e in page.events {
            let of_job = job.as_deref().is_none_or(|id| {
                e.target.as_deref() == Some(id)
                    || e.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with(&format!("job {id};")))
            });
            if of_job && (out.len() as i64) < limit {
                out.push(e);
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() || out.len() as i64 >= limit {
            break;
        }
    }
    if c.json {
        print_json(&out);
        return Ok(ExitCode::SUCCESS);
    }
    for e in &out {
        println!(
            "{:<10} {:<12} {:<32} {:<28} {}",
            ago(Some(e.ts)),
            e.action,
            e.target.as_deref().unwrap_or("-"),
            e.outcome,
            e.detail.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn keys(conn: Conn, cmd: KeysCmd) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(keys_inner(&c, cmd))
    })())
}

async fn keys_inner(c: &Client, cmd: KeysCmd) -> Result<ExitCode, String> {
    use reqwest::Method;
    match cmd {
        KeysCmd::Create {
            name,
            scopes,
            network,
        } => {
            let body = KeyRequest {
                name,
                scopes,
                network,
            };
            let k: NewKey = c.call(c.req(Method::POST, "/v1/keys").json(&body)).await?;
            if c.json {
                print_json(&k);
            } else {
                eprintln!(
                    "agentvm: created {} ({}); the secret below is shown once:",
                    k.id,
                    k.scopes.join(",")
                );
                println!("{}", k.key);
            }
        }
        KeysCmd::List => {
            let ks: Vec<KeyView> = c.get("/v1/keys").await?;
            if c.json {
                print_json(&ks);
            } else {
                println!(
                    "{:<18} {:<16} {:<10} {:<10} NAME",
                    "ID", "SCOPES", "SOURCE", "STATE"
                );
                for k in &ks {
                    println!(
                        "{:<18} {:<16} {:<10} {:<10} {}",
                        k.id,
                        k.scopes.join(","),
                        k.source,
                        if k.revoked_at.is_none() {
                            "active"
                        } else {
                            "revoked"
                        },
                        k.name
                    );
                }
            }
        }
        KeysCmd::Revoke { id } => {
            c.send(c.req(Method::DELETE, &api_path(&["v1", "keys", &id], &[])?))
                .await?;
            if c.json {
                print_json(&json!({"id": id, "revoked": true}));
            } else {
                println!("{id} revoked");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::api_path;

    #[test]
    fn a_value_is_one_segment_or_one_parameter() {
        let p = |s: &[&str], q: &[(&str, &str)]| api_path(s, q).unwrap();
        assert_eq!(p(&["v1", "jobs", "../keys"], &[]), "/v1/jobs/..%2Fkeys");
        assert_eq!(
            p(&["v1", "jobs", "x?limit=1#f"], &[]),
            "/v1/jobs/x%3Flimit=1%23f"
        );
        assert_eq!(p(&["v1", "jobs", "%2e%2e"], &[]), "/v1/jobs/%252e%252e");
        assert_eq!(
            p(
                &["v1", "jobs"],
                &[("agent", "shell&status=queued"), ("limit", "5")]
            ),
            "/v1/jobs?agent=shell%26status%3Dqueued&limit=5"
        );
        for bad in ["..", ".", ""] {
            assert!(api_path(&["v1", "jobs", bad], &[]).is_err(), "{bad:?}");
        }
    }
}
