//! ServiceLib: the library every NSM links. It drives attachments (one region per guest
//! process), validates every nqe a guest writes (DESIGN.md D2), publishes socket readiness into
//! the guest's slot table, counts telemetry, and calls the network stack through [`Stack`].
//!
//! Two layers: the core (core.rs, with exec.rs and sock.rs) holds the state and the steps that
//! change it, reading no clock and owning no fds it must watch; the driver here is the NSM
//! process's one thread. [`Service::run`] drains the guests' job queues, lets the stack advance,
//! spins briefly while there is work, and otherwise sleeps in epoll (on the engine's channel,
//! the doorbells, the guests' pidfds and the stack's wait fd) with `nsm_sleeping` published so
//! that guests ring the doorbell only then (D5).

mod account;
mod adopt;
mod cmsg;
mod colocated;
pub mod control;
mod core;
pub mod dns;
pub mod drain;
mod exec;
#[cfg(test)]
mod fake;
mod handover;
mod holders;
mod lookup;
mod policy;
mod pool;
mod ratelimit;
mod resolve;
pub mod sched;
mod sendq;
mod sock;
pub mod stack;
mod telemetry;

pub use stack::{Errno, Stack};

use crate::core::{tok, tok_att, Core, Limits, KIND_SHIFT, TOK_BELL, TOK_CONTROL, TOK_PIDFD};
use control::NsmRequest;
use netkernel_ring::doorbell;
use netkernel_ring::region::Region;
use netkernel_ring::spsc::Consumer;
use netkernel_ring::sys::{self, epoll_ctl};
use sock::Attachment;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the loop keeps polling after the last piece of work before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

/// The rendezvous socket a restarted engine reconnects on: kind 3 with bit 33 set.
const TOK_RENDEZVOUS: u64 = (3 << KIND_SHIFT) | (1 << 33);
/// The stack's wait fd: kind 3 with bit 34 set.
const TOK_STACK: u64 = (3 << KIND_SHIFT) | (1 << 34);

/// Not a socket request the guest can make: the urgent-mark query (SIOCATMARK).
pub(crate) const SIOCATMARK: u64 = 0x8905;

/// An NSM's event loop over its attachments and one [`Stack`].
pub struct Service<S: Stack> {
    core: Core<S>,
    epfd: OwnedFd,
    control: OwnedFd,
    /// The engine closed the control channel.
    orphaned: bool,
    /// Where a restarted engine reconnects to adopt this NSM (None: it cannot).
    rendezvous: Option<std::os::unix::net::UnixListener>,
    /// The child that marks the regions dead if this process dies while no engine watches.
    reaper: Option<libc::pid_t>,
    /// The engine asked this NSM to exit (`ctl shutdown`, or a config without it).
    stopping: bool,
    /// On the first executor of an NSM that may have several: the others.
    pool: Option<pool::Pool>,
    /// This is an executor other than the first, whose "engine" is the first.
    executor: bool,
    /// The load meter: when the window began, the thread's CPU clock then, the last window's load
    /// (a window ends when stats are asked for, at least 0.1 s after it began).
    load: (Instant, Duration, f64),
    /// Time the loop had nothing to do (asleep, or spinning in vain): an executor never idle
    /// has work backing up (pool.rs).
    idle: Duration,
    /// A congestion control set since the start (`ctl reload`), for executors started later.
    congestion: Arc<std::sync::Mutex<Option<String>>>,
    /// Its work went to a new NSM process (`ctl upgrade`): it serves nobody and watches no
    /// region, so it needs no reaper and exits once its engine lets go.
    retired: bool,
    /// A user NSM's old process after an upgrade: it serves the attachments it had until they
    /// end, as its successor's executor (drain.rs).
    draining: bool,
    /// When the engine (or the successor) asked it to stop.
    stopped_at: Option<Instant>,
    /// The stack's fds this loop sleeps on (drain.rs: they change).
    stack_fds: [Option<RawFd>; 2],
}

/// How long a stopped draining process still sends its closed sockets' queued bytes.
const LINGER_AT_STOP: Duration = Duration::from_secs(10);

/// The load meter's window.
const LOAD_WINDOW: Duration = Duration::from_millis(100);

