//! ServiceLib's core: the state of an NSM's attachments and sockets and the steps that change
//! it. It reads no clock (every step gets `now`), reads nothing from /proc, owns no epoll and
//! spawns nothing: the driver (lib.rs) wires it to the engine, the doorbells and the clock, and
//! the stack behind [`Stack`] does the networking. Its only system calls are the futex wakes of
//! the region protocol (docs/ABI.md) and whatever the stack makes.
//!
//! Work is done as tasks (sched.rs): a batch of one attachment's requests, or the readiness the
//! stack reported for its sockets. The scheduler orders them; each is timed (`clock`, the
//! monotonic clock but for tests) and charged to its tenant.

use crate::account::Accounting;
use crate::control::NsmStats;
use crate::exec::{execute, settles, tenant, OVERFLOW};
use crate::lookup::{StackResolver, TOK_DNS};
use crate::sched::{Class, Scheduler, Task, Work};
use crate::sock::{close_slot, complete, publish, retire, Attachment, ListenerRef, Sock};
use crate::stack::{Ready, Stack};
use crate::{ratelimit, resolve, sched, telemetry};
use netkernel_abi::validate::{self, Call, Request, Violation};
use netkernel_abi::{nqe_state, ADDR_MAX};
use netkernel_ring::region::Region;
use netkernel_ring::spsc::Consumer;
use netkernel_ring::sys;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const KIND_SHIFT: u64 = 62;
pub(crate) const TOK_SOCK: u64 = 0;
pub(crate) const TOK_BELL: u64 = 1;
pub(crate) const TOK_PIDFD: u64 = 2;
pub(crate) const TOK_CONTROL: u64 = 3 << KIND_SHIFT;
/// A closed socket still sending queued bytes: kind 3 with bit 32 set (TOK_CONTROL has none).
pub(crate) const TOK_LINGER: u64 = (3 << KIND_SHIFT) | (1 << 32);

/// How often a scheduler that lets new work go first looks at the stack during a round.
const POLL_EVERY: Duration = Duration::from_micros(50);
/// The longest the core runs tasks before the driver gets its turn.
const ROUND: Duration = Duration::from_millis(1);
/// A latency-class task (a short request, a new connection) that waited longer than this in
/// the queue missed its target: an executor that misses often splits off its latency-class
/// guests (pool.rs).
pub(crate) const LATENCY_TARGET: Duration = Duration::from_micros(500);

pub(crate) fn tok(kind: u64, att: usize, slot: u32) -> u64 {
    (kind << KIND_SHIFT) | ((att as u64) << 32) | slot as u64
}

/// The attachment index a [`tok`] carries.
pub(crate) fn tok_att(key: u64) -> usize {
    ((key >> 32) & 0x3fff_ffff) as usize
}

/// What the core needs to know of the host, read once by the driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// net.core.somaxconn: the longest listen backlog.
    pub somaxconn: usize,
    /// net.ipv4.ip_unprivileged_port_start: a non-root guest binds only from here up.
    pub unprivileged_port_start: u16,
    /// net.ipv4.tcp_rmem's default: a fresh TCP socket's receive buffer (co-located pipes).
    pub tcp_rmem_default: usize,
}

