//! Executors: an NSM's work on more than one thread.
//!
//! Executor 0 is the NSM's main thread, the one the engine talks to. Each further executor is a
//! thread running a [`Service`] of its own, over a stack of its own (for the kernel stack, a
//! second epoll over the same kernel), whose "engine" is executor 0: they speak the engine's
//! own protocol (control.rs) over a socketpair, so an executor is an NSM in everything but its
//! process. Executor 0 places each new attachment on an executor and from then on routes the
//! engine's messages about it there; a connection's work thus stays on one executor (its
//! attachment's), in order.
//!
//! How executors grow and shrink depends on `executors`:
//!
//! - **A number** (the operator wants the work spread from the start): a new attachment goes to
//!   an executor serving none, else to a new executor while there are cores for one, else to
//!   the executor serving fewest. An executor left with no attachment stops within
//!   [`TEND_EVERY`].
//! - **"auto"** (elastic, like Snap's compacting engines): everything starts on executor 0 and new
//!   attachments go to the executor with the least work. Every [`ELASTIC_TEND`] executor 0 looks
//!   at how long each executor's tasks took ([`plan`]): when one was busy for most of the time
//!   (its queues back up) and a core is free, a new executor starts and about half of that
//!   executor's work moves there, as whole groups of attachments (a handover within the
//!   process, handover.rs: the guests see a pause of a millisecond or so, nothing else); when
//!   all executors together did less than half a core's work twice in a row, every attachment
//!   comes back to executor 0 and the others stop, so an idle NSM is one sleeping thread.
//!
//! An idle executor sleeps in epoll like any NSM. A connection's work is on one executor at a
//! time: a move stops the giver between two tasks and the taker starts where it stopped.
//!
//! What stays within one executor: the co-located short cut (a connect finds only its own
//! executor's listeners; across executors it goes through the stack), and a tenant's rate limit,
//! socket limit and CPU cap, which is why such a tenant's attachments all go to the executor of
//! its first.

use crate::control::{NsmRequest, NsmState, NsmStats, TenantPolicy};
use netkernel_control::call;
use netkernel_ring::sys;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How often executor 0 looks at the others (whether any is left empty).
pub(crate) const TEND_EVERY: Duration = Duration::from_millis(500);
/// How often executor 0 weighs the executors' work when they follow the load.
pub(crate) const ELASTIC_TEND: Duration = Duration::from_millis(250);
/// An executor idle for less than a fifth of the time is saturated: its queues back up (on a
/// host short of cores the guests it serves take turns with it, so it is never idle for none).
pub(crate) const GROW_AT: f64 = 0.8;
/// All executors' work together below this share of one core fits on one executor.
pub(crate) const COMPACT_BELOW: f64 = 0.5;
/// An executor at least half busy whose latency-class tasks missed their target this often in
/// a weighing (80 a second) has latency-sensitive guests waiting behind bulk ones.
pub(crate) const MISSES_AT: u64 = 20;
/// A guest whose requests are at least this share latency-class is latency-sensitive.
const LATENCY_SHARE: f64 = 0.9;
/// After a split, the load settles this long before the next.
const SETTLE: Duration = Duration::from_secs(1);

/// Starts an executor on a thread of its own, taking orders on the socket it is given.
pub(crate) type Spawner = Box<dyn Fn(UnixStream) -> io::Result<std::thread::JoinHandle<()>>>;

struct Executor {
    chan: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Attachments it served at the last look.
    attachments: usize,
    /// Share of a core its tasks took at the last weighing (elastic).
    work: f64,
    /// Its idle time (µs) and latency misses at the last weighing.
    idle_seen: Option<(u64, u64)>,
    /// Tenants with an attachment here.
    tenants: Vec<String>,
    /// Its last stats (kept for the NSM's totals once it stops).
    last: Option<NsmStats>,
    /// The old process of a user NSM's upgrade (drain.rs): it keeps what it serves, gets
    /// nothing new, and stops once it serves nothing.
    draining: bool,
    /// Connections a draining executor relays (drain.rs).
    relayed: usize,
}

