//! ServiceLib: the library every NSM links. It drives attachments (one region per guest
//! process), validates every nqe a guest writes (DESIGN.md D2), publishes socket readiness into
//! the guest's slot table, counts telemetry, and calls the network stack through [`Stack`].
//!
//! One thread runs [`Service::run`]: it drains the guests' job queues, spins briefly while there
//! is work, and otherwise sleeps in epoll with `nsm_sleeping` published so that guests ring the
//! doorbell only then (D5).

mod adopt;
mod cmsg;
mod colocated;
pub mod control;
mod holders;
mod policy;
mod ratelimit;
mod resolve;
mod sendq;
pub mod stack;
mod telemetry;

pub use stack::{Errno, Stack};

use control::{NsmRequest, NsmStats};
use netkernel_abi::validate::{self, Call, Request, Violation};
use netkernel_abi::{nqe_state, ADDR_MAX, NQE_COUNT, SLOT_COUNT};
use netkernel_ring::doorbell;
use netkernel_ring::region::Region;
use netkernel_ring::spsc::Consumer;
use netkernel_ring::sys;
use sendq::SendQueue;
use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the loop keeps polling after the last piece of work before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

const KIND_SHIFT: u64 = 62;
const TOK_SOCK: u64 = 0;
const TOK_BELL: u64 = 1;
const TOK_PIDFD: u64 = 2;
const TOK_CONTROL: u64 = 3 << KIND_SHIFT;
/// A closed socket still sending queued bytes: kind 3 with bit 32 set (TOK_CONTROL has none).
const TOK_LINGER: u64 = (3 << KIND_SHIFT) | (1 << 32);
/// The rendezvous socket a restarted engine reconnects on: kind 3 with bit 33 set.
const TOK_RENDEZVOUS: u64 = (3 << KIND_SHIFT) | (1 << 33);
/// The stack's wait fd: kind 3 with bit 34 set.
const TOK_STACK: u64 = (3 << KIND_SHIFT) | (1 << 34);

fn tok(kind: u64, att: usize, slot: u32) -> u64 {
    (kind << KIND_SHIFT) | ((att as u64) << 32) | slot as u64
}

/// Not an errno: `execute`'s way of saying the guest broke the ABI (see Violation::SendFlood).
const OVERFLOW: Errno = i32::MAX;

struct Sock<H> {
    /// The stack's socket; None for the accepted end of a co-located connection, which needs
    /// none.
    handle: Option<H>,
    stream: bool,
    bytes_in: u64,
    bytes_out: u64,
    sendq: SendQueue,
    /// A connect was started (and counted in conns_total).
    counted: bool,
    /// This NSM's name for the socket, never reused (slots are).
    serial: u64,
    /// A co-located connection's end: the pipe carries its bytes, not the stack.
    pipe: Option<colocated::End>,
    /// A listening socket's co-located connections waiting for accept().
    backlog: Option<colocated::Backlog>,
    /// Urgent data came and its mark is not passed yet: readiness then asks the stack whether
    /// the next byte is the urgent one (MASK_AT_MARK).
    urgent: Cell<bool>,
}

/// Serials for sockets; an NSM has one service, so one counter.
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl<H> Sock<H> {
    fn new(handle: Option<H>, stream: bool) -> Self {
        Sock {
            handle,
            stream,
            bytes_in: 0,
            bytes_out: 0,
            sendq: SendQueue::default(),
            counted: false,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            pipe: None,
            backlog: None,
            urgent: Cell::new(false),
        }
    }

    fn handle(&self) -> Result<&H, Errno> {
        self.handle.as_ref().ok_or(libc::EBADF)
    }

    /// Hands queued asynchronous sends to the stack, at most `limit` bytes.
    fn flush<S: Stack<Handle = H>>(&mut self, stack: &mut S, limit: usize) -> usize {
        match &self.handle {
            Some(h) => self.sendq.flush(stack, h, limit),
            None => 0,
        }
    }

    /// The readiness its guest should see.
    fn mask<S: Stack<Handle = H>>(&self, stack: &mut S) -> u32 {
        if let Some(p) = &self.pipe {
            return p.mask();
        }
        let mut mask = self.handle().map_or(0, |h| stack.poll_mask(h));
        if self.backlog.as_ref().is_some_and(|b| !b.queue.is_empty()) {
            mask |= (libc::POLLIN | libc::POLLRDNORM) as u32;
        }
        self.sendq.adjust(self.with_mark(stack, mask))
    }

    /// Adds MASK_AT_MARK to a stack socket's mask while it sits at an urgent mark. Only
    /// sockets that saw urgent data pay the ioctl.
    fn with_mark<S: Stack<Handle = H>>(&self, stack: &mut S, mask: u32) -> u32 {
        if mask & libc::POLLPRI as u32 != 0 {
            self.urgent.set(true);
        }
        if !self.urgent.get() {
            return mask;
        }
        let at_mark = self.handle().is_ok_and(|h| stack.ioctl(h, SIOCATMARK) == Ok(1));
        self.urgent.set(at_mark || mask & libc::POLLPRI as u32 != 0);
        if at_mark {
            mask | netkernel_abi::MASK_AT_MARK
        } else {
            mask
        }
    }
}

struct Attachment<H> {
    id: u64,
    tenant: String,
    pid: i32,
    uid: u32,
    policy: control::TenantPolicy,
    /// Shared with resolver threads, which may outlive the attachment.
    region: Arc<Region>,
    /// Kept to hand back to an engine that adopts this NSM (it proves `join`s with it).
    memfd: OwnedFd,
    head: u32,
    nsm_bell: OwnedFd,
    guest_bell: OwnedFd,
    /// The processes sharing the attachment (the attaching one, forked and spawned children)
    /// and the sockets each holds; the attachment ends when all have exited.
    holders: holders::Holders,
    socks: Vec<Option<Sock<H>>>,
    free: Vec<u32>,
    /// The guest's doorbell should ring: set by this attachment's sockets and by co-located
    /// peers in other attachments.
    bell: Rc<Cell<bool>>,
}

impl<H> Attachment<H> {
    fn sock(&self, id: u32) -> Result<&Sock<H>, Errno> {
        self.socks.get(id as usize).and_then(|s| s.as_ref()).ok_or(libc::EBADF)
    }

    fn sock_mut(&mut self, id: u32) -> Result<&mut Sock<H>, Errno> {
        self.socks.get_mut(id as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)
    }

    /// Where readiness of socket `slot` goes, for a co-located peer.
    fn owner(&self, slot: u32) -> colocated::Owner {
        colocated::Owner { region: self.region.clone(), slot, bell: self.bell.clone() }
    }
}

/// A listening socket, found again by its serial (its slot may have been reused since).
#[derive(Clone, Copy, PartialEq)]
struct ListenerRef {
    ai: usize,
    slot: u32,
    serial: u64,
}

