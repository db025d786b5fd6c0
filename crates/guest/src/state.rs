//! GuestLib's process state: the attachment (region and doorbells), the fd table that tells a
//! NetKernel socket from any other fd, per-socket state, and the two ways a thread waits: for an
//! nqe's completion and for a socket's next wakeup.

use netkernel_abi::{nqe_state, GuestSock, Nqe, Op, ADDR_MAX, BUF_SIZE, NQE_COUNT, SHARE_ALL, SLOT_COUNT, STATE_DEAD};
use netkernel_control::{AttachReply, EngineRequest};
use netkernel_ring::doorbell;
use netkernel_ring::nqes::NqePool;
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// fds at or above this are never NetKernel sockets (the machine's limit is far below).
pub const MAX_FD: usize = 1 << 16;
/// GuestLib's own fds (control socket, doorbells, poll helpers) are moved at or above this so
/// they do not take the low numbers programs expect to get.
pub const HIDDEN_FD_MIN: i32 = 800;

pub type Errno = i32;

/// fd -> socket slot + 1 (0: not a NetKernel socket). The one load on every libc call.
static FDS: [AtomicU32; MAX_FD] = [const { AtomicU32::new(0) }; MAX_FD];

pub const F_NONBLOCK: u32 = 1;
pub const F_STREAM: u32 = 2;
pub const F_INET6: u32 = 4;
/// listen() succeeded: readiness says nothing about recv/send on it.
pub const F_LISTEN: u32 = 8;
/// shutdown(SHUT_WR) succeeded: sends fail (EPIPE), so none may go asynchronously.
pub const F_WR_SHUT: u32 = 16;
/// A listener of a dead NSM whose end an accept() reported: never ready again, as a listener
/// that will never see a connection (level-triggered servers would spin on it otherwise).
pub const F_END_TOLD: u32 = 32;

/// Whether socket `slot` of `a` (a dead attachment) has told its end already (`F_END_TOLD`).
pub fn end_told(a: &Attachment, slot: u32) -> bool {
    a.region.guest_sock(slot).flags.load(Ordering::Relaxed) & F_END_TOLD != 0
}

/// accept() on a listener whose NSM died (`st`: its state in the dead region): ECONNRESET once;
/// then a non-blocking listener is an idle one (`F_END_TOLD`). A blocking accept keeps failing
/// rather than wait for ever.
pub fn dead_accept(st: &GuestSock) -> Errno {
    let told = st.flags.fetch_or(F_END_TOLD, Ordering::Relaxed) & F_END_TOLD != 0;
    let nonblocking = st.flags.load(Ordering::Relaxed) & F_NONBLOCK != 0;
    if told && nonblocking {
        libc::EAGAIN
    } else {
        libc::ECONNRESET
    }
}

/// Dead attachments of recent epochs (by epoch modulo the table's size, with the epoch), so
/// that a stale fd still finds its socket's state: a listener told its end stays quiet.
static RETIRED: [AtomicPtr<Attachment>; 64] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 64];
static RETIRED_EPOCH: [AtomicU32; 64] = [const { AtomicU32::new(NO_EPOCH) }; 64];

/// The dead attachment and slot of stale fd `fd`, if its epoch is recent enough to be known.
pub fn stale_sock(fd: i32) -> Option<(&'static Attachment, u32)> {
    if fd < 0 || fd as usize >= MAX_FD {
        return None;
    }
    let v = FDS[fd as usize].load(Ordering::Acquire).checked_sub(1)?;
    let (epoch, slot) = (v >> 16, v & 0xffff);
    let k = epoch as usize % RETIRED.len();
    if epoch == NO_EPOCH || RETIRED_EPOCH[k].load(Ordering::Acquire) != epoch {
        return None;
    }
    // SAFETY: attachments are leaked once published and never freed.
    unsafe { RETIRED[k].load(Ordering::Acquire).as_ref() }.map(|a| (a, slot))
}

/// Guest-side state of socket `slot`, shared by every fd that refers to it in every process of
/// the attachment (dup, fork): like the kernel's open file description. It lives in the region.
pub fn sock_state(slot: u32) -> &'static GuestSock {
    // Only called for sockets of the live attachment, which exists and is never freed.
    current().expect("a NetKernel socket without an attachment").region.guest_sock(slot)
}

/// Attachments made by this process so far; fd table entries carry the one they belong to, so a
/// socket of a dead attachment is never confused with a new socket in the same slot.
static EPOCH: AtomicU32 = AtomicU32::new(0);

/// What an fd is to GuestLib.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    /// Not ours: straight to libc.
    Plain,
    /// A NetKernel socket in this slot of the live attachment.
    Sock(u32),
    /// A NetKernel socket of an attachment whose NSM died: it reports ECONNRESET.
    Stale,
}

/// What GuestLib knows of `fd`: one relaxed-cost load on every interposed call.
#[inline]
pub fn lookup(fd: i32) -> Fd {
    if fd < 0 || fd as usize >= MAX_FD {
        return Fd::Plain;
    }
    match FDS[fd as usize].load(Ordering::Acquire) {
        0 => Fd::Plain,
        v if (v - 1) >> 16 == EPOCH.load(Ordering::Relaxed) => Fd::Sock((v - 1) & 0xffff),
        _ => Fd::Stale,
    }
}

