//! The root filesystem: a read-only minimal root, the copy-on-write
//! /workspace, a fresh /proc with its masks (policy/proc.txt), /dev, /etc
//! from the allowlist, and the extra binds, then pivot_root into it.

use super::*;

pub(super) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Clone `repo` as a detached mount whose owner (uid and gid of the repo
/// directory) appears as `to`, i.e. root inside the sandbox. Needs the
/// host's root; `None` where the kernel or the filesystem cannot do it (the
/// repo is then bound as it is).
pub(super) fn idmapped_tree(repo: &Path, repo_fd: Option<RawFd>, to: u32) -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    // the caller's descriptor when there is one (the directory it vetted),
    // else the path
    let (uid, gid) = match repo_fd {
        Some(fd) => {
            let st = nix::sys::stat::fstat(fd).ok()?;
            (st.st_uid, st.st_gid)
        }
        None => {
            let md = std::fs::metadata(repo).ok()?;
            (md.uid(), md.gid())
        }
    };
    let userns = helper_userns(uid, gid, to)?;
    let path = CString::new(repo.as_os_str().as_bytes()).ok()?;
    let (dirfd, name, extra) = match repo_fd {
        Some(fd) => (fd, c"".as_ptr(), libc::AT_EMPTY_PATH as libc::c_uint),
        None => (libc::AT_FDCWD, path.as_ptr(), 0),
    };
    // SAFETY: open_tree with a valid descriptor and a NUL-terminated path;
    // returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dirfd,
            name,
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint | extra,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: empty NUL-terminated path with AT_EMPTY_PATH on our fd; attr
    // is a valid mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    (r == 0).then_some(tree)
}

/// A user namespace whose only mapping is `uid`/`gid` -> `to`, used as
/// the idmapping of a mount. Its one process is gone when this returns.
pub(super) fn helper_userns(uid: u32, gid: u32, to: u32) -> Option<OwnedFd> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    let pid = clone_into(libc::CLONE_NEWUSER as u64).ok()?;
    if pid == 0 {
        drop(wr);
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(rd.as_raw_fd(), &mut b);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(0) }
    }
    drop(rd);
    let ns = (|| {
        write_map(pid, "uid_map", &format!("{uid} {to} 1")).ok()?;
        write_map(pid, "gid_map", &format!("{gid} {to} 1")).ok()?;
        std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .ok()
            .map(OwnedFd::from)
    })();
    drop(wr);
    let _ = waitpid(Pid::from_raw(pid), None);
    ns
}

/// A detached clone of the directory `fd` (a mount of its own, to move
/// into another mount namespace); `path` names it in errors.
pub(super) fn clone_tree(fd: RawFd, path: &Path) -> Result<OwnedFd, SetupError> {
    clone_tree_for(fd, || {
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        format!("cloning the workspace layer {id}")
    })
}

fn clone_tree_for(fd: RawFd, what: impl Fn() -> String) -> Result<OwnedFd, SetupError> {
    // SAFETY: open_tree on a descriptor with an empty NUL-terminated path;
    // returns a new fd or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd,
            c"".as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as u32)
                as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            what(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as RawFd) })
}

pub(super) fn move_mount(tree: &OwnedFd, dst: &Path) -> Result<(), SetupError> {
    let c = CString::new(dst.as_os_str().as_bytes())
        .map_err(|_| SetupError::new(Layer::Mounts, "path contains a NUL byte"))?;
    // SAFETY: both paths are NUL-terminated; the fd is ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            format!("attaching the repo at {}", dst.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Make `rel` (beneath the directory `base`) read-only: resolved without
/// following any symlink or leaving `base`, cloned as a detached mount,
/// made read-only, and attached over itself. A path that is not there,
/// or not a plain file or directory, is skipped.
pub(super) fn bind_ro_beneath(base: &OwnedFd, rel: &Path) -> Result<(), SetupError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd = match nix::fcntl::openat2(base.as_raw_fd(), rel, how) {
        Ok(fd) => fd,
        Err(
            nix::errno::Errno::ENOENT
            | nix::errno::Errno::ELOOP
            | nix::errno::Errno::ENOTDIR
            | nix::errno::Errno::EXDEV,
        ) => return Ok(()),
        Err(e) => {
            return Err(SetupError::os(
                Layer::Mounts,
                format!("opening /workspace/{}", rel.display()),
                e,
            ))
        }
    };
    // SAFETY: openat2 just returned this descriptor; we own it.
    let target = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(target.as_raw_fd()).map_err(os(
        Layer::Mounts,
        format!("checking /workspace/{}", rel.display()),
    ))?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFDIR && fmt != libc::S_IFREG {
        return Ok(());
    }
    let what = || format!("making /workspace/{} read-only", rel.display());
    let tree = clone_tree_for(target.as_raw_fd(), what)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: empty path with AT_EMPTY_PATH on our fd; attr is a valid
    // mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            what(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors are ours; empty paths with the EMPTY_PATH
    // flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            (libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH) as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Mounts,
            what(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

pub(super) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(super) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(super) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(super) const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
pub(super) struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Set attributes on the mount at `path` (and everything below it when
/// `recursive`), leaving every other attribute alone; this keeps the
/// flags the kernel locked on mounts we inherited.
pub(super) fn set_attr(path: &Path, set: u64, recursive: bool) -> Result<(), SetupError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SetupError::new(Layer::Mounts, "path contains a NUL byte"))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: the path is NUL-terminated and `attr` is a valid mount_attr
    // of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::ENOSYS) {
            " (mount_setattr needs Linux 5.12 or later)"
        } else {
            ""
        };
        return Err(SetupError::os(
            Layer::Mounts,
            format!("making {} read-only", path.display()),
            format!("{e}{hint}"),
        ));
    }
    Ok(())
}