/// An NSM's event loop over its attachments and one [`Stack`].
pub struct Service<S: Stack> {
    stack: S,
    name: String,
    epfd: OwnedFd,
    control: OwnedFd,
    atts: Vec<Option<Attachment<S::Handle>>>,
    /// Sockets closed by their guest (or whose guest exited) while asynchronous sends were still
    /// queued: they send them, then close, as a kernel socket does after close().
    lingering: Vec<Option<Sock<S::Handle>>>,
    stats: NsmStats,
    /// The engine closed the control channel.
    orphaned: bool,
    /// Where a restarted engine reconnects to adopt this NSM (None: it cannot).
    rendezvous: Option<std::os::unix::net::UnixListener>,
    /// The child that marks the regions dead if this process dies while no engine watches.
    reaper: Option<libc::pid_t>,
    /// The engine asked this NSM to exit (`ctl shutdown`, or a config without it).
    stopping: bool,
    /// Names this NSM resolves itself (from the engine's config), before the system resolver.
    hosts: Arc<HashMap<String, String>>,
    /// Rate limits of the tenants that have one.
    buckets: HashMap<String, ratelimit::Bucket>,
    /// Sockets (attachment, slot) held back by their tenant's rate limit, woken when tokens
    /// are back.
    throttled: Vec<(usize, u32)>,
    /// Listening sockets by local address, for co-located connects.
    listeners: HashMap<SocketAddr, Vec<ListenerRef>>,
    /// Fresh stack sockets (IPv4, IPv6) whose options are the defaults a co-located socket
    /// reports for options never set.
    templates: [Option<S::Handle>; 2],
    /// Readiness refreshes (attachment index, its id, nqe) to complete at the end of this round
    /// of the loop.
    refreshes: Vec<(usize, u64, u32)>,
    /// Readiness changes the stack reported, to dispatch.
    ready: Vec<stack::Ready>,
    /// When the stack next needs a poll though nothing arrives.
    stack_deadline: Option<Instant>,
}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a live local; epoll_ctl validates the fds.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl<S: Stack> Service<S> {
    /// A service for NSM `name` that takes orders from the engine on `control`.
    pub fn new(stack: S, name: String, control: OwnedFd) -> io::Result<Self> {
        // SAFETY: plain system call.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ep is a fresh fd we own.
        let epfd = unsafe { OwnedFd::from_raw_fd(ep) };
        epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, control.as_raw_fd(), libc::EPOLLIN as u32, TOK_CONTROL)?;
        epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, stack.wait_fd().as_raw_fd(), libc::EPOLLIN as u32, TOK_STACK)?;
        let stats = NsmStats {
            nsm: name.clone(),
            kind: stack.kind().into(),
            pid: std::process::id(),
            congestion: stack.congestion(),
            ..Default::default()
        };
        Ok(Service {
            stack,
            name,
            epfd,
            control,
            atts: Vec::new(),
            lingering: Vec::new(),
            stats,
            orphaned: false,
            rendezvous: None,
            reaper: None,
            stopping: false,
            hosts: Arc::default(),
            buckets: HashMap::new(),
            throttled: Vec::new(),
            listeners: HashMap::new(),
            templates: [None, None],
            refreshes: Vec::new(),
            ready: Vec::new(),
            stack_deadline: None,
        })
    }

    /// Static host entries (name to address) this NSM answers Op::Resolve with.
    pub fn with_hosts(mut self, hosts: HashMap<String, String>) -> Self {
        self.hosts = Arc::new(hosts.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect());
        self
    }

    /// Runs until the engine has closed the control channel and no guest is left.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut last_work = Instant::now();
        let mut idle_steps = 0u32;
        loop {
            let mut worked = self.drain_rings();
            let sleep = !worked && last_work.elapsed() >= SPIN;
            // A throttled tenant is woken when its tokens are back, not by the stack; the stack
            // may have a timer of its own.
            let now = Instant::now();
            let wait = [self.throttle_wait(), self.stack_deadline.map(|d| d.saturating_duration_since(now))]
                .into_iter()
                .flatten()
                .min();
            if sleep && !doorbell::nsm_may_sleep(|v| self.set_sleeping(v), || self.rings_have_work()) {
                continue;
            }
            // SAFETY: events is a live buffer of the length passed.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    match (sleep, wait) {
                        (false, _) => 0,
                        (true, None) => -1,
                        // Rounded up: waking early would only find the timer not yet due.
                        (true, Some(d)) => (d.as_micros().div_ceil(1000)).clamp(1, 1000) as i32,
                    },
                )
            };
            if sleep {
                self.set_sleeping(0);
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut woken = false;
            for ev in &events[..n as usize] {
                let (token, bits) = (ev.u64, ev.events);
                if token == TOK_STACK {
                    woken = true;
                    continue;
                }
                if token == TOK_RENDEZVOUS {
                    self.on_rendezvous();
                    continue;
                }
                if token == TOK_CONTROL {
                    // An engine that died mid-request leaves an error, not an EOF: gone all the same.
                    let engine_alive = self.on_control().unwrap_or_else(|e| {
                        eprintln!("netkernel nsm {}: engine channel: {e}", self.name);
                        false
                    });
                    if !engine_alive {
                        // The engine is gone (D1): established traffic goes on, a restarted
                        // engine may adopt this NSM; without one it ends with its last guest.
                        let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, self.control.as_raw_fd(), 0, 0);
                        self.orphaned = true;
                        if let Err(e) = self.spawn_reaper() {
                            eprintln!("netkernel nsm {}: no reaper; a crash now would go unnoticed: {e}", self.name);
                        }
                    }
                    continue;
                }
                worked = true;
                self.on_event(token, bits);
            }
            worked |= self.poll_stack(woken);
            self.finish_refreshes();
            self.unthrottle();
            self.flush_bells();
            if self.stopping
                || self.orphaned && self.atts.iter().all(|a| a.is_none()) && self.lingering.iter().all(|l| l.is_none())
            {
                return Ok(());
            }
            if worked {
                last_work = Instant::now();
                idle_steps = 0;
            } else if !sleep {
                sys::relax(idle_steps);
                idle_steps += 1;
            }
        }
    }

    /// The engine, which tells guests when their NSM died, is gone: a child process that shares
    /// the regions' mappings takes over that duty. It closes every fd but the doorbells, waits for
    /// this process to end (a crash or the normal exit after the last guest) and marks every
    /// region dead, so no guest waits forever on an NSM that is not there.
    fn spawn_reaper(&mut self) -> io::Result<()> {
        // SAFETY: plain system call.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let regions: Vec<(&Region, RawFd)> =
            self.atts.iter().flatten().map(|a| (&*a.region, a.guest_bell.as_raw_fd())).collect();
        let mut keep: Vec<u32> = regions.iter().map(|&(_, fd)| fd as u32).chain([pidfd as u32]).collect();
        keep.sort_unstable();
        // SAFETY: the child only makes system calls and touches the shared mappings, which is
        // what a child of a multi-threaded process may do; it never returns.
        match unsafe { libc::fork() } {
            -1 => {
                sys::close(pidfd);
                Err(io::Error::last_os_error())
            }
            0 => {
                let mut from = 3u32;
                for &fd in &keep {
                    if fd > from {
                        // SAFETY: closes fds this child must not keep (kernel sockets above all).
                        unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0) };
                    }
                    from = fd + 1;
                }
                // SAFETY: as above.
                unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
                let mut p = libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one live pollfd; POLLIN on a pidfd means the process ended.
                while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
                for (region, bell) in regions {
                    region.mark_dead(Some(bell));
                }
                // SAFETY: leaving without running the parent's exit handlers.
                unsafe { libc::_exit(0) }
            }
            child => {
                sys::close(pidfd);
                self.reaper = Some(child);
                Ok(())
            }
        }
    }

    fn set_sleeping(&self, v: u32) {
        for a in self.atts.iter().flatten() {
            a.region.header().nsm_sleeping.store(v, Ordering::SeqCst);
        }
    }

    fn rings_have_work(&self) -> bool {
        self.atts.iter().flatten().any(|a| Consumer::resume(a.region.ring(), a.head).has_work())
    }

    fn flush_bells(&mut self) {
        for a in self.atts.iter_mut().flatten() {
            if a.bell.replace(false) {
                sys::ring_bell(a.guest_bell.as_raw_fd());
            }
        }
    }

    /// Processes every queued nqe of every attachment. Returns whether there was any.
    fn drain_rings(&mut self) -> bool {
        let mut worked = false;
        for ai in 0..self.atts.len() {
            worked |= self.drain(ai);
        }
        worked
    }

    /// Processes the queued nqes of attachment `ai`, at most one queue's worth so that a guest
    /// that keeps submitting cannot starve the others; refuses it if it broke the ABI.
    fn drain(&mut self, ai: usize) -> bool {
        let mut worked = false;
        let mut budget = NQE_COUNT;
        while let Some(a) = self.atts[ai].as_mut() {
            if budget == 0 {
                break;
            }
            budget -= 1;
            let mut c = Consumer::resume(a.region.ring(), a.head);
            let next = c.pop();
            a.head = c.head();
            let r = match next {
                Ok(None) => break,
                Ok(Some(entry)) => validate::nqe_index(entry).and_then(|idx| self.process(ai, idx)),
                Err(c) => Err(Violation::Queue(c)),
            };
            worked = true;
            if let Err(v) = r {
                self.refuse(ai, &v);
                break;
            }
        }
        worked
    }

    /// How long until a throttled tenant may send again (None: nobody is throttled).
    fn throttle_wait(&mut self) -> Option<Duration> {
        let mut wait: Option<Duration> = None;
        for &(ai, _) in &self.throttled {
            let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()) else { continue };
            if let Some(b) = self.buckets.get_mut(&a.tenant) {
                let w = b.wait();
                wait = Some(wait.map_or(w, |x| x.min(w)));
            }
        }
        wait
    }

    /// Socket `slot` of attachment `ai` waits for its tenant's tokens (counted once per wait).
    fn hold_back(&mut self, ai: usize, slot: u32) {
        if self.throttled.contains(&(ai, slot)) {
            return;
        }
        self.throttled.push((ai, slot));
        if let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()) {
            tenant(&mut self.stats, &a.tenant).throttled += 1;
        }
    }

    /// Wakes the throttled sockets whose tenant has tokens again: their queued sends go out,
    /// and a guest blocked in send sees the socket writable.
    fn unthrottle(&mut self) {
        let mut i = 0;
        while i < self.throttled.len() {
            let (ai, slot) = self.throttled[i];
            let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else {
                self.throttled.swap_remove(i);
                continue;
            };
            let Some(b) = self.buckets.get_mut(&a.tenant) else {
                self.throttled.swap_remove(i);
                continue;
            };
            if b.exhausted() {
                i += 1;
                continue;
            }
            self.throttled.swap_remove(i);
            let Some(Some(s)) = a.socks.get_mut(slot as usize) else { continue };
            if s.sendq.queued() > 0 {
                let limit = b.take(s.sendq.queued());
                let n = s.flush(&mut self.stack, limit);
                b.refund(limit - n);
                s.bytes_out += n as u64;
                self.stats.bytes_out += n as u64;
                tenant(&mut self.stats, &a.tenant).bytes_out += n as u64;
            }
            let mut mask = s.mask(&mut self.stack);
            if b.exhausted() {
                mask &= !((libc::POLLOUT | libc::POLLWRNORM) as u32);
                self.throttled.push((ai, slot));
            }
            a.region.slot(slot).queued.store(s.sendq.queued() as u32, Ordering::Release);
            publish(a, slot, mask, true);
        }
    }

    /// Stops watching an attachment's doorbell and processes. The guest may still hold the same
    /// files, so closing our copies alone would leave them registered.
    fn forget(&self, a: &Attachment<S::Handle>) {
        let ep = self.epfd.as_raw_fd();
        let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, a.nsm_bell.as_raw_fd(), 0, 0);
        for (_, pidfd) in a.holders.pidfds() {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, pidfd.as_raw_fd(), 0, 0);
        }
    }

    /// A socket its guest no longer has: closed now, or once its queued sends are out.
    fn retire(&mut self, s: Sock<S::Handle>) {
        retire(&mut self.stack, &mut self.lingering, s);
    }

    /// Drops an attachment whose guest broke the ABI; nobody else notices.
    fn refuse(&mut self, ai: usize, v: &Violation) {
        if let Some(a) = self.atts[ai].take() {
            eprintln!(
                "netkernel nsm {}: refusing attachment {} (tenant {}, pid {}): {v}",
                self.name, a.id, a.tenant, a.pid
            );
            self.stats.violations += 1;
            tenant(&mut self.stats, &a.tenant).violations += 1;
            a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
            self.forget(&a);
            // Its connections end as a crashed process's do: nothing queued is sent.
            for h in a.socks.into_iter().flatten().filter_map(|s| s.handle) {
                self.stack.close(h);
            }
        }
    }

    fn on_event(&mut self, token: u64, bits: u32) {
        let ai = ((token >> 32) & 0x3fff_ffff) as usize;
        let slot = token as u32;
        match token >> KIND_SHIFT {
            TOK_SOCK => {
                let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else {
                    return;
                };
                let Some(Some(s)) = a.socks.get_mut(slot as usize) else { return };
                let mut bucket = self.buckets.get_mut(&a.tenant);
                if s.sendq.queued() > 0 && bits & libc::EPOLLOUT as u32 != 0 {
                    let limit = bucket.as_deref_mut().map_or(usize::MAX, |b| b.take(s.sendq.queued()));
                    let n = s.flush(&mut self.stack, limit);
                    if let Some(b) = bucket.as_deref_mut() {
                        b.refund(limit - n);
                    }
                    s.bytes_out += n as u64;
                    self.stats.bytes_out += n as u64;
                    tenant(&mut self.stats, &a.tenant).bytes_out += n as u64;
                }
                let mut mask = s.sendq.adjust(s.with_mark(&mut self.stack, bits & !(libc::EPOLLET as u32)));
                if s.backlog.as_ref().is_some_and(|b| !b.queue.is_empty()) {
                    mask |= (libc::POLLIN | libc::POLLRDNORM) as u32;
                }
                let exhausted = bucket.is_some_and(|b| b.exhausted());
                if exhausted {
                    mask &= !((libc::POLLOUT | libc::POLLWRNORM) as u32);
                }
                a.region.slot(slot).queued.store(s.sendq.queued() as u32, Ordering::Release);
                publish(a, slot, mask, true);
                if exhausted {
                    self.hold_back(ai, slot);
                }
            }
            TOK_BELL => {
                if let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()) {
                    sys::drain_bell(a.nsm_bell.as_raw_fd());
                }
            }
            TOK_PIDFD => {
                if self.atts.get(ai).and_then(|a| a.as_ref()).is_none() {
                    return;
                }
                // Whatever that process submitted before exiting is done first.
                self.drain(ai);
                self.release_holder(ai, slot);
                let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else { return };
                // The guest's last process exited: its sockets close as the kernel would.
                if !a.holders.any_process() {
                    if let Some(a) = self.atts[ai].take() {
                        self.forget(&a);
                        for s in a.socks.into_iter().flatten() {
                            self.retire(s);
                        }
                    }
                }
            }
            _ if token & TOK_LINGER == TOK_LINGER && token != TOK_CONTROL => {
                let i = slot as usize;
                let Some(Some(s)) = self.lingering.get_mut(i) else { return };
                let n = s.flush(&mut self.stack, usize::MAX) as u64;
                self.stats.bytes_out += n;
                if s.sendq.queued() == 0 || bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    if let Some(h) = self.lingering[i].take().and_then(|s| s.handle) {
                        self.stack.close(h);
                    }
                }
            }
            _ => {}
        }
    }

    /// Handles one engine message. Returns false when the engine went away.
    fn on_control(&mut self) -> io::Result<bool> {
        let Some((payload, fds)) = sys::recv_frame(self.control.as_raw_fd())? else {
            return Ok(false);
        };
        // SAFETY: the fds were just received and are owned by nobody else.
        let fds: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
        let reply = match serde_json::from_slice::<NsmRequest>(&payload) {
            Ok(NsmRequest::Attach { attachment, tenant, pid, uid, policy }) => {
                match self.attach(attachment, tenant, pid, uid, policy, fds) {
                    Ok(()) => control::Reply::ok(()),
                    Err(e) => control::Reply::err(e),
                }
            }
            Ok(NsmRequest::Hold { attachment, holder }) => match self.hold(attachment, holder, fds) {
                Ok(()) => control::Reply::ok(()),
                Err(e) => control::Reply::err(e),
            },
            Ok(NsmRequest::Stats) => control::Reply::ok(self.snapshot()),
            Ok(NsmRequest::Adopt) => control::Reply::ok(self.state()),
            Ok(NsmRequest::Region { attachment }) => match self.region_fds(attachment) {
                Ok(fds) => {
                    let bytes = serde_json::to_vec(&control::Reply::ok(())).unwrap_or_default();
                    sys::send_frame(self.control.as_raw_fd(), &bytes, &fds)?;
                    return Ok(true);
                }
                Err(e) => control::Reply::err(e),
            },
            Ok(NsmRequest::Shutdown) => {
                self.shutdown();
                control::Reply::ok(())
            }
            Err(e) => control::Reply::err(format!("bad request: {e}")),
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        sys::send_frame(self.control.as_raw_fd(), &bytes, &[])?;
        Ok(true)
    }

    fn attach(
        &mut self,
        id: u64,
        tenant: String,
        pid: i32,
        uid: u32,
        policy: control::TenantPolicy,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        let [memfd, nsm_bell, guest_bell, pidfd]: [OwnedFd; 4] =
            fds.try_into().map_err(|v: Vec<OwnedFd>| format!("attach needs 4 fds, got {}", v.len()))?;
        let region = Arc::new(Region::map(memfd.as_raw_fd()).map_err(|e| e.to_string())?);
        // Guests watch this process, so they notice its death with no engine to tell them.
        region.header().nsm_pid.store(std::process::id(), Ordering::Release);
        let ai = match self.atts.iter().position(|a| a.is_none()) {
            Some(i) => i,
            None => {
                self.atts.push(None);
                self.atts.len() - 1
            }
        };
        let ep = self.epfd.as_raw_fd();
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, nsm_bell.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_BELL, ai, 0))
            .and_then(|()| {
                epoll_ctl(ep, libc::EPOLL_CTL_ADD, pidfd.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_PIDFD, ai, 0))
            })
            .map_err(|e| format!("epoll: {e}"))?;
        if let Some((bits, burst)) = policy.rate {
            self.buckets.entry(tenant.clone()).or_insert_with(|| ratelimit::Bucket::new(bits, burst));
        }
        let head = region.ring().head.load(Ordering::Acquire);
        self.atts[ai] = Some(Attachment {
            id,
            tenant,
            pid,
            uid,
            region,
            memfd,
            head,
            nsm_bell,
            guest_bell,
            holders: holders::Holders::new(pidfd),
            policy,
            socks: Vec::new(),
            free: Vec::new(),
            bell: Rc::default(),
        });
        Ok(())
    }

    /// A process of the guest exited (or will never exist): the sockets only it still held
    /// close, as the kernel closes an exiting process's fds.
    fn release_holder(&mut self, ai: usize, holder: u32) {
        let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else { return };
        let (pidfd, unheld) = a.holders.remove(holder);
        if let Some(p) = pidfd {
            let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, p.as_raw_fd(), 0, 0);
        }
        let closed: Vec<Sock<S::Handle>> = unheld.into_iter().filter_map(|slot| close_slot(a, slot)).collect();
        for s in closed {
            self.retire(s);
        }
    }

    /// The engine ties a process (by its pidfd) to holder `holder` of attachment `id`.
    fn hold(&mut self, id: u64, holder: u32, fds: Vec<OwnedFd>) -> Result<(), String> {
        let [pidfd]: [OwnedFd; 1] = fds.try_into().map_err(|_| "hold needs one pidfd".to_string())?;
        let ai = self.atts.iter().position(|a| a.as_ref().is_some_and(|a| a.id == id)).ok_or("no such attachment")?;
        let a = self.atts[ai].as_mut().expect("found above");
        let ep = self.epfd.as_raw_fd();
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, pidfd.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_PIDFD, ai, holder))
            .map_err(|e| format!("epoll: {e}"))?;
        if let Some(old) = a.holders.tie(holder, pidfd) {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, old.as_raw_fd(), 0, 0);
        }
        Ok(())
    }

    fn snapshot(&mut self) -> NsmStats {
        let mut s = self.stats.clone();
        s.attachments = self.atts.iter().flatten().count();
        for a in self.atts.iter().flatten() {
            for sock in a.socks.iter().flatten() {
                s.conns.push(telemetry::conn_info(&mut self.stack, a, sock, &self.name));
            }
        }
        s
    }

    /// Validates and executes nqe `idx` of attachment `ai`, then completes it.
    fn process(&mut self, ai: usize, idx: u32) -> Result<(), Violation> {
        let a = self.atts[ai].as_mut().expect("caller checked");
        let p = a.region.nqe(idx);
        let req = validate::validate(idx, &a.region.nqe_snapshot(idx), a.region.layout())?;
        let mut addr = [0u8; ADDR_MAX];
        let mut addr_out = None;
        if let Call::Resolve { query, family, socktype, flags } = req.call {
            let parsed = if query.is_empty() {
                None
            } else {
                // SAFETY: validate() checked the buffer lies in the pool; copied before parsing.
                let bytes = unsafe {
                    std::slice::from_raw_parts(a.region.pool_ptr(query.off(), query.len()), query.len() as usize)
                }
                .to_vec();
                resolve::Query::parse(&bytes, family, socktype, flags)
            };
            if let Some(q) = parsed {
                // Completed by the resolver thread.
                resolve::spawn(self.hosts.clone(), a.region.clone(), idx, query.off(), query.len(), q);
                return Ok(());
            }
        }
        if let Call::Ioctl { request: netkernel_abi::IOCTL_REFRESH } = req.call {
            self.refreshes.push((ai, a.id, idx));
            return Ok(());
        }
        let result = match self.connect_colocated(ai, &req) {
            Some(r) => r.unwrap_or_else(|e| -(e as i64)),
            None => self.perform(ai, idx, &req, &mut addr, &mut addr_out)?,
        };
        if settles(&req, result) {
            self.settle();
        }
        if let (Call::Listen { backlog }, 0) = (req.call, result) {
            self.register_listener(ai, req.sock, backlog);
        }
        let a = self.atts[ai].as_mut().expect("caller checked");
        let seq = a.region.slot(req.seq_slot()).seq.load(Ordering::Acquire);
        // SAFETY: p points at nqe idx inside the mapping; the guest reads these fields only
        // after it sees DONE, which the Release swap below orders after these writes.
        unsafe {
            std::ptr::write_volatile(&mut (*p).result, result);
            std::ptr::write_volatile(&mut (*p).seq, seq);
            if let Some(len) = addr_out {
                std::ptr::write_volatile(&mut (*p).addr_len, len as u32);
                std::ptr::copy_nonoverlapping(addr.as_ptr(), (*p).addr.as_mut_ptr(), ADDR_MAX);
            }
        }
        let old = a.region.nqe_state(idx).swap(nqe_state::DONE, Ordering::AcqRel);
        if old & nqe_state::WAITER != 0 {
            sys::futex_wake(a.region.nqe_state(idx));
        }
        Ok(())
    }

    /// Publishes the readiness the stack changed during the call just run, before its guest
    /// learns the result: Linux delivers loopback synchronously, so a peer's poll right after a
    /// send, shutdown, close or connect returns already sees its effect. Stack sockets only;
    /// doorbells, pidfds and the control channel are level-triggered and wait for the loop.
    fn settle(&mut self) {
        self.poll_stack(true);
    }

    /// Lets the stack advance (`woken`: its wait fd was readable) and publishes the readiness
    /// changes it reports. Returns whether there were any.
    fn poll_stack(&mut self, woken: bool) -> bool {
        let mut ready = std::mem::take(&mut self.ready);
        self.stack_deadline = self.stack.poll(Instant::now(), woken, &mut ready);
        let any = !ready.is_empty();
        for r in ready.drain(..) {
            self.on_event(r.key, r.events);
        }
        self.ready = ready;
        any
    }

    /// Completes this round's readiness refreshes: every nqe queued before them has run and the
    /// stack's wakeups since are published.
    fn finish_refreshes(&mut self) {
        for (ai, id, idx) in std::mem::take(&mut self.refreshes) {
            if let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()).filter(|a| a.id == id) {
                complete(&a.region, idx, 0);
            }
        }
    }

    /// Runs a request on the stack (or on a co-located socket's pipe).
    fn perform(
        &mut self,
        ai: usize,
        idx: u32,
        req: &Request,
        addr: &mut [u8; ADDR_MAX],
        addr_out: &mut Option<usize>,
    ) -> Result<i64, Violation> {
        let a = self.atts[ai].as_ref().expect("caller checked");
        let tenant_sockets = if matches!(req.call, Call::Socket { .. } | Call::Accept) && a.policy.max_sockets.is_some()
        {
            let t = a.tenant.clone();
            self.atts.iter().flatten().filter(|x| x.tenant == t).map(|x| x.socks.iter().flatten().count()).sum()
        } else {
            0
        };
        let a = self.atts[ai].as_mut().expect("caller checked");
        let bucket = self.buckets.get_mut(&a.tenant);
        let mut throttled = false;
        let result = execute(
            &mut self.stack,
            &mut self.stats,
            tenant_sockets,
            bucket,
            &mut throttled,
            &mut self.lingering,
            &mut self.templates,
            ai,
            a,
            req,
            addr,
            addr_out,
        );
        if result == -(OVERFLOW as i64) {
            return Err(Violation::SendFlood { nqe: idx });
        }
        if throttled {
            self.hold_back(ai, req.sock);
        }
        Ok(result)
    }

    /// A listening socket becomes findable by co-located connects (once; a second listen()
    /// only changes the backlog).
    fn register_listener(&mut self, ai: usize, slot: u32, backlog: i32) {
        let Some(a) = self.atts[ai].as_mut() else { return };
        let Ok(s) = a.sock_mut(slot) else { return };
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let limit = if backlog < 0 { somaxconn } else { (backlog as usize).min(somaxconn) };
        if let Some(b) = s.backlog.as_mut() {
            b.limit = limit;
            return;
        }
        let mut local = [0u8; ADDR_MAX];
        let Some(addr) = s
            .handle()
            .ok()
            .and_then(|h| self.stack.getsockname(h, &mut local).ok())
            .and_then(|n| policy::decode(&local[..n]))
        else {
            return;
        };
        s.backlog = Some(colocated::Backlog { limit, v6: addr.is_ipv6(), queue: Default::default() });
        self.listeners.entry(addr).or_default().push(ListenerRef { ai, slot, serial: s.serial });
    }

    /// The listener a connect to `target` reaches inside this NSM, if one may take a
    /// co-located connection now.
    fn find_listener(&mut self, target: SocketAddr) -> Option<ListenerRef> {
        let port = target.port();
        let (v4, v6) = match target.ip() {
            IpAddr::V4(ip) => (Some(ip), ip.to_ipv6_mapped()),
            IpAddr::V6(ip) => (ip.to_ipv4_mapped(), ip),
        };
        // Most specific first, as the kernel's lookup does; a v6 wildcard listener takes IPv4
        // connections unless it is IPV6_V6ONLY.
        let mut keys = vec![(SocketAddr::new(IpAddr::V6(v6), port), false)];
        if let Some(v4) = v4 {
            keys.insert(0, (SocketAddr::new(IpAddr::V4(v4), port), false));
            keys.push((SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port), true));
        }
        keys.push((SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port), true));
        let mut local: Option<bool> = None;
        for (key, wildcard) in keys {
            let Some(list) = self.listeners.get_mut(&key) else { continue };
            let atts = &self.atts;
            let live = |l: &ListenerRef| {
                atts.get(l.ai)
                    .and_then(|a| a.as_ref())
                    .and_then(|a| a.sock(l.slot).ok())
                    .is_some_and(|s| s.serial == l.serial && s.backlog.is_some())
            };
            list.retain(live);
            if list.is_empty() {
                self.listeners.remove(&key);
                continue;
            }
            if wildcard && !*local.get_or_insert_with(|| colocated::is_local_address(target.ip())) {
                return None;
            }
            // SO_REUSEPORT listeners take turns.
            list.rotate_left(1);
            let l = *list.last().expect("not empty");
            let a = self.atts[l.ai].as_ref().expect("live");
            let s = a.sock(l.slot).expect("live");
            if !a.policy.colocate || s.backlog.as_ref().is_some_and(|b| b.full()) {
                return None;
            }
            if key.is_ipv6() && v4.is_some() && target.is_ipv4() {
                let mut only = [0u8; 4];
                let v6only = s
                    .handle()
                    .ok()
                    .and_then(|h| self.stack.getsockopt(h, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &mut only).ok())
                    .is_some_and(|_| only != [0; 4]);
                if v6only {
                    continue;
                }
            }
            return Some(l);
        }
        None
    }

    /// The co-located short cut (D4): a connect to a listener of this NSM is joined to it by a
    /// pipe instead of TCP. None: the stack connects as usual.
    fn connect_colocated(&mut self, ai: usize, req: &Request) -> Option<Result<i64, Errno>> {
        let Call::Connect { addr, blocking } = req.call else { return None };
        let a = self.atts[ai].as_ref()?;
        let s = a.sock(req.sock).ok()?;
        if !a.policy.colocate || !s.stream || s.pipe.is_some() || s.backlog.is_some() {
            return None;
        }
        let in_addr = addr.as_bytes();
        // Refusals are the stack path's to answer and log.
        let peer = policy::connect(&a.policy, in_addr).ok()?.unwrap_or_else(|| in_addr.to_vec());
        let mut target = policy::decode(&peer)?;
        // Linux takes a connect to the unspecified address for one to loopback.
        if target.ip().is_unspecified() {
            target.set_ip(if target.is_ipv6() {
                Ipv6Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            });
        }
        let peer = policy::encode(&target);
        // Only a socket that has not begun connecting: a connect in progress is the stack's.
        if s.counted {
            return None;
        }
        let l = self.find_listener(target)?;
        let a = self.atts[ai].as_ref().expect("checked");
        let fd = a.sock(req.sock).ok()?.handle().ok()?;
        let mut buf = [0u8; ADDR_MAX];
        let n = self.stack.getsockname(fd, &mut buf).ok()?;
        let mut me = policy::decode(&buf[..n])?;
        if me.port() == 0 || me.ip().is_unspecified() {
            let src = policy::source(&a.policy, me.is_ipv6(), &peer)
                .and_then(|b| policy::decode(&b))
                .map_or(target.ip(), |s| s.ip());
            if me.port() == 0 {
                // The stack picks the port, so no other connection of this NSM has it.
                if let Err(e) = self.stack.bind(fd, &policy::encode(&SocketAddr::new(src, 0))) {
                    return Some(Err(e));
                }
                let n = self.stack.getsockname(fd, &mut buf).ok()?;
                me = policy::decode(&buf[..n])?;
            }
            me.set_ip(src);
        }
        let listener_v6 = self.atts[l.ai].as_ref()?.sock(l.slot).ok()?.backlog.as_ref()?.v6;
        let as_family = |a: SocketAddr| policy::encode(&same_family(a, listener_v6));
        let (mut client, mut server) = colocated::pair((policy::encode(&me), peer), (as_family(target), as_family(me)));
        // Options set before connect (and on the listener, which its connections inherit)
        // hold for the pipe's ends too.
        let a = self.atts[ai].as_ref().expect("checked");
        let fd = a.sock(req.sock).ok()?.handle().ok()?;
        inherit_options(&mut self.stack, &mut self.templates, fd, &mut client, me.is_ipv6());
        let lfd = self.atts[l.ai].as_ref()?.sock(l.slot).ok()?.handle().ok()?;
        inherit_options(&mut self.stack, &mut self.templates, lfd, &mut server, listener_v6);
        // The listener's guest learns of the connection (accept() will find it).
        let la = self.atts[l.ai].as_mut().expect("live");
        let ls = la.sock_mut(l.slot).expect("live");
        ls.backlog.as_mut().expect("listening").queue.push_back(server);
        let mask = ls.mask(&mut self.stack);
        publish(la, l.slot, mask, true);
        let a = self.atts[ai].as_mut().expect("checked");
        let owner = a.owner(req.sock);
        let s = a.sock_mut(req.sock).expect("checked");
        // The stack socket only holds the port now; its events would misreport the socket.
        if let Some(h) = &s.handle {
            self.stack.unwatch(h);
        }
        client.adopt(owner);
        if blocking {
            // The guest would only wait for writability and ask again.
            let _ = client.connect_again();
        }
        s.pipe = Some(client);
        s.counted = true;
        let mask = s.mask(&mut self.stack);
        self.stats.conns_total += 1;
        self.stats.conns_colocated += 1;
        tenant(&mut self.stats, &a.tenant).conns_total += 1;
        publish(a, req.sock, mask, true);
        // As a loopback TCP connect answers: the guest's next connect() reports completion.
        Some(if blocking { Ok(0) } else { Err(libc::EINPROGRESS) })
    }
}

