//! stdio over inherited NetKernel sockets. glibc's stdio makes its system calls internally, out
//! of any preloaded symbol's reach, so `printf` to a stdout that is a NetKernel socket would go
//! to the kernel socket reserving fd 1. That is the inetd case: a program exec'd with the
//! connection as stdin and stdout, printing its answer. So when the standard streams are
//! inherited NetKernel sockets at load, they are replaced, before main, by fopencookie streams
//! whose I/O goes through GuestLib's read/write/close; `fileno()` still answers 0, 1, 2.

use crate::state::{lookup, Fd};
use libc::{c_char, c_int, c_void, size_t, ssize_t};

/// glibc's `cookie_io_functions_t`.
#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

/// The start of glibc's public `struct _IO_FILE` (bits/types/struct_FILE.h), up to `_fileno`.
#[repr(C)]
struct FileHead {
    flags: c_int,
    /// `_IO_read_ptr` .. `_chain`.
    ptrs: [*mut c_char; 13],
    fileno: c_int,
}

extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut libc::FILE;
    static mut stdin: *mut libc::FILE;
    static mut stdout: *mut libc::FILE;
    static mut stderr: *mut libc::FILE;
}

fn fd_of(cookie: *mut c_void) -> c_int {
    cookie as usize as c_int
}

unsafe extern "C" fn cookie_read(cookie: *mut c_void, buf: *mut c_char, n: size_t) -> ssize_t {
    // SAFETY: stdio passes its own buffer of n bytes; read is GuestLib's.
    unsafe { crate::hooks::read(fd_of(cookie), buf.cast(), n) }
}

/// glibc counts a short cookie write as an error, so this writes everything (a blocking socket
/// takes it all unless it fails).
unsafe extern "C" fn cookie_write(cookie: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    let mut done = 0;
    while done < n {
        // SAFETY: stdio passes its own buffer of n bytes; write is GuestLib's.
        let r = unsafe { crate::hooks::write(fd_of(cookie), buf.add(done).cast(), n - done) };
        if r < 0 {
            return if done > 0 { done as ssize_t } else { -1 };
        }
        done += r as usize;
    }
    done as ssize_t
}

unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: fclose of the stream closes its fd, as it would natively; close is GuestLib's.
    unsafe { crate::hooks::close(fd_of(cookie)) }
}

/// Replaces each standard stream whose fd is a NetKernel socket (runs before main, after the
/// inherited sockets were rejoined).
pub fn adopt_std_streams() {
    for fd in 0..3 {
        if !matches!(lookup(fd), Fd::Sock(_)) {
            continue;
        }
        let io = CookieIo { read: Some(cookie_read), write: Some(cookie_write), seek: None, close: Some(cookie_close) };
        let mode = if fd == 0 { c"r" } else { c"w" };
        // SAFETY: a valid mode and functions; the cookie is the fd number.
        let f = unsafe { fopencookie(fd as usize as *mut c_void, mode.as_ptr(), io) };
        if f.is_null() {
            continue;
        }
        // SAFETY: f is a glibc FILE, which starts with the public struct _IO_FILE; main has not
        // run, so nothing else uses the standard streams yet.
        unsafe {
            (*(f as *mut FileHead)).fileno = fd;
            match fd {
                0 => stdin = f,
                1 => stdout = f,
                _ => {
                    // stderr is unbuffered, whatever it is.
                    libc::setvbuf(f, std::ptr::null_mut(), libc::_IONBF, 0);
                    stderr = f;
                }
            }
        }
    }
}
