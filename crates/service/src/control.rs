//! Messages on the engine <-> NSM channel. Each is one JSON document in a frame of
//! `netkernel_ring::sys::send_frame`, with file descriptors passed alongside by SCM_RIGHTS. The
//! guest/ctl <-> engine messages, and the [`Reply`] envelope both channels share, are in
//! `netkernel_control`.

pub use netkernel_control::Reply;
use serde::{Deserialize, Serialize};

/// What the engine tells an NSM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NsmRequest {
    /// Serve a new attachment. Fds: region memfd, NSM doorbell, guest doorbell, guest pidfd.
    Attach { attachment: u64, tenant: String, pid: i32, uid: u32, policy: TenantPolicy },
    /// Another process (a forked child) shares the attachment. Fd: its pidfd.
    Hold { attachment: u64, holder: u32 },
    /// Report telemetry.
    Stats,
    /// A new engine takes this NSM over (it reconnected on the NSM's rendezvous socket):
    /// reply with an [`NsmState`].
    Adopt,
    /// Hand back attachment `attachment`'s region memfd, NSM doorbell and guest doorbell, so an
    /// engine that adopted the NSM can declare the region dead and let programs join it.
    Region { attachment: u64 },
    /// Reset every guest (regions declared dead) and exit.
    Shutdown,
    /// Tenant `tenant`'s policy changed (`ctl reload`): its attachments, new and live, follow
    /// `policy` (limits, weights, addresses) from now on.
    Policy { tenant: String, policy: TenantPolicy },
    /// End attachment `attachment` now, its sockets reset (its tenant was removed).
    Detach { attachment: u64 },
    /// New TCP connections use congestion control `congestion` from now on (`ctl reload`).
    Congestion { congestion: String },
    /// To the old NSM: stop serving and hand attachments `attachments` to the NSM at the other
    /// end of the fd (a unix stream socket): `ctl move`. Without a list (`ctl upgrade`) it hands
    /// over everything, its closing sockets and rendezvous socket too, and exits.
    /// Reply: [`Handed`]. On failure the NSM serves on as before.
    Handover {
        #[serde(default)]
        attachments: Option<Vec<u64>>,
        /// To another executor of the same NSM: the sockets keep their congestion control (a
        /// move to another NSM gives them its own).
        #[serde(default)]
        within: bool,
    },
    /// To the new NSM (`ctl upgrade`: serving nothing yet) or the target of `ctl move`: take over
    /// what the NSM at the other end of the fd hands over and serve it. Reply: CLOCK_MONOTONIC
    /// (ns) when it began serving.
    Takeover,
    /// To a user NSM (`ctl upgrade`): hand the link to a new process, taking orders from it, and
    /// serve the attachments it has until they move there, relaying their connections until
    /// they close (drain.rs). Reply:
    /// [`crate::drain::Drained`] with fds.
    Drain,
    /// To the new process of a user NSM's upgrade, first: serve from the old process's link
    /// (fds from its `Drain` answer); `ports` are the old process's.
    Succeed { ports: Vec<(u8, u16)> },
}

/// What an NSM handed over (`NsmRequest::Handover`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Handed {
    pub old_pid: u32,
    /// CLOCK_MONOTONIC (ns) when the old NSM stopped serving and when the new one began: the
    /// blackout lies between.
    pub stopped_ns: u64,
    pub serving_ns: u64,
    pub attachments: usize,
    pub sockets: usize,
}

/// What an NSM serves, as an adopting engine needs it to rebuild its attachment table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NsmState {
    pub name: String,
    pub kind: String,
    pub pid: u32,
    pub attachments: Vec<AttachmentState>,
    /// Time this executor had nothing to do (asleep, or looking for work in vain), µs.
    #[serde(default)]
    pub idle_us: u64,
    /// Latency-class tasks that waited past their target so far.
    #[serde(default)]
    pub latency_misses: u64,
}

/// One attachment an NSM serves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AttachmentState {
    pub attachment: u64,
    pub tenant: String,
    /// The process that attached.
    pub pid: i32,
    pub uid: u32,
    /// (pid, holder id) of every live process holding the attachment, read from the NSM's
    /// pidfds.
    pub holders: Vec<(i32, u32)>,
    /// Time the NSM's tasks for it took so far, µs (executors balance by it).
    #[serde(default)]
    pub busy_us: u64,
    /// Attachments it has co-located connections with (they share an executor).
    #[serde(default)]
    pub peers: Vec<u64>,
    /// Its tenant's limits keep the tenant's attachments on one executor.
    #[serde(default)]
    pub pinned: bool,
    /// Sockets it holds that cannot leave this process (a user stack's connections: their
    /// state is smoltcp's); 0: the attachment can be handed over.
    #[serde(default)]
    pub staying: usize,
    /// Its request tasks so far, and of them the latency-class ones (short requests, connects).
    #[serde(default)]
    pub tasks: u64,
    #[serde(default)]
    pub latency_tasks: u64,
}

