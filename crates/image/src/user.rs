//! An image's `User` (`name`, `uid`, `name:group`, `uid:gid`, ...)
//! resolved against the image's own /etc/passwd and /etc/group, read from
//! its unpacked layers without following a symlink out of them.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

use crate::{bounded, Image, ImageError, Store};

/// Who an image's commands run as, when not root.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Names the sandbox's passwd and group give root and nobody already.
const RESERVED: &[&str] = &["root", "nobody", "nogroup"];

/// The largest passwd or group file read.
const FILE_MAX: u64 = 1 << 20;

fn openat(dir: Option<&OwnedFd>, path: &Path, flags: OFlag) -> Option<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = match dir {
        Some(d) => nix::fcntl::openat(
            Some(d.as_raw_fd()),
            path,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
        None => nix::fcntl::open(
            path,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
    }
    .ok()?;
    // SAFETY: open just returned this descriptor; we own it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `etc/NAME` as the stacked layers show it: from the topmost layer
/// that has it, unless a layer above hides it (an `etc` that is not a
/// directory, an opaque `etc`, a whiteout or a symlink in its place):
/// None then, as for a file no layer has.
fn etc_file(layers_top_first: &[PathBuf], name: &str) -> Option<String> {
    use std::os::fd::AsRawFd;
    let present = |dir: &OwnedFd, n: &str| {
        nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            n,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ok()
    };
    for l in layers_top_first {
        let root = openat(None, l, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        if present(&root, "etc").is_none() {
            continue;
        }
        // there, but not a directory (a symlink, a whiteout): it hides
        // every lower etc
        let etc = openat(
            Some(&root),
            Path::new("etc"),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        )?;
        match present(&etc, name) {
            None => {
                // an opaque etc hides the lower layers' files too
                let mut v = [0u8; 1];
                // SAFETY: fgetxattr on a descriptor we own, into a
                // buffer of the length given.
                let n = unsafe {
                    libc::fgetxattr(
                        etc.as_raw_fd(),
                        c"user.overlay.opaque".as_ptr(),
                        v.as_mut_ptr().cast(),
                        v.len(),
                    )
                };
                if n == 1 && v[0] == b'y' {
                    return None;
                }
                continue;
            }
            Some(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => return None,
            Some(_) => {}
        }
        let f = openat(
            Some(&etc),
            Path::new(name),
            OFlag::O_RDONLY | OFlag::O_NONBLOCK,
        )?;
        let f = std::fs::File::from(f);
        if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return None;
        }
        let mut s = String::new();
        f.take(FILE_MAX).read_to_string(&mut s).ok()?;
        return Some(s);
    }
    None
}

/// Rows of a colon-separated file: (name, id, gid or "").
fn rows(text: &str) -> impl Iterator<Item = (&str, u32, Option<u32>)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let id = f.get(2)?.parse().ok()?;
        Some((f[0], id, f.get(3).and_then(|g| g.parse().ok())))
    })
}

fn name_ok(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(c))
}

/// Resolve `spec` (a config's `User`) against the layers' files. None
/// for root (and for an empty `User`).
pub fn resolve(spec: &str, layers_top_first: &[PathBuf]) -> Result<Option<User>, ImageError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(None);
    }
    let bad =
        |m: String| ImageError::BadArchive(format!("the image's User {}: {m}", bounded(spec)));
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = etc_file(layers_top_first, "passwd").unwrap_or_default();
    let (name, uid, pw_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let row = rows(&passwd).find(|r| r.1 == uid);
            (row.map(|r| r.0.to_string()), uid, row.and_then(|r| r.2))
        }
        Err(_) => {
            let row = rows(&passwd)
                .find(|r| r.0 == u)
                .ok_or_else(|| bad("not in the image's /etc/passwd".into()))?;
            (Some(u.to_string()), row.1, row.2)
        }
    };
    let gid = match g {
        None => pw_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = etc_file(layers_top_first, "group").unwrap_or_default();
                let found = rows(&group).find(|r| r.0 == g).map(|r| r.1);
                found.ok_or_else(|| {
                    bad(format!(
                        "group {} is not in the image's /etc/group",
                        bounded(g)
                    ))
                })?
            }
        },
    };
    if uid == 0 {
        if gid != 0 {
            return Err(bad(
                "root with a group other than root's is not supported".into()
            ));
        }
        return Ok(None);
    }
    if gid == 0 || uid == u32::MAX || gid == u32::MAX {
        return Err(bad(
            "a user other than root must have a gid other than 0 (and neither id 4294967295)"
                .into(),
        ));
    }
    Ok(Some(User {
        // the sandbox writes this name into its own passwd
        name: name
            .filter(|n| name_ok(n) && !RESERVED.contains(&n.as_str()))
            .unwrap_or_else(|| "agent".into()),
        uid,
        gid,
    }))
}

