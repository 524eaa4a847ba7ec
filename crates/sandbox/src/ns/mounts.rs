//! The parts of the root filesystem that go through [`Sys`] (the real
//! calls, or a recorder in the tests): /dev, the /proc masks and the
//! caller's extra read-only binds, so that what is mounted where is
//! checked without root.

use super::*;

/// What the parts of the root below need from the kernel and the
/// filesystem: the real calls in the sandbox, a recorder in the unit
/// tests, which check what is mounted where without root (the model is
/// youki's `Syscall`).
pub(super) trait Sys {
    fn mount(
        &mut self,
        src: Option<&Path>,
        dst: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SetupError>;
    fn set_attr(&mut self, path: &Path, set: u64, recursive: bool) -> Result<(), SetupError>;
    fn mkdir_p(&mut self, p: &Path) -> Result<(), SetupError>;
    fn touch(&mut self, p: &Path) -> Result<(), SetupError>;
    fn symlink(&mut self, target: &Path, link: &Path) -> Result<(), SetupError>;
    fn exists(&self, p: &Path) -> bool;
    fn is_dir(&self, p: &Path) -> bool;

    /// A recursive bind mount, then `attrs` on it.
    fn bind(&mut self, src: &Path, dst: &Path, attrs: u64) -> Result<(), SetupError> {
        self.mount(
            Some(src),
            dst,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if attrs != 0 {
            self.set_attr(dst, attrs, true)?;
        }
        Ok(())
    }
}

/// The real calls.
pub(super) struct Real;

impl Sys for Real {
    fn mount(
        &mut self,
        src: Option<&Path>,
        dst: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SetupError> {
        do_mount(src, dst, fstype, flags, data)
    }
    fn set_attr(&mut self, path: &Path, set: u64, recursive: bool) -> Result<(), SetupError> {
        set_attr(path, set, recursive)
    }
    fn mkdir_p(&mut self, p: &Path) -> Result<(), SetupError> {
        mkdir_p(p)
    }
    fn touch(&mut self, p: &Path) -> Result<(), SetupError> {
        touch(p)
    }
    fn symlink(&mut self, target: &Path, link: &Path) -> Result<(), SetupError> {
        symlink(target, link)
    }
    fn exists(&self, p: &Path) -> bool {
        p.exists()
    }
    fn is_dir(&self, p: &Path) -> bool {
        p.is_dir()
    }
}

/// The host's device nodes the sandbox sees, each bound nosuid and noexec.
pub(super) const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// /dev: a directory of the (soon read-only) root holding a few device
/// nodes of the host, a private devpts (a new instance: the sandbox's
/// terminals are its own) and /dev/shm from the scratch space.
pub(super) fn build_dev(sys: &mut dyn Sys, dev: &Path, scratch: &Path) -> Result<(), SetupError> {
    sys.mkdir_p(dev)?;
    for n in DEV_NODES {
        let d = dev.join(n);
        sys.touch(&d)?;
        sys.bind(
            &host(&Path::new("/dev").join(n)),
            &d,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        )?;
    }
    let pts = dev.join("pts");
    sys.mkdir_p(&pts)?;
    sys.mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    sys.symlink(Path::new("pts/ptmx"), &dev.join("ptmx"))?;
    let shm = dev.join("shm");
    sys.mkdir_p(&shm)?;
    sys.bind(
        &scratch.join("shm"),
        &shm,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
    )?;
    for (n, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        sys.symlink(Path::new(t), &dev.join(n))?;
    }
    Ok(())
}

/// policy/proc.txt, in order, on the fresh /proc at `proc_`: knobs
/// read-only, revealing files masked with /dev/null, directories emptied.
/// A path this kernel does not have is skipped.
pub(super) fn mask_proc(
    sys: &mut dyn Sys,
    proc_: &Path,
    dev: &Path,
    rules: &[ProcRule],
) -> Result<(), SetupError> {
    let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    for rule in rules {
        match *rule {
            ProcRule::ReadOnly(n) => {
                let path = proc_.join(n);
                if sys.exists(&path) {
                    sys.bind(&path, &path, ro)?;
                }
            }
            ProcRule::Mask(n) => {
                let path = proc_.join(n);
                if sys.exists(&path) {
                    sys.bind(&dev.join("null"), &path, ro)?;
                }
            }
            ProcRule::Empty(n) => {
                let path = proc_.join(n);
                if sys.is_dir(&path) {
                    sys.mount(
                        None,
                        &path,
                        Some("tmpfs"),
                        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                        Some("size=0,mode=0555"),
                    )?;
                    sys.set_attr(&path, ro, false)?;
                }
            }
        }
    }
    Ok(())
}

/// The caller's extra read-only binds (`--ro-bind`), each under the new
/// root whatever its destination says, read-only, nosuid and nodev.
pub(super) fn extra_binds(
    sys: &mut dyn Sys,
    root: &Path,
    binds: &[crate::spec::RoBind],
) -> Result<(), SetupError> {
    let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    for b in binds {
        // the caller checked this; a `..` here would climb out of the new
        // root (to the staging root, or the host's under /oldroot), so
        // the sandbox refuses it too rather than trust every caller
        if !b.dst.is_absolute()
            || b.dst.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            })
        {
            return Err(SetupError::new(
                Layer::Spec,
                format!(
                    "read-only bind destination {}: an absolute path without . or .. is required",
                    b.dst.display()
                ),
            ));
        }
        let dst = root.join(b.dst.strip_prefix("/").unwrap_or(&b.dst));
        if !sys.exists(&dst) {
            // the host's paths are under /oldroot at this point
            if sys.is_dir(&host(&b.src)) {
                sys.mkdir_p(&dst)?;
            } else {
                sys.touch(&dst)?;
            }
        }
        sys.bind(&host(&b.src), &dst, ro)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Records every call; `present` is what exists.
    #[derive(Default)]
    struct Recorder {
        present: BTreeSet<PathBuf>,
        dirs: BTreeSet<PathBuf>,
        ops: Vec<Op>,
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Op {
        Mount {
            src: Option<PathBuf>,
            dst: PathBuf,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        Attr(PathBuf, u64, bool),
        Mkdir(PathBuf),
        Touch(PathBuf),
        Symlink(PathBuf, PathBuf),
    }

    impl Sys for Recorder {
        fn mount(
            &mut self,
            src: Option<&Path>,
            dst: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> Result<(), SetupError> {
            self.ops.push(Op::Mount {
                src: src.map(Path::to_path_buf),
                dst: dst.to_path_buf(),
                fstype: fstype.map(str::to_owned),
                flags,
                data: data.map(str::to_owned),
            });
            Ok(())
        }
        fn set_attr(&mut self, path: &Path, set: u64, recursive: bool) -> Result<(), SetupError> {
            self.ops.push(Op::Attr(path.to_path_buf(), set, recursive));
            Ok(())
        }
        fn mkdir_p(&mut self, p: &Path) -> Result<(), SetupError> {
            self.ops.push(Op::Mkdir(p.to_path_buf()));
            Ok(())
        }
        fn touch(&mut self, p: &Path) -> Result<(), SetupError> {
            self.ops.push(Op::Touch(p.to_path_buf()));
            Ok(())
        }
        fn symlink(&mut self, target: &Path, link: &Path) -> Result<(), SetupError> {
            self.ops
                .push(Op::Symlink(target.to_path_buf(), link.to_path_buf()));
            Ok(())
        }
        fn exists(&self, p: &Path) -> bool {
            self.present.contains(p) || self.dirs.contains(p)
        }
        fn is_dir(&self, p: &Path) -> bool {
            self.dirs.contains(p)
        }
    }

    /// Every bind as (source, destination, attributes set after it).
    fn binds(ops: &[Op]) -> Vec<(PathBuf, PathBuf, u64)> {
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if let Op::Mount {
                src: Some(src),
                dst,
                flags,
                ..
            } = op
            {
                if flags.contains(MsFlags::MS_BIND) {
                    let attrs = match ops.get(i + 1) {
                        Some(Op::Attr(p, a, true)) if p == dst => *a,
                        _ => 0,
                    };
                    out.push((src.clone(), dst.clone(), attrs));
                }
            }
        }
        out
    }

    #[test]
    fn dev_holds_six_host_nodes_nosuid_noexec_and_a_private_devpts() {
        let mut r = Recorder::default();
        build_dev(&mut r, Path::new("/new/dev"), Path::new("/scratch")).unwrap();
        let b = binds(&r.ops);
        let from_host: Vec<&PathBuf> = b
            .iter()
            .filter(|(s, _, _)| s.starts_with("/oldroot"))
            .map(|(s, _, _)| s)
            .collect();
        let want: Vec<PathBuf> = DEV_NODES
            .iter()
            .map(|n| PathBuf::from(format!("/oldroot/dev/{n}")))
            .collect();
        assert_eq!(
            from_host,
            want.iter().collect::<Vec<_>>(),
            "only these from the host"
        );
        for (src, dst, attrs) in &b {
            if src.starts_with("/oldroot") {
                assert_eq!(
                    *attrs,
                    MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                    "{}",
                    dst.display()
                );
                assert_eq!(dst.parent(), Some(Path::new("/new/dev")));
            }
        }
        let devpts = r.ops.iter().find_map(|o| match o {
            Op::Mount {
                fstype: Some(t),
                data,
                flags,
                dst,
                ..
            } if t == "devpts" => Some((data.clone(), *flags, dst.clone())),
            _ => None,
        });
        let (data, flags, dst) = devpts.unwrap_or_else(|| panic!("no devpts: {:?}", r.ops));
        assert!(
            data.unwrap_or_default().contains("newinstance"),
            "the host's terminals stay the host's"
        );
        assert!(flags.contains(MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC));
        assert_eq!(dst, Path::new("/new/dev/pts"));
        assert!(r
            .ops
            .contains(&Op::Symlink("pts/ptmx".into(), "/new/dev/ptmx".into())));
        // /dev/shm is the sandbox's scratch, never the host's
        assert!(b.iter().any(|(s, d, a)| s == Path::new("/scratch/shm")
            && d == Path::new("/new/dev/shm")
            && *a == MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV));
    }

    #[test]
    fn proc_rules_apply_in_order_and_skip_what_this_kernel_lacks() {
        let rules = crate::policy::proc_rules().unwrap();
        let proc_ = Path::new("/new/proc");
        let mut r = Recorder::default();
        // everything exists but the first rule's path
        let mut skipped = None;
        for (i, rule) in rules.iter().enumerate() {
            let (ProcRule::ReadOnly(n) | ProcRule::Mask(n) | ProcRule::Empty(n)) = *rule;
            if i == 0 {
                skipped = Some(proc_.join(n));
                continue;
            }
            match rule {
                ProcRule::Empty(_) => r.dirs.insert(proc_.join(n)),
                _ => r.present.insert(proc_.join(n)),
            };
        }
        mask_proc(&mut r, proc_, Path::new("/new/dev"), &rules).unwrap();
        let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        let b = binds(&r.ops);
        let mut touched = Vec::new();
        for (src, dst, attrs) in &b {
            assert!(dst.starts_with(proc_), "{} is outside /proc", dst.display());
            assert!(
                src == dst || src == Path::new("/new/dev/null"),
                "{} bound from {}",
                dst.display(),
                src.display()
            );
            assert_eq!(*attrs, ro, "{}", dst.display());
            touched.push(dst.clone());
        }
        for o in &r.ops {
            if let Op::Mount {
                fstype: Some(t),
                dst,
                data,
                ..
            } = o
            {
                assert_eq!(t, "tmpfs");
                assert_eq!(data.as_deref(), Some("size=0,mode=0555"));
                touched.push(dst.clone());
            }
        }
        let want: Vec<PathBuf> = rules
            .iter()
            .skip(1)
            .map(|rule| {
                let (ProcRule::ReadOnly(n) | ProcRule::Mask(n) | ProcRule::Empty(n)) = *rule;
                proc_.join(n)
            })
            .collect();
        assert_eq!(touched.len(), want.len());
        for w in &want {
            assert!(touched.contains(w), "{} untouched", w.display());
        }
        let skipped = skipped.unwrap();
        assert!(!touched.contains(&skipped), "a missing path is skipped");
    }

    #[test]
    fn extra_binds_land_under_the_new_root_read_only() {
        let mut r = Recorder::default();
        r.dirs.insert("/oldroot/opt/tool".into());
        let binds_in = [
            crate::spec::RoBind {
                src: "/opt/tool".into(),
                dst: "/opt/tool".into(),
            },
            crate::spec::RoBind {
                src: "/etc/hostname".into(),
                dst: "/etc/agentvm-name".into(),
            },
        ];
        extra_binds(&mut r, Path::new("/new"), &binds_in).unwrap();
        assert!(r.ops.contains(&Op::Mkdir("/new/opt/tool".into())));
        assert!(r.ops.contains(&Op::Touch("/new/etc/agentvm-name".into())));
        let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        let b = binds(&r.ops);
        assert_eq!(b.len(), 2);
        for (src, dst, attrs) in &b {
            assert!(src.starts_with("/oldroot"), "{}", src.display());
            assert!(dst.starts_with("/new"), "{}", dst.display());
            assert_eq!(*attrs, ro);
        }
    }

    /// A destination that climbs (`..`) or is relative is refused by the
    /// sandbox itself, before anything is mounted, whatever the caller
    /// checked: `/../oldroot/etc/passwd` would land on the host's file.
    #[test]
    fn an_extra_bind_that_climbs_out_of_the_root_is_refused() {
        for dst in ["/../oldroot/etc/passwd", "/x/../../etc", "relative"] {
            let mut r = Recorder::default();
            let b = [crate::spec::RoBind {
                src: "/etc/hostname".into(),
                dst: dst.into(),
            }];
            let e = extra_binds(&mut r, Path::new("/new"), &b).unwrap_err();
            assert_eq!(e.layer, Layer::Spec, "{dst}");
            assert!(r.ops.is_empty(), "{dst}: {:?}", r.ops);
        }
    }
}