impl Executor {
    fn new(chan: UnixStream, thread: Option<std::thread::JoinHandle<()>>, draining: bool) -> Executor {
        Executor {
            chan,
            thread,
            attachments: 0,
            relayed: 0,
            work: 0.0,
            idle_seen: None,
            tenants: Vec::new(),
            last: None,
            draining,
        }
    }
}

pub(crate) struct Pool {
    name: String,
    spawn: Spawner,
    /// Executors at most, this thread included.
    max: usize,
    execs: Vec<Executor>,
    /// The executor (index into `execs`) of each attachment not served by executor 0.
    owner: HashMap<u64, usize>,
    pub(crate) next_tend: Instant,
    /// Executors follow the load (`executors = "auto"`) instead of the attachments.
    pub(crate) elastic: bool,
    /// Executor 0's work and idle time at the last weighing.
    work0: f64,
    idle0: Option<(u64, u64)>,
    /// Each attachment's busy time (µs), request tasks and latency-class ones at the last
    /// weighing, and when that was.
    busy_seen: HashMap<u64, [u64; 3]>,
    weighed: Instant,
    /// Weighings in a row that found little work; no split before `settled`.
    calm: u32,
    settled: Instant,
    /// Stats of stopped executors: the NSM's counters never go back.
    retired: Option<NsmStats>,
}

/// One attachment as [`plan`] sees it.
#[derive(Debug, Clone)]
pub(crate) struct Weighed {
    pub id: u64,
    /// Its tenant, when the tenant's limits keep its attachments on one executor.
    pub pinned: Option<String>,
    /// Time its tasks took since the last weighing.
    pub busy: Duration,
    pub peers: Vec<u64>,
    /// Its requests since the last weighing were nearly all latency-class (short requests,
    /// connects): a guest that waits on each.
    pub latency: bool,
}

/// One executor as [`plan`] sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Weighing {
    /// Share of the time it was not idle (1.0: never idle, its work backs up).
    pub active: f64,
    /// Latency-class tasks that waited past their target since the last weighing.
    pub missed: u64,
    pub atts: Vec<Weighed>,
}

/// What executor 0 does after weighing the executors.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    Stay,
    /// Start an executor and move these attachments of executor `from` (0: executor 0) there.
    Split {
        from: usize,
        ids: Vec<u64>,
    },
    /// Bring every attachment to executor 0; the others stop.
    Compact,
}

/// Decides from each executor's weighing (index 0: executor 0) over `span`: split the busiest
/// executor if it was never idle (its queues back up), has more than one group of attachments that
/// must stay together (co-located connections, a tenant with limits) and `room` for another
/// executor; compact when all of them did less than [`COMPACT_BELOW`] of a core and `calm`
/// (the weighing before found as little). A split moves about half the executor's work: the
/// heaviest group stays, each next group (heaviest first) goes to the lighter side.
pub(crate) fn plan(execs: &[Weighing], span: Duration, room: bool, calm: bool) -> Plan {
    let total = work(execs.iter().flat_map(|e| &e.atts), span);
    if execs.len() > 1 && total < COMPACT_BELOW && calm {
        return Plan::Compact;
    }
    if !room {
        return Plan::Stay;
    }
    // Latency-sensitive guests waiting behind bulk ones go to an executor of their own.
    let missing = execs.iter().enumerate().filter(|(_, e)| e.missed >= MISSES_AT && e.active >= 0.5);
    if let Some((from, e)) = missing.max_by_key(|(_, e)| e.missed) {
        let groups = groups(&e.atts);
        let (quick, bulk): (Vec<_>, Vec<_>) = groups.into_iter().partition(|g| g.2);
        if !quick.is_empty() && !bulk.is_empty() {
            let mut ids: Vec<u64> = quick.into_iter().flat_map(|g| g.1).collect();
            ids.sort_unstable();
            return Plan::Split { from, ids };
        }
    }
    let busiest = execs.iter().enumerate().max_by(|a, b| a.1.active.total_cmp(&b.1.active));
    let Some((from, _)) = busiest.filter(|(_, e)| e.active >= GROW_AT) else { return Plan::Stay };
    let mut groups = groups(&execs[from].atts);
    if groups.len() < 2 {
        return Plan::Stay;
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.0));
    let (mut stay, mut go) = (Duration::ZERO, Duration::ZERO);
    let mut ids = Vec::new();
    for (busy, members, _) in groups {
        if stay <= go {
            stay += busy;
        } else {
            go += busy;
            ids.extend(members);
        }
    }
    if ids.is_empty() {
        return Plan::Stay;
    }
    ids.sort_unstable();
    Plan::Split { from, ids }
}

