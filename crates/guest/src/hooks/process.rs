//! Processes: fork, the exec family, posix_spawn; sendfile and splice, which cross between
//! NetKernel sockets and other fds.

use crate::state::{self, lookup, Errno, Fd};
use crate::*;
use libc::{c_int, iovec, size_t, ssize_t};
use std::time::{Duration, Instant};

/// # Safety
/// Interposes fork(2). The child shares the parent's attachment: every NetKernel fd gains a
/// reference for it before the fork, and the parent asks the engine to keep the attachment
/// alive until the child exits too.
#[no_mangle]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    let att = state::current().filter(|a| !a.dead() && state::owns_memory());
    let holder = att.and_then(state::share_fds);
    IN_FORK.with(|f| f.set(true));
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    let pid = unsafe { real::fork() };
    IN_FORK.with(|f| f.set(false));
    match (pid, att, holder) {
        (0, _, _) => {
            state::after_fork_in_child();
            readiness::after_fork_in_child();
        }
        (p, Some(a), Some(h)) if p < 0 => state::unshare_fds(a, h),
        (p, Some(a), Some(h)) if p > 0 => {
            let _ = std::panic::catch_unwind(|| a.hold_for(p, h));
        }
        _ => {}
    }
    pid
}

thread_local! {
    /// This thread is inside the fork() wrapper, which does the sharing itself.
    static IN_FORK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// A fork inside libc (daemon(), ...) seen by the atfork handlers: the holder index reserved
    /// for the child and the pipe on which the child tells the parent its pid.
    static LIBC_FORK: std::cell::Cell<Option<(u32, [c_int; 2])>> = const { std::cell::Cell::new(None) };
}

/// pthread_atfork prepare: a fork that did not go through the fork() wrapper (libc's own, in
/// daemon() for one) shares the sockets the same way. The parent learns the child's pid from
/// the child itself, and holds the attachment for it before the fork returns, so a daemon()
/// parent that exits at once does not take the sockets with it.
extern "C" fn atfork_prepare() {
    if IN_FORK.with(|f| f.get()) {
        return;
    }
    let Some(a) = state::current().filter(|a| !a.dead() && state::owns_memory()) else { return };
    let Some(h) = state::share_fds(a) else { return };
    let mut p = [-1; 2];
    // SAFETY: p is a live array of two ints.
    if unsafe { libc::syscall(libc::SYS_pipe2, p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        state::unshare_fds(a, h);
        return;
    }
    LIBC_FORK.with(|f| f.set(Some((h, p))));
}

extern "C" fn atfork_parent() {
    let Some((h, p)) = LIBC_FORK.with(|f| f.take()) else { return };
    netkernel_ring::sys::close(p[1]);
    let mut pid = [0u8; 4];
    // The child writes at once. If the fork failed, the pipe reads EOF, unless a child another
    // thread forked meanwhile inherited its write end: hence the bound on the wait.
    let mut pfd = libc::pollfd { fd: p[0], events: libc::POLLIN, revents: 0 };
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = libc::timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos() as i64 };
        // SAFETY: one live pollfd and timespec; a raw system call, not the interposed poll.
        let r = unsafe { libc::syscall(libc::SYS_ppoll, &mut pfd, 1, &ts, std::ptr::null::<u8>(), 8) };
        let interrupted = || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
        if r == 0 || (r < 0 && !interrupted()) {
            break -1;
        }
        if r < 0 {
            continue;
        }
        // SAFETY: reading into a live 4-byte buffer; the pipe is readable.
        let n = unsafe { libc::syscall(libc::SYS_read, p[0], pid.as_mut_ptr(), 4) };
        if n >= 0 || !interrupted() {
            break n;
        }
    };
    netkernel_ring::sys::close(p[0]);
    let Some(a) = state::current() else { return };
    if n == 4 {
        let _ = std::panic::catch_unwind(|| a.hold_for(i32::from_ne_bytes(pid), h));
    } else {
        // The fork failed: no child wrote (or none within the bound: the child's sockets then
        // close with this process, as when the engine refuses a hold).
        state::unshare_fds(a, h);
    }
}

