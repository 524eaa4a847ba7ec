//! Import of images the tests write themselves (no registry): what lands
//! in the store, and each archive an attacker might hand over refused
//! without a byte written outside the store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentvm_image::{ImageError, Limits, Store};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A raw tar header: the name is written as given (`..` and all), which
/// tar's own builder refuses to do.
fn header(name: &[u8], ty: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h
}

#[allow(clippy::large_enum_variant)]
enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str),
    Fifo(&'a str),
    Raw(tar::Header, Vec<u8>),
}

fn layer(entries: Vec<E>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (mut h, data) = match e {
            E::File(p, d, m) => (
                header(p.as_bytes(), tar::EntryType::Regular, d.len() as u64, m),
                d.to_vec(),
            ),
            E::Dir(p) => (
                header(p.as_bytes(), tar::EntryType::Directory, 0, 0o755),
                vec![],
            ),
            E::Sym(p, t) => {
                let mut h = header(p.as_bytes(), tar::EntryType::Symlink, 0, 0o777);
                h.set_link_name_literal(t).unwrap();
                (h, vec![])
            }
            E::Hard(p, t) => {
                let mut h = header(p.as_bytes(), tar::EntryType::Link, 0, 0o644);
                h.set_link_name_literal(t).unwrap();
                (h, vec![])
            }
            E::Char(p) => (header(p.as_bytes(), tar::EntryType::Char, 0, 0o666), vec![]),
            E::Fifo(p) => (header(p.as_bytes(), tar::EntryType::Fifo, 0, 0o666), vec![]),
            E::Raw(h, d) => (h, d),
        };
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn blob(&self, b: &[u8]) -> String {
        let d = sha(b);
        let p = self
            .dir
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b).unwrap();
        d
    }
}

/// How the test stores a layer blob.
#[derive(Clone, Copy, PartialEq)]
enum Z {
    Plain,
    Gzip,
    Zstd,
}

/// An OCI image layout in `dir`: each layer gzipped (or not), a config
/// with `env`, an index naming it `name`.
fn oci(dir: &Path, layers: &[Vec<u8>], zip: bool, env: &[&str], name: Option<&str>) -> String {
    let z = if zip { Z::Gzip } else { Z::Plain };
    oci_with(dir, layers, z, env, name)
}

fn oci_with(dir: &Path, layers: &[Vec<u8>], z: Z, env: &[&str], name: Option<&str>) -> String {
    let l = Layout {
        dir: dir.to_path_buf(),
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diffs = Vec::new();
    for t in layers {
        diffs.push(sha(t));
        let (stored, mt) = match z {
            Z::Gzip => (gz(t), "application/vnd.oci.image.layer.v1.tar+gzip"),
            Z::Zstd => (
                ruzstd::encoding::compress_to_vec(
                    &t[..],
                    ruzstd::encoding::CompressionLevel::Fastest,
                ),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            Z::Plain => (t.clone(), "application/vnd.oci.image.layer.v1.tar"),
        };
        let d = l.blob(&stored);
        descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": stored.len()}));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env, "WorkingDir": "/src", "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diffs},
    }))
    .unwrap();
    let cd = l.blob(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let md = l.blob(&manifest);
    let mut desc = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len()});
    if let Some(n) = name {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": n});
    }
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [desc]})).unwrap(),
    )
    .unwrap();
    md
}

/// The tar of a directory, as `tar -C dir -cf - .` would make it.
fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

struct T {
    _t: tempfile::TempDir,
    base: PathBuf,
    store: Store,
    data: PathBuf,
}

fn setup() -> T {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().to_path_buf();
    let data = base.join("data");
    let store = Store::open(&data).unwrap();
    T {
        _t: t,
        base,
        store,
        data,
    }
}

fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

/// Everything under `dir` (relative paths), to show nothing else was made.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn go(d: &Path, rel: &str, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let n = format!("{rel}{}", e.file_name().to_string_lossy());
            out.push(n.clone());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                go(&e.path(), &format!("{n}/"), out);
            }
        }
    }
    go(dir, "", &mut out);
    out.sort();
    out
}

