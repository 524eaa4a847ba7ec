//! `agentvm shell` (start or attach a session from this terminal) and
//! `agentvm sessions list|show|kill|pause|resume|delete|patch|recording|apply`.

use std::path::PathBuf;
use std::process::ExitCode;

use agentvm_proto::api::{SessionPage, SessionRequest, SessionStatus, SessionView};
use agentvm_proto::NetworkMode;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::json;

use super::attach::{self, Ended};
use super::{ago, api_path, finish, print_json, rt, Client, Conn};

#[derive(Args, Debug)]
pub struct ShellArgs {
    #[command(flatten)]
    conn: Conn,
    /// Repository shown copy-on-write at /workspace (inside the server's
    /// allowed roots); without it, an empty /workspace.
    #[arg(long, value_name = "DIR", conflicts_with = "workspace")]
    repo: Option<PathBuf>,
    /// Over this workspace (id or name) instead: the session starts from
    /// its state, and its changes stay in it when it ends.
    #[arg(long, value_name = "W", conflicts_with = "attach")]
    workspace: Option<String>,
    /// With --workspace: read it beside whoever writes it; nothing the
    /// session changes is kept in it.
    #[arg(long, requires = "workspace")]
    workspace_read_only: bool,
    /// The session's name: attach to your live session of that name, or
    /// start one so named.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Attach to your live session NAME (or id); never starts one.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["repo", "name", "agent", "command"])]
    attach: Option<String>,
    /// Run this agent's interactive mode instead of a shell.
    #[arg(long, value_name = "AGENT", conflicts_with = "command")]
    agent: Option<String>,
    /// The session's network instead of its profile's: none, host or
    /// allow:HOST[:PORT],... (narrower only, unless the key was granted more).
    #[arg(long, value_name = "MODE", value_parser = NetworkMode::parse)]
    network: Option<NetworkMode>,
    /// Seconds with no input and no viewer before the session ends.
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<i64>,
    /// Memory limit ("512M", "2G"), at most the profile's.
    #[arg(long)]
    memory: Option<String>,
    /// Run on this image of the server's store (a tag or digest).
    #[arg(long, value_name = "NAME")]
    image: Option<String>,
    /// Record what is typed too (off by default: it holds passwords).
    #[arg(long)]
    record_input: bool,
    /// Watch only: never type into the session.
    #[arg(long)]
    read_only: bool,
    /// Start the session and print it, without attaching.
    #[arg(long, short = 'd', conflicts_with = "attach")]
    detached: bool,
    /// The command to run instead of a shell (under the shell profile).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum SessionsCmd {
    /// List sessions, newest first.
    List {
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=200))]
        limit: i64,
    },
    /// Show one session (id, or the name of a live one).
    Show { id: String },
    /// End a live session (its command gets SIGHUP; recording and patch are kept).
    Kill { id: String },
    /// Freeze every process of a live session: no CPU, memory kept, input
    /// ignored, its idle timeout stopped. Viewers stay, read-only.
    Pause { id: String },
    /// Let a paused session run on from where it was.
    Resume { id: String },
    /// Delete an ended session with its recording and patch.
    Delete { id: String },
    /// Print (or save) an ended session's patch.
    Patch {
        id: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print (or save) a session's asciicast v2 recording (`asciinema play FILE`).
    Recording {
        id: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Put an ended session's patch on a new branch agentvm/<id> of its repo.
    Apply { id: String },
}

pub fn shell(a: ShellArgs) -> ExitCode {
    finish((|| {
        let c = Client::new(&a.conn)?;
        rt()?.block_on(shell_inner(&c, a))
    })())
}

pub fn sessions(conn: Conn, cmd: SessionsCmd) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(sessions_inner(&c, cmd))
    })())
}

/// The caller's session `id_or_name`, if there is one.
async fn lookup(c: &Client, id_or_name: &str) -> Result<Option<SessionView>, String> {
    let r = c.http.get(format!(
        "{}{}",
        c.url,
        api_path(&["v1", "sessions", id_or_name], &[])?
    ));
    let r = match &c.key {
        Some(k) => r.header("X-API-Key", k),
        None => r,
    };
    let resp = r
        .send()
        .await
        .map_err(|e| format!("cannot reach the server at {}: {e}", c.url))?;
    if resp.status().as_u16() == 404 {
        return Ok(None);
    }
    let resp = c.send_checked(resp).await?;
    super::read(resp).await.map(Some)
}

