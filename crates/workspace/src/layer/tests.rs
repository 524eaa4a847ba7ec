//! The layer store's own tests: save, verify, squash, bounds, sweep.

use super::*;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;

fn wh(p: &Path) {
    nix::sys::stat::mknod(p, nix::sys::stat::SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
}

fn opaque(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path and name, a one-byte value.
    let r = unsafe { libc::setxattr(c.as_ptr(), OPAQUE.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

fn fd(p: &Path) -> OwnedFd {
    std::fs::File::open(p).unwrap().into()
}

/// What a sandbox's upper directory holds after it changed a repo.
fn upper(t: &Path) -> PathBuf {
    let u = t.join("upper");
    std::fs::create_dir_all(u.join("src/deep")).unwrap();
    std::fs::write(u.join("src/deep/new.rs"), b"fn main() {}\n").unwrap();
    std::fs::write(u.join("run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(u.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/deep/new.rs", u.join("link")).unwrap();
    wh(&u.join("gone.txt"));
    std::fs::create_dir(u.join("replaced")).unwrap();
    opaque(&u.join("replaced"));
    std::fs::write(u.join("replaced/only"), b"x").unwrap();
    std::fs::write(u.join("odd name\t%\u{e9}"), b"y").unwrap();
    u
}

#[test]
fn a_saved_layer_is_the_upper_whole_and_verifies() {
    let t = tempfile::tempdir().unwrap();
    let u = upper(t.path());
    let store = t.path().join("layers");
    let made = save(fd(&u).as_fd(), &store, "l1", Bounds::default()).unwrap();
    assert_eq!(made.bytes, 13 + 10 + 1 + 1);
    let l = path(&store, "l1");
    assert_eq!(
        std::fs::read(l.join("src/deep/new.rs")).unwrap(),
        b"fn main() {}\n"
    );
    assert_eq!(
        std::fs::metadata(l.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(l.join("link")).unwrap(),
        Path::new("src/deep/new.rs")
    );
    let st = nix::sys::stat::lstat(&l.join("gone.txt")).unwrap();
    assert_eq!(type_of(&st), Type::Whiteout);
    let d = Dir::from_fd(fd(&l.join("replaced")).as_fd()).unwrap();
    assert!(d.is_opaque());
    assert_eq!(verify(&store, "l1").unwrap(), made);
    assert_eq!(size(&store, "l1").unwrap().bytes, made.bytes);
    let names = manifest_paths(&store, "l1").unwrap();
    assert!(
        names.contains(&OsString::from("odd name\t%\u{e9}")),
        "{names:?}"
    );
    // nothing half-made is left beside it, and a second one of the same id is refused
    let left: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(save(fd(&u).as_fd(), &store, "l1", Bounds::default()).is_err());
    assert!(matches!(
        save(fd(&u).as_fd(), &store, "../x", Bounds::default()),
        Err(LayerError::BadId(_))
    ));
}

#[test]
fn damage_is_found_and_named() {
    let t = tempfile::tempdir().unwrap();
    let u = upper(t.path());
    let store = t.path().join("layers");
    save(fd(&u).as_fd(), &store, "l1", Bounds::default()).unwrap();
    let l = path(&store, "l1");
    type Hurt<'a> = Box<dyn Fn() + 'a>;
    let damage: Vec<(&str, Hurt, &str)> = vec![
        (
            "src/deep/new.rs",
            Box::new(|| std::fs::write(l.join("src/deep/new.rs"), b"fn main() {!}\n").unwrap()),
            "changed",
        ),
        (
            "run.sh",
            Box::new(|| {
                std::fs::set_permissions(l.join("run.sh"), std::fs::Permissions::from_mode(0o644))
                    .unwrap()
            }),
            "changed",
        ),
        (
            "extra",
            Box::new(|| std::fs::write(l.join("extra"), b"").unwrap()),
            "not in the manifest",
        ),
        (
            "gone.txt",
            Box::new(|| std::fs::remove_file(l.join("gone.txt")).unwrap()),
            "missing",
        ),
    ];
    for (path_, hurt, why) in damage {
        let copy = t.path().join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        assert!(std::process::Command::new("cp")
            .arg("-a")
            .arg(&l)
            .arg(&copy)
            .status()
            .unwrap()
            .success());
        hurt();
        match verify(&store, "l1") {
            Err(LayerError::Damaged {
                path: p, why: w, ..
            }) => {
                assert_eq!(p, path_);
                assert!(w.contains(why), "{path_}: {w}");
            }
            other => panic!("{path_}: {other:?}"),
        }
        std::fs::remove_dir_all(&l).unwrap();
        assert!(std::process::Command::new("cp")
            .arg("-a")
            .arg(&copy)
            .arg(&l)
            .status()
            .unwrap()
            .success());
        verify(&store, "l1").unwrap();
    }
    std::fs::remove_file(store.join("l1.manifest")).unwrap();
    assert!(matches!(
        verify(&store, "l1"),
        Err(LayerError::Damaged { .. })
    ));
}

#[test]
fn a_squash_shows_what_the_stack_showed() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("layers");
    // older: a changed, b deleted, dir d made, x replaced by a file
    let a = t.path().join("a");
    std::fs::create_dir_all(a.join("d")).unwrap();
    std::fs::write(a.join("a"), b"a1").unwrap();
    wh(&a.join("b"));
    std::fs::write(a.join("d/keep"), b"k").unwrap();
    std::fs::write(a.join("d/drop"), b"d").unwrap();
    std::fs::write(a.join("x"), b"file").unwrap();
    save(fd(&a).as_fd(), &store, "a", Bounds::default()).unwrap();
    // newer: a deleted, b made again as a directory, d/drop deleted,
    // d/new added, x a directory again
    let b = t.path().join("b");
    std::fs::create_dir_all(b.join("b")).unwrap();
    opaque(&b.join("b"));
    std::fs::write(b.join("b/in"), b"i").unwrap();
    wh(&b.join("a"));
    std::fs::create_dir(b.join("d")).unwrap();
    wh(&b.join("d/drop"));
    std::fs::write(b.join("d/new"), b"n").unwrap();
    std::fs::create_dir(b.join("x")).unwrap();
    std::fs::write(b.join("x/f"), b"f").unwrap();
    save(fd(&b).as_fd(), &store, "b", Bounds::default()).unwrap();

    squash(&store, &["b".to_string(), "a".to_string()], "s").unwrap();
    verify(&store, "s").unwrap();
    let s = path(&store, "s");
    let kind = |p: &str| type_of(&nix::sys::stat::lstat(&s.join(p)).unwrap());
    assert_eq!(
        kind("a"),
        Type::Whiteout,
        "the newer deletion stays, to hide the repo's a"
    );
    assert_eq!(kind("b"), Type::Dir);
    assert!(Dir::from_fd(fd(&s.join("b")).as_fd()).unwrap().is_opaque());
    assert_eq!(std::fs::read(s.join("d/keep")).unwrap(), b"k");
    assert_eq!(kind("d/drop"), Type::Whiteout);
    assert_eq!(std::fs::read(s.join("d/new")).unwrap(), b"n");
    assert!(
        !Dir::from_fd(fd(&s.join("d")).as_fd()).unwrap().is_opaque(),
        "d still merges with the repo's d"
    );
    assert_eq!(kind("x"), Type::Dir);
    assert!(
        Dir::from_fd(fd(&s.join("x")).as_fd()).unwrap().is_opaque(),
        "x's file hid the repo's x: so must the directory"
    );
    assert_eq!(std::fs::read(s.join("x/f")).unwrap(), b"f");
    // files are shared with the older layers, not copied
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(s.join("d/keep")).unwrap().ino(),
        std::fs::metadata(path(&store, "a").join("d/keep"))
            .unwrap()
            .ino()
    );
    // and the layers squashed are as they were
    verify(&store, "a").unwrap();
    verify(&store, "b").unwrap();
}

#[test]
fn a_crash_leaves_nothing_half_made_and_sweep_keeps_what_is_named() {
    let t = tempfile::tempdir().unwrap();
    let u = upper(t.path());
    let store = t.path().join("layers");
    save(fd(&u).as_fd(), &store, "keep", Bounds::default()).unwrap();
    save(fd(&u).as_fd(), &store, "old", Bounds::default()).unwrap();
    // what a crash in the middle of a save leaves
    std::fs::create_dir_all(store.join(".tmp-half/src")).unwrap();
    std::fs::write(store.join(".tmp-half.manifest"), b"").unwrap();
    let gone = sweep(&store, &|id| id == "keep").unwrap();
    assert_eq!(gone, vec!["old".to_string()]);
    let left: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, vec!["keep", "keep.manifest"]);
    verify(&store, "keep").unwrap();
}

#[test]
fn what_takes_no_space_is_still_bounded_and_nothing_is_saved() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("layers");
    // a sparse file: no space on the sandbox's tmpfs, terabytes copied
    let u = t.path().join("sparse");
    std::fs::create_dir(&u).unwrap();
    std::fs::File::create(u.join("hole"))
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let e = save(fd(&u).as_fd(), &store, "s", Bounds::with_bytes(1 << 20)).unwrap_err();
    assert!(matches!(e, LayerError::TooLarge(_)), "{e}");
    // too deep, and too many entries
    let u = t.path().join("deep");
    let mut p = u.clone();
    for _ in 0..12 {
        p = p.join("d");
    }
    std::fs::create_dir_all(&p).unwrap();
    let b = Bounds {
        depth: 8,
        ..Bounds::default()
    };
    assert!(matches!(
        save(fd(&u).as_fd(), &store, "d", b),
        Err(LayerError::TooLarge(_))
    ));
    let b = Bounds {
        entries: 5,
        ..Bounds::default()
    };
    assert!(matches!(
        save(fd(&u).as_fd(), &store, "e", b),
        Err(LayerError::TooLarge(_))
    ));
    // nothing of them is there
    let left = std::fs::read_dir(&store).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0);
}

#[test]
fn read_only_directories_are_saved_squashed_and_removed() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("layers");
    let u = t.path().join("u");
    std::fs::create_dir_all(u.join("ro/inner")).unwrap();
    std::fs::write(u.join("ro/inner/f"), b"x").unwrap();
    for d in ["ro/inner", "ro"] {
        std::fs::set_permissions(u.join(d), std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    save(fd(&u).as_fd(), &store, "a", Bounds::default()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path(&store, "a").join("ro")), 0o555);
    let v = t.path().join("v");
    std::fs::create_dir_all(v.join("ro")).unwrap();
    std::fs::write(v.join("ro/g"), b"y").unwrap();
    save(fd(&v).as_fd(), &store, "b", Bounds::default()).unwrap();
    squash(&store, &["b".to_string(), "a".to_string()], "s").unwrap();
    let s = path(&store, "s");
    assert_eq!(std::fs::read(s.join("ro/inner/f")).unwrap(), b"x");
    assert_eq!(std::fs::read(s.join("ro/g")).unwrap(), b"y");
    assert_eq!(mode(&s.join("ro")), 0o755, "the newer layer's mode");
    assert_eq!(mode(&s.join("ro/inner")), 0o555);
    for id in ["a", "b", "s"] {
        verify(&store, id).unwrap();
        remove(&store, id).unwrap();
    }
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
    for d in ["ro/inner", "ro"] {
        std::fs::set_permissions(u.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn an_empty_upper_makes_no_layer() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("layers");
    let u = t.path().join("empty");
    std::fs::create_dir(&u).unwrap();
    assert_eq!(
        save(fd(&u).as_fd(), &store, "e", Bounds::default()).unwrap(),
        Made::default()
    );
    assert!(!path(&store, "e").exists());
    assert!(size(&store, "e").is_err());
}