fn import_err(t: &T, layers: Vec<Vec<u8>>) -> ImageError {
    let dir = t.base.join(format!("img{}", layers.len()));
    let _ = std::fs::remove_dir_all(&dir);
    oci(&dir, &layers, true, &[], None);
    let outside = tree(&t.base.join("outside"));
    let e = t
        .store
        .import(&dir, None, Limits::default(), &mut quiet())
        .expect_err("the import should have been refused");
    // nothing left: no layer, no image, no unfinished import
    assert!(
        tree(&t.data.join("images/layers")).is_empty(),
        "{:?}",
        tree(&t.data)
    );
    assert!(tree(&t.data.join("images/tmp")).is_empty());
    assert!(t.store.list().unwrap().is_empty());
    assert_eq!(
        tree(&t.base.join("outside")),
        outside,
        "written outside the store"
    );
    e
}

#[test]
fn an_oci_layout_and_its_tar_import_to_the_same_image() {
    let t = setup();
    let l1 = layer(vec![
        E::Dir("usr/"),
        E::Dir("usr/bin/"),
        E::File(
            "usr/bin/only-in-image",
            b"#!/bin/sh\necho from the image\n",
            0o755,
        ),
        E::File("etc/os-release", b"ID=test\n", 0o644),
    ]);
    let l2 = layer(vec![E::File("usr/bin/second", b"2\n", 0o755)]);
    let dir = t.base.join("img");
    let md = oci(
        &dir,
        &[l1.clone(), l2.clone()],
        true,
        &["FOO=bar", "PATH=/usr/bin"],
        Some("test:1"),
    );
    let mut lines = Vec::new();
    let img = t
        .store
        .import(&dir, None, Limits::default(), &mut |l: &str| {
            lines.push(l.to_string())
        })
        .unwrap();
    assert_eq!(img.digest, md);
    assert_eq!(img.tags, vec!["test:1"]);
    assert_eq!(img.layers, vec![sha(&l1), sha(&l2)]);
    assert_eq!(img.config.env, vec!["FOO=bar", "PATH=/usr/bin"]);
    assert_eq!(img.config.working_dir, "/src");
    assert_eq!(img.format, "oci");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let d1 = t.store.layer_dir(&sha(&l1)).unwrap();
    let f = d1.join("usr/bin/only-in-image");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"#!/bin/sh\necho from the image\n"
    );
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    // the same image as a tar, read in place: the same digest, no new layer
    let ino = std::fs::metadata(&f).unwrap().ino();
    let tarred = t.base.join("img.tar");
    tar_dir(&dir, &tarred);
    let again = t
        .store
        .import(&tarred, Some("other"), Limits::default(), &mut quiet())
        .unwrap();
    assert_eq!(again.digest, md);
    assert_eq!(
        std::fs::metadata(&f).unwrap().ino(),
        ino,
        "the layer was unpacked again"
    );
    let mut tags = again.tags.clone();
    tags.sort();
    assert_eq!(tags, vec!["other", "test:1"]);
    // found by tag, digest and prefix
    for name in ["test:1", "other", md.as_str(), &md[7..19]] {
        assert_eq!(t.store.find(name).unwrap().digest, md, "{name}");
    }
    assert!(matches!(t.store.find("nope"), Err(ImageError::NotFound(_))));
}

