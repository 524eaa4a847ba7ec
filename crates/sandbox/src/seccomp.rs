//! The seccomp layer. The policy is data: `policy/seccomp-<arch>.json`,
//! reviewed like code and compiled by seccompiler. Filters are stacked:
//! `deny` (EPERM for the listed calls), `clone3` (ENOSYS so libc falls back
//! to clone, whose flags `deny` can inspect), `families` (EAFNOSUPPORT for
//! sockets of any address family but unix, inet, inet6 and routing or
//! diagnostic netlink: vsock above all, which no namespace isolates) and,
//! on x86_64, a guard that refuses the x32 syscall numbers, which would
//! otherwise alias every entry.

use std::collections::HashMap;

use seccompiler::{BpfProgram, TargetArch};

use crate::error::{Layer, SetupError};

#[cfg(target_arch = "x86_64")]
const POLICY: &str = include_str!("../policy/seccomp-x86_64.json");
#[cfg(target_arch = "aarch64")]
const POLICY: &str = include_str!("../policy/seccomp-aarch64.json");

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// Compiled filters, in the order they are installed.
pub struct Filters(Vec<BpfProgram>);

/// Compile the embedded policy. Done in the supervisor before any namespace
/// is entered, so a bad policy is a setup error, not a half-built sandbox.
pub fn compile() -> Result<Filters, SetupError> {
    let mut map: HashMap<String, BpfProgram> =
        seccompiler::compile_from_json(POLICY.as_bytes(), ARCH)
            .map_err(|e| SetupError::os(Layer::Seccomp, "compiling the policy", e))?;
    let mut out = Vec::new();
    for name in ["deny", "clone3", "families"] {
        let prog = map.remove(name).ok_or_else(|| {
            SetupError::new(Layer::Seccomp, format!("policy has no filter named {name}"))
        })?;
        out.push(prog);
    }
    #[cfg(target_arch = "x86_64")]
    out.push(x32_guard());
    Ok(Filters(out))
}

/// Install every filter on the calling thread. Requires no_new_privs.
pub fn install(filters: &Filters) -> Result<(), SetupError> {
    for prog in &filters.0 {
        seccompiler::apply_filter(prog)
            .map_err(|e| SetupError::os(Layer::Seccomp, "installing a filter", e))?;
    }
    Ok(())
}

/// The number of filters `install` stacks (what /proc/self/status shows as
/// Seccomp_filters inside the sandbox).
pub fn filter_count(filters: &Filters) -> usize {
    filters.0.len()
}

/// x32 system calls carry bit 30 in their number under the x86_64 audit
/// arch; a name-based filter never matches them. Refuse them all (ENOSYS).
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> BpfProgram {
    use seccompiler::sock_filter;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    // offsets in struct seccomp_data
    const OFF_NR: u32 = 0;
    const OFF_ARCH: u32 = 4;
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let jset = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let f = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        f(ld, 0, 0, OFF_ARCH),
        // another arch: the seccompiler filters already kill it
        f(jeq, 0, 3, AUDIT_ARCH_X86_64),
        f(ld, 0, 0, OFF_NR),
        f(jset, 0, 1, X32_SYSCALL_BIT),
        f(ret, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        f(ret, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// The names the policy denies, for `doctor` and the docs.
pub fn denied_syscalls() -> Vec<String> {
    let v: serde_json::Value = match serde_json::from_str(POLICY) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let mut names: Vec<String> = v["deny"]["filter"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["syscall"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.push("clone3".into());
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles_and_lists_what_the_threat_model_requires() {
        let f = compile().unwrap_or_else(|e| panic!("{e}"));
        assert!(filter_count(&f) >= 2);
        let names = denied_syscalls();
        for required in [
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "kexec_load",
            "init_module",
            "finit_module",
            "reboot",
            "swapon",
            "open_by_handle_at",
            "io_uring_setup",
            "process_vm_readv",
            "process_vm_writev",
            "clone3",
            "clone",
            "ioctl",
            "modify_ldt",
        ] {
            assert!(names.iter().any(|n| n == required), "{required} not denied");
        }
    }
}