/// Whether a call's effect on other sockets must be published before it completes (see
/// `settle`). Not after EAGAIN: the guest then waits for a wakeup after the completion's `seq`,
/// and one consumed before it would be lost.
fn settles(req: &Request, result: i64) -> bool {
    let call = match req.call {
        Call::Send { nowait, .. } => !nowait,
        Call::Shutdown { .. } | Call::Close | Call::Connect { .. } => true,
        _ => false,
    };
    call && (result >= 0 || result == -(libc::EINPROGRESS as i64))
}

/// Completes nqe `idx` with `result` (an op with no address or data to return).
fn complete(region: &Region, idx: u32, result: i64) {
    let p = region.nqe(idx);
    // SAFETY: p points at nqe idx inside the mapping; the guest reads it only after DONE, which
    // the Release swap below orders after this write.
    unsafe { std::ptr::write_volatile(&mut (*p).result, result) };
    if region.nqe_state(idx).swap(nqe_state::DONE, Ordering::AcqRel) & nqe_state::WAITER != 0 {
        sys::futex_wake(region.nqe_state(idx));
    }
}

/// Copies the options a program may have set on `from` (the stack socket before a co-located
/// connect, or the listener) to a pipe end, where they differ from a fresh socket's.
fn inherit_options<S: Stack>(
    stack: &mut S,
    templates: &mut [Option<S::Handle>; 2],
    from: &S::Handle,
    end: &mut colocated::End,
    v6: bool,
) {
    const INHERITED: [(i32, i32); 8] = [
        (libc::SOL_SOCKET, libc::SO_SNDBUF),
        (libc::SOL_SOCKET, libc::SO_RCVBUF),
        (libc::SOL_SOCKET, libc::SO_OOBINLINE),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMP),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        (libc::SOL_SOCKET, libc::SO_LINGER),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    ];
    for (level, name) in INHERITED {
        let (mut v, mut fresh) = ([0u8; 16], [0u8; 16]);
        let Ok(n) = stack.getsockopt(from, level, name, &mut v) else { continue };
        let Ok(t) = template(stack, templates, v6) else { return };
        if stack.getsockopt(t, level, name, &mut fresh).is_ok_and(|m| v[..n] != fresh[..m]) {
            end.set_option(level, name, v[..n].to_vec());
        }
    }
}

