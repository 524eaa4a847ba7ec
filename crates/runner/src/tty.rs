//! `agentvm run --tty`: the command on a terminal of the sandbox's own,
//! relayed to the runner's stdin and stdout (in raw mode when stdin is a
//! terminal, restored at the end), with size changes followed. The server
//! instead passes a console socket and does the relaying itself.
//!
//! The relay is a process of its own, forked while the runner is still
//! single-threaded (the sandbox's init is cloned later, and a thread
//! holding a lock at that moment would hang it; the sandbox refuses to
//! start from a process with threads).
//!
//! Memory is one fixed buffer whatever either side sends or fails to read.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// How long the relay may go on draining once the sandbox has ended.
pub const DRAIN: Duration = Duration::from_secs(2);

/// The relay process, waiting on its end of the console socket, and the
/// runner's terminal settings from before it, restored here too (a relay
/// that had to be killed cannot restore them itself).
pub struct Relay {
    pid: nix::unistd::Pid,
    saved: Option<nix::sys::termios::Termios>,
}

/// Make the console socket pair: the backend sends the terminal on the
/// first, the relay receives it on the second.
pub fn console_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Is descriptor `n` (inherited from the parent) a socket? The backend
/// sends the terminal there, so anything else is refused before a
/// sandbox is made.
pub fn is_socket(n: i32) -> Result<(), String> {
    // SAFETY: fstat into a zeroed stat we own; a bad number is EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(n, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("not a socket".into());
    }
    Ok(())
}

/// Descriptor `n` is a SEQPACKET socket; it is made close-on-exec, so
/// only the sandbox's forwarder (which inherits it by fork) holds it.
pub fn is_seqpacket_socket(n: i32) -> Result<(), String> {
    is_socket(n)?;
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into a local of that size.
    let r = unsafe {
        libc::getsockopt(
            n,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || ty != libc::SOCK_SEQPACKET {
        return Err("not a SEQPACKET socket".into());
    }
    // SAFETY: fcntl with integer arguments on a descriptor we were given.
    if unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// The size of the runner's own terminal, if stdin is one.
pub fn own_size() -> Option<(u16, u16)> {
    size_of(std::io::stdin().as_fd())
}

fn size_of(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes one winsize into a local.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

fn set_size(fd: BorrowedFd<'_>, (rows, cols): (u16, u16)) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a local.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// The runner's terminal in raw mode until dropped.
struct Raw {
    saved: nix::sys::termios::Termios,
}

impl Raw {
    fn enter() -> Option<Raw> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Raw { saved })
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSAFLUSH, &self.saved);
    }
}

impl Relay {
    /// Fork the relay: it waits on `socket` for the terminal, then relays
    /// until the command's side of it is closed (every process in the
    /// sandbox has ended) or the socket's other end goes away without
    /// sending one. `other` is the backend's end, which the relay closes.
    /// Call only while this process is single-threaded.
    pub fn start(socket: OwnedFd, other: &OwnedFd) -> std::io::Result<Relay> {
        let saved = nix::sys::termios::tcgetattr(std::io::stdin().as_fd()).ok();
        // SAFETY: the runner is single-threaded here (the egress proxy is
        // a process too), so the child's copy holds no lock of another
        // thread; it only relays and exits.
        match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
            nix::unistd::ForkResult::Child => {
                // only its end of the console socket (0, 1 and 2 stay)
                let _ = other;
                agentvm_sandbox::fds::close_all_but(&[socket.as_raw_fd()]);
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
                if let Ok(Some(primary)) = agentvm_sandbox::receive_console(socket.as_fd()) {
                    drop(socket);
                    let raw = Raw::enter();
                    relay(&primary);
                    drop(raw);
                }
                // SAFETY: _exit runs none of the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(socket);
                Ok(Relay { pid: child, saved })
            }
        }
    }

    /// Wait for the relay to drain what the command printed, at most
    /// `within`; then it is killed. The terminal's settings are put back.
    pub fn finish(self, within: Duration) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let start = std::time::Instant::now();
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if start.elapsed() < within => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(WaitStatus::StillAlive) => {
                    let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(self.pid, None);
                    break;
                }
                _ => break,
            }
        }
        if let Some(t) = &self.saved {
            use nix::sys::termios::{tcsetattr, SetArg};
            let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSAFLUSH, t);
        }
    }
}

fn relay(primary: &OwnedFd) {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut input_open = true;
    let mut size = own_size();
    let mut buf = [0u8; 16 * 1024];
    loop {
        // a resize shows up within a quarter second
        if let Some(now) = own_size() {
            if Some(now) != size {
                set_size(primary.as_fd(), now);
                size = Some(now);
            }
        }
        let mut fds = vec![PollFd::new(primary.as_fd(), PollFlags::POLLIN)];
        if input_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(250u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let out_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let in_ready = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty());
        if out_ready {
            match nix::unistd::read(primary.as_raw_fd(), &mut buf) {
                // EIO: the last holder of the command's side closed it
                Ok(0) | Err(nix::errno::Errno::EIO) => return,
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|_| stdout.flush())
                        .is_err()
                    {
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(_) => return,
            }
        }
        if in_ready {
            match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    // end of input: the terminal's end-of-file character,
                    // as a person would type it, then stop reading
                    let _ = nix::unistd::write(primary, b"\x04");
                    input_open = false;
                }
                Ok(n) => {
                    if write_all(primary, &buf[..n]).is_err() {
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(_) => input_open = false,
            }
        }
    }
}

fn write_all(fd: &OwnedFd, mut b: &[u8]) -> nix::Result<()> {
    while !b.is_empty() {
        match nix::unistd::write(fd, b) {
            Ok(n) => b = &b[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
