//! Reading changes out of an overlayfs upper directory.
//!
//! Overlay semantics used here (mounted with `userxattr`, no redirect_dir,
//! no metacopy): a regular file, symlink or directory in the upper layer
//! shadows the lower one; a character device 0:0 is a whiteout (the lower
//! entry was deleted); a directory with `user.overlay.opaque=y` hides the
//! whole lower directory of that name.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What kind of thing a path holds, as git sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Executable,
    Symlink,
}

impl Kind {
    /// The git mode string.
    pub fn mode(self) -> &'static str {
        match self {
            Kind::File => "100644",
            Kind::Executable => "100755",
            Kind::Symlink => "120000",
        }
    }
}

/// One side of a change: kind and bytes (a symlink's bytes are its target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub content: Vec<u8>,
}

/// One changed path, relative to the repo root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added {
        path: PathBuf,
        new: Entry,
    },
    Modified {
        path: PathBuf,
        old: Entry,
        new: Entry,
    },
    Deleted {
        path: PathBuf,
        old: Entry,
    },
}

impl Change {
    pub fn path(&self) -> &Path {
        match self {
            Change::Added { path, .. }
            | Change::Modified { path, .. }
            | Change::Deleted { path, .. } => path,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading the sandbox's changes failed.
    #[error("reading the workspace changes at {path}: {source}")]
    Upper {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Reading the original repo failed.
    #[error("reading the repo at {path}: {source}")]
    Lower {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn upper_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Upper {
        path: path.to_path_buf(),
        source,
    }
}

fn lower_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Lower {
        path: path.to_path_buf(),
        source,
    }
}

/// Compute every change. `upper` is the overlay's upper directory (any
/// path, e.g. /proc/self/fd/N), `lower` the repo, `None` for an empty one.
/// Changes come sorted by path.
pub fn capture(upper: &Path, lower: Option<&Path>) -> Result<Vec<Change>, CaptureError> {
    let mut c = Capturer {
        upper,
        lower,
        out: BTreeMap::new(),
    };
    c.walk(Path::new(""))?;
    Ok(c.out.into_values().collect())
}

struct Capturer<'a> {
    upper: &'a Path,
    lower: Option<&'a Path>,
    out: BTreeMap<Vec<u8>, Change>,
}

/// What the lower layer holds at a path.
enum Lower {
    Absent,
    Dir,
    Entry(Entry),
}

fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    for name in [c"user.overlay.opaque", c"trusted.overlay.opaque"] {
        // SAFETY: both strings are NUL-terminated and buf is writable for
        // its full length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
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

fn kind_of(md: &fs::Metadata) -> Option<Kind> {
    let ft = md.file_type();
    if ft.is_symlink() {
        Some(Kind::Symlink)
    } else if ft.is_file() {
        Some(if md.mode() & 0o111 != 0 {
            Kind::Executable
        } else {
            Kind::File
        })
    } else {
        None
    }
}

/// Read a file or symlink without following it.
fn read_entry(path: &Path, md: &fs::Metadata) -> std::io::Result<Option<Entry>> {
    let Some(kind) = kind_of(md) else {
        return Ok(None);
    };
    let content = match kind {
        Kind::Symlink => fs::read_link(path)?.into_os_string().into_vec(),
        _ => {
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)?;
            let mut v = Vec::with_capacity(md.len() as usize);
            f.read_to_end(&mut v)?;
            v
        }
    };
    Ok(Some(Entry { kind, content }))
}

use std::os::unix::ffi::OsStringExt;

fn sorted_entries(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names: Vec<OsString> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

impl Capturer<'_> {
    /// What the repo holds at `rel`, never following a symlink on the way.
    fn lower_at(&self, rel: &Path) -> Result<Lower, CaptureError> {
        let Some(root) = self.lower else {
            return Ok(Lower::Absent);
        };
        let mut cur = root.to_path_buf();
        let comps: Vec<_> = rel.components().collect();
        for (i, comp) in comps.iter().enumerate() {
            cur.push(comp);
            let md = match fs::symlink_metadata(&cur) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lower::Absent),
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(Lower::Absent),
                Err(e) => return Err(lower_err(&cur)(e)),
            };
            let last = i + 1 == comps.len();
            if !last {
                if !md.is_dir() {
                    return Ok(Lower::Absent);
                }
                continue;
            }
            if md.is_dir() {
                return Ok(Lower::Dir);
            }
            return Ok(match read_entry(&cur, &md).map_err(lower_err(&cur))? {
                Some(e) => Lower::Entry(e),
                None => Lower::Absent,
            });
        }
        Ok(Lower::Dir)
    }

