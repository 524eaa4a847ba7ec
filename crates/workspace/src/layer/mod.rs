//! Layers: a workspace's state as a stack of frozen overlayfs upper trees
//! over the untouched repo (docs/WORKSPACES.md).
//!
//! A layer is a directory in the layer store, made once and never written
//! again: the upper directory a sandbox wrote (files, symlinks, whiteouts,
//! opaque directories), copied out through directory descriptors. Beside
//! it, `ID.manifest` lists every entry with its kind, mode, size and
//! SHA-256, so damage on disk is found before a workspace resumes from it.
//!
//! A layer appears whole or not at all: it is built under `.tmp-ID`,
//! synced, its manifest renamed into place, then the directory renamed;
//! a crash leaves a `.tmp-` directory that [`sweep`] removes, never a half
//! layer under its own name.
//!
//! Sockets, fifos and devices other than whiteouts are not kept (a patch
//! cannot carry them either); neither are hard links (each name is a file),
//! ownership, times, or xattrs other than the opaque mark.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

use crate::fsx::{type_of, Dir, Type};

/// Why a layer could not be made, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {id}: {path}: {source}")]
    Io {
        id: String,
        path: String,
        source: std::io::Error,
    },
    /// What is on disk is not what the manifest says.
    #[error("layer {id} is damaged: {path}: {why}")]
    Damaged {
        id: String,
        path: String,
        why: String,
    },
    #[error("not a layer id: {0:?}")]
    BadId(String),
    /// What the sandbox left is past a bound: nothing was saved.
    #[error("the changes are too large to keep: {0}")]
    TooLarge(String),
}

/// What one layer may hold. The sandbox's disk limit bounds what it can
/// write, but not a sparse file's size, nor entries that take no space:
/// these are checked before anything is copied.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Bytes of file contents and symlink targets, counted by their sizes
    /// (a sparse file counts whole: it would be copied whole).
    pub bytes: u64,
    /// Entries (files, directories, symlinks, whiteouts).
    pub entries: u64,
    /// Directories deep (every walk here is recursive).
    pub depth: usize,
}

impl Bounds {
    /// The defaults with `bytes` as the byte bound.
    pub fn with_bytes(bytes: u64) -> Bounds {
        Bounds {
            bytes,
            ..Bounds::default()
        }
    }
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            bytes: 1 << 30,
            entries: crate::MAX_CHANGES as u64,
            depth: MAX_DEPTH,
        }
    }
}

/// Directories deep a layer may be.
pub const MAX_DEPTH: usize = 256;

/// What a made layer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Made {
    /// Entries (files, directories, symlinks, whiteouts).
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

/// A layer id: 1 to 64 of `[0-9a-z_-]`, so it is always one path component.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check(id: &str) -> Result<(), LayerError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(LayerError::BadId(id.to_string()))
    }
}

/// The directory of layer `id` in `store`.
pub fn path(store: &Path, id: &str) -> PathBuf {
    store.join(id)
}

fn manifest_path(store: &Path, id: &str) -> PathBuf {
    store.join(format!("{id}.manifest"))
}

/// Copy the upper directory `upper` into a new layer `id` of `store`;
/// an empty upper makes no layer (the result counts no entries).
pub fn save(
    upper: std::os::fd::BorrowedFd<'_>,
    store: &Path,
    id: &str,
    bounds: Bounds,
) -> Result<Made, LayerError> {
    check(id)?;
    let src = Dir::from_fd(upper).map_err(io(id, ""))?;
    let mut seen = Made::default();
    measure(&src, 0, &bounds, &mut seen, id)?;
    if seen.entries == 0 {
        // nothing changed: no layer (and no fsync) at all
        return Ok(seen);
    }
    build(store, id, |dst| copy_tree(&src, dst, b"", id))
}

/// A new layer `id` equal to the stack `stack` (newest first) laid over
/// one another: what a workspace shows over its repo is the same with the
/// one layer as with the stack. Files are hard links to the older layers'
/// (layers are never written, so they may share them).
pub fn squash(store: &Path, stack: &[String], id: &str) -> Result<Made, LayerError> {
    squash_into(store, stack, store, id)
}