/// What an NSM enforces for one tenant (DESIGN.md D7).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantPolicy {
    /// The tenant's virtual addresses: wildcard and loopback binds land on the first of the
    /// family, loopback connects reach it. Empty: binds and connects as asked.
    pub addresses: Vec<std::net::IpAddr>,
    /// The address the tenant's connections leave from when it has no `addresses` (an NSM in a
    /// namespace of its own gives each tenant one, to tell their traffic apart).
    pub source: Option<std::net::IpAddr>,
    /// Other tenants' addresses (and private loopbacks), which this tenant cannot reach.
    pub foreign: Vec<std::net::IpAddr>,
    /// A private loopback address (an isolated guest of a tenant without `addresses`): loopback
    /// and wildcard binds land on it and loopback connects reach it, as in a network namespace
    /// whose only interface is its own loopback; the host's 127.0.0.1 is out of reach.
    #[serde(default)]
    pub loopback: Option<std::net::IpAddr>,
    /// Sockets the tenant may hold open in this NSM at once.
    pub max_sockets: Option<u32>,
    /// Port ranges (inclusive) the tenant may listen on; None: any.
    pub listen_ports: Option<Vec<(u16, u16)>>,
    /// Bits per second the tenant may send, and the burst in bytes; None: no limit.
    pub rate: Option<(u64, u64)>,
    /// Connections between guests of this NSM take the co-located short cut (D4) when both
    /// tenants allow it.
    #[serde(default = "yes")]
    pub colocate: bool,
    /// The tenant's share of the NSM's CPU relative to other tenants' under the `fair`
    /// scheduler.
    #[serde(default = "one")]
    pub cpu_weight: u32,
    /// At most this many cores of the NSM's CPU for the tenant; None: no cap.
    #[serde(default)]
    pub cpu_limit: Option<f64>,
}

impl TenantPolicy {
    /// Whether its limits (rate, sockets, CPU cap) are kept in one place, which keeps all the
    /// tenant's attachments on one executor.
    pub fn pinned(&self) -> bool {
        self.rate.is_some() || self.max_sockets.is_some() || self.cpu_limit.is_some()
    }
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy {
            addresses: vec![],
            source: None,
            foreign: vec![],
            loopback: None,
            max_sockets: None,
            listen_ports: None,
            rate: None,
            colocate: true,
            cpu_weight: 1,
            cpu_limit: None,
        }
    }
}

/// One connection (socket) as an NSM sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnInfo {
    pub tenant: String,
    pub nsm: String,
    pub attachment: u64,
    pub pid: i32,
    pub proto: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    /// The stack's kind ("kernel", "user": the stack carries the bytes) or "colocated" (the NSM's pipe does).
    #[serde(default)]
    pub path: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rtt_us: u32,
    pub cwnd: u32,
    pub retrans: u32,
    /// The stack's estimate of the connection's delivery rate, bytes per second (TCP_INFO).
    pub delivery_rate: u64,
    /// Time the NSM spent running this socket's requests, microseconds.
    #[serde(default)]
    pub cpu_us: u64,
}

/// One tenant's totals in one NSM since the NSM started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantTotals {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub conns_total: u64,
    /// Attachments refused for breaking the ABI.
    pub violations: u64,
    /// Operations the tenant's policy refused (binds, connects, listens, sockets over the limit).
    pub refused: u64,
    /// Times one of its sockets had to wait for its rate limit's tokens.
    #[serde(default)]
    pub throttled: u64,
    /// CPU the NSM spent for the tenant (its tasks' share of the NSM's CPU), seconds.
    #[serde(default)]
    pub nsm_cpu_seconds: f64,
}

impl TenantTotals {
    /// Adds another part of the tenant's totals (another executor's, another NSM's).
    pub fn add(&mut self, t: &TenantTotals) {
        self.bytes_in += t.bytes_in;
        self.bytes_out += t.bytes_out;
        self.conns_total += t.conns_total;
        self.violations += t.violations;
        self.refused += t.refused;
        self.throttled += t.throttled;
        self.nsm_cpu_seconds += t.nsm_cpu_seconds;
    }
}

/// An NSM's telemetry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NsmStats {
    pub nsm: String,
    pub kind: String,
    pub pid: u32,
    pub congestion: String,
    /// The scheduler ordering the NSM's tasks (fifo, fair, latency).
    #[serde(default)]
    pub scheduler: String,
    /// Executor threads running tasks now.
    #[serde(default)]
    pub executors: u32,
    /// Old processes of a user NSM's upgrade still serving the attachments they had (drain.rs).
    #[serde(default)]
    pub draining: Vec<u32>,
    /// Connections those old processes relay for guests the new process serves now (their TCP
    /// state stays in the old process's smoltcp until they close).
    #[serde(default)]
    pub relayed: usize,
    /// CPU the NSM's executors used, seconds: the tenants' `nsm_cpu_seconds` plus
    /// `overhead_cpu_seconds`.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// CPU used while no tenant's task ran (waking, polling with nothing to do), seconds.
    #[serde(default)]
    pub overhead_cpu_seconds: f64,
    /// Cores its executors kept busy since the stats before (over at least 0.1 s).
    #[serde(default)]
    pub load: f64,
    pub attachments: usize,
    /// Bytes the NSM received from the network for guests since it started.
    pub bytes_in: u64,
    /// Bytes the NSM sent to the network for guests since it started.
    pub bytes_out: u64,
    /// Connections established (accepted or connected) since it started.
    pub conns_total: u64,
    /// Of those, connects that took the co-located short cut.
    #[serde(default)]
    pub conns_colocated: u64,
    /// Attachments refused for breaking the ABI since it started.
    pub violations: u64,
    /// Totals per tenant served.
    pub tenants: std::collections::BTreeMap<String, TenantTotals>,
    pub conns: Vec<ConnInfo>,
}

impl NsmStats {
    /// Adds another executor's stats of the same NSM to these.
    pub fn absorb(&mut self, o: NsmStats) {
        self.executors += o.executors;
        self.draining.extend(o.draining);
        self.relayed += o.relayed;
        self.cpu_seconds += o.cpu_seconds;
        self.overhead_cpu_seconds += o.overhead_cpu_seconds;
        self.load += o.load;
        self.attachments += o.attachments;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.conns_total += o.conns_total;
        self.conns_colocated += o.conns_colocated;
        self.violations += o.violations;
        for (name, t) in o.tenants {
            self.tenants.entry(name).or_default().add(&t);
        }
        self.conns.extend(o.conns);
    }
}
