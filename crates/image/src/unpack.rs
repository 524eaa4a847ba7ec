//! One layer's tar, unpacked into a directory without anything it says
//! reaching outside it: every path walked one component at a time from the
//! layer's root through directory descriptors opened with `O_NOFOLLOW`,
//! hard links resolved inside the layer only, no devices, no setuid bits,
//! no owners, no xattrs but overlayfs's opaque mark, every byte counted.

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::ImageError;

/// Longest path or link target an entry may have.
const PATH_MAX: usize = 4096;

/// What the image may cost, all its layers together.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of file contents.
    pub bytes: u64,
    /// Entries (files, directories, links, whiteouts).
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bytes: 8 << 30,
            entries: 1_000_000,
        }
    }
}

/// What unpacking made, and what it left out.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub entries: u64,
    pub bytes: u64,
    /// Device nodes and fifos, not made.
    pub devices_skipped: u64,
    /// Files and directories whose setuid or setgid bit was dropped.
    pub setid_dropped: u64,
}

/// The budget left for the rest of the image.
#[derive(Debug)]
pub struct Budget {
    pub limits: Limits,
    pub bytes: u64,
    pub entries: u64,
}

impl Budget {
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            bytes: 0,
            entries: 0,
        }
    }

    fn take_entry(&mut self) -> Result<(), ImageError> {
        self.entries += 1;
        if self.entries > self.limits.entries {
            return Err(ImageError::TooLarge(format!(
                "more than {} entries (--max-entries)",
                self.limits.entries
            )));
        }
        Ok(())
    }

    fn take_bytes(&mut self, n: u64, path: &str) -> Result<(), ImageError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.limits.bytes {
            return Err(ImageError::TooLarge(format!(
                "{path} takes the image past {} bytes of files (--max-size)",
                self.limits.bytes
            )));
        }
        Ok(())
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageError {
    move |e| ImageError::Io(format!("{what}: {e}"))
}

fn errno(what: impl std::fmt::Display) -> impl FnOnce(nix::errno::Errno) -> ImageError {
    move |e| ImageError::Io(format!("{what}: {e}"))
}

fn refused(path: &str, why: &str) -> ImageError {
    ImageError::Refused(format!("{path}: {why}"))
}

