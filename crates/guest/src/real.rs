//! The libc functions GuestLib interposes, resolved lazily with dlsym(RTLD_NEXT) so that fds
//! GuestLib does not own go straight to libc. Resolution happens once per symbol; afterwards a
//! call costs one relaxed load.

use libc::{c_int, c_uint, c_ulong, c_void, iovec, msghdr, nfds_t, pollfd, size_t, sockaddr, socklen_t, ssize_t};
use std::sync::atomic::{AtomicUsize, Ordering};

fn resolve(slot: &AtomicUsize, name: &'static [u8]) -> usize {
    let f = slot.load(Ordering::Relaxed);
    if f != 0 {
        return f;
    }
    // SAFETY: name is NUL-terminated; dlsym is thread-safe.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
    if f == 0 {
        // A libc without this symbol: nothing sensible can continue.
        // SAFETY: abort is always safe to call.
        unsafe { libc::abort() };
    }
    slot.store(f, Ordering::Relaxed);
    f
}

macro_rules! real {
    ($( fn $name:ident($($a:ident: $t:ty),*) -> $r:ty; )*) => {$(
        /// The next definition of this libc function after GuestLib's.
        // Each mirrors a C signature, however many arguments it has.
        #[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
        pub unsafe fn $name($($a: $t),*) -> $r {
            static P: AtomicUsize = AtomicUsize::new(0);
            let f = resolve(&P, concat!(stringify!($name), "\0").as_bytes());
            // SAFETY: the symbol has this C signature in glibc.
            unsafe {
                let f: unsafe extern "C" fn($($t),*) -> $r = std::mem::transmute(f);
                f($($a),*)
            }
        }
    )*};
}

real! {
    fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int;
    fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t;
    fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t;
    fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t;
    fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t;
    fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t;
    fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t;
    fn sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t;
    fn recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t;
    fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t;
    fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t;
    fn shutdown(fd: c_int, how: c_int) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int;
    fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int;
    fn ppoll(fds: *mut pollfd, n: nfds_t, ts: *const libc::timespec, mask: *const libc::sigset_t) -> c_int;
    fn select(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, tv: *mut libc::timeval) -> c_int;
    fn pselect(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, ts: *const libc::timespec, mask: *const libc::sigset_t) -> c_int;
    fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int;
    fn epoll_wait(epfd: c_int, evs: *mut libc::epoll_event, max: c_int, timeout: c_int) -> c_int;
    fn epoll_pwait(epfd: c_int, evs: *mut libc::epoll_event, max: c_int, timeout: c_int, mask: *const libc::sigset_t) -> c_int;
    fn dup(fd: c_int) -> c_int;
    fn dup2(old: c_int, new: c_int) -> c_int;
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int;
    fn fork() -> libc::pid_t;
    fn execve(path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    fn execvpe(file: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    fn fexecve(fd: c_int, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    fn execveat(dirfd: c_int, path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char, flags: c_int) -> c_int;
    fn posix_spawn(pid: *mut libc::pid_t, path: *const libc::c_char, fa: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t, argv: *const *mut libc::c_char, envp: *const *mut libc::c_char) -> c_int;
    fn posix_spawnp(pid: *mut libc::pid_t, file: *const libc::c_char, fa: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t, argv: *const *mut libc::c_char, envp: *const *mut libc::c_char) -> c_int;
    fn posix_spawn_file_actions_adddup2(fa: *mut libc::posix_spawn_file_actions_t, fd: c_int, newfd: c_int) -> c_int;
    fn posix_spawn_file_actions_destroy(fa: *mut libc::posix_spawn_file_actions_t) -> c_int;
    fn sendfile(out: c_int, inp: c_int, off: *mut libc::off_t, count: size_t) -> ssize_t;
    fn splice(fd_in: c_int, off_in: *mut libc::loff_t, fd_out: c_int, off_out: *mut libc::loff_t, len: size_t, flags: c_uint) -> ssize_t;
    fn getaddrinfo(node: *const libc::c_char, service: *const libc::c_char, hints: *const libc::addrinfo, res: *mut *mut libc::addrinfo) -> c_int;
    fn freeaddrinfo(ai: *mut libc::addrinfo) -> ();
    fn getnameinfo(sa: *const sockaddr, salen: socklen_t, host: *mut libc::c_char, hostlen: socklen_t, serv: *mut libc::c_char, servlen: socklen_t, flags: c_int) -> c_int;
    fn gethostbyname(name: *const libc::c_char) -> *mut libc::hostent;
    fn gethostbyname2(name: *const libc::c_char, af: c_int) -> *mut libc::hostent;
    fn gethostbyname2_r(name: *const libc::c_char, af: c_int, ret: *mut libc::hostent, buf: *mut libc::c_char, buflen: size_t, result: *mut *mut libc::hostent, h_errnop: *mut c_int) -> c_int;
    fn gethostbyaddr(addr: *const c_void, len: socklen_t, af: c_int) -> *mut libc::hostent;
    fn gethostbyaddr_r(addr: *const c_void, len: socklen_t, af: c_int, ret: *mut libc::hostent, buf: *mut libc::c_char, buflen: size_t, result: *mut *mut libc::hostent, h_errnop: *mut c_int) -> c_int;
    fn sendmmsg(fd: c_int, vec: *mut libc::mmsghdr, n: c_uint, flags: c_int) -> c_int;
    fn recvmmsg(fd: c_int, vec: *mut libc::mmsghdr, n: c_uint, flags: c_int, ts: *mut libc::timespec) -> c_int;
}

/// fcntl is variadic in C; its third argument is an int or a pointer, both passed in a register.
#[allow(clippy::missing_safety_doc)]
pub unsafe fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    static P: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&P, b"fcntl\0");
    // SAFETY: glibc's fcntl is `int fcntl(int, int, ...)`; calling it variadically is exact.
    unsafe {
        let f: unsafe extern "C" fn(c_int, c_int, ...) -> c_int = std::mem::transmute(f);
        f(fd, cmd, arg)
    }
}

/// ioctl is variadic in C, as fcntl.
#[allow(clippy::missing_safety_doc)]
pub unsafe fn ioctl(fd: c_int, req: c_ulong, arg: c_ulong) -> c_int {
    static P: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&P, b"ioctl\0");
    // SAFETY: glibc's ioctl is `int ioctl(int, unsigned long, ...)`.
    unsafe {
        let f: unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int = std::mem::transmute(f);
        f(fd, req, arg)
    }
}

/// epoll_pwait2 is missing from older glibcs, so it goes to the kernel directly.
#[allow(clippy::missing_safety_doc)]
pub unsafe fn epoll_pwait2(
    epfd: c_int,
    evs: *mut libc::epoll_event,
    max: c_int,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwards the caller's arguments; the kernel checks them.
    unsafe { libc::syscall(libc::SYS_epoll_pwait2, epfd, evs, max, ts, mask, 8 as c_uint) as c_int }
}
