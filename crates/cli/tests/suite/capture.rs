//! Change capture: the patch reproduces the sandbox's final tree exactly.

use crate::common::*;

/// Changes of every kind the patch must carry.
const CHANGES: &str = r#"
set -e
printf 'hello\nworld\n' > a.txt                 # modify
rm b.txt                                         # delete
printf 'new\n' > added.txt                       # add
mkdir -p n1/n2 && printf 'nested\n' > n1/n2/f    # add nested
printf '\000\001\002binary\377' > blob.bin       # binary
chmod -x run.sh                                  # mode change
chmod +x sub/c                                   # mode change
ln -s /etc/shadow outside-link                   # symlink out of the repo
rm link && ln -s b-gone link                     # symlink retarget
printf 'now a file\n' > sub/deep/d.txt           # add beside
mv sub/deep/d sub/deep/renamed                   # rename
rm -rf olddir && printf 'file now\n' > olddir    # dir -> file
rm nonl && mkdir nonl && printf 'dir now\n' > nonl/x   # file -> dir
printf 'still no newline!' > extra-nonl
printf 'sp\n' > 'name with spaces.txt'
printf 'u\n' > 'ünï"cødé\tname'
: > empty-file
"#;

#[test]
fn patch_reproduces_the_final_tree_with_git_apply() {
    for who in runners() {
        let repo = fixture_repo(who);
        let out_dir = out_dir(who);
        let patch = out_dir.path().join("out.patch");
        let result = out_dir.path().join("r.json");
        let r = repo.path().to_string_lossy().into_owned();
        let p = patch.to_string_lossy().into_owned();
        let j = result.to_string_lossy().into_owned();
        // The command changes the tree, then prints its manifest, computed
        // the same way as on the host.
        let script = format!("{CHANGES}\n{MANIFEST_SH}");
        let out = agentvm(
            who,
            &[
                "run",
                "--repo",
                &r,
                "--patch-out",
                &p,
                "--result-json",
                &j,
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        assert!(out.status.success(), "{who:?} {out:?}");
        let inside = String::from_utf8_lossy(&out.stdout).into_owned();

        // Apply to a clean clone of the repo.
        let clone = tempdir();
        let c = sh(
            clone.path(),
            &format!("cp -R {}/. w", repo.path().display()),
        );
        assert!(c.status.success(), "{c:?}");
        let w = clone.path().join("w");
        let apply = sh(
            &w,
            &format!("git apply --whitespace=nowarn {}", patch.display()),
        );
        assert!(
            apply.status.success(),
            "{who:?}: git apply failed: {apply:?}\n{}",
            std::fs::read_to_string(&patch).unwrap_or_default()
        );
        assert_eq!(
            manifest(&w),
            inside,
            "{who:?}: applied tree differs from the sandbox's"
        );

        let text = std::fs::read_to_string(&patch).unwrap_or_default();
        assert!(
            text.contains("diff --git a/outside-link b/outside-link\nnew file mode 120000"),
            "{text}"
        );
        assert!(
            text.contains("+/etc/shadow\n\\ No newline at end of file"),
            "{text}"
        );
        assert!(text.contains("GIT binary patch"), "{text}");
        assert!(
            !text.contains("root:"),
            "a symlink target's content leaked into the patch"
        );

        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&result).unwrap_or_default()).unwrap_or_default();
        assert_eq!(j["status"], "exited");
        let files: Vec<&str> = j["changed_files"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for f in [
            "a.txt",
            "b.txt",
            "added.txt",
            "n1/n2/f",
            "blob.bin",
            "run.sh",
            "outside-link",
            "sub/deep/renamed",
            "sub/deep/d",
        ] {
            assert!(
                files.contains(&f),
                "{who:?}: {f} missing from changed_files {files:?}"
            );
        }
        // the host repo itself is untouched
        assert!(repo.path().join("b.txt").exists());
    }
}

#[test]
fn nothing_changed_gives_an_empty_patch() {
    for who in runners() {
        let repo = fixture_repo(who);
        let out_dir = out_dir(who);
        let patch = out_dir.path().join("p");
        std::fs::write(&patch, "stale").unwrap();
        if who == Who::Nobody {
            let _ = std::process::Command::new("chown")
                .arg("65534:65534")
                .arg(&patch)
                .status();
        }
        let r = repo.path().to_string_lossy().into_owned();
        let p = patch.to_string_lossy().into_owned();
        // reading and re-writing identical content is no change
        let out = agentvm(
            who,
            &[
                "run",
                "--repo",
                &r,
                "--patch-out",
                &p,
                "--",
                "sh",
                "-c",
                "cat a.txt > /tmp/x && cp /tmp/x a.txt && ls -R >/dev/null",
            ],
        );
        assert!(out.status.success(), "{who:?} {out:?}");
        assert_eq!(std::fs::read(&patch).unwrap_or_default(), b"", "{who:?}");
    }
}

/// A patch written to a pipe or /dev/null (nothing to sync) is no error.
#[test]
fn the_patch_may_go_to_a_pipe_or_dev_null() {
    let repo = fixture_repo(Who::Me);
    let r = repo.path().to_string_lossy().into_owned();
    let o = agentvm(
        Who::Me,
        &[
            "run",
            "--repo",
            &r,
            "--patch-out",
            "/dev/null",
            "--",
            "sh",
            "-c",
            "echo x >> a.txt",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let o = agentvm(
        Who::Me,
        &[
            "run",
            "--repo",
            &r,
            "--patch-out",
            "/dev/stdout",
            "--",
            "sh",
            "-c",
            "echo x >> a.txt",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("+x\n"), "{o:?}");
}

#[test]
fn workspace_without_repo_captures_new_files() {
    let out_dir = tempdir();
    let patch = out_dir.path().join("p");
    let p = patch.to_string_lossy().into_owned();
    let out = agentvm(
        Who::Me,
        &[
            "run",
            "--patch-out",
            &p,
            "--",
            "sh",
            "-c",
            "echo hi > made.txt",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&patch).unwrap_or_default();
    assert!(
        text.contains("+++ b/made.txt\n@@ -0,0 +1 @@\n+hi\n"),
        "{text}"
    );
}

/// Contents git itself treats as text or binary by its own rule (a NUL in
/// the first 8000 bytes): a lone CR ending the last line, CRs inside
/// lines, CR LF, no final newline, a NUL past the first 8000 bytes,
/// bytes that are not UTF-8, and a file after each that must keep its own
/// header.
const AWKWARD: &str = r#"
set -e
printf 'last line ends in CR\r' > cr-end
printf 'a\rb\rc\n' > cr-inside
printf 'one\r\ntwo\r\n' > crlf
printf 'hello\nworld\r' > a.txt
head -c 9000 /dev/zero | tr '\0' 't' > nul-late && printf '\000tail\n' >> nul-late
printf '\377\376 not utf-8\n\300\n' > latin
printf 'no newline at all' > b.txt
printf '\r' > only-cr
printf '\n\n\r\n' > blanks
"#;

#[test]
fn patch_is_exact_for_any_bytes() {
    for who in runners() {
        let repo = fixture_repo(who);
        let out_dir = out_dir(who);
        let patch = out_dir.path().join("out.patch");
        let r = repo.path().to_string_lossy().into_owned();
        let p = patch.to_string_lossy().into_owned();
        let script = format!("{AWKWARD}\n{MANIFEST_SH}");
        let out = agentvm(
            who,
            &[
                "run",
                "--repo",
                &r,
                "--patch-out",
                &p,
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        assert!(out.status.success(), "{who:?} {out:?}");
        let inside = String::from_utf8_lossy(&out.stdout).into_owned();
        let text = std::fs::read(&patch).unwrap_or_default();
        // every file keeps a header of its own at the start of a line
        for f in [
            "cr-end",
            "cr-inside",
            "crlf",
            "a.txt",
            "nul-late",
            "latin",
            "b.txt",
            "only-cr",
            "blanks",
        ] {
            let h = format!("\ndiff --git a/{f} b/{f}\n");
            let first = format!("diff --git a/{f} b/{f}\n");
            assert!(
                text.windows(h.len()).any(|w| w == h.as_bytes())
                    || text.starts_with(first.as_bytes()),
                "{who:?}: no header of its own for {f}:\n{}",
                String::from_utf8_lossy(&text)
            );
        }
        let clone = tempdir();
        let c = sh(
            clone.path(),
            &format!("cp -R {}/. w", repo.path().display()),
        );
        assert!(c.status.success(), "{c:?}");
        let w = clone.path().join("w");
        let apply = sh(
            &w,
            &format!("git apply --whitespace=nowarn {}", patch.display()),
        );
        assert!(
            apply.status.success(),
            "{who:?}: git apply failed: {apply:?}\n{}",
            String::from_utf8_lossy(&text)
        );
        assert_eq!(
            manifest(&w),
            inside,
            "{who:?}: applied tree differs from the sandbox's"
        );
    }
}