#[test]
fn whiteouts_and_opaque_directories_become_overlayfs_ones() {
    let t = setup();
    let l1 = layer(vec![
        E::File("a/old", b"x", 0o644),
        E::File("gone", b"x", 0o644),
    ]);
    let l2 = layer(vec![
        E::File(".wh.gone", b"", 0o644),
        E::Dir("a/"),
        E::File("a/.wh..wh..opq", b"", 0o644),
    ]);
    let dir = t.base.join("img");
    oci(&dir, &[l1, l2.clone()], false, &[], None);
    t.store
        .import(&dir, None, Limits::default(), &mut quiet())
        .unwrap();
    let d2 = t.store.layer_dir(&sha(&l2)).unwrap();
    let md = std::fs::symlink_metadata(d2.join("gone")).unwrap();
    assert!(md.file_type().is_char_device() && md.rdev() == 0, "{md:?}");
    let mut v = [0u8; 4];
    let p = std::ffi::CString::new(d2.join("a").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and name, a buffer of its length.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    assert_eq!((n, v[0]), (1, b'y'));
    assert!(!d2.join("a/.wh..wh..opq").exists());
}

#[test]
fn traversal_is_refused() {
    let t = setup();
    std::fs::create_dir_all(t.base.join("outside")).unwrap();
    for evil in [
        "../../outside/evil",
        "a/../../../outside/evil",
        "./../outside/evil",
    ] {
        let e = import_err(&t, vec![layer(vec![E::File(evil, b"pwned", 0o644)])]);
        assert!(
            matches!(&e, ImageError::Refused(m) if m.contains("..")),
            "{evil}: {e}"
        );
    }
}

#[test]
fn absolute_paths_stay_inside() {
    let t = setup();
    let l = layer(vec![E::File("/abs/file", b"in", 0o644)]);
    let dir = t.base.join("img");
    oci(&dir, std::slice::from_ref(&l), true, &[], None);
    t.store
        .import(&dir, None, Limits::default(), &mut quiet())
        .unwrap();
    assert_eq!(
        std::fs::read(t.store.layer_dir(&sha(&l)).unwrap().join("abs/file")).unwrap(),
        b"in"
    );
}

#[test]
fn symlink_escape_is_refused() {
    let t = setup();
    let out = t.base.join("outside");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.to_string_lossy().into_owned();
    for via in [target.as_str(), "../../../../../../../..", "/etc"] {
        let e = import_err(
            &t,
            vec![layer(vec![
                E::Sym("link", via),
                E::File("link/pwned", b"x", 0o644),
            ])],
        );
        assert!(
            matches!(&e, ImageError::Refused(m) if m.contains("symlink")),
            "{via}: {e}"
        );
    }
    // a symlink on its own is kept as it is: it is resolved only inside
    let l = layer(vec![E::Sym("etc-link", "/etc/passwd")]);
    let dir = t.base.join("ok");
    oci(&dir, std::slice::from_ref(&l), true, &[], None);
    t.store
        .import(&dir, None, Limits::default(), &mut quiet())
        .unwrap();
    let p = t.store.layer_dir(&sha(&l)).unwrap().join("etc-link");
    assert_eq!(std::fs::read_link(p).unwrap(), Path::new("/etc/passwd"));
}

#[test]
fn hard_link_out_is_refused() {
    let t = setup();
    std::fs::create_dir_all(t.base.join("outside")).unwrap();
    for to in ["/etc/shadow", "etc/passwd", "../../../../etc/passwd"] {
        let e = import_err(&t, vec![layer(vec![E::Hard("h", to)])]);
        assert!(matches!(e, ImageError::Refused(_)), "{to}: {e}");
    }
    // through a symlink inside the layer: refused too
    let e = import_err(
        &t,
        vec![layer(vec![E::Sym("s", "/etc"), E::Hard("h", "s/passwd")])],
    );
    assert!(matches!(e, ImageError::Refused(_)), "{e}");
    // a link to a file of the layer is one file
    let l = layer(vec![E::File("f", b"same", 0o644), E::Hard("g", "f")]);
    let dir = t.base.join("ok");
    oci(&dir, std::slice::from_ref(&l), true, &[], None);
    t.store
        .import(&dir, None, Limits::default(), &mut quiet())
        .unwrap();
    let d = t.store.layer_dir(&sha(&l)).unwrap();
    assert_eq!(
        std::fs::metadata(d.join("f")).unwrap().ino(),
        std::fs::metadata(d.join("g")).unwrap().ino()
    );
}

#[test]
fn devices_are_not_made_and_setid_bits_are_dropped() {
    let t = setup();
    let l = layer(vec![
        E::Char("dev/evil"),
        E::Fifo("fifo"),
        E::File("suid", b"x", 0o4755),
        E::File("sgid", b"x", 0o2755),
    ]);
    let dir = t.base.join("img");
    oci(&dir, std::slice::from_ref(&l), true, &[], None);
    let img = t
        .store
        .import(&dir, None, Limits::default(), &mut quiet())
        .unwrap();
    assert_eq!((img.devices_skipped, img.setid_dropped), (2, 2));
    let d = t.store.layer_dir(&sha(&l)).unwrap();
    assert!(!d.join("dev/evil").exists() && !d.join("fifo").exists());
    for f in ["suid", "sgid"] {
        assert_eq!(
            std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o7777,
            0o755,
            "{f}"
        );
    }
}

#[test]
fn huge_and_sparse_files_are_refused_before_they_are_written() {
    let t = setup();
    std::fs::create_dir_all(t.base.join("outside")).unwrap();
    // a header that claims 10 GB (the data is not even there)
    let mut a = layer(vec![]);
    let mut h = header(b"huge", tar::EntryType::Regular, 10 << 30, 0o644);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.append(&mut a);
    let e = import_err(&t, vec![raw]);
    assert!(
        matches!(&e, ImageError::TooLarge(m) if m.contains("huge")),
        "{e}"
    );
    // a GNU sparse file of 10 GB holding 512 bytes
    let mut h = header(b"sparse", tar::EntryType::GNUSparse, 512, 0o644);
    let g = h.as_gnu_mut().unwrap();
    g.set_real_size(10 << 30);
    g.sparse[0].set_offset((10 << 30) - 512);
    g.sparse[0].set_length(512);
    let e = import_err(&t, vec![layer(vec![E::Raw(h, vec![7u8; 512])])]);
    assert!(
        matches!(&e, ImageError::TooLarge(m) if m.contains("sparse")),
        "{e}"
    );
}

/// 64 MiB of zeros after a tiny tar, compressed to almost nothing: cut
/// off at the limit, nothing left behind.
fn bomb_is_cut_off(z: Z) {
    let t = setup();
    let mut plain = layer(vec![E::File("f", b"x", 0o644)]);
    plain.resize(plain.len() + (64 << 20), 0);
    let dir = t.base.join("bomb");
    oci_with(&dir, &[plain], z, &[], None);
    let e = t
        .store
        .import(
            &dir,
            None,
            Limits {
                bytes: 1 << 20,
                entries: 100,
            },
            &mut quiet(),
        )
        .expect_err("a bomb was unpacked whole");
    assert!(
        matches!(&e, ImageError::TooLarge(m) if m.contains("past")),
        "{e}"
    );
    assert!(tree(&t.data.join("images/layers")).is_empty());
    assert!(tree(&t.data.join("images/tmp")).is_empty());
}

#[test]
fn a_gzip_bomb_is_cut_off() {
    bomb_is_cut_off(Z::Gzip);
}

#[test]
fn a_blob_that_is_not_its_digest_is_refused() {
    let t = setup();
    let l = layer(vec![E::File("f", b"original", 0o644)]);
    let dir = t.base.join("img");
    oci(&dir, std::slice::from_ref(&l), false, &[], None);
    // change one byte of the stored layer, keeping its name and size
    let blob = dir.join("blobs/sha256").join(&sha(&l)[7..]);
    let mut b = std::fs::read(&blob).unwrap();
    let i = b.windows(8).position(|w| w == b"original").unwrap();
    b[i] = b'O';
    std::fs::write(&blob, &b).unwrap();
    let e = t
        .store
        .import(&dir, None, Limits::default(), &mut quiet())
        .expect_err("accepted");
    assert!(matches!(e, ImageError::Digest(_)), "{e}");
    assert!(tree(&t.data.join("images/layers")).is_empty());
    assert!(tree(&t.data.join("images/tmp")).is_empty());
    // a config that lies about the uncompressed layer (its blob is right)
    let dir2 = t.base.join("img2");
    oci(&dir2, std::slice::from_ref(&l), true, &[], None);
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir2.join("index.json")).unwrap()).unwrap();
    let md = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir2.join("blobs/sha256").join(&md[7..])).unwrap())
            .unwrap();
    let cd = m["config"]["digest"].as_str().unwrap();
    let cpath = dir2.join("blobs/sha256").join(&cd[7..]);
    let c = std::fs::read_to_string(&cpath)
        .unwrap()
        .replace(&sha(&l), &sha(b"something else"));
    std::fs::write(&cpath, c).unwrap();
    let e = t
        .store
        .import(&dir2, None, Limits::default(), &mut quiet())
        .expect_err("accepted");
    // the config no longer matches its own digest
    assert!(matches!(e, ImageError::Digest(_)), "{e}");
}