    /// Every file and symlink of the repo under `rel` (a directory).
    fn lower_files(&self, rel: &Path, acc: &mut Vec<(PathBuf, Entry)>) -> Result<(), CaptureError> {
        let Some(root) = self.lower else {
            return Ok(());
        };
        let dir = root.join(rel);
        for name in sorted_entries(&dir).map_err(lower_err(&dir))? {
            let r = rel.join(&name);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).map_err(lower_err(&p))?;
            if md.is_dir() {
                if r.as_os_str() == ".git" {
                    continue;
                }
                self.lower_files(&r, acc)?;
            } else if let Some(e) = read_entry(&p, &md).map_err(lower_err(&p))? {
                acc.push((r, e));
            }
        }
        Ok(())
    }

    fn delete_lower_tree(&mut self, rel: &Path) -> Result<(), CaptureError> {
        let mut files = Vec::new();
        self.lower_files(rel, &mut files)?;
        for (path, old) in files {
            self.record(Change::Deleted { path, old });
        }
        Ok(())
    }

    fn record(&mut self, c: Change) {
        self.out.insert(c.path().as_os_str().as_bytes().to_vec(), c);
    }

    /// Compare the upper directory `rel` against the lower one.
    fn walk(&mut self, rel: &Path) -> Result<(), CaptureError> {
        let dir = self.upper.join(rel);
        let names = sorted_entries(&dir).map_err(upper_err(&dir))?;
        for name in names {
            let r = rel.join(&name);
            if r.as_os_str() == OsStr::new(".git") {
                // read-only inside the sandbox; nothing there is a change
                continue;
            }
            let up = self.upper.join(&r);
            let md = fs::symlink_metadata(&up).map_err(upper_err(&up))?;
            let lower = self.lower_at(&r)?;
            if is_whiteout(&md) {
                match lower {
                    Lower::Dir => self.delete_lower_tree(&r)?,
                    Lower::Entry(old) => self.record(Change::Deleted { path: r, old }),
                    Lower::Absent => {}
                }
                continue;
            }
            if md.is_dir() {
                match lower {
                    Lower::Entry(old) => self.record(Change::Deleted {
                        path: r.clone(),
                        old,
                    }),
                    Lower::Dir if is_opaque(&up) => {
                        // the lower directory is hidden: what the upper one
                        // does not hold again was deleted
                        let mut files = Vec::new();
                        self.lower_files(&r, &mut files)?;
                        for (path, old) in files {
                            let still = self.upper.join(&path);
                            if fs::symlink_metadata(&still).is_err() {
                                self.record(Change::Deleted { path, old });
                            }
                        }
                    }
                    _ => {}
                }
                self.walk(&r)?;
                continue;
            }
            let Some(new) = read_entry(&up, &md).map_err(upper_err(&up))? else {
                // fifos, sockets, device nodes: git has no way to say them
                continue;
            };
            match lower {
                Lower::Absent => self.record(Change::Added { path: r, new }),
                Lower::Dir => {
                    self.delete_lower_tree(&r)?;
                    self.record(Change::Added { path: r, new });
                }
                Lower::Entry(old) => {
                    if old != new {
                        self.record(Change::Modified { path: r, old, new });
                    }
                }
            }
        }
        Ok(())
    }
}
