//! `agentvm-run`: only the sandbox runner (the agentvm-runner crate), for
//! `agentvm serve` to start for each job (`agentvm-run run-request FILE`;
//! `agentvm-run run ARGS` is `agentvm run ARGS`). Linking nothing else
//! keeps each sandbox's supervisor small: its relocated data and page
//! tables are a fraction of the full binary's.

use std::process::ExitCode;

use agentvm_runner::run;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentvm-run",
    version,
    about = "The sandbox runner alone: `agentvm-run run ...` is `agentvm run ...`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run COMMAND in a sandbox (see `agentvm run --help`).
    Run(Box<run::RunArgs>),
    /// Run the sandbox a JSON RunRequest describes (what the server writes
    /// for each job).
    RunRequest {
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(Cli {
            command: Command::Run(args),
        }) => run::main(*args),
        Ok(Cli {
            command: Command::RunRequest { file },
        }) => run::main_request(&file),
        Err(e) => {
            let _ = e.print();
            ExitCode::from(agentvm_runner::parse_error_exit(&e))
        }
    }
}