/// `a` as a socket of the other family sees it (IPv4 as v4-mapped IPv6 and back).
fn same_family(a: SocketAddr, v6: bool) -> SocketAddr {
    match (a.ip(), v6) {
        (IpAddr::V4(ip), true) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        (IpAddr::V6(ip), false) => ip.to_ipv4_mapped().map_or(a, |ip| SocketAddr::new(IpAddr::V4(ip), a.port())),
        _ => a,
    }
}

/// Counts and logs an operation the tenant's policy refused; returns the errno to answer.
fn refused<H>(stats: &mut NsmStats, a: &Attachment<H>, what: &str, e: Errno) -> Errno {
    tenant(stats, &a.tenant).refused += 1;
    eprintln!("netkernel nsm {}: tenant {} (pid {}): refused {what}", stats.nsm, a.tenant, a.pid);
    e
}

/// A tenant's totals, created on first use.
fn tenant<'a>(stats: &'a mut NsmStats, name: &str) -> &'a mut control::TenantTotals {
    if !stats.tenants.contains_key(name) {
        stats.tenants.insert(name.to_string(), Default::default());
    }
    stats.tenants.get_mut(name).expect("inserted above")
}

/// Closes a socket its guest gave up, unless asynchronous sends are still queued: then it stays
/// open, watched under a lingering token, until they are out.
fn retire<S: Stack>(stack: &mut S, lingering: &mut Vec<Option<Sock<S::Handle>>>, mut s: Sock<S::Handle>) {
    let Some(h) = s.handle.take() else { return };
    if s.sendq.queued() == 0 {
        stack.close(h);
        return;
    }
    let i = lingering.iter().position(|l| l.is_none()).unwrap_or_else(|| {
        lingering.push(None);
        lingering.len() - 1
    });
    match stack.watch(&h, TOK_LINGER | i as u64) {
        Ok(()) => {
            s.handle = Some(h);
            lingering[i] = Some(s);
        }
        Err(_) => stack.close(h),
    }
}