extern "C" fn atfork_child() {
    if IN_FORK.with(|f| f.get()) {
        return;
    }
    let Some((_, p)) = LIBC_FORK.with(|f| f.take()) else { return };
    state::after_fork_in_child();
    readiness::after_fork_in_child();
    let pid = state::getpid().to_ne_bytes();
    // SAFETY: writes 4 bytes to the pipe the parent waits on.
    unsafe { libc::syscall(libc::SYS_write, p[1], pid.as_ptr(), 4) };
    netkernel_ring::sys::close(p[0]);
    netkernel_ring::sys::close(p[1]);
}

/// Runs when the library is loaded, before main: registers the fork handlers for forks inside
/// libc, and rejoins the attachment of NetKernel sockets inherited across exec.
extern "C" fn at_load() {
    // SAFETY: registers handlers that live as long as the process (the library is never unloaded).
    unsafe { libc::pthread_atfork(Some(atfork_prepare), Some(atfork_parent), Some(atfork_child)) };
    if enabled() {
        let _ = std::panic::catch_unwind(inherit::rejoin_at_load);
        stdio::adopt_std_streams();
    }
}

#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

type CStr = *const libc::c_char;

extern "C" {
    static environ: *const CStr;
}

/// Runs an exec: close-on-exec NetKernel fds are released first (and restored if it fails), and
/// the sockets that survive are handed to the new program (`inherit`). `f` gets the environment
/// to use: `envp` or, with a handoff, a copy with NETKERNEL_INHERIT. Nothing here allocates in a
/// vfork child.
///
/// # Safety
/// `envp` is a NULL-terminated array of C strings.
unsafe fn exec_with(envp: *const CStr, f: impl FnOnce(*const CStr) -> c_int) -> c_int {
    let vfork = state::vfork_child();
    let (dropped, last) =
        if vfork { Default::default() } else { std::panic::catch_unwind(state::before_exec).unwrap_or_default() };
    for slot in last {
        let _ = std::panic::catch_unwind(|| sock::close_slot(slot));
    }
    let to = if vfork || state::holder_shared() { inherit::To::ExecNewHolder } else { inherit::To::Exec };
    // SAFETY: envp is a NULL-terminated array of C strings, as the exec call this function serves
    // requires of its caller: prepare's contract.
    let handoff = if enabled() { unsafe { inherit::prepare(envp, to, &[]) } } else { None };
    let r = f(handoff.as_ref().map_or(envp, |h| h.envp()));
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if let Some(h) = handoff {
        h.finish(true);
    }
    state::exec_failed(dropped);
    set_errno(e);
    r
}

/// # Safety
/// Interposes execve(2).
#[no_mangle]
pub unsafe extern "C" fn execve(path: CStr, argv: *const CStr, envp: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::execve(path, argv, env)) }
}

/// # Safety
/// Interposes execv(3).
#[no_mangle]
pub unsafe extern "C" fn execv(path: CStr, argv: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and environ
    // is the process's own (valid) environment, as the execv family uses.
    unsafe { exec_with(environ, |env| real::execve(path, argv, env)) }
}

/// # Safety
/// Interposes execvp(3).
#[no_mangle]
pub unsafe extern "C" fn execvp(file: CStr, argv: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and environ
    // is the process's own (valid) environment, as the execv family uses.
    unsafe { exec_with(environ, |env| real::execvpe(file, argv, env)) }
}

/// # Safety
/// Interposes execvpe(3).
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: CStr, argv: *const CStr, envp: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::execvpe(file, argv, env)) }
}

/// # Safety
/// Interposes fexecve(3).
#[no_mangle]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const CStr, envp: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::fexecve(fd, argv, env)) }
}

