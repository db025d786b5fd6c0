//! NetKernel sockets inherited across exec. The kernel keeps the fd of such a socket in the new
//! program, but that fd is only the idle kernel socket reserving its number; the region, the
//! doorbells and the fd table are gone with the old image. So before exec (or posix_spawn) the
//! old program passes the new one, in `NETKERNEL_INHERIT`, what it needs to rejoin the same
//! attachment: the attachment id, a holder index of its own, the fd number of a copy of the
//! region memfd (and, for the exec of a process, of its control connection), and, per inherited
//! socket, the inode of its reserving kernel socket and its slot. The new GuestLib consumes the
//! variable before main, finds its inherited sockets by inode (whatever fd numbers dup2 gave
//! them), and tells the engine it holds the attachment (`join`, proving it with the memfd), which
//! hands back the doorbells.
//!
//! The exec side runs in vfork children too (they share the parent's memory and stack), so it
//! never allocates: its memory is one anonymous mapping, unmapped again if exec fails.

use crate::state::{self, lookup, Attachment, Fd, HIDDEN_FD_MIN, HOLDER, LOCAL_REFS, SLOT_INO};
use libc::c_char;
use netkernel_abi::SLOT_COUNT;
use netkernel_control::{EngineRequest, JoinReply};
use std::sync::atomic::Ordering;

pub const VAR: &[u8] = b"NETKERNEL_INHERIT=";
/// An env string may be at most 32 pages (MAX_ARG_STRLEN); sockets past this are not passed.
const ENV_MAX: usize = 120 * 1024;
const BITMAP: usize = SLOT_COUNT as usize / 8;

/// What an exec or spawn hands on, and what to undo if it fails.
pub struct Handoff {
    base: *mut u8,
    len: usize,
    envp: *const *const c_char,
    /// Fds duplicated (without close-on-exec) for the new program: memfd and control socket.
    dups: [i32; 2],
    /// A holder id the NSM made for a new process (not the exec of this one).
    reserved: Option<u32>,
}

impl Handoff {
    pub fn envp(&self) -> *const *const c_char {
        self.envp
    }

    fn mark(&mut self, s: u32) {
        // SAFETY: the first BITMAP bytes of our mapping hold the bitmap; s < SLOT_COUNT.
        unsafe { *self.base.add(s as usize / 8) |= 1 << (s % 8) };
    }

    fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        // SAFETY: as in `mark`.
        (0..SLOT_COUNT).filter(move |&s| unsafe { *self.base.add(s as usize / 8) } & (1 << (s % 8)) != 0)
    }

    /// Asks the NSM for a holder id that holds every socket handed on.
    fn claim(&self, a: &Attachment) -> Option<u32> {
        state::share(a, Some(&mut self.slots()))
    }

    /// Gives back the holder id made for the new process and its claim on the sockets.
    fn release_holder(&mut self) {
        if let (Some(h), Some(a)) = (self.reserved.take(), state::current()) {
            state::unshare_fds(a, h);
        }
    }

    /// The holder index reserved for the new process, if it is one.
    pub fn holder(&self) -> Option<u32> {
        self.reserved
    }

    /// The exec or spawn failed, or (spawn) the parent is done with its copies of the fds.
    pub fn finish(mut self, failed: bool) {
        for fd in self.dups.into_iter().filter(|&f| f >= 0) {
            netkernel_ring::sys::close(fd);
        }
        if failed {
            self.release_holder();
        }
        // SAFETY: our own mapping, no longer referenced.
        unsafe { libc::syscall(libc::SYS_munmap, self.base, self.len) };
    }
}

/// Who receives the handoff.
#[derive(Clone, Copy, PartialEq)]
pub enum To {
    /// This process, execing (its holder index stays its own).
    Exec,
    /// A process execing that has no holder id of its own the engine knows of: a vfork child,
    /// or a forked child sharing its parent's id (the NSM gave it none at its fork).
    ExecNewHolder,
    /// A child posix_spawn is about to start.
    Spawn,
}

fn raw_warn(msg: &[u8]) {
    // SAFETY: writes a static buffer to stderr; safe in a vfork child.
    unsafe { libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len()) };
}

fn dup_open(fd: i32) -> i32 {
    if fd < 0 {
        return -1;
    }
    // SAFETY: integers only, no memory passed; the kernel checks fd. (The copy is not close-on-
    // exec, so it survives exec.)
    unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD, HIDDEN_FD_MIN) as i32 }
}

