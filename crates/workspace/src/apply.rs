//! Applying a job's patch to the host repository, safely: the result is a
//! new branch `agentvm/<job-id>` made with git plumbing only. The work tree,
//! the index and HEAD are never touched, so nothing is written through a
//! symlink or outside the repo; no hook runs (hooksPath is /dev/null), and
//! the repo's config cannot make git execute anything (fsmonitor, signing,
//! pager and auto-maintenance are overridden on the command line, which
//! outranks the repo's config).
//!
//! What is protected is decided on the tree git would commit, never on the
//! patch's text: the patch is applied to a private index, the resulting
//! tree is compared with HEAD's, and every path that differs is checked
//! against the repo's protected set ([`crate::protect`]) before any ref is
//! written.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::protect::{self, Protected};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0} is not a git repository with a commit to branch from")]
    NotARepo(String),
    #[error("branch {0} already exists")]
    BranchExists(String),
    #[error("the patch changes protected paths ({0}); AgentVM never writes them (review the patch and apply it yourself if you mean it)")]
    Protected(String),
    #[error("the patch no longer applies: the repository moved on in a conflicting way ({0})")]
    Conflict(String),
    #[error("nothing to apply: the job changed nothing")]
    Empty,
    #[error("git {0}")]
    Git(String),
}

struct Git<'a> {
    repo: &'a Path,
    index: &'a Path,
    /// Run git as the repo's owner (when we are root and it is not).
    owner: Option<(u32, u32)>,
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
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            // std clears the supplementary groups when root sets a uid
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Run; stdout on success, stderr as the error.
    fn run_bytes(&self, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, String> {
        let mut c = self.cmd(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().map_err(|e| format!("starting git: {e}"))?;
        // feed stdin from a thread: git may answer before it has read it all
        let feeder = match (input, child.stdin.take()) {
            (Some(data), Some(mut stdin)) => {
                let data = data.to_vec();
                Some(std::thread::spawn(move || {
                    let _ = stdin.write_all(&data);
                }))
            }
            _ => None,
        };
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        if let Some(f) = feeder {
            let _ = f.join();
        }
        if o.status.success() {
            Ok(o.stdout)
        } else {
            Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
        }
    }

    fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<String, String> {
        self.run_bytes(args, input)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
    }
}

/// A directory only we (and the repo's owner) can use, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(owner: Option<(u32, u32)>) -> Result<PrivateDir, ApplyError> {
        let tmpl = std::env::temp_dir().join("agentvm-apply-XXXXXX");
        let p = nix::unistd::mkdtemp(&tmpl)
            .map_err(|e| ApplyError::Git(format!("making a private directory: {e}")))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .map_err(|e| ApplyError::Git(format!("making a private directory: {e}")))?;
        }
        Ok(PrivateDir(p))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Who git runs as: the repo's owner when we are root and it is someone
/// else (objects written into its repo then belong to it, and git runs
/// with no more privilege than the owner has).
fn owner_of(repo: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let md = std::fs::metadata(repo).ok()?;
    (md.uid() != 0).then_some((md.uid(), md.gid()))
}

/// One path of `git diff-tree -r -z --raw`: (new mode, path).
fn changed_paths(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut it = raw.split(|b| *b == 0);
    while let Some(meta) = it.next() {
        if meta.is_empty() {
            continue;
        }
        let meta = String::from_utf8_lossy(meta);
        let Some(path) = it.next() else { break };
        // ":100644 100755 <old> <new> M"
        let new_mode = meta.split(' ').nth(1).unwrap_or("").to_string();
        out.push((new_mode, path.to_vec()));
    }
    out
}

/// The repo-relative targets of protected symlinks committed in `tree`.
fn tree_links(git: &Git, root: &Path, tree: &str) -> Vec<Vec<u8>> {
    let Ok(list) = git.run_bytes(&["ls-tree", "-r", "-z", tree], None) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in list.split(|b| *b == 0) {
        // "<mode> <type> <id>\t<path>"
        let Some(tab) = item.iter().position(|b| *b == b'\t') else {
            continue;
        };
        let (meta, path) = (&item[..tab], &item[tab + 1..]);
        if !meta.starts_with(b"120000 ") || !protect::by_rule(path) {
            continue;
        }
        let id = String::from_utf8_lossy(meta.split(|b| *b == b' ').nth(2).unwrap_or(b""));
        if let Ok(target) = git.run_bytes(&["cat-file", "blob", id.trim()], None) {
            let dir = match path.iter().rposition(|b| *b == b'/') {
                Some(i) => &path[..i],
                None => b"",
            };
            if let Some(t) = protect::inside(root, dir, &target) {
                out.push(t);
            }
        }
    }
    out
}

/// The protected set of `repo` for a change from `base` to `tree`.
fn protected_set(git: &Git, repo: &Path, base: &str, tree: &str) -> Protected {
    let root = std::fs::canonicalize(repo).unwrap_or_else(|_| repo.to_path_buf());
    let mut extra = protect::config_paths(&root, None);
    // symlinked protected names: committed before, committed after, and
    // in the work tree the branch will be checked out into
    extra.extend(tree_links(git, &root, base));
    extra.extend(tree_links(git, &root, tree));
    if let Ok(dir) = std::fs::File::open(&root) {
        use std::os::fd::AsFd;
        if let Ok(scan) = protect::existing(dir.as_fd(), &root, &extra) {
            extra.extend(scan.targets);
        }
    }
    Protected::new(extra)
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
    let owner = owner_of(repo);
    let tmp = PrivateDir::new(owner)?;
    let index = tmp.0.join("index");
    let git = Git {
        repo,
        index: &index,
        owner,
    };
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
    // what git would commit, path by path: the only thing judged
    let raw = git
        .run_bytes(
            &[
                "diff-tree",
                "-r",
                "-z",
                "--no-renames",
                "--raw",
                &base,
                &tree,
            ],
            None,
        )
        .map_err(ApplyError::Git)?;
    let changed = changed_paths(&raw);
    if changed.is_empty() {
        return Err(ApplyError::Empty);
    }
    let prot = protected_set(&git, repo, &base, &tree);
    let refused: Vec<String> = changed
        .iter()
        .filter(|(mode, p)| prot.covers(p) || mode == "160000")
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    if !refused.is_empty() {
        return Err(ApplyError::Protected(refused.join(", ")));
    }
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
}

/// The paths of `changes` that apply would refuse in the repo at `dir`
/// (canonical path `root`): for `agentvm run`'s result, so a person who
/// applies the patch by hand is warned.
pub fn refused_paths<'a>(
    changes: impl IntoIterator<Item = &'a Path>,
    protected: &Protected,
) -> Vec<String> {
    changes
        .into_iter()
        .filter(|p| protected.covers(p.as_os_str().as_bytes()))
        .map(|p| String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_diff_tree_output_is_parsed() {
        let raw = b":100644 100644 aaa bbb M\0a.txt\0:000000 120000 000 ccc A\0sub/.envrc\0";
        assert_eq!(
            changed_paths(raw),
            vec![
                ("100644".to_string(), b"a.txt".to_vec()),
                ("120000".to_string(), b"sub/.envrc".to_vec())
            ]
        );
    }
}
