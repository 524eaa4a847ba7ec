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
}
