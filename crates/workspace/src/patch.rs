//! Rendering changes as a git patch that `git apply` reproduces exactly.
//!
//! Git's own rules, over bytes: a line ends at LF and nowhere else (a CR,
//! alone or before the LF, is part of the line); a file whose first 8000
//! bytes hold a NUL is binary, anything else is text, valid UTF-8 or not;
//! a last line without LF is followed by `\ No newline at end of file`.
//! Binary files become a `GIT binary patch` (zlib + base85, never raw
//! bytes) up to a size limit, beyond which they are only marked (and never
//! read past their first 8000 bytes); symlinks are mode 120000 entries
//! whose content is the target; a change of kind (file <-> symlink) is a
//! deletion followed by an addition, as git writes it.
//!
//! Memory stays bounded whatever the files' sizes: added and deleted text
//! is streamed line by line, a modification is diffed in memory only when
//! both sides are small enough and otherwise written as a whole
//! replacement (still exact), and the output stops at `max_bytes`.

use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use crate::capture::{Capture, Change, Entry, Kind};
use crate::fsx::{read_full, Dir};

#[derive(Debug, Clone)]
pub struct PatchOptions {
    /// Largest binary file encoded in the patch; larger ones are marked
    /// "Binary files ... differ" (that file cannot be applied).
    pub binary_max: u64,
    /// The patch stops here: rendering fails with `TooLarge`.
    pub max_bytes: u64,
}

impl Default for PatchOptions {
    fn default() -> Self {
        PatchOptions {
            binary_max: 8 << 20,
            max_bytes: u64::MAX,
        }
    }
}

/// What was written.
#[derive(Debug, Default)]
pub struct Rendered {
    pub bytes: u64,
    /// Binary files larger than `binary_max`, only marked in the patch.
    pub binary_omitted: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the patch is larger than {limit} bytes; it was not written in full")]
    TooLarge { limit: u64 },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing the patch: {0}")]
    Write(std::io::Error),
}

/// git's rule: a NUL in the first 8000 bytes.
pub const BINARY_PROBE: usize = 8000;
/// A modification is diffed in memory when both sides are at most this
/// large and hold at most `DIFF_LINES` lines; otherwise it is written as
/// a whole replacement.
pub const DIFF_MAX: u64 = 16 << 20;
pub const DIFF_LINES: usize = 500_000;

/// Render every change of `cap` into `out`.
pub fn render(
    cap: &Capture,
    opts: &PatchOptions,
    out: &mut dyn Write,
) -> Result<Rendered, RenderError> {
    let (old_tree, new_tree) = cap.trees();
    let old_tree = old_tree.map(|d| d as &dyn Tree);
    render_changes(&cap.changes, old_tree, new_tree, opts, out)
}

/// Render `changes`, their old contents read from `old_tree`, their new
/// ones from `new_tree`.
pub(crate) fn render_changes(
    changes: &[Change],
    old_tree: Option<&dyn Tree>,
    new_tree: &dyn Tree,
    opts: &PatchOptions,
    out: &mut dyn Write,
) -> Result<Rendered, RenderError> {
    let mut o = Out {
        w: out,
        n: 0,
        max: opts.max_bytes,
    };
    let mut omitted = Vec::new();
    // every diff together gets a time budget; past it, similar falls back
    // to a quick (still exact, less minimal) diff
    let overall = Instant::now() + Duration::from_secs(30);
    let r = Renderer {
        old_tree,
        new_tree,
        opts,
        overall,
    };
    for c in changes {
        let Change {
            path,
            old,
            new,
            same_content,
        } = c;
        let path = path.as_path();
        match (old, new) {
            (Some(a), Some(b)) if (a.kind == Kind::Symlink) != (b.kind == Kind::Symlink) => {
                r.one(&mut o, &mut omitted, path, Some(a), None, false)?;
                r.one(&mut o, &mut omitted, path, None, Some(b), false)?;
            }
            _ => r.one(
                &mut o,
                &mut omitted,
                path,
                old.as_ref(),
                new.as_ref(),
                *same_content,
            )?,
        }
    }
    o.w.flush().map_err(RenderError::Write)?;
    Ok(Rendered {
        bytes: o.n,
        binary_omitted: omitted,
    })
}

/// The output, counted and bounded.
struct Out<'a> {
    w: &'a mut dyn Write,
    n: u64,
    max: u64,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), RenderError> {
        if self.n.saturating_add(b.len() as u64) > self.max {
            return Err(RenderError::TooLarge { limit: self.max });
        }
        self.w.write_all(b).map_err(RenderError::Write)?;
        self.n += b.len() as u64;
        Ok(())
    }

    fn room(&self) -> u64 {
        self.max.saturating_sub(self.n)
    }
}

