//! Reading changes out of an overlayfs upper directory.
//!
//! Overlay semantics used here (mounted with `userxattr`, no redirect_dir,
//! no metacopy): a regular file, symlink or directory in the upper layer
//! shadows the lower one; a character device 0:0 is a whiteout (the lower
//! entry was deleted); a directory with `user.overlay.opaque=y` hides the
//! whole lower directory of that name.
//!
//! Capture keeps metadata only (kind, size, a symlink's target): contents
//! are compared and later rendered by reading both trees in bounded
//! pieces, so the host's memory never follows a file's (possibly sparse)
//! apparent size. Both trees are walked through directory descriptors, so
//! a deep tree costs no `ENAMETOOLONG`, and a path git could not check out
//! fails the capture, saying so, instead of vanishing from the patch.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::fsx::{self, type_of, Dir, Type};

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

/// One side of a change: its kind and size; a symlink also carries its
/// target (at most PATH_MAX bytes). File contents stay on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Apparent size in bytes (a symlink: its target's length).
    pub size: u64,
    /// A symlink's target; empty for files.
    pub target: Vec<u8>,
}

/// One changed path, relative to the repo root. `old` is absent for an
/// added path, `new` for a deleted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub old: Option<Entry>,
    pub new: Option<Entry>,
    /// Both sides hold the same bytes (only the mode changed).
    pub same_content: bool,
}

impl Change {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The longest relative path a change may have: git checks paths out by
/// their full name, which the kernel limits to PATH_MAX (4096, NUL
/// included).
pub const MAX_PATH: usize = 4095;

/// The most changed paths one capture records (each costs host memory for
/// its name and metadata).
pub const MAX_CHANGES: usize = 250_000;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading the sandbox's changes failed.
    #[error("reading the workspace changes at {path}: {source}")]
    Upper {
        path: String,
        source: std::io::Error,
    },
    /// Reading the original repo failed.
    #[error("reading the repo at {path}: {source}")]
    Lower {
        path: String,
        source: std::io::Error,
    },
    /// A path longer than git can check out.
    #[error("the sandbox made a path of {len} bytes or more ({start}...), longer than git can check out ({MAX_PATH} bytes); the changes were not captured")]
    PathTooLong { start: String, len: usize },
    #[error("the sandbox changed more than {0} paths; the changes were not captured")]
    TooManyChanges(usize),
}

fn display(rel: &[u8]) -> String {
    let s = String::from_utf8_lossy(rel);
    if s.is_empty() {
        ".".into()
    } else {
        s.into_owned()
    }
}

fn upper_err(rel: &[u8]) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Upper {
        path: display(rel),
        source,
    }
}

fn lower_err(rel: &[u8]) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Lower {
        path: display(rel),
        source,
    }
}

/// Every change, sorted by path, with the two trees kept open for
/// reading their contents.
pub struct Capture {
    pub(crate) upper: Dir,
    pub(crate) lower: Option<Dir>,
    pub changes: Vec<Change>,
}

impl Capture {
    /// The directories the contents are read from: (old, new).
    pub(crate) fn trees(&self) -> (Option<&Dir>, &Dir) {
        (self.lower.as_ref(), &self.upper)
    }
}

/// Compute every change. `upper` is the overlay's upper directory, `lower`
/// the repo (`None` for an empty one). Both descriptors are duplicated;
/// the caller keeps its own.
pub fn capture(
    upper: BorrowedFd<'_>,
    lower: Option<BorrowedFd<'_>>,
) -> Result<Capture, CaptureError> {
    fsx::raise_nofile();
    let up = Dir::from_fd(upper).map_err(upper_err(b""))?;
    let low = match lower {
        Some(l) => Some(Dir::from_fd(l).map_err(lower_err(b""))?),
        None => None,
    };
    let mut c = Capturer {
        out: BTreeMap::new(),
    };
    c.walk(&up, low.as_ref(), b"")?;
    Ok(Capture {
        upper: up,
        lower: low,
        changes: c.out.into_values().collect(),
    })
}

struct Capturer {
    out: BTreeMap<Vec<u8>, Change>,
}

/// What the lower layer holds at a name.
enum Lower {
    Absent,
    Dir,
    Entry(Entry),
}

fn child(rel: &[u8], name: &OsStr) -> Result<Vec<u8>, CaptureError> {
    let mut r = rel.to_vec();
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(name.as_bytes());
    if r.len() > MAX_PATH {
        let start = String::from_utf8_lossy(&r[..r.len().min(60)]).into_owned();
        return Err(CaptureError::PathTooLong {
            start,
            len: r.len(),
        });
    }
    Ok(r)
}

/// The entry at `name` in `dir`, or None for what git cannot hold.
fn entry(dir: &Dir, name: &OsStr, st: &nix::sys::stat::FileStat) -> std::io::Result<Option<Entry>> {
    Ok(match type_of(st) {
        Type::File { executable } => Some(Entry {
            kind: if executable {
                Kind::Executable
            } else {
                Kind::File
            },
            size: st.st_size.max(0) as u64,
            target: Vec::new(),
        }),
        Type::Symlink => {
            let target = dir.readlink(name)?;
            Some(Entry {
                kind: Kind::Symlink,
                size: target.len() as u64,
                target,
            })
        }
        _ => None,
    })
}

impl Capturer {
    fn record(&mut self, path: Vec<u8>, c: Change) -> Result<(), CaptureError> {
        self.out.insert(path, c);
        if self.out.len() > MAX_CHANGES {
            return Err(CaptureError::TooManyChanges(MAX_CHANGES));
        }
        Ok(())
    }

