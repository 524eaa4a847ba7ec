//! Cgroup limits (memory, pids, cpu bandwidth, cpuset) on cgroup v1 and v2,
//! and the freezer that pauses a sandbox (v1's freezer controller, v2's
//! cgroup.freeze). One cgroup per sandbox, created before the sandbox's
//! init starts work, removed after every process in it is gone.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Layer, SetupError};
use crate::spec::Limits;

/// Which hierarchy layout the host uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// Where the controllers live on this host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hierarchy {
    pub version: Version,
    /// controller name -> mount point (v1); for v2 every controller maps to
    /// the unified mount point.
    pub mounts: Vec<(String, PathBuf)>,
}

const CONTROLLERS: [&str; 6] = ["memory", "pids", "cpu", "cpuset", "freezer", "cpuacct"];

/// How long a freeze may take before it is given up (and undone): tasks
/// in uninterruptible sleep (a slow disk, a FUSE server) can hold it off.
const FREEZE_WAIT: Duration = Duration::from_secs(5);

/// A left-behind cgroup must be at least this old before it is swept, so
/// one being set up right now (by a supervisor we cannot see, say in
/// another pid namespace) is never touched.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// The supervisor pid in the name of a cgroup we create:
/// `agentvm-PID-UNIQUE` or `agentvm-doctor-PID`.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("agentvm-")?;
    let (pid, tail) = match rest.strip_prefix("doctor-") {
        Some(p) => (p, None),
        None => {
            let (p, u) = rest.split_once('-')?;
            (p, Some(u))
        }
    };
    if tail.is_some_and(|u| u.is_empty() || !u.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    pid.parse().ok().filter(|&p: &i32| p > 0)
}

/// Is the supervisor `pid` gone: no such process, or a zombie nobody has
/// reaped yet (a supervisor killed with its server is reparented, and
/// its new parent may take its time)?
fn owner_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // the state follows the command, which is in parentheses
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => {
            // SAFETY: signal 0 only checks that the pid exists.
            let r = unsafe { libc::kill(pid, 0) };
            r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        }
    }
}

/// Remove, under `base`, the cgroups of earlier sandboxes whose supervisor
/// was killed before it could clean up (SIGKILL, a crashed host process):
/// named by [`owner_pid`] for a pid that no longer exists, holding no
/// process, and older than [`SWEEP_MIN_AGE`]. Best effort and silent:
/// rmdir fails harmlessly on a cgroup that is in use.
pub fn sweep(base: &Path) -> usize {
    let Ok(rd) = fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(owner_pid) else {
            continue;
        };
        if !owner_gone(pid) {
            continue;
        }
        let p = e.path();
        // a v1 freezer left frozen: its tasks hold their SIGKILL (from
        // init's parent-death signal) until thawed, and only then go
        let state = p.join("freezer.state");
        if fs::read_to_string(&state).is_ok_and(|s| s.trim() != "THAWED") {
            let _ = fs::write(&state, "THAWED");
        }
        let old = fs::metadata(&p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= SWEEP_MIN_AGE);
        let empty = fs::read_to_string(p.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty());
        if old && empty && fs::remove_dir(&p).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// [`sweep`] under every hierarchy's `parent` (as [`Cgroup::create`] finds
/// it): what a server does when it starts, so that sandboxes left frozen
/// by a supervisor that was killed do not stay so until the next sandbox.
pub fn sweep_all(parent: Option<&Path>) -> usize {
    let Some(h) = discover() else { return 0 };
    let mut seen = Vec::new();
    let mut removed = 0;
    for (ctrl, mount) in &h.mounts {
        let rel = match parent {
            Some(p)
                if p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir)) =>
            {
                continue
            }
            Some(p) => p.strip_prefix("/").unwrap_or(p).to_path_buf(),
            None => own_path(&h.version, ctrl),
        };
        let base = mount.join(rel);
        if !seen.contains(&base) {
            removed += sweep(&base);
            seen.push(base);
        }
    }
    removed
}