trait Source: Read + Seek {}
impl<T: Read + Seek> Source for T {}

/// Where a side's contents are read from.
pub(crate) trait Tree {
    fn open_file_at(&self, rel: &[u8]) -> std::io::Result<std::fs::File>;
}

impl Tree for Dir {
    fn open_file_at(&self, rel: &[u8]) -> std::io::Result<std::fs::File> {
        Dir::open_file_at(self, rel)
    }
}

struct Renderer<'a> {
    old_tree: Option<&'a dyn Tree>,
    new_tree: &'a dyn Tree,
    opts: &'a PatchOptions,
    overall: Instant,
}

pub(crate) fn lossy(path: &Path) -> String {
    String::from_utf8_lossy(path.as_os_str().as_bytes()).into_owned()
}

/// git's C-style quoting of a path (core.quotePath=true).
pub(crate) fn quote(prefix: &str, path: &Path) -> String {
    let bytes = path.as_os_str().as_bytes();
    let needs = bytes
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f);
    if !needs {
        return format!("{prefix}{}", String::from_utf8_lossy(bytes));
    }
    let mut s = String::from("\"");
    s.push_str(prefix);
    for &b in bytes {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\x07' => s.push_str("\\a"),
            b'\x08' => s.push_str("\\b"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\x0b' => s.push_str("\\v"),
            b'\x0c' => s.push_str("\\f"),
            b'\r' => s.push_str("\\r"),
            b if !(0x20..0x7f).contains(&b) => s.push_str(&format!("\\{b:03o}")),
            b => s.push(b as char),
        }
    }
    s.push('"');
    s
}

fn blob_header(len: u64) -> Sha1 {
    let mut h = Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    h
}

fn hex(h: Sha1) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `git hash-object` of some bytes.
pub(crate) fn blob_id(content: &[u8]) -> String {
    let mut h = blob_header(content.len() as u64);
    h.update(content);
    hex(h)
}

const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// Lines of a text of `size` bytes ending with `last`.
fn line_count(src: &mut dyn Source) -> std::io::Result<(u64, bool)> {
    src.rewind()?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut n, mut last, mut any) = (0u64, b'\n', false);
    loop {
        let k = src.read(&mut buf)?;
        if k == 0 {
            break;
        }
        any = true;
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[k - 1];
    }
    let unterminated = any && last != b'\n';
    Ok((n + u64::from(unterminated), unterminated))
}

/// The ops with their positions recomputed from their lengths, in order.
/// similar can report a Delete's `new_index` short of where the new side
/// stands after an Insert earlier in the script (seen with Myers: Insert 3,
/// Equal 1, Delete 2 gave the Delete new_index 2, not 4), which made a
/// hunk header count fewer lines than the hunk holds and `git apply` call
/// the patch corrupt. Only the lengths are trusted.
fn renumbered(ops: Vec<similar::DiffOp>) -> Vec<similar::DiffOp> {
    use similar::DiffOp;
    let (mut o, mut n) = (0usize, 0usize);
    ops.into_iter()
        .map(|op| {
            let (ol, nl) = (op.old_range().len(), op.new_range().len());
            let fixed = match op {
                DiffOp::Equal { len, .. } => DiffOp::Equal {
                    old_index: o,
                    new_index: n,
                    len,
                },
                DiffOp::Delete { old_len, .. } => DiffOp::Delete {
                    old_index: o,
                    old_len,
                    new_index: n,
                },
                DiffOp::Insert { new_len, .. } => DiffOp::Insert {
                    old_index: o,
                    new_index: n,
                    new_len,
                },
                DiffOp::Replace {
                    old_len, new_len, ..
                } => DiffOp::Replace {
                    old_index: o,
                    old_len,
                    new_index: n,
                    new_len,
                },
            };
            o += ol;
            n += nl;
            fixed
        })
        .collect()
}

/// `@@` range: git's (and diff's) rules for counts of one and zero.
fn range(start0: usize, len: usize) -> String {
    match len {
        0 => format!("{start0},0"),
        1 => format!("{}", start0 + 1),
        n => format!("{},{n}", start0 + 1),
    }
}

const NO_NEWLINE: &[u8] = b"\n\\ No newline at end of file\n";