/// Cores' worth of work `atts` did over `span`.
fn work<'a>(atts: impl Iterator<Item = &'a Weighed>, span: Duration) -> f64 {
    atts.map(|a| a.busy.as_secs_f64()).sum::<f64>() / span.as_secs_f64().max(1e-3)
}

/// An executor's attachments in groups that must share an executor, each with its busy time
/// and whether all its members are latency-sensitive.
fn groups(atts: &[Weighed]) -> Vec<(Duration, Vec<u64>, bool)> {
    // Union-find over the attachments' indices.
    let mut up: Vec<usize> = (0..atts.len()).collect();
    fn root(up: &mut [usize], mut i: usize) -> usize {
        while up[i] != i {
            up[i] = up[up[i]];
            i = up[i];
        }
        i
    }
    let index: HashMap<u64, usize> = atts.iter().enumerate().map(|(i, a)| (a.id, i)).collect();
    let join = |up: &mut Vec<usize>, i: usize, j: usize| {
        let (ri, rj) = (root(up, i), root(up, j));
        up[ri] = rj;
    };
    for (i, a) in atts.iter().enumerate() {
        for p in &a.peers {
            if let Some(&j) = index.get(p) {
                join(&mut up, i, j);
            }
        }
        if let Some(t) = &a.pinned {
            if let Some(j) = atts.iter().position(|b| b.pinned.as_ref() == Some(t)) {
                join(&mut up, i, j);
            }
        }
    }
    let mut by_root: HashMap<usize, (Duration, Vec<u64>, bool)> = HashMap::new();
    for (i, a) in atts.iter().enumerate() {
        let g = by_root.entry(root(&mut up, i)).or_insert((Duration::ZERO, Vec::new(), true));
        g.0 += a.busy;
        g.1.push(a.id);
        g.2 &= a.latency;
    }
    let mut out: Vec<_> = by_root.into_values().collect();
    out.sort_by_key(|g| g.1[0]);
    out
}

/// Where an attachment goes.
pub(crate) enum Place {
    Here,
    There(usize),
}

impl Pool {
    pub(crate) fn new(name: String, spawn: Spawner, max: usize) -> Self {
        let now = Instant::now();
        Pool {
            name,
            spawn,
            max: max.max(1),
            execs: Vec::new(),
            owner: HashMap::new(),
            next_tend: now,
            elastic: false,
            work0: 0.0,
            idle0: None,
            busy_seen: HashMap::new(),
            weighed: now,
            calm: 0,
            settled: now,
            retired: None,
        }
    }

    pub(crate) fn executors(&self) -> u32 {
        1 + self.execs.len() as u32
    }

    /// Whether any other executor still serves an attachment (as of the last look).
    pub(crate) fn serving(&self) -> bool {
        self.execs.iter().any(|e| e.attachments > 0)
    }