/// A copy of the region memfd for the new program. A child that closed every fd it does not
/// pass on (python's subprocess does, in its vfork child) no longer has GuestLib's; its parent
/// does, and the memfd opens again through /proc as the same file.
fn memfd_for_exec(memfd: i32) -> i32 {
    let fd = dup_open(memfd);
    if fd >= 0 {
        return fd;
    }
    // "/proc/<ppid>/fd/<memfd>", built without allocating.
    let mut path = [0u8; 64];
    let mut at = 6;
    path[..at].copy_from_slice(b"/proc/");
    // SAFETY: no arguments, no memory touched.
    put_num(&mut path, &mut at, unsafe { libc::syscall(libc::SYS_getppid) });
    path[at..at + 4].copy_from_slice(b"/fd/");
    at += 4;
    put_num(&mut path, &mut at, memfd as i64);
    // SAFETY: a NUL-terminated path on our stack.
    let fd = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), libc::O_RDWR) } as i32;
    if fd < 0 {
        return -1;
    }
    let high = dup_open(fd);
    netkernel_ring::sys::close(fd);
    high
}

/// Marks the slots of this process's open fds that survive exec, found by the inode of
/// their reserving socket, so a vfork child's dup2 onto 0/1 is seen although GuestLib's fd
/// table (the parent's) does not know it.
fn mark_surviving(h: &mut Handoff) {
    let mut any = false;
    let mut visit = |fd: i32| {
        // SAFETY: integers only, no memory passed; the kernel checks fd.
        let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFD) };
        if fl < 0 || fl & libc::FD_CLOEXEC as i64 != 0 {
            return;
        }
        let Some(ino) = state::socket_ino(fd) else { return };
        let slot = match lookup(fd) {
            Fd::Sock(s) if SLOT_INO[s as usize].load(Ordering::Relaxed) == ino => Some(s),
            _ => (0..SLOT_COUNT).find(|&s| {
                LOCAL_REFS[s as usize].load(Ordering::Relaxed) > 0
                    && SLOT_INO[s as usize].load(Ordering::Relaxed) == ino
            }),
        };
        if let Some(s) = slot {
            h.mark(s);
        }
    };
    // SAFETY: a NUL-terminated path; raw system calls only.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    } as i32;
    if dir >= 0 {
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: buf is a live buffer of its length.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off + 19 < n as usize {
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                let name = &buf[off + 19..off + reclen];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                if let Some(fd) = parse_u64(&name[..end]) {
                    if fd as i32 != dir {
                        any = true;
                        visit(fd as i32);
                    }
                }
                off += reclen.max(1);
            }
        }
        netkernel_ring::sys::close(dir);
    }
    if !any {
        // No /proc: the fds GuestLib knows are all it can see.
        (0..state::MAX_FD as i32).filter(|&fd| lookup(fd) != Fd::Plain).for_each(visit);
    }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |v, &d| v * 10 + (d - b'0') as u64))
}

/// Appends decimal `v` at `*at` in `out`.
fn put_num(out: &mut [u8], at: &mut usize, v: i64) {
    let mut tmp = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out[*at] = b'-';
        *at += 1;
    }
    out[*at..*at + tmp.len() - i].copy_from_slice(&tmp[i..]);
    *at += tmp.len() - i;
}