/// # Safety
/// Interposes execveat(2) (glibc ≥ 2.34 wraps it).
#[no_mangle]
pub unsafe extern "C" fn execveat(
    dirfd: c_int,
    path: CStr,
    argv: *const CStr,
    envp: *const CStr,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::execveat(dirfd, path, argv, env, flags)) }
}

/// Slots that posix_spawn file actions dup2 onto other fd numbers, by file-actions object: the
/// child gets them although the parent's fds may be close-on-exec.
static SPAWN_DUPS: std::sync::Mutex<Vec<(usize, u32)>> = std::sync::Mutex::new(Vec::new());

/// # Safety
/// Interposes posix_spawn_file_actions_adddup2(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn_file_actions_adddup2(
    fa: *mut libc::posix_spawn_file_actions_t,
    fd: c_int,
    newfd: c_int,
) -> c_int {
    if let Fd::Sock(s) = lookup(fd) {
        SPAWN_DUPS.lock().unwrap_or_else(|e| e.into_inner()).push((fa as usize, s));
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::posix_spawn_file_actions_adddup2(fa, fd, newfd) }
}

/// # Safety
/// Interposes posix_spawn_file_actions_destroy(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn_file_actions_destroy(fa: *mut libc::posix_spawn_file_actions_t) -> c_int {
    SPAWN_DUPS.lock().unwrap_or_else(|e| e.into_inner()).retain(|&(f, _)| f != fa as usize);
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::posix_spawn_file_actions_destroy(fa) }
}

/// posix_spawn and posix_spawnp: glibc's child never runs GuestLib's fork or exec hooks, so the
/// parent hands the sockets on itself: a holder index for the child, the handoff in the
/// environment, then `hold` for the child once its pid is known.
///
/// # Safety
/// As posix_spawn(3).
unsafe fn spawn_with(
    pid: *mut libc::pid_t,
    fa: *const libc::posix_spawn_file_actions_t,
    envp: *const CStr,
    f: impl FnOnce(*mut libc::pid_t, *const CStr) -> c_int,
) -> c_int {
    let handoff = if enabled() && state::owns_memory() {
        let extra: Vec<u32> = SPAWN_DUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|&&(f, _)| !fa.is_null() && f == fa as usize)
            .map(|&(_, s)| s)
            .collect();
        // SAFETY: envp is a NULL-terminated array of C strings, as posix_spawn requires of its
        // caller: prepare's contract.
        unsafe { inherit::prepare(envp, inherit::To::Spawn, &extra) }
    } else {
        None
    };
    let mut child: libc::pid_t = 0;
    let r = f(&mut child, handoff.as_ref().map_or(envp, |h| h.envp()));
    if !pid.is_null() {
        // SAFETY: the caller's out-pointer, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        unsafe { *pid = child };
    }
    if let Some(h) = handoff {
        let ok = r == 0;
        let holder = h.holder();
        h.finish(!ok);
        if let (true, Some(a), Some(holder)) = (ok, state::current(), holder) {
            let _ = std::panic::catch_unwind(|| a.hold_for(child, holder));
        }
    }
    r
}

/// # Safety
/// Interposes posix_spawn(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: CStr,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { spawn_with(pid, fa, envp.cast(), |p, env| real::posix_spawn(p, path, fa, attr, argv, env.cast())) }
}

/// # Safety
/// Interposes posix_spawnp(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: CStr,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { spawn_with(pid, fa, envp.cast(), |p, env| real::posix_spawnp(p, file, fa, attr, argv, env.cast())) }
}

/// # Safety
/// Interposes sendfile(2): file bytes go through the socket's ordinary send path.
#[no_mangle]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut libc::off_t, count: size_t) -> ssize_t {
    // SAFETY: the caller's offset pointer, valid as the contract of the call this function
    // interposes requires, which GuestLib's version shares.
    on_fd!(out, |s| isize_of(unsafe { sock::sendfile(s, inp, off, count) }), unsafe {
        real::sendfile(out, inp, off, count)
    })
}