    /// Starts another executor.
    pub(crate) fn grow(&mut self) -> io::Result<usize> {
        let (ours, theirs) = UnixStream::pair()?;
        let k = self.execs.len() + 1;
        let thread = (self.spawn)(theirs)?;
        eprintln!("netkernel nsm {}: executor {k} started", self.name);
        self.execs.push(Executor::new(ours, Some(thread), false));
        Ok(self.execs.len() - 1)
    }

    /// The old process of an upgrade serves on through `chan` until its attachments end
    /// (drain.rs); the engine's messages about them go there.
    pub(crate) fn add_draining(&mut self, chan: UnixStream) {
        let k = self.execs.len();
        self.execs.push(Executor::new(chan, None, true));
        let state = call::<NsmState>(self.execs[k].chan.as_raw_fd(), &NsmRequest::Adopt, &[]).map(|(s, _)| s);
        for a in state.map(|s| s.attachments).unwrap_or_default() {
            self.placed(a.attachment, k, &a.tenant);
        }
        eprintln!(
            "netkernel nsm {}: the old process serves {} attachments until they can come here",
            self.name, self.execs[k].attachments
        );
    }

    /// Where a new attachment of `tenant` goes (`here`: how many executor 0 serves; `here_has`:
    /// whether one of them is the tenant's): with the tenant's others if its limits must be kept
    /// in one place; else on an executor serving none, or a new one while the cores allow,
    /// or the one serving fewest.
    pub(crate) fn place(&mut self, tenant: &str, policy: &TenantPolicy, here: usize, here_has: bool) -> Place {
        if policy.pinned() {
            if here_has {
                return Place::Here;
            }
            if let Some(k) = self.execs.iter().position(|e| !e.draining && e.tenants.iter().any(|t| t == tenant)) {
                return Place::There(k);
            }
        }
        let open = || self.execs.iter().enumerate().filter(|(_, e)| !e.draining);
        let running = 1 + open().count();
        if self.elastic {
            // Executors start only when the work calls for them (`plan`).
            let least = open().min_by(|a, b| a.1.work.total_cmp(&b.1.work));
            return match least {
                Some((k, e)) if here > 0 && e.work < self.work0 => Place::There(k),
                _ => Place::Here,
            };
        }
        let fewest = open().min_by_key(|(_, e)| e.attachments).map(|(k, e)| (k, e.attachments));
        if here == 0 || fewest.is_some_and(|(_, n)| n >= here) && running >= self.max {
            return Place::Here;
        }
        match fewest {
            Some((k, 0)) => Place::There(k),
            _ if running < self.max => self.grow().map_or(Place::Here, Place::There),
            Some((k, n)) if n < here => Place::There(k),
            _ => Place::Here,
        }
    }