/// This process's holder id in the attachment (0: the process that attached). The NSM keeps,
/// per holder, the sockets it holds, and releases them when the process exits.
pub static HOLDER: AtomicU32 = AtomicU32::new(0);
/// The holder id the NSM gave the child this process is about to fork.
static CHILD_HOLDER: AtomicU32 = AtomicU32::new(0);
/// The NSM gave that child no id (its attachment was dying): it shares its parent's.
static CHILD_SHARES: AtomicBool = AtomicBool::new(false);
/// This process shares its parent's holder id, so the NSM cannot tell its references from
/// its parent's: it never drops one (its copies close with the parent's).
static HOLDER_SHARED: AtomicBool = AtomicBool::new(false);

/// Whether this process holds its sockets under its parent's holder index.
pub fn holder_shared() -> bool {
    HOLDER_SHARED.load(Ordering::Relaxed)
}
/// fds of this process per socket slot (private memory: a forked child starts with its
/// parent's counts, which are its own too).
pub static LOCAL_REFS: [AtomicU32; SLOT_COUNT as usize] = [const { AtomicU32::new(0) }; SLOT_COUNT as usize];
/// The inode of the kernel socket reserving each slot's fds in this process: what identifies
/// an inherited NetKernel socket across exec, whatever fd number it ended up under.
pub static SLOT_INO: [AtomicU64; SLOT_COUNT as usize] = [const { AtomicU64::new(0) }; SLOT_COUNT as usize];

/// The inode of the file behind `fd`, if it is a socket.
pub fn socket_ino(fd: i32) -> Option<u64> {
    // SAFETY: libc::stat is integers only, so all-zero bytes are a valid value (fstat overwrites
    // it).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer; a raw system call, safe in a vfork child.
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st) };
    (r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(st.st_ino)
}

/// Makes `fd` refer to `slot` (one more reference). The NSM already counts this process as a
/// holder of the socket: it made it, or this process inherited it (`Op::Share`).
pub fn map_fd(fd: i32, slot: u32) -> bool {
    if fd < 0 || fd as usize >= MAX_FD {
        return false;
    }
    LOCAL_REFS[slot as usize].fetch_add(1, Ordering::AcqRel);
    let v = (EPOCH.load(Ordering::Relaxed) << 16 | slot) + 1;
    FDS[fd as usize].store(v, Ordering::Release);
    true
}

/// Forgets `fd`; returns its slot when that was this process's last fd referring to a live
/// socket: the NSM is then told (`Op::Close`), and closes the socket if no process is left
/// holding it.
pub fn unmap_fd(fd: i32) -> Option<u32> {
    let live = lookup(fd);
    if live == Fd::Plain {
        return None;
    }
    FDS[fd as usize].store(0, Ordering::Release);
    match live {
        Fd::Sock(slot) => {
            (LOCAL_REFS[slot as usize].fetch_sub(1, Ordering::AcqRel) == 1 && !holder_shared()).then_some(slot)
        }
        _ => None,
    }
}

/// An epoch no attachment reaches: fds marked with it are stale from the start.
const NO_EPOCH: u32 = 0xffff;

/// `fd` was a NetKernel socket this process cannot serve (an inherited one whose attachment it
/// could not rejoin): it reports ECONNRESET rather than acting as the idle kernel socket that
/// reserves its number.
pub fn mark_stale(fd: i32) {
    if fd >= 0 && (fd as usize) < MAX_FD {
        FDS[fd as usize].store((NO_EPOCH << 16) + 1, Ordering::Release);
    }
}

/// `new` is a duplicate of a socket of a dead attachment: it reports ECONNRESET too.
pub fn dup_stale(old: i32, new: i32) {
    if old >= 0 && new >= 0 && (old as usize) < MAX_FD && (new as usize) < MAX_FD {
        FDS[new as usize].store(FDS[old as usize].load(Ordering::Acquire), Ordering::Release);
    }
}

/// Starts a new epoch: fds of the old attachment become stale. Socket state lives in the new
/// region, which starts zeroed.
fn new_epoch() {
    LOCAL_REFS.iter().for_each(|r| r.store(0, Ordering::Relaxed));
    HOLDER.store(0, Ordering::Relaxed);
    HOLDER_SHARED.store(false, Ordering::Relaxed);
    EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// How long a blocked thread sleeps before it looks whether the NSM still lives (where the
/// wait has a timeout to spare: see `wait_slot`).
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

/// One attachment: this process's region and doorbells.
pub struct Attachment {
    pub region: Region,
    /// The region's memfd, kept (close-on-exec) so that a program this process execs or spawns
    /// can map the region and prove to the engine that it may hold the attachment.
    pub memfd: i32,
    pub nsm_bell: i32,
    pub guest_bell: i32,
    /// Our end of the engine's control socket, kept open for the life of the process (-1 in a
    /// forked child until it needs one).
    pub ctl: AtomicI32,
}

static ATTACHMENT: AtomicPtr<Attachment> = AtomicPtr::new(std::ptr::null_mut());
static ATTACH_LOCK: AtomicBool = AtomicBool::new(false);
static WARNED: AtomicBool = AtomicBool::new(false);

pub fn warn(msg: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        let line = format!("netkernel: {msg}\n");
        // SAFETY: writes a live buffer to stderr.
        unsafe { libc::syscall(libc::SYS_write, 2, line.as_ptr(), line.len()) };
    }
}

