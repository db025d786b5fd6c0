//! The order in which an NSM does its tenants' work. Each unit of work is a [`Task`]: a batch of
//! one attachment's requests, or the readiness changes the stack reported for its sockets. A
//! [`Scheduler`] picks the next task; the core runs it, measures what it cost and charges its
//! tenant. Pure: no clock is read here, every call gets `now`.
//!
//! - `fifo`: in the order the work was found, each batch drained to the end (what one loop in
//!   arrival order does; a flood of requests delays everyone queued behind it).
//! - `fair`: start-time fair queueing over the CPU time each tenant's tasks took, weighted by
//!   `cpu_weight`; batches are short so a newcomer waits at most one quantum.
//! - `latency`: new connections and short requests before bulk transfers, with a bound on how
//!   long bulk work may wait.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// A tenant's number within one NSM (its index in the core's tenant table).
pub type TenantId = u32;

/// What kind of work a task is, for the `latency` scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// New connections and short requests: a program waits on each.
    Latency,
    /// Bulk transfers: throughput matters, a few hundred microseconds do not.
    Bulk,
}

/// Which work of the attachment the task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Runs the requests the guest queued (at most the scheduler's quantum).
    Requests,
    /// Publishes the readiness changes the stack reported for the attachment's sockets.
    Ready,
}

/// One unit of an NSM's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub tenant: TenantId,
    /// The attachment's id: a task whose attachment ended (and whose index was reused) is
    /// dropped.
    pub id: u64,
    /// The attachment whose work it is (a connection's work is always its attachment's, so
    /// one attachment's tasks never run out of order).
    pub att: usize,
    pub work: Work,
    pub class: Class,
    /// When the work was found.
    pub since: Instant,
}

/// Decides which task runs next.
pub trait Scheduler {
    /// The name configured (`scheduler = "..."`).
    fn name(&self) -> &'static str;
    /// Work is ready to run.
    fn push(&mut self, task: Task);
    /// The task to run now, if any.
    fn pop(&mut self, now: Instant) -> Option<Task>;
    /// `tenant`'s task just took `cpu` to run.
    fn charge(&mut self, tenant: TenantId, cpu: Duration);
    /// `tenant`'s share relative to others' (default 1).
    fn set_weight(&mut self, _tenant: TenantId, _weight: u32) {}
    /// How many requests a `Requests` task runs before it yields to other work.
    fn quantum(&self) -> u32;
    /// How long a `Requests` task runs before it yields (after the request running then), if
    /// its quantum of requests has not run out first: big sends make few requests long.
    fn slice(&self) -> Option<Duration> {
        None
    }
    fn is_empty(&self) -> bool;
    /// Whether work found while a task runs may go before work found earlier: then the core
    /// looks for new work between tasks, not only once per round.
    fn preempts(&self) -> bool;
}

/// The schedulers an NSM can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Fifo,
    Fair,
    Latency,
}

/// A name that is not a scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownScheduler(pub String);

impl fmt::Display for UnknownScheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a scheduler (known: fifo, fair, latency)", self.0)
    }
}

impl std::error::Error for UnknownScheduler {}

impl std::str::FromStr for Kind {
    type Err = UnknownScheduler;
    fn from_str(s: &str) -> Result<Kind, UnknownScheduler> {
        match s {
            "fifo" => Ok(Kind::Fifo),
            "fair" => Ok(Kind::Fair),
            "latency" => Ok(Kind::Latency),
            other => Err(UnknownScheduler(other.into())),
        }
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Fifo => "fifo",
            Kind::Fair => "fair",
            Kind::Latency => "latency",
        }
    }

    pub fn build(self) -> Box<dyn Scheduler> {
        match self {
            Kind::Fifo => Box::new(Fifo::default()),
            Kind::Fair => Box::new(Fair::default()),
            Kind::Latency => Box::new(Latency::default()),
        }
    }
}

/// A send larger than this is bulk work.
pub const BULK_BYTES: u32 = 4096;