/// Discover the cgroup layout from /proc/self/mountinfo.
pub fn discover() -> Option<Hierarchy> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut v1 = Vec::new();
    let mut v2: Option<PathBuf> = None;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        match fstype {
            "cgroup" => {
                for c in opts.split(',') {
                    if CONTROLLERS.contains(&c) {
                        v1.push((c.to_string(), PathBuf::from(mount_point)));
                    }
                }
            }
            "cgroup2" => {
                let p = PathBuf::from(mount_point);
                let ctl = fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default();
                if CONTROLLERS
                    .iter()
                    .any(|c| ctl.split_whitespace().any(|x| x == *c))
                {
                    v2 = Some(p);
                }
            }
            _ => {}
        }
    }
    if let Some(p) = v2 {
        return Some(Hierarchy {
            version: Version::V2,
            mounts: CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), p.clone()))
                .collect(),
        });
    }
    if v1.is_empty() {
        return None;
    }
    Some(Hierarchy {
        version: Version::V1,
        mounts: v1,
    })
}

/// The calling process's cgroup path in the hierarchy that has `controller`
/// (v1), or in the unified hierarchy (v2).
fn own_path(version: &Version, controller: &str) -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("/"),
        );
        let hit = match version {
            Version::V2 => ctrls.is_empty(),
            Version::V1 => ctrls.split(',').any(|c| c == controller),
        };
        if hit {
            return PathBuf::from(path.trim_start_matches('/'));
        }
    }
    PathBuf::new()
}

/// Which controllers `limits` needs.
pub fn needed(limits: &Limits) -> Vec<&'static str> {
    let mut v = Vec::new();
    if limits.memory.is_some() {
        v.push("memory");
    }
    if limits.pids.is_some() {
        v.push("pids");
    }
    if limits.cpu_quota.is_some() {
        v.push("cpu");
    }
    if limits.cpus.is_some() {
        v.push("cpuset");
    }
    v
}

/// A created cgroup (one directory per v1 controller, one in v2).
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    dirs: Vec<(String, PathBuf)>,
    /// Why this cgroup cannot be frozen, when asked for and it cannot
    /// (set late too: joining the freezer can fail).
    no_freezer: std::sync::Mutex<Option<String>>,
    /// Its directories serve the freezer only (no limit was asked for):
    /// a failure with them costs the pause, not the sandbox.
    freeze_only: bool,
}

fn write(path: &Path, value: &str) -> Result<(), SetupError> {
    fs::write(path, value).map_err(|e| {
        SetupError::os(
            Layer::Cgroup,
            format!("writing {value:?} to {}", path.display()),
            e,
        )
    })
}

/// v1: FROZEN into freezer.state until it reads FROZEN (the kernel may
/// stop at FREEZING; writing again retries). v2: 1 into cgroup.freeze
/// until cgroup.events says `frozen 1`.
pub fn freeze_dir(version: &Version, d: &Path, within: Duration) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", d.display());
    let (file, value) = match version {
        Version::V1 => ("freezer.state", "FROZEN"),
        Version::V2 => ("cgroup.freeze", "1"),
    };
    fs::write(d.join(file), value).map_err(|e| err("freezing", e))?;
    let until = std::time::Instant::now() + within;
    let mut wait = Duration::from_micros(20);
    loop {
        let done = match version {
            Version::V1 => {
                fs::read_to_string(d.join("freezer.state"))
                    .map_err(|e| err("reading", e))?
                    .trim()
                    == "FROZEN"
            }
            Version::V2 => fs::read_to_string(d.join("cgroup.events"))
                .map_err(|e| err("reading", e))?
                .lines()
                .any(|l| l.trim() == "frozen 1"),
        };
        if done {
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            let _ = thaw_dir(version, d);
            return Err(format!(
                "its processes did not all stop within {} s (one may be stuck in the kernel, e.g. on a slow disk); it runs on",
                within.as_secs()
            ));
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(5));
        if *version == Version::V1 {
            let _ = fs::write(d.join(file), value);
        }
    }
}