/// Moves one of GuestLib's own fds out of the program's way (close-on-exec).
pub fn hide_fd(fd: i32) -> i32 {
    // SAFETY: fcntl on an fd we own.
    let high = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, HIDDEN_FD_MIN) } as i32;
    if high < 0 {
        return fd;
    }
    sys::close(fd);
    high
}

/// The live attachment, attaching on first use (a program that never opens a socket never
/// talks to the engine). A dead one (its NSM died) is replaced by a new attachment.
pub fn attachment() -> Result<&'static Attachment, Errno> {
    let p = ATTACHMENT.load(Ordering::Acquire);
    // SAFETY: attachments are leaked once published and never freed.
    if let Some(a) = unsafe { p.as_ref() } {
        if a.region.header().state.load(Ordering::Acquire) != STATE_DEAD {
            return Ok(a);
        }
    }
    lock(&ATTACH_LOCK);
    let r = (|| {
        let cur = ATTACHMENT.load(Ordering::Acquire);
        // SAFETY: a published attachment is leaked and never freed, so the pointer, if non-null,
        // stays valid.
        if let Some(a) = unsafe { cur.as_ref() } {
            if a.region.header().state.load(Ordering::Acquire) != STATE_DEAD {
                return Ok(a);
            }
        }
        let a = Box::leak(Box::new(attach().map_err(|msg| {
            warn(&msg);
            libc::ENETDOWN
        })?));
        // An older, dead attachment stays mapped (threads may still be reading it); its
        // sockets are stale from now on.
        if !cur.is_null() {
            let e = EPOCH.load(Ordering::Relaxed);
            let k = e as usize % RETIRED.len();
            RETIRED[k].store(cur, Ordering::Release);
            RETIRED_EPOCH[k].store(e, Ordering::Release);
            new_epoch();
        }
        // The attaching process is holder 0 of its own attachment, whatever its parent was.
        HOLDER_SHARED.store(false, Ordering::Relaxed);
        OWNER_PID.store(getpid(), Ordering::Relaxed);
        ATTACHMENT.store(a, Ordering::Release);
        Ok(&*a)
    })();
    ATTACH_LOCK.store(false, Ordering::Release);
    r
}

/// The attachment if one exists, without attaching.
pub fn current() -> Option<&'static Attachment> {
    // SAFETY: attachments are leaked once published and never freed.
    unsafe { ATTACHMENT.load(Ordering::Acquire).as_ref() }
}

/// A new connection to the engine's control socket.
pub fn connect_engine() -> Result<i32, String> {
    let path = std::env::var("NETKERNEL_SOCKET")
        .map_err(|_| "NETKERNEL_SOCKET is not set; start programs with `netkernel run`".to_string())?;
    // SAFETY: integers only, no memory passed.
    let fd =
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) } as i32;
    if fd < 0 {
        return Err(format!("control socket: {}", std::io::Error::last_os_error()));
    }
    let fd = hide_fd(fd);
    // SAFETY: libc::sockaddr_un is integers and bytes only, so all-zero bytes are a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as u16;
    if path.len() >= sa.sun_path.len() {
        sys::close(fd);
        return Err(format!("engine socket path too long: {path}"));
    }
    for (d, s) in sa.sun_path.iter_mut().zip(path.bytes()) {
        *d = s as libc::c_char;
    }
    remember_engine(&sa);
    // An engine being restarted is back within a second or so (its NSMs go on serving
    // meanwhile): wait for it, asleep, rather than fail at once or spin.
    let deadline = Instant::now() + ENGINE_WAIT;
    loop {
        // SAFETY: sa is a live sockaddr_un.
        let r =
            unsafe { libc::syscall(libc::SYS_connect, fd, &sa as *const _, std::mem::size_of::<libc::sockaddr_un>()) };
        if r == 0 {
            return Ok(fd);
        }
        let e = std::io::Error::last_os_error();
        let absent = matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT));
        if !absent || Instant::now() >= deadline {
            sys::close(fd);
            let waited = if absent { format!(" (waited {} s for it)", ENGINE_WAIT.as_secs()) } else { String::new() };
            return Err(format!("cannot reach the NetKernel engine at {path}: {e}{waited}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a connection to the engine still leads to it. The engine never speaks unasked, so
/// anything readable is its end closing (it exited; a new one may run now).
pub fn engine_conn_alive(fd: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd, no wait.
    let r = unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1, 0) };
    r == 0
}

/// How long a guest waits for an engine that does not answer (one may be restarting).
const ENGINE_WAIT: Duration = Duration::from_secs(2);

/// The engine's address, kept for a vfork child, which may not allocate to build it again.
static ENGINE_ADDR: [AtomicU8; 108] = [const { AtomicU8::new(0) }; 108];

fn remember_engine(sa: &libc::sockaddr_un) {
    for (d, &c) in ENGINE_ADDR.iter().zip(sa.sun_path.iter()) {
        d.store(c as u8, Ordering::Relaxed);
    }
}

/// A connection to the engine made with system calls alone (for a vfork child), or -1.
pub fn connect_engine_raw() -> i32 {
    // SAFETY: libc::sockaddr_un is integers and bytes only, so all-zero bytes are a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as u16;
    for (d, s) in sa.sun_path.iter_mut().zip(ENGINE_ADDR.iter()) {
        *d = s.load(Ordering::Relaxed) as libc::c_char;
    }
    if sa.sun_path[0] == 0 {
        return -1;
    }
    // SAFETY: plain system calls; sa and the timespec are live stack data.
    unsafe {
        let fd = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) as i32;
        if fd < 0 {
            return -1;
        }
        // As connect_engine: wait, asleep, for an engine being restarted.
        let nap = libc::timespec { tv_sec: 0, tv_nsec: 50_000_000 };
        for _ in 0..ENGINE_WAIT.as_millis() / 50 {
            if libc::syscall(libc::SYS_connect, fd, &sa as *const _, std::mem::size_of::<libc::sockaddr_un>()) == 0 {
                return fd;
            }
            if !matches!(*libc::__errno_location(), libc::ECONNREFUSED | libc::ENOENT) {
                break;
            }
            libc::syscall(libc::SYS_nanosleep, &nap as *const libc::timespec, std::ptr::null_mut::<libc::timespec>());
        }
        sys::close(fd);
        -1
    }
}

