//! Pause and resume of a running sandbox, asked by the caller over a
//! SEQPACKET socket pair ([`SandboxSpec::control`]) and done by the
//! supervisor, which owns the sandbox's cgroup.
//!
//! One message each way: the caller sends [`PAUSE`] or [`RESUME`]; the
//! supervisor answers [`PAUSED`] or [`RESUMED`] once the kernel says every
//! process is frozen or running again, or [`FAILED`] followed by why. The
//! supervisor thaws the sandbox before it signals or kills anything in it
//! (a frozen task would hold the signal until thawed) and when the
//! caller's end closes, so a sandbox is never left frozen by a caller
//! that went away.
//!
//! [`SandboxSpec::control`]: crate::SandboxSpec::control

use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{recv, send, MsgFlags};

use crate::cgroup::Cgroup;

/// Caller to supervisor: freeze every process of the sandbox.
pub const PAUSE: u8 = b'p';
/// Caller to supervisor: let them run again.
pub const RESUME: u8 = b'r';
/// Supervisor to caller: frozen.
pub const PAUSED: u8 = b'P';
/// Supervisor to caller: running again.
pub const RESUMED: u8 = b'R';
/// Supervisor to caller: refused or failed; the rest of the message says
/// why (UTF-8).
pub const FAILED: u8 = b'E';

/// The supervisor's end and what it did last.
pub(super) struct Control {
    fd: Option<RawFd>,
    frozen: bool,
}

impl Control {
    pub(super) fn new(fd: Option<RawFd>) -> Control {
        Control { fd, frozen: false }
    }

    /// The socket to poll, while the caller holds its end.
    pub(super) fn fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the descriptor is the spec's, open for the whole run
        // (the caller keeps it); it is only borrowed for the poll.
        self.fd.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// Read one request and answer it. A closed caller end thaws the
    /// sandbox and stops being polled.
    pub(super) fn handle(&mut self, cg: Option<&Cgroup>) {
        let Some(fd) = self.fd else { return };
        let mut buf = [0u8; 16];
        let n = match recv(fd, &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return,
            Err(_) => 0,
        };
        if n == 0 {
            self.fd = None;
            self.thaw(cg);
            return;
        }
        let answer: Result<u8, String> = match (buf[0], cg) {
            (_, None) => Err("this sandbox has no cgroup to freeze".into()),
            (PAUSE, Some(cg)) => cg.freeze().map(|()| {
                self.frozen = true;
                PAUSED
            }),
            (RESUME, Some(cg)) => cg.thaw().map(|()| {
                self.frozen = false;
                RESUMED
            }),
            (other, _) => Err(format!("unknown control request {other:#04x}")),
        };
        let msg = match answer {
            Ok(b) => vec![b],
            Err(why) => {
                let mut m = vec![FAILED];
                m.extend_from_slice(why.as_bytes());
                m
            }
        };
        let _ = send(fd, &msg, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
    }

    /// Thaw the sandbox if it is frozen: before a signal or a kill.
    pub(super) fn thaw(&mut self, cg: Option<&Cgroup>) {
        if self.frozen {
            if let Some(cg) = cg {
                let _ = cg.thaw();
            }
            self.frozen = false;
        }
    }
}
