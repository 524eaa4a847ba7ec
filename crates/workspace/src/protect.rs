//! What a job may not change without a person reading it first: the files
//! that git, shells, editors and CI execute by themselves, later, on the
//! host.
//!
//! The protected set of a repo is
//! - every path with a component in [`NAMES`], at any depth (direnv and
//!   shell startup files, editor task and launch files, hook managers'
//!   directories and configs, `.git` itself, a submodule's too);
//! - every path at or below one of [`ROOT_PATHS`] (CI workflows, which run
//!   with the repository's secrets as soon as the branch is pushed);
//! - every path inside the repo that the repo's own git config names in a
//!   setting git executes or loads ([`config_paths`]: `core.hooksPath`,
//!   `core.fsmonitor`, `include.path`, filter, diff and merge drivers,
//!   aliases, ...);
//! - the target, inside the repo, of every protected name that is a
//!   symlink (`.envrc -> tools/env.sh` protects `tools/env.sh`), followed
//!   through further symlinks.
//!
//! The sandbox shows the existing ones read-only ([`existing`]); apply
//! refuses a change to any of them, judged on the tree git would commit.

use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::fsx::{type_of, Dir, Type};

/// Names protected wherever they appear.
pub const NAMES: &[&str] = &[
    // git's own directory (a submodule's too)
    ".git",
    // run by direnv and autoenv on entering a directory
    ".envrc",
    ".autoenv.zsh",
    ".autoenv_leave.zsh",
    ".env.leave",
    // shell startup files (run when the repo is someone's HOME)
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".zlogout",
    // editors: project settings, tasks and launch configurations, local
    // init files
    ".vscode",
    ".idea",
    ".zed",
    ".devcontainer",
    ".devcontainer.json",
    ".exrc",
    ".nvimrc",
    ".nvim.lua",
    ".dir-locals.el",
    ".dir-locals-2.el",
    // git hook managers: their hook directories and configs
    ".husky",
    ".githooks",
    ".pre-commit-config.yaml",
    ".pre-commit-hooks.yaml",
    "lefthook.yml",
    ".lefthook.yml",
    "lefthook-local.yml",
    ".lefthook-local.yml",
    ".lefthook",
    ".overcommit.yml",
];

/// Paths protected at the repo's top level, with everything below them.
pub const ROOT_PATHS: &[&str] = &[
    ".github/workflows",
    ".github/actions",
    ".gitlab-ci.yml",
    ".gitlab",
    ".circleci",
    ".travis.yml",
    ".buildkite",
    ".drone.yml",
    ".woodpecker",
    ".woodpecker.yml",
    "azure-pipelines.yml",
    "bitbucket-pipelines.yml",
    "Jenkinsfile",
];

fn under(rel: &[u8], base: &[u8]) -> bool {
    rel == base || (rel.starts_with(base) && rel.get(base.len()) == Some(&b'/'))
}

/// Is `rel` ('/'-separated, relative to the repo) protected by name or as
/// a top-level path?
pub fn by_rule(rel: &[u8]) -> bool {
    rel.split(|b| *b == b'/')
        .any(|c| NAMES.iter().any(|n| n.as_bytes() == c))
        || ROOT_PATHS.iter().any(|p| under(rel, p.as_bytes()))
}

/// The protected set of one repo: the rules, plus paths its config names
/// and its protected symlinks point at.
#[derive(Debug, Clone, Default)]
pub struct Protected {
    extra: Vec<Vec<u8>>,
}

impl Protected {
    pub fn new(extra: Vec<Vec<u8>>) -> Protected {
        let mut extra: Vec<Vec<u8>> = extra.into_iter().filter(|e| !e.is_empty()).collect();
        extra.sort();
        extra.dedup();
        Protected { extra }
    }

    /// Is a change at `rel` refused?
    pub fn covers(&self, rel: &[u8]) -> bool {
        by_rule(rel) || self.extra.iter().any(|e| under(rel, e))
    }

    /// The repo-specific paths (config-named, symlink targets).
    pub fn extra(&self) -> &[Vec<u8>] {
        &self.extra
    }
}