/// One request/response with the engine on `fd`; the reply's result and fds are returned.
pub fn engine_call<T: DeserializeOwned>(fd: i32, req: &EngineRequest, fds: &[i32]) -> Result<(T, Vec<i32>), String> {
    netkernel_control::call(fd, req, fds).map_err(|e| e.to_string())
}

fn attach() -> Result<Attachment, String> {
    let tenant = std::env::var("NETKERNEL_TENANT").ok();
    // `netkernel run --isolate` says so; the engine checks it against our network namespace.
    let isolated = std::env::var_os("NETKERNEL_ISOLATED").is_some_and(|v| v == "1");
    let token = match std::env::var("NETKERNEL_TOKEN_FILE") {
        Ok(path) => Some(
            std::fs::read_to_string(&path).map_err(|e| format!("NETKERNEL_TOKEN_FILE {path}: {e}"))?.trim().to_string(),
        ),
        Err(_) => None,
    };
    let req = EngineRequest::Attach { tenant, token, isolated };
    let mut fd = connect_engine()?;
    let fail = |fd: i32, m: String| {
        sys::close(fd);
        Err(m)
    };
    let mut asked_again = false;
    let fds = loop {
        match engine_call::<AttachReply>(fd, &req, &[]) {
            Ok((_, fds)) if fds.len() == 3 => break fds,
            Ok((_, fds)) => {
                fds.iter().for_each(|&f| sys::close(f));
                return fail(fd, "engine sent an attach reply without the region".into());
            }
            // The engine exited with our request unanswered (it is being restarted): ask the
            // next one, once. A refusal leaves the connection open.
            Err(_) if !asked_again && !engine_conn_alive(fd) => {
                sys::close(fd);
                fd = connect_engine()?;
                asked_again = true;
            }
            Err(e) => return fail(fd, format!("engine refused attachment: {e}")),
        }
    };
    let region = match Region::map(fds[0]) {
        Ok(r) => r,
        Err(e) => {
            fds.iter().for_each(|&f| sys::close(f));
            return fail(fd, e.to_string());
        }
    };
    Ok(Attachment {
        region,
        memfd: hide_fd(fds[0]),
        nsm_bell: hide_fd(fds[1]),
        guest_bell: hide_fd(fds[2]),
        ctl: AtomicI32::new(fd),
    })
}

/// Makes `a`, an attachment this process inherited across exec, the live one (the program has
/// not attached: this runs before main).
pub fn adopt_inherited(a: Attachment, holder: u32) -> &'static Attachment {
    let a = Box::leak(Box::new(a));
    HOLDER.store(holder, Ordering::Relaxed);
    HOLDER_SHARED.store(false, Ordering::Relaxed);
    OWNER_PID.store(getpid(), Ordering::Relaxed);
    ATTACHMENT.store(a, Ordering::Release);
    a
}

static CTL_LOCK: AtomicBool = AtomicBool::new(false);

