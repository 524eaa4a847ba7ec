//! # agentvm-workspace: what the agent may change
//!
//! Owns turning an overlayfs upper directory (everything a sandbox wrote
//! under /workspace) plus the untouched repo (the lower layer) into a list
//! of changes and a git-style patch that `git apply` reproduces exactly.
//! Capture walks only the upper directory, so its cost follows the size of
//! the change, not of the repo.
//!
//! It also owns the one way back: `apply_to_branch` puts a patch on a new
//! branch with git plumbing, never touching the work tree.
//!
//! It must never: write to the repo's work tree; follow a symlink while
//! reading the repo or the upper directory; run a hook or anything a repo's
//! config names; know about sandboxes, HTTP or storage.

pub mod apply;
mod capture;
mod patch;

pub use apply::{apply_to_branch, ApplyError};
pub use capture::{capture, CaptureError, Change, Entry, Kind};
pub use patch::{render, PatchOptions, Rendered};