/// Prepares the handoff for `to`, with `envp` as the new program's environment; None when no
/// NetKernel socket goes to the new program (it then gets `envp` unchanged). `extra` are slots
/// to pass besides those of surviving fds (spawn's dup2 file actions).
///
/// # Safety
/// `envp` is a NULL-terminated array of C strings.
pub unsafe fn prepare(envp: *const *const c_char, to: To, extra: &[u32]) -> Option<Handoff> {
    let a = state::current().filter(|a| !a.dead())?;
    let mut n = 0usize;
    // SAFETY: envp is null or a NULL-terminated array (this function's contract), so every index
    // read before the terminator is in bounds.
    while !envp.is_null() && unsafe { !(*envp.add(n)).is_null() } {
        n += 1;
    }
    let len = (BITMAP + (n + 2) * 8 + ENV_MAX + 4095) & !4095;
    // SAFETY: an anonymous private mapping; a raw system call, safe in a vfork child.
    let base = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            std::ptr::null_mut::<u8>(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == -1 {
        return None;
    }
    let mut h = Handoff { base: base as *mut u8, len, envp, dups: [-1; 2], reserved: None };
    match to {
        To::Spawn => {
            for fd in 0..state::MAX_FD as i32 {
                if let Fd::Sock(s) = lookup(fd) {
                    // SAFETY: integers only, no memory passed; the kernel checks fd.
                    let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFD) };
                    if fl >= 0 && fl & libc::FD_CLOEXEC as i64 == 0 {
                        h.mark(s);
                    }
                }
            }
            for &s in extra {
                h.mark(s);
            }
        }
        To::Exec | To::ExecNewHolder => mark_surviving(&mut h),
    }
    if h.slots().next().is_none() {
        h.finish(false);
        return None;
    }
    let holder = if to == To::Exec {
        HOLDER.load(Ordering::Relaxed)
    } else {
        let Some(new) = h.claim(a) else {
            raw_warn(b"netkernel: the NSM took no new holder; inherited sockets fail after exec\n");
            write_env(&mut h, 0, 0, envp, n);
            return Some(h);
        };
        h.reserved = Some(new);
        new
    };
    let ctl = if to == To::Exec { a.ctl.load(Ordering::Acquire) } else { -1 };
    h.dups = [memfd_for_exec(a.memfd), dup_open(ctl)];
    // Such a process joins here, before exec: the program it becomes may have no GuestLib to do
    // it, and only a holder the engine knows of gives its sockets back when it exits.
    let mut holder = holder;
    if h.dups[0] >= 0 && to == To::ExecNewHolder {
        match join_raw(a.region.header().attachment_id, holder, h.dups[0]) {
            Some(held) => {
                // An earlier exec attempt of this child (execvp tries each PATH entry) joined
                // with another id, holding the same sockets: that one is the engine's, the new
                // one goes back.
                if held != holder {
                    h.release_holder();
                    holder = held;
                }
                // The engine watches this process now: its exit, exec'd or not, releases the
                // holder, so a failed attempt leaves it for the next one.
                h.reserved = None;
            }
            None => {
                netkernel_ring::sys::close(h.dups[0]);
                h.dups[0] = -1;
            }
        }
    }
    if h.dups[0] < 0 {
        // The new program still learns which of its sockets it cannot serve (attachment 0), so
        // they fail at once instead of idling as the kernel sockets reserving their numbers.
        h.release_holder();
        write_env(&mut h, 0, 0, envp, n);
        return Some(h);
    }
    write_env(&mut h, a.region.header().attachment_id, holder, envp, n);
    Some(h)
}

/// `join` for this process, with system calls and stack buffers only (a vfork child may not
/// allocate): the framing of `netkernel_ring::sys::send_frame`, the memfd as SCM_RIGHTS.
/// The holder index the engine has for this process, or None if it refused.
fn join_raw(att: u64, holder: u32, memfd: i32) -> Option<u32> {
    let fd = state::connect_engine_raw();
    if fd < 0 {
        return None;
    }
    let mut frame = [0u8; 128];
    let mut at = 4;
    for (part, v) in [(&b"{\"op\":\"join\",\"attachment\":"[..], att as i64), (&b",\"holder\":"[..], holder as i64)] {
        frame[at..at + part.len()].copy_from_slice(part);
        at += part.len();
        put_num(&mut frame, &mut at, v);
    }
    frame[at] = b'}';
    at += 1;
    frame[..4].copy_from_slice(&((at - 4) as u32).to_le_bytes());
    // SAFETY: msghdr, iovec and the control buffer are live stack data for both calls; raw
    // system calls only.
    let ok = unsafe {
        let mut cbuf = [0u64; 8];
        let mut iov = libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: at };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), memfd);
        let sent = libc::syscall(libc::SYS_sendmsg, fd, &msg, libc::MSG_NOSIGNAL) == at as i64;
        // The reply: its doorbells arrive close-on-exec and go with this image; only "ok" matters.
        let mut reply = [0u8; 256];
        let mut got = 0usize;
        while sent && got < reply.len() {
            iov = libc::iovec { iov_base: reply.as_mut_ptr().add(got).cast(), iov_len: reply.len() - got };
            msg.msg_iov = &mut iov;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            let n = libc::syscall(libc::SYS_recvmsg, fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n <= 0 {
                break;
            }
            got += n as usize;
            if got >= 4 && got >= 4 + u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize {
                break;
            }
        }
        const OK: &[u8] = b"\"ok\":true";
        const HOLDER_IS: &[u8] = b"\"holder\":";
        let reply = &reply[4.min(got)..got];
        let at = reply.windows(HOLDER_IS.len()).position(|w| w == HOLDER_IS).map(|i| i + HOLDER_IS.len());
        let digits = at.map(|i| {
            let end = reply[i..].iter().position(|b| !b.is_ascii_digit()).map_or(reply.len(), |e| i + e);
            &reply[i..end]
        });
        match digits.and_then(parse_u64) {
            Some(h) if sent && h < 64 && reply.windows(OK.len()).any(|w| w == OK) => Some(h as u32),
            _ => None,
        }
    };
    netkernel_ring::sys::close(fd);
    ok
}

