//! A guest's socket as the NSM keeps it, and the attachment (one guest's region) that holds it.

use crate::colocated;
use crate::core::TOK_LINGER;
use crate::holders;
use crate::sendq::SendQueue;
use crate::stack::{Errno, Stack};
use crate::{control, SIOCATMARK};
use netkernel_abi::nqe_state;
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) struct Sock<H> {
    /// The stack's socket; None for the accepted end of a co-located connection, which needs
    /// none.
    pub(crate) handle: Option<H>,
    pub(crate) stream: bool,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) sendq: SendQueue,
    /// A connect was started (and counted in conns_total).
    pub(crate) counted: bool,
    /// This NSM's name for the socket, never reused (slots are).
    pub(crate) serial: u64,
    /// A co-located connection's end: the pipe carries its bytes, not the stack.
    pub(crate) pipe: Option<colocated::End>,
    /// A listening socket's co-located connections waiting for accept().
    pub(crate) backlog: Option<colocated::Backlog>,
    /// Urgent data came and its mark is not passed yet: readiness then asks the stack whether
    /// the next byte is the urgent one (MASK_AT_MARK).
    pub(crate) urgent: Cell<bool>,
    /// Time spent running its requests.
    pub(crate) cpu: std::time::Duration,
}

/// Serials for sockets; an NSM has one service, so one counter.
pub(crate) static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl<H> Sock<H> {
    pub(crate) fn new(handle: Option<H>, stream: bool) -> Self {
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
            cpu: std::time::Duration::ZERO,
        }
    }

    pub(crate) fn handle(&self) -> Result<&H, Errno> {
        self.handle.as_ref().ok_or(libc::EBADF)
    }

    /// Hands queued asynchronous sends to the stack, at most `limit` bytes.
    pub(crate) fn flush<S: Stack<Handle = H>>(&mut self, stack: &mut S, limit: usize) -> usize {
        match &self.handle {
            Some(h) => self.sendq.flush(stack, h, limit),
            None => 0,
        }
    }

    /// The readiness its guest should see.
    pub(crate) fn mask<S: Stack<Handle = H>>(&self, stack: &mut S) -> u32 {
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
    pub(crate) fn with_mark<S: Stack<Handle = H>>(&self, stack: &mut S, mask: u32) -> u32 {
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

pub(crate) struct Attachment<H> {
    pub(crate) id: u64,
    pub(crate) tenant: String,
    pub(crate) pid: i32,
    pub(crate) uid: u32,
    pub(crate) policy: control::TenantPolicy,
    /// Shared with resolver threads, which may outlive the attachment.
    pub(crate) region: Arc<Region>,
    /// Kept to hand back to an engine that adopts this NSM (it proves `join`s with it).
    pub(crate) memfd: OwnedFd,
    pub(crate) head: u32,
    pub(crate) nsm_bell: OwnedFd,
    pub(crate) guest_bell: OwnedFd,
    /// The processes sharing the attachment (the attaching one, forked and spawned children)
    /// and the sockets each holds; the attachment ends when all have exited.
    pub(crate) holders: holders::Holders,
    pub(crate) socks: Vec<Option<Sock<H>>>,
    pub(crate) free: Vec<u32>,
    /// The guest's doorbell should ring: set by this attachment's sockets and by co-located
    /// peers in other attachments.
    pub(crate) bell: Rc<Cell<bool>>,
    /// Its tenant's number in the NSM's scheduler and accounts.
    pub(crate) tenant_id: crate::sched::TenantId,
    /// A task to run its requests is queued.
    pub(crate) queued: bool,
    /// Readiness the stack reported for its sockets (key, events), latest per key, not yet
    /// published; a task to publish it is queued when `ready_queued`.
    pub(crate) ready: Vec<(u64, u32)>,
    pub(crate) ready_queued: bool,
    /// Time its tasks took so far (what executors are balanced by, pool.rs).
    pub(crate) busy: std::time::Duration,
    /// Its request tasks so far, and how many of them were latency-class (pool.rs keeps mostly
    /// latency-class guests apart from bulk ones when an executor misses its latency target).
    pub(crate) tasks: (u64, u64),
}

impl<H> Attachment<H> {
    pub(crate) fn sock(&self, id: u32) -> Result<&Sock<H>, Errno> {
        self.socks.get(id as usize).and_then(|s| s.as_ref()).ok_or(libc::EBADF)
    }

    pub(crate) fn sock_mut(&mut self, id: u32) -> Result<&mut Sock<H>, Errno> {
        self.socks.get_mut(id as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)
    }

    /// Where readiness of socket `slot` goes, for a co-located peer.
    pub(crate) fn owner(&self, slot: u32) -> colocated::Owner {
        colocated::Owner { region: self.region.clone(), slot, bell: self.bell.clone() }
    }
}

/// A listening socket, found again by its serial (its slot may have been reused since).
#[derive(Clone, Copy, PartialEq)]
pub(crate) struct ListenerRef {
    pub(crate) ai: usize,
    pub(crate) slot: u32,
    pub(crate) serial: u64,
}

/// Completes nqe `idx` with `result` (an op with no address or data to return).
pub(crate) fn complete(region: &Region, idx: u32, result: i64) {
    let p = region.nqe(idx);
    // SAFETY: p points at nqe idx inside the mapping; the guest reads it only after DONE, which
    // the Release swap below orders after this write.
    unsafe { std::ptr::write_volatile(&mut (*p).result, result) };
    if region.nqe_state(idx).swap(nqe_state::DONE, Ordering::AcqRel) & nqe_state::WAITER != 0 {
        sys::futex_wake(region.nqe_state(idx));
    }
}

/// Closes a socket its guest gave up, unless asynchronous sends are still queued: then it stays
/// open, watched under a lingering token, until they are out.
pub(crate) fn retire<S: Stack>(stack: &mut S, lingering: &mut Vec<Option<Sock<S::Handle>>>, mut s: Sock<S::Handle>) {
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
pub(crate) fn publish<H>(a: &Attachment<H>, slot: u32, mask: u32, wakeup: bool) {
    colocated::publish(&a.region, slot, mask, wakeup, &a.bell);
}

/// Takes socket `slot` out of its attachment (nobody holds it any more) for the caller to retire.
pub(crate) fn close_slot<H>(a: &mut Attachment<H>, slot: u32) -> Option<Sock<H>> {
    let s = a.socks.get_mut(slot as usize)?.take()?;
    a.free.push(slot);
    a.region.slot(slot).mask.store(0, Ordering::Release);
    a.region.slot(slot).queued.store(0, Ordering::Release);
    Some(s)
}