/// Every live attachment's region and guest doorbell, whichever executor serves it: what a
/// reaper marks dead when the NSM process ends.
static REGIONS: std::sync::Mutex<Vec<(u64, Arc<Region>, RawFd)>> = std::sync::Mutex::new(Vec::new());

fn regions() -> std::sync::MutexGuard<'static, Vec<(u64, Arc<Region>, RawFd)>> {
    REGIONS.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Stack> Service<S> {
    /// A service for NSM `name` that takes orders from the engine on `control`.
    pub fn new(stack: S, name: String, control: OwnedFd) -> io::Result<Self> {
        let epfd = sys::epoll()?;
        epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, control.as_raw_fd(), libc::EPOLLIN as u32, TOK_CONTROL)?;
        let mut core = Core::new(stack, name, Limits::of_host());
        if !core.stack.system_resolver() {
            let conf = dns::parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
            let seed =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.subsec_nanos());
            core.resolver = Some(lookup::StackResolver::new(conf, seed as u16));
        }
        let wait = core.stack.wait_fd().as_raw_fd();
        epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, wait, libc::EPOLLIN as u32, TOK_STACK)?;
        let mut svc = Service {
            core,
            epfd,
            control,
            orphaned: false,
            rendezvous: None,
            reaper: None,
            stopping: false,
            pool: None,
            executor: false,
            load: (Instant::now(), account::thread_cpu(), 0.0),
            idle: Duration::ZERO,
            congestion: Arc::default(),
            retired: false,
            draining: false,
            stopped_at: None,
            stack_fds: [Some(wait), None],
        };
        svc.sync_stack_fds();
        Ok(svc)
    }

    /// The nameservers a stack without a system resolver sends its DNS queries to, instead of
    /// /etc/resolv.conf's.
    pub fn with_nameservers(mut self, servers: Vec<std::net::IpAddr>) -> Self {
        if let (Some(r), false) = (self.core.resolver.as_mut(), servers.is_empty()) {
            r.set_nameservers(servers);
        }
        self
    }

    /// The scheduler that orders this NSM's tasks (default fifo).
    pub fn with_scheduler(mut self, kind: sched::Kind) -> Self {
        self.core.sched = kind.build();
        self
    }

    /// Lets the NSM run its work on up to `max` executor threads, each over a stack of its own
    /// that `make` gives (pool.rs); `elastic`: as many as the work calls for, else spread
    /// over as the attachments arrive. Call after the other `with_`s: executors copy them.
    pub fn with_executors(mut self, max: usize, elastic: bool, make: impl Fn() -> Option<S> + 'static) -> Self
    where
        S: Send + 'static,
    {
        if max <= 1 {
            return self;
        }
        let kind: sched::Kind = self.core.sched.name().parse().unwrap_or_default();
        let (name, hosts) = (self.core.name.clone(), self.core.hosts.clone());
        let congestion = self.congestion.clone();
        let spawn: pool::Spawner = Box::new(move |chan| {
            let mut stack = make().ok_or_else(|| io::Error::other("this stack has no second instance"))?;
            if let Some(cc) = congestion.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
                stack.set_congestion(cc).map_err(io::Error::other)?;
            }
            let (name, hosts) = (name.clone(), hosts.clone());
            std::thread::Builder::new().name("nk-executor".into()).spawn(move || {
                let run = Service::new(stack, name.clone(), OwnedFd::from(chan)).and_then(|svc| {
                    let mut svc = svc.with_scheduler(kind);
                    svc.core.hosts = hosts;
                    svc.executor = true;
                    svc.run()
                });
                if let Err(e) = run {
                    eprintln!("netkernel nsm {name}: executor: {e}");
                }
            })
        });
        let mut pool = pool::Pool::new(self.core.name.clone(), spawn, max);
        pool.elastic = elastic;
        self.pool = Some(pool);
        self
    }

    /// New TCP connections use `cc`, on every executor and on executors started later.
    fn set_congestion(&mut self, cc: &str) -> Result<(), String> {
        self.core.stack.set_congestion(cc)?;
        self.core.stats.congestion = self.core.stack.congestion();
        *self.congestion.lock().unwrap_or_else(|e| e.into_inner()) = Some(cc.to_string());
        if let Some(p) = self.pool.as_mut() {
            let req = NsmRequest::Congestion { congestion: cc.to_string() };
            for k in 0..p.executors() as usize - 1 {
                p.ask(k, &req, &[]).map_err(|e| format!("executor {}: {e}", k + 1))?;
            }
        }
        Ok(())
    }

    /// Executor 0 looks after the others: stops empty ones, and, when they follow the load,
    /// splits a saturated executor or brings everything back to one (pool.rs).
    fn tend_executors(&mut self) {
        let now = self.core.now;
        let weighed = match self.pool.as_ref().is_some_and(|p| p.elastic) {
            true => {
                let here = self.state();
                self.pool.as_mut().map(|p| p.weigh(&here, now))
            }
            false => None,
        };
        // What the others serve, as weighing found it, is still true only if nothing moved.
        let (plan, known) = match weighed {
            Some((plan, states)) => {
                let known = (plan == pool::Plan::Stay).then_some(states);
                (plan, known)
            }
            None => (pool::Plan::Stay, None),
        };
        let done = match plan {
            pool::Plan::Stay => Ok(()),
            pool::Plan::Split { from, ids } => self.split(from, &ids),
            pool::Plan::Compact => self.gather(None),
        };
        if let Err(e) = done {
            eprintln!("netkernel nsm {}: executors: {e}", self.core.name);
        }
        if let Some(p) = self.pool.as_mut().filter(|p| p.executors() > 1) {
            let movable = p.tend(now, known);
            // A user NSM's old process's guests come here as soon as nothing holds them there
            // (a handshake in progress, a connection waiting for accept): their next sockets
            // are this process's; their connections stay in the old one's smoltcp, relayed
            // (drain.rs).
            if !movable.is_empty() {
                match self.gather(Some(&movable)) {
                    Ok(()) => eprintln!(
                        "netkernel nsm {}: {} attachment(s) came from the old process",
                        self.core.name,
                        movable.len()
                    ),
                    Err(e) => {
                        eprintln!("netkernel nsm {}: taking attachments from the old process: {e}", self.core.name)
                    }
                }
            }
        }
    }

    /// Cores this executor kept busy over the last window (measured anew once it is over).
    fn measure_load(&mut self) -> f64 {
        let now = Instant::now();
        let (at, cpu, _) = self.load;
        if now.duration_since(at) >= LOAD_WINDOW {
            let cpu_now = account::thread_cpu();
            let load = cpu_now.saturating_sub(cpu).as_secs_f64() / now.duration_since(at).as_secs_f64();
            self.load = (now, cpu_now, load);
        }
        self.load.2
    }

    /// Static host entries (name to address) this NSM answers Op::Resolve with.
    pub fn with_hosts(mut self, hosts: HashMap<String, String>) -> Self {
        self.core.hosts = Arc::new(hosts.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect());
        self
    }

    /// Runs until the engine has closed the control channel and no guest is left.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut last_work = Instant::now();
        let mut idle_steps = 0u32;
        loop {
            self.core.now = Instant::now();
            let turn = self.core.now;
            let mut worked = self.core.run_tasks();
            self.start_lookups();
            let sleep = !worked && last_work.elapsed() >= SPIN;
            // One executor wakes for nothing: the work that would make it grow wakes it anyway.
            let tend = self.pool.as_ref().filter(|p| p.executors() > 1).map(|p| p.next_tend);
            let give_up = self
                .stopped_at
                .filter(|_| self.draining && self.core.lingering.iter().any(|l| l.is_some()))
                .map(|t| t + LINGER_AT_STOP)
                .filter(|&t| t > turn);
            let wait = [self.core.deadline(), tend, give_up]
                .into_iter()
                .flatten()
                .min()
                .map(|d| d.saturating_duration_since(self.core.now));
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
                self.idle += turn.elapsed();
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
                let token = ev.u64;
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
                        eprintln!("netkernel nsm {}: engine channel: {e}", self.core.name);
                        false
                    });
                    if !engine_alive {
                        // The engine is gone (D1): established traffic goes on, a restarted
                        // engine may adopt this NSM; without one it ends with its last guest.
                        let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, self.control.as_raw_fd(), 0, 0);
                        self.orphaned = true;
                        // An executor's regions are in the first executor's reaper's care; a
                        // retired NSM's are in its successor's.
                        if self.executor || self.retired {
                            continue;
                        }
                        if let Err(e) = self.spawn_reaper() {
                            eprintln!(
                                "netkernel nsm {}: no reaper; a crash now would go unnoticed: {e}",
                                self.core.name
                            );
                        }
                    }
                    continue;
                }
                worked = true;
                self.on_event(token);
            }
            self.core.now = Instant::now();
            worked |= self.core.poll_stack(woken);
            self.sync_stack_fds();
            worked |= self.core.run_tasks();
            self.core.finish_refreshes();
            if self.core.account.due() {
                self.core.account.settle(account::thread_cpu());
            }
            if self.pool.as_ref().is_some_and(|p| (p.elastic || p.executors() > 1) && self.core.now >= p.next_tend) {
                self.tend_executors();
            }
            self.core.unthrottle();
            self.start_lookups();
            self.forget_ended();
            self.flush_bells();
            // A draining old process stopped by its successor first sends what closed sockets
            // still have queued (its guests are gone; their peers are owed those bytes), for at
            // most LINGER_AT_STOP, and relays the connections of guests its successor serves
            // now until they end.
            let flushed = || {
                (self.core.lingering.iter().all(|l| l.is_none())
                    || self.stopped_at.is_some_and(|t| t.elapsed() > LINGER_AT_STOP))
                    && self.core.stack.relaying() == 0
            };
            if self.stopping && (!self.draining || flushed())
                || self.orphaned
                    && self.core.atts.iter().all(|a| a.is_none())
                    && flushed()
                    && !self.pool.as_ref().is_some_and(|p| p.serving())
            {
                if self.retired {
                    resolve::wait_for_lookups(Duration::from_secs(10));
                }
                return Ok(());
            }
            if worked {
                last_work = Instant::now();
                idle_steps = 0;
            } else if !sleep {
                sys::relax(idle_steps);
                idle_steps += 1;
                self.idle += turn.elapsed();
            }
        }
    }

    /// The engine, which tells guests when their NSM died, is gone: a child process that shares
    /// the regions' mappings takes over that duty. It closes every fd but the doorbells, waits for
    /// this process to end (a crash or the normal exit after the last guest) and marks every
    /// region dead, so no guest waits forever on an NSM that is not there.
    fn spawn_reaper(&mut self) -> io::Result<()> {
        // SAFETY: no pointers; the pid is this process's own and the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let regions: Vec<(Arc<Region>, RawFd)> = regions().iter().map(|(_, r, bell)| (r.clone(), *bell)).collect();
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
                // SAFETY: closes this child's fds above the last one kept; no memory is involved.
                unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
                let mut p = libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one live pollfd; POLLIN on a pidfd means the process ended.
                while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
                for (region, bell) in &regions {
                    region.mark_dead(Some(*bell));
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
        for a in self.core.atts.iter().flatten() {
            a.region.header().nsm_sleeping.store(v, Ordering::SeqCst);
        }
    }

    /// Whether a guest queued requests no task is queued for yet (a parked task's wait for its
    /// tenant's CPU is in the core's deadline).
    fn rings_have_work(&self) -> bool {
        self.core.atts.iter().flatten().any(|a| !a.queued && Consumer::resume(a.region.ring(), a.head).has_work())
    }

    fn flush_bells(&mut self) {
        for a in self.core.atts.iter_mut().flatten() {
            if a.bell.replace(false) {
                sys::ring_bell(a.guest_bell.as_raw_fd());
            }
        }
    }

    /// Stops watching an attachment's doorbell and processes. The guest may still hold the same
    /// files, so closing our copies alone would leave them registered.
    fn forget(&self, a: &Attachment<S::Handle>) {
        regions().retain(|(id, r, _)| !(*id == a.id && Arc::ptr_eq(r, &a.region)));
        let ep = self.epfd.as_raw_fd();
        let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, a.nsm_bell.as_raw_fd(), 0, 0);
        for (_, pidfd) in a.holders.pidfds() {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, pidfd.as_raw_fd(), 0, 0);
        }
    }

    fn on_event(&mut self, token: u64) {
        let ai = tok_att(token);
        match token >> KIND_SHIFT {
            TOK_BELL => {
                if let Some(a) = self.core.atts.get(ai).and_then(|a| a.as_ref()) {
                    sys::drain_bell(a.nsm_bell.as_raw_fd());
                }
            }
            TOK_PIDFD => {
                if let Some(pidfd) = self.core.exited(ai, token as u32) {
                    let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, pidfd.as_raw_fd(), 0, 0);
                }
            }
            _ => {}
        }
    }

    /// Stops watching the attachments the core ended, then lets them go.
    fn forget_ended(&mut self) {
        for a in std::mem::take(&mut self.core.ended) {
            self.forget(&a);
        }
    }

    /// Hands the lookups the core collected to resolver threads.
    fn start_lookups(&mut self) {
        for l in self.core.lookups.drain(..) {
            resolve::spawn(self.core.hosts.clone(), l.region, l.idx, l.off, l.len, l.query);
        }
    }

    /// Handles one engine message. Returns false when the engine went away.
    fn on_control(&mut self) -> io::Result<bool> {
        let Some((payload, fds)) = sys::recv_frame(self.control.as_raw_fd())? else {
            return Ok(false);
        };
        // SAFETY: the fds were just received and are owned by nobody else.
        let fds: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
        let req = serde_json::from_slice::<NsmRequest>(&payload);
        if let Some((answer, answer_fds)) = req.as_ref().ok().and_then(|r| self.route(r, &fds)) {
            let raw: Vec<RawFd> = answer_fds.iter().map(|f| f.as_raw_fd()).collect();
            sys::send_frame(self.control.as_raw_fd(), &answer, &raw)?;
            return Ok(true);
        }
        let reply = match req {
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
            Ok(NsmRequest::Stats) => {
                self.core.account.settle(account::thread_cpu());
                let mut stats = self.core.snapshot();
                stats.load = self.measure_load();
                if self.draining {
                    stats.executors = 0;
                    stats.draining.push(std::process::id());
                    stats.relayed = self.core.stack.relaying();
                }
                for other in self.pool.iter_mut().flat_map(|p| p.stats()) {
                    stats.absorb(other);
                }
                control::Reply::ok(stats)
            }
            Ok(NsmRequest::Adopt) => {
                let mut state = self.state();
                for other in self.pool.iter_mut().flat_map(|p| p.states()) {
                    state.attachments.extend(other.attachments);
                }
                control::Reply::ok(state)
            }
            Ok(NsmRequest::Region { attachment }) => match self.region_fds(attachment) {
                Ok(fds) => {
                    let bytes = serde_json::to_vec(&control::Reply::ok(())).unwrap_or_default();
                    sys::send_frame(self.control.as_raw_fd(), &bytes, &fds)?;
                    return Ok(true);
                }
                Err(e) => control::Reply::err(e),
            },
            Ok(NsmRequest::Shutdown) => {
                if let Some(p) = self.pool.as_mut() {
                    p.shutdown();
                }
                self.shutdown();
                control::Reply::ok(())
            }
            Ok(NsmRequest::Policy { tenant, policy }) => {
                if let Some(p) = self.pool.as_mut() {
                    let req = NsmRequest::Policy { tenant: tenant.clone(), policy: policy.clone() };
                    for k in 0..p.executors() as usize - 1 {
                        let _ = p.ask(k, &req, &[]);
                    }
                }
                self.core.set_policy(&tenant, &policy);
                control::Reply::ok(())
            }
            Ok(NsmRequest::Congestion { congestion }) => match self.set_congestion(&congestion) {
                Ok(()) => control::Reply::ok(()),
                Err(e) => control::Reply::err(e),
            },
            Ok(NsmRequest::Handover { attachments, within }) => match fds.into_iter().next() {
                Some(to) => match self.handover(to, attachments.as_deref(), within) {
                    Ok(done) => control::Reply::ok(done),
                    Err(e) => control::Reply::err(e),
                },
                None => control::Reply::err("handover needs the new NSM's socket"),
            },
            Ok(NsmRequest::Drain) => match self.drain() {
                Ok((drained, fds, successor)) => {
                    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                    sys::send_frame(self.control.as_raw_fd(), &control::Reply::ok(drained).encode(), &raw)?;
                    self.take_orders_from(successor)?;
                    return Ok(true);
                }
                Err(e) => control::Reply::err(e),
            },
            Ok(NsmRequest::Succeed { .. }) => control::Reply::err("this NSM process serves already"),
            Ok(NsmRequest::Takeover) => match fds.into_iter().next() {
                Some(from) => match self.takeover(from) {
                    Ok(at) => control::Reply::ok(at),
                    Err(e) => control::Reply::err(e),
                },
                None => control::Reply::err("takeover needs the old NSM's socket"),
            },
            Ok(NsmRequest::Detach { attachment }) => match self.core.detach(attachment) {
                true => control::Reply::ok(()),
                false => control::Reply::err(format!("no attachment {attachment}")),
            },
            Err(e) => control::Reply::err(format!("bad request: {e}")),
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        sys::send_frame(self.control.as_raw_fd(), &bytes, &[])?;
        Ok(true)
    }

    /// Hands a message about an attachment another executor serves (or a new attachment placed
    /// there) to that executor; returns its answer for the engine, or None to handle it here.
    fn route(&mut self, req: &NsmRequest, fds: &[OwnedFd]) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        self.pool.as_ref()?;
        let count = self.core.atts.iter().flatten().count();
        let here_has = |t: &str| self.core.atts.iter().flatten().any(|a| a.tenant == t);
        let has = matches!(req, NsmRequest::Attach { tenant, .. } if here_has(tenant));
        let pool = self.pool.as_mut()?;
        let k = match req {
            NsmRequest::Attach { tenant, policy, .. } => match pool.place(tenant, policy, count, has) {
                pool::Place::Here => return None,
                pool::Place::There(k) => k,
            },
            NsmRequest::Hold { attachment, .. }
            | NsmRequest::Region { attachment }
            | NsmRequest::Detach { attachment } => pool.owner(*attachment)?,
            _ => return None,
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let answer = pool
            .ask(k, req, &raw)
            .unwrap_or_else(|e| (control::Reply::err(format!("executor {}: {e}", k + 1)).encode(), Vec::new()));
        if let NsmRequest::Attach { attachment, tenant, .. } = req {
            if control::Reply::decode::<serde_json::Value>(&answer.0).is_ok() {
                pool.placed(*attachment, k, tenant);
            }
        }
        Some(answer)
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
        let ai = match self.core.atts.iter().position(|a| a.is_none()) {
            Some(i) => i,
            None => {
                self.core.atts.push(None);
                self.core.atts.len() - 1
            }
        };
        let ep = self.epfd.as_raw_fd();
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, nsm_bell.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_BELL, ai, 0))
            .and_then(|()| {
                epoll_ctl(ep, libc::EPOLL_CTL_ADD, pidfd.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_PIDFD, ai, 0))
            })
            .map_err(|e| format!("epoll: {e}"))?;
        if let Some((bits, burst)) = policy.rate {
            let now = self.core.now;
            self.core.buckets.entry(tenant.clone()).or_insert_with(|| ratelimit::Bucket::new(bits, burst, now));
        }
        let head = region.ring().head.load(Ordering::Acquire);
        let tenant_id = self.core.tenant_policy(&tenant, &policy);
        regions().push((id, region.clone(), guest_bell.as_raw_fd()));
        self.core.atts[ai] = Some(Attachment {
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
            tenant_id,
            queued: false,
            ready: Vec::new(),
            ready_queued: false,
            busy: Default::default(),
            tasks: (0, 0),
        });
        Ok(())
    }

    /// The engine ties a process (by its pidfd) to holder `holder` of attachment `id`.
    fn hold(&mut self, id: u64, holder: u32, fds: Vec<OwnedFd>) -> Result<(), String> {
        let [pidfd]: [OwnedFd; 1] = fds.try_into().map_err(|_| "hold needs one pidfd".to_string())?;
        let atts = &mut self.core.atts;
        let ai = atts.iter().position(|a| a.as_ref().is_some_and(|a| a.id == id)).ok_or("no such attachment")?;
        let a = atts[ai].as_mut().expect("found above");
        let ep = self.epfd.as_raw_fd();
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, pidfd.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_PIDFD, ai, holder))
            .map_err(|e| format!("epoll: {e}"))?;
        if let Some(old) = a.holders.tie(holder, pidfd) {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, old.as_raw_fd(), 0, 0);
        }
        Ok(())
    }
}