pub(super) fn do_mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SetupError> {
    mount(src, dst, fstype, flags, data).map_err(|e| {
        SetupError::os(
            Layer::Mounts,
            format!(
                "mounting {} on {}",
                src.map(|s| s.display().to_string())
                    .unwrap_or_else(|| fstype.unwrap_or("?").to_string()),
                dst.display()
            ),
            e,
        )
    })
}

pub(super) fn bind(src: &Path, dst: &Path, attrs: u64) -> Result<(), SetupError> {
    do_mount(
        Some(src),
        dst,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    if attrs != 0 {
        set_attr(dst, attrs, true)?;
    }
    Ok(())
}

pub(super) fn mkdir_p(p: &Path) -> Result<(), SetupError> {
    std::fs::create_dir_all(p)
        .map_err(|e| SetupError::os(Layer::Mounts, format!("creating {}", p.display()), e))
}

pub(super) fn touch(p: &Path) -> Result<(), SetupError> {
    if let Some(d) = p.parent() {
        mkdir_p(d)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(|_| ())
        .map_err(|e| SetupError::os(Layer::Mounts, format!("creating {}", p.display()), e))
}

pub(super) fn symlink(target: &Path, link: &Path) -> Result<(), SetupError> {
    if let Some(d) = link.parent() {
        mkdir_p(d)?;
    }
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| SetupError::os(Layer::Mounts, format!("linking {}", link.display()), e))
}

pub(super) fn chmod(p: &Path, mode: u32) -> Result<(), SetupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SetupError::os(Layer::Mounts, format!("chmod {}", p.display()), e))
}

/// The host path `p` as seen from the staging root (where the host's root
/// is mounted at /oldroot).
pub(super) fn host(p: &Path) -> PathBuf {
    Path::new("/oldroot").join(p.strip_prefix("/").unwrap_or(p))
}

/// Layers (newest first) placed read-only at PREFIX.0, PREFIX.1, ...: each
/// moved from its detached clone (root), or bound from the descriptor the
/// caller opened, reopened here and checked to be that very directory
/// (rootless). Returns overlayfs's lowerdir list of them.
fn place_layers(
    prefix: &str,
    layers: &[crate::spec::StackLayer],
    trees: &[OwnedFd],
    ro: u64,
    what: &str,
) -> Result<String, SetupError> {
    if layers.len() > crate::spec::MAX_STACK {
        return Err(SetupError::new(
            Layer::Mounts,
            format!(
                "{} {what}s; at most {}",
                layers.len(),
                crate::spec::MAX_STACK
            ),
        ));
    }
    let mut lowers = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let at = PathBuf::from(format!("{prefix}.{i}"));
        mkdir_p(&at)?;
        // the layer's id: where the caller keeps layers is not the
        // command's to know
        let lname = l
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let named =
            |e: SetupError| SetupError::new(Layer::Mounts, format!("the {what} {lname}: {e}"));
        if let Some(tree) = trees.get(i) {
            move_mount(tree, &at).map_err(named)?;
            set_attr(&at, ro, true).map_err(named)?;
        } else {
            let opened = nix::fcntl::open(
                &host(&l.path),
                nix::fcntl::OFlag::O_PATH
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(os(Layer::Mounts, format!("opening the {what} {lname}")))?;
            // SAFETY: open just returned this descriptor; we own it.
            let opened = unsafe { OwnedFd::from_raw_fd(opened) };
            let a = nix::sys::stat::fstat(l.fd).map_err(os(Layer::Mounts, "checking a layer"))?;
            let b = nix::sys::stat::fstat(opened.as_raw_fd())
                .map_err(os(Layer::Mounts, "checking a layer"))?;
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
                return Err(SetupError::new(
                    Layer::Mounts,
                    format!("the {what} {lname} was replaced while the sandbox was being set up"),
                ));
            }
            let via = PathBuf::from(format!("/oldroot/proc/self/fd/{}", opened.as_raw_fd()));
            bind(&via, &at, ro).map_err(named)?;
        }
        lowers.push(at.display().to_string());
    }
    Ok(lowers.join(":"))
}

