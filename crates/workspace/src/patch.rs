//! Rendering changes as a git-style patch.
//!
//! Text files become unified diffs; binary files (a NUL in the first 8000
//! bytes, as git decides, or bytes that are not UTF-8) become a
//! `GIT binary patch` (zlib + base85, never raw bytes) up to a size limit,
//! beyond which they are only marked; symlinks are mode 120000 entries whose
//! content is the target; a change of kind (file <-> symlink) is a deletion
//! followed by an addition, as git writes it.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use sha1::{Digest, Sha1};

use crate::capture::{Change, Entry, Kind};

#[derive(Debug, Clone)]
pub struct PatchOptions {
    /// Largest binary file (either side) encoded in the patch; larger ones
    /// are marked "Binary files ... differ" and cannot be applied.
    pub binary_max: usize,
}

impl Default for PatchOptions {
    fn default() -> Self {
        PatchOptions {
            binary_max: 8 << 20,
        }
    }
}

/// The rendered patch and the paths whose content it could not carry.
pub struct Rendered {
    pub patch: Vec<u8>,
    pub binary_omitted: Vec<String>,
}

/// Render all changes.
pub fn render(changes: &[Change], opts: &PatchOptions) -> Rendered {
    let mut r = Rendered {
        patch: Vec::new(),
        binary_omitted: Vec::new(),
    };
    for c in changes {
        match c {
            Change::Added { path, new } => one(&mut r, opts, path, None, Some(new)),
            Change::Deleted { path, old } => one(&mut r, opts, path, Some(old), None),
            Change::Modified { path, old, new } => {
                if (old.kind == Kind::Symlink) != (new.kind == Kind::Symlink) {
                    one(&mut r, opts, path, Some(old), None);
                    one(&mut r, opts, path, None, Some(new));
                } else {
                    one(&mut r, opts, path, Some(old), Some(new));
                }
            }
        }
    }
    r
}

pub(crate) fn is_binary(b: &[u8]) -> bool {
    b[..b.len().min(8000)].contains(&0) || std::str::from_utf8(b).is_err()
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

fn blob_id(content: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", content.len()).as_bytes());
    h.update(content);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

const ZERO_ID: &str = "0000000000000000000000000000000000000000";

fn one(
    r: &mut Rendered,
    opts: &PatchOptions,
    path: &Path,
    old: Option<&Entry>,
    new: Option<&Entry>,
) {
    let a = quote("a/", path);
    let b = quote("b/", path);
    let out = &mut r.patch;
    let _ = writeln!(out, "diff --git {a} {b}");
    match (old, new) {
        (None, Some(n)) => {
            let _ = writeln!(out, "new file mode {}", n.kind.mode());
        }
        (Some(o), None) => {
            let _ = writeln!(out, "deleted file mode {}", o.kind.mode());
        }
        (Some(o), Some(n)) if o.kind != n.kind => {
            let _ = writeln!(out, "old mode {}", o.kind.mode());
            let _ = writeln!(out, "new mode {}", n.kind.mode());
        }
        _ => {}
    }
    let empty: &[u8] = &[];
    let oc = old.map(|e| e.content.as_slice()).unwrap_or(empty);
    let nc = new.map(|e| e.content.as_slice()).unwrap_or(empty);
    if oc == nc {
        // a mode change, or an empty file added or deleted: headers only
        return;
    }
    let a_name = if old.is_some() {
        a.clone()
    } else {
        "/dev/null".to_string()
    };
    let b_name = if new.is_some() {
        b.clone()
    } else {
        "/dev/null".to_string()
    };
    if is_binary(oc) || is_binary(nc) {
        let same_kind_mode = match (old, new) {
            (Some(o), Some(n)) if o.kind == n.kind => format!(" {}", n.kind.mode()),
            _ => String::new(),
        };
        let oid = if old.is_some() {
            blob_id(oc)
        } else {
            ZERO_ID.to_string()
        };
        let nid = if new.is_some() {
            blob_id(nc)
        } else {
            ZERO_ID.to_string()
        };
        if oc.len().max(nc.len()) > opts.binary_max {
            let _ = writeln!(out, "index {}..{}{same_kind_mode}", &oid[..7], &nid[..7]);
            let _ = writeln!(out, "Binary files {a_name} and {b_name} differ");
            r.binary_omitted
                .push(String::from_utf8_lossy(path.as_os_str().as_bytes()).into_owned());
            return;
        }
        let _ = writeln!(out, "index {oid}..{nid}{same_kind_mode}");
        let _ = writeln!(out, "GIT binary patch");
        literal(out, nc);
        literal(out, oc);
        return;
    }
    // Both sides are UTF-8 here (is_binary checked it).
    let os = std::str::from_utf8(oc).unwrap_or_default();
    let ns = std::str::from_utf8(nc).unwrap_or_default();
    let diff = similar::TextDiff::from_lines(os, ns);
    let mut u = diff.unified_diff();
    u.context_radius(3)
        .missing_newline_hint(true)
        .header(&a_name, &b_name);
    let _ = write!(out, "{u}");
}

const B85: &[u8; 85] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";

/// One `literal` hunk of a git binary patch: zlib, then base85 in lines of
/// at most 52 bytes, each prefixed by its length (A-Z: 1-26, a-z: 27-52).
fn literal(out: &mut Vec<u8>, data: &[u8]) {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = z.write_all(data);
    let deflated = z.finish().unwrap_or_default();
    let _ = writeln!(out, "literal {}", data.len());
    for chunk in deflated.chunks(52) {
        let n = chunk.len();
        out.push(if n <= 26 {
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
            out.extend_from_slice(&enc);
        }
        out.push(b'\n');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn quotes_like_git() {
        assert_eq!(quote("a/", Path::new("plain name.txt")), "a/plain name.txt");
        assert_eq!(quote("a/", Path::new("tab\there")), "\"a/tab\\there\"");
        assert_eq!(quote("b/", Path::new("q\"uote")), "\"b/q\\\"uote\"");
        assert_eq!(quote("a/", Path::new("é")), "\"a/\\303\\251\"");
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
    fn binary_detection() {
        assert!(is_binary(b"a\0b"));
        assert!(is_binary(&[0xff, 0xfe]));
        assert!(!is_binary(b"text\n"));
    }

    #[test]
    fn large_binary_is_marked_not_encoded() {
        let c = Change::Added {
            path: PathBuf::from("big.bin"),
            new: Entry {
                kind: Kind::File,
                content: vec![0u8; 100],
            },
        };
        let r = render(&[c], &PatchOptions { binary_max: 10 });
        let s = String::from_utf8_lossy(&r.patch);
        assert!(
            s.contains("Binary files /dev/null and b/big.bin differ"),
            "{s}"
        );
        assert_eq!(r.binary_omitted, vec!["big.bin".to_string()]);
    }
}
