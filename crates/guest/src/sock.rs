//! Socket calls on NetKernel sockets. The NSM runs every call non-blocking on its stack and
//! returns the stack's own result and errno; blocking, timeouts, MSG_WAITALL and SIGPIPE are
//! done here, the way the kernel does them for a blocking socket.

use crate::state::{
    self, attachment, sock_state, Attachment, Errno, F_INET6, F_LISTEN, F_NONBLOCK, F_STREAM, F_WR_SHUT,
};
use libc::{c_int, iovec, sockaddr, socklen_t};
use netkernel_abi::{Op, RecvControl, ADDR_MAX, BUF_SIZE, CONNECT_BLOCKING, CONTROL_MAX, RECV_CONTROL, SEND_CONTROL};
use std::mem::size_of;
use std::sync::atomic::Ordering;

fn live() -> Result<&'static Attachment, Errno> {
    match state::current() {
        Some(a) if !a.dead() => Ok(a),
        _ => Err(libc::ECONNRESET),
    }
}

fn blocking(slot: u32, flags: c_int) -> bool {
    flags & libc::MSG_DONTWAIT == 0 && sock_state(slot).flags.load(Ordering::Relaxed) & F_NONBLOCK == 0
}

/// A real kernel socket that holds the fd number of a NetKernel socket, so numbering, fstat,
/// FD_CLOEXEC and close behave as for any socket (DESIGN.md D6). It never carries traffic.
fn reserve_fd(inet6: bool, ty: c_int) -> Result<c_int, Errno> {
    let domain = if inet6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: integers only, no memory passed.
    let fd = unsafe { libc::syscall(libc::SYS_socket, domain, ty, 0) } as c_int;
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EMFILE));
    }
    if fd as usize >= state::MAX_FD {
        netkernel_ring::sys::close(fd);
        return Err(libc::EMFILE);
    }
    if ty & 0xf == libc::SOCK_DGRAM {
        // A program without GuestLib that inherits this fd (exec'd with LD_PRELOAD removed)
        // then reads EOF from it instead of blocking forever on a socket nobody sends to.
        // SAFETY: integers only, no memory passed; the kernel checks fd (and shuts even an
        // unconnected socket).
        unsafe { libc::syscall(libc::SYS_shutdown, fd, libc::SHUT_RDWR) };
    }
    Ok(fd)
}

/// Binds a new fd to a fresh NSM socket slot.
fn adopt(slot: u32, inet6: bool, ty: c_int) -> Result<c_int, Errno> {
    let fd = match reserve_fd(inet6, ty) {
        Ok(fd) => fd,
        Err(e) => {
            close_slot(slot);
            return Err(e);
        }
    };
    let st = sock_state(slot);
    let mut f = 0;
    if ty & libc::SOCK_NONBLOCK != 0 {
        f |= F_NONBLOCK;
    }
    if ty & 0xf == libc::SOCK_STREAM {
        f |= F_STREAM;
    }
    if inet6 {
        f |= F_INET6;
    }
    st.flags.store(f, Ordering::Relaxed);
    st.rcvtimeo_us.store(0, Ordering::Relaxed);
    st.sndtimeo_us.store(0, Ordering::Relaxed);
    st.gen.fetch_add(1, Ordering::Release);
    state::SLOT_INO[slot as usize].store(state::socket_ino(fd).unwrap_or(0), Ordering::Relaxed);
    state::map_fd(fd, slot);
    Ok(fd)
}

pub fn socket(domain: c_int, ty: c_int, proto: c_int) -> Result<c_int, Errno> {
    let a = attachment()?;
    let base = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
    let c = a.call(|w| {
        w.set(Op::Socket, 0);
        w.args(domain as u64, base as u64);
        w.flags(proto as u32);
    })?;
    let slot = c.result()? as u32;
    drop(c);
    adopt(slot, domain == libc::AF_INET6, ty)
}

/// Tells the NSM the last fd of a socket is gone.
pub fn close_slot(slot: u32) {
    if let Ok(a) = live() {
        drop(a.call(|w| w.set(Op::Close, slot)));
    }
}

