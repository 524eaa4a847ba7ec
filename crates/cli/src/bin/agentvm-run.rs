//! `agentvm-run`: only the sandbox runner, for `agentvm serve` to start for
//! each job (`agentvm-run run ARGS` is `agentvm run ARGS`). Linking nothing
//! else keeps each sandbox's supervisor small: its relocated data and page
//! tables are a fraction of the full binary's.

use std::process::ExitCode;

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
    Run(Box<agentvm::run::RunArgs>),
}

fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(Cli {
            command: Command::Run(args),
        }) => agentvm::run::main(*args),
        Err(e) => {
            let _ = e.print();
            ExitCode::from(agentvm::parse_error_exit(&e))
        }
    }
}