/// [`squash`], the new layer made in another store `into` (on the same
/// filesystem: its files are hard links to `store`'s).
pub fn squash_into(
    store: &Path,
    stack: &[String],
    into: &Path,
    id: &str,
) -> Result<Made, LayerError> {
    check(id)?;
    for l in stack {
        check(l)?;
    }
    build(into, id, |dst| {
        for l in stack.iter().rev() {
            let src = open_layer(store, l)?;
            let st =
                nix::sys::stat::fstat(src.fd().as_raw_fd()).map_err(|e| io(l, "/")(e.into()))?;
            own(dst, None, &st).map_err(io(l, "/"))?;
            lay_over(dst, &src, b"", l)?;
        }
        Ok(())
    })
}

/// Check layer `id` against its manifest: every entry there, nothing
/// else, each with its kind, mode, size and content hash. The error names
/// the first path that differs.
pub fn verify(store: &Path, id: &str) -> Result<Made, LayerError> {
    check(id)?;
    let want = std::fs::File::open(manifest_path(store, id)).map_err(|e| LayerError::Damaged {
        id: id.into(),
        path: format!("{id}.manifest"),
        why: format!("the manifest cannot be read ({e})"),
    })?;
    let dir = open_layer(store, id)?;
    let mut got = Vec::new();
    let made = manifest_of(&dir, b"", id, &mut got)?;
    let mut text = String::new();
    std::io::BufReader::new(want)
        .read_to_string(&mut text)
        .map_err(|e| LayerError::Damaged {
            id: id.into(),
            path: format!("{id}.manifest"),
            why: format!("the manifest cannot be read ({e})"),
        })?;
    let got = String::from_utf8_lossy(&got);
    let (w, g): (Vec<&str>, Vec<&str>) = (text.lines().collect(), got.lines().collect());
    if w == g {
        return Ok(made);
    }
    let paths = |v: &[&str]| {
        v.iter()
            .map(|l| line_path(l))
            .collect::<std::collections::HashSet<_>>()
    };
    let (wp, gp) = (paths(&w), paths(&g));
    // the first path that differs, in the layer's own order
    let i = w.iter().zip(&g).take_while(|(a, b)| a == b).count();
    let damaged = |path: String, why: &str| LayerError::Damaged {
        id: id.into(),
        path,
        why: why.into(),
    };
    let wl: std::collections::HashSet<&str> = w.iter().copied().collect();
    for l in g.iter().skip(i) {
        let p = line_path(l);
        if !wp.contains(&p) {
            return Err(damaged(p, "not in the manifest"));
        }
        if !wl.contains(l) {
            return Err(damaged(p, "its kind, mode, size or content changed"));
        }
    }
    for l in w.iter().skip(i) {
        let p = line_path(l);
        if !gp.contains(&p) {
            return Err(damaged(p, "missing"));
        }
    }
    Err(damaged(
        format!("{id}.manifest"),
        "the manifest's order differs",
    ))
}

/// Bytes a layer takes (its files' contents), from its manifest.
pub fn size(store: &Path, id: &str) -> Result<Made, LayerError> {
    check(id)?;
    let f = std::fs::File::open(manifest_path(store, id)).map_err(io(id, "manifest"))?;
    let mut m = Made::default();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(io(id, "manifest"))?;
        m.entries += 1;
        if line.starts_with("f\t") {
            m.bytes += line
                .split('\t')
                .nth(2)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(m)
}

/// Remove layer `id` (its manifest first, so a crash halfway leaves a
/// layer that fails verification rather than one that passes damaged).
pub fn remove(store: &Path, id: &str) -> Result<(), LayerError> {
    check(id)?;
    match std::fs::remove_file(manifest_path(store, id)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(id, "manifest")(e)),
    }
    remove_dir_all(&path(store, id)).map_err(io(id, ""))
}