fn addr_in(addr: *const sockaddr, len: socklen_t) -> Result<(*const u8, usize), Errno> {
    if len as usize > ADDR_MAX {
        return Err(libc::EINVAL);
    }
    if addr.is_null() && len > 0 {
        return Err(libc::EFAULT);
    }
    Ok((addr.cast(), len as usize))
}

/// Copies an address out as the kernel does: truncated to the caller's length, which is then
/// set to the full length.
///
/// # Safety
/// `addr`/`len` are null or valid as for accept(2).
pub unsafe fn addr_out(src: &[u8], full: usize, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    // SAFETY: the caller passed a buffer of *len bytes, as accept(2) requires.
    unsafe {
        let n = (*len as usize).min(full);
        std::ptr::copy_nonoverlapping(src.as_ptr(), addr.cast::<u8>(), n);
        *len = full as socklen_t;
    }
}

/// One call that takes an address (bind, connect).
fn addr_call(op: Op, slot: u32, addr: *const sockaddr, len: socklen_t) -> Result<(i64, u32), Errno> {
    addr_call_flags(op, slot, 0, addr, len)
}

fn addr_call_flags(op: Op, slot: u32, flags: u32, addr: *const sockaddr, len: socklen_t) -> Result<(i64, u32), Errno> {
    let (p, n) = addr_in(addr, len)?;
    let a = live()?;
    let c = a.call(|w| {
        w.set(op, slot);
        w.flags(flags);
        w.addr(p, n);
    })?;
    c.result().map(|r| (r, c.seq()))
}

pub fn bind(slot: u32, addr: *const sockaddr, len: socklen_t) -> Result<c_int, Errno> {
    addr_call(Op::Bind, slot, addr, len).map(|_| 0)
}

pub fn listen(slot: u32, backlog: c_int) -> Result<c_int, Errno> {
    let c = live()?.call(|w| {
        w.set(Op::Listen, slot);
        w.flags(backlog as u32);
    })?;
    c.result()?;
    sock_state(slot).flags.fetch_or(F_LISTEN, Ordering::Relaxed);
    Ok(0)
}

/// What the slot's mask, kept current by the NSM after every call and wakeup, says about `want`
/// (POLLIN or POLLOUT). Ok(()) when a call may make progress now (or fail: errors and hangups
/// count); otherwise the guest waits (blocking) or answers EAGAIN (non-blocking) without a
/// round trip to the NSM, as the kernel would with nothing queued.
fn ready_or_wait(a: &Attachment, slot: u32, want: u32, flags: c_int, timeout_us: u64) -> Result<(), Errno> {
    let any = want | (libc::POLLERR | libc::POLLHUP | libc::POLLRDHUP) as u32;
    let s = a.region.slot(slot);
    let mut refreshed = false;
    loop {
        let seq = s.seq.load(Ordering::Acquire);
        if s.mask.load(Ordering::Acquire) & any != 0 || a.dead() {
            return Ok(());
        }
        if !blocking(slot, flags) {
            if !refreshed && async_pending(a) {
                refresh(a, slot);
                refreshed = true;
                continue;
            }
            return Err(libc::EAGAIN);
        }
        a.wait_slot(slot, seq, timeout_us)?;
    }
}

/// Whether asynchronous sends of this attachment may not have reached their peers yet: the
/// sender's call returned before the NSM ran them, so a loopback peer's mask may lag what
/// Linux, which delivers loopback synchronously, would show.
pub fn async_pending(a: &Attachment) -> bool {
    a.region.header().guest_async_nqes.load(Ordering::Acquire) != 0
}

/// Waits until the NSM has run everything this attachment queued and published the readiness
/// that changed meanwhile (IOCTL_REFRESH). Submitting reclaims finished asynchronous sends, so
/// a refresh is asked for at most once per burst of them.
pub fn refresh(a: &Attachment, slot: u32) {
    drop(a.call(|w| {
        w.set(Op::Ioctl, slot);
        w.args(0, netkernel_abi::IOCTL_REFRESH);
    }));
}