async fn shell_inner(c: &Client, a: ShellArgs) -> Result<ExitCode, String> {
    let target = match (&a.attach, &a.name) {
        (Some(n), _) => match lookup(c, n).await? {
            Some(s) if s.status == SessionStatus::Running => s,
            Some(s) => {
                return Err(format!(
                    "session {} has ended ({}); its recording: agentvm sessions recording {}",
                    s.name, s.status, s.id
                ))
            }
            None => {
                return Err(format!(
                    "you have no live session {n} (agentvm sessions list)"
                ))
            }
        },
        (None, Some(n)) => match lookup(c, n).await? {
            Some(s) if s.status == SessionStatus::Running => s,
            _ => create(c, &a).await?,
        },
        (None, None) => create(c, &a).await?,
    };
    if target.status != SessionStatus::Running {
        return Err(format!(
            "session {} did not start: {}",
            target.name,
            target.error.as_deref().unwrap_or("no reason given")
        ));
    }
    if a.detached {
        if c.json {
            print_json(&target);
        } else {
            println!(
                "{} {} started; attach: agentvm shell --attach {}",
                target.name, target.id, target.name
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    match attach::attach(c, &target.id, a.read_only).await? {
        Ended::Detached => {
            eprintln!(
                "agentvm: detached from session {}; it goes on: agentvm shell --attach {}",
                target.name, target.name
            );
            Ok(ExitCode::SUCCESS)
        }
        Ended::Exited(code) => Ok(ExitCode::from(
            code.map(|c| u8::try_from(c).unwrap_or(1)).unwrap_or(1),
        )),
    }
}

async fn create(c: &Client, a: &ShellArgs) -> Result<SessionView, String> {
    let repo = match &a.repo {
        Some(r) => Some(
            std::fs::canonicalize(r)
                .map_err(|e| format!("--repo {}: {e}", r.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let (rows, cols) = attach::term_size().unzip();
    let req = SessionRequest {
        repo_path: repo,
        workspace: a.workspace.clone(),
        read_only: a.workspace_read_only,
        name: a.name.clone(),
        agent: a.agent.clone(),
        command: (!a.command.is_empty()).then(|| a.command.clone()),
        network: a.network.as_ref().map(|n| n.to_string()),
        idle_timeout: a.idle_timeout,
        memory: a.memory.clone(),
        pids: None,
        image: a.image.clone(),
        rows,
        cols,
        record_input: a.record_input,
    };
    c.call(c.req(Method::POST, "/v1/sessions").json(&req)).await
}

fn command_of(s: &SessionView) -> String {
    match &s.agent {
        Some(a) => a.clone(),
        None => s.command.join(" "),
    }
}

async fn sessions_inner(c: &Client, cmd: SessionsCmd) -> Result<ExitCode, String> {
    match cmd {
        SessionsCmd::List { limit } => {
            let l = limit.to_string();
            let page: SessionPage = c
                .get(&api_path(&["v1", "sessions"], &[("limit", &l)])?)
                .await?;
            if c.json {
                print_json(&page);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:<21} {:<12} {:<8} {:<10} COMMAND",
                "NAME", "ID", "STATUS", "VIEWERS", "CREATED"
            );
            for s in &page.sessions {
                let cmd = command_of(s);
                println!(
                    "{:<20} {:<21} {:<12} {:<8} {:<10} {}",
                    s.name,
                    s.id,
                    s.status.to_string(),
                    s.viewers.len(),
                    ago(Some(s.created_at)),
                    agentvm_store::bounded(&cmd, 60)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Show { id } => {
            let s: SessionView = c.get(&api_path(&["v1", "sessions", &id], &[])?).await?;
            if c.json {
                print_json(&s);
                return Ok(ExitCode::SUCCESS);
            }
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            for (k, v) in [
                ("name", s.name.clone()),
                ("id", s.id.clone()),
                ("status", s.status.to_string()),
                ("owner", s.owner.clone()),
                ("command", command_of(&s)),
                ("repo_path", opt(s.repo_path.clone())),
                ("network", opt(s.network.as_ref().map(|n| n.to_string()))),
                ("idle_timeout", format!("{} s", s.idle_timeout_s)),
                ("paused", if s.paused { "yes" } else { "no" }.into()),
                ("created", ago(Some(s.created_at))),
                ("ended", ago(s.ended_at)),
                ("exit_code", opt(s.exit_code.map(|e| e.to_string()))),
                ("error", opt(s.error.clone())),
                (
                    "recording",
                    opt(s.recording_bytes.map(|b| format!("{b} bytes"))),
                ),
            ] {
                println!("{k:<13} {v}");
            }
            for v in &s.viewers {
                let mode = if v.writer { "writes" } else { "watches" };
                println!("{:<13} {} ({mode})", "viewer", v.who);
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Kill { id } => {
            let s: SessionView = c.get(&api_path(&["v1", "sessions", &id], &[])?).await?;
            if s.status != SessionStatus::Running {
                return Err(format!(
                    "session {} has already ended ({}); `agentvm sessions delete {}` removes it",
                    s.name, s.status, s.id
                ));
            }
            let s: SessionView = c
                .call(c.req(Method::DELETE, &api_path(&["v1", "sessions", &s.id], &[])?))
                .await?;
            if c.json {
                print_json(&s);
            } else {
                println!("{} ending", s.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Pause { ref id } | SessionsCmd::Resume { ref id } => {
            let (route, did) = match &cmd {
                SessionsCmd::Pause { .. } => ("pause", "paused"),
                _ => ("resume", "resumed"),
            };
            let s: SessionView = c
                .call(c.req(
                    Method::POST,
                    &api_path(&["v1", "sessions", id, route], &[])?,
                ))
                .await?;
            if c.json {
                print_json(&s);
            } else {
                println!("{} {did}", s.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Delete { id } => {
            let s: SessionView = c.get(&api_path(&["v1", "sessions", &id], &[])?).await?;
            if s.status == SessionStatus::Running {
                return Err(format!(
                    "session {} is running; end it first with `agentvm sessions kill {}`",
                    s.name, s.name
                ));
            }
            c.send(c.req(Method::DELETE, &api_path(&["v1", "sessions", &s.id], &[])?))
                .await?;
            if c.json {
                print_json(&json!({"id": s.id, "deleted": true}));
            } else {
                println!("{} deleted", s.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Patch { id, output } => {
            super::jobs::download(c, "sessions", &id, "patch", output).await
        }
        SessionsCmd::Recording { id, output } => {
            super::jobs::download(c, "sessions", &id, "recording", output).await
        }
        SessionsCmd::Apply { id } => super::jobs::apply(c, "sessions", &id).await,
    }
}