/// Takes one of the locks held across a talk with the engine (which may take a while, or wait
/// for an engine that is restarting): a waiter sleeps rather than spins. Plain flags rather than
/// a Mutex, so that a forked child can reset them (the holder may be a thread it lacks).
fn lock(flag: &AtomicBool) {
    let mut spins = 0u32;
    while flag.swap(true, Ordering::Acquire) {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// fork() is about to run: asks the NSM for a holder id for the child, holding every socket
/// this process holds, before the fork, so that a parent closing its copy right away never
/// closes the child's socket. Returns the id (None: the NSM gave none, and the child shares
/// its parent's).
pub fn share_fds(a: &Attachment) -> Option<u32> {
    let h = share(a, None);
    CHILD_SHARES.store(h.is_none(), Ordering::Relaxed);
    CHILD_HOLDER.store(h.unwrap_or_else(|| HOLDER.load(Ordering::Relaxed)), Ordering::Relaxed);
    h
}

/// A holder id for a new process that will hold `slots` (None: every socket this process
/// holds). Allocation-free, so a vfork child may call it (on its parent's behalf: the nqe
/// carries the parent's holder id, whose sockets these are). Such a child may have closed the
/// doorbell (python's close_fds), so the NSM may see the request only when the engine ties the
/// child to the id (its `join` wakes the NSM): the request is not waited for, and the NSM takes
/// it before anything the child's program asks later.
pub fn share(a: &Attachment, slots: Option<&mut dyn Iterator<Item = u32>>) -> Option<u32> {
    let id = a.region.header().guest_next_holder.fetch_add(1, Ordering::AcqRel);
    let sent = a.call_async(|w| {
        w.set(Op::Share, 0);
        w.args(id as u64, 0);
        match slots {
            None => w.flags(SHARE_ALL),
            Some(slots) => {
                let buf = w.buf();
                let mut n = 0;
                for s in slots.take(BUF_SIZE as usize / 4) {
                    // SAFETY: n < BUF_SIZE / 4, inside this nqe's buffer of BUF_SIZE bytes.
                    unsafe { buf.add(n * 4).cast::<[u8; 4]>().write_unaligned(s.to_ne_bytes()) };
                    n += 1;
                }
                w.use_buf(n * 4);
            }
        }
    });
    sent.ok().map(|()| id)
}

/// The process holder `h` was made for will not exist (fork failed): its references go. Not
/// waited for, as `share`.
pub fn unshare_fds(a: &Attachment, h: u32) {
    let _ = a.call_async(|w| {
        w.set(Op::Unshare, 0);
        w.args(h as u64, 0);
    });
}

/// The process whose memory this is; a vfork child (sharing it) has another pid and must not
/// touch GuestLib's tables.
static OWNER_PID: AtomicI32 = AtomicI32::new(0);

pub fn getpid() -> i32 {
    // SAFETY: no arguments, no memory touched.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// Whether this is a vfork child of a process with an attachment: it shares that process's
/// memory, so GuestLib's tables are not its own to change.
pub fn vfork_child() -> bool {
    let owner = OWNER_PID.load(Ordering::Relaxed);
    owner != 0 && owner != getpid()
}

/// Whether this process owns GuestLib's memory (false in a vfork child).
pub fn owns_memory() -> bool {
    OWNER_PID.load(Ordering::Relaxed) == getpid()
}

/// exec() is about to replace this program: close-on-exec NetKernel fds vanish with it, so they
/// give up their references. Returns what to restore if exec fails, and the sockets whose last
/// reference this was (to close now, as the kernel would at exec).
pub fn before_exec() -> (Vec<(i32, u32)>, Vec<u32>) {
    let (mut dropped, mut last) = (Vec::new(), Vec::new());
    if !owns_memory() {
        return (dropped, last);
    }
    for fd in 0..MAX_FD as i32 {
        if let Fd::Sock(slot) = lookup(fd) {
            // SAFETY: integers only, no memory passed; the kernel checks fd.
            let flags = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFD) };
            if flags >= 0 && flags & libc::FD_CLOEXEC as i64 != 0 {
                if let Some(s) = unmap_fd(fd) {
                    last.push(s);
                }
                dropped.push((fd, slot));
            }
        }
    }
    (dropped, last)
}

/// exec() failed: the program goes on with the fds it had.
pub fn exec_failed(dropped: Vec<(i32, u32)>) {
    for (fd, slot) in dropped {
        map_fd(fd, slot);
    }
}

/// In a forked child: locks another thread of the parent held are not held here, and the
/// control connection is the parent's, not ours.
pub fn after_fork_in_child() {
    OWNER_PID.store(getpid(), Ordering::Relaxed);
    HOLDER.store(CHILD_HOLDER.load(Ordering::Relaxed), Ordering::Relaxed);
    HOLDER_SHARED.store(CHILD_SHARES.load(Ordering::Relaxed), Ordering::Relaxed);
    ATTACH_LOCK.store(false, Ordering::Release);
    CTL_LOCK.store(false, Ordering::Release);
    if let Some(a) = current() {
        let fd = a.ctl.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            sys::close(fd);
        }
    }
}

