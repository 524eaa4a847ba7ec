//! `images build --debian` against a stand-in for mmdebstrap (a script
//! that writes a root filesystem tar where mmdebstrap would): the argv it
//! is given, the cache, the error when it fails, and that what it makes
//! goes through every check an import makes. The real mmdebstrap is run
//! by crates/cli/tests/suite/images.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use agentvm_image::{BuildOpts, DebianSpec, ImageError, Limits, Store};

/// A fake mmdebstrap in `dir`: records its argv (one per line) in
/// dir/argv.N, then writes the tar `dir/tree` makes (or the one in
/// dir/evil.tar if there is one) to its second positional argument, or
/// fails when dir/fail exists.
fn fake_tool(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/debian_version"), "12.0\n").unwrap();
    std::fs::write(tree.join("usr/bin/jq"), "#!/bin/sh\necho jq-1.6\n").unwrap();
    let tool = dir.join("mmdebstrap");
    std::fs::write(
        &tool,
        r#"#!/bin/bash
set -e
d=$(dirname "$0")
n=$(ls "$d" | grep -c '^argv\.' || true)
printf '%s\n' "$@" > "$d/argv.$n"
echo "I: chroot architecture amd64 is equal to the host's architecture" >&2
if [ -e "$d/fail" ]; then echo "E: cannot find package no-such-package" >&2; exit 1; fi
pos=()
for a in "$@"; do case "$a" in --*) ;; *) pos+=("$a") ;; esac; done
out=${pos[1]}
if [ -e "$d/evil.tar" ]; then cp "$d/evil.tar" "$out"; exit 0; fi
tar -C "$d/tree" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$out" .
echo "I: success" >&2
"#,
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    tool
}

fn calls(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("argv.")
        })
        .count()
}

fn spec(pkgs: &[&str]) -> DebianSpec {
    let p: Vec<String> = pkgs.iter().map(|s| s.to_string()).collect();
    DebianSpec::new("bookworm", &p, &[], Some("http://mirror.test/debian"), None).unwrap()
}

/// Build quietly with the default limits.
fn build(
    store: &Store,
    spec: &DebianSpec,
    tag: &str,
    tool: &Path,
    rebuild: bool,
) -> Result<agentvm_image::Built, ImageError> {
    let o = BuildOpts {
        rebuild,
        ..Default::default()
    };
    store.build_debian(spec, tag, tool, &o, &mut |_| {})
}

fn tmp_entries(data: &Path) -> usize {
    std::fs::read_dir(data.join("images/tmp")).unwrap().count()
}

#[test]
fn a_build_runs_mmdebstrap_with_checked_arguments_and_imports_what_it_made() {
    let data = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let tool = fake_tool(t.path());
    let store = Store::open(data.path()).unwrap();
    let mut lines = Vec::new();
    let b = store
        .build_debian(
            &spec(&["jq", "git"]),
            "tools",
            &tool,
            &BuildOpts::default(),
            &mut |l| lines.push(l.to_string()),
        )
        .unwrap();
    assert!(!b.cached);
    let argv = std::fs::read_to_string(t.path().join("argv.0")).unwrap();
    let argv: Vec<&str> = argv.lines().collect();
    assert!(argv.contains(&"--variant=minbase"), "{argv:?}");
    assert!(argv.contains(&"--format=tar"), "{argv:?}");
    assert!(argv.contains(&"--include=git,jq"), "{argv:?}");
    let pos: Vec<&&str> = argv.iter().filter(|a| !a.starts_with("--")).collect();
    assert_eq!(pos.len(), 5, "suite, target and three sources: {argv:?}");
    assert_eq!(*pos[0], "bookworm");
    assert_eq!(*pos[2], "deb http://mirror.test/debian bookworm main");
    assert_eq!(
        *pos[3],
        "deb http://mirror.test/debian bookworm-updates main"
    );
    assert!(
        pos[4].ends_with(" bookworm-security main") && pos[4].starts_with("deb http"),
        "{argv:?}"
    );
    // mmdebstrap's own lines are passed on as progress
    assert!(
        lines.iter().any(|l| l.contains("mmdebstrap: I: success")),
        "{lines:?}"
    );
    let img = store.find("tools").unwrap();
    assert_eq!(img.digest, b.image.digest);
    assert_eq!(
        img.built.as_deref(),
        Some("debian bookworm minbase +git,jq from http://mirror.test/debian")
    );
    assert_eq!(img.layers.len(), 1);
    let layer = store.layer_dir(&img.layers[0]).unwrap();
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/debian_version")).unwrap(),
        "12.0\n"
    );
    assert!(img
        .config
        .env
        .iter()
        .any(|e| e.starts_with("PATH=") && e.contains("/usr/bin")));
    assert_eq!(tmp_entries(data.path()), 0, "the scratch is gone");
}