/// Stores a socket's readiness in its slot. `wakeup` marks a stack wakeup (a new edge): it
/// bumps the sequence and wakes sleepers; a refresh after the guest's own call only corrects
/// the mask, as the guest's own call would cause no wakeup on Linux either.
fn publish<H>(a: &Attachment<H>, slot: u32, mask: u32, wakeup: bool) {
    colocated::publish(&a.region, slot, mask, wakeup, &a.bell);
}

/// Socket options a guest may not set through a privileged NSM: Linux refuses them to an
/// unprivileged process with EPERM, and the provider, not the tenant, picks congestion control.
fn privileged_option(level: i32, name: i32) -> bool {
    match level {
        libc::SOL_SOCKET => matches!(
            name,
            libc::SO_BINDTODEVICE | libc::SO_MARK | libc::SO_RCVBUFFORCE | libc::SO_SNDBUFFORCE | libc::SO_DEBUG
        ),
        libc::IPPROTO_IP => matches!(name, libc::IP_TRANSPARENT | libc::IP_FREEBIND),
        libc::IPPROTO_IPV6 => matches!(name, libc::IPV6_TRANSPARENT),
        libc::IPPROTO_TCP => matches!(name, libc::TCP_CONGESTION | libc::TCP_REPAIR),
        _ => false,
    }
}

