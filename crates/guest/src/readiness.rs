//! poll, select and epoll over sets that mix NetKernel sockets with ordinary fds.
//!
//! A NetKernel socket's readiness is its slot's mask, kept current by the NSM. Ordinary fds go
//! to the kernel as usual. To sleep on both at once, the kernel call also watches the guest
//! doorbell (an eventfd the NSM rings while `bell_waiters` is non-zero). The doorbell is never
//! drained: it is watched edge-triggered through an epoll, so every sleeper sees every ring, and
//! a ring that came before a sleeper looked costs one spurious wakeup, never a lost one.

use crate::real;
use crate::sock;
use crate::state::{self, lookup, sock_state, Attachment, Errno, Fd, MAX_FD};
use libc::{c_int, epoll_event, pollfd};
use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// epoll data value marking the doorbell in an application's epoll set; filtered out of what
/// the application sees.
const BELL_MARK: u64 = 0x4e4b_4245_4c4c_0001;

const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;

/// A socket's current poll(2) bits, with the *NORM bits Linux reports alongside IN and OUT.
fn full_mask(a: &Attachment, slot: u32) -> u32 {
    let mut m = a.region.slot(slot).mask.load(Ordering::Acquire) & !netkernel_abi::MASK_AT_MARK;
    if m & POLLIN != 0 {
        m |= libc::POLLRDNORM as u32;
    }
    if m & POLLOUT != 0 {
        m |= libc::POLLWRNORM as u32;
    }
    m
}

const DEAD_MASK: u32 = (libc::POLLERR | libc::POLLHUP) as u32;
const ALWAYS: u32 = (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) as u32;

fn mask_of(fd: c_int) -> u32 {
    match (lookup(fd), state::current()) {
        (Fd::Sock(slot), Some(a)) if !a.dead() => full_mask(a, slot),
        (Fd::Sock(slot), Some(a)) if state::end_told(a, slot) => 0,
        (Fd::Stale, _) if state::stale_sock(fd).is_some_and(|(a, slot)| state::end_told(a, slot)) => 0,
        _ => DEAD_MASK,
    }
}

struct Deadline(Option<Instant>);

impl Deadline {
    fn new(timeout: Option<Duration>) -> Self {
        Deadline(timeout.map(|d| Instant::now() + d))
    }
    fn timespec(&self) -> Option<libc::timespec> {
        self.0.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            libc::timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ }
        })
    }
    fn is_zero(&self) -> bool {
        self.0.is_some_and(|d| d <= Instant::now())
    }
}

/// A per-thread epoll holding the doorbell edge-triggered, so poll/select can sleep on it.
struct ThreadEp {
    ep: Cell<c_int>,
    bell: Cell<c_int>,
}

impl Drop for ThreadEp {
    fn drop(&mut self) {
        if self.ep.get() >= 0 {
            netkernel_ring::sys::close(self.ep.get());
        }
    }
}

thread_local! {
    static THREAD_EP: ThreadEp = const { ThreadEp { ep: Cell::new(-1), bell: Cell::new(-1) } };
}

fn thread_ep(a: &Attachment) -> Result<c_int, Errno> {
    THREAD_EP
        .try_with(|t| {
            if t.ep.get() >= 0 && t.bell.get() == a.guest_bell {
                return Ok(t.ep.get());
            }
            if t.ep.get() >= 0 {
                netkernel_ring::sys::close(t.ep.get());
                t.ep.set(-1);
            }
            // SAFETY: integer flags only, no memory passed.
            let ep = unsafe { libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC) } as c_int;
            if ep < 0 {
                return Err(libc::ENOMEM);
            }
            let ep = {
                // SAFETY: integers only, no memory passed; ep is the epoll fd just created, still
                // ours.
                let high = unsafe { libc::syscall(libc::SYS_fcntl, ep, libc::F_DUPFD_CLOEXEC, 800) } as c_int;
                if high >= 0 {
                    netkernel_ring::sys::close(ep);
                    high
                } else {
                    ep
                }
            };
            let mut ev = epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: BELL_MARK };
            // SAFETY: ev is a live local.
            unsafe { libc::syscall(libc::SYS_epoll_ctl, ep, libc::EPOLL_CTL_ADD, a.guest_bell, &mut ev as *mut _) };
            t.ep.set(ep);
            t.bell.set(a.guest_bell);
            Ok(ep)
        })
        .unwrap_or(Err(libc::ENOMEM))
}