/// Writes `NETKERNEL_INHERIT=att,holder,memfd,ctl;ino:slot,...` and the new
/// environment array into the handoff's mapping.
fn write_env(h: &mut Handoff, att: u64, holder: u32, envp: *const *const c_char, n: usize) {
    // SAFETY: the mapping is `len` bytes: bitmap, then (n + 2) pointers, then the string.
    let (arr, out) = unsafe {
        let arr = std::slice::from_raw_parts_mut(h.base.add(BITMAP) as *mut *const c_char, n + 2);
        let out = std::slice::from_raw_parts_mut(h.base.add(BITMAP + (n + 2) * 8), ENV_MAX);
        (arr, out)
    };
    let mut at = VAR.len();
    out[..at].copy_from_slice(VAR);
    for (i, v) in [att as i64, holder as i64].into_iter().chain(h.dups.map(|f| f as i64)).enumerate() {
        if i > 0 {
            out[at] = b',';
            at += 1;
        }
        put_num(out, &mut at, v);
    }
    out[at] = b';';
    at += 1;
    for s in h.slots() {
        if at + 32 >= ENV_MAX {
            raw_warn(b"netkernel: too many inherited sockets; the rest are not served after exec\n");
            break;
        }
        put_num(out, &mut at, SLOT_INO[s as usize].load(Ordering::Relaxed) as i64);
        out[at] = b':';
        at += 1;
        put_num(out, &mut at, s as i64);
        out[at] = b',';
        at += 1;
    }
    out[at] = 0;
    let mut k = 0;
    for i in 0..n {
        // SAFETY: envp has n entries (counted by the caller).
        let e = unsafe { *envp.add(i) };
        // SAFETY: each entry is a C string; compared byte by byte up to its NUL.
        let ours = VAR.iter().enumerate().all(|(j, &c)| unsafe { *e.add(j) } as u8 == c);
        if !ours {
            arr[k] = e;
            k += 1;
        }
    }
    arr[k] = out.as_ptr().cast();
    arr[k + 1] = std::ptr::null();
    h.envp = arr.as_ptr();
}

/// What the old program passed, parsed.
struct Passed {
    att: u64,
    holder: u32,
    fds: [i32; 2],
    socks: Vec<(u64, u32)>,
}

fn parse(v: &str) -> Option<Passed> {
    let (head, list) = v.split_once(';')?;
    let nums: Vec<i64> = head.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [att, holder, memfd, ctl] = nums[..] else { return None };
    let socks = list
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (ino, slot) = e.split_once(':')?;
            Some((ino.parse().ok()?, slot.parse().ok().filter(|&s| s < SLOT_COUNT)?))
        })
        .collect::<Option<_>>()?;
    Some(Passed { att: att as u64, holder: u32::try_from(holder).ok()?, fds: [memfd as i32, ctl as i32], socks })
}

/// This program's open fds that are sockets, with their inodes.
fn own_sockets() -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|fd| Some((fd, state::socket_ino(fd)?)))
        .collect()
}

