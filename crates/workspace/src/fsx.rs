//! Reading a tree through directory descriptors: every step is an
//! `openat`/`fstatat` relative to its parent directory, never a path from
//! the root, so depth is no limit (no `ENAMETOOLONG`) and no symlink is
//! ever followed on the way.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};

/// An open directory.
pub(crate) struct Dir {
    fd: OwnedFd,
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What a directory entry is, as far as capture cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Type {
    Dir,
    File {
        executable: bool,
    },
    Symlink,
    /// A character device 0:0: an overlayfs whiteout.
    Whiteout,
    /// Fifos, sockets, other devices: git has no way to say them.
    Other,
}

pub(crate) fn type_of(st: &FileStat) -> Type {
    let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if fmt == SFlag::S_IFDIR {
        Type::Dir
    } else if fmt == SFlag::S_IFREG {
        Type::File {
            executable: st.st_mode & 0o111 != 0,
        }
    } else if fmt == SFlag::S_IFLNK {
        Type::Symlink
    } else if fmt == SFlag::S_IFCHR && st.st_rdev == 0 {
        Type::Whiteout
    } else {
        Type::Other
    }
}

impl Dir {
    /// A directory of our own for `fd` (a new open file description, so
    /// listing it never moves the caller's offset).
    pub fn from_fd(fd: BorrowedFd<'_>) -> std::io::Result<Dir> {
        let n = nix::fcntl::openat(
            Some(fd.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir { fd: owned(n) })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The subdirectory `name`; fails on a symlink.
    pub fn open_dir(&self, name: &OsStr) -> std::io::Result<Dir> {
        let n = nix::fcntl::openat(
            Some(self.fd.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir { fd: owned(n) })
    }

    /// `name` itself, never what it points to.
    pub fn stat(&self, name: &OsStr) -> std::io::Result<FileStat> {
        Ok(nix::sys::stat::fstatat(
            Some(self.fd.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?)
    }

    /// `name` if it exists (`None` when it does not, or when a component
    /// on the way is not a directory).
    pub fn stat_opt(&self, name: &OsStr) -> std::io::Result<Option<FileStat>> {
        match self.stat(name) {
            Ok(s) => Ok(Some(s)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn readlink(&self, name: &OsStr) -> std::io::Result<Vec<u8>> {
        Ok(nix::fcntl::readlinkat(Some(self.fd.as_raw_fd()), name)?.into_vec())
    }

    /// The regular file `name`, opened without following a symlink and
    /// without blocking on a fifo swapped in for it.
    pub fn open_file(&self, name: &OsStr) -> std::io::Result<File> {
        let n = nix::fcntl::openat(
            Some(self.fd.as_raw_fd()),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY
                | OFlag::O_NONBLOCK,
            Mode::empty(),
        )?;
        let f = File::from(owned(n));
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(f)
    }

    /// Entry names, sorted bytewise, without `.` and `..`.
    pub fn names(&self) -> std::io::Result<Vec<OsString>> {
        let own = Dir::from_fd(self.fd())?;
        let mut d = nix::dir::Dir::from(own.fd)?;
        let mut names = Vec::new();
        for e in d.iter() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Does this directory carry overlayfs's opaque mark (the lower
    /// directory of the same name is hidden)?
    pub fn is_opaque(&self) -> bool {
        let mut buf = [0u8; 4];
        for name in [c"user.overlay.opaque", c"trusted.overlay.opaque"] {
            // SAFETY: the name is NUL-terminated and buf is writable for its
            // full length; the descriptor is ours.
            let n = unsafe {
                libc::fgetxattr(
                    self.fd.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n == 1 && buf[0] == b'y' {
                return true;
            }
        }
        false
    }

    /// Walk `rel` ('/'-separated, relative) down from this directory and
    /// open its last component as a file, following no symlink anywhere.
    pub fn open_file_at(&self, rel: &[u8]) -> std::io::Result<File> {
        let (dir, last) = self.parent_of(rel)?;
        match dir {
            Some(d) => d.open_file(last),
            None => self.open_file(last),
        }
    }

    /// The directory holding `rel` (None: this one) and `rel`'s last name.
    fn parent_of<'r>(&self, rel: &'r [u8]) -> std::io::Result<(Option<Dir>, &'r OsStr)> {
        let mut parts: Vec<&[u8]> = rel
            .split(|b| *b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        let last = parts
            .pop()
            .ok_or_else(|| std::io::Error::other("empty path"))?;
        if parts.iter().any(|p| *p == b"." || *p == b"..") || last == b"." || last == b".." {
            return Err(std::io::Error::other("a path with . or .. components"));
        }
        let mut cur: Option<Dir> = None;
        for p in parts {
            let next = match &cur {
                Some(d) => d.open_dir(OsStr::from_bytes(p))?,
                None => self.open_dir(OsStr::from_bytes(p))?,
            };
            cur = Some(next);
        }
        Ok((cur, OsStr::from_bytes(last)))
    }
}

/// Are the two open files byte for byte the same? Reads both in bounded
/// pieces.
pub(crate) fn same_content(a: &mut File, b: &mut File) -> std::io::Result<bool> {
    let mut x = vec![0u8; 64 * 1024];
    let mut y = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(a, &mut x)?;
        let m = read_full(b, &mut y)?;
        if n != m || x[..n] != y[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fill `buf` as far as the file goes.
pub(crate) fn read_full<R: Read + ?Sized>(f: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Walking a deep tree holds a descriptor per level: let this process
/// open as many as its hard limit allows (best effort).
pub(crate) fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