/// The most top-level entries of an image's / that are shown.
const IMAGE_TOP_MAX: usize = 256;

/// Top-level names of an image that are the sandbox's own, never the
/// image's: laid over it exactly as over the host's system directories.
const OWN_TOP: [&str; 7] = ["etc", "proc", "dev", "sys", "tmp", "home", "workspace"];

/// The image's layers, stacked read-only at /image (staging), shown in
/// the new root: each top-level directory bound read-only, each top-level
/// symlink made again, and /etc the image's with the sandbox's own passwd,
/// group, hostname and hosts over it.
fn image_root(p: &Prepared, root: &Path, ro: u64) -> Result<(), SetupError> {
    let lowers = place_layers("/img", &p.spec.image, &p.image_trees, ro, "image layer")?;
    let image = Path::new("/image");
    mkdir_p(image)?;
    // one layer: bound as it is; more: overlayfs (which needs two at least
    // as lowers of a read-only mount)
    if p.spec.image.len() == 1 {
        bind(Path::new("/img.0"), image, ro)?;
    } else {
        do_mount(
            Some(Path::new("overlay")),
            image,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
            Some(&format!("lowerdir={lowers},userxattr")),
        )?;
    }
    let entries = std::fs::read_dir(image)
        .map_err(|e| SetupError::os(Layer::Mounts, "reading the image's root", e))?;
    for (n, e) in entries.enumerate() {
        // a mount per entry: an image's / holds a few dozen at most
        if n >= IMAGE_TOP_MAX {
            return Err(SetupError::new(
                Layer::Mounts,
                format!(
                    "the image's / holds more than {IMAGE_TOP_MAX} entries; not a root filesystem"
                ),
            ));
        }
        let e = e.map_err(|e| SetupError::os(Layer::Mounts, "reading the image's root", e))?;
        let name = e.file_name();
        if OWN_TOP.iter().any(|o| name.as_bytes() == o.as_bytes()) {
            continue;
        }
        let src = image.join(&name);
        let dst = root.join(&name);
        let ft = e
            .file_type()
            .map_err(|e| SetupError::os(Layer::Mounts, format!("reading {}", src.display()), e))?;
        if ft.is_symlink() {
            let t = std::fs::read_link(&src).map_err(|e| {
                SetupError::os(Layer::Mounts, format!("reading {}", src.display()), e)
            })?;
            symlink(&t, &dst)?;
        } else if ft.is_dir() {
            mkdir_p(&dst)?;
            bind(&src, &dst, ro)?;
        }
        // a top-level file (rare) is not shown
    }
    // /etc: the sandbox's own files over the image's
    let own = Path::new("/etc-own");
    mkdir_p(own)?;
    for (name, text) in crate::etc::synthesized(p.spec.user.as_ref()) {
        std::fs::write(own.join(name), text)
            .map_err(|e| SetupError::os(Layer::Mounts, format!("writing /etc/{name}"), e))?;
    }
    if p.spec.network == Network::Host {
        if let Ok(r) = std::fs::read(host(Path::new("/etc/resolv.conf"))) {
            let _ = std::fs::write(own.join("resolv.conf"), r);
        }
    }
    let etc = root.join("etc");
    mkdir_p(&etc)?;
    // Not `is_dir()`: it follows a symlink, and here, before the pivot,
    // `etc -> /oldroot/...` (or `../oldroot/...`) names a host directory,
    // which the overlay below would then show as /etc. The image is a
    // read-only mount of ours, so what lstat sees is what overlayfs gets;
    // an etc that is not a directory is not shown at all.
    let image_etc = std::fs::symlink_metadata(image.join("etc")).is_ok_and(|m| m.is_dir());
    if image_etc {
        do_mount(
            Some(Path::new("overlay")),
            &etc,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
            Some(&format!(
                "lowerdir={}:{},userxattr",
                own.display(),
                image.join("etc").display()
            )),
        )?;
    } else {
        bind(own, &etc, ro)?;
    }
    Ok(())
}