impl Attachment {
    /// In the parent right after fork: asks the engine to keep the attachment alive for the
    /// child (the NSM ends an attachment when its last process exits).
    pub fn hold_for(&self, child: i32, holder: u32) {
        lock(&CTL_LOCK);
        let mut fd = self.ctl.load(Ordering::Acquire);
        if fd >= 0 && !engine_conn_alive(fd) {
            // The engine that attached us was restarted: talk to the new one.
            sys::close(fd);
            fd = -1;
            self.ctl.store(-1, Ordering::Release);
        }
        let mut r = Ok(());
        if fd < 0 {
            match connect_engine() {
                Ok(new) => {
                    fd = new;
                    self.ctl.store(fd, Ordering::Release);
                }
                Err(e) => r = Err(e),
            }
        }
        let id = self.region.header().attachment_id;
        let req = EngineRequest::Hold { attachment: id, pid: child, holder };
        let mut r = r.and_then(|()| engine_call::<()>(fd, &req, &[]).map(|_| ()));
        if r.is_err() && fd >= 0 && !engine_conn_alive(fd) {
            // The engine exited with the request unanswered: ask the next one, once.
            sys::close(fd);
            self.ctl.store(-1, Ordering::Release);
            r = connect_engine().and_then(|new| {
                self.ctl.store(new, Ordering::Release);
                engine_call::<()>(new, &req, &[]).map(|_| ())
            });
        }
        CTL_LOCK.store(false, Ordering::Release);
        if let Err(e) = r {
            warn(&format!("child {child} will lose its NetKernel sockets when this process exits: {e}"));
        }
    }

    pub fn dead(&self) -> bool {
        self.region.header().state.load(Ordering::Acquire) == STATE_DEAD
    }

    /// Whether the NSM serving the region has gone: marked dead, or its process ended (seen on
    /// a pidfd, so it is noticed even when no engine is left to mark the region). A region
    /// found so is marked dead here, which wakes every waiter in every process sharing it.
    pub fn nsm_gone(&self) -> bool {
        if self.dead() {
            return true;
        }
        let nsm_pid = &self.region.header().nsm_pid;
        let mut pid = nsm_pid.load(Ordering::Acquire);
        loop {
            if pid == 0 {
                return false;
            }
            if !Self::process_ended(pid) {
                return false;
            }
            // An upgrade hands the region to a new NSM process, which writes its pid before the
            // old one exits: an ended process that is no longer the region's NSM is not its end.
            match nsm_pid.load(Ordering::Acquire) {
                now if now == pid => break,
                now => pid = now,
            }
        }
        self.region.mark_dead(Some(self.guest_bell));
        true
    }

