//! # agentvm-proto: what the server and the runner say to each other
//!
//! One typed contract instead of argv strings and JSON read back by key:
//! the server (or `agentvm run`'s flags) builds a [`RunRequest`], the runner
//! reports [`EgressRecord`]s as they happen and one [`RunResult`] at the end.
//! Values are parsed once, at the boundary where they enter ([`units`] for
//! sizes and durations, [`NetworkMode`] for network settings), and carried
//! typed from there.
//!
//! The HTTP API's request and answer types live here too ([`api`]), so the
//! server and the CLI client read and write the same structs.
//!
//! It must never: do I/O, hold state, or depend on anything but serde
//! (and utoipa, for the server's schemas, behind the `schema` feature).

pub mod api;
pub mod egress;
pub mod network;
pub mod run;
pub mod units;

pub use egress::{EgressLine, EgressRecord, Phase, Unrecorded};
pub use network::{NetworkMode, Policy};
pub use run::{
    Layers, Limits, NetworkKind, PatchLimits, Repo, RunErrorInfo, RunRequest, RunResult, RunStatus,
    Tty,
};
