//! # agentvm-sandbox: how a process is isolated
//!
//! Owns turning a [`SandboxSpec`] into a running, confined process and
//! reporting how it ended, behind the [`Backend`] trait. The `ns` backend stacks user, mount, pid, net,
//! ipc, uts and cgroup namespaces, a minimal read-only root, seccomp,
//! landlock, no_new_privs, an empty capability set and cgroup limits.
//!
//! It must never: know about HTTP, jobs or databases; run a shell on any
//! input; silently drop a layer (a layer that cannot be applied is a
//! [`SetupError`] naming it); map root inside to the host's root.

// shared with build.rs, which uses the other half of it
pub mod backend;
#[allow(dead_code)]
pub(crate) mod bpf;
pub mod caps;
pub mod cgroup;
pub mod doctor;
pub mod error;
pub mod etc;
pub mod fds;
pub mod landlock_layer;
pub mod ns;
pub mod policy;
pub mod seccomp;
pub mod spec;

pub use backend::Backend;
pub use error::{ExecFailure, Layer, RunError, SetupError};
pub use ns::{control, receive_console, PORT_OPEN, PORT_REFUSED};
pub use ns::{Ended, Outcome};
pub use spec::{
    InnerUser, Layers, Limits, Network, RoBind, SandboxSpec, StackLayer, Stdio, MAX_STACK,
};
