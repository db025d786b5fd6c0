//! Handing an NSM's work to another NSM process while its guests run: all of it to a new
//! process (`ctl upgrade`), or one tenant's attachments to another NSM (`ctl move`).
//!
//! The old process stops serving between two rounds (so no request is half done), writes down
//! everything ServiceLib keeps outside the regions — attachments, their holders, sockets with
//! their byte counters, queued asynchronous sends and urgent marks, co-located pipes with their
//! bytes, closed sockets still sending queued bytes, pending readiness refreshes, telemetry
//! counters — and sends it over a unix socket to
//! the new process with every fd it holds (regions' memfds, doorbells, holders' pidfds, the stack's
//! sockets, the rendezvous listener) by SCM_RIGHTS. The regions themselves, with the job queues,
//! nqes and buffers in flight, are shared memory: they simply have a new reader. The new process
//! rebuilds the state, publishes its pid in each region, watches the sockets on its own stack
//! (each readable or writable socket then reports an edge, which the guest takes as a spurious
//! wakeup) and answers; only then does the old process let go (without closing anything a guest
//! can see) and exits once its name lookups are answered (their threads write into the
//! regions). Until
//! the answer the old process changes nothing, so a new process that fails leaves the old one
//! serving as before.

use crate::colocated::state::{EndState, PipeReader, PipeState, PipeWriter};
use crate::colocated::Backlog;
use crate::control::{self, Handed, NsmStats};
use crate::core::{tok, tok_att, KIND_SHIFT, TOK_BELL, TOK_PIDFD, TOK_SOCK};
use crate::sendq::SendQueue;
use crate::sock::{Attachment, Sock, SERIAL};
use crate::{epoll_ctl, holders, regions, Service, Stack};
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Fds per frame (what `sys::send_frame` passes at once).
const FDS_PER_FRAME: usize = sys::MAX_FDS;
/// Bulk bytes per frame, well under `sys::MAX_FRAME`.
const BLOB_FRAME: usize = 16 << 20;
/// The longest either side waits for the other.
const PATIENCE: Duration = Duration::from_secs(10);

/// A range of the snapshot's bulk bytes: (offset, length).
pub(crate) type Bytes = (u64, u64);

/// The bulk bytes of a snapshot (queued sends, pipes' contents), sent after it.
#[derive(Default)]
pub(crate) struct Blob(Vec<u8>);

impl Blob {
    pub fn put(&mut self, b: &[u8]) -> Bytes {
        let at = self.0.len() as u64;
        self.0.extend_from_slice(b);
        (at, b.len() as u64)
    }

    pub fn put_deque(&mut self, d: &VecDeque<u8>) -> Bytes {
        let (a, b) = d.as_slices();
        let at = self.0.len() as u64;
        self.0.extend_from_slice(a);
        self.0.extend_from_slice(b);
        (at, (a.len() + b.len()) as u64)
    }