/// The class of a task whose next request is `op` with a buffer of `len` bytes: sends of more
/// than [`BULK_BYTES`] are bulk, everything else (new connections, short requests, receives)
/// is latency work.
pub fn class_of(op: u32, len: u32) -> Class {
    if op == netkernel_abi::Op::Send as u32 && len > BULK_BYTES {
        Class::Bulk
    } else {
        Class::Latency
    }
}

/// The longest a short task runs before it yields (it finishes the request it is in).
pub const SLICE: Duration = Duration::from_micros(20);

/// Requests a short task runs before it yields: long enough to amortise the bookkeeping, short
/// enough (tens of microseconds on the kernel stack) that nobody waits long behind it.
const SHORT_QUANTUM: u32 = 8;

/// Runs work in the order it was found, each batch to the end of what its guest queued.
#[derive(Default)]
pub struct Fifo {
    queue: VecDeque<Task>,
}

impl Scheduler for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }
    fn push(&mut self, task: Task) {
        self.queue.push_back(task);
    }
    fn pop(&mut self, _now: Instant) -> Option<Task> {
        self.queue.pop_front()
    }
    fn charge(&mut self, _tenant: TenantId, _cpu: Duration) {}
    fn quantum(&self) -> u32 {
        netkernel_abi::NQE_COUNT
    }
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    fn preempts(&self) -> bool {
        false
    }
}

/// Virtual time is CPU nanoseconds divided by weight, scaled so that integer division by
/// weights up to 10,000 loses nothing that matters.
const VSCALE: u128 = 10_000;

#[derive(Default)]
struct Flow {
    queue: VecDeque<Task>,
    weight: u32,
    /// Virtual time this tenant has received (its next task's start tag).
    vtime: u128,
}

/// Start-time fair queueing between tenants over measured CPU time (Goyal et al., SIGCOMM '96):
/// the backlogged tenant with the least weighted CPU goes next; a tenant that was idle starts at
/// the current virtual time, so it cannot save up a claim while it has nothing to do.
#[derive(Default)]
pub struct Fair {
    flows: Vec<Flow>,
    /// The start tag of the task last picked: the system's virtual time.
    vclock: u128,
    queued: usize,
}

impl Fair {
    fn flow(&mut self, t: TenantId) -> &mut Flow {
        let i = t as usize;
        if self.flows.len() <= i {
            self.flows.resize_with(i + 1, || Flow { weight: 1, ..Flow::default() });
        }
        &mut self.flows[i]
    }
}

impl Scheduler for Fair {
    fn name(&self) -> &'static str {
        "fair"
    }
    fn push(&mut self, task: Task) {
        let vclock = self.vclock;
        let f = self.flow(task.tenant);
        if f.queue.is_empty() {
            f.vtime = f.vtime.max(vclock);
        }
        f.queue.push_back(task);
        self.queued += 1;
    }
    fn pop(&mut self, _now: Instant) -> Option<Task> {
        let f = self.flows.iter_mut().filter(|f| !f.queue.is_empty()).min_by_key(|f| f.vtime)?;
        self.vclock = f.vtime;
        self.queued -= 1;
        f.queue.pop_front()
    }
    fn charge(&mut self, tenant: TenantId, cpu: Duration) {
        let f = self.flow(tenant);
        f.vtime += cpu.as_nanos() * VSCALE / f.weight.max(1) as u128;
    }
    fn set_weight(&mut self, tenant: TenantId, weight: u32) {
        self.flow(tenant).weight = weight.max(1);
    }
    fn quantum(&self) -> u32 {
        SHORT_QUANTUM
    }
    fn slice(&self) -> Option<Duration> {
        Some(SLICE)
    }
    fn is_empty(&self) -> bool {
        self.queued == 0
    }
    fn preempts(&self) -> bool {
        true
    }
}

/// The longest a bulk task waits while latency work keeps coming.
pub const STARVATION_BOUND: Duration = Duration::from_millis(2);