impl Store {
    /// Who `img`'s commands run as inside (None: root).
    pub fn user_of(&self, img: &Image) -> Result<Option<User>, ImageError> {
        let layers = img
            .layers
            .iter()
            .rev()
            .map(|l| self.layer_dir(l))
            .collect::<Result<Vec<_>, _>>()?;
        resolve(&img.config.user, &layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, passwd: Option<&str>, group: Option<&str>) -> PathBuf {
        std::fs::create_dir_all(dir.join("etc")).unwrap_or_else(|e| panic!("{e}"));
        if let Some(p) = passwd {
            std::fs::write(dir.join("etc/passwd"), p).unwrap_or_else(|e| panic!("{e}"));
        }
        if let Some(g) = group {
            std::fs::write(dir.join("etc/group"), g).unwrap_or_else(|e| panic!("{e}"));
        }
        dir.to_path_buf()
    }

    fn ok(spec: &str, layers: &[PathBuf]) -> Option<(String, u32, u32)> {
        resolve(spec, layers)
            .unwrap_or_else(|e| panic!("{spec}: {e}"))
            .map(|u| (u.name, u.uid, u.gid))
    }

    #[test]
    fn users_resolve_by_name_and_number_from_the_top_layer_down() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let low = layer(
            &t.path().join("low"),
            Some("root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n"),
            Some("root:x:0:\nnode:x:1000:\nstaff:x:50:\n"),
        );
        let top = layer(
            &t.path().join("top"),
            Some("root:x:0:0::/root:/bin/sh\nbuilder:x:1234:1300::/b:/bin/sh\n"),
            None,
        );
        let both = [top.clone(), low.clone()];
        assert_eq!(ok("", &both), None);
        assert_eq!(ok("root", &both), None);
        assert_eq!(ok("0:0", &both), None);
        assert_eq!(ok("builder", &both), Some(("builder".into(), 1234, 1300)));
        // the top layer's passwd hides the lower one's
        assert!(resolve("node", &both).is_err());
        assert_eq!(
            ok("node", std::slice::from_ref(&low)),
            Some(("node".into(), 1000, 1000))
        );
        assert_eq!(ok("1000:staff", &both), Some(("agent".into(), 1000, 50)));
        assert_eq!(ok("4321", &both), Some(("agent".into(), 4321, 4321)));
        assert_eq!(ok("builder:77", &both), Some(("builder".into(), 1234, 77)));
        for bad in ["nobody-here", "builder:nogroup", "5:0", "0:5", "4294967295"] {
            assert!(resolve(bad, &both).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let outside = t.path().join("outside");
        std::fs::write(&outside, "evil:x:77:77::/:/bin/sh\n").unwrap_or_else(|e| panic!("{e}"));
        let l = layer(&t.path().join("l"), None, None);
        std::os::unix::fs::symlink(&outside, l.join("etc/passwd"))
            .unwrap_or_else(|e| panic!("{e}"));
        let low = layer(
            &t.path().join("low"),
            Some("evil:x:88:88::/:/bin/sh\n"),
            None,
        );
        assert!(resolve("evil", std::slice::from_ref(&l)).is_err());
        // and it hides the lower layer's file as any other entry would
        assert!(resolve("evil", &[l, low]).is_err());
        // an etc that is a symlink, or opaque, hides the lower passwd
        let link = t.path().join("link");
        std::fs::create_dir(&link).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("/etc", link.join("etc")).unwrap_or_else(|e| panic!("{e}"));
        let lower = layer(
            &t.path().join("lower"),
            Some("evil:x:88:88::/:/bin/sh\n"),
            None,
        );
        assert!(resolve("evil", &[link, lower.clone()]).is_err());
        let opaque = layer(&t.path().join("opaque"), None, None);
        let path = std::ffi::CString::new(opaque.join("etc").as_os_str().as_encoded_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: setxattr with NUL-terminated strings and a 1-byte value.
        let r = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"user.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
        assert!(resolve("evil", &[opaque, lower.clone()]).is_err());
        let plain = layer(&t.path().join("plain"), None, None);
        assert_eq!(ok("evil", &[plain, lower]), Some(("evil".into(), 88, 88)));
        // a user other than root may not borrow root's or nobody's name
        let r = layer(
            &t.path().join("r"),
            Some("nobody:x:1234:1234::/:/bin/sh\n"),
            None,
        );
        assert_eq!(ok("1234", &[r]), Some(("agent".into(), 1234, 1234)));
        // a name that would add a passwd entry is not written as it is
        let odd = layer(
            &t.path().join("odd"),
            Some("Odd:Name:x:1:1\nBAD:x:1500:1500::/:/bin/sh\n"),
            None,
        );
        assert_eq!(ok("BAD", &[odd]), Some(("agent".into(), 1500, 1500)));
    }
}