/// Normalise `base/rel` lexically; `None` when it climbs out of the repo.
fn normalise(base: &[u8], rel: &[u8]) -> Option<Vec<u8>> {
    let mut parts: Vec<&[u8]> = base
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    for p in rel.split(|b| *b == b'/') {
        match p {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join(&b'/'))
}

/// Where a path named in config or a symlink points, relative to the
/// repo's root `repo` (its canonical absolute path): `None` outside.
/// Relative names are taken from `base` (a directory relative to the
/// root).
pub fn inside(repo: &Path, base: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    if name.starts_with(b"/") {
        let root = repo.as_os_str().as_bytes();
        let rest = name.strip_prefix(root)?;
        if !rest.is_empty() && !rest.starts_with(b"/") {
            return None;
        }
        normalise(b"", rest)
    } else if name.starts_with(b"~") {
        None
    } else {
        normalise(base, name)
    }
}

/// Does git config key `key` (as `git config --list` prints it) hold a
/// program git runs or a file git loads?
fn executes(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "core.hookspath",
        "core.fsmonitor",
        "core.editor",
        "core.pager",
        "core.sshcommand",
        "core.askpass",
        "core.attributesfile",
        "sequence.editor",
        "diff.external",
        "interactive.difffilter",
        "uploadpack.packobjectshook",
        "web.browser",
        "gpg.program",
        "include.path",
    ];
    const LAST: &[&str] = &[
        "path", "cmd", "command", "program", "helper", "driver", "textconv", "clean", "smudge",
        "process", "update", "hook",
    ];
    let last = key.rsplit('.').next().unwrap_or("");
    EXACT.contains(&key)
        || key.starts_with("alias.")
        || key.starts_with("pager.")
        || LAST.contains(&last)
}

/// Words of a config value that could name a file: split on blanks and
/// shell punctuation, quotes and a leading `!` removed.
fn words(value: &str) -> Vec<&str> {
    value
        .split(|c: char| c.is_whitespace() || ";&|()<>`'\"".contains(c))
        .map(|w| w.trim_start_matches('!'))
        .filter(|w| !w.is_empty() && !w.starts_with('-') && !w.starts_with('$'))
        .collect()
}

/// Config text that might name something protectable: otherwise git is
/// not even started (the common case costs one small read).
fn interesting(config: &[u8]) -> bool {
    let lower = config.to_ascii_lowercase();
    const WORDS: &[&str] = &[
        "hookspath",
        "fsmonitor",
        "include",
        "alias",
        "path",
        "cmd",
        "command",
        "program",
        "helper",
        "driver",
        "textconv",
        "clean",
        "smudge",
        "process",
        "editor",
        "pager",
        "askpass",
        "attributesfile",
        "browser",
        "difffilter",
        "hook",
        "update",
        "external",
    ];
    WORDS
        .iter()
        .any(|w| lower.windows(w.len()).any(|x| x == w.as_bytes()))
}

/// A `git` that reads and executes nothing of the user's or the system's
/// configuration beyond the repo's own.
pub(crate) fn git_command(repo: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(repo)
        .args(["-c", "safe.directory=*", "-c", "core.fsmonitor=false"])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Paths inside the repo that its git config names in settings git runs
/// or loads. `root` is the repo's canonical path, `dir` (when the caller
/// has one) its descriptor, to look at `.git/config` before starting git.
pub fn config_paths(root: &Path, dir: Option<BorrowedFd<'_>>) -> Vec<Vec<u8>> {
    if let Some(fd) = dir {
        let Ok(d) = Dir::from_fd(fd) else {
            return Vec::new();
        };
        match d.stat_opt(OsStr::new(".git")) {
            Ok(Some(st)) if type_of(&st) == Type::Dir => {
                let mut text = Vec::new();
                if let Ok(f) = d.open_file_at(b".git/config") {
                    use std::io::Read;
                    let _ = f.take(1 << 20).read_to_end(&mut text);
                }
                if !interesting(&text) {
                    return Vec::new();
                }
            }
            // not a git repo at all: nothing to read
            Ok(None) => return Vec::new(),
            // a worktree's or submodule's `.git` file: ask git
            _ => {}
        }
    }
    let out = git_command(root)
        .args(["config", "--local", "--includes", "-z", "--list"])
        .stdout(Stdio::piped())
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for item in out.stdout.split(|b| *b == 0) {
        let text = String::from_utf8_lossy(item);
        let Some((key, value)) = text.split_once('\n') else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if !executes(&key) {
            continue;
        }
        let include =
            key == "include.path" || (key.starts_with("includeif.") && key.ends_with(".path"));
        for w in words(value) {
            // include paths are relative to the config file (in .git/)
            let bases: &[&[u8]] = if include { &[b".git", b""] } else { &[b""] };
            for base in bases {
                if let Some(p) = inside(root, base, w.as_bytes()) {
                    paths.push(p);
                }
            }
        }
    }
    paths
}

/// What the sandbox shows read-only, and what apply refuses beyond the
/// rules: found by walking the repo.
#[derive(Debug, Default)]
pub struct Scan {
    /// Existing protected files and directories (never symlinks),
    /// relative to the root: bind these read-only.
    pub paths: Vec<PathBuf>,
    /// Repo-relative targets of protected symlinks.
    pub targets: Vec<Vec<u8>>,
}

/// Walk the repo at `dir` (canonical path `root`) for every existing
/// protected path; `extra` are config-named paths. Directories that are
/// protected are not entered (they are shown read-only whole). The top
/// `.git` is left out: the sandbox treats it on its own.
pub fn existing(dir: BorrowedFd<'_>, root: &Path, extra: &[Vec<u8>]) -> std::io::Result<Scan> {
    let d = Dir::from_fd(dir)?;
    let prot = Protected::new(extra.to_vec());
    let mut scan = Scan::default();
    let own = nix::fcntl::openat(
        Some(std::os::fd::AsRawFd::as_raw_fd(&d.fd())),
        ".",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; we own it.
    let own = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(own) };
    walk(&d, own, root, &mut Vec::new(), &prot, &mut scan)?;
    // config-named paths that exist, whatever their names
    for e in extra {
        add_existing(&d, root, e, &mut scan, 0);
    }
    scan.paths.sort();
    scan.paths.dedup();
    scan.targets.sort();
    scan.targets.dedup();
    Ok(scan)
}

fn rel_path(rel: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(rel))
}