#[test]
fn json_blobs_are_bounded() {
    let t = setup();
    let dir = t.base.join("img");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("oci-layout"), "{}").unwrap();
    std::fs::write(dir.join("index.json"), vec![b' '; 5 << 20]).unwrap();
    let e = t
        .store
        .import(&dir, None, Limits::default(), &mut quiet())
        .expect_err("accepted");
    assert!(
        matches!(&e, ImageError::BadArchive(m) if m.contains("at most")),
        "{e}"
    );
    let e = t
        .store
        .import(
            &t.base.join("nothing"),
            None,
            Limits::default(),
            &mut quiet(),
        )
        .expect_err("accepted");
    assert!(matches!(e, ImageError::BadArchive(_)), "{e}");
}

#[test]
fn gc_keeps_what_images_use() {
    let t = setup();
    let (l1, l2, l3) = (
        layer(vec![E::File("shared", b"1", 0o644)]),
        layer(vec![E::File("a-only", b"2", 0o644)]),
        layer(vec![E::File("b-only", b"3", 0o644)]),
    );
    oci(
        &t.base.join("a"),
        &[l1.clone(), l2.clone()],
        true,
        &[],
        Some("a"),
    );
    oci(
        &t.base.join("b"),
        &[l1.clone(), l3.clone()],
        true,
        &[],
        Some("b"),
    );
    t.store
        .import(&t.base.join("a"), None, Limits::default(), &mut quiet())
        .unwrap();
    t.store
        .import(&t.base.join("b"), None, Limits::default(), &mut quiet())
        .unwrap();
    // an import that died half way (no process has a pid past pid_max),
    // and a build whose process still runs
    std::fs::create_dir_all(t.data.join("images/tmp/deadbeef.4194305.2/x")).unwrap();
    let mut live = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let running = t.data.join(format!("images/tmp/build.{}.2", live.id()));
    std::fs::create_dir_all(&running).unwrap();
    let g = t.store.gc().unwrap();
    assert_eq!(
        (g.layers_removed, g.layers_kept, g.unfinished_removed),
        (0, 3, 1)
    );
    assert!(running.is_dir(), "a running build keeps its scratch");
    live.kill().unwrap();
    live.wait().unwrap();
    assert_eq!(t.store.gc().unwrap().unfinished_removed, 1);
    t.store.remove("a").unwrap();
    assert!(matches!(t.store.find("a"), Err(ImageError::NotFound(_))));
    let g = t.store.gc().unwrap();
    assert_eq!((g.layers_removed, g.layers_kept), (1, 2));
    assert!(!t.store.layer_dir(&sha(&l2)).unwrap().exists());
    assert!(t
        .store
        .layer_dir(&sha(&l1))
        .unwrap()
        .join("shared")
        .exists());
    assert!(t
        .store
        .layer_dir(&sha(&l3))
        .unwrap()
        .join("b-only")
        .exists());
}

