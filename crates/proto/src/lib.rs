//! # agentvm-proto: what the server and the runner say to each other
//!
//! One typed contract instead of argv strings and JSON read back by key:
//! the server (or `agentvm run`'s flags) builds a [`RunRequest`], the runner
//! reports [`EgressRecord`]s as they happen and one [`RunResult`] at the end.
//! Values are parsed once, at the boundary where they enter ([`units`] for
//! sizes and durations, [`NetworkMode`] for network settings), and carried
//! typed from there.
//!
//! It must never: do I/O, hold state, or depend on anything but serde.

pub mod egress;
pub mod network;
pub mod run;
pub mod units;

pub use egress::{EgressLine, EgressRecord, Phase, Unrecorded};
pub use network::{NetworkMode, Policy};
pub use run::{
    Layers, Limits, NetworkKind, PatchLimits, Repo, RunErrorInfo, RunRequest, RunResult, RunStatus,
};