/// Whether `addr` binds a port below the unprivileged range, which a non-root guest may not.
fn privileged_port(addr: &[u8]) -> bool {
    if addr.len() < 4 {
        return false;
    }
    let port = u16::from_be_bytes([addr[2], addr[3]]);
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    port != 0 && port < start
}

#[allow(clippy::too_many_arguments)]
fn execute<S: Stack>(
    stack: &mut S,
    stats: &mut NsmStats,
    tenant_sockets: usize,
    mut bucket: Option<&mut ratelimit::Bucket>,
    throttled: &mut bool,
    lingering: &mut Vec<Option<Sock<S::Handle>>>,
    templates: &mut [Option<S::Handle>; 2],
    ai: usize,
    a: &mut Attachment<S::Handle>,
    req: &Request,
    addr: &mut [u8; ADDR_MAX],
    addr_out: &mut Option<usize>,
) -> i64 {
    let pool = req.call.buf();
    let bufp = if pool.is_empty() { std::ptr::null_mut() } else { a.region.pool_ptr(pool.off(), pool.len()) };
    let region_buf = |_: &Attachment<S::Handle>| -> &mut [u8] {
        if bufp.is_null() {
            return &mut [];
        }
        // SAFETY: validate() checked [off, +len) lies in the pool of a region that outlives
        // this call. The guest may write the bytes concurrently; they are only copied to or
        // from the stack.
        unsafe { std::slice::from_raw_parts_mut(bufp, pool.len() as usize) }
    };
    let in_addr = match &req.call {
        Call::Bind { addr } | Call::Connect { addr, .. } | Call::Send { to: addr, .. } => addr.as_bytes(),
        _ => &[],
    };
    let colocated = a.sock(req.sock).is_ok_and(|s| s.pipe.is_some());
    let r: Result<i64, Errno> = (|| match req.call {
        Call::Send { .. }
        | Call::Recv { .. }
        | Call::Shutdown { .. }
        | Call::GetSockOpt { .. }
        | Call::SetSockOpt { .. }
        | Call::GetSockName
        | Call::GetPeerName
        | Call::Ioctl { .. }
        | Call::Bind { .. }
        | Call::Listen { .. }
        | Call::Accept
        | Call::Connect { .. }
            if colocated =>
        {
            let buf = region_buf(a);
            colocated_op(stack, stats, templates, bucket.as_deref_mut(), throttled, a, req, buf, addr, addr_out)
        }
        Call::Socket { domain, ty, protocol } => {
            if domain != libc::AF_INET && domain != libc::AF_INET6 {
                return Err(libc::EAFNOSUPPORT);
            }
            // The NSM sets its own flags; a guest's are stripped so they cannot hide a type.
            let ty = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
            const SOCK_PACKET: i32 = 10;
            if ty == libc::SOCK_RAW || ty == SOCK_PACKET {
                return Err(libc::EPERM);
            }
            if a.policy.max_sockets.is_some_and(|m| tenant_sockets >= m as usize) {
                return Err(refused(stats, a, "socket limit reached", libc::EMFILE));
            }
            let fd = stack.socket(domain, ty, protocol)?;
            let id = add_sock(stack, ai, a, req.holder, Sock::new(Some(fd), ty == libc::SOCK_STREAM), None)?;
            Ok(id as i64)
        }
        Call::Bind { .. } => {
            let local =
                policy::bind(&a.policy, in_addr).map_err(|e| refused(stats, a, "bind outside its addresses", e))?;
            let local = local.as_deref().unwrap_or(in_addr);
            if a.uid != 0 && privileged_port(local) {
                return Err(libc::EACCES);
            }
            stack.bind(a.sock(req.sock)?.handle()?, local).map(|()| 0)
        }
        Call::Listen { backlog } => {
            let fd = a.sock(req.sock)?.handle()?;
            if a.policy.listen_ports.is_some() {
                let mut local = [0u8; ADDR_MAX];
                let n = stack.getsockname(fd, &mut local)?;
                let port = policy::decode(&local[..n]).map_or(0, |a| a.port());
                // An unbound socket (port 0) would listen on any port the stack picks.
                if !policy::may_listen(&a.policy, port) {
                    return Err(refused(stats, a, "listen on a port it may not use", libc::EACCES));
                }
            }
            stack.listen(fd, backlog).map(|()| 0)
        }
        Call::Accept => {
            if a.policy.max_sockets.is_some_and(|m| tenant_sockets >= m as usize) {
                return Err(refused(stats, a, "socket limit reached", libc::EMFILE));
            }
            let pending = a.sock_mut(req.sock)?.backlog.as_mut().and_then(|b| b.queue.pop_front());
            let (id, len) = match pending {
                Some(end) => {
                    let len = end.peer.len();
                    addr[..len].copy_from_slice(&end.peer);
                    (add_sock(stack, ai, a, req.holder, Sock::new(None, true), Some(end))?, len)
                }
                None => {
                    let (fd, len) = stack.accept(a.sock(req.sock)?.handle()?, addr)?;
                    (add_sock(stack, ai, a, req.holder, Sock::new(Some(fd), true), None)?, len)
                }
            };
            stats.conns_total += 1;
            tenant(stats, &a.tenant).conns_total += 1;
            *addr_out = Some(len);
            Ok(id as i64)
        }
        Call::Connect { .. } => {
            let peer =
                policy::connect(&a.policy, in_addr).map_err(|e| refused(stats, a, "connect to another tenant", e))?;
            let peer = peer.as_deref().unwrap_or(in_addr);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            // A tenant with addresses connects from its own address, not the NSM's.
            let mut local = [0u8; ADDR_MAX];
            let fd = s.handle()?;
            let unbound = stack.getsockname(fd, &mut local).ok().and_then(|n| policy::decode(&local[..n]));
            if let Some(src) =
                unbound.filter(|l| l.port() == 0).and_then(|l| policy::source(&a.policy, l.is_ipv6(), peer))
            {
                stack.bind(fd, &src)?;
            }
            let r = stack.connect(fd, peer);
            // GuestLib's blocking connect calls connect twice; the connection counts once.
            if matches!(r, Ok(()) | Err(libc::EINPROGRESS)) && s.stream && !s.counted {
                s.counted = true;
                stats.conns_total += 1;
                tenant(stats, &a.tenant).conns_total += 1;
            }
            r.map(|()| 0)
        }
        Call::Send { flags, nowait: is_async, .. } => {
            let data = region_buf(a);
            // A datagram's destination obeys the tenant's policy as a connect's does.
            let to = if in_addr.is_empty() {
                None
            } else {
                policy::connect(&a.policy, in_addr).map_err(|e| refused(stats, a, "send to another tenant", e))?
            };
            let in_addr = to.as_deref().unwrap_or(in_addr);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            if let Some(e) = s.sendq.deferred {
                // A send reports the pending error; an asynchronous one leaves it for a call
                // whose result the guest reads.
                if !is_async {
                    s.sendq.deferred = None;
                }
                return Err(e);
            }
            if s.sendq.queued() > 0 {
                // Bytes are still queued: later bytes go behind them.
                if !is_async {
                    return Err(libc::EAGAIN);
                }
                if s.sendq.queued() + data.len() > sendq::MAX_QUEUED {
                    // GuestLib sends asynchronously only to a socket with nothing queued: this
                    // guest is flooding the NSM's memory.
                    return Err(OVERFLOW);
                }
                s.sendq.push(data);
                return Ok(data.len() as i64);
            }
            // The tenant's rate limit: what it has tokens for goes now, the rest waits.
            let allowed = bucket.as_deref_mut().map_or(data.len(), |b| b.take(data.len()));
            if allowed == 0 && !data.is_empty() {
                *throttled = true;
                if !is_async {
                    return Err(libc::EAGAIN);
                }
                s.sendq.push(data);
                return Ok(data.len() as i64);
            }
            let control = cmsg::sent(&a.region, req);
            let r = if control.is_empty() {
                stack.send(s.handle()?, &data[..allowed], flags, in_addr)
            } else {
                stack.sendmsg(s.handle()?, &data[..allowed], flags, in_addr, control)
            };
            if let Some(b) = bucket.as_deref_mut() {
                b.refund(allowed - r.as_ref().map_or(0, |&n| n));
                *throttled = b.exhausted();
            }
            if let Ok(n) = r {
                stats.bytes_out += n as u64;
                s.bytes_out += n as u64;
                tenant(stats, &a.tenant).bytes_out += n as u64;
            }
            match r {
                Ok(n) if is_async && n < data.len() => {
                    s.sendq.push(&data[n..]);
                    return Ok(data.len() as i64);
                }
                Err(libc::EAGAIN) if is_async => s.sendq.push(data),
                Err(e) if is_async => s.sendq.fail(e),
                _ => {}
            }
            r.map(|n| n as i64)
        }
        Call::Recv { flags, .. } => {
            let buf = region_buf(a);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            let area = cmsg::area(&a.region, req);
            let (n, alen) = match cmsg::recv(stack, s.handle()?, buf, flags, addr, area) {
                // With nothing to read, a pending error from an asynchronous send is reported.
                Ok((0, _)) | Err(libc::EAGAIN) if s.sendq.deferred.is_some() => {
                    return Err(s.sendq.deferred.take().expect("checked"))
                }
                r => r?,
            };
            if flags & libc::MSG_PEEK == 0 {
                stats.bytes_in += n as u64;
                tenant(stats, &a.tenant).bytes_in += n as u64;
                if let Some(Some(s)) = a.socks.get_mut(req.sock as usize) {
                    s.bytes_in += n as u64;
                }
            }
            *addr_out = Some(alen);
            Ok(n as i64)
        }
        Call::Shutdown { how } => {
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            if s.sendq.queued() > 0 && (how == libc::SHUT_WR || how == libc::SHUT_RDWR) {
                // The FIN goes after the queued bytes.
                s.sendq.shutdown_after = Some(how);
                return Ok(0);
            }
            stack.shutdown(s.handle()?, how)?;
            // A listener whose receive side is shut down stops listening: its waiting
            // co-located connections are reset, and no new one finds it.
            if how != libc::SHUT_WR {
                s.backlog = None;
            }
            Ok(0)
        }
        Call::Close => {
            a.sock(req.sock)?;
            // Other processes holding the socket keep it open.
            if a.holders.closed(req.holder, req.sock) {
                if let Some(s) = close_slot(a, req.sock) {
                    retire(stack, lingering, s);
                }
            }
            Ok(0)
        }
        Call::Share { holder: to, all, .. } => {
            let buf = region_buf(a);
            let slots: Option<Vec<u32>> = (!all)
                .then(|| buf.chunks_exact(4).map(|c| u32::from_ne_bytes(c.try_into().expect("4 bytes"))).collect());
            let to = u32::try_from(to).map_err(|_| libc::EINVAL)?;
            a.holders.share(req.holder, to, slots.as_deref()).map(|()| 0)
        }
        Call::Unshare { holder } => {
            let holder = u32::try_from(holder).map_err(|_| libc::EINVAL)?;
            // The pidfd (if the engine tied one) leaves the epoll set when it closes: only this
            // process has it.
            let (_pidfd, unheld) = a.holders.remove(holder);
            for slot in unheld {
                if let Some(s) = close_slot(a, slot) {
                    retire(stack, lingering, s);
                }
            }
            Ok(0)
        }
        Call::GetSockOpt { level: libc::SOL_SOCKET, name: libc::SO_ERROR, .. } => {
            let buf = region_buf(a);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            match s.sendq.deferred.take() {
                Some(e) if buf.len() >= 4 => {
                    buf[..4].copy_from_slice(&e.to_ne_bytes());
                    Ok(4)
                }
                _ => stack.getsockopt(s.handle()?, libc::SOL_SOCKET, libc::SO_ERROR, buf).map(|n| n as i64),
            }
        }
        Call::GetSockOpt { level, name, .. } => {
            let buf = region_buf(a);
            stack.getsockopt(a.sock(req.sock)?.handle()?, level, name, buf).map(|n| n as i64)
        }
        Call::SetSockOpt { level, name, .. } => {
            if privileged_option(level, name) {
                return Err(libc::EPERM);
            }
            let buf = region_buf(a);
            stack.setsockopt(a.sock(req.sock)?.handle()?, level, name, buf).map(|()| 0)
        }
        Call::GetSockName | Call::GetPeerName => {
            let fd = a.sock(req.sock)?.handle()?;
            let len = if req.call == Call::GetSockName {
                stack.getsockname(fd, addr)?
            } else {
                stack.getpeername(fd, addr)?
            };
            *addr_out = Some(len);
            Ok(0)
        }
        Call::Ioctl { request } => stack.ioctl(a.sock(req.sock)?.handle()?, request),
        // A well-formed one is answered by a resolver thread before execute().
        Call::Resolve { .. } => Ok(netkernel_abi::RESOLVE_EAI_BASE + libc::EAI_NONAME as i64),
    })();
    // Pure queries change no readiness (getsockopt can: reading SO_ERROR clears POLLERR).
    let queries = matches!(
        req.call,
        Call::GetSockName
            | Call::GetPeerName
            | Call::Ioctl { .. }
            | Call::Resolve { .. }
            | Call::Share { .. }
            | Call::Unshare { .. }
    );
    if req.call != Call::Close && !queries {
        if let Ok(s) = a.sock(req.sock) {
            let mut mask = s.mask(stack);
            if *throttled {
                mask &= !((libc::POLLOUT | libc::POLLWRNORM) as u32);
            }
            a.region.slot(req.sock).queued.store(s.sendq.queued() as u32, Ordering::Release);
            publish(a, req.sock, mask, false);
        }
    }
    match r {
        Ok(v) => v,
        Err(e) => -(e as i64),
    }
}

