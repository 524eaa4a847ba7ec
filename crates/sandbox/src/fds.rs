//! Descriptors a forked helper keeps: only those it needs.
//!
//! The egress proxy, the terminal relay and the proxy bridge are forks,
//! not execs, so close-on-exec does not clear what their parent held
//! (the repo, the patch and result files, the server's console socket,
//! init's channel to the supervisor). A helper that handles what the
//! sandbox sends calls [`close_all_but`] first thing.

use std::os::fd::RawFd;

/// Close every descriptor from 3 up except `keep`.
pub fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for k in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if k > from {
            let to = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: close_range with no flags closes descriptors of
            // this process only; nothing here is used afterwards.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) };
            if r != 0 {
                // before Linux 5.9: one by one, up to the soft limit
                let max = nix::unistd::sysconf(nix::unistd::SysconfVar::OPEN_MAX)
                    .ok()
                    .flatten()
                    .unwrap_or(1024) as u32;
                for fd in from..=to.min(max) {
                    // SAFETY: closing a descriptor number, owned or not.
                    unsafe { libc::close(fd as i32) };
                }
            }
        }
        from = k.saturating_add(1);
    }
}