/// In a forked child: the poll helper epoll is the parent's instance (shared, so its doorbell
/// edges would be consumed by whichever process looks first); the child makes its own.
pub fn after_fork_in_child() {
    let _ = THREAD_EP.try_with(|t| {
        if t.ep.get() >= 0 {
            netkernel_ring::sys::close(t.ep.get());
        }
        t.ep.set(-1);
        t.bell.set(-1);
    });
}

/// Consumes doorbell edges that arrived before this thread looked.
fn drain_thread_ep(ep: c_int) {
    let mut ev = [epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: ev is a live buffer of 4 events.
    unsafe { real::epoll_wait(ep, ev.as_mut_ptr(), 4, 0) };
}

/// Counts this thread as a sleeper for the NSM's doorbell while alive.
struct BellWaiter(&'static Attachment);

impl BellWaiter {
    fn new(a: &'static Attachment) -> Self {
        a.region.header().bell_waiters.fetch_add(1, Ordering::SeqCst);
        // Pairs with the NSM's fence between publishing a slot and reading bell_waiters: either
        // it sees this waiter, or this thread sees its update.
        std::sync::atomic::fence(Ordering::SeqCst);
        BellWaiter(a)
    }
}

impl Drop for BellWaiter {
    fn drop(&mut self) {
        self.0.region.header().bell_waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
}

/// Fills revents of NetKernel fds; returns how many are ready.
fn ours_ready(fds: &mut [pollfd]) -> c_int {
    let mut n = 0;
    for p in fds.iter_mut() {
        if lookup(p.fd) != Fd::Plain {
            let want = p.events as u16 as u32 | ALWAYS;
            p.revents = (mask_of(p.fd) & want) as u16 as i16;
            if p.revents != 0 {
                n += 1;
            }
        }
    }
    n
}

/// poll/ppoll over a set holding at least one NetKernel socket.
pub fn poll(fds: &mut [pollfd], timeout: Option<Duration>, sigmask: *const libc::sigset_t) -> Result<c_int, Errno> {
    // The set holds a NetKernel socket, so an attachment exists; a dead one is not replaced
    // here: its sockets are ready (POLLERR|POLLHUP).
    let a = state::current().ok_or(libc::EBADF)?;
    let deadline = Deadline::new(timeout);
    // A poll that will not wait reports what Linux would: loopback bytes sent asynchronously
    // have arrived.
    if deadline.is_zero() && sock::async_pending(a) && ours_ready(fds) == 0 {
        if let Some(slot) = fds.iter().find_map(|p| match lookup(p.fd) {
            Fd::Sock(slot) => Some(slot),
            _ => None,
        }) {
            sock::refresh(a, slot);
        }
    }
    let mut copy: Vec<pollfd> = Vec::with_capacity(fds.len() + 1);
    loop {
        let waiter = BellWaiter::new(a);
        let ep = thread_ep(a)?;
        drain_thread_ep(ep);
        let mut ready = ours_ready(fds);
        copy.clear();
        copy.extend(fds.iter().map(|p| pollfd {
            fd: if lookup(p.fd) == Fd::Plain { p.fd } else { -1 },
            events: p.events,
            revents: 0,
        }));
        let quick = ready > 0 || deadline.is_zero();
        if !quick {
            copy.push(pollfd { fd: ep, events: libc::POLLIN, revents: 0 });
        }
        let ts = if quick { Some(libc::timespec { tv_sec: 0, tv_nsec: 0 }) } else { deadline.timespec() };
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: copy is a live array of its length.
        let r = unsafe { real::ppoll(copy.as_mut_ptr(), copy.len() as _, tsp, sigmask) };
        drop(waiter);
        if r < 0 {
            return Err(errno());
        }
        let plain_ready = copy[..fds.len()].iter().filter(|p| p.fd >= 0 && p.revents != 0).count() as c_int;
        if quick || plain_ready > 0 || r == 0 {
            if !quick {
                ready = ours_ready(fds);
            }
            for (p, c) in fds.iter_mut().zip(&copy) {
                if c.fd >= 0 {
                    p.revents = c.revents;
                }
            }
            return Ok(ready + plain_ready);
        }
    }
}

/// select/pselect over sets holding at least one NetKernel socket, done as a poll.
///
/// # Safety
/// The fd_set pointers are null or valid for `nfds` bits.
pub unsafe fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: Option<Duration>,
    sigmask: *const libc::sigset_t,
) -> Result<c_int, Errno> {
    // SAFETY: a non-null set is valid for nfds bits (this function's contract) and fd < nfds.
    let isset = |s: *mut libc::fd_set, fd: c_int| !s.is_null() && unsafe { libc::FD_ISSET(fd, s) };
    let mut fds = Vec::new();
    for fd in 0..nfds.min(libc::FD_SETSIZE as c_int) {
        let mut ev = 0;
        if isset(r, fd) {
            ev |= libc::POLLIN;
        }
        if isset(w, fd) {
            ev |= libc::POLLOUT;
        }
        if isset(e, fd) {
            ev |= libc::POLLPRI;
        }
        if ev != 0 {
            fds.push(pollfd { fd, events: ev, revents: 0 });
        }
    }
    poll(&mut fds, timeout, sigmask)?;
    if fds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        return Err(libc::EBADF);
    }
    for s in [r, w, e] {
        if !s.is_null() {
            // SAFETY: a non-null set is a valid fd_set (this function's contract).
            unsafe { libc::FD_ZERO(s) };
        }
    }
    let rset = libc::POLLIN | libc::POLLRDNORM | libc::POLLRDBAND | libc::POLLHUP | libc::POLLERR;
    let wset = libc::POLLOUT | libc::POLLWRNORM | libc::POLLWRBAND | libc::POLLERR;
    let mut n = 0;
    for p in &fds {
        for (set, bits, asked) in [(r, rset, libc::POLLIN), (w, wset, libc::POLLOUT), (e, libc::POLLPRI, libc::POLLPRI)]
        {
            if p.events & asked != 0 && p.revents & bits != 0 && !set.is_null() {
                // SAFETY: set is non-null, hence a valid fd_set (this function's contract), and
                // p.fd < nfds <= FD_SETSIZE.
                unsafe { libc::FD_SET(p.fd, set) };
                n += 1;
            }
        }
    }
    Ok(n)
}

struct Interest {
    fd: c_int,
    slot: u32,
    gen: u32,
    events: u32,
    data: u64,
    last_seq: u32,
    armed: bool,
}

/// The NetKernel sockets registered in one application epoll set.
pub struct EpollSet {
    list: Mutex<(Vec<Interest>, usize)>,
}

static EPOLLS: [AtomicPtr<EpollSet>; MAX_FD] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_FD];