/// Takes socket `slot` out of its attachment (nobody holds it any more) for the caller to retire.
fn close_slot<H>(a: &mut Attachment<H>, slot: u32) -> Option<Sock<H>> {
    let s = a.socks.get_mut(slot as usize)?.take()?;
    a.free.push(slot);
    a.region.slot(slot).mask.store(0, Ordering::Release);
    a.region.slot(slot).queued.store(0, Ordering::Release);
    Some(s)
}

/// Gives a new socket a slot and starts watching it: its stack socket with epoll, or its
/// co-located end by telling the pipe where the socket lives.
fn add_sock<S: Stack>(
    stack: &mut S,
    ai: usize,
    a: &mut Attachment<S::Handle>,
    holder: u32,
    mut sock: Sock<S::Handle>,
    pipe: Option<colocated::End>,
) -> Result<u32, Errno> {
    let id = match a.free.pop() {
        Some(id) => id,
        None if a.socks.len() < SLOT_COUNT as usize => {
            a.socks.push(None);
            (a.socks.len() - 1) as u32
        }
        None => return Err(libc::EMFILE),
    };
    if let Some(h) = &sock.handle {
        if let Err(e) = stack.watch(h, tok(TOK_SOCK, ai, id)) {
            a.free.push(id);
            return Err(e);
        }
    }
    if let Some(mut end) = pipe {
        end.adopt(a.owner(id));
        sock.pipe = Some(end);
    }
    let mask = sock.mask(stack);
    a.socks[id as usize] = Some(sock);
    a.holders.created(holder, id);
    publish(a, id, mask, true);
    Ok(id)
}