/// `rel` exists in the repo: a file or directory is recorded; a symlink
/// is followed (inside the repo, at most 40 times) and its targets too.
fn add_existing(root_dir: &Dir, root: &Path, rel: &[u8], scan: &mut Scan, hops: u32) {
    if hops > 40 || rel.is_empty() {
        return;
    }
    let Some((parent, name)) = split_last(rel) else {
        return;
    };
    let pd = match parent {
        b"" => Dir::from_fd(root_dir.fd()).ok(),
        p => open_dir_at(root_dir, p),
    };
    let Some(pd) = pd else { return };
    let Ok(Some(st)) = pd.stat_opt(OsStr::from_bytes(name)) else {
        return;
    };
    match type_of(&st) {
        Type::Dir | Type::File { .. } => scan.paths.push(rel_path(rel)),
        Type::Symlink => {
            if let Ok(t) = pd.readlink(OsStr::from_bytes(name)) {
                if let Some(target) = inside(root, parent, &t) {
                    scan.targets.push(target.clone());
                    add_existing(root_dir, root, &target, scan, hops + 1);
                }
            }
        }
        _ => {}
    }
}

fn split_last(rel: &[u8]) -> Option<(&[u8], &[u8])> {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => Some((&rel[..i], &rel[i + 1..])),
        None => Some((b"", rel)),
    }
}

fn open_dir_at(root: &Dir, rel: &[u8]) -> Option<Dir> {
    let mut cur = Dir::from_fd(root.fd()).ok()?;
    for p in rel.split(|b| *b == b'/').filter(|p| !p.is_empty()) {
        if p == b".." || p == b"." {
            return None;
        }
        cur = cur.open_dir(OsStr::from_bytes(p)).ok()?;
    }
    Some(cur)
}