impl Limits {
    pub(crate) fn of_host() -> Limits {
        let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
        Limits {
            somaxconn: read("/proc/sys/net/core/somaxconn").unwrap_or(4096) as usize,
            unprivileged_port_start: read("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap_or(1024) as u16,
            tcp_rmem_default: std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
                .ok()
                .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
                .unwrap_or(131072),
        }
    }
}

/// A name lookup for a resolver thread to answer (the driver starts it).
pub(crate) struct Lookup {
    pub region: Arc<Region>,
    pub idx: u32,
    pub off: u64,
    pub len: u32,
    pub query: resolve::Query,
}

/// The NSM's state: attachments, their sockets, telemetry and policy, over one stack.
pub(crate) struct Core<S: Stack> {
    pub stack: S,
    pub name: String,
    pub limits: Limits,
    pub atts: Vec<Option<Attachment<S::Handle>>>,
    /// Sockets closed by their guest (or whose guest exited) while asynchronous sends were still
    /// queued: they send them, then close, as a kernel socket does after close().
    pub lingering: Vec<Option<Sock<S::Handle>>>,
    pub stats: NsmStats,
    /// Names this NSM resolves itself (from the engine's config), before the system resolver.
    pub hosts: Arc<HashMap<String, String>>,
    /// Rate limits of the tenants that have one.
    pub buckets: HashMap<String, ratelimit::Bucket>,
    /// Sockets (attachment, slot) held back by their tenant's rate limit, woken when tokens
    /// are back.
    pub throttled: Vec<(usize, u32)>,
    /// Listening sockets by local address, for co-located connects.
    pub listeners: HashMap<SocketAddr, Vec<ListenerRef>>,
    /// Fresh stack sockets (IPv4, IPv6) whose options are the defaults a co-located socket
    /// reports for options never set.
    pub templates: [Option<S::Handle>; 2],
    /// Readiness refreshes (attachment index, its id, nqe) to complete at the end of this round
    /// of the loop.
    pub refreshes: Vec<(usize, u64, u32)>,
    /// Readiness changes the stack reported, to dispatch.
    pub ready: Vec<Ready>,
    /// When the stack next needs a poll though nothing arrives.
    pub stack_deadline: Option<Instant>,
    /// The time of this step, as the driver read it.
    pub now: Instant,
    /// Outbox: attachments that ended, for the driver to stop watching and drop.
    pub ended: Vec<Attachment<S::Handle>>,
    /// Outbox: lookups for the driver to hand to resolver threads.
    pub lookups: Vec<Lookup>,
    /// For a stack without a system resolver: DNS through the stack itself.
    pub resolver: Option<StackResolver<S::Handle>>,
    /// Orders the tasks.
    pub sched: Box<dyn Scheduler>,
    /// CPU per tenant.
    pub account: Accounting,
    /// Tasks of tenants over their `cpu_limit`, and when they may run.
    pub parked: Vec<(Task, Instant)>,
    /// Latency-class tasks that waited longer than [`LATENCY_TARGET`], so far.
    pub latency_misses: u64,
    /// Refreshes that were queued before the last stack poll: complete once its readiness is
    /// published.
    pub polled_refreshes: Vec<(usize, u64, u32)>,
    /// Times tasks and requests.
    pub clock: fn() -> Instant,
}

impl<S: Stack> Core<S> {
    pub(crate) fn new(stack: S, name: String, limits: Limits) -> Self {
        let stats = NsmStats {
            nsm: name.clone(),
            kind: stack.kind().into(),
            pid: std::process::id(),
            congestion: stack.congestion(),
            ..Default::default()
        };
        Core {
            stack,
            name,
            limits,
            atts: Vec::new(),
            lingering: Vec::new(),
            stats,
            hosts: Arc::default(),
            buckets: HashMap::new(),
            throttled: Vec::new(),
            listeners: HashMap::new(),
            templates: [None, None],
            refreshes: Vec::new(),
            ready: Vec::new(),
            stack_deadline: None,
            now: Instant::now(),
            ended: Vec::new(),
            lookups: Vec::new(),
            resolver: None,
            sched: crate::sched::Kind::Fifo.build(),
            account: Accounting::default(),
            parked: Vec::new(),
            latency_misses: 0,
            polled_refreshes: Vec::new(),
            clock: Instant::now,
        }
    }

    /// Sets a tenant's CPU weight and cap from its policy; returns its number.
    pub(crate) fn tenant_policy(&mut self, name: &str, policy: &crate::control::TenantPolicy) -> sched::TenantId {
        let id = self.account.id(name);
        let t = &mut self.account.tenants[id as usize];
        t.weight = policy.cpu_weight.max(1);
        self.sched.set_weight(id, t.weight);
        t.cap = match (policy.cpu_limit, t.cap.take()) {
            (None, _) => None,
            (Some(cores), Some(mut cap)) => {
                cap.set_cores(cores);
                Some(cap)
            }
            (Some(cores), None) => Some(sched::CpuCap::new(cores, self.now)),
        };
        id
    }

