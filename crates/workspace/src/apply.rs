//! Applying a job's patch to the host repository, safely: the result is a
//! new branch `agentvm/<job-id>` made with git plumbing only. The work tree,
//! the index and HEAD are never touched, so nothing is written through a
//! symlink or outside the repo; no hook runs (hooksPath is /dev/null), and
//! the repo's config cannot make git execute anything (fsmonitor, signing,
//! pager and auto-maintenance are overridden on the command line, which
//! outranks the repo's config).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Paths a patch may not touch: git's own directory, and files a shell or
/// an editor runs by itself when the user enters the repo.
pub const PROTECTED: [&str; 16] = [
    ".git",
    ".envrc",
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".exrc",
    ".nvimrc",
    ".nvim.lua",
    ".vscode",
    ".idea",
    ".devcontainer",
];

/// Is `path` (relative, '/'-separated) protected?
pub fn is_protected(path: &str) -> bool {
    path.split('/').any(|c| PROTECTED.contains(&c))
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0} is not a git repository with a commit to branch from")]
    NotARepo(String),
    #[error("branch {0} already exists")]
    BranchExists(String),
    #[error("the patch changes protected paths ({0}); AgentVM never writes them")]
    Protected(String),
    #[error("the patch no longer applies: the repository moved on in a conflicting way ({0})")]
    Conflict(String),
    #[error("nothing to apply: the job changed nothing")]
    Empty,
    #[error("git {0}")]
    Git(String),
}

/// The paths a git patch names (both sides of each `diff --git` header).
pub fn patch_paths(patch: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for line in patch.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(b"diff --git ") else {
            continue;
        };
        let text = String::from_utf8_lossy(rest);
        for part in split_header(&text) {
            let p = part
                .strip_prefix("a/")
                .or_else(|| part.strip_prefix("b/"))
                .unwrap_or(&part)
                .to_string();
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Split `a/x b/y` or `"a/x y" "b/x y"` (git's C quoting).
fn split_header(h: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = h.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' {
            chars.next();
            continue;
        }
        let mut s = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => {
                        if let Some(e) = chars.next() {
                            s.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                        }
                    }
                    c => s.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                s.push(c);
                chars.next();
            }
        }
        out.push(s);
    }
    out
}

struct Git<'a> {
    repo: &'a Path,
    index: &'a Path,
}

impl Git<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        c.arg("-C").arg(self.repo);
        for kv in [
            "core.hooksPath=/dev/null",
            "core.fsmonitor=false",
            "core.untrackedCache=false",
            "commit.gpgSign=false",
            "gc.auto=0",
            "maintenance.auto=false",
            "core.autocrlf=false",
            "safe.directory=*",
        ] {
            c.args(["-c", kv]);
        }
        c.args(args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_PAGER", "cat")
            .env("GIT_INDEX_FILE", self.index)
            .env("GIT_AUTHOR_NAME", "AgentVM")
            .env("GIT_AUTHOR_EMAIL", "agentvm@localhost")
            .env("GIT_COMMITTER_NAME", "AgentVM")
            .env("GIT_COMMITTER_EMAIL", "agentvm@localhost")
            .stdin(Stdio::null());
        c
    }

    /// Run; stdout on success, stderr as the error.
    fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<String, String> {
        let mut c = self.cmd(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().map_err(|e| format!("starting git: {e}"))?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(data).map_err(|e| e.to_string())?;
        }
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
        }
    }
}

/// Put `patch` on a new branch `branch` of `repo`, on top of its HEAD, as one
/// commit with `message`. Returns the commit id.
pub fn apply_to_branch(
    repo: &Path,
    patch: &[u8],
    branch: &str,
    message: &str,
) -> Result<String, ApplyError> {
    if patch.is_empty() {
        return Err(ApplyError::Empty);
    }
    let protected: Vec<String> = patch_paths(patch)
        .into_iter()
        .filter(|p| is_protected(p))
        .collect();
    if !protected.is_empty() {
        return Err(ApplyError::Protected(protected.join(", ")));
    }
    let tmp = std::env::temp_dir().join(format!(
        "agentvm-apply-{}-{}",
        std::process::id(),
        branch.replace('/', "_")
    ));
    let _ = std::fs::remove_file(&tmp);
    let git = Git { repo, index: &tmp };
    let result = (|| {
        let base = git
            .run(&["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], None)
            .map_err(|_| ApplyError::NotARepo(repo.display().to_string()))?;
        let refname = format!("refs/heads/{branch}");
        if git
            .run(&["rev-parse", "--verify", "--quiet", &refname], None)
            .is_ok()
        {
            return Err(ApplyError::BranchExists(branch.to_string()));
        }
        git.run(&["read-tree", &base], None)
            .map_err(ApplyError::Git)?;
        git.run(
            &["apply", "--cached", "--whitespace=nowarn", "-"],
            Some(patch),
        )
        .map_err(ApplyError::Conflict)?;
        let tree = git.run(&["write-tree"], None).map_err(ApplyError::Git)?;
        let commit = git
            .run(
                &[
                    "commit-tree",
                    "--no-gpg-sign",
                    &tree,
                    "-p",
                    &base,
                    "-F",
                    "-",
                ],
                Some(message.as_bytes()),
            )
            .map_err(ApplyError::Git)?;
        // create only: fails if the branch appeared meanwhile
        git.run(
            &[
                "update-ref",
                &refname,
                &commit,
                "0000000000000000000000000000000000000000",
            ],
            None,
        )
        .map_err(|_| ApplyError::BranchExists(branch.to_string()))?;
        Ok(commit)
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_paths() {
        for p in [
            ".envrc",
            "sub/.envrc",
            ".git/hooks/pre-commit",
            ".git/config",
            ".vscode/tasks.json",
            "a/.bashrc",
        ] {
            assert!(is_protected(p), "{p}");
        }
        for p in ["src/main.rs", "envrc", "docs/.gitkeep", "git/config"] {
            assert!(!is_protected(p), "{p}");
        }
    }

    #[test]
    fn paths_from_headers() {
        let p = b"diff --git a/x.txt b/x.txt\n--- a/x.txt\n+++ b/x.txt\ndiff --git \"a/sp ace\" \"b/sp ace\"\nnew file mode 100644\n";
        assert_eq!(
            patch_paths(p),
            vec!["x.txt".to_string(), "sp ace".to_string()]
        );
    }
}