#[test]
fn a_docker_save_archive_imports_and_its_config_is_checked() {
    let t = setup();
    let l = layer(vec![E::File("bin/tool", b"t", 0o755)]);
    let dir = t.base.join("docker");
    std::fs::create_dir_all(dir.join("abc")).unwrap();
    std::fs::write(dir.join("abc/layer.tar"), &l).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["A=1"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l)]},
    }))
    .unwrap();
    let cname = format!("{}.json", &sha(&config)[7..]);
    std::fs::write(dir.join(&cname), &config).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&serde_json::json!([{"Config": cname, "RepoTags": ["tool:latest"], "Layers": ["abc/layer.tar"]}])).unwrap(),
    )
    .unwrap();
    let tarred = t.base.join("docker.tar");
    tar_dir(&dir, &tarred);
    let img = t
        .store
        .import(&tarred, None, Limits::default(), &mut quiet())
        .unwrap();
    assert_eq!(
        (img.digest.as_str(), img.format.as_str()),
        (sha(&config).as_str(), "docker")
    );
    assert_eq!(img.tags, vec!["tool:latest"]);
    assert_eq!(img.config.env, vec!["A=1"]);
    // a config that is not what its name says
    std::fs::write(dir.join(&cname), [config.as_slice(), b" "].concat()).unwrap();
    let e = t
        .store
        .import(&dir, None, Limits::default(), &mut quiet())
        .expect_err("accepted");
    assert!(matches!(e, ImageError::Digest(_)), "{e}");
}

