//! Port forwarding into a sandbox. The caller hands the sandbox one end of
//! a SEQPACKET socket pair ([`SandboxSpec::ports_listener`]); a forwarder
//! inside the sandbox's network namespace reads it. For each forward the
//! caller sends one message: the port (two bytes, big-endian) with one
//! stream socket's descriptor attached (the other end of a pair it
//! keeps). The forwarder connects to `127.0.0.1:PORT` inside the sandbox,
//! answers one byte on that stream ([`PORT_OPEN`] or [`PORT_REFUSED`]),
//! then copies both ways until either side closes.
//!
//! The caller never connects anywhere itself and nothing listens on a
//! path, so a forward can name neither the host, another network nor the
//! server's own ports, and no other local user can reach it.
//!
//! [`SandboxSpec::ports_listener`]: crate::SandboxSpec::ports_listener

use super::*;

/// The forwarder's answer: connected.
pub const PORT_OPEN: u8 = 0;
/// The forwarder's answer: nothing listens on that port inside (or 0).
pub const PORT_REFUSED: u8 = 1;

/// Fork the forwarder, confined like the command (no capabilities,
/// no_new_privs, seccomp); it dies with init.
pub(super) fn start_ports(p: &Prepared, control: RawFd) -> Result<(), SetupError> {
    // SAFETY: fork in a single-threaded process (init).
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SetupError::os(
            Layer::Network,
            "forking the port forwarder",
            e,
        )),
        Ok(nix::unistd::ForkResult::Child) => {
            crate::fds::close_all_but(&[control]);
            let code = match ports_main(p, control) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(code) }
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            // init keeps no copy: only the forwarder reads it
            // SAFETY: closing a descriptor init inherited for the forwarder.
            unsafe { libc::close(control) };
            Ok(())
        }
    }
}

/// One forward request: the port and the stream to serve it on.
fn next_forward(control: RawFd) -> std::io::Result<Option<(u16, OwnedFd)>> {
    let mut buf = [0u8; 2];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        control,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let n = msg.bytes;
    let mut got = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed fd in this process.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    if n == 0 && got.is_none() {
        return Ok(None); // the caller closed its end
    }
    match got {
        Some(fd) if n == 2 => Ok(Some((u16::from_be_bytes(buf), fd))),
        // a malformed message: its descriptor (if any) is dropped
        _ => Err(std::io::Error::other(
            "a forward request without a port or a stream",
        )),
    }
}

fn ports_main(p: &Prepared, control: RawFd) -> Result<(), SetupError> {
    use std::os::unix::net::UnixStream;
    caps::no_new_privs()?;
    caps::drop_all(p.last_cap)?;
    if let Some(f) = &p.filters {
        seccomp::install(f)?;
    }
    loop {
        let (port, fd) = match next_forward(control) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error().is_some() => return Ok(()),
            Err(_) => continue,
        };
        let mut stream = UnixStream::from(fd);
        std::thread::spawn(move || {
            let tcp = match port {
                0 => None,
                n => std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, n)).ok(),
            };
            let Some(tcp) = tcp else {
                let _ = stream.write_all(&[PORT_REFUSED]);
                return;
            };
            if stream.write_all(&[PORT_OPEN]).is_err() {
                return;
            }
            let (Ok(mut t2), Ok(mut u2)) = (tcp.try_clone(), stream.try_clone()) else {
                return;
            };
            let (mut t1, mut u1) = (tcp, stream);
            let up = std::thread::spawn(move || {
                pump(&mut u1, &mut t1);
                let _ = t1.shutdown(std::net::Shutdown::Write);
            });
            pump(&mut t2, &mut u2);
            let _ = u2.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        });
    }
}
