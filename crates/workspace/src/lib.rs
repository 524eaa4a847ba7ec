//! # agentvm-workspace: what the agent may change
//!
//! Owns turning an overlayfs upper directory (everything a sandbox wrote
//! under /workspace) plus the untouched repo (the lower layer) into a list
//! of changes and a git patch that `git apply` reproduces exactly, for any
//! bytes. Capture walks only the upper directory, through directory
//! descriptors, so its cost follows the size of the change, not of the
//! repo, and its memory neither: contents are streamed.
//!
//! It also owns what must not change unreviewed (`protect`: the files git,
//! shells, editors and CI run by themselves) and the one way back:
//! `apply_to_branch` puts a patch on a new branch with git plumbing, never
//! touching the work tree, and judges protected paths on the tree git
//! would commit.
//!
//! It must never: write to the repo's work tree; follow a symlink while
//! reading the repo or the upper directory; hold a whole file in memory
//! unless it is below a size limit; run a hook or anything a repo's config
//! names; know about sandboxes, HTTP or storage.

pub mod apply;
mod between;
mod capture;
mod fsx;
pub mod layer;
mod patch;
pub mod protect;

pub use apply::{apply_to_branch, ApplyError};
pub use between::render_between;
pub use capture::{capture, Capture, CaptureError, Change, Entry, Kind, MAX_CHANGES, MAX_PATH};
pub use patch::{render, PatchOptions, RenderError, Rendered};
pub use protect::Protected;
