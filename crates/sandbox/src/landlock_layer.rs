//! Landlock: a second wall behind the mount namespace. Everything is
//! readable and executable; only the sandbox's own writable areas may be
//! written; signals and abstract unix sockets outside the sandbox's domain
//! are out of reach (ABI 6 scopes).

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::error::{Layer, SetupError};

/// The newest ABI this code was written and tested against.
const TESTED_ABI: ABI = ABI::V6;

/// The Landlock ABI version the running kernel offers (0: none).
pub fn kernel_abi() -> u32 {
    // SAFETY: landlock_create_ruleset with a null attr, zero size and the
    // VERSION flag only returns an integer; no memory is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if r < 0 {
        0
    } else {
        u32::try_from(r).unwrap_or(0)
    }
}

/// Restrict the calling thread (and its future children). `writable` are
/// the directories that keep write access. Returns the ABI level in force.
/// Fails closed when the kernel enforces nothing at all.
pub fn restrict(writable: &[&str]) -> Result<u32, SetupError> {
    let abi = kernel_abi();
    if abi == 0 {
        return Err(SetupError::new(
            Layer::Landlock,
            "not supported by this kernel (landlock ABI 0); pass --no-landlock to run without this second wall",
        ));
    }
    let all = AccessFs::from_all(TESTED_ABI);
    let read = AccessFs::from_read(TESTED_ABI);
    let err =
        |e: landlock::RulesetError| SetupError::os(Layer::Landlock, "building the ruleset", e);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(err)?;
    if abi >= 6 {
        ruleset = ruleset.scope(Scope::from_all(TESTED_ABI)).map_err(err)?;
    }
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], read))
        .map_err(err)?
        .add_rules(path_beneath_rules(writable, all))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    match status.ruleset {
        RulesetStatus::NotEnforced => Err(SetupError::new(
            Layer::Landlock,
            "the kernel accepted the ruleset but enforces none of it",
        )),
        RulesetStatus::PartiallyEnforced | RulesetStatus::FullyEnforced => Ok(abi),
    }
}
