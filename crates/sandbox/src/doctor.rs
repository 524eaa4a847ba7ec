//! `agentvm doctor`: which layers this kernel and this user can use, and
//! why not where not. The last check runs a real sandbox with every layer
//! on, so the answer is never a guess.

use std::ffi::OsString;
use std::path::Path;

use serde::Serialize;

use crate::backend::Backend;
use crate::spec::{Layers, Limits, Network, SandboxSpec, DEFAULT_ROOT_MAPS_TO};
use crate::{cgroup, landlock_layer, seccomp};

#[derive(Debug, Serialize)]
pub struct Check {
    pub layer: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub arch: &'static str,
    pub uid: u32,
    pub checks: Vec<Check>,
    /// A full sandbox (every default layer) started and ran `true`.
    pub sandbox_ok: bool,
    pub landlock_abi: u32,
    pub cgroup_version: Option<cgroup::Version>,
    pub seccomp_denied: Vec<String>,
    /// What `agentvm run` limits when no flag asks: nothing.
    pub default_limits: &'static str,
}

/// `agentvm run`'s defaults, as doctor reports them.
pub const DEFAULT_LIMITS: &str = "none: agentvm run sets no memory, pids or CPU limit unless asked (--memory, --pids, --cpus, --cpu-quota; the disk limit is 1G); the server's profiles set them";

