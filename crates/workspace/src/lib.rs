//! # agentvm-workspace: what the agent may change
//!
//! Owns turning an overlayfs upper directory (everything a sandbox wrote
//! under /workspace) plus the untouched repo (the lower layer) into a list
//! of changes and a git-style patch that `git apply` reproduces exactly.
//! Capture walks only the upper directory, so its cost follows the size of
//! the change, not of the repo.
//!
//! It must never: write to the repo; follow a symlink while reading the
//! repo or the upper directory; know about sandboxes, HTTP or storage.

mod capture;
mod patch;

pub use capture::{capture, CaptureError, Change, Entry, Kind};
pub use patch::{render, PatchOptions, Rendered};