/// An entry's path as components: `..` refuses it, a leading `/` and `.`
/// components are dropped (the layer's root is the image's `/`).
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    let shown = String::from_utf8_lossy(raw);
    if raw.len() > PATH_MAX {
        return Err(refused(&shown, "path too long"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(refused(&shown, "the path climbs out with '..'")),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn cstr(c: &[u8]) -> Result<CString, ImageError> {
    CString::new(c).map_err(|_| ImageError::Refused("a path holds a NUL byte".into()))
}

fn open_dir_at(dir: RawFd, name: &CStr) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn lstat_at(dir: RawFd, name: &CStr) -> nix::Result<Option<nix::sys::stat::FileStat>> {
    match nix::sys::stat::fstatat(Some(dir), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn kind(st: &nix::sys::stat::FileStat) -> u32 {
    st.st_mode & libc::S_IFMT
}

/// Unpacks the entries of one layer into the directory `root`.
pub struct Unpacker {
    root: OwnedFd,
    /// Directories' modes, set once the layer is complete (a read-only
    /// directory could not be filled).
    modes: Vec<(Vec<Vec<u8>>, u32)>,
    pub report: Report,
}

impl Unpacker {
    pub fn new(root: OwnedFd) -> Unpacker {
        Unpacker {
            root,
            modes: Vec::new(),
            report: Report::default(),
        }
    }

    /// The directory `comps` names, each component opened without
    /// following a symlink; missing ones are made (0755), as tar does.
    fn walk(&self, comps: &[&[u8]], shown: &str, make: bool) -> Result<OwnedFd, ImageError> {
        let mut cur = nix::unistd::dup(self.root.as_raw_fd()).map_err(errno("dup"))?;
        // SAFETY: dup just returned this descriptor; we own it.
        let mut cur_fd = unsafe { OwnedFd::from_raw_fd(cur) };
        for c in comps {
            let name = cstr(c)?;
            let next = match open_dir_at(cur, &name) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::ENOENT) if make => {
                    nix::sys::stat::mkdirat(
                        Some(cur),
                        name.as_c_str(),
                        Mode::from_bits_truncate(0o755),
                    )
                    .map_err(errno(format!("making a directory for {shown}")))?;
                    open_dir_at(cur, &name)
                        .map_err(errno(format!("opening a directory for {shown}")))?
                }
                Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => return Err(refused(
                    shown,
                    "the path goes through a symlink or a file (never followed while unpacking)",
                )),
                Err(nix::errno::Errno::ENOENT) => {
                    return Err(refused(shown, "not in this layer"));
                }
                Err(e) => return Err(ImageError::Io(format!("{shown}: {e}"))),
            };
            cur = next.as_raw_fd();
            cur_fd = next;
        }
        Ok(cur_fd)
    }

    /// Make room for a new entry `name` in `dir`: whatever is there goes,
    /// unless it is a directory and the new entry is one too.
    fn clear(
        &self,
        dir: RawFd,
        name: &CStr,
        shown: &str,
        keep_dir: bool,
    ) -> Result<bool, ImageError> {
        match lstat_at(dir, name).map_err(errno(shown))? {
            None => Ok(false),
            Some(st) if kind(&st) == libc::S_IFDIR => {
                if keep_dir {
                    return Ok(true);
                }
                Err(refused(shown, "replaces a directory of the same layer"))
            }
            Some(_) => {
                nix::unistd::unlinkat(Some(dir), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                    .map_err(errno(shown))?;
                Ok(false)
            }
        }
    }

    /// One entry of the layer's tar.
    pub fn entry<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        budget: &mut Budget,
    ) -> Result<(), ImageError> {
        let raw = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let comps = components(&raw)?;
        let Some((last, parents)) = comps.split_last() else {
            // the layer's root itself
            return Ok(());
        };
        budget.take_entry()?;
        self.report.entries += 1;
        let parent = self.walk(parents, &shown, true)?;
        let pfd = parent.as_raw_fd();
        let ty = e.header().entry_type();
        let mode = e.header().mode().unwrap_or(0o644);

        // whiteouts: .wh.NAME deletes NAME below; .wh..wh..opq hides all below
        if let Some(target) = last.strip_prefix(b".wh.") {
            if target == b".wh..opq" {
                return set_opaque(pfd).map_err(io(format!("marking {shown} opaque")));
            }
            if target.is_empty() || target == b"." || target == b".." || target.starts_with(b".wh.")
            {
                return Err(refused(&shown, "not a whiteout of a name"));
            }
            let name = cstr(target)?;
            if self.clear(pfd, &name, &shown, true)? {
                remove_tree_at(pfd, &name).map_err(io(&shown))?;
            }
            return nix::sys::stat::mknodat(
                Some(pfd),
                name.as_c_str(),
                nix::sys::stat::SFlag::S_IFCHR,
                Mode::empty(),
                0,
            )
            .map_err(errno(format!("making the whiteout {shown}")));
        }
        let name = cstr(last)?;
        let setid = mode & 0o6000 != 0;
        match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // a sparse file counts at its full size: it is written whole
                let size = match (ty, e.header().as_gnu()) {
                    (tar::EntryType::GNUSparse, Some(g)) => g
                        .real_size()
                        .map_err(|_| refused(&shown, "a sparse file without its size"))?,
                    _ => e.size(),
                };
                budget.take_bytes(size, &shown)?;
                self.clear(pfd, &name, &shown, false)?;
                let fd = nix::fcntl::openat(
                    Some(pfd),
                    name.as_c_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(errno(format!("creating {shown}")))?;
                // SAFETY: openat just returned this descriptor; we own it.
                let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let mut buf = vec![0u8; 64 << 10];
                let mut wrote: u64 = 0;
                loop {
                    let n = e.read(&mut buf).map_err(io(format!("reading {shown}")))?;
                    if n == 0 {
                        break;
                    }
                    wrote += n as u64;
                    if wrote > size {
                        return Err(refused(&shown, "holds more than its header says"));
                    }
                    f.write_all(&buf[..n])
                        .map_err(io(format!("writing {shown}")))?;
                }
                nix::sys::stat::fchmod(f.as_raw_fd(), Mode::from_bits_truncate(mode & 0o777))
                    .map_err(errno(format!("chmod {shown}")))?;
                self.report.bytes += wrote;
            }
            tar::EntryType::Directory => {
                if !self.clear(pfd, &name, &shown, true)? {
                    nix::sys::stat::mkdirat(
                        Some(pfd),
                        name.as_c_str(),
                        Mode::from_bits_truncate(0o755),
                    )
                    .map_err(errno(format!("making {shown}")))?;
                }
                let path: Vec<Vec<u8>> = comps.iter().map(|c| c.to_vec()).collect();
                self.modes.push((path, mode & 0o1777));
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| refused(&shown, "a symlink without a target"))?;
                if target.is_empty() || target.len() > PATH_MAX {
                    return Err(refused(&shown, "a symlink's target is empty or too long"));
                }
                let target = cstr(&target)?;
                self.clear(pfd, &name, &shown, false)?;
                nix::unistd::symlinkat(target.as_c_str(), Some(pfd), name.as_c_str())
                    .map_err(errno(format!("making the symlink {shown}")))?;
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| refused(&shown, "a hard link without a target"))?
                    .into_owned();
                let tcomps = components(&target)?;
                let Some((tlast, tparents)) = tcomps.split_last() else {
                    return Err(refused(&shown, "a hard link to the root"));
                };
                let tdir = self.walk(tparents, &shown, false)?;
                let tname = cstr(tlast)?;
                match lstat_at(tdir.as_raw_fd(), &tname).map_err(errno(&shown))? {
                    Some(st) if kind(&st) == libc::S_IFREG => {}
                    _ => {
                        return Err(refused(
                            &shown,
                            "a hard link to something that is not a file of this layer",
                        ))
                    }
                }
                self.clear(pfd, &name, &shown, false)?;
                nix::unistd::linkat(
                    Some(tdir.as_raw_fd()),
                    tname.as_c_str(),
                    Some(pfd),
                    name.as_c_str(),
                    nix::fcntl::AtFlags::empty(),
                )
                .map_err(errno(format!("linking {shown}")))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.report.devices_skipped += 1;
                return Ok(());
            }
            _ => {
                // other kinds (e.g. a GNU volume label) carry no file
                return Ok(());
            }
        }
        if setid {
            self.report.setid_dropped += 1;
        }
        Ok(())
    }

    /// Set the directories' modes, now that the layer is complete.
    pub fn finish(self) -> Result<Report, ImageError> {
        for (path, mode) in &self.modes {
            let comps: Vec<&[u8]> = path.iter().map(|c| c.as_slice()).collect();
            let shown = String::from_utf8_lossy(&path.join(&b'/')).into_owned();
            let d = self.walk(&comps, &shown, false)?;
            nix::sys::stat::fchmod(d.as_raw_fd(), Mode::from_bits_truncate(*mode))
                .map_err(errno(format!("chmod {shown}")))?;
        }
        Ok(self.report)
    }
}

const OPAQUE: &CStr = c"user.overlay.opaque";

fn set_opaque(dir: RawFd) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated name, a one-byte value, our descriptor.
    let r = unsafe { libc::fsetxattr(dir, OPAQUE.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Remove the directory `name` in `dir` and all it holds, never following
/// a symlink.
fn remove_tree_at(dir: RawFd, name: &CStr) -> std::io::Result<()> {
    let d = open_dir_at(dir, name)?;
    let mut names = Vec::new();
    {
        let dup = nix::unistd::dup(d.as_raw_fd())?;
        let mut it = nix::dir::Dir::from_fd(dup)?;
        for e in it.iter() {
            let e = e?;
            let n = e.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                names.push(n.to_owned());
            }
        }
    }
    for n in names {
        match lstat_at(d.as_raw_fd(), &n)? {
            Some(st) if kind(&st) == libc::S_IFDIR => remove_tree_at(d.as_raw_fd(), &n)?,
            Some(_) => nix::unistd::unlinkat(
                Some(d.as_raw_fd()),
                n.as_c_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )?,
            None => {}
        }
    }
    nix::unistd::unlinkat(Some(dir), name, nix::unistd::UnlinkatFlags::RemoveDir)?;
    Ok(())
}