/// A request on a co-located socket: the pipe answers as a connected TCP socket would.
#[allow(clippy::too_many_arguments)]
fn colocated_op<S: Stack>(
    stack: &mut S,
    stats: &mut NsmStats,
    templates: &mut [Option<S::Handle>; 2],
    bucket: Option<&mut ratelimit::Bucket>,
    throttled: &mut bool,
    a: &mut Attachment<S::Handle>,
    req: &Request,
    buf: &mut [u8],
    addr: &mut [u8; ADDR_MAX],
    addr_out: &mut Option<usize>,
) -> Result<i64, Errno> {
    let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
    let end = s.pipe.as_mut().expect("caller checked");
    let v6 = end.local.len() > 16;
    match req.call {
        Call::Bind { .. } | Call::Listen { .. } | Call::Accept => Err(libc::EINVAL),
        Call::Connect { .. } => end.connect_again().map(|()| 0),
        Call::Send { nowait: is_async, flags, .. } => {
            let urgent = flags & libc::MSG_OOB != 0;
            // The tenant's rate limit holds for bytes that stay on the host too. An asynchronous
            // send cannot wait: it is charged, and the tenant waits until the debt is paid.
            let (n, bucket) = match bucket {
                Some(b) if is_async => {
                    let n = end.send(buf, true, sendq::MAX_QUEUED, urgent).map_err(|e| e.unwrap_or(OVERFLOW))?;
                    b.charge(n);
                    (n, Some(b))
                }
                Some(b) => {
                    let allowed = b.take(buf.len());
                    if allowed == 0 && !buf.is_empty() {
                        *throttled = true;
                        return Err(libc::EAGAIN);
                    }
                    let r = end.send(&buf[..allowed], false, 0, urgent).map_err(|e| e.unwrap_or(OVERFLOW));
                    b.refund(allowed - r.as_ref().map_or(0, |&n| n));
                    (r?, Some(b))
                }
                None => (end.send(buf, is_async, sendq::MAX_QUEUED, urgent).map_err(|e| e.unwrap_or(OVERFLOW))?, None),
            };
            *throttled = bucket.is_some_and(|b| b.exhausted());
            s.bytes_out += n as u64;
            stats.bytes_out += n as u64;
            tenant(stats, &a.tenant).bytes_out += n as u64;
            Ok(n as i64)
        }
        Call::Recv { flags, .. } => {
            let n = end.recv(buf, flags)?;
            if let Some(area) = cmsg::area(&a.region, req) {
                cmsg::colocated(area, end.stamp(), flags & libc::MSG_OOB);
            }
            if flags & libc::MSG_PEEK == 0 {
                s.bytes_in += n as u64;
                stats.bytes_in += n as u64;
                tenant(stats, &a.tenant).bytes_in += n as u64;
            }
            // A stream socket reports no source address.
            *addr_out = Some(0);
            Ok(n as i64)
        }
        Call::Shutdown { how } => end.shutdown(how).map(|()| 0),
        Call::GetPeerName if end.closed() => Err(libc::ENOTCONN),
        Call::GetSockName | Call::GetPeerName => {
            let src = if req.call == Call::GetSockName { &end.local } else { &end.peer };
            addr[..src.len()].copy_from_slice(src);
            *addr_out = Some(src.len());
            Ok(0)
        }
        Call::GetSockOpt { level: libc::SOL_SOCKET, name: libc::SO_ERROR, .. } => {
            let e = end.take_error().unwrap_or(0);
            let n = buf.len().min(4);
            buf[..n].copy_from_slice(&e.to_ne_bytes()[..n]);
            Ok(n as i64)
        }
        Call::GetSockOpt { level, name, .. } => {
            if let Some(v) = end.option(level, name) {
                let n = buf.len().min(v.len());
                buf[..n].copy_from_slice(&v[..n]);
                return Ok(n as i64);
            }
            // Never set: the default a fresh socket of the family reports.
            let t = template(stack, templates, v6)?;
            let n = stack.getsockopt(t, level, name, buf)?;
            if (level, name) == (libc::IPPROTO_TCP, libc::TCP_INFO) && n > 0 {
                buf[0] = end.tcp_state();
            }
            Ok(n as i64)
        }
        Call::SetSockOpt { level, name, .. } => {
            // The kernel validates and normalises the value (SO_RCVBUF doubles, ...) on a
            // scratch socket; the socket keeps what it would read back.
            let scratch = stack.socket(if v6 { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_STREAM, 0)?;
            stack.setsockopt(&scratch, level, name, buf)?;
            let mut back = [0u8; 256];
            let value = match stack.getsockopt(&scratch, level, name, &mut back) {
                Ok(n) => back[..n].to_vec(),
                Err(_) => buf.to_vec(),
            };
            stack.close(scratch);
            end.set_option(level, name, value);
            Ok(0)
        }
        Call::Ioctl { request } => match request {
            libc::FIONREAD => Ok(end.unread() as i64),
            // Loopback acknowledges at once: nothing stays unsent or unacknowledged.
            libc::TIOCOUTQ => Ok(0),
            SIOCATMARK => Ok(end.at_mark() as i64),
            _ => Err(libc::ENOTTY),
        },
        Call::Socket { .. } | Call::Close | Call::Resolve { .. } | Call::Share { .. } | Call::Unshare { .. } => {
            unreachable!("not dispatched to the pipe")
        }
    }
}

const SIOCATMARK: u64 = 0x8905;

/// The fresh stack socket of the family, made on first use.
fn template<'a, S: Stack>(
    stack: &mut S,
    templates: &'a mut [Option<S::Handle>; 2],
    v6: bool,
) -> Result<&'a S::Handle, Errno> {
    let t = &mut templates[v6 as usize];
    if t.is_none() {
        *t = Some(stack.socket(if v6 { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_STREAM, 0)?);
    }
    Ok(t.as_ref().expect("made above"))
}