    /// Whether process `pid` has ended (seen on a pidfd).
    fn process_ended(pid: u32) -> bool {
        // A pidfd opened for each look rather than kept: a program may close GuestLib's fds
        // (close_range before exec), and a kept number could then name another file. The look
        // comes after a long sleep only, so three system calls cost nothing.
        // SAFETY: integers only, no memory passed; an unknown pid is the kernel's to refuse.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if fd < 0 {
            std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        } else {
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd, no wait; POLLIN on a pidfd means the process ended.
            let r = unsafe { libc::syscall(libc::SYS_poll, &mut p, 1, 0) };
            sys::close(fd);
            r == 1
        }
    }

    /// Takes a free nqe. While every nqe is in flight the thread sleeps (they complete in
    /// microseconds, and a freer wakes it); an asynchronous nqe's completion wakes nobody, so
    /// the sleep is bounded and grows, and each wake-up reaps and looks at the NSM's liveness.
    fn alloc_nqe(&self) -> Result<u32, Errno> {
        let pool = self.region.nqe_pool();
        let freed = &self.region.header().guest_nqe_freed;
        let mut spins = 0u32;
        let mut nap = Duration::from_micros(500);
        loop {
            if let Some(i) = pool.try_alloc() {
                return Ok(i);
            }
            if self.reap_async() {
                continue;
            }
            if self.dead() {
                return Err(libc::ECONNRESET);
            }
            spins += 1;
            if spins < 64 {
                sys::relax(spins);
                continue;
            }
            let seen = freed.load(Ordering::Acquire);
            if pool.will_sleep() {
                let _ = sys::futex_wait(freed, seen, Some(nap));
            }
            pool.woke();
            nap = (nap * 2).min(LIVENESS_CHECK);
            if nap == LIVENESS_CHECK && self.nsm_gone() {
                return Err(libc::ECONNRESET);
            }
        }
    }

    fn free_nqe(&self, i: u32) {
        let pool = self.region.nqe_pool();
        pool.free(i);
        self.wake_nqe_sleepers(&pool);
    }

    fn wake_nqe_sleepers(&self, pool: &NqePool<'_, Region>) {
        if pool.has_sleepers() {
            let freed = &self.region.header().guest_nqe_freed;
            freed.fetch_add(1, Ordering::SeqCst);
            sys::futex_wake(freed);
        }
    }

    /// Submits one nqe, filled in by `fill`, and waits for its completion. The returned call
    /// keeps the nqe (and its buffer) until dropped. Err(ECONNRESET): the NSM is gone.
    pub fn call(&self, fill: impl FnOnce(&mut NqeWriter)) -> Result<Call<'_>, Errno> {
        let idx = self.submit(fill)?;
        self.wait_done(idx);
        Ok(Call { att: self, idx })
    }

    /// Submits one nqe without waiting for it (an asynchronous send); the nqe is reclaimed by
    /// a later call once the NSM completed it.
    pub fn call_async(&self, fill: impl FnOnce(&mut NqeWriter)) -> Result<(), Errno> {
        let pool = self.region.nqe_pool();
        self.submit(|w| {
            fill(w);
            pool.mark_async(w.idx);
        })
        .map(drop)
    }

    /// Frees completed asynchronous nqes (every process of the attachment reaps, by the rule
    /// `NqePool::reap` keeps and loom checks); returns whether any was freed.
    fn reap_async(&self) -> bool {
        let pool = self.region.nqe_pool();
        let freed = pool.reap();
        if freed {
            self.wake_nqe_sleepers(&pool);
        }
        freed
    }

    /// Allocates, fills and queues an nqe; returns its index.
    fn submit(&self, fill: impl FnOnce(&mut NqeWriter)) -> Result<u32, Errno> {
        self.reap_async();
        let idx = self.alloc_nqe()?;
        let p = self.region.nqe(idx);
        let buf_off = self.region.layout().buf_off(idx);
        let mut w = NqeWriter { p, buf: self.region.pool_ptr(buf_off, BUF_SIZE), buf_off, idx };
        // SAFETY: nqe idx is ours (allocated above) until freed.
        unsafe {
            (*p).flags = 0;
            (*p).arg0 = 0;
            (*p).arg1 = 0;
            (*p).buf_off = 0;
            (*p).buf_len = 0;
            (*p).addr_len = 0;
            (*p).holder = HOLDER.load(Ordering::Relaxed);
        }
        fill(&mut w);
        let state = self.region.nqe_state(idx);
        state.store(nqe_state::SUBMITTED, Ordering::Release);
        let h = self.region.header();
        self.lock_push();
        // At most NQE_COUNT nqes exist, so the ring (of NQE_COUNT entries) has room.
        let pushed = self.region.ring().push(idx);
        h.guest_push_lock.store(0, Ordering::Release);
        debug_assert!(pushed.is_ok());
        if doorbell::guest_must_ring(&h.nsm_sleeping) {
            sys::ring_bell(self.nsm_bell);
        }
        Ok(idx)
    }

    /// Takes the job queue's producer lock, which holds the locker's pid. It is held for a few
    /// instructions, so waiting spins; but a process killed while holding it would stall every
    /// other process of the attachment, so a long wait looks whether the holder still lives and
    /// takes the lock over from a dead one. That is safe: the push commits with its one store
    /// of `tail`, so a dead holder either pushed or left nothing behind.
    fn lock_push(&self) {
        let lock = &self.region.header().guest_push_lock;
        let me = OWNER_PID.load(Ordering::Relaxed).max(1) as u32;
        let mut step = 0u32;
        loop {
            let held = match lock.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return,
                Err(held) => held,
            };
            step += 1;
            sys::relax(step);
            // SAFETY: kill with signal 0 only asks whether the process exists.
            if step.is_multiple_of(4096) && unsafe { libc::syscall(libc::SYS_kill, held, 0) } < 0 {
                let gone = std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
                if gone && lock.compare_exchange(held, me, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return;
                }
            }
        }
    }

    fn wait_done(&self, idx: u32) {
        let state = self.region.nqe_state(idx);
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let s = state.load(Ordering::Acquire);
            if s == nqe_state::DONE {
                return;
            }
            if self.dead() || (spins > 0 && start.elapsed() >= LIVENESS_CHECK && self.nsm_gone()) {
                // Nobody serves this region any more: the call fails as the connection did.
                // The nqe stays allocated; a dead region is never reused.
                // SAFETY: the nqe is ours and no NSM writes a dead region.
                unsafe { std::ptr::write_volatile(&mut (*self.region.nqe(idx)).result, -(libc::ECONNRESET as i64)) };
                return;
            }
            spins += 1;
            if spins < 64 || start.elapsed() < Duration::from_micros(20) {
                sys::relax(spins);
                continue;
            }
            if s == nqe_state::SUBMITTED
                && state.compare_exchange(s, s | nqe_state::WAITER, Ordering::AcqRel, Ordering::Relaxed).is_err()
            {
                continue;
            }
            // The op is already running in the NSM and will complete promptly; a signal does
            // not abandon it (its buffer is in use), so EINTR just waits again.
            let _ = sys::futex_wait(state, nqe_state::SUBMITTED | nqe_state::WAITER, Some(LIVENESS_CHECK));
        }
    }

    /// Waits until socket `slot` reports a wakeup after sequence `seen`, or `timeout_us` (0:
    /// none) passes. Err(EAGAIN) on timeout, Err(EINTR) when a signal handler ran and the
    /// kernel would not restart the call (the futex has socket semantics for SA_RESTART).
    pub fn wait_slot(&self, slot: u32, seen: u32, timeout_us: u64) -> Result<(), Errno> {
        let s = self.region.slot(slot);
        let start = Instant::now();
        let mut step = 0;
        while start.elapsed() < Duration::from_micros(10) {
            if s.seq.load(Ordering::Acquire) != seen {
                return Ok(());
            }
            sys::relax(step);
            step += 1;
        }
        let deadline = (timeout_us > 0).then(|| start + Duration::from_micros(timeout_us));
        s.waiters.fetch_add(1, Ordering::SeqCst);
        let r = loop {
            if s.seq.load(Ordering::SeqCst) != seen || self.dead() {
                break Ok(());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => Some(l),
                    _ => break Err(libc::EAGAIN),
                },
                None => None,
            };
            match sys::futex_wait(&s.seq, seen, left) {
                Ok(_) => {}
                Err(e) => break Err(e.raw_os_error().unwrap_or(libc::EINTR)),
            }
        };
        s.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

