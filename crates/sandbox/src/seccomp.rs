//! The seccomp layer. The policy is data: `policy/seccomp-<arch>.json`,
//! reviewed like code and compiled by seccompiler at build time (build.rs)
//! into one program: on x86_64 a guard that refuses the x32 syscall
//! numbers (which would otherwise alias every entry), then `families`
//! (EAFNOSUPPORT for sockets of any address family but unix, inet, inet6
//! and routing or diagnostic netlink: vsock above all, which no namespace
//! isolates), `clone3` (ENOSYS so libc falls back to clone, whose flags
//! `deny` can inspect) and `deny` (EPERM for the listed calls), chained
//! (see `bpf`): the kernel prepares and runs one filter, not four.

use seccompiler::BpfProgram;

use crate::bpf;
use crate::error::{Layer, SetupError};

#[cfg(target_arch = "x86_64")]
const POLICY: &str = include_str!("../policy/seccomp-x86_64.json");
#[cfg(target_arch = "aarch64")]
const POLICY: &str = include_str!("../policy/seccomp-aarch64.json");

/// The program build.rs compiled from `POLICY`.
const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

/// The compiled policy, ready to install.
pub struct Filters(BpfProgram);

/// The policy compiled at build time. Loaded in the supervisor before any
/// namespace is entered, so a bad program is a setup error, not a
/// half-built sandbox.
pub fn compile() -> Result<Filters, SetupError> {
    bpf::from_bytes(PROGRAM)
        .filter(|p| !p.is_empty() && p.len() <= bpf::MAX_INSNS)
        .map(Filters)
        .ok_or_else(|| SetupError::new(Layer::Seccomp, "the compiled policy is damaged"))
}

/// Install the policy on the calling thread. Requires no_new_privs.
pub fn install(filters: &Filters) -> Result<(), SetupError> {
    seccompiler::apply_filter(&filters.0)
        .map_err(|e| SetupError::os(Layer::Seccomp, "installing the filter", e))
}

/// The number of filters `install` stacks (what /proc/self/status shows as
/// Seccomp_filters inside the sandbox).
pub fn filter_count(_: &Filters) -> usize {
    1
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
        let f = compile().unwrap();
        assert_eq!(filter_count(&f), 1);
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

    /// A classic BPF interpreter for what seccompiler emits, to check the
    /// chained program against the filters stacked.
    fn run(prog: &[seccompiler::sock_filter], data: &[u8; 64]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        let word = |k: u32| {
            let k = k as usize;
            u32::from_ne_bytes([data[k], data[k + 1], data[k + 2], data[k + 3]])
        };
        loop {
            let i = prog[pc].clone();
            let cls = i.code & 0x07;
            match cls {
                0x00 => a = word(i.k), // ld w abs
                0x04 => {
                    // alu with k
                    a = match i.code & 0xf0 {
                        0x50 => a & i.k,
                        op => panic!("alu op {op:#x}"),
                    }
                }
                0x05 => {
                    let op = i.code & 0xf0;
                    if op == 0x00 {
                        pc += i.k as usize;
                    } else {
                        let t = match op {
                            0x10 => a == i.k,
                            0x20 => a > i.k,
                            0x30 => a >= i.k,
                            0x40 => a & i.k != 0,
                            op => panic!("jmp op {op:#x}"),
                        };
                        pc += if t { i.jt } else { i.jf } as usize;
                    }
                }
                0x06 => return i.k,
                c => panic!("class {c:#x}"),
            }
            pc += 1;
        }
    }

    /// What the kernel decides for filters stacked: the strongest action,
    /// the first evaluated among equals.
    fn stacked(progs: &[Vec<seccompiler::sock_filter>], data: &[u8; 64]) -> u32 {
        let mut best: Option<u32> = None;
        for p in progs {
            let r = run(p, data);
            let strength = |v: u32| (v & 0xffff_0000) as i32;
            if best.is_none_or(|b| strength(r) < strength(b)) {
                best = Some(r);
            }
        }
        best.unwrap_or(bpf::SECCOMP_RET_ALLOW)
    }

    #[test]
    fn the_chained_program_decides_as_the_filters_stacked() {
        #[cfg(target_arch = "x86_64")]
        let arch = seccompiler::TargetArch::x86_64;
        #[cfg(target_arch = "aarch64")]
        let arch = seccompiler::TargetArch::aarch64;
        let mut map = seccompiler::compile_from_json(POLICY.as_bytes(), arch).unwrap();
        let mut progs = Vec::new();
        #[cfg(target_arch = "x86_64")]
        progs.push(bpf::x32_guard());
        for n in ["families", "clone3", "deny"] {
            progs.push(map.remove(n).unwrap_or_else(|| panic!("{n}")));
        }
        let chained = compile().unwrap().0;
        assert_eq!(
            chained,
            bpf::chain(&progs).unwrap_or_default(),
            "build.rs and this test agree"
        );
        assert_eq!(
            bpf::from_bytes(&bpf::to_bytes(&chained)),
            Some(chained.clone())
        );
        let audit_arch: u32 = if cfg!(target_arch = "x86_64") {
            0xc000_003e
        } else {
            0xc000_00b7
        };
        let mut seen_errno = 0;
        let interesting: [u64; 12] = [
            0,
            1,
            2,
            10,
            16,
            40,
            0x20000,
            0x1000_0000,
            0x7000_0000,
            21522,
            4,
            9,
        ];
        for nr in (0u32..460).chain([0x4000_0027, 0x4000_0000 | 41]) {
            for arch in [audit_arch, 0x4000_0003] {
                for a0 in interesting {
                    for a2 in [0u64, 4, 9, 15] {
                        let mut d = [0u8; 64];
                        d[0..4].copy_from_slice(&nr.to_ne_bytes());
                        d[4..8].copy_from_slice(&arch.to_ne_bytes());
                        d[16..24].copy_from_slice(&a0.to_ne_bytes());
                        d[24..32].copy_from_slice(&a0.to_ne_bytes());
                        d[32..40].copy_from_slice(&a2.to_ne_bytes());
                        let (c, s) = (run(&chained, &d), stacked(&progs, &d));
                        assert_eq!(c, s, "nr {nr} arch {arch:#x} a0 {a0:#x} a2 {a2}");
                        if c & 0xffff_0000 == bpf::SECCOMP_RET_ERRNO {
                            seen_errno += 1;
                        }
                    }
                }
            }
        }
        assert!(seen_errno > 100, "the comparison never hit a refusal");
    }
}