/// The walk: one open and one listing per directory (types from the
/// listing, no stat), names checked in place; directories are entered
/// after their listing is closed, so a deep tree holds one descriptor per
/// level and no listing buffers.
fn walk(
    root_dir: &Dir,
    dir: OwnedFd,
    root: &Path,
    rel: &mut Vec<u8>,
    prot: &Protected,
    scan: &mut Scan,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let top = rel.is_empty();
    let mut subdirs: Vec<Vec<u8>> = Vec::new();
    let mut listing = nix::dir::Dir::from(dir)?;
    let raw = listing.as_raw_fd();
    for e in listing.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." || (top && name == b".git") {
            continue;
        }
        if rel.len() + 1 + name.len() > crate::capture::MAX_PATH {
            continue;
        }
        let is_dir = match e.file_type() {
            Some(nix::dir::Type::Directory) => true,
            Some(_) => false,
            None => {
                nix::sys::stat::fstatat(Some(raw), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| type_of(&st) == Type::Dir)
            }
        };
        let named = NAMES.iter().any(|n| n.as_bytes() == name);
        let full = || {
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(name);
            r
        };
        // top-level paths (two levels at most) and config-named ones need
        // the whole path
        let by_path = rel.iter().filter(|b| **b == b'/').count() < 1 || !prot.extra.is_empty();
        if named || (by_path && prot.covers(&full())) {
            add_existing(root_dir, root, &full(), scan, 0);
            continue;
        }
        if is_dir {
            subdirs.push(name.to_vec());
        }
    }
    if subdirs.is_empty() {
        return Ok(());
    }
    // keep a descriptor to open the subdirectories from, not the listing
    let here = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0))?;
    // SAFETY: fcntl just returned this descriptor; we own it.
    let here = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(here) };
    drop(listing);
    for name in subdirs {
        let sub = match nix::fcntl::openat(
            Some(here.as_raw_fd()),
            name.as_slice(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            // SAFETY: openat just returned this descriptor; we own it.
            Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            Err(_) => continue,
        };
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let r = walk(root_dir, sub, root, rel, prot, scan);
        rel.truncate(len);
        r?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        for p in [
            ".envrc",
            "sub/.envrc",
            "a/b/.vscode/tasks.json",
            ".git/hooks/pre-commit",
            "vendor/lib/.git",
            ".husky/pre-commit",
            "pkg/.idea/workspace.xml",
            ".github/workflows/ci.yml",
            ".gitlab-ci.yml",
            "x/.pre-commit-config.yaml",
        ] {
            assert!(by_rule(p.as_bytes()), "{p}");
        }
        for p in [
            "src/main.rs",
            "envrc",
            "docs/.gitkeep",
            "git/config",
            "sub/.github/workflows/x.yml",
            ".github/CODEOWNERS",
            ".github/workflowsx",
        ] {
            assert!(!by_rule(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn extra_paths_cover_what_is_below() {
        let p = Protected::new(vec![b"tools/env.sh".to_vec(), b"hooks".to_vec()]);
        assert!(p.covers(b"tools/env.sh"));
        assert!(p.covers(b"hooks/pre-commit"));
        assert!(!p.covers(b"tools/env.sh.bak"));
        assert!(!p.covers(b"hooksx"));
    }

    #[test]
    fn names_resolve_inside_or_not_at_all() {
        let root = Path::new("/r/repo");
        assert_eq!(inside(root, b"", b".husky"), Some(b".husky".to_vec()));
        assert_eq!(inside(root, b"sub", b"../t/x"), Some(b"t/x".to_vec()));
        assert_eq!(inside(root, b"", b"../outside"), None);
        assert_eq!(inside(root, b"", b"/r/repo/h"), Some(b"h".to_vec()));
        assert_eq!(inside(root, b"", b"/r/repository/h"), None);
        assert_eq!(inside(root, b"", b"/etc/passwd"), None);
        assert_eq!(inside(root, b"", b"~/.hooks"), None);
    }

    #[test]
    fn the_walk_finds_what_exists_at_any_depth() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in [
            "a/b/.vscode",
            "tools",
            ".github/workflows",
            "hooks",
            ".git/hooks",
            "big/x/y",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        for f in [
            "a/b/.vscode/tasks.json",
            "a/.envrc",
            "tools/env.sh",
            ".github/workflows/ci.yml",
            "hooks/pre-commit",
            "big/x/y/z",
        ] {
            std::fs::write(r.join(f), "x").unwrap();
        }
        std::os::unix::fs::symlink("tools/env.sh", r.join(".envrc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("big/.envrc")).unwrap();
        let root = std::fs::canonicalize(r).unwrap();
        let dir = std::fs::File::open(&root).unwrap();
        use std::os::fd::AsFd;
        let scan = existing(dir.as_fd(), &root, &[b"hooks".to_vec()]).unwrap();
        let paths: Vec<String> = scan.paths.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                ".github/workflows",
                "a/.envrc",
                "a/b/.vscode",
                "hooks",
                "tools/env.sh"
            ]
        );
        // the symlink's target inside the repo; the one outside is nothing of ours
        assert_eq!(scan.targets, vec![b"tools/env.sh".to_vec()]);
    }

    #[test]
    fn config_keys_and_words() {
        for k in [
            "core.hookspath",
            "core.fsmonitor",
            "filter.lfs.smudge",
            "diff.x.textconv",
            "alias.st",
            "includeif.gitdir:~/w/.path",
            "merge.ours.driver",
        ] {
            assert!(executes(k), "{k}");
        }
        for k in ["user.name", "remote.origin.url", "core.bare"] {
            assert!(!executes(k), "{k}");
        }
        assert_eq!(
            words("!sh ./tools/x.sh --flag $HOME"),
            ["sh", "./tools/x.sh"]
        );
        assert_eq!(words("'hooks dir'"), ["hooks", "dir"]);
    }
}
