//! Compiles the seccomp policy (policy/seccomp-<arch>.json, reviewed data)
//! at build time into one chained BPF program, so no sandbox start parses
//! JSON or compiles BPF. A policy that does not compile fails the build.

// shared with the library, which uses the other half of it
#[allow(dead_code)]
#[path = "src/bpf.rs"]
mod bpf;

use seccompiler::TargetArch;

fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let (file, target) = match arch.as_str() {
        "x86_64" => ("policy/seccomp-x86_64.json", TargetArch::x86_64),
        "aarch64" => ("policy/seccomp-aarch64.json", TargetArch::aarch64),
        other => panic!("no seccomp policy for the {other} architecture"),
    };
    println!("cargo:rerun-if-changed={file}");
    println!("cargo:rerun-if-changed=src/bpf.rs");
    let json = match std::fs::read(file) {
        Ok(j) => j,
        Err(e) => panic!("{file}: {e}"),
    };
    let mut map = match seccompiler::compile_from_json(json.as_slice(), target) {
        Ok(m) => m,
        Err(e) => panic!("{file}: {e}"),
    };
    // the order the kernel would run them in, had they been installed one
    // by one (the last installed runs first)
    let mut progs = Vec::new();
    if arch == "x86_64" {
        progs.push(bpf::x32_guard());
    }
    for name in ["families", "clone3", "deny"] {
        match map.remove(name) {
            Some(p) => progs.push(p),
            None => panic!("{file}: no filter named {name}"),
        }
    }
    if let Some(extra) = map.keys().next() {
        panic!("{file}: filter {extra} is not installed by anything");
    }
    let chained = match bpf::chain(&progs) {
        Ok(c) => c,
        Err(e) => panic!("{file}: {e}"),
    };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    if let Err(e) = std::fs::write(out.join("seccomp.bpf"), bpf::to_bytes(&chained)) {
        panic!("writing the compiled policy: {e}");
    }
}