/// Remove what a crash left: half-built layers, and complete ones, that
/// `keep` does not name (a layer being made now is one to keep). Returns
/// the ids removed.
pub fn sweep(store: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<String>, LayerError> {
    let mut gone = Vec::new();
    let rd = match std::fs::read_dir(store) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(gone),
        Err(e) => return Err(io("-", "")(e)),
    };
    for e in rd {
        let e = e.map_err(io("-", ""))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(t) = name.strip_prefix(".tmp-") {
            if keep(t.strip_suffix(".manifest").unwrap_or(t)) {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() && !p.is_symlink() {
                remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(io(t, ""))?;
            continue;
        }
        let id = name.strip_suffix(".manifest").unwrap_or(&name);
        if valid_id(id) && !keep(id) && !gone.iter().any(|g| g == id) {
            remove(store, id)?;
            gone.push(id.to_string());
        }
    }
    Ok(gone)
}

/// Remove the tree `p` (its read-only directories too), never following
/// a symlink.
fn remove_dir_all(p: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(std::io::Error::other("no parent"));
    };
    let fd = match nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsFd;
    remove_entry(&Dir::from_fd(fd.as_fd())?, name)
}

fn io<'a>(id: &'a str, path: &'a str) -> impl Fn(std::io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        id: id.into(),
        path: path.into(),
        source,
    }
}

fn shown(rel: &[u8]) -> String {
    if rel.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}

fn open_layer(store: &Path, id: &str) -> Result<Dir, LayerError> {
    let fd = nix::fcntl::open(
        &path(store, id),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::Damaged {
        id: id.into(),
        path: "/".into(),
        why: format!("the layer cannot be opened ({e})"),
    })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsFd;
    Dir::from_fd(fd.as_fd()).map_err(io(id, ""))
}

/// Build layer `id` with `fill`, then put it in place whole.
fn build(
    store: &Path,
    id: &str,
    fill: impl FnOnce(&Dir) -> Result<(), LayerError>,
) -> Result<Made, LayerError> {
    std::fs::create_dir_all(store).map_err(io(id, ""))?;
    let final_dir = path(store, id);
    if final_dir.exists() {
        return Err(io(id, "")(std::io::Error::from_raw_os_error(libc::EEXIST)));
    }
    let tmp = store.join(format!(".tmp-{id}"));
    remove_dir_all(&tmp).map_err(io(id, ""))?;
    std::fs::create_dir(&tmp).map_err(io(id, ""))?;
    let made = (|| {
        let fd = nix::fcntl::open(
            &tmp,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(id, "")(e.into()))?;
        // SAFETY: open just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsFd;
        let dst = Dir::from_fd(fd.as_fd()).map_err(io(id, ""))?;
        fill(&dst)?;
        let mut manifest = Vec::new();
        let made = manifest_of(&dst, b"", id, &mut manifest)?;
        sync_tree(&dst).map_err(io(id, ""))?;
        let mtmp = store.join(format!(".tmp-{id}.manifest"));
        let mut f = std::fs::File::create(&mtmp).map_err(io(id, "manifest"))?;
        f.write_all(&manifest).map_err(io(id, "manifest"))?;
        f.sync_all().map_err(io(id, "manifest"))?;
        std::fs::rename(&mtmp, manifest_path(store, id)).map_err(io(id, "manifest"))?;
        Ok(made)
    })();
    let made = match made {
        Ok(m) => m,
        Err(e) => {
            let _ = remove_dir_all(&tmp);
            let _ = std::fs::remove_file(store.join(format!(".tmp-{id}.manifest")));
            let _ = std::fs::remove_file(manifest_path(store, id));
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &final_dir).map_err(io(id, ""))?;
    std::fs::File::open(store)
        .and_then(|d| d.sync_all())
        .map_err(io(id, ""))?;
    Ok(made)
}

fn join(rel: &[u8], name: &OsStr) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name.as_bytes());
    p
}

const OPAQUE: &std::ffi::CStr = c"user.overlay.opaque";

