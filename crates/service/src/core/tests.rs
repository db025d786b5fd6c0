//! The core driven as the driver drives it, over the fake stack and a made-up clock: requests
//! written into a real region as a guest writes them, steps run, results and readiness read back.

use super::*;
use crate::control::TenantPolicy;
use crate::fake::{sockaddr, FakeStack};
use crate::holders::Holders;
use netkernel_abi::validate::{PoolBuf, SockAddr};
use netkernel_abi::{Layout, NQE_COUNT};
use std::cell::Cell;
use std::os::fd::FromRawFd;
use std::rc::Rc;

fn fd(raw: i32) -> OwnedFd {
    assert!(raw >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd, ours alone.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn eventfd() -> OwnedFd {
    // SAFETY: no pointers; the result is checked.
    fd(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// A guest of the core: its region and the next nqe it writes.
struct Guest {
    ai: usize,
    region: Arc<Region>,
    next: u32,
}

fn core() -> Core<FakeStack> {
    Core::new(
        FakeStack::new(),
        "test".into(),
        Limits { somaxconn: 128, unprivileged_port_start: 1024, tcp_rmem_default: 131072 },
    )
}

fn attach(core: &mut Core<FakeStack>, tenant: &str, policy: TenantPolicy) -> Guest {
    let region = Arc::new(Region::create(core.atts.len() as u64 + 1).unwrap());
    // SAFETY: dup of the region's own fd; pidfd_open of this process: no pointers.
    let (memfd, pidfd) = unsafe {
        (fd(libc::dup(region.fd().unwrap())), fd(libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) as i32))
    };
    if let Some((bits, burst)) = policy.rate {
        core.buckets.insert(tenant.into(), ratelimit::Bucket::new(bits, burst, core.now));
    }
    let tenant_id = core.tenant_policy(tenant, &policy);
    core.atts.push(Some(Attachment {
        id: core.atts.len() as u64 + 1,
        tenant: tenant.into(),
        pid: 1,
        uid: 0,
        policy,
        region: region.clone(),
        memfd,
        head: 0,
        nsm_bell: eventfd(),
        guest_bell: eventfd(),
        holders: Holders::new(pidfd),
        socks: Vec::new(),
        free: Vec::new(),
        bell: Rc::new(Cell::new(false)),
        tenant_id,
        queued: false,
        ready: Vec::new(),
        ready_queued: false,
        busy: Default::default(),
        tasks: (0, 0),
    }));
    Guest { ai: core.atts.len() - 1, region, next: 0 }
}

impl Guest {
    /// Where nqe `idx`'s data goes in the pool.
    fn buf(&self, idx: u32, data: &[u8]) -> PoolBuf {
        let l = Layout::standard();
        let off = l.pool_off + u64::from(idx) * 65536;
        // SAFETY: [off, +len) lies in the pool of a live mapping (64 nqes × 64 KiB fit in it).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.region.pool_ptr(off, data.len() as u32), data.len())
        };
        PoolBuf::new(&l, off, data.len() as u32).unwrap()
    }

    /// Writes `call` into the next nqe as GuestLib does and queues it; returns the nqe.
    fn submit(&mut self, sock: u32, call: impl FnOnce(&Guest, u32) -> Call) -> u32 {
        let idx = self.next;
        self.next = (self.next + 1) % NQE_COUNT;
        let s = Request { sock, holder: 0, call: call(self, idx) }.encode();
        let p = self.region.nqe(idx);
        // SAFETY: p is nqe idx of a live mapping; nobody else writes it (this test is the guest).
        unsafe {
            (*p).op = s.op;
            (*p).sock = s.sock;
            (*p).flags = s.flags;
            (*p).arg0 = s.arg0;
            (*p).arg1 = s.arg1;
            (*p).buf_off = s.buf_off;
            (*p).buf_len = s.buf_len;
            (*p).addr_len = s.addr_len;
            (*p).addr = s.addr;
            (*p).holder = s.holder;
        }
        self.region.nqe_state(idx).store(nqe_state::SUBMITTED, Ordering::Release);
        self.region.ring().push(idx).unwrap();
        idx
    }

    fn result(&self, idx: u32) -> i64 {
        assert_eq!(self.region.nqe_state(idx).load(Ordering::Acquire), nqe_state::DONE, "nqe {idx} not done");
        // SAFETY: the NSM completed it; nobody writes it now.
        unsafe { (*self.region.nqe(idx)).result }
    }

    /// Submits `call`, lets the core run a step, and returns the result.
    fn call(&mut self, core: &mut Core<FakeStack>, sock: u32, call: impl FnOnce(&Guest, u32) -> Call) -> i64 {
        let idx = self.submit(sock, call);
        step(core);
        self.result(idx)
    }

    fn mask(&self, slot: u32) -> u32 {
        self.region.slot(slot).mask.load(Ordering::Acquire)
    }
}

/// One round of the driver's loop: the guests' requests, a stack poll, the readiness tasks.
fn step(core: &mut Core<FakeStack>) {
    core.run_tasks();
    core.poll_stack(false);
    core.run_tasks();
    core.finish_refreshes();
}

fn addr(port: u16) -> SockAddr {
    SockAddr::new(&sockaddr(port)).unwrap()
}

fn socket(_: &Guest, _: u32) -> Call {
    Call::Socket { domain: libc::AF_INET, ty: libc::SOCK_STREAM, protocol: 0 }
}

/// A listener on `port` and a connected client and server: (listener, client, server) slots.
fn connected(core: &mut Core<FakeStack>, g: &mut Guest, port: u16) -> (u32, u32, u32) {
    let l = g.call(core, 0, socket) as u32;
    assert_eq!(g.call(core, l, |_, _| Call::Bind { addr: addr(port) }), 0);
    assert_eq!(g.call(core, l, |_, _| Call::Listen { backlog: 16 }), 0);
    let c = g.call(core, 0, socket) as u32;
    assert_eq!(g.call(core, c, |_, _| Call::Connect { addr: addr(port), blocking: true }), 0);
    assert_ne!(g.mask(l) & libc::POLLIN as u32, 0, "the listener has a connection to accept");
    let s = g.call(core, l, |_, _| Call::Accept) as u32;
    (l, c, s)
}

fn send(data: &'static [u8], nowait: bool) -> impl FnOnce(&Guest, u32) -> Call {
    move |g, idx| Call::Send { buf: g.buf(idx, data), flags: 0, nowait, to: SockAddr::NONE, control: None }
}

#[test]
fn requests_run_on_the_stack_and_readiness_reaches_the_slots() {
    let mut core = core();
    let mut g = attach(&mut core, "t", TenantPolicy { colocate: false, ..Default::default() });
    let (l, c, s) = connected(&mut core, &mut g, 8080);
    assert!(l != c && c != s);
    assert_eq!(g.call(&mut core, c, send(b"hello", false)), 5);
    assert_ne!(g.mask(s) & libc::POLLIN as u32, 0, "the server sees the bytes");
    let n = g.call(&mut core, s, |g, idx| Call::Recv { buf: g.buf(idx, &[0; 64]), flags: 0, control: None });
    assert_eq!(n, 5);
    let l2 = g.call(&mut core, 0, socket) as u32;
    assert_eq!(g.call(&mut core, l2, |_, _| Call::Bind { addr: addr(8080) }), -(libc::EADDRINUSE as i64));
    assert_eq!(g.call(&mut core, 99, |_, _| Call::Listen { backlog: 1 }), -(libc::EBADF as i64));
    let info = core.snapshot();
    assert_eq!(info.conns.iter().filter(|c| c.state == "ESTABLISHED").count(), 2);
    assert_eq!((info.bytes_out, info.bytes_in), (5, 5));
}

#[test]
fn a_rate_limited_tenant_sends_at_its_rate_on_the_made_up_clock() {
    let mut core = core();
    // 8 Mbit/s = 1 MB/s, burst 16 KiB.
    let policy = TenantPolicy { rate: Some((8_000_000, 16_384)), colocate: false, ..Default::default() };
    let mut g = attach(&mut core, "slow", policy);
    let (_, c, _) = connected(&mut core, &mut g, 8081);
    let server = 2; // the fake stack's accepted socket: listener 0, client 1, server 2
    static DATA: [u8; 60_000] = [7; 60_000];
    // A new bucket has saved nothing: an asynchronous send is taken and queued, and the socket is
    // not writable while the tenant waits for tokens.
    assert_eq!(g.call(&mut core, c, send(&DATA, true)), 60_000);
    assert_eq!(core.stack.unread(server), 0);
    assert_eq!(g.mask(c) & libc::POLLOUT as u32, 0);
    let wait = core.deadline().expect("throttled") - core.now;
    assert!(wait <= Duration::from_millis(17), "{wait:?}");
    // 30 ms later 30 KB (but at most the 16 KiB burst) went out; 60 ms more, everything.
    let t0 = core.now;
    core.now = t0 + Duration::from_millis(30);
    core.unthrottle();
    assert_eq!(core.stack.unread(server), 16_384);
    core.stack.drain(server);
    for ms in (40..=200).step_by(10) {
        core.now = t0 + Duration::from_millis(ms);
        core.unthrottle();
        step(&mut core);
    }
    let total = 16_384 + core.stack.drain(server).len();
    assert_eq!(total, 60_000, "all of it after 200 ms at 1 MB/s");
    assert_eq!(core.snapshot().tenants["slow"].bytes_out, 60_000);
}

#[test]
fn a_guest_that_breaks_the_abi_loses_its_attachment_and_only_it() {
    let mut core = core();
    let mut bad = attach(&mut core, "bad", TenantPolicy::default());
    let mut good = attach(&mut core, "good", TenantPolicy { colocate: false, ..Default::default() });
    let (_, c, _) = connected(&mut core, &mut good, 9000);
    let idx = bad.submit(0, socket);
    // SAFETY: the test is the guest: it scribbles an opcode no NSM knows.
    unsafe { (*bad.region.nqe(idx)).op = 999 };
    core.run_tasks();
    assert!(core.atts[bad.ai].is_none());
    assert_eq!(core.ended.len(), 1, "the driver gets it to forget");
    assert_eq!(bad.region.header().state.load(Ordering::Acquire), netkernel_abi::STATE_DEAD);
    assert_eq!(core.stats.tenants["bad"].violations, 1);
    assert_eq!(good.call(&mut core, c, send(b"still here", false)), 10);
}

#[test]
fn an_exited_guests_sockets_close_and_its_attachment_ends() {
    let mut core = core();
    let mut g = attach(&mut core, "t", TenantPolicy { colocate: false, ..Default::default() });
    let (_, c, _) = connected(&mut core, &mut g, 9100);
    let _ = c;
    let ai = g.ai;
    assert!(core.exited(ai, 0).is_some(), "the pidfd comes back to be unwatched");
    assert!(core.atts[ai].is_none() && core.ended.len() == 1);
    // The peer of the closed client (the server, fake socket 2) reads EOF.
    assert_ne!(core.stack.poll_mask(&2) & libc::POLLIN as u32, 0);
}

thread_local! {
    static FAKE_NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// A clock for the core's task timing: every reading is 10 µs after the one before, so a
/// request (two readings) costs 20 µs.
fn ticking_clock() -> Instant {
    FAKE_NOW.with(|n| {
        let t = n.get().unwrap_or_else(Instant::now) + Duration::from_micros(10);
        n.set(Some(t));
        t
    })
}

/// Tenant "a" queues 40 sends of `a_len` bytes, then tenant "b" one short send; the core runs
/// them all. Returns how many of a's sends went before b's, and the core.
fn contend(kind: sched::Kind, a_len: usize) -> (usize, Core<FakeStack>) {
    static BIG: [u8; 5000] = [7; 5000];
    let mut core = core();
    core.sched = kind.build();
    core.clock = ticking_clock;
    let policy = TenantPolicy { colocate: false, ..Default::default() };
    let mut a = attach(&mut core, "a", policy.clone());
    let mut b = attach(&mut core, "b", policy);
    let (_, ca, _) = connected(&mut core, &mut a, 7000);
    let (_, cb, _) = connected(&mut core, &mut b, 7001);
    core.stack.sends.clear();
    core.stack.rcvbuf = 1 << 20;
    // What setting up cost is settled; only this round is left to account.
    core.account.settle(Duration::ZERO);
    for _ in 0..40 {
        a.submit(ca, send(&BIG[..a_len], false));
    }
    b.submit(cb, send(b"ping", false));
    while core.run_tasks() {}
    let sends = &core.stack.sends;
    assert_eq!(sends.len(), 41, "every send ran");
    let b_sock = *sends.iter().find(|&&s| sends.iter().filter(|&&x| x == s).count() == 1).unwrap();
    let before = sends.iter().position(|&s| s == b_sock).unwrap();
    (before, core)
}

#[test]
fn fifo_serves_a_flood_before_the_request_behind_it() {
    let (before, _) = contend(sched::Kind::Fifo, 1);
    assert_eq!(before, 40, "in arrival order, all of a's queue first");
}

#[test]
fn fair_lets_a_light_tenant_in_after_one_quantum_of_a_flood() {
    let (before, core) = contend(sched::Kind::Fair, 1);
    assert!(before <= core.sched.quantum() as usize, "b waited behind {before} of a's requests");
}

#[test]
fn latency_puts_a_short_request_before_bulk_sends() {
    let (before, _) = contend(sched::Kind::Latency, 5000);
    assert_eq!(before, 0, "the short request goes first");
    let (before, _) = contend(sched::Kind::Latency, 1);
    assert!(before > 0 && before <= 8, "among short requests, round robin: {before}");
}

#[test]
fn each_tenants_tasks_are_timed_and_its_cpu_is_its_share() {
    let (_, mut core) = contend(sched::Kind::Fair, 1);
    // The thread used 1 s over the round (a made-up figure; the split is what matters).
    core.account.settle(Duration::from_secs(1));
    let stats = core.snapshot();
    let (ta, tb) = (stats.tenants["a"].nsm_cpu_seconds, stats.tenants["b"].nsm_cpu_seconds);
    assert!(ta > 20.0 * tb, "a ran 40 requests, b one: {ta} vs {tb}");
    assert!((ta + tb + stats.overhead_cpu_seconds - 1.0).abs() < 1e-6, "{stats:?}");
    assert!((stats.cpu_seconds - 1.0).abs() < 1e-6);
    assert_eq!(stats.scheduler, "fair");
    let conn = stats.conns.iter().filter(|c| c.tenant == "a").map(|c| c.cpu_us).max().unwrap();
    assert!(conn >= 40 * 10, "a's client socket ran 40 requests of ≥10 µs: {conn} µs");
}

#[test]
fn a_tenant_over_its_cpu_limit_waits_and_the_others_do_not() {
    let mut core = core();
    core.clock = ticking_clock;
    let policy = TenantPolicy { colocate: false, ..Default::default() };
    let mut a = attach(&mut core, "a", policy.clone());
    let mut b = attach(&mut core, "b", policy.clone());
    let (_, ca, _) = connected(&mut core, &mut a, 7100);
    let (_, cb, _) = connected(&mut core, &mut b, 7101);
    core.now = ticking_clock();
    core.tenant_policy("a", &TenantPolicy { cpu_limit: Some(0.1), ..policy });
    // a's first task runs on credit; at 0.1 cores it then owes time.
    let first = a.submit(ca, send(b"x", false));
    core.run_tasks();
    assert_eq!(a.result(first), 1);
    let ia = a.submit(ca, send(b"x", false));
    let ib = b.submit(cb, send(b"y", false));
    core.run_tasks();
    assert_eq!(b.result(ib), 1, "b is not held back");
    assert_eq!(a.region.nqe_state(ia).load(Ordering::Acquire), nqe_state::SUBMITTED, "a waits for its cap");
    let due = core.deadline().expect("a's task is parked until then");
    FAKE_NOW.with(|n| n.set(Some(due)));
    core.run_tasks();
    assert_eq!(a.result(ia), 1, "a's request runs once its CPU allowance is back");
}

#[test]
fn a_round_of_tasks_ends_so_the_driver_gets_its_turn() {
    let mut core = core();
    core.sched = sched::Kind::Fair.build();
    core.clock = ticking_clock;
    let mut g = attach(&mut core, "t", TenantPolicy { colocate: false, ..Default::default() });
    let (_, c, _) = connected(&mut core, &mut g, 7200);
    // 60 requests of 20 µs (two clock readings each) are more than one round's worth.
    let last = (0..60).map(|_| g.submit(c, send(b"x", false))).last().unwrap();
    assert!(core.run_tasks());
    assert_eq!(g.region.nqe_state(last).load(Ordering::Acquire), nqe_state::SUBMITTED, "left for the next round");
    assert!(!core.sched.is_empty());
    let mut rounds = 1;
    while core.run_tasks() {
        rounds += 1;
        assert!(rounds < 10);
    }
    assert_eq!(g.result(last), 1, "done after {rounds} rounds");
}
