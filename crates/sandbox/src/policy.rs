//! The sandbox's filesystem policy as reviewed data, beside the seccomp
//! policy: which host /etc entries it sees (`policy/etc.txt`) and what its
//! /proc hides (`policy/proc.txt`). Both are compiled in; a line that does
//! not parse fails the sandbox's set-up (fail closed), and the tests below
//! parse every line.

use std::path::{Component, Path};

use crate::error::{Layer, SetupError};

const ETC: &str = include_str!("../policy/etc.txt");
const PROC: &str = include_str!("../policy/proc.txt");

/// What to do to one path under /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcRule {
    /// Bind it read-only over itself.
    ReadOnly(&'static str),
    /// Bind /dev/null over it.
    Mask(&'static str),
    /// Mount an empty read-only tmpfs over it.
    Empty(&'static str),
}

fn lines(text: &'static str) -> impl Iterator<Item = (usize, &'static str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
}

/// A path relative to its directory, without `.` or `..`.
fn relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn bad(file: &str, n: usize, why: &str) -> SetupError {
    SetupError::new(
        Layer::Mounts,
        format!("policy/{file} line {n}: {why} (the policy is compiled in; fix it and rebuild)"),
    )
}

/// The host's /etc entries a sandbox sees.
pub fn etc_allow() -> Result<Vec<&'static str>, SetupError> {
    parse_etc(ETC)
}

/// The /proc rules, in order.
pub fn proc_rules() -> Result<Vec<ProcRule>, SetupError> {
    parse_proc(PROC)
}

fn parse_etc(text: &'static str) -> Result<Vec<&'static str>, SetupError> {
    lines(text)
        .map(|(n, l)| {
            if relative(l) {
                Ok(l)
            } else {
                Err(bad("etc.txt", n, "not a relative path without . or .."))
            }
        })
        .collect()
}

fn parse_proc(text: &'static str) -> Result<Vec<ProcRule>, SetupError> {
    lines(text)
        .map(|(n, l)| {
            let (verb, path) = l
                .split_once(char::is_whitespace)
                .map(|(v, p)| (v, p.trim()))
                .ok_or_else(|| bad("proc.txt", n, "expected RULE PATH"))?;
            if !relative(path) {
                return Err(bad("proc.txt", n, "not a relative path without . or .."));
            }
            match verb {
                "readonly" => Ok(ProcRule::ReadOnly(path)),
                "mask" => Ok(ProcRule::Mask(path)),
                "empty" => Ok(ProcRule::Empty(path)),
                _ => Err(bad("proc.txt", n, "unknown rule (readonly, mask or empty)")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_the_policy_parses() {
        let etc = etc_allow().unwrap();
        assert!(etc.contains(&"ld.so.cache") && etc.contains(&"ssl/certs"));
        let proc_ = proc_rules().unwrap();
        // every rule, spelled as the kernel names it: a typo in a path
        // would be skipped as "not on this kernel"
        for must in [
            "keys",
            "key-users",
            "timer_list",
            "sched_debug",
            "latency_stats",
            "kallsyms",
            "cmdline",
            "config.gz",
            "sys/kernel/random/boot_id",
        ] {
            assert!(proc_.contains(&ProcRule::Mask(must)), "{must} is masked");
        }
        for ro in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
            assert!(proc_.contains(&ProcRule::ReadOnly(ro)), "{ro} is read-only");
        }
        assert!(proc_.contains(&ProcRule::Empty("scsi")));
        assert_eq!(proc_.len(), 16, "a rule added or lost: update this test");
        assert!(proc_.contains(&ProcRule::Empty("acpi")));
    }

    /// A typo in the policy must not silently drop a mask.
    #[test]
    fn a_line_that_does_not_parse_fails_closed() {
        for bad in [
            "mask",
            "hide cmdline",
            "mask /proc/cmdline",
            "mask ../x",
            "readonly sys/../..",
        ] {
            let text: &'static str =
                Box::leak(format!("# ok\nmask keys\n{bad}\n").into_boxed_str());
            let e = parse_proc(text).unwrap_err();
            assert!(e.message.contains("policy/proc.txt line 3"), "{bad}: {e}");
        }
        assert!(parse_etc("ld.so.cache\n/etc/shadow\n").is_err());
        assert!(parse_etc("ssl/../../root\n").is_err());
        assert_eq!(parse_etc("a # b\n\n  c\n").unwrap(), ["a", "c"]);
    }

    #[test]
    fn paths_must_stay_below_their_directory() {
        for p in ["", "/etc/shadow", "../shadow", "ssl/../shadow", "./x"] {
            assert!(!relative(p), "{p:?}");
        }
        assert!(relative("ssl/certs"));
    }
}
