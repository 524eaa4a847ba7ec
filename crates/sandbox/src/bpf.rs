//! Classic BPF for seccomp, shared by the build script (which compiles the
//! policy once, at build time) and the library: the x32 guard, and the
//! chaining of several filters into one program.
//!
//! Chaining replaces each filter's "allow" returns with a jump to the next
//! filter, so one program decides what the kernel would decide for the
//! filters stacked (they never disagree: each names syscalls the others
//! do not), while the kernel prepares, JIT-compiles and runs one program
//! instead of four on every sandbox start and every syscall.

use seccompiler::sock_filter;

pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// The longest classic BPF program the kernel takes (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;

/// x32 system calls carry bit 30 in their number under the x86_64 audit
/// arch; a name-based filter never matches them. Refuse them all (ENOSYS).
pub fn x32_guard() -> Vec<sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const ENOSYS: u32 = 38;
    // offsets in struct seccomp_data
    const OFF_NR: u32 = 0;
    const OFF_ARCH: u32 = 4;
    let f = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        f(BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_ARCH),
        // another arch: the policy's own check refuses it
        f(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, AUDIT_ARCH_X86_64),
        f(BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_NR),
        f(BPF_JMP | BPF_JSET | BPF_K, 0, 1, X32_SYSCALL_BIT),
        f(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
        f(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// One program that runs `filters` in order: the first one that does not
/// allow a call decides it.
pub fn chain(filters: &[Vec<sock_filter>]) -> Result<Vec<sock_filter>, String> {
    let mut out = Vec::new();
    for (n, prog) in filters.iter().enumerate() {
        let last = n + 1 == filters.len();
        for (i, ins) in prog.iter().enumerate() {
            if ins.code == BPF_RET | BPF_K && ins.k == SECCOMP_RET_ALLOW && !last {
                // on to the next filter, the instruction after this program
                out.push(sock_filter {
                    code: BPF_JMP | BPF_JA,
                    jt: 0,
                    jf: 0,
                    k: (prog.len() - 1 - i) as u32,
                });
            } else if ins.code & 0x07 == BPF_RET && ins.code != BPF_RET | BPF_K {
                return Err(format!(
                    "filter {n}, instruction {i}: a return of the accumulator cannot be chained"
                ));
            } else {
                out.push(ins.clone());
            }
        }
    }
    if out.len() > MAX_INSNS {
        return Err(format!(
            "the chained policy has {} instructions, more than the kernel's {MAX_INSNS}",
            out.len()
        ));
    }
    Ok(out)
}

/// The program as bytes (native endianness), as the build script stores it.
pub fn to_bytes(prog: &[sock_filter]) -> Vec<u8> {
    let mut b = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        b.extend_from_slice(&i.code.to_ne_bytes());
        b.push(i.jt);
        b.push(i.jf);
        b.extend_from_slice(&i.k.to_ne_bytes());
    }
    b
}

/// The inverse of [`to_bytes`]; `None` when the length is not a whole
/// number of instructions.
pub fn from_bytes(b: &[u8]) -> Option<Vec<sock_filter>> {
    if !b.len().is_multiple_of(8) {
        return None;
    }
    Some(
        b.chunks_exact(8)
            .map(|c| sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect(),
    )
}