fn set_of(epfd: c_int) -> Option<&'static EpollSet> {
    if epfd < 0 || epfd as usize >= MAX_FD {
        return None;
    }
    // SAFETY: a published set lives until its last epfd is closed (see `forget_epoll`).
    unsafe { EPOLLS[epfd as usize].load(Ordering::Acquire).as_ref() }
}

/// Whether `epfd` holds NetKernel sockets (otherwise epoll_wait goes straight to the kernel).
pub fn is_mixed(epfd: c_int) -> bool {
    set_of(epfd).is_some()
}

/// The epoll fd `epfd` is closed: drop its set.
pub fn forget_epoll(epfd: c_int) {
    if epfd < 0 || epfd as usize >= MAX_FD {
        return;
    }
    let p = EPOLLS[epfd as usize].swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !p.is_null() {
        // SAFETY: p came from Arc::into_raw and this table held one count.
        drop(unsafe { Arc::from_raw(p) });
    }
}

/// `new` is a duplicate of epoll fd `old` (dup/dup2/dup3/F_DUPFD).
pub fn dup_epoll(old: c_int, new: c_int) {
    if new < 0 || new as usize >= MAX_FD || old == new {
        return;
    }
    forget_epoll(new);
    if let Some(s) = set_of(old) {
        let p = s as *const EpollSet;
        // SAFETY: p is a live Arc pointer from the table; the new entry holds a new count.
        unsafe { Arc::increment_strong_count(p) };
        EPOLLS[new as usize].store(p as *mut _, Ordering::Release);
    }
}