/// Undo [`freeze_dir`]: the tasks run again at once.
pub fn thaw_dir(version: &Version, d: &Path) -> Result<(), String> {
    let (file, value) = match version {
        Version::V1 => ("freezer.state", "THAWED"),
        Version::V2 => ("cgroup.freeze", "0"),
    };
    fs::write(d.join(file), value).map_err(|e| format!("thawing {}: {e}", d.display()))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Cgroup {
    /// Create the cgroup for `limits` under `parent` (relative to each
    /// hierarchy's root; default: the caller's own cgroup). `None` when no
    /// cgroup limit is asked for and `freeze` is false. With `freeze` the
    /// cgroup can also be frozen ([`Cgroup::freeze`]); where it cannot be
    /// (no freezer hierarchy on v1, or not delegated) the sandbox still
    /// runs and `freeze` says why.
    pub fn create(
        limits: &Limits,
        parent: Option<&Path>,
        name: &str,
        freeze: bool,
    ) -> Result<Option<Cgroup>, SetupError> {
        let need = needed(limits);
        if need.is_empty() && !freeze {
            return Ok(None);
        }
        let Some(h) = discover() else {
            if need.is_empty() {
                return Ok(Some(Cgroup {
                    version: Version::V1,
                    dirs: Vec::new(),
                    no_freezer: std::sync::Mutex::new(Some(
                        "no cgroup hierarchy is mounted on this host".into(),
                    )),
                    freeze_only: true,
                }));
            }
            return Err(SetupError::new(
                Layer::Cgroup,
                "no cgroup hierarchy is mounted on this host",
            ));
        };
        let mut cg = Cgroup {
            version: h.version.clone(),
            dirs: Vec::new(),
            no_freezer: std::sync::Mutex::new(None),
            freeze_only: need.is_empty(),
        };
        let base_for = |ctrl: &str| -> Result<PathBuf, SetupError> {
            let mount = h
                .mounts
                .iter()
                .find(|(c, _)| c == ctrl)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    SetupError::new(
                        Layer::Cgroup,
                        format!("the {ctrl} controller is not available on this host"),
                    )
                })?;
            let rel = match parent {
                Some(p)
                    if p.components()
                        .any(|c| matches!(c, std::path::Component::ParentDir)) =>
                {
                    return Err(SetupError::new(
                        Layer::Cgroup,
                        format!(
                            "the cgroup parent {} climbs out of the hierarchy (..)",
                            p.display()
                        ),
                    ))
                }
                Some(p) => p.strip_prefix("/").unwrap_or(p).to_path_buf(),
                None => own_path(&h.version, ctrl),
            };
            Ok(mount.join(rel))
        };
        match h.version {
            Version::V1 => {
                for ctrl in &need {
                    let base = match base_for(ctrl) {
                        Ok(b) => b,
                        Err(e) => {
                            cg.destroy();
                            return Err(e);
                        }
                    };
                    sweep(&base);
                    if let Err(e) = cg.mkdir(ctrl, &base.join(name)) {
                        cg.destroy();
                        return Err(e);
                    }
                }
                if freeze {
                    let made = base_for("freezer").and_then(|base| {
                        sweep(&base);
                        cg.mkdir("freezer", &base.join(name))
                    });
                    if let Err(e) = made {
                        cg.set_no_freezer(e.message);
                    }
                }
                // the CPU time it used, for the result: best effort (v2
                // counts it in every cgroup)
                if let Ok(base) = base_for("cpuacct") {
                    let dir = base.join(name);
                    if cg.dirs.iter().any(|(_, d)| *d == dir) {
                        // co-mounted with cpu: the same directory
                        cg.dirs.push(("cpuacct".into(), dir));
                    } else {
                        sweep(&base);
                        let _ = cg.mkdir("cpuacct", &dir);
                    }
                }
            }
            Version::V2 => {
                let made = base_for("memory").and_then(|base| {
                    sweep(&base);
                    let enable: String = need.iter().map(|c| format!("+{c} ")).collect();
                    // Best effort: the parent may already delegate them.
                    if !need.is_empty() {
                        let _ = fs::write(base.join("cgroup.subtree_control"), enable.trim());
                    }
                    cg.mkdir("unified", &base.join(name))
                });
                match made {
                    Ok(()) => {}
                    // only the freezer wanted it: the sandbox runs without
                    Err(e) if cg.freeze_only => cg.set_no_freezer(e.message),
                    Err(e) => return Err(e),
                }
            }
        }
        if let Err(e) = cg.apply(limits) {
            cg.destroy();
            return Err(e);
        }
        Ok(Some(cg))
    }

    fn mkdir(&mut self, ctrl: &str, dir: &Path) -> Result<(), SetupError> {
        fs::create_dir(dir).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (run as root, delegate a cgroup to this user and name it with --cgroup-parent, or pass --no-cgroup to run without limits)"
            } else {
                ""
            };
            SetupError::os(
                Layer::Cgroup,
                format!("creating {}", dir.display()),
                format!("{e}{hint}"),
            )
        })?;
        self.dirs.push((ctrl.to_string(), dir.to_path_buf()));
        Ok(())
    }

    /// Freeze every process in the cgroup and wait until the kernel says
    /// they are (at most [`FREEZE_WAIT`]; a freeze that does not complete
    /// is undone). Frozen tasks use no CPU and keep their memory.
    pub fn freeze(&self) -> Result<(), String> {
        if let Some(why) = lock(&self.no_freezer).as_ref() {
            return Err(format!("this sandbox cannot be frozen: {why}"));
        }
        let d = self
            .dir("freezer")
            .ok_or("this sandbox was started without a freezer")?;
        freeze_dir(&self.version, d, FREEZE_WAIT)
    }

    /// Where this cgroup is frozen from (v1's freezer directory, v2's own),
    /// or why it cannot be.
    pub fn freezer(&self) -> Result<&Path, String> {
        if let Some(why) = lock(&self.no_freezer).as_ref() {
            return Err(why.clone());
        }
        self.dir("freezer")
            .ok_or_else(|| "it was made without a freezer".to_string())
    }

    /// Let every process in the cgroup run again.
    pub fn thaw(&self) -> Result<(), String> {
        match self.dir("freezer") {
            Some(d) => thaw_dir(&self.version, d),
            None => Ok(()),
        }
    }

    fn dir(&self, ctrl: &str) -> Option<&Path> {
        match self.version {
            Version::V2 => self.dirs.first().map(|(_, d)| d.as_path()),
            Version::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| c == ctrl)
                .map(|(_, d)| d.as_path()),
        }
    }

    fn apply(&self, limits: &Limits) -> Result<(), SetupError> {
        let v2 = self.version == Version::V2;
        if let (Some(mem), Some(d)) = (limits.memory, self.dir("memory")) {
            if v2 {
                write(&d.join("memory.max"), &mem.to_string())?;
                if d.join("memory.swap.max").exists() {
                    write(&d.join("memory.swap.max"), "0")?;
                }
            } else {
                write(&d.join("memory.limit_in_bytes"), &mem.to_string())?;
                let memsw = d.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &mem.to_string())?;
                }
                let _ = fs::write(d.join("memory.swappiness"), "0");
            }
        }
        if let (Some(p), Some(d)) = (limits.pids, self.dir("pids")) {
            write(&d.join("pids.max"), &p.to_string())?;
        }
        if let (Some(q), Some(d)) = (limits.cpu_quota, self.dir("cpu")) {
            let period: u64 = 100_000;
            let quota = ((q * period as f64).round() as u64).max(1000);
            if v2 {
                write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
            } else {
                write(&d.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&d.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        if let (Some(cpus), Some(d)) = (&limits.cpus, self.dir("cpuset")) {
            if !v2 {
                // a new v1 cpuset starts empty: memory nodes come from the parent
                let parent = d.parent().unwrap_or(d);
                let mems = fs::read_to_string(parent.join("cpuset.mems")).unwrap_or_default();
                write(&d.join("cpuset.mems"), mems.trim())?;
            }
            write(&d.join("cpuset.cpus"), cpus).map_err(|e| {
                SetupError::new(
                    Layer::Cgroup,
                    format!("{} (are CPUs {cpus} present and allowed here?)", e.message),
                )
            })?;
        }
        Ok(())
    }

    /// Move `pid` into the cgroup (each hierarchy's directory).
    pub fn add(&self, pid: i32) -> Result<(), SetupError> {
        for (ctrl, d) in &self.dirs {
            match write(&d.join("cgroup.procs"), &pid.to_string()) {
                Ok(()) => {}
                // the freezer is for pausing only: without it the sandbox
                // runs and a pause says why not
                Err(e) if ctrl == "freezer" || self.freeze_only => {
                    self.set_no_freezer(format!("joining its freezer cgroup: {}", e.message))
                }
                // accounting only: without it the result has no CPU time
                Err(_) if ctrl == "cpuacct" => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn set_no_freezer(&self, why: String) {
        *lock(&self.no_freezer) = Some(why);
    }

    /// Move `pid` back to the parent cgroup, so that once every other
    /// process is gone the cgroup is empty and can be removed at once.
    pub fn evict(&self, pid: i32) {
        for (_, d) in &self.dirs {
            if let Some(parent) = d.parent() {
                let _ = fs::write(parent.join("cgroup.procs"), pid.to_string());
            }
        }
    }

    /// How many processes the OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some(d) = self.dir("memory") else {
            return 0;
        };
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill"),
            Version::V2 => ("memory.events", "oom_kill"),
        };
        let text = fs::read_to_string(d.join(file)).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Peak memory use in bytes, where the kernel reports it.
    pub fn memory_peak(&self) -> Option<u64> {
        let d = self.dir("memory")?;
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        fs::read_to_string(d.join(file)).ok()?.trim().parse().ok()
    }

    /// CPU time every process in the cgroup has used so far (v1's
    /// cpuacct.usage, v2's cpu.stat), where the kernel counts it.
    pub fn cpu_usage(&self) -> Option<Duration> {
        match self.version {
            Version::V1 => {
                let d = self.dir("cpuacct")?;
                let ns: u64 = fs::read_to_string(d.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some(Duration::from_nanos(ns))
            }
            Version::V2 => {
                let d = self.dir("unified")?;
                let text = fs::read_to_string(d.join("cpu.stat")).ok()?;
                let us = text
                    .lines()
                    .filter_map(|l| l.split_once(' '))
                    .find(|(k, _)| *k == "usage_usec")
                    .and_then(|(_, v)| v.trim().parse().ok())?;
                Some(Duration::from_micros(us))
            }
        }
    }

    /// Remove the cgroup. Every process in it must be gone; the kernel may
    /// need a moment to release the last one, so EBUSY is retried briefly.
    pub fn destroy(&self) {
        for (_, d) in self.dirs.iter().rev() {
            // The kernel releases an exited task's cgroup reference a moment
            // after it is reaped: back off from 50 us, about 1 s in all.
            let mut wait = Duration::from_micros(50);
            for _ in 0..40 {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => {
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_millis(50));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::owner_pid;

    #[test]
    fn only_our_names_carry_an_owner() {
        assert_eq!(owner_pid("agentvm-123-1795440742960496261"), Some(123));
        assert_eq!(owner_pid("agentvm-doctor-77"), Some(77));
        for other in [
            "agentvm-test-delegated",
            "agentvm-12",
            "agentvm-12-",
            "agentvm-12-x",
            "agentvm-0-1",
            "agentvm--1-1",
            "agentvm-doctor-",
            "user.slice",
            "agentvm",
        ] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
    }

    /// A parent that climbs out of the hierarchy is refused before any
    /// directory is made (where no hierarchy is mounted, that is said
    /// instead: either way nothing is created).
    #[test]
    fn a_parent_with_dotdot_is_refused() {
        let limits = crate::Limits {
            pids: Some(8),
            ..Default::default()
        };
        let e = super::Cgroup::create(
            &limits,
            Some(std::path::Path::new("../../etc")),
            "agentvm-t",
            false,
        )
        .err()
        .unwrap_or_else(|| panic!("a parent with .. was accepted"));
        assert!(
            e.message.contains("climbs out") || e.message.contains("no cgroup hierarchy"),
            "{e}"
        );
        assert!(!std::path::Path::new("/sys/fs/etc").exists());
    }
}
