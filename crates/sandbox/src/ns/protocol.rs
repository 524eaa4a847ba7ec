//! What the supervisor, init and the command say to each other: messages
//! over the SOCK_SEQPACKET pair (with a descriptor attached where needed)
//! and the command's report over its close-on-exec pipe.

use super::*;

/// Messages from init to the supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Report {
    /// Supervisor to init: maps are written, the cgroup is joined.
    Go,
    /// Sent with the upper directory's descriptor attached.
    Upper,
    /// Sent (before `Upper`) with the base's descriptor attached: what
    /// /workspace showed before the command, when layers lie over the repo.
    Base,
    /// Sent with the primary side of the sandbox's terminal attached
    /// (`Stdio::Pty` only).
    Console,
    Started {
        landlock_abi: u32,
    },
    SetupFailed(SetupError),
    ExecFailed {
        kind: ExecFailure,
        reason: String,
    },
    Finished(Ended),
}

/// Messages from the command child to init (over the exec pipe).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ChildReport {
    Setup(SetupError),
    Exec { kind: ExecFailure, reason: String },
    LandlockAbi(u32),
}

pub(super) fn send(sock: &OwnedFd, msg: &Report, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let iov = [IoSlice::new(&bytes)];
    let fds;
    let cmsg: Vec<ControlMessage> = match fd {
        Some(f) => {
            fds = [f];
            vec![ControlMessage::ScmRights(&fds)]
        }
        None => Vec::new(),
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receive one report; `Ok(None)` on end of stream.
pub(super) fn recv(sock: &OwnedFd) -> std::io::Result<Option<(Report, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: the kernel just installed this descriptor in
                    // our table for us; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    if n == 0 {
        return Ok(None);
    }
    let r: Report = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
    Ok(Some((r, fd)))
}