/// epoll_ctl for a NetKernel socket `fd` in `epfd`.
pub fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, slot: u32, ev: *const epoll_event) -> Result<c_int, Errno> {
    if fd == epfd {
        return Err(libc::EINVAL);
    }
    let a = state::attachment()?;
    let ev = if op == libc::EPOLL_CTL_DEL {
        None
    } else if ev.is_null() {
        return Err(libc::EFAULT);
    } else {
        // SAFETY: non-null, the caller's event.
        Some(unsafe { std::ptr::read_unaligned(ev) })
    };
    // The doorbell joins the kernel's set (this also checks that epfd is an epoll fd).
    let mut bell = epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: BELL_MARK };
    // SAFETY: bell is a live local.
    if unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, a.guest_bell, &mut bell) } < 0 && errno() != libc::EEXIST {
        return Err(errno());
    }
    let set = match set_of(epfd) {
        Some(s) => s,
        None => {
            let p = Arc::into_raw(Arc::new(EpollSet { list: Mutex::new((Vec::new(), 0)) })) as *mut EpollSet;
            if let Err(cur) =
                EPOLLS[epfd as usize].compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
            {
                // SAFETY: p is ours and unpublished.
                drop(unsafe { Arc::from_raw(p) });
                // SAFETY: cur was published by another thread and is live.
                unsafe { &*cur }
            } else {
                // SAFETY: just published.
                unsafe { &*p }
            }
        }
    };
    let mut g = set.list.lock().unwrap_or_else(|e| e.into_inner());
    let list = &mut g.0;
    let gen = sock_state(slot).gen.load(Ordering::Acquire);
    let pos = list.iter().position(|i| i.fd == fd && i.slot == slot && i.gen == gen);
    // Re-evaluating readiness on ADD and MOD, as Linux does: the next wait reports a ready
    // socket even when edge-triggered.
    let seq = a.region.slot(slot).seq.load(Ordering::Acquire).wrapping_sub(1);
    match (op, pos, ev) {
        (libc::EPOLL_CTL_ADD, Some(_), _) => Err(libc::EEXIST),
        (libc::EPOLL_CTL_ADD, None, Some(ev)) => {
            list.push(Interest { fd, slot, gen, events: ev.events, data: ev.u64, last_seq: seq, armed: true });
            Ok(0)
        }
        (libc::EPOLL_CTL_MOD, Some(i), Some(ev)) => {
            list[i] = Interest { fd, slot, gen, events: ev.events, data: ev.u64, last_seq: seq, armed: true };
            Ok(0)
        }
        (libc::EPOLL_CTL_DEL, Some(i), _) => {
            list.remove(i);
            Ok(0)
        }
        (libc::EPOLL_CTL_MOD | libc::EPOLL_CTL_DEL, None, _) => Err(libc::ENOENT),
        _ => Err(libc::EINVAL),
    }
}

