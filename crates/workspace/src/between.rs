//! The patch between two states of one repo (two checkpoints of a
//! workspace), each given as its capture against that repo: only the
//! paths either state changed are compared, each side's content read from
//! its own upper directory or, where it did not change the path, the repo.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::capture::{Capture, Change, Kind};
use crate::patch::{lossy, render_changes, PatchOptions, RenderError, Rendered, Tree};

/// One state of a repo as a capture describes it: the paths it changed
/// read from its upper directory, every other from the repo.
struct State<'a> {
    cap: &'a Capture,
    changed: &'a std::collections::BTreeMap<&'a Path, &'a Change>,
}

impl Tree for State<'_> {
    fn open_file_at(&self, rel: &[u8]) -> std::io::Result<std::fs::File> {
        let p = Path::new(std::ffi::OsStr::from_bytes(rel));
        let (lower, upper) = self.cap.trees();
        match self.changed.get(p) {
            Some(c) if c.new.is_some() => upper.open_file_at(rel),
            Some(_) => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
            None => lower
                .ok_or_else(|| std::io::Error::other("no repo to read from"))?
                .open_file_at(rel),
        }
    }
}

/// The patch from state `a` to state `b` of one repo, each given as its
/// capture against that repo (a workspace's checkpoints): only the paths
/// either changed are looked at, so the cost follows the changes, not the
/// repo. The result applies with `git apply` to a tree in state `a`.
pub fn render_between(
    a: &Capture,
    b: &Capture,
    opts: &PatchOptions,
    out: &mut dyn Write,
) -> Result<Rendered, RenderError> {
    use std::collections::BTreeMap;
    fn by_path(c: &Capture) -> BTreeMap<&Path, &Change> {
        c.changes.iter().map(|ch| (ch.path.as_path(), ch)).collect()
    }
    let (ma, mb) = (by_path(a), by_path(b));
    let old_tree = State {
        cap: a,
        changed: &ma,
    };
    let new_tree = State {
        cap: b,
        changed: &mb,
    };
    let mut paths: Vec<&Path> = ma.keys().chain(mb.keys()).copied().collect();
    paths.sort();
    paths.dedup();
    let mut changes = Vec::new();
    for path in paths {
        // a path one side did not change is the repo's on that side,
        // which the other side's capture saw as its old entry
        let old = match (ma.get(path), mb.get(path)) {
            (Some(c), _) => c.new.clone(),
            (None, Some(c)) => c.old.clone(),
            (None, None) => None,
        };
        let new = match (mb.get(path), ma.get(path)) {
            (Some(c), _) => c.new.clone(),
            (None, Some(c)) => c.old.clone(),
            (None, None) => None,
        };
        let read = |source| RenderError::Read {
            path: lossy(path),
            source,
        };
        let same_content = match (&old, &new) {
            (Some(o), Some(n)) if o.size == n.size => {
                match (o.kind == Kind::Symlink, n.kind == Kind::Symlink) {
                    (true, true) => o.target == n.target,
                    (false, false) => {
                        let rel = path.as_os_str().as_bytes();
                        let mut x = old_tree.open_file_at(rel).map_err(read)?;
                        let mut y = new_tree.open_file_at(rel).map_err(read)?;
                        crate::fsx::same_content(&mut x, &mut y).map_err(read)?
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        match (&old, &new) {
            (None, None) => continue,
            (Some(o), Some(n)) if same_content && o.kind == n.kind => continue,
            _ => {}
        }
        changes.push(Change {
            path: path.to_path_buf(),
            old,
            new,
            same_content,
        });
    }
    render_changes(&changes, Some(&old_tree), &new_tree, opts, out)
}
