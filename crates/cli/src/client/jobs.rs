//! `agentvm jobs ...`: submit, list, show, follow, download, cancel,
//! apply, delete.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentvm_proto::api::{Applied, JobEnd, JobPage, JobRequest, JobStatus, JobView};
use agentvm_proto::NetworkMode;
use clap::Subcommand;
use serde_json::json;

use super::{ago, api_path, finish, print_json, rt, Client, Conn};

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Submit a job.
    Submit {
        /// Agent profile (aider, opencode, claude, codex, shell, ...).
        #[arg(long)]
        agent: String,
        /// Repository (inside the server's allowed roots).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "workspace",
            conflicts_with = "workspace"
        )]
        repo: Option<PathBuf>,
        /// Run over this workspace (id or name) instead: the job starts
        /// from its state and its changes stay in it.
        #[arg(long, value_name = "W")]
        workspace: Option<String>,
        /// With --workspace: read it beside whoever writes it (its state
        /// now); nothing the job changes is kept in it.
        #[arg(long, requires = "workspace")]
        read_only: bool,
        /// Seconds, 1 to 3600.
        #[arg(long, default_value_t = 600)]
        timeout: i64,
        /// This job's network instead of the profile's: none, host or
        /// allow:HOST[:PORT],..., no wider than the profile's unless the
        /// key was granted more.
        #[arg(long, value_name = "MODE", value_parser = NetworkMode::parse)]
        network: Option<NetworkMode>,
        /// Run on this image of the server's store (a tag or digest)
        /// instead of the profile's or the host's system directories.
        #[arg(long, value_name = "NAME")]
        image: Option<String>,
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

pub fn jobs(conn: Conn, cmd: JobsCmd) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(jobs_inner(&c, cmd))
    })())
}

/// POST /v1/{kind}/{id}/apply: the new branch, printed (as JSON with
/// --json).
pub(super) async fn apply(c: &Client, kind: &str, id: &str) -> Result<ExitCode, String> {
    let v: Applied = c
        .call(c.req(
            reqwest::Method::POST,
            &api_path(&["v1", kind, id, "apply"], &[])?,
        ))
        .await?;
    if c.json {
        print_json(&v);
    } else {
        println!("branch {} at {}", v.branch, v.commit);
    }
    Ok(ExitCode::SUCCESS)
}

/// GET /v1/jobs/{id}/{what} to `output`, or to stdout (as {"id", what}
/// with --json). Written as it arrives: memory does not follow its size.
pub(super) async fn download(
    c: &Client,
    kind: &str,
    id: &str,
    what: &str,
    output: Option<PathBuf>,
) -> Result<ExitCode, String> {
    download_query(c, kind, id, what, &[], output).await
}

/// [`download`] with a query string.
pub(super) async fn download_query(
    c: &Client,
    kind: &str,
    id: &str,
    what: &str,
    query: &[(&str, &str)],
    output: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let resp = c
        .send(c.req(
            reqwest::Method::GET,
            &api_path(&["v1", kind, id, what], query)?,
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
            workspace,
            read_only,
            timeout,
            network,
            image,
            wait: w,
            follow: f,
            egress,
            prompt,
            extra_args,
        } => {
            let repo_path = repo
                .map(|r| std::fs::canonicalize(&r).unwrap_or(r))
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            let body = JobRequest {
                agent,
                prompt,
                repo_path,
                workspace,
                read_only,
                timeout,
                extra_args,
                network: network.map(|n| n.to_string()),
                image,
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
            download(c, "jobs", &id, "logs", None).await
        }
        JobsCmd::Patch { id, output } => download(c, "jobs", &id, "patch", output).await,
        JobsCmd::Recording { id, output } => download(c, "jobs", &id, "recording", output).await,
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
        JobsCmd::Apply { id } => apply(c, "jobs", &id).await,
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
