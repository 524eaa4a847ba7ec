//! # agentvm (library part): the sandbox runner
//!
//! What `agentvm run` does, shared by the full `agentvm` binary and the slim
//! `agentvm-run`, which holds nothing else (no server, no HTTP client) so
//! that each sandbox's supervisor maps and relocates a small image: the
//! server starts `agentvm-run run ...` for its jobs when it is installed
//! next to `agentvm`.
//!
//! It must never: hold a server's state, or run anything but the sandbox
//! runner and its egress proxy.

pub mod egress;
pub mod run;
pub use agentvm_proto::units;

/// Exit status when the sandbox could not be set up.
pub const EXIT_SETUP: u8 = 125;

/// The exit status for a command line `clap` refused: 0 for --help and
/// --version, 125 for `run` (the command never ran, as with `env` or
/// `timeout`), 2 otherwise.
pub fn parse_error_exit(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 2,
        _ if std::env::args().nth(1).as_deref() == Some("run") => EXIT_SETUP,
        _ => 2,
    }
}
