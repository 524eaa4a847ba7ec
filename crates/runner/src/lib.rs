//! # agentvm-runner: the sandbox runner
//!
//! What `agentvm run` and `agentvm-run` do: take one [`RunRequest`] (from
//! flags, or as JSON from the server), open and check the repo, start the
//! egress proxy, run the sandbox, capture every change into a patch, and
//! write one [`RunResult`]. The server starts `agentvm-run run-request
//! FILE` for each job; this crate depends on nothing of the server's, so
//! each sandbox's supervisor maps and relocates a small image.
//!
//! It must never: hold a server's state, or run anything but the sandbox
//! runner and its egress proxy.
//!
//! [`RunRequest`]: agentvm_proto::RunRequest
//! [`RunResult`]: agentvm_proto::RunResult

pub mod egress;
pub mod run;
pub mod tty;

/// Exit status when the sandbox could not be set up.
pub const EXIT_SETUP: u8 = 125;

/// The exit status for a command line `clap` refused: 0 for --help and
/// --version, 125 for `run` and `run-request` (the command never ran, as
/// with `env` or `timeout`), 2 otherwise.
pub fn parse_error_exit(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 2,
        _ if matches!(
            std::env::args().nth(1).as_deref(),
            Some("run" | "run-request")
        ) =>
        {
            EXIT_SETUP
        }
        _ => 2,
    }
}