    fn deleted(&mut self, rel: Vec<u8>, old: Entry) -> Result<(), CaptureError> {
        let c = Change {
            path: PathBuf::from(OsString::from_vec(rel.clone())),
            old: Some(old),
            new: None,
            same_content: false,
        };
        self.record(rel, c)
    }

    fn lower_at(&self, low: Option<&Dir>, name: &OsStr, rel: &[u8]) -> Result<Lower, CaptureError> {
        let Some(low) = low else {
            return Ok(Lower::Absent);
        };
        let Some(st) = low.stat_opt(name).map_err(lower_err(rel))? else {
            return Ok(Lower::Absent);
        };
        Ok(match type_of(&st) {
            Type::Dir => Lower::Dir,
            _ => match entry(low, name, &st).map_err(lower_err(rel))? {
                Some(e) => Lower::Entry(e),
                None => Lower::Absent,
            },
        })
    }

    /// Every file and symlink of the lower directory `dir` (at `rel`) is
    /// deleted, except what `keep` (the upper directory of the same name,
    /// when the lower one was made opaque) still holds.
    fn delete_lower_tree(
        &mut self,
        dir: &Dir,
        rel: &[u8],
        keep: Option<&Dir>,
    ) -> Result<(), CaptureError> {
        for name in dir.names().map_err(lower_err(rel))? {
            let r = child(rel, &name)?;
            if r == b".git" {
                continue;
            }
            let still = match keep {
                Some(k) => k.stat_opt(&name).map_err(upper_err(&r))?,
                None => None,
            };
            let st = dir.stat(&name).map_err(lower_err(&r))?;
            if type_of(&st) == Type::Dir {
                let sub = dir.open_dir(&name).map_err(lower_err(&r))?;
                let keep_sub = match (&still, keep) {
                    (Some(s), Some(k)) if type_of(s) == Type::Dir => {
                        Some(k.open_dir(&name).map_err(upper_err(&r))?)
                    }
                    _ => None,
                };
                // a name the upper side holds as anything but a directory
                // is compared there; below it, everything is gone
                self.delete_lower_tree(&sub, &r, keep_sub.as_ref())?;
            } else if still.is_none() {
                if let Some(e) = entry(dir, &name, &st).map_err(lower_err(&r))? {
                    self.deleted(r, e)?;
                }
            }
        }
        Ok(())
    }

    /// Compare the upper directory `up` (at `rel`) with the lower one.
    fn walk(&mut self, up: &Dir, low: Option<&Dir>, rel: &[u8]) -> Result<(), CaptureError> {
        for name in up.names().map_err(upper_err(rel))? {
            let r = child(rel, &name)?;
            if r == b".git" {
                // read-only inside the sandbox; nothing there is a change
                continue;
            }
            let st = up.stat(&name).map_err(upper_err(&r))?;
            let lower = self.lower_at(low, &name, &r)?;
            let lower_dir = || -> Result<Dir, CaptureError> {
                low.ok_or_else(|| lower_err(&r)(std::io::Error::other("no repo")))?
                    .open_dir(&name)
                    .map_err(lower_err(&r))
            };
            match type_of(&st) {
                Type::Whiteout => match lower {
                    Lower::Dir => self.delete_lower_tree(&lower_dir()?, &r, None)?,
                    Lower::Entry(old) => self.deleted(r, old)?,
                    Lower::Absent => {}
                },
                Type::Dir => {
                    let sub = up.open_dir(&name).map_err(upper_err(&r))?;
                    let mut below = None;
                    match lower {
                        Lower::Entry(old) => self.deleted(r.clone(), old)?,
                        Lower::Dir if sub.is_opaque() => {
                            // the lower directory is hidden: what the upper
                            // one does not hold again was deleted
                            let l = lower_dir()?;
                            self.delete_lower_tree(&l, &r, Some(&sub))?;
                            below = Some(l);
                        }
                        Lower::Dir => below = Some(lower_dir()?),
                        Lower::Absent => {}
                    }
                    self.walk(&sub, below.as_ref(), &r)?;
                }
                Type::File { .. } | Type::Symlink | Type::Other => {
                    let new = entry(up, &name, &st).map_err(upper_err(&r))?;
                    let old = match lower {
                        Lower::Absent => None,
                        Lower::Dir => {
                            self.delete_lower_tree(&lower_dir()?, &r, None)?;
                            None
                        }
                        Lower::Entry(old) => Some(old),
                    };
                    self.compare(up, low, &name, r, old, new)?;
                }
            }
        }
        Ok(())
    }

    /// Record the change at `r` between `old` (lower) and `new` (upper),
    /// if there is one.
    fn compare(
        &mut self,
        up: &Dir,
        low: Option<&Dir>,
        name: &OsStr,
        r: Vec<u8>,
        old: Option<Entry>,
        new: Option<Entry>,
    ) -> Result<(), CaptureError> {
        let same_content = match (&old, &new, low) {
            (Some(o), Some(n), Some(low)) if o.size == n.size => {
                match (o.kind == Kind::Symlink, n.kind == Kind::Symlink) {
                    (true, true) => o.target == n.target,
                    (false, false) => {
                        let mut a = low.open_file(name).map_err(lower_err(&r))?;
                        let mut b = up.open_file(name).map_err(upper_err(&r))?;
                        fsx::same_content(&mut a, &mut b).map_err(upper_err(&r))?
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        match (&old, &new) {
            (None, None) => return Ok(()),
            (Some(o), Some(n)) if same_content && o.kind == n.kind => return Ok(()),
            _ => {}
        }
        let c = Change {
            path: PathBuf::from(OsString::from_vec(r.clone())),
            old,
            new,
            same_content,
        };
        self.record(r, c)
    }
}