fn read(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// `cgroup_parent`: where `run` would create cgroups (see --cgroup-parent).
pub fn check(cgroup_parent: Option<&Path>) -> Report {
    let uid = nix::unistd::geteuid().as_raw();
    let mut checks = Vec::new();
    let mut add = |layer, ok, detail: String| checks.push(Check { layer, ok, detail });

    let max_userns = read("/proc/sys/user/max_user_namespaces").and_then(|s| s.parse::<u64>().ok());
    let unpriv = read("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let userns_ok = max_userns.unwrap_or(1) > 0
        && (uid == 0 || (unpriv.as_deref() != Some("0") && apparmor.as_deref() != Some("1")));
    add(
        "user namespace",
        userns_ok,
        format!(
            "max_user_namespaces={}{}{}; root inside maps to {}",
            max_userns
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into()),
            unpriv
                .map(|v| format!(", unprivileged_userns_clone={v}"))
                .unwrap_or_default(),
            apparmor
                .map(|v| format!(", apparmor_restrict_unprivileged_userns={v}"))
                .unwrap_or_default(),
            if uid == 0 {
                format!("uid {DEFAULT_ROOT_MAPS_TO}")
            } else {
                format!("the calling user (uid {uid})")
            }
        ),
    );
    let fs = read("/proc/filesystems").unwrap_or_default();
    add(
        "overlayfs",
        fs.lines().any(|l| l.ends_with("overlay")),
        "copy-on-write /workspace (overlay with userxattr inside the user namespace)".into(),
    );
    let seccomp_ok = Path::new("/proc/sys/kernel/seccomp/actions_avail").exists();
    let compiled = seccomp::compile();
    add(
        "seccomp",
        seccomp_ok && compiled.is_ok(),
        match &compiled {
            Ok(f) => format!(
                "{} stacked filters from policy/seccomp-{}.json",
                seccomp::filter_count(f),
                std::env::consts::ARCH
            ),
            Err(e) => e.to_string(),
        },
    );
    let abi = landlock_layer::kernel_abi();
    add(
        "landlock",
        abi > 0,
        if abi > 0 {
            format!(
                "ABI {abi}{}",
                if abi >= 6 {
                    " (filesystem, signal and abstract-socket scoping)"
                } else {
                    " (filesystem only)"
                }
            )
        } else {
            "not available: enable CONFIG_SECURITY_LANDLOCK and lsm=landlock,... or run with --no-landlock".into()
        },
    );
    let h = cgroup::discover();
    let cg_version = h.as_ref().map(|h| h.version.clone());
    match &h {
        None => add(
            "cgroup",
            false,
            "no cgroup hierarchy mounted: --memory/--pids/--cpus/--cpu-quota unavailable".into(),
        ),
        Some(h) => {
            let ctrls: Vec<&str> = h.mounts.iter().map(|(c, _)| c.as_str()).collect();
            let limits = Limits {
                memory: Some(64 << 20),
                pids: Some(64),
                ..Default::default()
            };
            let probe = cgroup::Cgroup::create(
                &limits,
                cgroup_parent,
                &format!("agentvm-doctor-{}", std::process::id()),
                true,
            );
            let (ok, why, freezer) = match probe {
                Ok(Some(cg)) => {
                    let f = match cg.freezer() {
                        Ok(d) => Ok(match h.version {
                            cgroup::Version::V1 => format!("v1 freezer at {}", d.display()),
                            cgroup::Version::V2 => "v2 cgroup.freeze".to_string(),
                        }),
                        Err(e) => Err(e),
                    };
                    cg.destroy();
                    (true, "can create limited cgroups here".to_string(), f)
                }
                Ok(None) => (
                    false,
                    "nothing to create".to_string(),
                    Err("no cgroup".into()),
                ),
                Err(e) => (false, e.message, Err("no cgroup could be made".into())),
            };
            add(
                "cgroup",
                ok,
                format!("{:?} with {}; {why}", h.version, ctrls.join(", ")).to_lowercase(),
            );
            // sessions pause with it; without it everything else works
            add(
                "freezer",
                freezer.is_ok(),
                match freezer {
                    Ok(how) => format!("sessions can be paused ({how})"),
                    Err(why) => format!("sessions cannot be paused: {why}"),
                },
            );
        }
    }
    // The real thing: every default layer, one tiny command.
    let spec = SandboxSpec {
        argv: vec![OsString::from("true")],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        repo: None,
        repo_fd: None,
        ro_binds: Vec::new(),
        stdio: crate::spec::Stdio::Inherit,
        network: Network::None,
        limits: Limits {
            disk: 1 << 20,
            ..Default::default()
        },
        layers: Layers {
            seccomp: true,
            landlock: abi > 0,
            cgroup: false,
        },
        root_maps_to: DEFAULT_ROOT_MAPS_TO,
        cgroup_parent: None,
        stack: Vec::new(),
        image: Vec::new(),
        proxy_socket: None,
        ports_listener: None,
        control: None,
        user: None,
        cwd: None,
        protected: Vec::new(),
    };
    let (sandbox_ok, detail) = match crate::backend::Namespaces.run(&spec) {
        Ok(o) if o.ended == crate::Ended::Exited(0) => (
            true,
            format!(
                "`true` ran in {:.1} ms with every layer on",
                o.duration.as_secs_f64() * 1000.0
            ),
        ),
        Ok(o) => (false, format!("`true` ended as {:?}", o.ended)),
        Err(e) => (false, e.to_string()),
    };
    add("sandbox", sandbox_ok, detail);
    Report {
        kernel: read("/proc/sys/kernel/osrelease").unwrap_or_default(),
        arch: std::env::consts::ARCH,
        uid,
        checks,
        sandbox_ok,
        landlock_abi: abi,
        cgroup_version: cg_version,
        seccomp_denied: seccomp::denied_syscalls(),
        default_limits: DEFAULT_LIMITS,
    }
}

impl Report {
    pub fn render(&self) -> String {
        let mut s = format!(
            "kernel {} ({}), running as uid {}\n",
            self.kernel, self.arch, self.uid
        );
        for c in &self.checks {
            s.push_str(&format!(
                "  {:<4} {:<15} {}\n",
                if c.ok { "ok" } else { "NO" },
                c.layer,
                c.detail
            ));
        }
        s.push_str(&format!("  note limits          {}\n", self.default_limits));
        s.push_str(if self.sandbox_ok {
            "agentvm run will work here.\n"
        } else {
            "agentvm run will fail here: see the lines marked NO.\n"
        });
        s
    }
}