impl Renderer<'_> {
    fn open(&self, old: bool, path: &Path, e: &Entry) -> Result<Box<dyn Source>, RenderError> {
        if e.kind == Kind::Symlink {
            return Ok(Box::new(std::io::Cursor::new(e.target.clone())));
        }
        let tree = if old {
            self.old_tree
        } else {
            Some(self.new_tree)
        };
        let read = |source| RenderError::Read {
            path: lossy(path),
            source,
        };
        let tree = tree.ok_or_else(|| read(std::io::Error::other("no repo to read from")))?;
        let f = tree
            .open_file_at(path.as_os_str().as_bytes())
            .map_err(read)?;
        Ok(Box::new(f))
    }

    fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> RenderError + '_ {
        move |source| RenderError::Read {
            path: lossy(path),
            source,
        }
    }

    /// One file's part of the patch.
    fn one(
        &self,
        o: &mut Out,
        omitted: &mut Vec<String>,
        path: &Path,
        old: Option<&Entry>,
        new: Option<&Entry>,
        same_content: bool,
    ) -> Result<(), RenderError> {
        let a = quote("a/", path);
        let b = quote("b/", path);
        o.put(format!("diff --git {a} {b}\n").as_bytes())?;
        match (old, new) {
            (None, Some(n)) => o.put(format!("new file mode {}\n", n.kind.mode()).as_bytes())?,
            (Some(p), None) => {
                o.put(format!("deleted file mode {}\n", p.kind.mode()).as_bytes())?
            }
            (Some(p), Some(n)) if p.kind != n.kind => o.put(
                format!("old mode {}\nnew mode {}\n", p.kind.mode(), n.kind.mode()).as_bytes(),
            )?,
            _ => {}
        }
        let empty = |e: Option<&Entry>| e.is_none_or(|e| e.size == 0);
        if same_content || (empty(old) && empty(new)) {
            // a mode change, or an empty file added or deleted: headers only
            return Ok(());
        }
        let err = Self::read_err(path);
        let mut so = old.map(|e| self.open(true, path, e)).transpose()?;
        let mut sn = new.map(|e| self.open(false, path, e)).transpose()?;
        let mut probe = vec![0u8; BINARY_PROBE];
        let mut binary = false;
        for s in [so.as_mut(), sn.as_mut()].into_iter().flatten() {
            s.rewind().map_err(Self::read_err(path))?;
            let n = read_full(s.as_mut(), &mut probe).map_err(Self::read_err(path))?;
            binary |= probe[..n].contains(&0);
        }
        let a_name = if old.is_some() { a } else { "/dev/null".into() };
        let b_name = if new.is_some() { b } else { "/dev/null".into() };
        if binary {
            return self.binary(o, omitted, path, (old, so), (new, sn), &a_name, &b_name);
        }
        o.put(format!("--- {a_name}\n+++ {b_name}\n").as_bytes())?;
        match (old.zip(so), new.zip(sn)) {
            (None, Some((_, mut s))) => self.whole(o, path, None, Some(s.as_mut())),
            (Some((_, mut s)), None) => self.whole(o, path, Some(s.as_mut()), None),
            (Some((p, mut x)), Some((n, mut y))) => {
                if p.size <= DIFF_MAX && n.size <= DIFF_MAX {
                    let mut ob = Vec::with_capacity(p.size as usize);
                    let mut nb = Vec::with_capacity(n.size as usize);
                    x.rewind().map_err(Self::read_err(path))?;
                    y.rewind().map_err(Self::read_err(path))?;
                    // never more than the limit, whatever the files do meanwhile
                    x.take(DIFF_MAX)
                        .read_to_end(&mut ob)
                        .map_err(Self::read_err(path))?;
                    y.take(DIFF_MAX)
                        .read_to_end(&mut nb)
                        .map_err(Self::read_err(path))?;
                    self.diff(o, &ob, &nb)
                } else {
                    self.whole(o, path, Some(x.as_mut()), Some(y.as_mut()))
                }
            }
            (None, None) => Err(err(std::io::Error::other("nothing to compare"))),
        }
    }

    /// A text change as one hunk: every old line removed, every new line
    /// added, streamed.
    fn whole(
        &self,
        o: &mut Out,
        path: &Path,
        mut old: Option<&mut dyn Source>,
        mut new: Option<&mut dyn Source>,
    ) -> Result<(), RenderError> {
        let err = Self::read_err;
        let mut sizes = 0u64;
        let mut counts = [0u64; 2];
        // every byte appears in the output at least once: a file that
        // cannot fit is not read at all
        if let Some(s) = old.as_deref_mut() {
            sizes = sizes.saturating_add(s_len(s).map_err(err(path))?);
        }
        if let Some(s) = new.as_deref_mut() {
            sizes = sizes.saturating_add(s_len(s).map_err(err(path))?);
        }
        if sizes > o.room() {
            return Err(RenderError::TooLarge { limit: o.max });
        }
        if let Some(s) = old.as_deref_mut() {
            counts[0] = line_count(s).map_err(err(path))?.0;
        }
        if let Some(s) = new.as_deref_mut() {
            counts[1] = line_count(s).map_err(err(path))?.0;
        }
        let r = |n: u64| match n {
            0 => "0,0".to_string(),
            1 => "1".to_string(),
            n => format!("1,{n}"),
        };
        o.put(format!("@@ -{} +{} @@\n", r(counts[0]), r(counts[1])).as_bytes())?;
        if let Some(s) = old {
            stream_lines(o, s, b'-').map_err(|e| e.with_path(path))?;
        }
        if let Some(s) = new {
            stream_lines(o, s, b'+').map_err(|e| e.with_path(path))?;
        }
        Ok(())
    }

    /// A text modification, diffed in memory (both sides are bounded).
    fn diff(&self, o: &mut Out, old: &[u8], new: &[u8]) -> Result<(), RenderError> {
        let ol: Vec<&[u8]> = old.split_inclusive(|b| *b == b'\n').collect();
        let nl: Vec<&[u8]> = new.split_inclusive(|b| *b == b'\n').collect();
        let put_line = |o: &mut Out, prefix: u8, line: &[u8]| -> Result<(), RenderError> {
            o.put(&[prefix])?;
            o.put(line)?;
            if !line.ends_with(b"\n") {
                o.put(NO_NEWLINE)?;
            }
            Ok(())
        };
        if ol.len() > DIFF_LINES || nl.len() > DIFF_LINES {
            o.put(format!("@@ -{} +{} @@\n", range(0, ol.len()), range(0, nl.len())).as_bytes())?;
            for l in &ol {
                put_line(o, b'-', l)?;
            }
            for l in &nl {
                put_line(o, b'+', l)?;
            }
            return Ok(());
        }
        let deadline = (Instant::now() + Duration::from_secs(5)).min(self.overall);
        let ops = similar::capture_diff_slices_deadline(
            similar::Algorithm::Myers,
            &ol,
            &nl,
            Some(deadline),
        );
        for group in similar::group_diff_ops(renumbered(ops), 3) {
            let (Some(first), Some(last)) = (group.first(), group.last()) else {
                continue;
            };
            let (os, oe) = (first.old_range().start, last.old_range().end);
            let (ns, ne) = (first.new_range().start, last.new_range().end);
            o.put(format!("@@ -{} +{} @@\n", range(os, oe - os), range(ns, ne - ns)).as_bytes())?;
            for op in &group {
                use similar::DiffTag;
                let (tag, or, nr) = op.as_tag_tuple();
                match tag {
                    DiffTag::Equal => {
                        for l in &ol[or] {
                            put_line(o, b' ', l)?;
                        }
                    }
                    DiffTag::Delete => {
                        for l in &ol[or] {
                            put_line(o, b'-', l)?;
                        }
                    }
                    DiffTag::Insert => {
                        for l in &nl[nr] {
                            put_line(o, b'+', l)?;
                        }
                    }
                    DiffTag::Replace => {
                        for l in &ol[or] {
                            put_line(o, b'-', l)?;
                        }
                        for l in &nl[nr] {
                            put_line(o, b'+', l)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn binary(
        &self,
        o: &mut Out,
        omitted: &mut Vec<String>,
        path: &Path,
        old: (Option<&Entry>, Option<Box<dyn Source>>),
        new: (Option<&Entry>, Option<Box<dyn Source>>),
        a_name: &str,
        b_name: &str,
    ) -> Result<(), RenderError> {
        let err = Self::read_err;
        let max = self.opts.binary_max;
        let same_kind_mode = match (old.0, new.0) {
            (Some(p), Some(n)) if p.kind == n.kind => format!(" {}", n.kind.mode()),
            _ => String::new(),
        };
        if new.0.is_some_and(|n| n.size > max) {
            // never read beyond the probe: the limit applies to the
            // apparent size, so a sparse terabyte costs nothing
            o.put(format!("Binary files {a_name} and {b_name} differ\n").as_bytes())?;
            omitted.push(lossy(path));
            return Ok(());
        }
        // the new side is small: read it whole
        let new_bytes = match new.1 {
            Some(mut s) => {
                s.rewind().map_err(err(path))?;
                let mut v = Vec::new();
                s.take(max).read_to_end(&mut v).map_err(err(path))?;
                Some(v)
            }
            None => None,
        };
        // the old side (the repo's file): whole if small, else only hashed
        let (old_id, old_bytes) = match (old.0, old.1) {
            (Some(e), Some(mut s)) => {
                s.rewind().map_err(err(path))?;
                if e.size <= max {
                    let mut v = Vec::new();
                    s.take(max).read_to_end(&mut v).map_err(err(path))?;
                    (blob_id(&v), Some(v))
                } else {
                    let mut h = blob_header(e.size);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = s.read(&mut buf).map_err(err(path))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                    (hex(h), None)
                }
            }
            _ => (ZERO_ID.to_string(), None),
        };
        let new_id = new_bytes
            .as_deref()
            .map(blob_id)
            .unwrap_or_else(|| ZERO_ID.to_string());
        o.put(format!("index {old_id}..{new_id}{same_kind_mode}\nGIT binary patch\n").as_bytes())?;
        literal(o, new_bytes.as_deref().unwrap_or(&[]))?;
        if let Some(b) = old_bytes.as_deref() {
            // the reverse hunk (for `git apply -R`); git needs only the first
            literal(o, b)?;
        }
        Ok(())
    }
}

fn s_len(s: &mut dyn Source) -> std::io::Result<u64> {
    let n = s.seek(std::io::SeekFrom::End(0))?;
    s.rewind()?;
    Ok(n)
}

/// A read error or the output's.
enum StreamError {
    Read(std::io::Error),
    Out(RenderError),
}

impl StreamError {
    fn with_path(self, path: &Path) -> RenderError {
        match self {
            StreamError::Read(source) => RenderError::Read {
                path: lossy(path),
                source,
            },
            StreamError::Out(e) => e,
        }
    }
}

/// Every line of `s`, each prefixed, in bounded pieces.
fn stream_lines(o: &mut Out, s: &mut dyn Source, prefix: u8) -> Result<(), StreamError> {
    s.rewind().map_err(StreamError::Read)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut at_start, mut last, mut any) = (true, b'\n', false);
    loop {
        let n = s.read(&mut buf).map_err(StreamError::Read)?;
        if n == 0 {
            break;
        }
        any = true;
        last = buf[n - 1];
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if at_start {
                o.put(&[prefix]).map_err(StreamError::Out)?;
                at_start = false;
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    o.put(&rest[..=i]).map_err(StreamError::Out)?;
                    rest = &rest[i + 1..];
                    at_start = true;
                }
                None => {
                    o.put(rest).map_err(StreamError::Out)?;
                    rest = &[];
                }
            }
        }
    }
    if any && last != b'\n' {
        o.put(NO_NEWLINE).map_err(StreamError::Out)?;
    }
    Ok(())
}

const B85: &[u8; 85] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";

/// One `literal` hunk of a git binary patch: zlib, then base85 in lines of
/// at most 52 bytes, each prefixed by its length (A-Z: 1-26, a-z: 27-52).
fn literal(o: &mut Out, data: &[u8]) -> Result<(), RenderError> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).map_err(RenderError::Write)?;
    let deflated = z.finish().map_err(RenderError::Write)?;
    o.put(format!("literal {}\n", data.len()).as_bytes())?;
    let mut line = Vec::with_capacity(70);
    for chunk in deflated.chunks(52) {
        line.clear();
        let n = chunk.len();
        line.push(if n <= 26 {
            b'A' + n as u8 - 1
        } else {
            b'a' + n as u8 - 27
        });
        for group in chunk.chunks(4) {
            let mut word = [0u8; 4];
            word[..group.len()].copy_from_slice(group);
            let mut acc = u32::from_be_bytes(word);
            let mut enc = [0u8; 5];
            for slot in enc.iter_mut().rev() {
                *slot = B85[(acc % 85) as usize];
                acc /= 85;
            }
            line.extend_from_slice(&enc);
        }
        line.push(b'\n');
        o.put(&line)?;
    }
    o.put(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_git() {
        assert_eq!(quote("a/", Path::new("plain name.txt")), "a/plain name.txt");
        assert_eq!(quote("a/", Path::new("tab\there")), "\"a/tab\\there\"");
        assert_eq!(quote("b/", Path::new("q\"uote")), "\"b/q\\\"uote\"");
        assert_eq!(quote("a/", Path::new("é")), "\"a/\\303\\251\"");
        assert_eq!(quote("a/", Path::new("cr\rin")), "\"a/cr\\rin\"");
    }

    #[test]
    fn blob_ids_match_git() {
        // `git hash-object -t blob /dev/null` and of "hello\n"
        assert_eq!(blob_id(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert_eq!(
            blob_id(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn ranges_follow_the_unified_format() {
        assert_eq!(range(0, 0), "0,0");
        assert_eq!(range(4, 0), "4,0");
        assert_eq!(range(0, 1), "1");
        assert_eq!(range(2, 3), "3,3");
    }
}