/// Fills in an nqe before submission.
pub struct NqeWriter {
    p: *mut Nqe,
    buf: *mut u8,
    buf_off: u64,
    idx: u32,
}

impl NqeWriter {
    pub fn set(&mut self, op: netkernel_abi::Op, sock: u32) {
        // SAFETY: the nqe is ours until submitted.
        unsafe {
            (*self.p).op = op as u32;
            (*self.p).sock = sock;
        }
    }
    pub fn flags(&mut self, v: u32) {
        // SAFETY: self.p is this writer's nqe, in the mapping and ours alone until submitted (the
        // NSM reads only submitted nqes).
        unsafe { (*self.p).flags = v }
    }
    pub fn args(&mut self, a0: u64, a1: u64) {
        // SAFETY: self.p is this writer's nqe, in the mapping and ours alone until submitted (the
        // NSM reads only submitted nqes).
        unsafe {
            (*self.p).arg0 = a0;
            (*self.p).arg1 = a1;
        }
    }
    /// Uses `len` bytes of this nqe's buffer (filled by the caller via `buf`).
    pub fn use_buf(&mut self, len: usize) {
        // SAFETY: self.p is this writer's nqe, in the mapping and ours alone until submitted (the
        // NSM reads only submitted nqes).
        unsafe {
            (*self.p).buf_off = self.buf_off;
            (*self.p).buf_len = len.min(BUF_SIZE as usize) as u32;
        }
    }
    /// This nqe's buffer: BUF_SIZE bytes of the pool.
    pub fn buf(&mut self) -> *mut u8 {
        self.buf
    }
    pub fn addr(&mut self, a: *const u8, len: usize) {
        let len = len.min(ADDR_MAX);
        // SAFETY: the nqe is ours until submitted. With len > 0, a is the caller's address of
        // len <= ADDR_MAX bytes: sock::addr_in checked the length and refused null, and the
        // interposed call's contract makes it readable. (A null `a` with len 0, as in
        // connect(fd, NULL, 0), is not copied: copy_nonoverlapping wants non-null even for 0.)
        unsafe {
            if len > 0 {
                std::ptr::copy_nonoverlapping(a, (*self.p).addr.as_mut_ptr(), len);
            }
            (*self.p).addr_len = len as u32;
        }
    }
}

/// A completed nqe; frees it when dropped.
pub struct Call<'a> {
    att: &'a Attachment,
    idx: u32,
}

impl Call<'_> {
    fn nqe(&self) -> *mut Nqe {
        self.att.region.nqe(self.idx)
    }
    /// The result: Ok(value) or Err(errno).
    pub fn result(&self) -> Result<i64, Errno> {
        // SAFETY: DONE was observed with Acquire; the NSM no longer writes this nqe.
        let r = unsafe { std::ptr::read_volatile(&(*self.nqe()).result) };
        if r < 0 {
            Err((-r) as Errno)
        } else {
            Ok(r)
        }
    }
    /// The socket's event sequence when the op completed: what to wait past after EAGAIN.
    pub fn seq(&self) -> u32 {
        // SAFETY: nqe() is in bounds of the mapping; DONE was observed with Acquire, so the NSM no
        // longer writes it.
        unsafe { std::ptr::read_volatile(&(*self.nqe()).seq) }
    }
    /// The address the NSM returned and its full length.
    pub fn addr(&self) -> ([u8; ADDR_MAX], usize) {
        let mut a = [0u8; ADDR_MAX];
        // SAFETY: nqe() is in bounds of the mapping and its addr field holds ADDR_MAX bytes; DONE
        // was observed with Acquire, so the NSM no longer writes it; a is ADDR_MAX bytes.
        let len = unsafe {
            std::ptr::copy_nonoverlapping((*self.nqe()).addr.as_ptr(), a.as_mut_ptr(), ADDR_MAX);
            std::ptr::read_volatile(&(*self.nqe()).addr_len) as usize
        };
        (a, len.min(ADDR_MAX))
    }
    /// This nqe's buffer.
    pub fn buf(&self) -> *const u8 {
        self.att.region.pool_ptr(self.att.region.layout().buf_off(self.idx), BUF_SIZE)
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.att.dead() {
            self.att.free_nqe(self.idx);
        }
    }
}

const _: () = assert!(NQE_COUNT <= 64);