#[test]
fn the_same_build_comes_from_the_cache_and_rebuild_makes_the_same_layer() {
    let data = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let tool = fake_tool(t.path());
    let store = Store::open(data.path()).unwrap();
    let one = build(&store, &spec(&["jq"]), "a", &tool, false).unwrap();
    // same spec, packages in another order and repeated: cached
    let two = build(&store, &spec(&["jq", "jq"]), "b", &tool, false).unwrap();
    assert!(two.cached);
    assert_eq!(calls(t.path()), 1, "the tool ran once");
    assert_eq!(two.image.digest, one.image.digest);
    let img = store.find("a").unwrap();
    assert_eq!(img.tags, vec!["a".to_string(), "b".to_string()]);
    // another package list: built
    build(&store, &spec(&["git"]), "c", &tool, false).unwrap();
    assert_eq!(calls(t.path()), 2);
    // --rebuild runs it again; the same tar is the same layer and image
    let three = build(&store, &spec(&["jq"]), "a", &tool, true).unwrap();
    assert!(!three.cached);
    assert_eq!(calls(t.path()), 3);
    assert_eq!(three.image.layers, one.image.layers);
    // a build past its max age is made again
    let old = BuildOpts {
        max_age: std::time::Duration::ZERO,
        ..Default::default()
    };
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = store
        .build_debian(&spec(&["jq"]), "a", &tool, &old, &mut |_| {})
        .unwrap();
    assert!(!again.cached);
    assert_eq!(calls(t.path()), 4);
    // a cache record whose image was removed builds again
    store.remove("a").unwrap();
    let four = build(&store, &spec(&["jq"]), "a", &tool, false).unwrap();
    assert!(!four.cached);
    assert_eq!(calls(t.path()), 5);
}

#[test]
fn a_failed_build_says_why_and_leaves_the_store_as_it_was() {
    let data = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let tool = fake_tool(t.path());
    let store = Store::open(data.path()).unwrap();
    build(&store, &spec(&["jq"]), "keep", &tool, false).unwrap();
    std::fs::write(t.path().join("fail"), "").unwrap();
    let e = build(&store, &spec(&["no-such-package"]), "keep", &tool, false).unwrap_err();
    assert!(matches!(e, ImageError::Build(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cannot find package no-such-package"), "{msg}");
    assert!(msg.contains("exit status: 1"), "{msg}");
    // the earlier image keeps its name; nothing is left behind
    assert!(store.find("keep").is_ok());
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(tmp_entries(data.path()), 0);
    // no tool at all
    let e = store
        .build_debian(
            &spec(&["jq"]),
            "x",
            &t.path().join("none"),
            &BuildOpts {
                rebuild: true,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("apt-get install mmdebstrap"), "{e}");
    // a bad name is refused before anything runs
    let before = calls(t.path());
    let e = build(&store, &spec(&["jq"]), "sha256:0000", &tool, true).unwrap_err();
    assert!(e.to_string().contains("name"), "{e}");
    assert_eq!(calls(t.path()), before);
}

#[test]
fn what_the_tool_makes_passes_the_import_checks() {
    let data = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let tool = fake_tool(t.path());
    // a tar that reaches out of its layer
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let name = b"../../escaped";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"hi"[..]).unwrap();
    std::fs::write(t.path().join("evil.tar"), b.into_inner().unwrap()).unwrap();
    let store = Store::open(data.path()).unwrap();
    let e = build(&store, &spec(&["jq"]), "evil", &tool, false).unwrap_err();
    assert!(matches!(e, ImageError::Refused(_)), "{e}");
    assert!(!data.path().join("escaped").exists());
    assert!(!data.path().join("images/escaped").exists());
    assert!(store.list().unwrap().is_empty());
    // and the limits of an import
    std::fs::remove_file(t.path().join("evil.tar")).unwrap();
    let e = store
        .build_debian(
            &spec(&["jq"]),
            "big",
            &tool,
            &BuildOpts {
                limits: Limits {
                    bytes: 4,
                    entries: 1000,
                },
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::TooLarge(_)), "{e}");
}