/// Build the sandbox's root and pivot into it. Returns the overlay's upper
/// directory (and the base it lies over), which the supervisor reads the
/// changes from.
pub(super) fn build_root(p: &Prepared) -> Result<Built, SetupError> {
    let spec = p.spec;
    let none: Option<&Path> = None;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // Nothing we do here may propagate back to the host.
    do_mount(
        none,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;

    // A staging tmpfs becomes the root for a moment; the host's root stays
    // reachable at /oldroot so every bind source is read by its host path.
    let stage = Path::new("/tmp");
    do_mount(
        none,
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700,size=64k"),
    )?;
    mkdir_p(&stage.join("oldroot"))?;
    chdir(stage).map_err(os(Layer::Mounts, "chdir to the staging root"))?;
    pivot_root(".", "oldroot").map_err(os(Layer::Mounts, "pivot_root into the staging root"))?;
    chdir("/").map_err(os(Layer::Mounts, "chdir /"))?;

    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // The new root: read-only once built.
    let root = Path::new("/newroot");
    mkdir_p(root)?;
    do_mount(
        none,
        root,
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=0755,size=16m"),
    )?;
    // The scratch tmpfs holds everything the sandbox may write; its size is
    // the disk limit.
    let scratch = Path::new("/scratch");
    mkdir_p(scratch)?;
    let data = format!("mode=0755,size={}", spec.limits.disk.max(4096));
    do_mount(none, scratch, Some("tmpfs"), nosuid_nodev, Some(&data))?;
    for (d, mode) in [
        ("upper", 0o755),
        ("work", 0o700),
        ("tmp", 0o1777),
        ("home", 0o700),
        ("shm", 0o1777),
    ] {
        mkdir_p(&scratch.join(d))?;
        chmod(&scratch.join(d), mode)?;
    }

    let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if spec.image.is_empty() {
        // System directories, read-only (or the same symlinks the host has).
        for d in &p.system_dirs {
            match d {
                SystemDir::Symlink(name, target) => symlink(target, &root.join(name))?,
                SystemDir::Bind(name) => {
                    let dst = root.join(name);
                    mkdir_p(&dst)?;
                    bind(&host(Path::new("/").join(name).as_path()), &dst, ro)?;
                }
            }
        }
        // /etc: the prepared allowlist view, with a few host directories on top.
        let etc = root.join("etc");
        mkdir_p(&etc)?;
        bind(&host(&p.etc.dir), &etc, ro)?;
        for name in &p.etc.bind_dirs {
            bind(&host(&Path::new("/etc").join(name)), &etc.join(name), ro)?;
        }
    } else {
        image_root(p, root, ro)?;
    }

    // Writable areas, all on the scratch tmpfs.
    let tmp = root.join("tmp");
    mkdir_p(&tmp)?;
    bind(&scratch.join("tmp"), &tmp, 0)?;
    let home = root.join(HOME_DIR.trim_start_matches('/'));
    mkdir_p(&home)?;
    bind(&scratch.join("home"), &home, 0)?;

    // /workspace: overlay of the repo (read-only lower) and the scratch upper.
    let lower = Path::new("/lower");
    mkdir_p(lower)?;
    if let Some(tree) = &p.repo_tree {
        move_mount(tree, lower)?;
    } else if let Some(repo) = &spec.repo {
        // Reopen the repo inside this namespace, check it is the directory
        // the caller vetted, and bind from the open descriptor: nothing can
        // be swapped between the check and the mount.
        let opened = nix::fcntl::open(
            &host(repo),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(os(
            Layer::Mounts,
            format!("opening the repo {}", repo.display()),
        ))?;
        // SAFETY: open just returned this descriptor; we own it.
        let opened = unsafe { OwnedFd::from_raw_fd(opened) };
        if let Some(fd) = spec.repo_fd {
            let a = nix::sys::stat::fstat(fd)
                .map_err(os(Layer::Mounts, "checking the repo descriptor"))?;
            let b = nix::sys::stat::fstat(opened.as_raw_fd())
                .map_err(os(Layer::Mounts, "checking the repo"))?;
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
                return Err(SetupError::new(
                    Layer::Mounts,
                    format!(
                        "the repo {} was replaced while the sandbox was being set up",
                        repo.display()
                    ),
                ));
            }
        }
        let via = PathBuf::from(format!("/oldroot/proc/self/fd/{}", opened.as_raw_fd()));
        bind(&via, lower, ro)?;
    }
    // A workspace's layers over the repo, newest first, each bound from
    // the descriptor the caller opened (without following a symlink): the
    // layer store is the caller's, not the sandbox's user's to walk.
    let mut lowers = place_layers("/lower", &spec.stack, &p.stack_trees, ro, "workspace layer")?;
    if !lowers.is_empty() {
        lowers.push(':');
    }
    lowers.push_str("/lower");
    let ws = root.join(WORKSPACE_DIR.trim_start_matches('/'));
    mkdir_p(&ws)?;
    do_mount(
        Some(Path::new("overlay")),
        &ws,
        Some("overlay"),
        nosuid_nodev,
        Some(&format!(
            "lowerdir={lowers},upperdir=/scratch/upper,workdir=/scratch/work,userxattr"
        )),
    )?;
    // What /workspace showed before the command ran, for the supervisor
    // to diff against: the layers and the repo alone, read-only.
    let base = if spec.stack.is_empty() {
        None
    } else {
        let b = Path::new("/base");
        mkdir_p(b)?;
        do_mount(
            Some(Path::new("overlay")),
            b,
            Some("overlay"),
            nosuid_nodev | MsFlags::MS_RDONLY,
            Some(&format!("lowerdir={lowers},userxattr")),
        )?;
        let fd = nix::fcntl::open(
            b,
            nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(os(Layer::Mounts, "opening the workspace's base"))?;
        // SAFETY: open just returned this descriptor; we own it.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // What a shell, an editor, git or CI would run later: read-only inside
    // (new files can still be made, but apply refuses to carry them out).
    if !spec.protected.is_empty() {
        let wsfd = nix::fcntl::open(
            &ws,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(os(Layer::Mounts, "opening /workspace"))?;
        // SAFETY: open just returned this descriptor; we own it.
        let wsfd = unsafe { OwnedFd::from_raw_fd(wsfd) };
        for rel in &spec.protected {
            bind_ro_beneath(&wsfd, rel)?;
        }
    }
    // The repo's own git directory is read-only inside.
    let git = ws.join(".git");
    if let Ok(md) = std::fs::symlink_metadata(&git) {
        if md.is_dir() || md.is_file() {
            bind(&git, &git, ro)?;
        }
    }

    let mut sys = Real;
    let dev = root.join("dev");
    build_dev(&mut sys, &dev, scratch)?;
    // A fresh /proc for the new pid namespace, with the kernel's knobs
    // read-only and its most revealing files masked.
    let proc_ = root.join("proc");
    mkdir_p(&proc_)?;
    do_mount(
        Some(Path::new("proc")),
        &proc_,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    mask_proc(&mut sys, &proc_, &dev, &p.proc_rules)?;

    // The egress proxy's socket, the sandbox's only way out.
    if spec.network == Network::Proxied {
        let sock = spec
            .proxy_socket
            .as_ref()
            .ok_or_else(|| SetupError::new(Layer::Network, "allow mode without a proxy socket"))?;
        let dst = root.join(PROXY_SOCKET.trim_start_matches('/'));
        touch(&dst)?;
        bind(
            &host(sock),
            &dst,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )?;
    }

    extra_binds(&mut sys, root, &spec.ro_binds)?;

    // The upper directory, for the supervisor.
    let upper = nix::fcntl::open(
        "/scratch/upper",
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(os(Layer::Mounts, "opening the upper directory"))?;
    // SAFETY: open just returned this descriptor; we own it.
    let upper = unsafe { OwnedFd::from_raw_fd(upper) };

    // Into the new root; the staging root (and the host's) goes away.
    chdir(root).map_err(os(Layer::Mounts, "chdir to the new root"))?;
    pivot_root(".", ".").map_err(os(Layer::Mounts, "pivot_root into the new root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(os(Layer::Mounts, "detaching the host's root"))?;
    chdir("/").map_err(os(Layer::Mounts, "chdir /"))?;
    set_attr(Path::new("/"), ro, false)?;
    Ok(Built { upper, base })
}

/// What the supervisor reads the changes from once the command is done.
pub(super) struct Built {
    /// The overlay's upper directory.
    pub upper: OwnedFd,
    /// With a workspace's layers: /workspace as it was before, read-only.
    pub base: Option<OwnedFd>,
}
