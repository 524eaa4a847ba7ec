//! The bridge: inside the sandbox's network namespace, the egress proxy's
//! host socket is reached at a loopback TCP address.

use super::*;

/// Fork the bridge: a loopback listener inside the sandbox that forwards
/// every connection to the proxy's socket. It is confined like the command
/// (no capabilities, no_new_privs, seccomp) and dies with init. Returns
/// once it listens.
pub(super) fn start_bridge(p: &Prepared) -> Result<(), SetupError> {
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(os(Layer::Network, "pipe2"))?;
    // SAFETY: fork in a single-threaded process (init).
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SetupError::os(
            Layer::Network,
            "forking the proxy bridge",
            e,
        )),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            // nothing of init's: not its channel to the supervisor, not
            // the caller's console socket
            crate::fds::close_all_but(&[wr.as_raw_fd()]);
            let code = match bridge_main(p, wr) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(code) }
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(wr);
            let mut b = [0u8; 1];
            match nix::unistd::read(rd.as_raw_fd(), &mut b) {
                Ok(1) => Ok(()),
                _ => Err(SetupError::new(
                    Layer::Network,
                    format!("the proxy bridge could not listen on {PROXY_ADDR}"),
                )),
            }
        }
    }
}

pub(super) fn bridge_main(p: &Prepared, ready: OwnedFd) -> Result<(), SetupError> {
    use std::os::unix::net::UnixStream;
    let l = std::net::TcpListener::bind(PROXY_ADDR)
        .map_err(|e| SetupError::os(Layer::Network, PROXY_ADDR, e))?;
    caps::no_new_privs()?;
    caps::drop_all(p.last_cap)?;
    if let Some(f) = &p.filters {
        seccomp::install(f)?;
    }
    let _ = nix::unistd::write(&ready, b"1");
    drop(ready);
    for conn in l.incoming() {
        let Ok(tcp) = conn else { continue };
        std::thread::spawn(move || {
            let Ok(unix) = UnixStream::connect(PROXY_SOCKET) else {
                return;
            };
            let (Ok(mut t2), Ok(mut u2)) = (tcp.try_clone(), unix.try_clone()) else {
                return;
            };
            let (mut t1, mut u1) = (tcp, unix);
            let up = std::thread::spawn(move || {
                pump(&mut t1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Write);
            });
            pump(&mut u2, &mut t2);
            let _ = t2.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        });
    }
    Ok(())
}

/// Copy until end of stream: splice(2) through a pipe (no copy through
/// this process), or a large buffer where splice is not possible.
pub(super) fn pump<A: Read + AsRawFd, B: Write + AsRawFd>(from: &mut A, to: &mut B) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        // SAFETY: the kernel just gave us these descriptors.
        let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl with an integer argument (best effort).
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
        let splice = |a: RawFd, b: RawFd, n: usize| {
            // SAFETY: splice between descriptors we hold, no offsets.
            unsafe {
                libc::splice(
                    a,
                    std::ptr::null_mut(),
                    b,
                    std::ptr::null_mut(),
                    n,
                    libc::SPLICE_F_MOVE,
                )
            }
        };
        loop {
            let n = splice(from.as_raw_fd(), pw.as_raw_fd(), 1 << 20);
            if n <= 0 {
                if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return;
                }
                break; // not spliceable: copy instead
            }
            let mut left = n as usize;
            while left > 0 {
                let m = splice(pr.as_raw_fd(), to.as_raw_fd(), left);
                if m <= 0 {
                    return;
                }
                left -= m as usize;
            }
        }
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