/// At load: rejoins the attachment the program that exec'd this one passed on, if any.
pub fn rejoin_at_load() {
    let Some(v) = std::env::var_os("NETKERNEL_INHERIT") else { return };
    // Consumed here, so it reaches no further program than this one (a later exec passes its own).
    std::env::remove_var("NETKERNEL_INHERIT");
    let Some(p) = v.to_str().and_then(parse) else {
        state::warn("malformed NETKERNEL_INHERIT; inherited sockets are not served");
        return;
    };
    let mine = own_sockets();
    let inherited: Vec<(i32, u32)> =
        mine.iter().filter_map(|&(fd, ino)| p.socks.iter().find(|&&(i, _)| i == ino).map(|&(_, s)| (fd, s))).collect();
    let fail = |why: String| {
        // The sockets cannot be served: they fail at once rather than idle as the kernel
        // sockets that reserve their numbers.
        inherited.iter().for_each(|&(fd, _)| state::mark_stale(fd));
        p.fds.iter().filter(|&&f| f >= 0).for_each(|&f| netkernel_ring::sys::close(f));
        state::warn(&format!("inherited sockets are not served (they fail with ECONNRESET): {why}"));
    };
    if p.att == 0 {
        return fail("the program that exec'd this one could not pass its attachment".into());
    }
    let region = match netkernel_ring::region::Region::map(p.fds[0]) {
        Ok(r) if r.header().attachment_id == p.att => r,
        Ok(_) => return fail("the region passed is another attachment's".into()),
        Err(e) => return fail(format!("cannot map the region passed: {e}")),
    };
    if region.header().state.load(Ordering::Acquire) == netkernel_abi::STATE_DEAD {
        return fail("its NSM is gone".into());
    }
    for &fd in &p.fds {
        if fd >= 0 {
            // SAFETY: integers only, no memory passed; the kernel checks fd. (An fd passed to us
            // must not leak into further execs.)
            unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    let (ctl, holder, bells) = match join(p.fds[1], p.att, p.holder, p.fds[0]) {
        Ok(x) => x,
        Err(e) => return fail(format!("the engine did not take this program as their holder: {e}")),
    };
    state::adopt_inherited(
        Attachment {
            region,
            memfd: p.fds[0],
            nsm_bell: state::hide_fd(bells[0]),
            guest_bell: state::hide_fd(bells[1]),
            ctl: std::sync::atomic::AtomicI32::new(ctl),
        },
        holder,
    );
    for &(fd, slot) in &inherited {
        SLOT_INO[slot as usize].store(mine.iter().find(|m| m.0 == fd).map_or(0, |m| m.1), Ordering::Relaxed);
        state::map_fd(fd, slot);
    }
    // Sockets passed on that this program does not have (a spawn's file actions closed them):
    // give up its claim (the NSM closes any that nobody else holds).
    for &(_, slot) in p.socks.iter().filter(|(_, s)| !inherited.iter().any(|i| i.1 == *s)) {
        crate::sock::close_slot(slot);
    }
}

/// Tells the engine this process holds attachment `id` as `holder`, proving it with the
/// region's memfd, on the control connection passed on (`ctl`) or a new one. Returns the
/// connection, the holder index the engine has for this process (the one passed, unless it
/// held the attachment already) and the doorbells the engine hands back.
fn join(ctl: i32, id: u64, holder: u32, memfd: i32) -> Result<(i32, u32, [i32; 2]), String> {
    // A connection passed from before an engine restart leads nowhere: use a new one.
    let ctl = if ctl >= 0 && !state::engine_conn_alive(ctl) {
        netkernel_ring::sys::close(ctl);
        -1
    } else {
        ctl
    };
    let fd = if ctl >= 0 { ctl } else { state::connect_engine()? };
    let req = EngineRequest::Join { attachment: id, holder };
    match state::engine_call::<JoinReply>(fd, &req, &[memfd]) {
        Ok((reply, bells)) if bells.len() == 2 => Ok((fd, reply.holder, [bells[0], bells[1]])),
        Ok((_, other)) => {
            other.iter().for_each(|&f| netkernel_ring::sys::close(f));
            Err("no doorbells in the reply".into())
        }
        Err(e) => {
            if ctl < 0 {
                netkernel_ring::sys::close(fd);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_the_variable_round_trip() {
        let mut out = [0u8; 64];
        let mut at = 0;
        for v in [0i64, 7, -1, 1234567890123] {
            put_num(&mut out, &mut at, v);
            out[at] = b',';
            at += 1;
        }
        assert_eq!(&out[..at], b"0,7,-1,1234567890123,");
        assert_eq!(parse_u64(b"801"), Some(801));
        assert_eq!(parse_u64(b"8x"), None);
        let p = parse("12,3,805,-1;4711:0,4712:16383,").unwrap();
        assert_eq!((p.att, p.holder, p.fds), (12, 3, [805, -1]));
        assert_eq!(p.socks, vec![(4711, 0), (4712, 16383)]);
        assert!(parse("12,4294967296,805,-1;").is_none(), "holder out of range");
        assert!(parse("12,3,805,-1;1:16384,").is_none(), "slot out of range");
        assert!(parse("12,3,805;").is_none(), "missing field");
    }
}