    /// Sends `req` (with `fds`) to executor `k` and returns its answer as it came, fds included,
    /// for the engine (`netkernel_control::call` where the answer is read here).
    pub(crate) fn ask(&mut self, k: usize, req: &NsmRequest, fds: &[RawFd]) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.tell(k, req, fds)?;
        self.answer(k)
    }

    /// Sends `req` to executor `k` without waiting for its answer (read it with `answer`).
    pub(crate) fn tell(&mut self, k: usize, req: &NsmRequest, fds: &[RawFd]) -> io::Result<()> {
        sys::send_frame(self.execs[k].chan.as_raw_fd(), &serde_json::to_vec(req).unwrap_or_default(), fds)
    }

    /// Executor `k`'s answer to what it was told.
    pub(crate) fn answer(&mut self, k: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let chan = self.execs[k].chan.as_raw_fd();
        let (payload, fds) = sys::recv_frame(chan)?.ok_or_else(|| io::Error::other("executor gone"))?;
        // SAFETY: the fds were just received and are owned by nobody else.
        Ok((payload, fds.into_iter().map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }).collect()))
    }

    /// Attachments `ids` of executor `k` are executor 0's now.
    pub(crate) fn came_home(&mut self, k: usize, ids: &[u64]) {
        self.owner.retain(|id, _| !ids.contains(id));
        let e = &mut self.execs[k];
        e.attachments = e.attachments.saturating_sub(ids.len());
    }

    /// The executor serving attachment `id`, if not executor 0.
    pub(crate) fn owner(&self, id: u64) -> Option<usize> {
        self.owner.get(&id).copied()
    }

    /// Attachment `id` of `tenant` is now served by executor `k`.
    pub(crate) fn placed(&mut self, id: u64, k: usize, tenant: &str) {
        self.owner.insert(id, k);
        let e = &mut self.execs[k];
        e.attachments += 1;
        if !e.tenants.iter().any(|t| t == tenant) {
            e.tenants.push(tenant.to_string());
        }
    }

    /// Every other executor's stats (updating what this pool knows of them).
    pub(crate) fn stats(&mut self) -> Vec<NsmStats> {
        let mut all = Vec::new();
        for k in 0..self.execs.len() {
            let Ok((s, _)) = call::<NsmStats>(self.execs[k].chan.as_raw_fd(), &NsmRequest::Stats, &[]) else {
                continue;
            };
            let e = &mut self.execs[k];
            e.attachments = s.attachments;
            e.relayed = s.relayed;
            e.tenants = s.tenants.keys().filter(|_| s.attachments > 0).cloned().collect();
            e.last = Some(NsmStats { conns: Vec::new(), ..s.clone() });
            all.push(s);
        }
        all.extend(self.retired.clone());
        all
    }

    /// Weighs every executor's work since the last weighing, given executor 0's attachments
    /// (`here`), and says what to do about it; also returns what the others serve (for `tend`,
    /// which need not ask again unless the plan moved something).
    pub(crate) fn weigh(&mut self, here: &NsmState, now: Instant) -> (Plan, Vec<NsmState>) {
        let span = now.saturating_duration_since(self.weighed);
        self.weighed = now;
        self.next_tend = now + ELASTIC_TEND;
        let states = self.states();
        let mut seen = HashMap::new();
        let mut weigh = |s: &NsmState, before: &mut Option<(u64, u64)>| -> Weighing {
            let atts = s
                .attachments
                .iter()
                .map(|a| {
                    let now = [a.busy_us, a.tasks, a.latency_tasks];
                    let was = self.busy_seen.get(&a.attachment).copied().unwrap_or(now);
                    seen.insert(a.attachment, now);
                    let [busy, tasks, quick] = [0, 1, 2].map(|i| now[i].saturating_sub(was[i]));
                    Weighed {
                        id: a.attachment,
                        pinned: a.pinned.then(|| a.tenant.clone()),
                        busy: Duration::from_micros(busy),
                        peers: a.peers.clone(),
                        latency: tasks > 0 && quick as f64 >= LATENCY_SHARE * tasks as f64,
                    }
                })
                .collect();
            // An executor seen for the first time counts as idle until the next weighing.
            let (idle, missed) = match *before {
                Some((idle, missed)) => {
                    (Duration::from_micros(s.idle_us.saturating_sub(idle)), s.latency_misses.saturating_sub(missed))
                }
                None => (span, 0),
            };
            *before = Some((s.idle_us, s.latency_misses));
            let active = 1.0 - (idle.as_secs_f64() / span.as_secs_f64().max(1e-3)).min(1.0);
            Weighing { active, missed, atts }
        };
        let mut execs = vec![weigh(here, &mut self.idle0)];
        for (e, s) in self.execs.iter_mut().zip(&states) {
            execs.push(weigh(s, &mut e.idle_seen));
        }
        self.busy_seen = seen;
        self.work0 = work(execs[0].atts.iter(), span);
        for (e, w) in self.execs.iter_mut().zip(&execs[1..]) {
            e.work = work(w.atts.iter(), span);
            e.attachments = w.atts.len();
        }
        let total = work(execs.iter().flat_map(|e| &e.atts), span);
        self.calm = if total < COMPACT_BELOW { self.calm + 1 } else { 0 };
        let room = self.execs.len() + 1 < self.max && now >= self.settled;
        let p = plan(&execs, span, room, self.calm >= 2);
        if matches!(p, Plan::Split { .. }) {
            self.settled = now + SETTLE;
        }
        (p, states)
    }

    /// What every other executor serves.
    pub(crate) fn states(&mut self) -> Vec<NsmState> {
        let adopt = |e: &Executor| call::<NsmState>(e.chan.as_raw_fd(), &NsmRequest::Adopt, &[]).map(|(s, _)| s);
        self.execs.iter().map(|e| adopt(e).unwrap_or_default()).collect()
    }

    /// Looks at the other executors: stops those left with no attachment, forgets where ended
    /// attachments were. Returns the attachments of draining executors that hold no socket that
    /// must stay (a handshake in progress, a connection waiting for accept): nothing keeps them
    /// in the old process (drain.rs). `known`: what the others serve, if just asked.
    pub(crate) fn tend(&mut self, now: Instant, known: Option<Vec<NsmState>>) -> Vec<u64> {
        self.next_tend = now + if self.elastic { ELASTIC_TEND } else { TEND_EVERY };
        if self.execs.is_empty() {
            return Vec::new();
        }
        let states = known.filter(|k| k.len() == self.execs.len()).unwrap_or_else(|| self.states());
        let live: Vec<Vec<u64>> = states.iter().map(|s| s.attachments.iter().map(|a| a.attachment).collect()).collect();
        let movable = (self.execs.iter().zip(&states))
            .filter(|(e, _)| e.draining)
            .flat_map(|(_, s)| s.attachments.iter().filter(|a| a.staying == 0).map(|a| a.attachment))
            .collect();
        self.stats();
        self.owner.retain(|id, k| live.get(*k).is_some_and(|l| l.contains(id)));
        // Only the newest executor stops, so that the others keep their indices.
        // A draining old process relaying connections stays until they end.
        while self.execs.last().is_some_and(|e| e.attachments == 0 && e.relayed == 0) {
            let k = self.execs.len();
            let _ = self.ask(k - 1, &NsmRequest::Shutdown, &[]);
            let mut e = self.execs.pop().expect("checked");
            if let Some(last) = e.last.take() {
                let last = NsmStats { executors: 0, load: 0.0, attachments: 0, draining: Vec::new(), ..last };
                match self.retired.as_mut() {
                    Some(r) => r.absorb(last),
                    None => self.retired = Some(last),
                }
            }
            let _ = e.chan.shutdown(std::net::Shutdown::Both);
            if let Some(t) = e.thread.take() {
                let _ = t.join();
            }
            eprintln!("netkernel nsm {}: executor {k} stopped (no attachments)", self.name);
        }
        movable
    }

    /// Tells every other executor to reset its guests and stop.
    pub(crate) fn shutdown(&mut self) {
        for k in 0..self.execs.len() {
            let _ = self.ask(k, &NsmRequest::Shutdown, &[]);
        }
        for mut e in self.execs.drain(..) {
            let _ = e.chan.shutdown(std::net::Shutdown::Both);
            if let Some(t) = e.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool whose executors are threads that do nothing: placement only counts them.
    fn pool(max: usize) -> Pool {
        Pool::new("t".into(), Box::new(|chan| Ok(std::thread::spawn(move || drop(chan)))), max)
    }

    fn there(p: Place) -> Option<usize> {
        match p {
            Place::Here => None,
            Place::There(k) => Some(k),
        }
    }

    #[test]
    fn attachments_spread_over_new_executors_up_to_the_cores() {
        let free = TenantPolicy::default();
        let mut p = pool(3);
        assert_eq!(there(p.place("a", &free, 0, false)), None, "the first stays on executor 0");
        let k = there(p.place("a", &free, 1, true)).expect("a second goes to a new executor");
        p.placed(10, k, "a");
        let k2 = there(p.place("a", &free, 1, true)).expect("a third to another new one");
        assert_ne!(k, k2);
        p.placed(11, k2, "a");
        assert_eq!(p.executors(), 3);
        // No core left for a fourth executor: executor 0 (serving fewest, first on ties).
        assert_eq!(there(p.place("a", &free, 1, true)), None);
        assert_eq!(there(p.place("a", &free, 2, true)), Some(0));
        assert_eq!(p.owner(11), Some(k2));
    }

    #[test]
    fn a_tenant_with_limits_stays_on_one_executor() {
        let limited = TenantPolicy { rate: Some((1_000_000, 10_000)), ..Default::default() };
        let free = TenantPolicy::default();
        let mut p = pool(4);
        assert_eq!(there(p.place("x", &free, 1, false)), Some(0));
        p.placed(1, 0, "x");
        // "l" has an attachment on executor 0 already: its next one joins it there.
        assert_eq!(there(p.place("l", &limited, 5, true)), None);
        // "m" has one on executor 1 (index 0): it goes there, however busy.
        p.placed(2, 0, "m");
        let limited_m = TenantPolicy { max_sockets: Some(10), ..Default::default() };
        assert_eq!(there(p.place("m", &limited_m, 0, false)), Some(0));
    }

    fn att(id: u64, busy_ms: u64, peers: &[u64], pinned: Option<&str>) -> Weighed {
        Weighed {
            id,
            pinned: pinned.map(str::to_string),
            busy: Duration::from_millis(busy_ms),
            peers: peers.to_vec(),
            latency: false,
        }
    }

    fn exec(active: f64, atts: Vec<Weighed>) -> Weighing {
        Weighing { active, missed: 0, atts }
    }

    const SPAN: Duration = Duration::from_millis(250);

    #[test]
    fn a_saturated_executor_splits_about_half_its_work_off() {
        // Never idle; its tasks took 100 + 80 + 60 ms: the heaviest stays, 80 goes, 60 joins
        // the lighter side.
        let e0 = exec(0.97, vec![att(1, 100, &[], None), att(2, 80, &[], None), att(3, 60, &[], None)]);
        assert_eq!(plan(std::slice::from_ref(&e0), SPAN, true, false), Plan::Split { from: 0, ids: vec![2, 3] });
        // No core left, or idle a third of the time: it stays.
        assert_eq!(plan(std::slice::from_ref(&e0), SPAN, false, false), Plan::Stay);
        assert_eq!(plan(&[Weighing { active: 0.66, ..e0 }], SPAN, true, false), Plan::Stay);
        // The busiest of several executors splits.
        let busy = exec(0.95, vec![att(5, 120, &[], None), att(6, 110, &[], None)]);
        let quiet = exec(0.1, vec![att(1, 10, &[], None)]);
        assert_eq!(plan(&[quiet, busy], SPAN, true, false), Plan::Split { from: 1, ids: vec![6] });
    }

    #[test]
    fn groups_that_must_stay_together_move_whole_or_not_at_all() {
        // 1 and 2 share a co-located connection (known from either side), 3 and 4 a pinned tenant.
        let e0 =
            vec![att(1, 50, &[2], None), att(2, 50, &[], None), att(3, 40, &[], Some("l")), att(4, 60, &[], Some("l"))];
        let Plan::Split { ids, .. } = plan(&[exec(1.0, e0)], SPAN, true, false) else { panic!("saturated: splits") };
        assert!(ids == vec![1, 2] || ids == vec![3, 4], "{ids:?}");
        // One group only: nothing to split.
        let one = vec![att(1, 120, &[2], None), att(2, 120, &[1], None)];
        assert_eq!(plan(&[exec(1.0, one)], SPAN, true, false), Plan::Stay);
        let pinned = vec![att(1, 120, &[], Some("l")), att(2, 120, &[], Some("l"))];
        assert_eq!(plan(&[exec(1.0, pinned)], SPAN, true, false), Plan::Stay);
    }

    #[test]
    fn little_work_twice_in_a_row_compacts_to_one_executor() {
        let quiet = [exec(0.2, vec![att(1, 30, &[], None)]), exec(0.3, vec![att(2, 40, &[], None)])];
        assert_eq!(plan(&quiet, SPAN, true, false), Plan::Stay, "once is not enough");
        assert_eq!(plan(&quiet, SPAN, true, true), Plan::Compact);
        assert_eq!(plan(&quiet[..1], SPAN, true, true), Plan::Stay, "one executor is compact");
        let busy = [exec(0.6, vec![att(1, 100, &[], None)]), exec(0.6, vec![att(2, 100, &[], None)])];
        assert_eq!(plan(&busy, SPAN, true, true), Plan::Stay);
    }

    #[test]
    fn latency_guests_that_miss_their_target_get_an_executor_of_their_own() {
        let quick = |id, busy| Weighed { latency: true, ..att(id, busy, &[], None) };
        // Half busy, latency work waiting behind bulk work 30 times in a weighing: the
        // latency-sensitive guests (not one pinned with a bulk one) go, however light.
        let e0 = vec![att(1, 90, &[], None), quick(2, 5), att(3, 40, &[], None), quick(4, 3)];
        let w = Weighing { active: 0.6, missed: 30, atts: e0 };
        assert_eq!(plan(std::slice::from_ref(&w), SPAN, true, false), Plan::Split { from: 0, ids: vec![2, 4] });
        // Few misses: no reason to move them (not saturated either).
        assert_eq!(plan(&[Weighing { missed: 3, ..w.clone() }], SPAN, true, false), Plan::Stay);
        // All latency-sensitive, or a latency guest joined to a bulk one by a co-located
        // connection: nothing to separate.
        let all = Weighing { atts: vec![quick(1, 50), quick(2, 50)], ..w.clone() };
        assert_eq!(plan(&[all], SPAN, true, false), Plan::Stay);
        let joined = Weighing { atts: vec![att(1, 90, &[2], None), quick(2, 5)], ..w };
        assert_eq!(plan(&[joined], SPAN, true, false), Plan::Stay);
    }

    proptest::proptest! {
        /// Whatever the work, a split moves some but not all of one executor's attachments,
        /// never parts of a group, and the two sides differ by no more than one attachment's work.
        #[test]
        fn a_split_keeps_groups_whole(busy in proptest::collection::vec(0u64..300, 2..12), links in proptest::collection::vec((0usize..12, 0usize..12), 0..6)) {
            let n = busy.len();
            let mut e0: Vec<Weighed> = busy.iter().enumerate().map(|(i, &b)| att(i as u64, b, &[], None)).collect();
            for (a, b) in links {
                let (a, b) = (a % n, b % n);
                e0[a].peers.push(b as u64);
            }
            if let Plan::Split { from, ids } = plan(&[exec(1.0, e0.clone())], SPAN, true, false) {
                proptest::prop_assert_eq!(from, 0);
                proptest::prop_assert!(!ids.is_empty() && ids.len() < n);
                for a in &e0 {
                    for p in &a.peers {
                        proptest::prop_assert_eq!(ids.contains(&a.id), ids.contains(p));
                    }
                }
                let moved: u64 = e0.iter().filter(|a| ids.contains(&a.id)).map(|a| a.busy.as_millis() as u64).sum();
                let total: u64 = busy.iter().sum();
                let biggest = groups(&e0).iter().map(|g| g.0.as_millis() as u64).max().unwrap_or(0);
                proptest::prop_assert!(moved.abs_diff(total - moved) <= biggest, "moved {} of {}", moved, total);
            }
        }
    }
}
