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
//! Executors grow with the attachments: a new one goes to an executor serving none, else to a
//! new executor while there are cores for one, else to the executor serving fewest. They shrink:
//! an executor left with no attachment is stopped within [`TEND_EVERY`]. An idle executor sleeps
//! in epoll like any NSM. (An attachment stays where it was placed: its sockets, its readiness
//! keys and its co-located peers live in that executor's state.)
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

/// Starts an executor on a thread of its own, taking orders on the socket it is given.
pub(crate) type Spawner = Box<dyn Fn(UnixStream) -> io::Result<std::thread::JoinHandle<()>>>;

struct Executor {
    chan: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Attachments it served at the last look.
    attachments: usize,
    /// Tenants with an attachment here.
    tenants: Vec<String>,
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
}

/// Where an attachment goes.
pub(crate) enum Place {
    Here,
    There(usize),
}

impl Pool {
    pub(crate) fn new(name: String, spawn: Spawner, max: usize) -> Self {
        Pool { name, spawn, max: max.max(1), execs: Vec::new(), owner: HashMap::new(), next_tend: Instant::now() }
    }

    pub(crate) fn executors(&self) -> u32 {
        1 + self.execs.len() as u32
    }

    /// Whether any other executor still serves an attachment (as of the last look).
    pub(crate) fn serving(&self) -> bool {
        self.execs.iter().any(|e| e.attachments > 0)
    }

    /// Starts another executor.
    fn grow(&mut self) -> io::Result<usize> {
        let (ours, theirs) = UnixStream::pair()?;
        let k = self.execs.len() + 1;
        let thread = (self.spawn)(theirs)?;
        eprintln!("netkernel nsm {}: executor {k} started", self.name);
        self.execs.push(Executor { chan: ours, thread: Some(thread), attachments: 0, tenants: Vec::new() });
        Ok(self.execs.len() - 1)
    }

    /// Where a new attachment of `tenant` goes (`here`: how many executor 0 serves; `here_has`:
    /// whether one of them is the tenant's): with the tenant's others if its limits must be kept
    /// in one place; else on an executor serving none, or a new one while the cores allow,
    /// or the one serving fewest.
    pub(crate) fn place(&mut self, tenant: &str, policy: &TenantPolicy, here: usize, here_has: bool) -> Place {
        let pinned = policy.rate.is_some() || policy.max_sockets.is_some() || policy.cpu_limit.is_some();
        if pinned {
            if here_has {
                return Place::Here;
            }
            if let Some(k) = self.execs.iter().position(|e| e.tenants.iter().any(|t| t == tenant)) {
                return Place::There(k);
            }
        }
        let fewest = self.execs.iter().enumerate().min_by_key(|(_, e)| e.attachments).map(|(k, e)| (k, e.attachments));
        if here == 0 || fewest.is_some_and(|(_, n)| n >= here) && (self.executors() as usize) >= self.max {
            return Place::Here;
        }
        match fewest {
            Some((k, 0)) => Place::There(k),
            _ if (self.executors() as usize) < self.max => self.grow().map_or(Place::Here, Place::There),
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
            e.tenants = s.tenants.keys().filter(|_| s.attachments > 0).cloned().collect();
            all.push(s);
        }
        all
    }

    /// What every other executor serves.
    pub(crate) fn states(&mut self) -> Vec<NsmState> {
        let adopt = |e: &Executor| call::<NsmState>(e.chan.as_raw_fd(), &NsmRequest::Adopt, &[]).map(|(s, _)| s);
        self.execs.iter().map(|e| adopt(e).unwrap_or_default()).collect()
    }

    /// Looks at the other executors: stops those left with no attachment, forgets where ended
    /// attachments were.
    pub(crate) fn tend(&mut self, now: Instant) {
        self.next_tend = now + TEND_EVERY;
        if self.execs.is_empty() {
            return;
        }
        let live: Vec<Vec<u64>> =
            self.states().iter().map(|s| s.attachments.iter().map(|a| a.attachment).collect()).collect();
        self.stats();
        self.owner.retain(|id, k| live.get(*k).is_some_and(|l| l.contains(id)));
        // Only the newest executor stops, so that the others keep their indices.
        while self.execs.last().is_some_and(|e| e.attachments == 0) {
            let k = self.execs.len();
            let _ = self.ask(k - 1, &NsmRequest::Shutdown, &[]);
            let mut e = self.execs.pop().expect("checked");
            let _ = e.chan.shutdown(std::net::Shutdown::Both);
            if let Some(t) = e.thread.take() {
                let _ = t.join();
            }
            eprintln!("netkernel nsm {}: executor {k} stopped (no attachments)", self.name);
        }
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
}