/// Latency work first; bulk work that has waited [`STARVATION_BOUND`] goes before it.
#[derive(Default)]
pub struct Latency {
    latency: VecDeque<Task>,
    bulk: VecDeque<Task>,
}

impl Scheduler for Latency {
    fn name(&self) -> &'static str {
        "latency"
    }
    fn push(&mut self, task: Task) {
        match task.class {
            Class::Latency => self.latency.push_back(task),
            Class::Bulk => self.bulk.push_back(task),
        }
    }
    fn pop(&mut self, now: Instant) -> Option<Task> {
        let starved = self.bulk.front().is_some_and(|t| now.saturating_duration_since(t.since) >= STARVATION_BOUND);
        if starved {
            return self.bulk.pop_front();
        }
        self.latency.pop_front().or_else(|| self.bulk.pop_front())
    }
    fn charge(&mut self, _tenant: TenantId, _cpu: Duration) {}
    fn quantum(&self) -> u32 {
        SHORT_QUANTUM
    }
    fn slice(&self) -> Option<Duration> {
        Some(SLICE)
    }
    fn is_empty(&self) -> bool {
        self.latency.is_empty() && self.bulk.is_empty()
    }
    fn preempts(&self) -> bool {
        true
    }
}

/// A tenant's CPU cap (`cpu_limit`, in cores): a token bucket of CPU nanoseconds that refills at
/// `cores` per nanosecond of wall time and holds at most [`CAP_BURST`] worth.
#[derive(Debug, Clone)]
pub struct CpuCap {
    cores: f64,
    /// Nanoseconds of CPU the tenant may still use; below zero it waits.
    tokens: f64,
    at: Instant,
}

/// How much unused CPU a capped tenant may save up.
const CAP_BURST: Duration = Duration::from_millis(10);

impl CpuCap {
    pub fn new(cores: f64, now: Instant) -> CpuCap {
        CpuCap { cores, tokens: 0.0, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_nanos() as f64;
        self.at = now;
        self.tokens = (self.tokens + dt * self.cores).min(CAP_BURST.as_nanos() as f64 * self.cores);
    }

    /// The tenant used `cpu`.
    pub fn charge(&mut self, cpu: Duration) {
        self.tokens -= cpu.as_nanos() as f64;
    }

    /// None if the tenant may run now, else how long until it may.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_nanos((-self.tokens / self.cores).ceil() as u64))
    }