#[test]
fn a_tag_moves_to_the_image_imported_last() {
    let t = setup();
    oci(
        &t.base.join("a"),
        &[layer(vec![E::File("a", b"1", 0o644)])],
        true,
        &[],
        None,
    );
    oci(
        &t.base.join("b"),
        &[layer(vec![E::File("b", b"2", 0o644)])],
        true,
        &[],
        None,
    );
    let a = t
        .store
        .import(
            &t.base.join("a"),
            Some("dev"),
            Limits::default(),
            &mut quiet(),
        )
        .unwrap();
    let b = t
        .store
        .import(
            &t.base.join("b"),
            Some("dev"),
            Limits::default(),
            &mut quiet(),
        )
        .unwrap();
    assert_eq!(t.store.find("dev").unwrap().digest, b.digest);
    assert!(t.store.find(&a.digest).unwrap().tags.is_empty());
    let e = t
        .store
        .import(
            &t.base.join("a"),
            Some("bad tag!"),
            Limits::default(),
            &mut quiet(),
        )
        .expect_err("accepted");
    assert!(matches!(e, ImageError::BadArchive(_)), "{e}");
}

#[test]
fn zstd_layers_import_like_gzip_ones_and_their_bombs_are_cut_off() {
    let t = setup();
    let l = layer(vec![
        E::Dir("opt/"),
        E::File("opt/z", b"from a zstd layer\n", 0o644),
    ]);
    let dir = t.base.join("z");
    oci_with(&dir, std::slice::from_ref(&l), Z::Zstd, &[], Some("z"));
    let img = t
        .store
        .import(&dir, None, Limits::default(), &mut quiet())
        .unwrap();
    assert_eq!(img.layers, vec![sha(&l)], "the diff_id is the plain tar's");
    let at = t.store.layer_dir(&img.layers[0]).unwrap();
    assert_eq!(
        std::fs::read_to_string(at.join("opt/z")).unwrap(),
        "from a zstd layer\n"
    );
    // a zstd layer whose media type says nothing is known by its magic
    // (docker save archives have no media types): the gzip and zstd
    // layers of one plain tar are the same layer
    let gz_dir = t.base.join("g");
    oci(&gz_dir, std::slice::from_ref(&l), true, &[], Some("g"));
    let g = t
        .store
        .import(&gz_dir, None, Limits::default(), &mut quiet())
        .unwrap();
    assert_eq!(g.layers, img.layers);
    bomb_is_cut_off(Z::Zstd);
    // a blob that is not zstd, though its media type says so
    // (a layer the store lacks: one it has is not read again)
    let other = layer(vec![E::File("other", b"not yet stored", 0o644)]);
    let bad = t.base.join("zbad");
    oci_with(&bad, std::slice::from_ref(&other), Z::Plain, &[], None);
    let m = std::fs::read_to_string(bad.join("index.json")).unwrap();
    let md: serde_json::Value = serde_json::from_str(&m).unwrap();
    let mdig = md["manifests"][0]["digest"].as_str().unwrap().to_string();
    let mpath = bad
        .join("blobs/sha256")
        .join(mdig.trim_start_matches("sha256:"));
    let manifest = std::fs::read_to_string(&mpath)
        .unwrap()
        .replace("v1.tar\"", "v1.tar+zstd\"");
    let l2 = Layout { dir: bad.clone() };
    let nd = l2.blob(manifest.as_bytes());
    let index = m.replace(&mdig, &nd).replace(
        &format!("\"size\":{}", std::fs::metadata(&mpath).unwrap().len()),
        &format!("\"size\":{}", manifest.len()),
    );
    std::fs::write(bad.join("index.json"), index).unwrap();
    let e = t
        .store
        .import(&bad, None, Limits::default(), &mut quiet())
        .expect_err("a plain tar taken for zstd");
    assert!(e.to_string().contains("zstd"), "{e}");
}