    pub fn get(&self, (at, len): Bytes) -> Result<&[u8], String> {
        let end =
            at.checked_add(len).filter(|&e| e <= self.0.len() as u64).ok_or("a range past the snapshot's bytes")?;
        Ok(&self.0[at as usize..end as usize])
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// Everything the old process served (an upgrade), not some attachments (a move).
    whole: bool,
    /// The taker sets its own congestion control on the TCP sockets (a move to another NSM;
    /// an upgrade or a move between executors keeps each socket's).
    #[serde(default)]
    impose_congestion: bool,
    /// CLOCK_MONOTONIC (ns) when the old process stopped serving.
    stopped_ns: u64,
    /// Index of the rendezvous listener among the fds.
    rendezvous: Option<usize>,
    attachments: Vec<AttState>,
    pipes: Vec<PipeState>,
    /// Closed sockets still sending queued asynchronous bytes (an upgrade only).
    #[serde(default)]
    lingering: Vec<SockState>,
    /// Readiness refreshes (attachment id, nqe) to complete once readiness is published.
    refreshes: Vec<(u64, u32)>,
    stats: NsmStats,
    next_serial: u64,
    fds: usize,
    blob: usize,
}

#[derive(Serialize, Deserialize)]
struct AttState {
    id: u64,
    tenant: String,
    pid: i32,
    uid: u32,
    policy: control::TenantPolicy,
    head: u32,
    /// Indices into the fds.
    memfd: usize,
    nsm_bell: usize,
    guest_bell: usize,
    /// (holder id, its pidfd's index, the slots it holds)
    holders: Vec<(u32, Option<usize>, Vec<u32>)>,
    socks: Vec<Option<SockState>>,
    free: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct SockState {
    fd: Option<usize>,
    /// What the stack wrote down of the socket besides or instead of its fd (`Stack::export`).
    #[serde(default)]
    desc: Option<Vec<u8>>,
    stream: bool,
    bytes_in: u64,
    bytes_out: u64,
    counted: bool,
    serial: u64,
    urgent: bool,
    cpu_ns: u64,
    sendq: Bytes,
    deferred: Option<i32>,
    shutdown_after: Option<i32>,
    pipe: Option<EndState>,
    /// A listener's co-located backlog: (limit, IPv6, ends waiting for accept).
    backlog: Option<(usize, bool, Vec<EndState>)>,
}

impl SockState {
    /// Writes socket `s` down; `fd`: its stack fd's index among the snapshot's fds and `desc`
    /// (`Stack::export`).
    fn of<H>(s: &Sock<H>, (fd, desc): Carried, blob: &mut Blob, pipes: &mut PipeWriter) -> SockState {
        SockState {
            fd,
            desc,
            stream: s.stream,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            counted: s.counted,
            serial: s.serial,
            urgent: s.urgent.get(),
            cpu_ns: s.cpu.as_nanos() as u64,
            sendq: blob.put(s.sendq.bytes()),
            deferred: s.sendq.deferred,
            shutdown_after: s.sendq.shutdown_after,
            pipe: s.pipe.as_ref().map(|e| pipes.end(e, blob)),
            backlog: s.backlog.as_ref().map(|b| (b.limit, b.v6, b.queue.iter().map(|e| pipes.end(e, blob)).collect())),
        }
    }

