//! agentvm-probe: a test tool run *inside* a sandbox that tries one
//! forbidden thing and reports whether it was stopped.
//!
//! Usage: agentvm-probe --host-ns mnt:[N],pid:[N],user:[N] CHECK [ARG]
//!
//! Before any check it compares its own mount, pid and user namespace ids
//! with the host's (passed in by the test) and refuses to go on, exit 99,
//! if any is the same: a broken sandbox fails the test instead of letting
//! the probe mount over the host's /tmp.
//!
//! Prints one JSON line {"check","blocked","detail"}; exit 0 when the
//! attempt was blocked, 1 when it succeeded, 2 on usage errors.

use std::ffi::CString;
use std::io::Write;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn ns_id(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Outcome {
    blocked: bool,
    detail: String,
}

fn blocked(detail: impl Into<String>) -> Outcome {
    Outcome {
        blocked: true,
        detail: detail.into(),
    }
}
fn escaped(detail: impl Into<String>) -> Outcome {
    Outcome {
        blocked: false,
        detail: detail.into(),
    }
}

/// A syscall result: Ok(ret) or Err(errno).
fn sys(r: libc::c_long) -> Result<libc::c_long, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn expect_fail(name: &str, r: Result<libc::c_long, i32>, want: &[i32]) -> Outcome {
    match r {
        Ok(v) => escaped(format!("{name} succeeded ({v})")),
        Err(e) if want.is_empty() || want.contains(&e) => blocked(format!("{name}: errno {e}")),
        Err(e) => escaped(format!("{name} failed with unexpected errno {e}")),
    }
}

fn try_write(path: &str) -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
    {
        Ok(mut f) => match f.write_all(b"agentvm-probe") {
            Ok(()) => Err(format!("wrote {path}")),
            Err(_) => Ok(()),
        },
        Err(_) => Ok(()),
    }
}

