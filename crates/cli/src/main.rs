//! The `agentvm` binary.

mod agents;
mod client;
mod images;
mod pull;
mod serve;

use std::process::ExitCode;

use agentvm_runner::{egress, run};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentvm",
    version,
    about = "Run AI coding agents and any command in an isolated sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run COMMAND in a sandbox: /workspace is a copy-on-write view of --repo.
    ///
    /// Exit status: COMMAND's own; 128+N when killed by signal N; 124 on
    /// timeout; 137 when killed for exceeding --memory; 125 when the sandbox
    /// could not be set up; 126 when COMMAND is not executable; 127 when it
    /// is not found.
    Run(Box<run::RunArgs>),
    /// Run the sandbox a JSON RunRequest describes (what the server starts
    /// for a job when agentvm-run is not installed).
    #[command(hide = true)]
    RunRequest {
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Serve the HTTP API (the old /agent/run API and /v1).
    Serve(Box<serve::ServeArgs>),
    /// Take a consistent copy of the server's database (safe while it runs).
    Backup(serve::BackupArgs),
    /// Put a backup in place (refuses while a server uses the data directory).
    Restore(serve::RestoreArgs),
    /// Submit, list, show, follow, cancel and delete jobs on a server.
    Jobs {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::JobsCmd,
    },
    /// Start a session on a server and attach this terminal to it, or
    /// attach to one of yours (--attach NAME). Detach with Enter ~ . ; the
    /// session goes on until its command exits, `agentvm sessions kill`,
    /// its idle timeout or the server's shutdown.
    ///
    /// Exit status: the session's command's when it ends while attached;
    /// 0 on detach.
    Shell(Box<client::ShellArgs>),
    /// List, show, end, delete, download and apply sessions on a server.
    Sessions {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::SessionsCmd,
    },
    /// Workspaces on a server: persistent state of a repository that jobs
    /// build on, with checkpoints to restore and fork.
    Workspaces {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::WorkspacesCmd,
    },
    /// Images a sandbox can run on: import, list, show, rm, gc (the data
    /// directory's store; no server needed).
    Images(images::ImagesArgs),
    /// Create, list and revoke API keys on a server (admin).
    Keys {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::KeysCmd,
    },
    /// Show the server's audit trail, newest first (admin): every mutating
    /// call and every egress decision of every job.
    Audit {
        #[command(flatten)]
        conn: client::Conn,
        /// How many events to show (at most 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
        /// Only the events of this job (its calls and egress decisions).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// Run the egress proxy on a TCP address (benchmarks and policy debugging).
    #[command(hide = true)]
    EgressProxy {
        /// The allowlist, as in --network allow:LIST.
        #[arg(long)]
        allow: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// List the agent profiles and whether each CLI is present in the sandbox's view.
    Agents(agents::AgentsArgs),
    /// Report which isolation layers this kernel and this user can use.
    Doctor {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Cgroup to test creating limited cgroups under (as `run` would).
        #[arg(long, value_name = "PATH", env = "AGENTVM_CGROUP_PARENT")]
        cgroup_parent: Option<std::path::PathBuf>,
        /// The data directory whose image store to report on.
        #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version into a closed pipe: quiet too
            // SAFETY: as below, before any thread is started.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let _ = e.print();
            return ExitCode::from(agentvm_runner::parse_error_exit(&e));
        }
    };
    // Commands whose output goes to a person or a pipe end quietly when the
    // reader goes away (`agentvm jobs list | head -1`), as Unix tools do.
    // The server, the sandbox runner and the proxy keep SIGPIPE ignored:
    // a vanished peer is an error they report, not a reason to die.
    if !matches!(
        cli.command,
        Command::Serve(_)
            | Command::Run(_)
            | Command::RunRequest { .. }
            | Command::EgressProxy { .. }
    ) {
        // SAFETY: restoring the default disposition of SIGPIPE, before any
        // thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Run(args) => images::run(*args),
        Command::RunRequest { file } => run::main_request(&file),
        Command::Serve(args) => serve::serve(*args),
        Command::Jobs { conn, cmd } => client::jobs(conn, cmd),
        Command::Agents(a) => agents::main(a),
        Command::EgressProxy { allow, listen } => egress::standalone(&allow, listen),
        Command::Keys { conn, cmd } => client::keys(conn, cmd),
        Command::Shell(a) => client::shell(*a),
        Command::Sessions { conn, cmd } => client::sessions(conn, cmd),
        Command::Workspaces { conn, cmd } => client::workspaces(conn, cmd),
        Command::Audit { conn, limit, job } => client::audit(conn, limit, job),
        Command::Backup(args) => serve::backup(args),
        Command::Images(args) => images::images(args),
        Command::Restore(args) => serve::restore(args),
        Command::Doctor {
            json,
            cgroup_parent,
            data_dir,
        } => doctor(json, cgroup_parent.as_deref(), data_dir),
    }
}

fn doctor(
    json: bool,
    cgroup_parent: Option<&std::path::Path>,
    data_dir: Option<std::path::PathBuf>,
) -> ExitCode {
    let mut report = agentvm_sandbox::doctor::check(cgroup_parent);
    report.checks.push(images::doctor_check(data_dir));
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("agentvm doctor: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", report.render());
    }
    if report.sandbox_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