    /// Tenant `name`'s policy changed: its attachments follow the new one, its CPU weight, cap
    /// and rate limit too (a rate limit starts anew).
    pub(crate) fn set_policy(&mut self, name: &str, policy: &crate::control::TenantPolicy) {
        self.tenant_policy(name, policy);
        for a in self.atts.iter_mut().flatten().filter(|a| a.tenant == name) {
            // An isolated guest's private loopback is its own, not the tenant's.
            a.policy = crate::control::TenantPolicy { loopback: a.policy.loopback, ..policy.clone() };
        }
        match policy.rate {
            Some((bits, burst)) => {
                let now = self.now;
                self.buckets.insert(name.to_string(), ratelimit::Bucket::new(bits, burst, now));
            }
            None => {
                self.buckets.remove(name);
            }
        }
    }

    /// Ends attachment `id` at once, its sockets reset and its region declared dead. Returns
    /// whether it was here.
    pub(crate) fn detach(&mut self, id: u64) -> bool {
        let Some(ai) = self.atts.iter().position(|a| a.as_ref().is_some_and(|a| a.id == id)) else { return false };
        let a = self.atts[ai].take().expect("found above");
        a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
        self.end(a, false);
        true
    }

    /// Queues a task for every attachment whose guest queued requests and that has none queued.
    pub(crate) fn gather(&mut self) {
        for (ai, a) in self.atts.iter_mut().enumerate() {
            let Some(a) = a.as_mut().filter(|a| !a.queued) else { continue };
            let Some(entry) = Consumer::resume(a.region.ring(), a.head).peek() else { continue };
            a.queued = true;
            let class = class_of(&a.region, entry);
            self.sched.push(Task {
                tenant: a.tenant_id,
                att: ai,
                id: a.id,
                work: Work::Requests,
                class,
                since: self.now,
            });
        }
    }

    /// Runs the tasks that may run now, in the scheduler's order, after queueing the guests'
    /// new requests, for at most [`ROUND`]: what is left waits for the next round, after the
    /// driver has looked at its events, so that a guest that keeps submitting cannot hold the
    /// loop. Returns whether any ran.
    pub(crate) fn run_tasks(&mut self) -> bool {
        self.gather();
        let start = (self.clock)();
        let mut last = start;
        let mut polled = last;
        self.unpark(last);
        let mut worked = false;
        while last.saturating_duration_since(start) < ROUND {
            let Some(task) = self.sched.pop(last) else { break };
            if self.atts.get(task.att).and_then(|a| a.as_ref()).is_none_or(|a| a.id != task.id) {
                continue;
            }
            let tenant = &mut self.account.tenants[task.tenant as usize];
            if let (Work::Requests, Some(wait)) = (task.work, tenant.cap.as_mut().and_then(|c| c.wait(last))) {
                self.parked.push((task, last + wait));
                continue;
            }
            if task.class == Class::Latency && last.saturating_duration_since(task.since) > LATENCY_TARGET {
                self.latency_misses += 1;
            }
            self.run(task);
            worked = true;
            let end = (self.clock)();
            let took = end.saturating_duration_since(last);
            last = end;
            self.sched.charge(task.tenant, took);
            self.account.record(task.tenant, took);
            if let Some(Some(a)) = self.atts.get_mut(task.att) {
                a.busy += took;
                if task.work == Work::Requests {
                    a.tasks.0 += 1;
                    a.tasks.1 += u64::from(task.class == Class::Latency);
                }
            }
            if let Some(cap) = self.account.tenants[task.tenant as usize].cap.as_mut() {
                cap.charge(took);
            }
            if self.sched.preempts() {
                // New work may go first: look for it, in the rings and (now and then: it costs
                // a system call) in the stack, which would otherwise wait for the round's end.
                self.gather();
                if end.saturating_duration_since(polled) >= POLL_EVERY {
                    polled = end;
                    self.poll_stack(true);
                }
            }
        }
        worked
    }