/// # Safety
/// Interposes sendfile64 (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn sendfile64(out: c_int, inp: c_int, off: *mut libc::off_t, count: size_t) -> ssize_t {
    // SAFETY: sendfile64 is sendfile on 64-bit Linux: the caller meets the contract of the sendfile
    // called here.
    unsafe { sendfile(out, inp, off, count) }
}

/// # Safety
/// Interposes splice(2) where one end is a NetKernel socket: bytes are moved through a buffer
/// with the socket's own recv/send (no page moving, but the same results).
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut libc::loff_t,
    fd_out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: libc::c_uint,
) -> ssize_t {
    match (lookup(fd_in), lookup(fd_out)) {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        (Fd::Plain, Fd::Plain) => unsafe { real::splice(fd_in, off_in, fd_out, off_out, len, flags) },
        (Fd::Stale, _) | (_, Fd::Stale) => guard(|| Err(libc::ECONNRESET)),
        (Fd::Sock(_), Fd::Sock(_)) => guard(|| Err(libc::EINVAL)),
        (Fd::Sock(s), Fd::Plain) => guard(|| {
            if !off_in.is_null() {
                return Err(libc::ESPIPE);
            }
            let mut buf = vec![0u8; len.min(1 << 16)];
            let iov = [iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
            // SAFETY: iov describes buf, a live Vec of buf.len() bytes owned here.
            // SPLICE_F_NONBLOCK concerns the pipe; the socket blocks per its own O_NONBLOCK.
            let n = unsafe { sock::recv(s, &iov, 0, &mut Default::default()) }?;
            // SAFETY: writing our own buffer to the caller's fd, at the caller's offset if any.
            unsafe { write_all_to(fd_out, off_out, &buf[..n]) }?;
            Ok(n as isize)
        }),
        (Fd::Plain, Fd::Sock(s)) => guard(|| {
            if !off_out.is_null() {
                return Err(libc::ESPIPE);
            }
            let mut buf = vec![0u8; len.min(256 << 10)];
            // SAFETY: reading into our own buffer, at the caller's offset if any.
            let n = unsafe {
                match off_in.as_mut() {
                    Some(o) => libc::syscall(libc::SYS_pread64, fd_in, buf.as_mut_ptr(), buf.len(), *o),
                    None => libc::syscall(libc::SYS_read, fd_in, buf.as_mut_ptr(), buf.len()),
                }
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
            }
            let iov = [iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: n as usize }];
            // The bytes have left the pipe: send them all, blocking if need be.
            // SAFETY: iov describes the first n bytes of buf, a live Vec owned here (n <=
            // buf.len(): what the read into it returned).
            let sent = unsafe { sock::send(s, &iov, 0, std::ptr::null(), 0) }?;
            // SAFETY: off_in is null or a valid loff_t, as splice(2) requires of the caller; as_mut
            // maps null to None.
            if let Some(o) = unsafe { off_in.as_mut() } {
                *o += sent as libc::loff_t;
            }
            Ok(sent as isize)
        }),
    }
}

/// Writes all of `data` to a plain fd (at `*off`, advancing it, when given).
///
/// # Safety
/// `off` is null or valid.
unsafe fn write_all_to(fd: c_int, off: *mut libc::loff_t, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        // SAFETY: our own buffer; the offset per the contract.
        let r = unsafe {
            match off.as_mut() {
                Some(o) => libc::syscall(libc::SYS_pwrite64, fd, data.as_ptr(), data.len(), *o),
                None => libc::syscall(libc::SYS_write, fd, data.as_ptr(), data.len()),
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        // SAFETY: off is null or a valid off_t, as sendfile(2) requires of the caller; as_mut maps
        // null to None.
        if let Some(o) = unsafe { off.as_mut() } {
            *o += r as libc::loff_t;
        }
        data = &data[r as usize..];
    }
    Ok(())
}
