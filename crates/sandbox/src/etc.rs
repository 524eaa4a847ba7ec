//! The sandbox's /etc: an allowlist of the host's, plus our own passwd,
//! group, hostname and hosts. It is built once per host (and again whenever
//! one of its sources changes) into a private cache directory and bound
//! read-only into every sandbox, so a sandbox costs neither the time nor the
//! memory of copying it.
//!
//! Never shown: shadow, gshadow, sudoers, ssh (host keys), ssl/private, or
//! anything not in policy/etc.txt.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Layer, SetupError};
use crate::spec::{InnerUser, HOME_DIR, HOSTNAME};

/// Bump when the layout of the cache changes.
const FORMAT: u32 = 1;
const FILE_MAX: u64 = 4 << 20;

/// A prepared /etc.
#[derive(Debug, Clone)]
pub struct EtcView {
    /// Host directory to bind read-only at /etc.
    pub dir: PathBuf,
    /// Host directories (names under /etc) bound read-only on top.
    pub bind_dirs: Vec<String>,
}

/// The files of /etc that are the sandbox's own, whatever is under them.
pub(crate) fn synthesized(user: Option<&InnerUser>) -> [(&'static str, String); 4] {
    let (mut passwd, mut group) = (
        format!("root:x:0:0:agent:{HOME_DIR}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
        "root:x:0:\nnogroup:x:65534:\n".to_string(),
    );
    // checked (InnerUser::check) before the sandbox is made: no `:` or
    // newline in the name
    if let Some(u) = user {
        passwd.push_str(&format!(
            "{}:x:{}:{}:agent:{HOME_DIR}:/bin/sh\n",
            u.name, u.uid, u.gid
        ));
        group.push_str(&format!("{}:x:{}:\n", u.name, u.gid));
    }
    [
        ("passwd", passwd),
        ("group", group),
        ("hostname", format!("{HOSTNAME}\n")),
        (
            "hosts",
            format!("127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        ),
    ]
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> SetupError {
    SetupError::os(Layer::Mounts, what, e)
}

/// A directory only we may write: created if missing, refused if it is a
/// symlink, belongs to someone else or is writable by others.
fn private_dir(p: &Path, mode: u32) -> Result<(), SetupError> {
    match fs::create_dir(p) {
        Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| err(format!("chmod {}", p.display()), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(format!("creating {}", p.display()), e)),
    }
    let md = fs::symlink_metadata(p).map_err(|e| err(format!("checking {}", p.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if !md.is_dir() || md.uid() != me || md.mode() & 0o022 != 0 {
        return Err(SetupError::new(
            Layer::Mounts,
            format!(
                "{} must be a directory owned by uid {me} and not writable by others; remove it and retry",
                p.display()
            ),
        ));
    }
    Ok(())
}

/// Where the cache lives: /run/agentvm for root (readable by the sandbox's
/// uid), else a 0700 directory of the calling user.
fn cache_base() -> Result<PathBuf, SetupError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        let p = PathBuf::from("/run/agentvm");
        private_dir(&p, 0o755)?;
        return Ok(p);
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        let x = PathBuf::from(x);
        if fs::metadata(&x)
            .map(|m| m.uid() == uid && m.is_dir())
            .unwrap_or(false)
        {
            let p = x.join("agentvm");
            private_dir(&p, 0o700)?;
            return Ok(p);
        }
    }
    let p = std::env::temp_dir().join(format!("agentvm-{uid}"));
    private_dir(&p, 0o700)?;
    Ok(p)
}

/// Prepare the /etc view, building the cache if the host's files changed.
pub fn prepare(user: Option<&InnerUser>) -> Result<EtcView, SetupError> {
    // The key covers what each source is (kind, size, mtime, inode), so an
    // edit of the host's /etc yields a fresh copy.
    let mut h = DefaultHasher::new();
    FORMAT.hash(&mut h);
    let mut entries = Vec::new();
    for name in crate::policy::etc_allow()? {
        let src = Path::new("/etc").join(name);
        let Ok(md) = fs::symlink_metadata(&src) else {
            continue;
        };
        (
            name,
            md.mode(),
            md.size(),
            md.mtime(),
            md.mtime_nsec(),
            md.ino(),
        )
            .hash(&mut h);
        entries.push((name, src, md));
    }
    for (n, c) in synthesized(user) {
        (n, c).hash(&mut h);
    }
    let base = cache_base()?;
    let dir = base.join(format!("etc-{:016x}", h.finish()));
    let bind_dirs: Vec<String> = entries
        .iter()
        .filter(|(_, _, md)| md.is_dir())
        .map(|(n, _, _)| n.to_string())
        .collect();
    if fs::symlink_metadata(&dir)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Ok(EtcView { dir, bind_dirs });
    }
    let tmp = base.join(format!(".etc-tmp-{}-{}", std::process::id(), h.finish()));
    let _ = fs::remove_dir_all(&tmp);
    let build = || -> Result<(), SetupError> {
        fs::create_dir(&tmp).map_err(|e| err(format!("creating {}", tmp.display()), e))?;
        fs::create_dir(tmp.join("ssl")).map_err(|e| err("creating ssl", e))?;
        for (name, src, md) in &entries {
            let dst = tmp.join(name);
            if md.file_type().is_symlink() {
                let t =
                    fs::read_link(src).map_err(|e| err(format!("reading {}", src.display()), e))?;
                std::os::unix::fs::symlink(t, &dst)
                    .map_err(|e| err(format!("linking {}", dst.display()), e))?;
            } else if md.is_dir() {
                // a mount point: the host directory is bound here
                fs::create_dir(&dst).map_err(|e| err(format!("creating {}", dst.display()), e))?;
            } else if md.is_file() && md.len() <= FILE_MAX {
                fs::copy(src, &dst).map_err(|e| err(format!("copying {}", src.display()), e))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))
                    .map_err(|e| err("chmod", e))?;
            }
        }
        for (n, c) in synthesized(user) {
            let dst = tmp.join(n);
            fs::write(&dst, c).map_err(|e| err(format!("writing {}", dst.display()), e))?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))
                .map_err(|e| err("chmod", e))?;
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
            .map_err(|e| err("chmod", e))?;
        Ok(())
    };
    if let Err(e) = build() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if fs::rename(&tmp, &dir).is_err() {
        // another run built the same view first
        let _ = fs::remove_dir_all(&tmp);
        if !dir.is_dir() {
            return Err(SetupError::new(
                Layer::Mounts,
                format!("could not create {}", dir.display()),
            ));
        }
    }
    Ok(EtcView { dir, bind_dirs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_must_be_private() {
        let t = tempfile::tempdir().unwrap();
        let open = t.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            private_dir(&open, 0o700).is_err(),
            "a world-writable cache was accepted"
        );
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert!(
            private_dir(&link, 0o700).is_err(),
            "a symlinked cache was accepted"
        );
        let fresh = t.path().join("fresh");
        assert!(private_dir(&fresh, 0o700).is_ok());
        let md = fs::metadata(&fresh).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
    }

    #[test]
    fn never_lists_secrets() {
        for bad in [
            "shadow",
            "gshadow",
            "sudoers",
            "ssh",
            "ssl/private",
            "ssl",
            "passwd",
            "group",
        ] {
            assert!(
                !crate::policy::etc_allow().unwrap().contains(&bad),
                "{bad} must not be shown from the host"
            );
        }
    }
}