    /// Gives back to the scheduler the parked tasks whose tenants may run again.
    fn unpark(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].1 <= now {
                let (task, _) = self.parked.swap_remove(i);
                self.sched.push(task);
            } else {
                i += 1;
            }
        }
    }

    /// Runs one task. A requests task first publishes the readiness the stack reported for the
    /// attachment, so that no request of its guest is followed by older readiness.
    fn run(&mut self, task: Task) {
        self.publish_ready(task.att);
        if task.work == Work::Ready {
            return;
        }
        let until = self.sched.slice().map(|s| (self.clock)() + s);
        self.drain(task.att, self.sched.quantum(), until);
        let Some(a) = self.atts[task.att].as_mut().filter(|a| a.id == task.id) else { return };
        match Consumer::resume(a.region.ring(), a.head).peek() {
            Some(entry) => {
                let class = class_of(&a.region, entry);
                self.sched.push(Task { class, since: self.now, ..task });
            }
            None => a.queued = false,
        }
    }

    /// Publishes the readiness changes waiting for attachment `ai`.
    fn publish_ready(&mut self, ai: usize) {
        let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else { return };
        a.ready_queued = false;
        if a.ready.is_empty() {
            return;
        }
        let mut ready = std::mem::take(&mut a.ready);
        for &(key, events) in &ready {
            self.on_ready(key, events);
        }
        ready.clear();
        if let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()).filter(|a| a.ready.is_empty()) {
            a.ready = ready;
        }
    }

    /// Keeps a readiness change for its attachment's next task (other keys: handled now).
    fn defer_ready(&mut self, key: u64, events: u32) {
        let ai = tok_att(key);
        if key >> KIND_SHIFT != TOK_SOCK {
            return self.on_ready(key, events);
        }
        let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else { return };
        a.ready.push((key, events));
        if !a.ready_queued {
            a.ready_queued = true;
            let task = Task {
                tenant: a.tenant_id,
                att: ai,
                id: a.id,
                work: Work::Ready,
                class: Class::Latency,
                since: self.now,
            };
            self.sched.push(task);
        }
    }

    /// Processes the queued nqes of attachment `ai`, at most `budget`; refuses the attachment if
    /// it broke the ABI. Returns whether there was any.
    /// With `until`, it also stops once that time has passed.
    pub(crate) fn drain(&mut self, ai: usize, mut budget: u32, until: Option<Instant>) -> bool {
        let mut worked = false;
        while let Some(a) = self.atts[ai].as_mut() {
            if budget == 0 || until.is_some_and(|t| worked && (self.clock)() >= t) {
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

    /// When the core next has something to do though nothing arrives: a throttled tenant's
    /// tokens are back, a stack timer or a DNS query's timeout is due (None: only when
    /// something arrives).
    pub(crate) fn deadline(&mut self) -> Option<Instant> {
        let throttled = self.throttle_wait().map(|w| self.now + w);
        let parked = self.parked.iter().map(|p| p.1).min();
        [throttled, self.stack_deadline, parked].into_iter().flatten().min()
    }

    /// How long until a throttled tenant may send again (None: nobody is throttled).
    pub(crate) fn throttle_wait(&mut self) -> Option<Duration> {
        let mut wait: Option<Duration> = None;
        for &(ai, _) in &self.throttled {
            let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()) else { continue };
            if let Some(b) = self.buckets.get_mut(&a.tenant) {
                b.advance(self.now);
                let w = b.wait();
                wait = Some(wait.map_or(w, |x| x.min(w)));
            }
        }
        wait
    }

    /// Socket `slot` of attachment `ai` waits for its tenant's tokens (counted once per wait).
    pub(crate) fn hold_back(&mut self, ai: usize, slot: u32) {
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
    pub(crate) fn unthrottle(&mut self) {
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
            b.advance(self.now);
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

    /// A socket its guest no longer has: closed now, or once its queued sends are out.
    pub(crate) fn retire(&mut self, s: Sock<S::Handle>) {
        retire(&mut self.stack, &mut self.lingering, s);
    }

    /// Drops an attachment whose guest broke the ABI; nobody else notices.
    pub(crate) fn refuse(&mut self, ai: usize, v: &Violation) {
        if let Some(a) = self.atts[ai].take() {
            eprintln!(
                "netkernel nsm {}: refusing attachment {} (tenant {}, pid {}): {v}",
                self.name, a.id, a.tenant, a.pid
            );
            self.stats.violations += 1;
            tenant(&mut self.stats, &a.tenant).violations += 1;
            a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
            self.end(a, false);
        }
    }

    /// A process of the guest exited (or will never exist): the sockets only it still held
    /// close, as the kernel closes an exiting process's fds.
    /// Returns the process's pidfd, for the driver to stop watching.
    pub(crate) fn release_holder(&mut self, ai: usize, holder: u32) -> Option<OwnedFd> {
        let a = self.atts.get_mut(ai).and_then(|a| a.as_mut())?;
        let (pidfd, unheld) = a.holders.remove(holder);
        let closed: Vec<Sock<S::Handle>> = unheld.into_iter().filter_map(|slot| close_slot(a, slot)).collect();
        for s in closed {
            self.retire(s);
        }
        pidfd
    }

    /// Ends attachment `a`: its sockets close (`drain`: after their queued bytes, as an exited
    /// process's do; otherwise at once, as a crashed one's) and the driver gets it to forget.
    pub(crate) fn end(&mut self, mut a: Attachment<S::Handle>, drain: bool) {
        for s in std::mem::take(&mut a.socks).into_iter().flatten() {
            if drain {
                self.retire(s);
            } else if let Some(h) = s.handle {
                self.stack.close(h);
            }
        }
        self.ended.push(a);
    }

    /// A guest process exited (its pidfd became readable): whatever it submitted before is done
    /// first, then its sockets close, and the attachment ends with its last process. Returns the
    /// pidfd to stop watching.
    pub(crate) fn exited(&mut self, ai: usize, holder: u32) -> Option<OwnedFd> {
        self.atts.get(ai)?.as_ref()?;
        self.publish_ready(ai);
        self.drain(ai, netkernel_abi::NQE_COUNT, None);
        let pidfd = self.release_holder(ai, holder);
        if self.atts.get(ai).and_then(|a| a.as_ref()).is_some_and(|a| !a.holders.any_process()) {
            let a = self.atts[ai].take().expect("checked");
            self.end(a, true);
        }
        pidfd
    }

    pub(crate) fn snapshot(&mut self) -> NsmStats {
        let mut s = self.stats.clone();
        s.attachments = self.atts.iter().flatten().count();
        s.scheduler = self.sched.name().into();
        s.executors = 1;
        for t in &self.account.tenants {
            let totals = tenant(&mut s, &t.name);
            totals.nsm_cpu_seconds = t.cpu.as_secs_f64();
        }
        s.overhead_cpu_seconds = self.account.overhead.as_secs_f64();
        s.cpu_seconds = s.tenants.values().map(|t| t.nsm_cpu_seconds).sum::<f64>() + s.overhead_cpu_seconds;
        for a in self.atts.iter().flatten() {
            for sock in a.socks.iter().flatten() {
                s.conns.push(telemetry::conn_info(&mut self.stack, a, sock, &self.name));
            }
        }
        s
    }

    /// Validates and executes nqe `idx` of attachment `ai`, then completes it.
    pub(crate) fn process(&mut self, ai: usize, idx: u32) -> Result<(), Violation> {
        let a = self.atts[ai].as_mut().expect("caller checked");
        let p = a.region.nqe(idx);
        let req = validate::validate(idx, &a.region.nqe_snapshot(idx), a.region.layout())?;
        let started = (self.clock)();
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
            if let (Some(q), Some(r)) = (&parsed, self.resolver.as_mut()) {
                // Through the stack: completed when the replies come.
                let region = a.region.clone();
                r.start(&mut self.stack, &self.hosts, region, idx, query.off(), query.len(), q.clone(), self.now);
                return Ok(());
            }
            if let Some(q) = parsed {
                // Completed by a resolver thread the driver starts.
                self.lookups.push(Lookup {
                    region: a.region.clone(),
                    idx,
                    off: query.off(),
                    len: query.len(),
                    query: q,
                });
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
        if let Some(Some(s)) = a.socks.get_mut(req.sock as usize) {
            s.cpu += (self.clock)().saturating_duration_since(started);
        }
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
    /// Readiness found waiting here supersedes what an earlier poll left for a task.
    pub(crate) fn settle(&mut self) {
        let mut ready = self.poll_into(true);
        for r in ready.drain(..) {
            let ai = tok_att(r.key);
            if let (TOK_SOCK, Some(a)) = (r.key >> KIND_SHIFT, self.atts.get_mut(ai).and_then(|a| a.as_mut())) {
                a.ready.retain(|&(k, _)| k != r.key);
            }
            self.on_ready(r.key, r.events);
        }
        self.ready = ready;
    }

    /// Lets the stack advance (`woken`: its wait fd was readable) and queues tasks to publish
    /// the readiness changes it reports. Returns whether there were any.
    pub(crate) fn poll_stack(&mut self, woken: bool) -> bool {
        let mut ready = self.poll_into(woken);
        let any = !ready.is_empty();
        for r in ready.drain(..) {
            self.defer_ready(r.key, r.events);
        }
        self.ready = ready;
        self.polled_refreshes.append(&mut self.refreshes);
        any
    }

    /// The readiness changes the stack reports now (in the reused buffer `self.ready`).
    fn poll_into(&mut self, woken: bool) -> Vec<Ready> {
        let mut ready = std::mem::take(&mut self.ready);
        self.stack_deadline = self.stack.poll(self.now, woken, &mut ready);
        if let Some(r) = self.resolver.as_mut() {
            r.poll(&mut self.stack, self.now);
            self.stack_deadline = [self.stack_deadline, r.deadline()].into_iter().flatten().min();
        }
        ready
    }

    /// A watched stack socket's readiness changed (`key` from `Stack::watch`): queued sends go
    /// out as far as the tenant's rate allows, and the guest sees the new mask.
    pub(crate) fn on_ready(&mut self, key: u64, events: u32) {
        let ai = tok_att(key);
        let slot = key as u32;
        if key >> KIND_SHIFT == TOK_SOCK {
            let Some(a) = self.atts.get_mut(ai).and_then(|a| a.as_mut()) else { return };
            let Some(Some(s)) = a.socks.get_mut(slot as usize) else { return };
            let mut bucket = self.buckets.get_mut(&a.tenant);
            if let Some(b) = bucket.as_deref_mut() {
                b.advance(self.now);
            }
            if s.sendq.queued() > 0 && events & libc::EPOLLOUT as u32 != 0 {
                let limit = bucket.as_deref_mut().map_or(usize::MAX, |b| b.take(s.sendq.queued()));
                let n = s.flush(&mut self.stack, limit);
                if let Some(b) = bucket.as_deref_mut() {
                    b.refund(limit - n);
                }
                s.bytes_out += n as u64;
                self.stats.bytes_out += n as u64;
                tenant(&mut self.stats, &a.tenant).bytes_out += n as u64;
            }
            let mut mask = s.sendq.adjust(s.with_mark(&mut self.stack, events));
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
        } else if key == TOK_DNS {
            if let Some(r) = self.resolver.as_mut() {
                r.on_ready(&mut self.stack, self.now);
            }
        } else if key & TOK_LINGER == TOK_LINGER && key != TOK_CONTROL {
            let i = slot as usize;
            let Some(Some(s)) = self.lingering.get_mut(i) else { return };
            let n = s.flush(&mut self.stack, usize::MAX) as u64;
            self.stats.bytes_out += n;
            if s.sendq.queued() == 0 || events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                if let Some(h) = self.lingering[i].take().and_then(|s| s.handle) {
                    self.stack.close(h);
                }
            }
        }
    }

    /// Completes the readiness refreshes queued before the last stack poll, once the tasks that
    /// publish what it found have run: every nqe queued before them has run and the stack's
    /// wakeups since are published.
    pub(crate) fn finish_refreshes(&mut self) {
        if self.polled_refreshes.is_empty() || self.atts.iter().flatten().any(|a| !a.ready.is_empty()) {
            return;
        }
        for (ai, id, idx) in std::mem::take(&mut self.polled_refreshes) {
            if let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()).filter(|a| a.id == id) {
                complete(&a.region, idx, 0);
            }
        }
    }

    /// Runs a request on the stack (or on a co-located socket's pipe).
    pub(crate) fn perform(
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
        let mut bucket = self.buckets.get_mut(&a.tenant);
        if let Some(b) = bucket.as_deref_mut() {
            b.advance(self.now);
        }
        let mut throttled = false;
        let result = execute(
            &mut self.stack,
            &self.limits,
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
}

/// A guess at a task's class from the next request its guest queued (unvalidated: a guest that
/// lies only misplaces its own work).
fn class_of(region: &Region, entry: u32) -> Class {
    match validate::nqe_index(entry) {
        Ok(idx) => {
            let s = region.nqe_snapshot(idx);
            sched::class_of(s.op, s.buf_len)
        }
        Err(_) => Class::Latency,
    }
}

#[cfg(test)]
mod tests;