/// # Safety
/// `addr`/`len` as for accept4(2).
pub unsafe fn accept(slot: u32, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> Result<c_int, Errno> {
    if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
        return Err(libc::EINVAL);
    }
    let st = sock_state(slot);
    let Ok(a) = live() else { return Err(state::dead_accept(st)) };
    loop {
        ready_or_wait(a, slot, libc::POLLIN as u32, 0, st.rcvtimeo_us.load(Ordering::Relaxed))?;
        let c = a.call(|w| w.set(Op::Accept, slot))?;
        match c.result() {
            Ok(new) => {
                let (sa, full) = c.addr();
                drop(c);
                let fd = adopt(new as u32, st.flags.load(Ordering::Relaxed) & F_INET6 != 0, libc::SOCK_STREAM | flags)?;
                // SAFETY: addr and len are the caller's, valid (or null) as accept(2) and
                // getsockname(2) require: addr_out's contract.
                unsafe { addr_out(&sa, full, addr, len) };
                return Ok(fd);
            }
            Err(libc::EAGAIN) if blocking(slot, 0) => {
                let seq = c.seq();
                drop(c);
                a.wait_slot(slot, seq, st.rcvtimeo_us.load(Ordering::Relaxed))?;
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn connect(slot: u32, addr: *const sockaddr, len: socklen_t) -> Result<c_int, Errno> {
    // A blocking connect is a non-blocking one, a wait for writability, and a second connect
    // that reports the outcome (0, or the error that ended the attempt) and moves the socket
    // to connected, so a third connect says EISCONN: what the kernel does internally.
    let wait = blocking(slot, 0);
    match addr_call_flags(Op::Connect, slot, if wait { CONNECT_BLOCKING } else { 0 }, addr, len) {
        Ok(_) => return Ok(0),
        Err(libc::EINPROGRESS) if wait => {}
        Err(e) => return Err(e),
    }
    let a = live()?;
    let s = a.region.slot(slot);
    let timeout = sock_state(slot).sndtimeo_us.load(Ordering::Relaxed);
    let done = (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) as u32;
    loop {
        let seen = s.seq.load(Ordering::Acquire);
        if s.mask.load(Ordering::Acquire) & done != 0 || a.dead() {
            match addr_call(Op::Connect, slot, addr, len) {
                Err(libc::EALREADY) => {}
                r => return r.map(|_| 0),
            }
        }
        match a.wait_slot(slot, seen, timeout) {
            Ok(()) => {}
            Err(libc::EAGAIN) => return Err(libc::EINPROGRESS),
            Err(e) => return Err(e),
        }
    }
}

fn iov_total(iov: &[iovec]) -> usize {
    iov.iter().map(|v| v.iov_len).fold(0usize, |a, b| a.saturating_add(b))
}

/// Which way `copy_iov` copies.
#[derive(Clone, Copy, PartialEq)]
enum Dir {
    /// From the iovecs into the buffer (a send).
    Gather,
    /// From the buffer into the iovecs (a receive).
    Scatter,
}

/// Copies `len` bytes between `buf` and the iovecs, starting at byte `skip` of the iovecs.
///
/// # Safety
/// The iovecs describe readable (Gather) or writable (Scatter) memory; `buf` holds `len` bytes.
unsafe fn copy_iov(iov: &[iovec], mut skip: usize, buf: *mut u8, mut len: usize, dir: Dir) {
    let mut at = 0;
    for v in iov {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        let user = (v.iov_base as *mut u8).wrapping_add(skip);
        // SAFETY: within the iovec and within buf, per the contract.
        unsafe {
            match dir {
                Dir::Gather => std::ptr::copy_nonoverlapping(user, buf.add(at), n),
                Dir::Scatter => std::ptr::copy_nonoverlapping(buf.add(at), user, n),
            }
        }
        at += n;
        len -= n;
        skip = 0;
    }
}

/// What a stream call that moved `done` bytes returns when it stops on `e`: the bytes, if any
/// (the error shows on the next call, as on Linux), else the error.
fn partial(done: usize, e: Errno) -> Result<usize, Errno> {
    if done > 0 {
        Ok(done)
    } else {
        Err(e)
    }
}

fn raise_sigpipe() {
    // SAFETY: signals this thread, as the kernel does on EPIPE without MSG_NOSIGNAL.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::syscall(libc::SYS_gettid), libc::SIGPIPE);
    }
}

/// send/sendto/sendmsg/write/writev.
///
/// # Safety
/// `iov` describes readable memory; `to` is null or a sockaddr of `to_len` bytes.
pub unsafe fn send(
    slot: u32,
    iov: &[iovec],
    flags: c_int,
    to: *const sockaddr,
    to_len: socklen_t,
) -> Result<usize, Errno> {
    // SAFETY: per this function's contract.
    unsafe { send_msg(slot, iov, flags, to, to_len, &[]) }
}

/// send with control messages (sendmsg's msg_control), which go to the stack with the data.
///
/// # Safety
/// As for `send`.
pub unsafe fn send_msg(
    slot: u32,
    iov: &[iovec],
    flags: c_int,
    to: *const sockaddr,
    to_len: socklen_t,
    control: &[u8],
) -> Result<usize, Errno> {
    if control.len() > CONTROL_MAX as usize {
        // More than GuestLib carries; Linux's own limit (optmem_max) answers the same way.
        return Err(libc::ENOBUFS);
    }
    let (to, to_len) = addr_in(to, to_len)?;
    let a = live()?;
    let st = sock_state(slot);
    let stream = st.flags.load(Ordering::Relaxed) & F_STREAM != 0;
    // Listening sockets: the kernel answers recv/send with an error, which only it can give.
    let listening = st.flags.load(Ordering::Relaxed) & F_LISTEN != 0;
    let wr_shut = st.flags.load(Ordering::Relaxed) & F_WR_SHUT != 0;
    let total = iov_total(iov);
    let room = BUF_SIZE as usize - control.len();
    if !stream && total > room {
        return Err(libc::EMSGSIZE);
    }
    let nsm_flags = (flags & !(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)) as u32;
    // A TCP send the socket can take right now need not wait for the NSM: it queues what the
    // stack does not take at once, and an error shows on the next call (as a kernel socket's
    // pending error would). Anything unusual goes the synchronous way.
    if stream
        && !listening
        && !wr_shut
        && to.is_null()
        && control.is_empty()
        && total > 0
        && total <= ASYNC_MAX
        && nsm_flags == 0
    {
        let s = a.region.slot(slot);
        let m = s.mask.load(Ordering::Acquire);
        let out = libc::POLLOUT as u32;
        // After the peer's FIN a send may draw a reset, which Linux reports to the next send:
        // such sends wait for their result.
        let bad = (libc::POLLERR | libc::POLLHUP | libc::POLLRDHUP) as u32;
        if m & out != 0 && m & bad == 0 && s.queued.load(Ordering::Acquire) == 0 {
            a.call_async(|w| {
                w.set(Op::Send, slot);
                w.flags(netkernel_abi::SEND_ASYNC);
                // SAFETY: per this function's contract; the nqe buffer holds BUF_SIZE bytes.
                unsafe { copy_iov(iov, 0, w.buf(), total, Dir::Gather) };
                w.use_buf(total);
            })?;
            return Ok(total);
        }
    }
    let mut sent = 0usize;
    loop {
        if !listening {
            let timeout = st.sndtimeo_us.load(Ordering::Relaxed);
            if let Err(e) = ready_or_wait(a, slot, libc::POLLOUT as u32, flags, timeout) {
                return partial(sent, e);
            }
        }
        let chunk = (total - sent).min(room);
        let c = match a.call(|w| {
            w.set(Op::Send, slot);
            w.flags(nsm_flags);
            // SAFETY: per this function's contract; the nqe buffer holds BUF_SIZE bytes, of
            // which room for the data and the control messages after it.
            unsafe {
                copy_iov(iov, sent, w.buf(), chunk, Dir::Gather);
                if !control.is_empty() {
                    std::ptr::copy_nonoverlapping(control.as_ptr(), w.buf().add(chunk), control.len());
                    w.args(SEND_CONTROL | control.len() as u64, 0);
                }
            }
            w.use_buf(chunk);
            if !to.is_null() {
                w.addr(to, to_len);
            }
        }) {
            Ok(c) => c,
            Err(e) => return partial(sent, e),
        };
        match c.result() {
            Ok(n) => {
                sent += n as usize;
                if sent >= total || !stream || n == 0 {
                    return Ok(sent);
                }
            }
            Err(libc::EAGAIN) if blocking(slot, flags) => {
                let seq = c.seq();
                drop(c);
                if let Err(e) = a.wait_slot(slot, seq, st.sndtimeo_us.load(Ordering::Relaxed)) {
                    return partial(sent, e);
                }
            }
            Err(e) => {
                if sent == 0 && e == libc::EPIPE && flags & libc::MSG_NOSIGNAL == 0 {
                    raise_sigpipe();
                }
                return partial(sent, e);
            }
        }
    }
}

/// The largest send that may go asynchronously. Bulk writes gain nothing from not waiting (the
/// stack rarely takes them whole, and the NSM would copy the rest aside); request/response
/// traffic gains a round trip per write.
const ASYNC_MAX: usize = 32 * 1024;

/// sendfile(2) to a NetKernel socket: the file is read in pieces and each piece sent as by
/// send(); the file offset (or `*off`) advances by what was sent, as the kernel's does.
///
/// # Safety
/// `off` is null or valid.
pub unsafe fn sendfile(slot: u32, inp: c_int, off: *mut libc::off_t, count: usize) -> Result<usize, Errno> {
    let mut buf = vec![0u8; count.min(BUF_SIZE as usize)];
    let mut done = 0usize;
    while done < count {
        let want = (count - done).min(buf.len());
        // SAFETY: reading into our own buffer; `off` per the contract.
        let n = unsafe {
            match off.as_mut() {
                Some(o) => libc::syscall(libc::SYS_pread64, inp, buf.as_mut_ptr(), want, *o + done as libc::off_t),
                None => libc::syscall(libc::SYS_read, inp, buf.as_mut_ptr(), want),
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            return if done > 0 { Ok(done) } else { Err(e) };
        }
        if n == 0 {
            break;
        }
        let iov = [iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: n as usize }];
        // SAFETY: iov describes our own buffer.
        let sent = match unsafe { send(slot, &iov, 0, std::ptr::null(), 0) } {
            Ok(m) => m,
            Err(e) => {
                unread(inp, off, n as i64);
                return if done > 0 { Ok(done) } else { Err(e) };
            }
        };
        done += sent;
        if sent < n as usize {
            unread(inp, off, n as i64 - sent as i64);
            break;
        }
    }
    // SAFETY: `off` per the contract.
    if let Some(o) = unsafe { off.as_mut() } {
        *o += done as libc::off_t;
    }
    Ok(done)
}

/// Gives back file bytes read but not sent: with no explicit offset, the file position moves
/// back; with one, nothing was moved.
fn unread(inp: c_int, off: *mut libc::off_t, n: i64) {
    if off.is_null() && n > 0 {
        // SAFETY: integers only, no memory passed; the kernel checks inp.
        unsafe { libc::syscall(libc::SYS_lseek, inp, -n, libc::SEEK_CUR) };
    }
}

/// What a receive returned besides its byte count. For recvmsg, `control` is the caller's
/// control buffer (null with a capacity of 0 is a real request: the kernel then reports
/// MSG_CTRUNC for what did not fit).
pub struct RecvInfo {
    pub from: [u8; ADDR_MAX],
    pub from_len: usize,
    pub truncated: bool,
    pub control: Option<(*mut u8, usize)>,
    /// msg_controllen and msg_flags (MSG_CTRUNC, MSG_OOB) as the NSM's recvmsg returned them.
    pub control_len: usize,
    pub msg_flags: c_int,
}

impl Default for RecvInfo {
    fn default() -> Self {
        RecvInfo { from: [0; ADDR_MAX], from_len: 0, truncated: false, control: None, control_len: 0, msg_flags: 0 }
    }
}

/// recv/recvfrom/recvmsg/read/readv.
///
/// # Safety
/// `iov` describes writable memory.
pub unsafe fn recv(slot: u32, iov: &[iovec], flags: c_int, info: &mut RecvInfo) -> Result<usize, Errno> {
    let a = live()?;
    let st = sock_state(slot);
    let stream = st.flags.load(Ordering::Relaxed) & F_STREAM != 0;
    let listening = st.flags.load(Ordering::Relaxed) & F_LISTEN != 0;
    let total = iov_total(iov);
    let waitall = stream && flags & libc::MSG_WAITALL != 0 && flags & (libc::MSG_PEEK | libc::MSG_OOB) == 0;
    let user_trunc = flags & libc::MSG_TRUNC != 0;
    // Datagrams: always learn the real length, to report truncation as the kernel does.
    let mut nsm_flags = flags & !(libc::MSG_WAITALL | libc::MSG_DONTWAIT);
    if !stream {
        nsm_flags |= libc::MSG_TRUNC;
    }
    // Urgent data is never waited for: Linux answers at once (EAGAIN, EINVAL or the byte), and
    // the slot's POLLIN says nothing about it.
    let urgent = flags & libc::MSG_OOB != 0;
    // The control buffer's room travels after the data, in the same nqe buffer.
    let control_cap = info.control.map_or(0, |(_, cap)| cap.min(CONTROL_MAX as usize));
    let room = BUF_SIZE as usize - if info.control.is_some() { control_cap + size_of::<RecvControl>() } else { 0 };
    let mut got = 0usize;
    loop {
        if !listening && !urgent {
            let timeout = st.rcvtimeo_us.load(Ordering::Relaxed);
            // With urgent data waiting the call goes to the stack even without POLLIN: there
            // it skips the urgent byte, as Linux's would.
            let want = (libc::POLLIN | libc::POLLPRI) as u32 | netkernel_abi::MASK_AT_MARK;
            if let Err(e) = ready_or_wait(a, slot, want, flags, timeout) {
                return partial(got, e);
            }
        }
        let chunk = (total - got).min(room);
        let c = match a.call(|w| {
            w.set(Op::Recv, slot);
            w.flags(nsm_flags as u32);
            w.use_buf(chunk);
            if info.control.is_some() {
                w.args(RECV_CONTROL | control_cap as u64, 0);
                // An NSM that does not know RECV_CONTROL leaves this: no ancillary data.
                // SAFETY: the header lies within this nqe's buffer (room keeps it there).
                unsafe { std::ptr::write_unaligned(w.buf().add(chunk).cast::<RecvControl>(), RecvControl::default()) };
            }
        }) {
            Ok(c) => c,
            Err(e) => return partial(got, e),
        };
        match c.result() {
            Ok(n) => {
                let n = n as usize;
                if let Some((dst, _)) = info.control {
                    // SAFETY: the NSM wrote a RecvControl after the chunk and at most
                    // control_cap bytes after it; dst has room for control_cap bytes.
                    unsafe {
                        let at = c.buf().add(chunk);
                        let h = std::ptr::read_unaligned(at.cast::<RecvControl>());
                        let len = (h.len as usize).min(control_cap);
                        // A stream read in several pieces reports the last piece's messages.
                        if len > 0 || got == 0 {
                            std::ptr::copy_nonoverlapping(at.add(size_of::<RecvControl>()), dst, len);
                            info.control_len = len;
                        }
                        info.msg_flags |= h.flags as c_int & (libc::MSG_CTRUNC | libc::MSG_OOB);
                    }
                }
                let copied = n.min(chunk);
                if !(stream && user_trunc) {
                    // SAFETY: the NSM wrote `copied` bytes to the buffer; iov per contract.
                    unsafe { copy_iov(iov, got, c.buf() as *mut u8, copied, Dir::Scatter) };
                }
                if got == 0 {
                    let (from, len) = c.addr();
                    info.from = from;
                    info.from_len = len;
                }
                if !stream {
                    info.truncated = n > chunk;
                    return Ok(if user_trunc { n } else { copied });
                }
                got += n;
                if !waitall || n == 0 || got >= total {
                    return Ok(got);
                }
            }
            Err(libc::EAGAIN) if blocking(slot, flags) && !urgent => {
                let seq = c.seq();
                drop(c);
                if let Err(e) = a.wait_slot(slot, seq, st.rcvtimeo_us.load(Ordering::Relaxed)) {
                    return partial(got, e);
                }
            }
            Err(e) => return partial(got, e),
        }
    }
}

pub fn shutdown(slot: u32, how: c_int) -> Result<c_int, Errno> {
    let c = live()?.call(|w| {
        w.set(Op::Shutdown, slot);
        w.flags(how as u32);
    })?;
    c.result()?;
    if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
        sock_state(slot).flags.fetch_or(F_WR_SHUT, Ordering::Relaxed);
    }
    Ok(0)
}

/// getsockname / getpeername.
///
/// # Safety
/// `addr`/`len` as for getsockname(2).
pub unsafe fn name(slot: u32, peer: bool, addr: *mut sockaddr, len: *mut socklen_t) -> Result<c_int, Errno> {
    if addr.is_null() || len.is_null() {
        return Err(libc::EFAULT);
    }
    let c = live()?.call(|w| w.set(if peer { Op::GetPeerName } else { Op::GetSockName }, slot))?;
    c.result()?;
    let (sa, full) = c.addr();
    // SAFETY: addr and len are the caller's, valid (or null) as accept(2) and getsockname(2)
    // require: addr_out's contract.
    unsafe { addr_out(&sa, full, addr, len) };
    Ok(0)
}

fn timeval_us(p: *const u8, len: usize) -> u64 {
    if len < std::mem::size_of::<libc::timeval>() {
        return 0;
    }
    // SAFETY: len covers a timeval.
    let tv = unsafe { std::ptr::read_unaligned(p.cast::<libc::timeval>()) };
    (tv.tv_sec.max(0) as u64).saturating_mul(1_000_000).saturating_add(tv.tv_usec.max(0) as u64)
}

/// # Safety
/// `val`/`len` as for getsockopt(2).
pub unsafe fn getsockopt(
    slot: u32,
    level: c_int,
    name: c_int,
    val: *mut u8,
    len: *mut socklen_t,
) -> Result<c_int, Errno> {
    if len.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: len is non-null and the caller's.
    let cap = unsafe { *len } as usize;
    if (cap as i32) < 0 {
        return Err(libc::EINVAL);
    }
    let cap = cap.min(BUF_SIZE as usize);
    if val.is_null() && cap > 0 {
        return Err(libc::EFAULT);
    }
    let c = live()?.call(|w| {
        w.set(Op::GetSockOpt, slot);
        w.args(level as u64, name as u64);
        // SAFETY: the kernel reads the input value for a few options (e.g. TCP_INFO versions).
        unsafe { std::ptr::copy_nonoverlapping(val, w.buf(), cap) };
        w.use_buf(cap);
    })?;
    let n = c.result()? as usize;
    // SAFETY: val has room for cap bytes; the NSM wrote n of them.
    unsafe {
        std::ptr::copy_nonoverlapping(c.buf(), val, n.min(cap));
        *len = n as socklen_t;
    }
    Ok(0)
}

/// # Safety
/// `val` points at `len` readable bytes.
pub unsafe fn setsockopt(slot: u32, level: c_int, name: c_int, val: *const u8, len: socklen_t) -> Result<c_int, Errno> {
    let len = len as usize;
    if len > BUF_SIZE as usize {
        return Err(libc::EINVAL);
    }
    if val.is_null() && len > 0 {
        return Err(libc::EFAULT);
    }
    let c = live()?.call(|w| {
        w.set(Op::SetSockOpt, slot);
        w.args(level as u64, name as u64);
        // A null val with len 0 is not copied: copy_nonoverlapping wants non-null even for 0.
        if len > 0 {
            // SAFETY: val points at len readable bytes (this function's contract; non-null, as
            // len > 0), and the nqe buffer holds BUF_SIZE >= len bytes (checked above) that are
            // ours until submitted.
            unsafe { std::ptr::copy_nonoverlapping(val, w.buf(), len) };
        }
        w.use_buf(len);
    })?;
    c.result()?;
    if level == libc::SOL_SOCKET {
        let st = sock_state(slot);
        match name {
            libc::SO_RCVTIMEO => st.rcvtimeo_us.store(timeval_us(val, len), Ordering::Relaxed),
            libc::SO_SNDTIMEO => st.sndtimeo_us.store(timeval_us(val, len), Ordering::Relaxed),
            _ => {}
        }
    }
    Ok(0)
}

/// FIONREAD / TIOCOUTQ / SIOCATMARK: an int the stack computes.
pub fn ioctl_int(slot: u32, req: u64) -> Result<c_int, Errno> {
    let c = live()?.call(|w| {
        w.set(Op::Ioctl, slot);
        w.args(0, req);
    })?;
    c.result().map(|v| v as c_int)
}