/// Moves ready NetKernel interests into `out`, consuming edges and one-shots.
fn collect(set: &EpollSet, out: &mut [epoll_event]) -> usize {
    if out.is_empty() {
        return 0;
    }
    let mut g = set.list.lock().unwrap_or_else(|e| e.into_inner());
    let (list, cursor) = &mut *g;
    // Linux drops a registration when its socket is closed for good.
    list.retain(|i| lookup(i.fd) == Fd::Sock(i.slot) && sock_state(i.slot).gen.load(Ordering::Acquire) == i.gen);
    let a = match state::current() {
        Some(a) => a,
        None => return 0,
    };
    let len = list.len();
    let mut n = 0;
    for k in 0..len {
        let i = &mut list[(*cursor + k) % len];
        if !i.armed {
            continue;
        }
        let seq = a.region.slot(i.slot).seq.load(Ordering::Acquire);
        let want = i.events | (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        let ready = match a.dead() {
            false => full_mask(a, i.slot),
            true if state::end_told(a, i.slot) => 0,
            true => DEAD_MASK,
        } & want;
        if ready == 0 {
            continue;
        }
        if i.events & libc::EPOLLET as u32 != 0 {
            if seq == i.last_seq {
                continue;
            }
            i.last_seq = seq;
        }
        if i.events & libc::EPOLLONESHOT as u32 != 0 {
            i.armed = false;
        }
        out[n] = epoll_event { events: ready, u64: i.data };
        n += 1;
        if n == out.len() {
            *cursor = (*cursor + k + 1) % len;
            break;
        }
    }
    n
}

/// Removes doorbell events from what the kernel returned.
fn strip_bell(evs: &mut [epoll_event]) -> usize {
    let mut k = 0;
    for j in 0..evs.len() {
        let e = evs[j];
        if e.u64 != BELL_MARK {
            evs[k] = e;
            k += 1;
        }
    }
    k
}

/// epoll_wait/epoll_pwait/epoll_pwait2 on a set holding NetKernel sockets.
///
/// # Safety
/// `evs` has room for `max` events.
pub unsafe fn epoll_wait(
    epfd: c_int,
    evs: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    sigmask: *const libc::sigset_t,
) -> Result<c_int, Errno> {
    let Some(set) = set_of(epfd) else {
        return Err(libc::EBADF);
    };
    if max <= 0 {
        return Err(libc::EINVAL);
    }
    // SAFETY: evs has room for max events (this function's contract), so it is non-null, and max >
    // 0 was checked above.
    let out = unsafe { std::slice::from_raw_parts_mut(evs, max as usize) };
    let a = state::current().ok_or(libc::EBADF)?;
    let deadline = Deadline::new(timeout);
    loop {
        let waiter = BellWaiter::new(a);
        let mut n = collect(set, out);
        // As for poll: a wait of zero reports loopback bytes sent asynchronously.
        if n == 0 && deadline.is_zero() && sock::async_pending(a) {
            let slot = set.list.lock().unwrap_or_else(|e| e.into_inner()).0.first().map(|i| i.slot);
            if let Some(slot) = slot {
                sock::refresh(a, slot);
                n = collect(set, out);
            }
        }
        if n > 0 || deadline.is_zero() {
            drop(waiter);
            let rest = &mut out[n..];
            if rest.is_empty() {
                return Ok(n as c_int);
            }
            // SAFETY: rest is a live slice of the caller's buffer.
            let r = unsafe { real::epoll_wait(epfd, rest.as_mut_ptr(), rest.len() as c_int, 0) };
            let k = if r > 0 { strip_bell(&mut rest[..r as usize]) } else { 0 };
            return Ok((n + k) as c_int);
        }
        let ts = deadline.timespec();
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: out is the caller's buffer of max events.
        let r = unsafe { real::epoll_pwait2(epfd, out.as_mut_ptr(), max, tsp, sigmask) };
        drop(waiter);
        if r < 0 {
            return Err(errno());
        }
        let k = strip_bell(&mut out[..r as usize]);
        if k > 0 {
            return Ok((k + collect(set, &mut out[k..])) as c_int);
        }
        if r == 0 {
            return Ok(0);
        }
    }
}

/// Converts a poll-style millisecond timeout (negative: forever).
pub fn ms(timeout: c_int) -> Option<Duration> {
    (timeout >= 0).then(|| Duration::from_millis(timeout as u64))
}

/// Converts a timespec pointer (null: forever).
///
/// # Safety
/// `ts` is null or valid.
pub unsafe fn ts(ts: *const libc::timespec) -> Option<Duration> {
    // SAFETY: ts is null or a valid timespec (this function's contract); as_ref maps null to None.
    unsafe { ts.as_ref() }.map(|t| Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32))
}
