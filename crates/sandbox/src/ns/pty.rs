//! The sandbox's own terminal (`Stdio::Pty`): init allocates it from the
//! sandbox's private devpts once the root is built, the command attaches
//! to its secondary side as a new session's controlling terminal, and the
//! primary side goes to the caller (over the supervisor) and nowhere else.
//! Nothing inside ever holds a terminal of the host.

use super::*;

/// Open a new terminal's primary side (close-on-exec, so the command
/// never inherits it) at `rows` x `cols`; returns it and its number under
/// /dev/pts. `raw`: without a line discipline from the start.
pub(super) fn open_primary(rows: u16, cols: u16, raw: bool) -> Result<(OwnedFd, u32), SetupError> {
    use nix::fcntl::{open, OFlag};
    let fd = open(
        "/dev/ptmx",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(os(Layer::Terminal, "opening /dev/ptmx"))?;
    // SAFETY: open returned a descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut unlock: libc::c_int = 0;
    let mut n: libc::c_uint = 0;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSPTLCK reads an int, TIOCGPTN writes an unsigned int,
    // TIOCSWINSZ reads a winsize: each points at a local of that type.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::TIOCSPTLCK, &mut unlock) < 0 {
            return Err(last(Layer::Terminal, "unlocking the terminal"));
        }
        if libc::ioctl(fd.as_raw_fd(), libc::TIOCGPTN, &mut n) < 0 {
            return Err(last(Layer::Terminal, "TIOCGPTN"));
        }
        if libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) < 0 {
            return Err(last(Layer::Terminal, "setting the terminal's size"));
        }
    }
    if raw {
        // termios requests on the primary side act on the terminal itself
        // (the kernel's tty_mode_ioctl follows the pty's link)
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let mut t = tcgetattr(&fd).map_err(os(Layer::Terminal, "tcgetattr"))?;
        cfmakeraw(&mut t);
        tcsetattr(&fd, SetArg::TCSANOW, &t).map_err(os(Layer::Terminal, "tcsetattr"))?;
    }
    Ok((fd, n))
}

/// In the command, before any layer is applied: lead a new session whose
/// controlling terminal is /dev/pts/`n`, on 0, 1 and 2.
pub(super) fn attach_secondary(n: u32) -> Result<(), SetupError> {
    use nix::fcntl::{open, OFlag};
    nix::unistd::setsid().map_err(os(Layer::Terminal, "setsid"))?;
    let path = format!("/dev/pts/{n}");
    let fd = open(
        path.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(os(Layer::Terminal, format!("opening {path}")))?;
    // SAFETY: TIOCSCTTY takes an integer argument; fd is ours.
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } < 0 {
        return Err(last(Layer::Terminal, "TIOCSCTTY"));
    }
    for target in 0..3 {
        nix::unistd::dup2(fd, target).map_err(os(Layer::Terminal, "dup2"))?;
    }
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Hand the primary side to the caller: one message "pty" on its console
/// socket, with the descriptor attached.
pub(super) fn hand_over(console: RawFd, primary: RawFd) -> std::io::Result<()> {
    let fds = [primary];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(b"pty")];
    sendmsg::<()>(console, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// The primary side, as a caller of `Stdio::Pty` receives it from its end
/// of the console socket (blocking until the backend sends it; `None` if
/// the backend went away first, e.g. a failed setup).
pub fn receive_console(console: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<OwnedFd>> {
    let mut buf = [0u8; 8];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        console.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let said = msg
        .iovs()
        .next()
        .map(|b| b.get(..msg.bytes).unwrap_or(b).to_vec())
        .unwrap_or_default();
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
    let Some(fd) = got else { return Ok(None) };
    // the message the backend sends, with a terminal's primary side
    // attached, and nothing else
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int into a local.
    let is_primary = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGPTN, &mut n) } == 0;
    if said != b"pty" || !is_primary {
        return Err(std::io::Error::other(
            "the console socket sent something other than a terminal",
        ));
    }
    Ok(Some(fd))
}

fn last(layer: Layer, what: &str) -> SetupError {
    SetupError::os(layer, what, std::io::Error::last_os_error())
}