    /// The socket written down, over stack socket `handle` (imported from its fd).
    fn into_sock<H>(self, handle: Option<H>, blob: &Blob, pipes: &PipeReader) -> Result<Sock<H>, String> {
        let mut s = Sock::new(handle, self.stream);
        s.serial = self.serial;
        s.bytes_in = self.bytes_in;
        s.bytes_out = self.bytes_out;
        s.counted = self.counted;
        s.urgent.set(self.urgent);
        s.cpu = Duration::from_nanos(self.cpu_ns);
        s.sendq = SendQueue::restore(blob.get(self.sendq)?, self.deferred, self.shutdown_after);
        s.pipe = self.pipe.map(|e| pipes.end(e)).transpose()?;
        if let Some((limit, v6, queue)) = self.backlog {
            let queue = queue.into_iter().map(|e| pipes.end(e)).collect::<Result<_, _>>()?;
            s.backlog = Some(Backlog { limit, v6, queue });
        }
        Ok(s)
    }
}

/// How a stack socket travels: its fd's index among the snapshot's fds, a description, or both
/// (`Stack::export`).
type Carried = (Option<usize>, Option<Vec<u8>>);

/// How stack socket `h` goes to another process: its fd (pushed with `fd`), a description, or
/// both.
fn carry<S: Stack>(
    stack: &mut S,
    h: Option<&S::Handle>,
    fd: &mut impl FnMut(RawFd) -> usize,
) -> Result<Carried, String> {
    let Some(h) = h else { return Ok((None, None)) };
    match stack.export(h) {
        Some(e) => Ok((e.fd.map(fd), e.desc)),
        None => Err(format!("a {} stack socket is in a state that cannot leave its process yet", stack.kind())),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for both processes.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a live timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn patient(sock: &OwnedFd) -> io::Result<()> {
    let s = std::os::unix::net::UnixStream::from(sock.try_clone()?);
    s.set_read_timeout(Some(PATIENCE))?;
    s.set_write_timeout(Some(PATIENCE))
}

fn io_err(e: io::Error) -> String {
    format!("the handover socket: {e}")
}

impl<S: Stack> Service<S> {
    /// Hands attachments `only` (None: everything this NSM serves, its closing sockets and its
    /// rendezvous socket) to
    /// the NSM process at the other end of `to`, which runs [`takeover`](Self::takeover). On
    /// success this process serves them no more (after handing over everything it exits once
    /// its engine lets go); on failure it serves on as before.
    /// `within`: to another executor of this NSM (the sockets keep their congestion control;
    /// a move to another NSM gives them its own).
    pub(crate) fn handover(&mut self, to: OwnedFd, only: Option<&[u64]>, within: bool) -> Result<Handed, String> {
        self.gather(only)?;
        self.hand(to, only, only.is_some() && !within)
    }

    /// Hands over attachments `only` (None: everything) that this executor serves.
    fn hand(&mut self, to: OwnedFd, only: Option<&[u64]>, impose_congestion: bool) -> Result<Handed, String> {
        patient(&to).map_err(io_err)?;
        let stopped_ns = monotonic_ns();
        let (mut snap, fds, blob) = match self.write_down(stopped_ns, only) {
            Ok(w) => w,
            Err(e) => {
                self.core.stack.exported(false);
                return Err(e);
            }
        };
        snap.impose_congestion = impose_congestion;
        let sockets = snap.attachments.iter().map(|a| a.socks.iter().flatten().count()).sum();
        let attachments = snap.attachments.len();
        let sent = send(to.as_raw_fd(), &snap, &fds, &blob.0);
        let answer = sent.and_then(|()| sys::recv_frame(to.as_raw_fd())).map_err(io_err).and_then(|f| {
            let (payload, _) = f.ok_or("the new NSM closed the handover socket")?;
            control::Reply::decode::<u64>(&payload).map_err(|e| format!("the new NSM: {e}"))
        });
        self.core.stack.exported(answer.is_ok());
        let serving_ns = match answer {
            Ok(t) => t,
            Err(e) => {
                // The new process may have published its pid already: guests watch ours again.
                for a in self.core.atts.iter().flatten() {
                    a.region.header().nsm_pid.store(std::process::id(), Ordering::Release);
                }
                return Err(e);
            }
        };
        match only {
            None => self.let_go(),
            Some(ids) => self.drop_quietly(|a| ids.contains(&a.id)),
        }
        Ok(Handed { old_pid: std::process::id(), stopped_ns, serving_ns, attachments, sockets })
    }

    /// Brings the other executors' attachments (`only` those, or all) to this one, each handed
    /// over as to another NSM (within the process), so that one snapshot carries them. An
    /// executor's co-located connections are all its own, so they move whole.
    pub(crate) fn gather(&mut self, only: Option<&[u64]>) -> Result<(), String> {
        let Some(mut pool) = self.pool.take() else { return Ok(()) };
        let r = (|| {
            for (k, state) in pool.states().into_iter().enumerate() {
                let ids: Vec<u64> = state
                    .attachments
                    .iter()
                    .map(|a| a.attachment)
                    .filter(|id| only.is_none_or(|o| o.contains(id)))
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let (give, take) = std::os::unix::net::UnixStream::pair().map_err(io_err)?;
                let req = crate::control::NsmRequest::Handover { attachments: Some(ids.clone()), within: true };
                pool.tell(k, &req, &[give.as_raw_fd()]).map_err(|e| format!("executor {}: {e}", k + 1))?;
                drop(give);
                let took = self.takeover(take.into());
                let handed = pool.answer(k).map_err(io_err).and_then(|(payload, _)| {
                    control::Reply::decode::<Handed>(&payload).map_err(|e| format!("executor {}: {e}", k + 1))
                });
                // The giver's error says why; ours would only say that it hung up.
                handed.and(took)?;
                pool.came_home(k, &ids);
            }
            Ok(())
        })();
        self.pool = Some(pool);
        r
    }

    /// Starts an executor and hands it attachments `ids` of executor `from` (0: this one;
    /// others' come here first): `executors = "auto"` spreading work that backed up (pool.rs).
    pub(crate) fn split(&mut self, from: usize, ids: &[u64]) -> Result<(), String> {
        if from != 0 {
            self.gather(Some(ids))?;
        }
        let tenants: Vec<(u64, String)> =
            self.core.atts.iter().flatten().filter(|a| ids.contains(&a.id)).map(|a| (a.id, a.tenant.clone())).collect();
        let Some(mut pool) = self.pool.take() else { return Ok(()) };
        let r = (|| {
            let n = pool.grow().map_err(io_err)?;
            let (give, take) = std::os::unix::net::UnixStream::pair().map_err(io_err)?;
            pool.tell(n, &crate::control::NsmRequest::Takeover, &[take.as_raw_fd()]).map_err(io_err)?;
            drop(take);
            let handed = self.hand(give.into(), Some(ids), false);
            // The new executor answers its "engine" (this thread) once it took them, or failed.
            let took = pool.answer(n).map_err(io_err).and_then(|(payload, _)| {
                control::Reply::decode::<u64>(&payload).map_err(|e| format!("executor {}: {e}", n + 1))
            });
            let handed = handed?;
            took?;
            for (id, tenant) in &tenants {
                pool.placed(*id, n, tenant);
            }
            eprintln!(
                "netkernel nsm {}: executor {} backed up: {} attachments ({} sockets) moved to executor {} in {:.2} ms",
                self.core.name,
                from,
                handed.attachments,
                handed.sockets,
                n + 1,
                handed.serving_ns.saturating_sub(handed.stopped_ns) as f64 / 1e6
            );
            Ok(())
        })();
        self.pool = Some(pool);
        r
    }

    /// Everything to hand over, without changing anything: the snapshot, the fds it indexes and
    /// its bulk bytes.
    fn write_down(&mut self, stopped_ns: u64, only: Option<&[u64]>) -> Result<(Snapshot, Vec<RawFd>, Blob), String> {
        let mut fds: Vec<RawFd> = Vec::new();
        let mut fd = |f: RawFd| {
            fds.push(f);
            fds.len() - 1
        };
        let mut blob = Blob::default();
        let mut pipes = PipeWriter::default();
        let rendezvous = self.rendezvous.as_ref().filter(|_| only.is_none()).map(|l| fd(l.as_raw_fd()));
        let mut attachments = Vec::new();
        let chosen = |id: u64| only.is_none_or(|ids| ids.contains(&id));
        if let Some(missing) =
            only.and_then(|ids| ids.iter().find(|&&id| !self.core.atts.iter().flatten().any(|a| a.id == id)))
        {
            return Err(format!("no attachment {missing} here"));
        }
        for a in self.core.atts.iter().flatten().filter(|a| chosen(a.id)) {
            let mut socks = Vec::with_capacity(a.socks.len());
            for s in &a.socks {
                let Some(s) = s else {
                    socks.push(None);
                    continue;
                };
                let carried = carry(&mut self.core.stack, s.handle.as_ref(), &mut fd)?;
                socks.push(Some(SockState::of(s, carried, &mut blob, &mut pipes)));
            }
            attachments.push(AttState {
                id: a.id,
                tenant: a.tenant.clone(),
                pid: a.pid,
                uid: a.uid,
                policy: a.policy.clone(),
                head: a.head,
                memfd: fd(a.memfd.as_raw_fd()),
                nsm_bell: fd(a.nsm_bell.as_raw_fd()),
                guest_bell: fd(a.guest_bell.as_raw_fd()),
                holders: a.holders.export().map(|(id, p, slots)| (id, p.map(|p| fd(p.as_raw_fd())), slots)).collect(),
                socks,
                free: a.free.clone(),
            });
        }
        // A co-located connection moves whole or not at all: both ends live in one process.
        if let Some(other) = pipes.outside() {
            return Err(format!("a co-located connection joins it to {other}, which stays; close it or move both"));
        }
        let id_of = |ai: usize| self.core.atts.get(ai).and_then(|a| a.as_ref()).map(|a| a.id).filter(|&id| chosen(id));
        let refreshes = self
            .core
            .refreshes
            .iter()
            .chain(&self.core.polled_refreshes)
            .filter(|&&(ai, id, _)| id_of(ai) == Some(id))
            .map(|&(_, id, idx)| (id, idx))
            .collect();
        // Closed sockets still sending queued bytes go too, so the old process can exit at once.
        let mut lingering = Vec::new();
        for l in self.core.lingering.iter().flatten().filter(|_| only.is_none()) {
            let carried = carry(&mut self.core.stack, l.handle.as_ref(), &mut fd)?;
            lingering.push(SockState::of(l, carried, &mut blob, &mut pipes));
        }
        let mut stats = self.core.stats.clone();
        stats.conns.clear();
        let snap = Snapshot {
            whole: only.is_none(),
            impose_congestion: false,
            stopped_ns,
            rendezvous,
            attachments,
            pipes: pipes.pipes,
            lingering,
            refreshes,
            stats,
            next_serial: SERIAL.load(Ordering::Relaxed),
            fds: fds.len(),
            blob: blob.0.len(),
        };
        Ok((snap, fds, blob))
    }

    /// After a handover: drops every attachment without a trace a guest could see (no FIN, no
    /// reset, no readiness, no region marked dead) and stops listening for engines.
    fn let_go(&mut self) {
        self.drop_quietly(|_| true);
        for s in std::mem::take(&mut self.core.lingering).into_iter().flatten() {
            if let Some(h) = s.handle {
                self.core.stack.unwatch(&h);
            }
        }
        if let Some(l) = self.rendezvous.take() {
            let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, l.as_raw_fd(), 0, 0);
        }
        self.retired = true;
        eprintln!("netkernel nsm {}: handed over; exiting", self.core.name);
    }

    /// Drops the attachments `which` picks without a trace a guest could see: no FIN, no reset,
    /// no readiness, no region marked dead (another process serves them).
    fn drop_quietly(&mut self, which: impl Fn(&Attachment<S::Handle>) -> bool) {
        let mut gone = Vec::new();
        for slot in self.core.atts.iter_mut() {
            if slot.as_ref().is_some_and(&which) {
                gone.extend(slot.take());
            }
        }
        let everything = self.core.atts.iter().all(|a| a.is_none());
        for a in gone {
            self.forget(&a);
            let Attachment { socks, .. } = a;
            for s in socks.into_iter().flatten() {
                let Sock { handle, pipe, backlog, .. } = s;
                if let Some(h) = handle {
                    self.core.stack.unwatch(&h);
                }
                if let Some(e) = pipe {
                    e.forget();
                }
                for e in backlog.into_iter().flat_map(|b| b.queue) {
                    e.forget();
                }
            }
        }
        let live = |ai: usize, atts: &[Option<Attachment<S::Handle>>]| atts.get(ai).is_some_and(|a| a.is_some());
        let atts = &self.core.atts;
        self.core.listeners.retain(|_, l| {
            l.retain(|r| live(r.ai, atts));
            !l.is_empty()
        });
        self.core.refreshes.retain(|r| live(r.0, atts));
        self.core.polled_refreshes.retain(|r| live(r.0, atts));
        self.core.ready.retain(|r| r.key >> KIND_SHIFT != TOK_SOCK || live(tok_att(r.key), atts));
        self.core.throttled.retain(|r| live(r.0, atts));
        if everything {
            self.core.parked.clear();
            self.core.sched = self.core.sched.name().parse::<crate::sched::Kind>().unwrap_or_default().build();
        }
    }

    /// Takes over what the NSM at the other end of `from` hands over (it runs
    /// [`handover`](Self::handover)); from the answer on, this process serves its guests.
    pub(crate) fn takeover(&mut self, from: OwnedFd) -> Result<u64, String> {
        patient(&from).map_err(io_err)?;
        let rebuilt = recv(from.as_raw_fd()).and_then(|(snap, fds, blob)| self.rebuild(snap, fds, blob));
        let answer = match &rebuilt {
            Ok(_) => control::Reply::ok(monotonic_ns()),
            Err(e) => control::Reply::err(e.clone()),
        };
        if let Err(e) = sys::send_frame(from.as_raw_fd(), &answer.encode(), &[]) {
            // The giver never hears that we serve them: it serves on, so we must not.
            if let Ok(ids) = &rebuilt {
                self.drop_quietly(|a| ids.contains(&a.id));
                // A new process (an upgrade) had no closing sockets of its own: these were the
                // giver's, which sends their bytes itself.
                if self.core.atts.iter().all(|a| a.is_none()) {
                    for s in std::mem::take(&mut self.core.lingering).into_iter().flatten() {
                        if let Some(h) = s.handle {
                            self.core.stack.unwatch(&h);
                        }
                    }
                }
            }
            return Err(io_err(e));
        }
        rebuilt.map(|_| monotonic_ns())
    }

    /// Rebuilds what a snapshot holds; returns the ids of the attachments it added.
    fn rebuild(&mut self, snap: Snapshot, fds: Vec<Option<OwnedFd>>, blob: Blob) -> Result<Vec<u64>, String> {
        if snap.whole && self.core.atts.iter().any(|a| a.is_some()) {
            return Err("the new NSM serves attachments already".into());
        }
        let first = self.core.atts.len();
        let r = self.rebuild_all(snap, fds, &blob);
        let new: Vec<u64> = self.core.atts[first..].iter().flatten().map(|a| a.id).collect();
        match r {
            Ok(()) => Ok(new),
            Err(e) => {
                self.drop_quietly(|a| new.contains(&a.id));
                Err(e)
            }
        }
    }

    fn rebuild_all(&mut self, snap: Snapshot, mut fds: Vec<Option<OwnedFd>>, blob: &Blob) -> Result<(), String> {
        let mut take = |i: usize| fds.get_mut(i).and_then(|f| f.take()).ok_or("an fd index past the fds sent");
        let rendezvous = match snap.rendezvous {
            Some(i) => Some(std::os::unix::net::UnixListener::from(take(i)?)),
            None => None,
        };
        let ep = self.epfd.as_raw_fd();
        let first = self.core.atts.len();
        let impose = snap.impose_congestion;
        let mut socks = Vec::new();
        for st in snap.attachments {
            let ai = self.core.atts.len();
            let memfd = take(st.memfd)?;
            let region = Arc::new(Region::map(memfd.as_raw_fd()).map_err(|e| format!("attachment {}: {e}", st.id))?);
            let (nsm_bell, guest_bell) = (take(st.nsm_bell)?, take(st.guest_bell)?);
            let mut holders = Vec::new();
            for (id, pidfd, slots) in st.holders {
                holders.push((id, pidfd.map(&mut take).transpose()?, slots));
            }
            let holders = holders::Holders::import(holders);
            let tenant_id = self.core.tenant_policy(&st.tenant, &st.policy);
            if let Some((bits, burst)) = st.policy.rate {
                let now = self.core.now;
                self.core
                    .buckets
                    .entry(st.tenant.clone())
                    .or_insert_with(|| crate::ratelimit::Bucket::new(bits, burst, now));
            }
            regions().push((st.id, region.clone(), guest_bell.as_raw_fd()));
            self.core.atts.push(Some(Attachment {
                id: st.id,
                tenant: st.tenant,
                pid: st.pid,
                uid: st.uid,
                policy: st.policy,
                region,
                memfd,
                head: st.head,
                nsm_bell,
                guest_bell,
                holders,
                socks: Vec::new(),
                free: st.free,
                bell: Rc::new(Cell::new(true)),
                tenant_id,
                queued: false,
                ready: Vec::new(),
                ready_queued: false,
                busy: Default::default(),
                tasks: (0, 0),
            }));
            let a = self.core.atts[ai].as_ref().expect("just pushed");
            epoll_ctl(ep, libc::EPOLL_CTL_ADD, a.nsm_bell.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_BELL, ai, 0))
                .map_err(|e| format!("epoll: {e}"))?;
            for (id, pidfd) in a.holders.pidfds() {
                epoll_ctl(ep, libc::EPOLL_CTL_ADD, pidfd.as_raw_fd(), libc::EPOLLIN as u32, tok(TOK_PIDFD, ai, id))
                    .map_err(|e| format!("epoll: {e}"))?;
            }
            let mut handles = Vec::with_capacity(st.socks.len());
            for s in &st.socks {
                handles.push(match s.as_ref().and_then(|s| s.fd) {
                    Some(i) => Some(take(i)?),
                    None => None,
                });
            }
            socks.push((ai, st.socks, handles));
        }
        let atts = &self.core.atts;
        let pipes = PipeReader::new(snap.pipes, blob, |id, slot| {
            atts.iter().flatten().find(|a| a.id == id).map(|a| a.owner(slot))
        })?;
        for (ai, states, handles) in socks {
            let mut rebuilt = Vec::with_capacity(states.len());
            for (slot, (st, fd)) in states.into_iter().zip(handles).enumerate() {
                let Some(st) = st else {
                    rebuilt.push(None);
                    continue;
                };
                let refused = |e| format!("the stack refused a socket: {}", io::Error::from_raw_os_error(e));
                let handle = match (fd, st.desc.as_deref()) {
                    (None, None) => None,
                    (fd, desc) => Some(self.core.stack.import(fd, desc, impose).map_err(refused)?),
                };
                let s = st.into_sock(handle, blob, &pipes)?;
                if let (Some(h), None) = (&s.handle, &s.pipe) {
                    self.core
                        .stack
                        .watch(h, tok(TOK_SOCK, ai, slot as u32))
                        .map_err(|e| format!("watching a socket: {}", io::Error::from_raw_os_error(e)))?;
                }
                rebuilt.push(Some(s));
            }
            self.core.atts[ai].as_mut().expect("pushed above").socks = rebuilt;
        }
        for ai in first..self.core.atts.len() {
            self.core.find_listeners(ai);
        }
        for (id, idx) in snap.refreshes {
            if let Some(ai) = self.core.atts.iter().position(|a| a.as_ref().is_some_and(|a| a.id == id)) {
                self.core.refreshes.push((ai, id, idx));
            }
        }
        for st in snap.lingering {
            let fd = st.fd.map(&mut take).transpose()?;
            if fd.is_none() && st.desc.is_none() {
                continue;
            }
            let h =
                self.core.stack.import(fd, st.desc.as_deref(), false).map_err(|e| format!("a closing socket: {e}"))?;
            let s = st.into_sock(Some(h), blob, &pipes)?;
            if let Some(h) = &s.handle {
                let key = crate::core::TOK_LINGER | self.core.lingering.len() as u64;
                self.core.stack.watch(h, key).map_err(|e| format!("watching a closing socket: {e}"))?;
            }
            self.core.lingering.push(Some(s));
        }
        SERIAL.fetch_max(snap.next_serial, Ordering::Relaxed);
        // The first process's counters go on in its successor; a move's stay where they were.
        if !snap.whole {
            return Ok(());
        }
        let s = &mut self.core.stats;
        let old = snap.stats;
        (s.bytes_in, s.bytes_out, s.conns_total, s.conns_colocated) =
            (old.bytes_in, old.bytes_out, old.conns_total, old.conns_colocated);
        (s.violations, s.tenants) = (old.violations, old.tenants);
        for t in s.tenants.values_mut() {
            // CPU is this process's to count.
            t.nsm_cpu_seconds = 0.0;
        }
        if let Some(l) = rendezvous {
            self.set_rendezvous(l).map_err(|e| format!("the rendezvous socket: {e}"))?;
        }
        // Guests watch this process from now on.
        for a in self.core.atts.iter().flatten() {
            a.region.header().nsm_pid.store(std::process::id(), Ordering::Release);
        }
        Ok(())
    }
}

fn send(sock: RawFd, snap: &Snapshot, fds: &[RawFd], blob: &[u8]) -> io::Result<()> {
    sys::send_frame(sock, &serde_json::to_vec(snap).map_err(io::Error::other)?, &[])?;
    for chunk in fds.chunks(FDS_PER_FRAME) {
        sys::send_frame(sock, b"fds", chunk)?;
    }
    for chunk in blob.chunks(BLOB_FRAME) {
        sys::send_frame(sock, chunk, &[])?;
    }
    Ok(())
}

fn recv(sock: RawFd) -> Result<(Snapshot, Vec<Option<OwnedFd>>, Blob), String> {
    let frame = || -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
        let (payload, fds) = sys::recv_frame(sock).map_err(io_err)?.ok_or("the old NSM closed the handover socket")?;
        // SAFETY: the fds were just received and are owned by nobody else.
        Ok((payload, fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect()))
    };
    let (head, _) = frame()?;
    let snap: Snapshot = serde_json::from_slice(&head).map_err(|e| format!("the old NSM's snapshot: {e}"))?;
    let mut fds = Vec::with_capacity(snap.fds);
    while fds.len() < snap.fds {
        let (_, got) = frame()?;
        if got.is_empty() {
            return Err("a frame of the snapshot's fds came without fds".into());
        }
        fds.extend(got.into_iter().map(Some));
    }
    let mut blob = Blob(Vec::with_capacity(snap.blob));
    while blob.0.len() < snap.blob {
        let (bytes, _) = frame()?;
        blob.0.extend_from_slice(&bytes);
    }
    Ok((snap, fds, blob))
}