fn check(name: &str, arg: Option<&str>) -> Outcome {
    match name {
        "write-outside" => {
            let mut wrote = Vec::new();
            for p in [
                "/probe-file",
                "/usr/probe-file",
                "/usr/bin/probe-file",
                "/etc/probe-file",
                "/etc/passwd",
                "/home/probe-file",
                "/var/probe-file",
                "/opt/probe-file",
                "/dev/probe-file",
                "/proc/sys/vm/drop_caches",
                "/proc/sysrq-trigger",
                "/proc/sys/kernel/hostname",
                "/workspace/.git/probe-file",
            ] {
                if let Err(e) = try_write(p) {
                    wrote.push(e);
                }
            }
            if wrote.is_empty() {
                blocked("every write outside /workspace, /tmp and HOME failed")
            } else {
                escaped(wrote.join("; "))
            }
        }
        "read" => {
            let p = arg.unwrap_or("/nonexistent");
            match std::fs::read(p) {
                Ok(b) => escaped(format!("read {} bytes of {p}", b.len())),
                Err(e) => blocked(format!("{p}: {e}")),
            }
        }
        "connect" => {
            let port: u16 = arg.and_then(|a| a.parse().ok()).unwrap_or(1);
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
                Ok(_) => escaped(format!("connected to {addr}")),
                Err(e) => blocked(format!("{addr}: {e}")),
            }
        }
        "signal-host" => {
            let pid: i32 = arg.and_then(|a| a.parse().ok()).unwrap_or(1);
            // SAFETY: kill with signal 0 only checks permission/existence.
            let r = unsafe { libc::kill(pid, 0) };
            let visible = std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists();
            let count = std::fs::read_dir("/proc")
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                        .count()
                })
                .unwrap_or(0);
            if r == 0 {
                escaped(format!("kill({pid}, 0) succeeded"))
            } else if visible && pid != 1 && pid != 2 {
                escaped(format!("/proc/{pid} is visible"))
            } else {
                blocked(format!(
                    "kill({pid},0): errno {}; {count} processes visible",
                    errno()
                ))
            }
        }
        "mount" => {
            let src = CString::new("tmpfs").unwrap_or_default();
            let dst = CString::new("/tmp").unwrap_or_default();
            // SAFETY: valid NUL-terminated strings; data is null.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            expect_fail(
                "mount tmpfs on /tmp",
                sys(r as libc::c_long),
                &[libc::EPERM],
            )
        }
        "unshare" => {
            for (flag, n) in [
                (libc::CLONE_NEWUSER, "user"),
                (libc::CLONE_NEWNS, "mount"),
                (libc::CLONE_NEWNET, "net"),
                (libc::CLONE_NEWPID, "pid"),
            ] {
                // SAFETY: unshare takes an integer.
                let r = unsafe { libc::unshare(flag) };
                let o = expect_fail(
                    &format!("unshare({n})"),
                    sys(r as libc::c_long),
                    &[libc::EPERM],
                );
                if !o.blocked {
                    return o;
                }
            }
            blocked("unshare of user, mount, net and pid namespaces refused")
        }
        "nested-userns" => {
            // clone() with CLONE_NEWUSER (seccomp checks clone's flags) and
            // clone3 (refused as a whole).
            // SAFETY: raw clone without CLONE_VM behaves like fork; the child
            // exits at once.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if r == 0 {
                // SAFETY: _exit in the child.
                unsafe { libc::_exit(0) }
            }
            let o = expect_fail("clone(CLONE_NEWUSER)", sys(r), &[libc::EPERM]);
            if !o.blocked {
                return o;
            }
            let mut args = [0u64; 11];
            args[0] = libc::CLONE_NEWUSER as u64;
            args[4] = libc::SIGCHLD as u64;
            // SAFETY: args is a valid clone_args of the size passed.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    args.as_mut_ptr(),
                    std::mem::size_of_val(&args),
                )
            };
            if r == 0 {
                // SAFETY: _exit in the child.
                unsafe { libc::_exit(0) }
            }
            expect_fail(
                "clone3(CLONE_NEWUSER)",
                sys(r),
                &[libc::ENOSYS, libc::EPERM],
            )
        }
        "keyctl" => {
            // KEYCTL_GET_KEYRING_ID = 0, KEY_SPEC_SESSION_KEYRING = -3
            // SAFETY: integer arguments only.
            let r = unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i64, 1) };
            let o = expect_fail("keyctl", sys(r), &[libc::EPERM]);
            if !o.blocked {
                return o;
            }
            let t = CString::new("user").unwrap_or_default();
            let d = CString::new("probe").unwrap_or_default();
            // SAFETY: valid strings and a 1-byte payload.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_add_key,
                    t.as_ptr(),
                    d.as_ptr(),
                    b"x".as_ptr(),
                    1usize,
                    -3i64,
                )
            };
            expect_fail("add_key", sys(r), &[libc::EPERM])
        }
        "bpf" => {
            let attr = [0u8; 128];
            // SAFETY: BPF_MAP_CREATE reads `attr` of the size passed.
            let r = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
            expect_fail("bpf", sys(r), &[libc::EPERM])
        }
        "io_uring" => {
            let params = [0u8; 120];
            // SAFETY: io_uring_setup reads/writes `params` of its fixed size.
            let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_ptr()) };
            expect_fail("io_uring_setup", sys(r), &[libc::EPERM])
        }
        "perf" => {
            let attr = [0u8; 128];
            // SAFETY: perf_event_open reads `attr`.
            let r =
                unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
            expect_fail("perf_event_open", sys(r), &[libc::EPERM])
        }
        "userfaultfd" => {
            // SAFETY: integer argument.
            let r = unsafe { libc::syscall(libc::SYS_userfaultfd, 0) };
            expect_fail("userfaultfd", sys(r), &[libc::EPERM])
        }
        "x32" => {
            // SAFETY: an x32 getpid number; no arguments.
            let r = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
            expect_fail("x32 getpid", sys(r), &[libc::ENOSYS])
        }
        "socket-families" => {
            // what must fail: families no namespace isolates, and netlink
            // families beyond routing and diagnostics
            let mut got = Vec::new();
            for (name, fam, proto) in [
                ("AF_VSOCK", libc::AF_VSOCK, 0),
                ("AF_PACKET", libc::AF_PACKET, 0),
                ("AF_BLUETOOTH", libc::AF_BLUETOOTH, 0),
                ("AF_ALG", libc::AF_ALG, 0),
                ("AF_KEY", libc::AF_KEY, 0),
                ("AF_TIPC", libc::AF_TIPC, 0),
                ("AF_RDS", libc::AF_RDS, 0),
                ("AF_CAN", libc::AF_CAN, 0),
                ("AF_XDP", libc::AF_XDP, 0),
                (
                    "NETLINK_KOBJECT_UEVENT",
                    libc::AF_NETLINK,
                    libc::NETLINK_KOBJECT_UEVENT,
                ),
                ("NETLINK_AUDIT", libc::AF_NETLINK, libc::NETLINK_AUDIT),
                (
                    "NETLINK_NETFILTER",
                    libc::AF_NETLINK,
                    libc::NETLINK_NETFILTER,
                ),
            ] {
                let ty = if fam == libc::AF_NETLINK {
                    libc::SOCK_RAW
                } else {
                    libc::SOCK_STREAM
                };
                // SAFETY: socket with integer arguments.
                let fd = unsafe { libc::socket(fam, ty, proto) };
                if fd >= 0 {
                    got.push(format!("{name} opened"));
                    // SAFETY: closing what we opened.
                    unsafe { libc::close(fd) };
                } else if errno() != libc::EAFNOSUPPORT {
                    // refused by something else than the filter
                    got.push(format!("{name}: errno {}", errno()));
                }
            }
            // SAFETY: socketpair writes two descriptors into the array.
            let mut sv = [0i32; 2];
            if unsafe { libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) }
                == 0
                || errno() != libc::EAFNOSUPPORT
            {
                got.push(format!("socketpair(AF_INET): errno {}", errno()));
            }
            // what must keep working
            for (name, fam, ty, proto) in [
                ("AF_UNIX", libc::AF_UNIX, libc::SOCK_STREAM, 0),
                ("AF_INET", libc::AF_INET, libc::SOCK_STREAM, 0),
                ("AF_INET6", libc::AF_INET6, libc::SOCK_DGRAM, 0),
                (
                    "NETLINK_ROUTE",
                    libc::AF_NETLINK,
                    libc::SOCK_RAW,
                    libc::NETLINK_ROUTE,
                ),
            ] {
                // SAFETY: socket with integer arguments.
                let fd = unsafe { libc::socket(fam, ty, proto) };
                if fd < 0 {
                    got.push(format!("{name} refused (errno {}): too strict", errno()));
                } else {
                    // SAFETY: closing what we opened.
                    unsafe { libc::close(fd) };
                }
            }
            if got.is_empty() {
                blocked("every listed family refused with EAFNOSUPPORT; unix, inet, inet6, netlink route work")
            } else {
                escaped(got.join("; "))
            }
        }
        "host-info" => {
            // what the host's command line and kernel say about it
            let marker = arg.unwrap_or("\u{0}");
            let mut got = Vec::new();
            let init = std::fs::read("/proc/1/cmdline").unwrap_or_default();
            if init.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                got.push(format!("/proc/1/cmdline names {marker}"));
            }
            if init != b"agentvm-init" && !init.starts_with(b"agentvm-init\0") {
                got.push(format!(
                    "/proc/1/cmdline is {:?}",
                    String::from_utf8_lossy(&init)
                ));
            }
            for f in [
                "/proc/cmdline",
                "/proc/config.gz",
                "/proc/sys/kernel/random/boot_id",
            ] {
                if std::fs::read(f).is_ok_and(|b| !b.is_empty()) {
                    got.push(format!("{f} is readable"));
                }
            }
            if got.is_empty() {
                blocked("init shows as agentvm-init; the kernel's cmdline, config and boot id read empty")
            } else {
                escaped(got.join("; "))
            }
        }
        "modify_ldt" => {
            let mut buf = [0u8; 16];
            // SAFETY: modify_ldt(0 = read) into a buffer we own.
            let r = unsafe { libc::syscall(libc::SYS_modify_ldt, 0, buf.as_mut_ptr(), buf.len()) };
            expect_fail("modify_ldt", sys(r), &[libc::EPERM])
        }
        "tiocsti" => {
            let c = b'x';
            // SAFETY: TIOCSTI reads one byte.
            let r = unsafe { libc::ioctl(0, libc::TIOCSTI, &c as *const u8) };
            expect_fail("ioctl(TIOCSTI)", sys(r as libc::c_long), &[libc::EPERM])
        }
        "terminal" => {
            // With --tty: 0, 1 and 2 are a terminal of the sandbox's own
            // devpts (not the host's, whose device is ARG), the command
            // leads its session, no descriptor reaches a host terminal,
            // and TIOCSTI is refused on its own terminal too.
            let host_pts: u64 = arg.and_then(|a| a.parse().ok()).unwrap_or(u64::MAX);
            let dev_of = |fd: i32| {
                // SAFETY: fstat into a zeroed stat we own.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_mode))
            };
            for fd in 0..3 {
                // SAFETY: isatty on a descriptor number.
                if unsafe { libc::isatty(fd) } != 1 {
                    return escaped(format!("fd {fd} is not a terminal"));
                }
            }
            let mut host_terms = Vec::new();
            for e in std::fs::read_dir("/proc/self/fd")
                .into_iter()
                .flatten()
                .flatten()
            {
                let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Some((dev, mode)) = dev_of(fd) {
                    if mode & libc::S_IFMT == libc::S_IFCHR && dev == host_pts {
                        host_terms.push(fd);
                    }
                }
            }
            if !host_terms.is_empty() {
                return escaped(format!(
                    "descriptors {host_terms:?} are terminals of the host"
                ));
            }
            // SAFETY: getsid and getpid take no pointers.
            let (sid, pid) = unsafe { (libc::getsid(0), libc::getpid()) };
            if sid != pid {
                return escaped(format!("not a session leader (sid {sid}, pid {pid})"));
            }
            let c = b'x';
            // SAFETY: TIOCSTI reads one byte.
            let r = unsafe { libc::ioctl(0, libc::TIOCSTI, &c as *const u8) };
            if r == 0 {
                return escaped("TIOCSTI worked on the sandbox's terminal");
            }
            blocked(format!(
                "own terminal {}, session leader, TIOCSTI errno {}",
                std::fs::read_link("/proc/self/fd/0")
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                errno()
            ))
        }
        "init" => {
            // The sandbox's init holds the channel to the host: it must be
            // out of reach.
            let mut leaks = Vec::new();
            for p in [
                "/proc/1/fd/3",
                "/proc/1/environ",
                "/proc/1/mem",
                "/proc/1/root/etc/hostname",
            ] {
                if std::fs::read(p).is_ok() {
                    leaks.push(p);
                }
            }
            if std::fs::read_dir("/proc/1/fd").is_ok() {
                leaks.push("/proc/1/fd");
            }
            // SAFETY: PTRACE_ATTACH on pid 1 with null pointers.
            let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize) };
            if r == 0 {
                leaks.push("ptrace(ATTACH, 1)");
            }
            // SAFETY: signal 0 probes permission only.
            if unsafe { libc::kill(1, libc::SIGKILL) } == 0
                && std::path::Path::new("/proc/1").exists()
            {
                // init ignores it; the landlock scope should refuse it first
            }
            if leaks.is_empty() {
                blocked("init's descriptors, memory and environment are unreachable")
            } else {
                escaped(leaks.join(", "))
            }
        }
        "status" => {
            let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let get = |k: &str| {
                s.lines()
                    .find(|l| l.starts_with(&format!("{k}:")))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
                    .unwrap_or_default()
            };
            let want = [
                ("CapInh", "0000000000000000"),
                ("CapPrm", "0000000000000000"),
                ("CapEff", "0000000000000000"),
                ("CapBnd", "0000000000000000"),
                ("CapAmb", "0000000000000000"),
                ("NoNewPrivs", "1"),
                ("Seccomp", "2"),
            ];
            let bad: Vec<String> = want
                .iter()
                .filter(|(k, v)| get(k) != *v)
                .map(|(k, v)| format!("{k}={} (want {v})", get(k)))
                .collect();
            if bad.is_empty() {
                blocked("CapEff 0, bounding set empty, NoNewPrivs 1, Seccomp 2")
            } else {
                escaped(bad.join(", "))
            }
        }
        "forkbomb" => {
            let mut n = 0u32;
            loop {
                // SAFETY: fork in a single-threaded process; the child only
                // sleeps and exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: sleep and _exit are async-signal-safe.
                    unsafe {
                        libc::sleep(20);
                        libc::_exit(0);
                    }
                }
                if pid < 0 {
                    return blocked(format!("fork failed after {n} children: errno {}", errno()));
                }
                n += 1;
                if n >= 5000 {
                    return escaped("forked 5000 children");
                }
            }
        }
        "memhog" => {
            let mut v: Vec<Vec<u8>> = Vec::new();
            for _ in 0..128 {
                v.push(vec![1u8; 16 << 20]);
            }
            escaped(format!("allocated {} MiB", v.len() * 16))
        }
        "diskfill" => {
            let mut f = match std::fs::File::create("/tmp/fill") {
                Ok(f) => f,
                Err(e) => return escaped(format!("cannot create /tmp/fill: {e}")),
            };
            let chunk = vec![7u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match f.write(&chunk) {
                    Ok(0) => return escaped("write returned 0"),
                    Ok(n) => total += n as u64,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        return blocked(format!("ENOSPC after {total} bytes"))
                    }
                    Err(e) => return escaped(format!("unexpected error after {total} bytes: {e}")),
                }
                if total > (4u64 << 30) {
                    return escaped("wrote 4 GiB");
                }
            }
        }
        "env" => {
            let k = arg.unwrap_or("AGENTVM_PROBE_SECRET");
            match std::env::var_os(k) {
                Some(_) => escaped(format!("{k} is set inside")),
                None => blocked(format!("{k} is not set")),
            }
        }
        _ => {
            eprintln!("agentvm-probe: unknown check {name}");
            std::process::exit(2)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 || args[1] != "--host-ns" {
        eprintln!("usage: agentvm-probe --host-ns mnt:[N],pid:[N],user:[N] CHECK [ARG]");
        std::process::exit(2);
    }
    // Refuse to attack anything unless we are provably inside a sandbox.
    let host: Vec<&str> = args[2].split(',').collect();
    for kind in ["mnt", "pid", "user"] {
        let mine = ns_id(kind);
        let theirs = host.iter().find(|h| h.starts_with(&format!("{kind}:")));
        match theirs {
            Some(t) if *t != mine && !mine.is_empty() => {}
            _ => {
                println!(
                    r#"{{"check":"{}","blocked":false,"detail":"NOT SANDBOXED: {kind} namespace {mine} matches the host's"}}"#,
                    args[3]
                );
                std::process::exit(99);
            }
        }
    }
    let o = check(&args[3], args.get(4).map(String::as_str));
    let line = serde_json::json!({"check": args[3], "blocked": o.blocked, "detail": o.detail});
    println!("{line}");
    std::process::exit(if o.blocked { 0 } else { 1 });
}
