//! The freezer's two kernel interfaces, each on a real hierarchy: v1's
//! freezer.state and v2's cgroup.freeze. A server session on this host
//! takes the v1 path (its limits live in v1 hierarchies); the v2 one is
//! proven here on the unified hierarchy a hybrid host also mounts, as a
//! pure v2 host would use it.

use std::path::PathBuf;
use std::time::Duration;

use agentvm_sandbox::cgroup::{freeze_dir, thaw_dir, Version};

use crate::common::*;

/// The mount point of the filesystem type `fstype` with option `opt`
/// (any, when empty).
fn mount_of(fstype: &str, opt: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        let ty = r.next()?;
        let opts = r.nth(1).unwrap_or("");
        (ty == fstype && (opt.is_empty() || opts.split(',').any(|o| o == opt)))
            .then(|| PathBuf::from(left.split(' ').nth(4).unwrap_or("")))
    })
}

fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn freeze_a_busy_loop(version: Version, mount: PathBuf) {
    let dir = mount.join(format!("agentvm-freeze-test-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    let pid = child.id();
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    let used = |d| {
        let a = ticks(pid);
        std::thread::sleep(d);
        ticks(pid) - a
    };
    assert!(
        used(Duration::from_millis(300)) > 0,
        "the loop does not run"
    );
    let frozen = freeze_dir(&version, &dir, Duration::from_secs(5));
    let idle = used(Duration::from_millis(500));
    let thawed = thaw_dir(&version, &dir);
    let again = used(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(50));
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(frozen, Ok(()));
    assert_eq!(idle, 0, "{version:?}: a frozen loop used CPU");
    assert_eq!(thawed, Ok(()));
    assert!(
        again > 0,
        "{version:?}: the loop did not run on after thawing"
    );
}

#[test]
fn v1_and_v2_freezers_stop_a_busy_loop_and_let_it_go_on() {
    if !is_root() {
        return skip(
            "the cgroup freezers",
            "creating cgroups needs root here: run ./test.sh as root",
        );
    }
    match mount_of("cgroup", "freezer") {
        Some(m) => freeze_a_busy_loop(Version::V1, m),
        None => skip_part(
            "the v1 freezer",
            "no v1 freezer hierarchy is mounted on this host",
        ),
    }
    match mount_of("cgroup2", "") {
        Some(m) => freeze_a_busy_loop(Version::V2, m),
        None => skip_part(
            "the v2 freezer",
            "no cgroup2 hierarchy is mounted on this host",
        ),
    }
}