fn set_opaque(d: &Dir) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated name, a one-byte value, our descriptor.
    let r = unsafe {
        libc::fsetxattr(
            d.fd().as_raw_fd(),
            OPAQUE.as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A directory made writable for us (0700): its own mode is set once it
/// is filled ([`set_mode`]), or a read-only one could not be filled.
fn mkdir(parent: &Dir, name: &OsStr) -> std::io::Result<Dir> {
    nix::sys::stat::mkdirat(
        Some(parent.fd().as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o700),
    )?;
    parent.open_dir(name)
}

/// The mode a directory keeps (mkdir's passed the umask, and was 0700).
fn set_mode(d: &Dir, mode: u32) -> std::io::Result<()> {
    nix::sys::stat::fchmod(d.fd().as_raw_fd(), Mode::from_bits_truncate(mode & 0o777))?;
    Ok(())
}

fn whiteout(parent: &Dir, name: &OsStr) -> std::io::Result<()> {
    nix::sys::stat::mknodat(
        Some(parent.fd().as_raw_fd()),
        name,
        nix::sys::stat::SFlag::S_IFCHR,
        Mode::empty(),
        0,
    )?;
    Ok(())
}

fn copy_file(src: &Dir, dst: &Dir, name: &OsStr, mode: u32) -> std::io::Result<()> {
    let mut from = src.open_file(name)?;
    let fd = nix::fcntl::openat(
        Some(dst.fd().as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    let mut to = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    std::io::copy(&mut from, &mut to)?;
    use std::os::unix::fs::PermissionsExt;
    to.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
    Ok(())
}

fn copy_symlink(src: &Dir, dst: &Dir, name: &OsStr) -> std::io::Result<()> {
    let target = src.readlink(name)?;
    nix::unistd::symlinkat(OsStr::from_bytes(&target), Some(dst.fd().as_raw_fd()), name)?;
    Ok(())
}

/// Count what the tree under `dir` holds, refusing it past `b`.
fn measure(
    dir: &Dir,
    depth: usize,
    b: &Bounds,
    seen: &mut Made,
    id: &str,
) -> Result<(), LayerError> {
    if depth > b.depth {
        return Err(LayerError::TooLarge(format!(
            "directories more than {} deep",
            b.depth
        )));
    }
    for name in dir.names().map_err(io(id, ""))? {
        let st = dir.stat(&name).map_err(io(id, ""))?;
        seen.entries += 1;
        if seen.entries > b.entries {
            return Err(LayerError::TooLarge(format!(
                "more than {} files and directories",
                b.entries
            )));
        }
        match type_of(&st) {
            Type::Dir => measure(
                &dir.open_dir(&name).map_err(io(id, ""))?,
                depth + 1,
                b,
                seen,
                id,
            )?,
            Type::File { .. } | Type::Symlink => {
                seen.bytes = seen
                    .bytes
                    .saturating_add(u64::try_from(st.st_size).unwrap_or(0));
                if seen.bytes > b.bytes {
                    return Err(LayerError::TooLarge(format!(
                        "more than {} bytes (a sparse file counts by its size)",
                        b.bytes
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Copy the tree under `src` into the empty directory `dst`.
fn copy_tree(src: &Dir, dst: &Dir, rel: &[u8], id: &str) -> Result<(), LayerError> {
    if rel.is_empty() {
        let st = nix::sys::stat::fstat(src.fd().as_raw_fd()).map_err(|e| io(id, "/")(e.into()))?;
        own(dst, None, &st).map_err(io(id, "/"))?;
    }
    if src.is_opaque() {
        set_opaque(dst).map_err(io(id, &shown(rel)))?;
    }
    for name in src.names().map_err(io(id, &shown(rel)))? {
        let p = join(rel, &name);
        let at = |e| io(id, &shown(&p))(e);
        let st = src.stat(&name).map_err(at)?;
        match type_of(&st) {
            Type::Dir => {
                let sub = src.open_dir(&name).map_err(at)?;
                let made = mkdir(dst, &name).map_err(at)?;
                copy_tree(&sub, &made, &p, id)?;
                set_mode(&made, st.st_mode).map_err(at)?;
            }
            Type::File { .. } => copy_file(src, dst, &name, st.st_mode).map_err(at)?,
            Type::Symlink => copy_symlink(src, dst, &name).map_err(at)?,
            Type::Whiteout => whiteout(dst, &name).map_err(at)?,
            Type::Other => continue,
        }
        own(dst, Some(&name), &st).map_err(at)?;
    }
    Ok(())
}

/// As root, an entry keeps its owner (the id root inside the sandbox maps
/// to, so it is root's again when the layer lies under a later sandbox);
/// otherwise everything is the caller's, which is root inside its own
/// sandboxes.
fn own(dir: &Dir, name: Option<&OsStr>, st: &nix::sys::stat::FileStat) -> std::io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let (uid, gid) = (
        Some(nix::unistd::Uid::from_raw(st.st_uid)),
        Some(nix::unistd::Gid::from_raw(st.st_gid)),
    );
    match name {
        Some(n) => nix::unistd::fchownat(
            Some(dir.fd().as_raw_fd()),
            n,
            uid,
            gid,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?,
        None => nix::unistd::fchown(dir.fd().as_raw_fd(), uid, gid)?,
    }
    Ok(())
}

/// Remove `name` from `dir`, whatever it is (a directory with all it holds).
fn remove_entry(dir: &Dir, name: &OsStr) -> std::io::Result<()> {
    let Some(st) = dir.stat_opt(name)? else {
        return Ok(());
    };
    if type_of(&st) == Type::Dir {
        let sub = dir.open_dir(name)?;
        // a read-only directory of a layer is still ours to empty
        set_mode(&sub, 0o700)?;
        for n in sub.names()? {
            remove_entry(&sub, &n)?;
        }
        nix::unistd::unlinkat(
            Some(dir.fd().as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::RemoveDir,
        )?;
    } else {
        nix::unistd::unlinkat(
            Some(dir.fd().as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )?;
    }
    Ok(())
}

/// Lay the layer tree `src` over the accumulated tree `dst` as overlayfs
/// would show it: a whiteout deletes (and stays, to hide the repo's file),
/// an opaque directory replaces, a plain directory merges, anything else
/// replaces. Files are hard-linked, not copied.
fn lay_over(dst: &Dir, src: &Dir, rel: &[u8], id: &str) -> Result<(), LayerError> {
    for name in src.names().map_err(io(id, &shown(rel)))? {
        let p = join(rel, &name);
        let at = |e| io(id, &shown(&p))(e);
        let st = src.stat(&name).map_err(at)?;
        let below = dst.stat_opt(&name).map_err(at)?.map(|s| type_of(&s));
        match type_of(&st) {
            Type::Dir => {
                let sub = src.open_dir(&name).map_err(at)?;
                if below == Some(Type::Dir) && !sub.is_opaque() {
                    let into = dst.open_dir(&name).map_err(at)?;
                    // writable while it is filled, then the newer mode
                    set_mode(&into, 0o700).map_err(at)?;
                    lay_over(&into, &sub, &p, id)?;
                    set_mode(&into, st.st_mode).map_err(at)?;
                } else {
                    // whatever was below is hidden: a directory made over
                    // a deleted name must hide the repo's too
                    let hides = below.is_some() || sub.is_opaque();
                    remove_entry(dst, &name).map_err(at)?;
                    let made = mkdir(dst, &name).map_err(at)?;
                    own(dst, Some(&name), &st).map_err(at)?;
                    if hides {
                        set_opaque(&made).map_err(at)?;
                    }
                    lay_over(&made, &sub, &p, id)?;
                    set_mode(&made, st.st_mode).map_err(at)?;
                }
            }
            Type::File { .. } => {
                remove_entry(dst, &name).map_err(at)?;
                nix::unistd::linkat(
                    Some(src.fd().as_raw_fd()),
                    name.as_os_str(),
                    Some(dst.fd().as_raw_fd()),
                    name.as_os_str(),
                    nix::fcntl::AtFlags::empty(),
                )
                .map_err(|e| at(e.into()))?;
            }
            Type::Symlink => {
                remove_entry(dst, &name).map_err(at)?;
                copy_symlink(src, dst, &name).map_err(at)?;
                own(dst, Some(&name), &st).map_err(at)?;
            }
            Type::Whiteout => {
                remove_entry(dst, &name).map_err(at)?;
                whiteout(dst, &name).map_err(at)?;
            }
            Type::Other => {}
        }
    }
    Ok(())
}

/// Escape a path for one manifest line: `%`, control bytes, space, tab
/// and bytes past ASCII as `%XX`.
fn escape(rel: &[u8]) -> String {
    let mut s = String::with_capacity(rel.len());
    for &b in rel {
        if b <= b' ' || b == b'%' || b >= 0x7f {
            s.push_str(&format!("%{b:02x}"));
        } else {
            s.push(char::from(b));
        }
    }
    s
}

fn line_path(line: &str) -> String {
    let b = line.rsplit('\t').next().unwrap_or("").as_bytes();
    let hexval = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|v| u8::try_from(v).ok())
    };
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The manifest of the tree under `dir`, one line per entry, in path
/// order: `KIND\tMODE\tSIZE\tSHA256\tPATH` (KIND d, o for an opaque
/// directory, f, l, w).
fn manifest_of(dir: &Dir, rel: &[u8], id: &str, out: &mut Vec<u8>) -> Result<Made, LayerError> {
    let mut made = Made::default();
    for name in dir.names().map_err(io(id, &shown(rel)))? {
        let p = join(rel, &name);
        let at = |e| io(id, &shown(&p))(e);
        let st = dir.stat(&name).map_err(at)?;
        let mode = st.st_mode & 0o777;
        let line = match type_of(&st) {
            Type::Dir => {
                let sub = dir.open_dir(&name).map_err(at)?;
                let kind = if sub.is_opaque() { 'o' } else { 'd' };
                writeln!(out, "{kind}\t{mode:o}\t0\t-\t{}", escape(&p)).map_err(at)?;
                let m = manifest_of(&sub, &p, id, out)?;
                made.entries += 1 + m.entries;
                made.bytes += m.bytes;
                continue;
            }
            Type::File { .. } => {
                let mut f = dir.open_file(&name).map_err(at)?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut n = 0u64;
                loop {
                    let k = f.read(&mut buf).map_err(at)?;
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                    n += k as u64;
                }
                made.bytes += n;
                format!("f\t{mode:o}\t{n}\t{}\t{}", hex(&h.finalize()), escape(&p))
            }
            Type::Symlink => {
                let t = dir.readlink(&name).map_err(at)?;
                format!(
                    "l\t-\t{}\t{}\t{}",
                    t.len(),
                    hex(&Sha256::digest(&t)),
                    escape(&p)
                )
            }
            Type::Whiteout => format!("w\t-\t0\t-\t{}", escape(&p)),
            Type::Other => continue,
        };
        made.entries += 1;
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    Ok(made)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// fsync every file and directory of the tree (directories last).
fn sync_tree(dir: &Dir) -> std::io::Result<()> {
    for name in dir.names()? {
        let st = dir.stat(&name)?;
        match type_of(&st) {
            Type::Dir => sync_tree(&dir.open_dir(&name)?)?,
            Type::File { .. } => dir.open_file(&name)?.sync_all()?,
            _ => {}
        }
    }
    nix::unistd::fsync(dir.fd().as_raw_fd())?;
    Ok(())
}

/// Every name a manifest lists, unescaped (for tests and tools).
pub fn manifest_paths(store: &Path, id: &str) -> Result<Vec<OsString>, LayerError> {
    check(id)?;
    let f = std::fs::File::open(manifest_path(store, id)).map_err(io(id, "manifest"))?;
    let mut v = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(io(id, "manifest"))?;
        v.push(OsString::from(line_path(&line)));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
