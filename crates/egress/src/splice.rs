//! Zero-copy relaying with splice(2): socket -> pipe -> socket, so the bytes
//! of a tunnel never cross into this process's memory.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use tokio::io::Interest;

/// A tokio socket whose readiness we can wait on and whose fd we can
/// splice from or to.
pub trait Socket: AsRawFd {
    fn ready(&self, i: Interest) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn try_io_<R>(&self, i: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    fn shutdown_write(&self);
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            async fn ready(&self, i: Interest) -> io::Result<()> {
                <$t>::ready(self, i).await.map(|_| ())
            }
            fn try_io_<R>(&self, i: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                self.try_io(i, f)
            }
            fn shutdown_write(&self) {
                // SAFETY: shutdown on a descriptor we own; no memory involved.
                unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
            }
        }
    };
}

socket!(tokio::net::TcpStream);
socket!(tokio::net::UnixStream);

const CHUNK: usize = 1 << 20;

/// A pipe and its capacity in bytes.
fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us these descriptors.
    let (r, w) = unsafe {
        (
            std::os::fd::FromRawFd::from_raw_fd(fds[0]),
            std::os::fd::FromRawFd::from_raw_fd(fds[1]),
        )
    };
    // a bigger pipe means fewer wake-ups (best effort: the limit is
    // fs.pipe-max-size), then ask what we got
    // SAFETY: fcntl with integer arguments.
    let cap = unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
        libc::fcntl(fds[1], libc::F_GETPIPE_SZ)
    };
    if cap <= 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r, w, cap as usize))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors we hold, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Move everything from `from` to `to` until end of stream, then shut
/// `to`'s writing side. Returns the bytes moved, also when an error ended
/// the transfer (with that error).
///
/// The pipe is filled only when it is empty, then drained completely. A
/// pipe has a fixed number of page slots and spliced socket data can leave
/// them partly used, so a non-empty pipe may refuse more with EAGAIN; tokio
/// would take that EAGAIN for "socket not readable" and wait for an edge
/// that never comes. With an empty pipe, EAGAIN can only mean the socket.
pub async fn one_way<A: Socket, B: Socket>(from: &A, to: &B) -> (u64, io::Result<()>) {
    let mut total = 0u64;
    let r = relay(from, to, &mut total).await;
    (total, r)
}

async fn relay<A: Socket, B: Socket>(from: &A, to: &B, total: &mut u64) -> io::Result<()> {
    let (pr, pw, cap) = pipe()?;
    loop {
        from.ready(Interest::READABLE).await?;
        let n = match from.try_io_(Interest::READABLE, || {
            splice(from.as_raw_fd(), pw.as_raw_fd(), cap)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.ready(Interest::WRITABLE).await?;
            match to.try_io_(Interest::WRITABLE, || {
                splice(pr.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    *total += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    to.shutdown_write();
    Ok(())
}

/// Both directions at once: the bytes (a to b, b to a), and the first
/// error that ended either.
pub async fn both<A: Socket, B: Socket>(a: &A, b: &B) -> ((u64, u64), Option<io::Error>) {
    let ((x, ex), (y, ey)) = tokio::join!(one_way(a, b), one_way(b, a));
    ((x, y), ex.err().or(ey.err()))
}
