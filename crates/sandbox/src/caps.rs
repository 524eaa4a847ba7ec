//! Capabilities and no_new_privs: after `drop_all`, the calling thread has no
//! capability in any set, cannot regain one through exec (bounding set
//! empty, securebits locked), and `no_new_privs` stops setuid binaries and
//! file capabilities from granting anything.

use crate::error::{Layer, SetupError};

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Read the value before any namespace change (the file may not be
/// reachable later); pass it to `drop_all`.
pub fn probe_last_cap() -> u32 {
    last_cap()
}

fn prctl(op: libc::c_int, a: libc::c_ulong, what: &str) -> Result<(), SetupError> {
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    let r = unsafe {
        libc::prctl(
            op,
            a,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Capabilities,
            what,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Drop every capability for good.
pub fn drop_all(last_cap: u32) -> Result<(), SetupError> {
    for cap in 0..=last_cap {
        prctl(
            libc::PR_CAPBSET_DROP,
            cap as libc::c_ulong,
            "dropping the bounding set",
        )?;
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        "clearing ambient capabilities",
    )
    .or_else(|e| {
        // kernels before 4.3 have no ambient set: nothing to clear
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    prctl(
        libc::PR_SET_SECUREBITS,
        SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
        "locking securebits",
    )?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads one header and two data structs, laid out as the
    // kernel's __user_cap_header_struct / __user_cap_data_struct.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if r < 0 {
        return Err(SetupError::os(
            Layer::Capabilities,
            "clearing capability sets",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Set no_new_privs on the calling thread.
pub fn no_new_privs() -> Result<(), SetupError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "setting no_new_privs")
        .map_err(|e| SetupError::new(Layer::NoNewPrivs, e.message))
}
