//! GuestLib: loaded with LD_PRELOAD by `netkernel run`, it serves the program's AF_INET and
//! AF_INET6 TCP and UDP sockets through a NetKernel NSM over shared memory, with Linux socket
//! semantics, and sends every other fd straight to libc.
//!
//! Every interposed function starts with one load from the fd table; an fd GuestLib does not
//! own goes to the next libc definition with no lock and no allocation (programs call write()
//! from signal handlers). GuestLib's own system calls use `libc::syscall`, never the
//! interposed wrappers, so it cannot re-enter itself. Panics are caught at every hook and turn
//! into EIO.

mod exec_l;
mod inherit;
mod readiness;
mod real;
mod resolve;
mod sock;
mod state;
mod stdio;

use libc::{c_int, iovec};
use state::Errno;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, Ordering};

fn set_errno(e: Errno) {
    // SAFETY: errno is thread-local and always valid to write.
    unsafe { *libc::__errno_location() = e };
}

/// Runs a NetKernel operation: catches panics, maps Err(errno) to -1 with errno set.
fn guard<T: From<i8>>(f: impl FnOnce() -> Result<T, Errno>) -> T {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_errno(e);
            T::from(-1)
        }
        Err(_) => {
            set_errno(libc::EIO);
            T::from(-1)
        }
    }
}

/// Dispatches on what `fd` is: NetKernel socket, a stale one (its NSM died), or plain.
macro_rules! on_fd {
    ($fd:expr, |$slot:ident| $ours:expr, $plain:expr) => {
        on_fd!($fd, |$slot| $ours, $plain, libc::ECONNRESET)
    };
    // `$stale`: the errno for a stale socket.
    ($fd:expr, |$slot:ident| $ours:expr, $plain:expr, $stale:expr) => {
        match $crate::state::lookup($fd) {
            $crate::state::Fd::Plain => $plain,
            $crate::state::Fd::Sock($slot) => $crate::guard(|| $ours),
            $crate::state::Fd::Stale => $crate::guard(|| Err($stale)),
        }
    };
}

/// Whether GuestLib serves sockets at all in this process (`netkernel run` sets the socket).
fn enabled() -> bool {
    static ON: AtomicU8 = AtomicU8::new(0);
    match ON.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var_os("NETKERNEL_SOCKET").is_some();
            ON.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

fn served(domain: c_int, ty: c_int, proto: c_int) -> bool {
    let base = ty & 0xf;
    (domain == libc::AF_INET || domain == libc::AF_INET6)
        && ((base == libc::SOCK_STREAM && (proto == 0 || proto == libc::IPPROTO_TCP))
            || (base == libc::SOCK_DGRAM && (proto == 0 || proto == libc::IPPROTO_UDP)))
        && enabled()
}

fn isize_of(r: Result<usize, Errno>) -> Result<isize, Errno> {
    r.map(|n| n as isize)
}

/// # Safety
/// `iov` is null or valid for `n` entries.
unsafe fn iov_slice<'a>(iov: *const iovec, n: c_int) -> Result<&'a [iovec], Errno> {
    if !(0..=libc::UIO_MAXIOV).contains(&n) {
        return Err(libc::EINVAL);
    }
    if n == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: iov is non-null and valid for n entries, n in 1..=UIO_MAXIOV (this function's
    // contract, checked above).
    Ok(unsafe { std::slice::from_raw_parts(iov, n as usize) })
}

// After on_fd!, which the hooks use.
mod hooks;