    pub fn set_cores(&mut self, cores: f64) {
        self.cores = cores;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(tenant: TenantId, att: usize, class: Class, since: Instant) -> Task {
        Task { tenant, id: att as u64, att, work: Work::Requests, class, since }
    }

    #[test]
    fn fifo_runs_in_arrival_order() {
        let t0 = Instant::now();
        let mut s = Kind::Fifo.build();
        for (i, tenant) in [0, 1, 0, 2].into_iter().enumerate() {
            s.push(task(tenant, i, Class::Bulk, t0));
        }
        let order: Vec<usize> = std::iter::from_fn(|| s.pop(t0)).map(|t| t.att).collect();
        assert_eq!(order, [0, 1, 2, 3]);
        assert!(s.is_empty());
        assert_eq!(s.quantum(), netkernel_abi::NQE_COUNT);
    }

    /// Runs `rounds` tasks of two always-backlogged tenants where each task costs `cost[t]`,
    /// charging as the core does; returns each tenant's CPU.
    fn saturate(s: &mut dyn Scheduler, cost: [Duration; 2], rounds: usize) -> [Duration; 2] {
        let t0 = Instant::now();
        let mut used = [Duration::ZERO; 2];
        for t in 0..2 {
            s.push(task(t, t as usize, Class::Bulk, t0));
        }
        for _ in 0..rounds {
            let t = s.pop(t0).expect("always backlogged");
            let i = t.tenant as usize;
            used[i] += cost[i];
            s.charge(t.tenant, cost[i]);
            s.push(t);
        }
        used
    }

    #[test]
    fn fair_shares_cpu_by_weight_whatever_the_task_sizes() {
        let mut s = Kind::Fair.build();
        s.set_weight(0, 1);
        s.set_weight(1, 3);
        // Tenant 0's tasks cost five times tenant 1's: shares still follow the weights.
        let used = saturate(&mut *s, [Duration::from_micros(50), Duration::from_micros(10)], 40_000);
        let share = used[0].as_secs_f64() / (used[0] + used[1]).as_secs_f64();
        assert!((share - 0.25).abs() < 0.01, "tenant 0 got {share:.3} of the CPU, weight says 0.25");
    }

    #[test]
    fn fair_serves_a_light_tenant_before_a_heavy_ones_backlog() {
        let t0 = Instant::now();
        let mut s = Kind::Fair.build();
        for i in 0..100 {
            s.push(task(0, i, Class::Latency, t0));
        }
        // Tenant 0 has already run a while.
        let first = s.pop(t0).unwrap();
        s.charge(first.tenant, Duration::from_micros(100));
        s.push(task(1, 1000, Class::Latency, t0));
        assert_eq!(s.pop(t0).unwrap().tenant, 1, "the newcomer goes before the backlog");
    }

    #[test]
    fn fair_gives_no_credit_for_idle_time() {
        let t0 = Instant::now();
        let mut s = Kind::Fair.build();
        // Tenant 0 works alone for a long time, then tenant 1 arrives: from then on they
        // alternate rather than tenant 1 running alone until it has caught up.
        s.push(task(0, 0, Class::Bulk, t0));
        for _ in 0..1000 {
            let t = s.pop(t0).unwrap();
            s.charge(t.tenant, Duration::from_micros(10));
            s.push(t);
        }
        s.push(task(1, 1, Class::Bulk, t0));
        let mut runs = [0; 2];
        for _ in 0..20 {
            let t = s.pop(t0).unwrap();
            runs[t.tenant as usize] += 1;
            s.charge(t.tenant, Duration::from_micros(10));
            s.push(t);
        }
        assert!(runs[0] >= 9 && runs[1] >= 9, "they alternate: {runs:?}");
    }

    #[test]
    fn latency_goes_first_but_bulk_waits_at_most_the_bound() {
        let t0 = Instant::now();
        let mut s = Kind::Latency.build();
        s.push(task(0, 1, Class::Bulk, t0));
        s.push(task(0, 2, Class::Latency, t0));
        assert_eq!(s.pop(t0).unwrap().att, 2, "latency work first");
        s.push(task(0, 3, Class::Latency, t0));
        // Latency work keeps coming; once the bulk task has waited the bound, it runs.
        let later = t0 + STARVATION_BOUND;
        assert_eq!(s.pop(later).unwrap().att, 1, "bulk runs once it waited {STARVATION_BOUND:?}");
        assert_eq!(s.pop(later).unwrap().att, 3);
        assert!(s.pop(later).is_none());
    }

    #[test]
    fn cpu_cap_holds_a_tenant_to_its_cores() {
        let t0 = Instant::now();
        let mut cap = CpuCap::new(0.5, t0);
        assert_eq!(cap.wait(t0), None);
        cap.charge(Duration::from_millis(1));
        // 1 ms of CPU at half a core is paid back after 2 ms.
        assert_eq!(cap.wait(t0), Some(Duration::from_millis(2)));
        assert_eq!(cap.wait(t0 + Duration::from_millis(2)), None);
        // Idle time saves up at most the burst.
        let much_later = t0 + Duration::from_secs(10);
        assert_eq!(cap.wait(much_later), None);
        cap.charge(CAP_BURST);
        assert!(cap.wait(much_later).is_some());
    }

    #[test]
    fn unknown_scheduler_names_the_known_ones() {
        let e = "wfq".parse::<Kind>().unwrap_err().to_string();
        assert!(e.contains("fifo, fair, latency"), "{e}");
        assert_eq!("fair".parse::<Kind>().unwrap().build().name(), "fair");
    }
}
