//! The patch is exact for any bytes: whatever a file held before and
//! after (lone CRs, CR LF, no final newline, NULs early or late, bytes
//! that are not UTF-8, empty), `git apply` of the rendered patch turns the
//! old tree into the new one, byte for byte, and every file keeps a
//! `diff --git` header of its own.

// A test crate: an unwrap that fails is a failed test (clippy allows it in
// #[test] functions; this covers the helpers too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use agentvm_workspace::{capture, render, render_between, PatchOptions};
use proptest::prelude::*;

fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "core.autocrlf=false",
        ])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap_or_else(|e| panic!("git: {e}"))
}

/// Render the change from `old` (the repo) to `upper` (what the sandbox
/// wrote), apply it to a copy of the repo, and return the copy.
fn round_trip(old: &Path, upper: &Path, opts: &PatchOptions) -> (tempfile::TempDir, Vec<u8>) {
    let l = std::fs::File::open(old).unwrap();
    let u = std::fs::File::open(upper).unwrap();
    let cap = capture(u.as_fd(), Some(l.as_fd())).unwrap();
    let mut patch = Vec::new();
    render(&cap, opts, &mut patch).unwrap();
    let copy = tempfile::tempdir().unwrap();
    let o = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", old.display()))
        .arg(copy.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    if !patch.is_empty() {
        let pf = copy.path().join(".git/test.patch");
        std::fs::write(&pf, &patch).unwrap();
        let a = git(
            copy.path(),
            &["apply", "--whitespace=nowarn", pf.to_str().unwrap_or("")],
        );
        assert!(
            a.status.success(),
            "git apply: {}\n{}",
            String::from_utf8_lossy(&a.stderr),
            String::from_utf8_lossy(&patch)
        );
        let _ = std::fs::remove_file(&pf);
    }
    (copy, patch)
}

/// `repo_with` for names that may hold a directory.
fn repo_nested(files: &[(String, Vec<u8>)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    assert!(git(d.path(), &["init", "-q"]).status.success());
    for (n, c) in files {
        let p = d.path().join(n);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, c).unwrap();
    }
    git(d.path(), &["add", "-A"]);
    git(d.path(), &["commit", "-qm", "init", "--allow-empty"]);
    d
}

fn repo_with(files: &[(String, Vec<u8>)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    assert!(git(d.path(), &["init", "-q"]).status.success());
    for (n, c) in files {
        std::fs::write(d.path().join(n), c).unwrap();
    }
    git(d.path(), &["add", "-A"]);
    git(d.path(), &["commit", "-qm", "init", "--allow-empty"]);
    d
}

fn content() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => Just(b'a'),
        2 => Just(b'b'),
        4 => Just(b'\n'),
        3 => Just(b'\r'),
        1 => Just(0u8),
        1 => Just(0xffu8),
        1 => Just(0xc3u8),
        1 => Just(b' '),
    ];
    prop_oneof![
        8 => proptest::collection::vec(byte.clone(), 0..120),
        // past git's 8000-byte binary probe: text, whatever follows
        1 => proptest::collection::vec(byte, 0..40).prop_map(|tail| {
            let mut v = vec![b'x'; 8000];
            v.push(b'\n');
            v.extend(tail);
            v
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn any_bytes_round_trip(pairs in proptest::collection::vec((proptest::option::of(content()), proptest::option::of(content())), 1..5)) {
        let old: Vec<(String, Vec<u8>)> = pairs.iter().enumerate()
            .filter_map(|(i, (o, _))| o.clone().map(|c| (format!("f{i}"), c))).collect();
        let repo = repo_with(&old);
        let upper = tempfile::tempdir().unwrap();
        let mut want = old.clone();
        for (i, (_, n)) in pairs.iter().enumerate() {
            if let Some(c) = n {
                std::fs::write(upper.path().join(format!("f{i}")), c).unwrap();
                want.retain(|(name, _)| *name != format!("f{i}"));
                want.push((format!("f{i}"), c.clone()));
            }
        }
        let (copy, patch) = round_trip(repo.path(), upper.path(), &PatchOptions::default());
        for (name, c) in &want {
            let got = std::fs::read(copy.path().join(name)).unwrap_or_default();
            prop_assert_eq!(&got, c, "{} after apply; patch:\n{}", name, String::from_utf8_lossy(&patch));
        }
        // each file's header starts a line of its own
        let text = String::from_utf8_lossy(&patch);
        let headers = text.matches("diff --git ").count();
        let at_line_start = text.lines().filter(|l| l.starts_with("diff --git ")).count();
        prop_assert_eq!(headers, at_line_start, "a header glued to a line:\n{}", text);
    }
}

/// One file's fate in a state: unchanged from the repo, deleted (a
/// whiteout, which takes root to make), written, or made a symlink.
#[derive(Debug, Clone)]
enum Fate {
    Same,
    Deleted,
    Written(Vec<u8>),
    /// Written and executable.
    Exec(Vec<u8>),
    Link(String),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        3 => Just(Fate::Same),
        1 => Just(Fate::Deleted),
        4 => content().prop_map(Fate::Written),
        1 => content().prop_map(Fate::Exec),
        1 => "[a-z]{1,8}".prop_map(Fate::Link),
    ]
}

/// An upper directory holding `fates` over a repo.
fn upper_with(fates: &[Fate]) -> tempfile::TempDir {
    let u = tempfile::tempdir().unwrap();
    for (i, f) in fates.iter().enumerate() {
        let p = u.path().join(name(i));
        if let Some(d) = p.parent() {
            if !matches!(f, Fate::Same) {
                std::fs::create_dir_all(d).unwrap();
            }
        }
        match f {
            Fate::Same => {}
            Fate::Deleted => nix::sys::stat::mknod(
                &p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                0,
            )
            .unwrap(),
            Fate::Written(c) => std::fs::write(&p, c).unwrap(),
            Fate::Exec(c) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::write(&p, c).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Fate::Link(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
        }
    }
    u
}

/// File `i`'s path: every other one in a subdirectory.
fn name(i: usize) -> String {
    if i % 2 == 1 {
        format!("d/f{i}")
    } else {
        format!("f{i}")
    }
}

/// Every file and symlink under `d` (but .git) with its kind (and
/// whether it is executable) and bytes; directories only by what they hold.
fn snapshot(d: &Path) -> Vec<(String, String, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut v = Vec::new();
    let mut todo = vec![(d.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let n = format!("{prefix}{}", e.file_name().to_string_lossy());
            if n == ".git" {
                continue;
            }
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                v.push((n, "link".into(), t.to_string_lossy().as_bytes().to_vec()));
            } else if m.is_dir() {
                todo.push((e.path(), format!("{n}/")));
            } else {
                let kind = if m.permissions().mode() & 0o100 != 0 {
                    "exec"
                } else {
                    "file"
                };
                v.push((n, kind.into(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    v.sort();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Two states of one repo (two checkpoints of a workspace): the patch
    /// between them turns the first into the second, byte for byte.
    #[test]
    fn the_patch_between_two_states_turns_one_into_the_other(
        files in proptest::collection::vec((proptest::option::of(content()), fate(), fate()), 1..6)
    ) {
        let root = nix::unistd::geteuid().is_root();
        let undeleted = |f: &Fate| if matches!(f, Fate::Deleted) && !root { Fate::Same } else { f.clone() };
        let old: Vec<(String, Vec<u8>)> = files.iter().enumerate()
            .filter_map(|(i, (o, _, _))| o.clone().map(|c| (name(i), c))).collect();
        let repo = repo_nested(&old);
        let a = upper_with(&files.iter().map(|(_, a, _)| undeleted(a)).collect::<Vec<_>>());
        let b = upper_with(&files.iter().map(|(_, _, b)| undeleted(b)).collect::<Vec<_>>());
        let opts = PatchOptions::default();
        // each state made for real: the repo with its own patch applied
        let (state_a, _) = round_trip(repo.path(), a.path(), &opts);
        let (state_b, _) = round_trip(repo.path(), b.path(), &opts);
        let l = std::fs::File::open(repo.path()).unwrap();
        let ua = std::fs::File::open(a.path()).unwrap();
        let ub = std::fs::File::open(b.path()).unwrap();
        let ca = capture(ua.as_fd(), Some(l.as_fd())).unwrap();
        let cb = capture(ub.as_fd(), Some(l.as_fd())).unwrap();
        let mut patch = Vec::new();
        render_between(&ca, &cb, &opts, &mut patch).unwrap();
        if !patch.is_empty() {
            let pf = state_a.path().join(".git/between.patch");
            std::fs::write(&pf, &patch).unwrap();
            let o = git(state_a.path(), &["apply", "--whitespace=nowarn", pf.to_str().unwrap_or("")]);
            prop_assert!(o.status.success(), "git apply: {}\n{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&patch));
            let _ = std::fs::remove_file(&pf);
        }
        prop_assert_eq!(snapshot(state_a.path()), snapshot(state_b.path()), "patch:\n{}", String::from_utf8_lossy(&patch));
        // and nothing is said about a path neither state changed
        let mut back = Vec::new();
        render_between(&ca, &ca, &opts, &mut back).unwrap();
        prop_assert!(back.is_empty(), "a state against itself: {}", String::from_utf8_lossy(&back));
    }
}

#[test]
fn a_sparse_terabyte_costs_no_memory_and_is_only_marked() {
    let repo = repo_with(&[("a".into(), b"a\n".to_vec())]);
    let upper = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(upper.path().join("huge")).unwrap();
    f.set_len(1 << 40).unwrap();
    let l = std::fs::File::open(repo.path()).unwrap();
    let u = std::fs::File::open(upper.path()).unwrap();
    let cap = capture(u.as_fd(), Some(l.as_fd())).unwrap();
    let mut patch = Vec::new();
    let r = render(&cap, &PatchOptions::default(), &mut patch).unwrap();
    assert_eq!(r.binary_omitted, vec!["huge".to_string()]);
    assert!(String::from_utf8_lossy(&patch).contains("Binary files /dev/null and b/huge differ"));
    assert!(patch.len() < 200);
}

#[test]
fn text_past_the_budget_is_refused_before_it_is_read() {
    let repo = repo_with(&[]);
    let upper = tempfile::tempdir().unwrap();
    // text by git's rule (no NUL in the first 8000 bytes), then a hole
    let p = upper.path().join("sparse-text");
    std::fs::write(&p, vec![b'a'; 8000]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1 << 40).unwrap();
    let l = std::fs::File::open(repo.path()).unwrap();
    let u = std::fs::File::open(upper.path()).unwrap();
    let cap = capture(u.as_fd(), Some(l.as_fd())).unwrap();
    let mut patch = Vec::new();
    let opts = PatchOptions {
        max_bytes: 1 << 20,
        ..PatchOptions::default()
    };
    let e = render(&cap, &opts, &mut patch)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("larger than 1048576 bytes"), "{e}");
    assert!(patch.len() <= 1 << 20);
}

#[test]
fn large_text_changes_are_exact_whole_replacements() {
    let mut old = Vec::new();
    // past DIFF_MAX (16 MiB): written as one replacement hunk, streamed
    for i in 0..1_500_000 {
        old.extend_from_slice(format!("line {i}\r\n").as_bytes());
    }
    let repo = repo_with(&[("big".into(), old.clone())]);
    let upper = tempfile::tempdir().unwrap();
    let mut new = old.clone();
    new.truncate(new.len() - 1); // the last line loses its LF
    new.splice(100..100, b"inserted\rline\n".iter().copied());
    std::fs::write(upper.path().join("big"), &new).unwrap();
    let (copy, _) = round_trip(repo.path(), upper.path(), &PatchOptions::default());
    assert_eq!(
        std::fs::read(copy.path().join("big")).unwrap_or_default(),
        new
    );
}

#[test]
fn paths_deeper_than_path_max_are_captured_or_refused_never_dropped() {
    let repo = repo_with(&[]);
    let upper = tempfile::tempdir().unwrap();
    // 4000 bytes below the root: more than /proc/self/fd/N/ + it allows,
    // less than git's limit: captured
    let name = "d".repeat(199);
    let mut dir = upper.path().to_path_buf();
    let mut fd = std::fs::File::open(&dir).unwrap();
    for _ in 0..20 {
        use std::os::fd::AsRawFd;
        let c = std::ffi::CString::new(name.clone()).unwrap_or_default();
        // SAFETY: mkdirat/openat with a NUL-terminated name on our fd.
        let n = unsafe {
            libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755);
            libc::openat(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY,
            )
        };
        assert!(n >= 0);
        // SAFETY: openat just returned it.
        fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(n) };
        dir.push(&name);
    }
    {
        use std::os::fd::AsRawFd;
        // SAFETY: openat on our fd with a literal name.
        let n = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c"f".as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            )
        };
        assert!(n >= 0);
        // SAFETY: closing what we opened.
        unsafe { libc::close(n) };
    }
    let l = std::fs::File::open(repo.path()).unwrap();
    let u = std::fs::File::open(upper.path()).unwrap();
    let cap = capture(u.as_fd(), Some(l.as_fd())).unwrap();
    assert_eq!(cap.changes.len(), 1);
    assert_eq!(cap.changes[0].path.as_os_str().len(), 20 * 200 + 1);
    // one level more: past what git can check out, a clear error
    {
        use std::os::fd::AsRawFd;
        let c = std::ffi::CString::new(name.clone()).unwrap_or_default();
        // SAFETY: as above.
        unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) };
    }
    let u = std::fs::File::open(upper.path()).unwrap();
    let e = capture(u.as_fd(), Some(l.as_fd()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("longer than git can check out"), "{e}");
}

/// Found by `any_bytes_round_trip`: 8,000 bytes on one line then blank
/// lines, against a file whose last line is a lone CR. The hunk's line
/// counts must be those of the lines it holds.
#[test]
fn hunk_counts_are_the_lines_the_hunk_holds() {
    let repo = repo_with(&[("f0".into(), b"\na\n\r".to_vec())]);
    let upper = tempfile::tempdir().unwrap();
    let mut new = vec![b'x'; 8000];
    new.extend_from_slice(b"\n\n\n\n");
    std::fs::write(upper.path().join("f0"), &new).unwrap();
    let (copy, _patch) = round_trip(repo.path(), upper.path(), &PatchOptions::default());
    assert_eq!(std::fs::read(copy.path().join("f0")).unwrap(), new);
}
