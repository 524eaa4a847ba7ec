//! The seam between what to run ([`SandboxSpec`]) and how it is isolated.
//! The namespace backend is the first; a microVM backend is a new file
//! implementing [`Backend`], plus its name in [`by_name`].

use crate::error::RunError;
use crate::ns::Outcome;
use crate::spec::SandboxSpec;

/// A way to run one [`SandboxSpec`] to its end.
pub trait Backend: Send + Sync {
    /// The name a request picks it by.
    fn name(&self) -> &'static str;
    /// Set the sandbox up, run the command, tear everything down and say
    /// how it ended. A layer that cannot be applied is a setup error
    /// naming it, never silently dropped.
    fn run(&self, spec: &SandboxSpec) -> Result<Outcome, RunError>;
}

/// Linux namespaces, seccomp, landlock and cgroups (see [`crate::ns`]).
pub struct Namespaces;

impl Backend for Namespaces {
    fn name(&self) -> &'static str {
        "ns"
    }

    fn run(&self, spec: &SandboxSpec) -> Result<Outcome, RunError> {
        crate::ns::run(spec)
    }
}

/// Every backend this build has, by name.
pub fn by_name(name: &str) -> Option<&'static dyn Backend> {
    match name {
        "ns" => Some(&Namespaces),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_found_by_their_own_name() {
        let ns = by_name("ns").unwrap();
        assert_eq!(ns.name(), "ns");
        assert!(by_name("vm").is_none());
        assert!(by_name("").is_none());
    }

    /// Started from a process with threads (this test harness has them),
    /// the namespace backend refuses before it clones: the child would
    /// get only the calling thread, and a lock another one held would
    /// hang init. Nothing is created, so this needs no privilege.
    #[test]
    fn a_process_with_threads_is_refused_before_anything_is_cloned() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let spec = crate::SandboxSpec {
            argv: vec!["true".into()],
            env: vec![],
            repo: None,
            repo_fd: None,
            ro_binds: vec![],
            stdio: crate::Stdio::Inherit,
            network: crate::Network::None,
            limits: crate::Limits {
                disk: 1 << 20,
                ..Default::default()
            },
            layers: crate::Layers {
                seccomp: true,
                landlock: false,
                cgroup: false,
            },
            root_maps_to: crate::spec::DEFAULT_ROOT_MAPS_TO,
            protected: vec![],
            proxy_socket: None,
            ports_listener: None,
            control: None,
            user: None,
            cwd: None,
            cgroup_parent: None,
            stack: Vec::new(),
            image: Vec::new(),
        };
        let e = Namespaces.run(&spec).err().map(|e| e.to_string());
        let _ = tx.send(());
        let _ = t.join();
        let e = e.unwrap_or_else(|| panic!("a sandbox started from a process with threads"));
        assert!(e.contains("single-threaded"), "{e}");
    }
}
