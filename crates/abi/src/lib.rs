//! The NetKernel ABI: the layout of a region (the shared memory of one attachment) and of the
//! nqe, the fixed-size record a guest hands its NSM. No I/O lives here; both sides compile the
//! same definitions, and ServiceLib validates every field a guest can write with the pure
//! functions of [`validate`] (DESIGN.md D2).
//!
//! ```text
//! offset 0            RegionHeader (one page): magic, version, sizes, offsets, state, flags
//! ring_off            job queue: SPSC ring of nqe indices, guest -> NSM
//! nqe_off             nqe table: NQE_COUNT x Nqe; an nqe's state word is its completion
//! slot_off            event table: SLOT_COUNT x Slot, readiness of each socket, NSM -> guest
//! guest_off           guest table: SLOT_COUNT x GuestSock, the guest's own per-socket state
//! pool_off            buffer pool: data referenced by nqe.buf_off / nqe.buf_len
//! ```
//! See docs/ABI.md for the protocol.
#![forbid(unsafe_code)]

pub mod validate;

use core::sync::atomic::{AtomicU32, AtomicU64};

/// "NETKRNL" plus a format byte, little endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"NETKRNL1");
/// Bumped on any incompatible change of this file.
pub const ABI_VERSION: u32 = 4;

/// Number of nqes (and job ring entries); a power of two.
pub const NQE_COUNT: u32 = 64;
const _: () = assert!(NQE_COUNT <= 64, "guest_free_nqes is one u64");
/// Bytes of buffer pool that belong to each nqe by convention (the guest may reference any
/// part of the pool; ServiceLib only checks bounds).
pub const BUF_SIZE: u32 = 256 * 1024;
/// Socket slots per attachment: the most sockets one guest process can hold open.
pub const SLOT_COUNT: u32 = 16384;
/// Regions are sized in units of this so that 2 MiB hugetlb pages can back them.
pub const REGION_ALIGN: u64 = 2 * 1024 * 1024;
/// Bytes of sockaddr an nqe carries: sizeof(struct sockaddr_storage).
pub const ADDR_MAX: usize = 128;

/// `RegionHeader::state`: the NSM serves this region.
pub const STATE_LIVE: u32 = 1;
/// `RegionHeader::state`: the NSM serving this region died or dropped the guest; every socket in
/// it is gone (guests report ECONNRESET) and new sockets need a new attachment.
pub const STATE_DEAD: u32 = 2;

/// The first page of a region. Offsets are from the start of the region.
#[repr(C)]
pub struct RegionHeader {
    pub magic: u64,
    pub abi_version: u32,
    pub header_size: u32,
    pub region_size: u64,
    pub nqe_count: u32,
    pub nqe_size: u32,
    pub slot_count: u32,
    pub buf_size: u32,
    pub ring_off: u64,
    pub nqe_off: u64,
    pub slot_off: u64,
    pub guest_off: u64,
    pub pool_off: u64,
    pub pool_size: u64,
    pub attachment_id: u64,
    /// Guest-owned: bitmap of free nqes, shared by the guest's threads and forked children.
    /// ServiceLib never reads it.
    pub guest_free_nqes: AtomicU64,
    /// Guest-owned: serialises the guest's producers of the job queue; holds the locker's pid, so
    /// a lock whose holder died can be taken over. ServiceLib never reads it.
    pub guest_push_lock: AtomicU32,
    /// Guest-owned: bumped each time an nqe is freed; the futex word a guest thread sleeps on
    /// while every nqe is in flight. ServiceLib never reads it.
    pub guest_nqe_freed: AtomicU32,
    /// Guest-owned: threads sleeping on `guest_nqe_freed`; a freer wakes only while non-zero.
    pub guest_nqe_waiters: AtomicU32,
    /// The pid of the NSM process serving the region (written by the NSM when it takes the
    /// attachment): the guest watches it with a pidfd, so a dead NSM is noticed even when no
    /// engine is left to mark the region dead.
    pub nsm_pid: AtomicU32,
    /// Guest-owned: nqes submitted without waiting (asynchronous sends), reclaimed by the guest
    /// once DONE. ServiceLib never reads it.
    pub guest_async_nqes: AtomicU64,
    /// STATE_LIVE or STATE_DEAD; written by the engine and NSM, read by the guest.
    pub state: AtomicU32,
    /// Guest-owned: the next holder id to give a new process (`Op::Share`); 0 is the process
    /// that attached.
    pub guest_next_holder: AtomicU32,
    _pad0: [u8; 56],
    /// Non-zero while the NSM sleeps in epoll: the guest rings the NSM doorbell only then.
    pub nsm_sleeping: AtomicU32,
    _pad1: [u8; 60],
    /// Number of guest threads sleeping in poll/select/epoll on NetKernel sockets: the NSM
    /// rings the guest doorbell after a batch of slot updates only while it is non-zero.
    pub bell_waiters: AtomicU32,
    _pad2: [u8; 60],
}

/// The job queue's indices, each on its own cache line. Followed by `NQE_COUNT` u32 entries.
#[repr(C)]
pub struct RingHeader {
    /// Next entry the consumer (NSM) reads. Written only by the NSM.
    pub head: AtomicU32,
    _pad0: [u8; 60],
    /// Next entry the producer (guest) writes. Written only by the guest.
    pub tail: AtomicU32,
    _pad1: [u8; 60],
}

/// `Nqe::state` values. The guest owns an nqe while it is FREE or DONE.
pub mod nqe_state {
    pub const FREE: u32 = 0;
    pub const SUBMITTED: u32 = 1;
    pub const DONE: u32 = 2;
    /// Or'ed into SUBMITTED by a guest thread about to futex-wait on the state word; the NSM
    /// issues a futex wake only when it sees it.
    pub const WAITER: u32 = 0x100;
}

/// NetKernel queue element: one socket operation and, once DONE, its result.
#[repr(C)]
pub struct Nqe {
    /// See [`nqe_state`]; the futex word a guest thread waits on for completion.
    pub state: AtomicU32,
    /// An [`Op`] as u32.
    pub op: u32,
    /// Socket slot index the operation applies to.
    pub sock: u32,
    /// Op-specific: MSG_* flags, shutdown how, listen backlog, accept4 flags.
    pub flags: u32,
    /// Op-specific: domain, level, ...
    pub arg0: u64,
    /// Op-specific: type, optname, ...
    pub arg1: u64,
    /// Offset of the op's data in the region; must lie inside the buffer pool.
    pub buf_off: u64,
    /// Length of the op's data.
    pub buf_len: u32,
    /// Length of the sockaddr in `addr` (in: bind/connect/sendto; out: accept/getsockname/...).
    pub addr_len: u32,
    /// Result: >= 0 on success (bytes, new socket slot, ...), or -errno as Linux returns it.
    pub result: i64,
    /// Secondary result: the slot's event sequence when the op completed.
    pub seq: u32,
    /// The submitting process's holder id (see `Op::Share`): whose reference a `Close` drops,
    /// who holds a socket that `Socket` or `Accept` creates.
    pub holder: u32,
    pub addr: [u8; ADDR_MAX],
}

/// One socket's readiness as the NSM last saw it. Written by the NSM, read by the guest.
#[repr(C)]
pub struct Slot {
    /// poll(2) bits (POLLIN, POLLOUT, POLLERR, POLLHUP, POLLRDHUP, POLLPRI) of the socket.
    pub mask: AtomicU32,
    /// Bumped on every wakeup the stack reports for the socket; the futex word for blocking
    /// calls and the edge counter for EPOLLET.
    pub seq: AtomicU32,
    /// Guest threads futex-waiting on `seq`; the NSM wakes only when non-zero.
    pub waiters: AtomicU32,
    /// Bytes of asynchronous sends the NSM holds because the stack has not taken them yet.
    /// While non-zero the NSM clears POLLOUT from `mask`.
    pub queued: AtomicU32,
}

/// Guest-owned state of one socket, in the region so that every process sharing the
/// attachment (after fork) sees the same: like the kernel's open file description. ServiceLib
/// never reads it. (Which processes hold the socket is the NSM's to know: see `Op::Share`.)
#[repr(C)]
pub struct GuestSock {
    /// GuestLib's flags (non-blocking, stream, listening, ...).
    pub flags: AtomicU32,
    /// Bumped each time the slot is given to a new socket.
    pub gen: AtomicU32,
    /// SO_RCVTIMEO and SO_SNDTIMEO in microseconds; 0: none.
    pub rcvtimeo_us: AtomicU64,
    pub sndtimeo_us: AtomicU64,
}

/// Or'ed into `Nqe::flags` of an `Op::Send`: the guest does not wait for the result. The NSM
/// queues what the stack does not take at once and sends it, in order, as the stack allows; an
/// error is reported by the socket's next call, as the kernel reports a pending socket error.
pub const SEND_ASYNC: u32 = 1 << 31;

/// Flag of an Op::Connect nqe: the caller waits for the outcome anyway, so a connect the NSM
/// completes at once (a co-located one) answers 0 rather than EINPROGRESS and a second connect.
pub const CONNECT_BLOCKING: u32 = 1;

/// `Op::Ioctl` request 0 (no ioctl has it): a readiness refresh. The NSM completes it only
/// after it has run every nqe queued before it (of every attachment) and published what its
/// stack reported meanwhile, so a guest sees what a loopback peer just sent, as Linux, which
/// delivers loopback synchronously, shows it. Result 0; an NSM without it answers ENOTTY.
pub const IOCTL_REFRESH: u64 = 0;

/// Or'ed into `Op::Recv`'s `arg0`: the guest wants ancillary data and the message flags, as
/// recvmsg(2) returns them. The low 32 bits of `arg0` are the caller's control buffer size
/// (at most [`CONTROL_MAX`]). The NSM writes a [`RecvControl`] header at `buf_off + buf_len`
/// followed by the control messages, all of which must lie in the buffer pool.
pub const RECV_CONTROL: u64 = 1 << 32;
/// Or'ed into `Op::Send`'s `arg0`: control messages (sendmsg's msg_control) follow the data.
/// The low 32 bits of `arg0` are their length (at most [`CONTROL_MAX`]); they lie at
/// `buf_off + buf_len`, in the buffer pool.
pub const SEND_CONTROL: u64 = 1 << 32;
/// The largest control buffer a Recv or Send carries.
pub const CONTROL_MAX: u32 = 4096;

/// What the NSM writes after a Recv's data when RECV_CONTROL is set: the length of the control
/// messages that follow (recvmsg's msg_controllen) and recvmsg's msg_flags (MSG_CTRUNC,
/// MSG_OOB, MSG_TRUNC).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RecvControl {
    pub len: u32,
    pub flags: u32,
}

/// A bit of `Slot::mask` that is no poll event: the socket's next byte is its urgent byte
/// (SIOCATMARK), which a receive skips (unless SO_OOBINLINE) even when nothing else is there
/// to read, so a receive must reach the stack although POLLIN is clear. GuestLib never reports
/// it to the application.
pub const MASK_AT_MARK: u32 = 1 << 16;

/// Socket operations a guest can request.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// arg0 = domain, arg1 = type (without SOCK_NONBLOCK/SOCK_CLOEXEC), flags = protocol.
    Socket = 1,
    /// addr/addr_len = local address.
    Bind = 2,
    /// flags = backlog.
    Listen = 3,
    /// flags = SOCK_* for the new socket (ignored by the NSM); out: result = new slot, addr.
    Accept = 4,
    /// addr/addr_len = peer. Non-blocking: EINPROGRESS then SO_ERROR, as Linux.
    Connect = 5,
    /// buf = data, flags = MSG_*, addr optional (sendto).
    Send = 6,
    /// buf = space, flags = MSG_*; out: addr (recvfrom). arg0 = RECV_CONTROL | capacity:
    /// ancillary data and flags after the data (RecvControl).
    Recv = 7,
    /// flags = how.
    Shutdown = 8,
    Close = 9,
    /// arg0 = level, arg1 = optname, buf = value (in/out), buf_len = optlen; result = new optlen.
    GetSockOpt = 10,
    /// arg0 = level, arg1 = optname, buf = value.
    SetSockOpt = 11,
    GetSockName = 12,
    GetPeerName = 13,
    /// arg1 = ioctl request (FIONREAD, SIOCOUTQ, SIOCATMARK, IOCTL_REFRESH); result = value.
    Ioctl = 14,
    /// Name resolution by the provider. In: buf = node NUL service NUL (service may be empty),
    /// arg0 = ai_family, arg1 = ai_socktype, flags = ai_flags. Out: buf = `result` entries of
    /// RESOLVED_SIZE bytes (family u16, socktype u16, protocol u16, addrlen u16, sockaddr[28]);
    /// or result = RESOLVE_EAI_BASE + EAI_* code (negative). `sock` is ignored.
    /// With RESOLVE_REVERSE in flags, a reverse lookup: in: buf = numeric address NUL,
    /// arg0 = its family; out: buf = the host name, result = its length (no NUL).
    Resolve = 15,
    /// arg0 = the holder id of a new process (a child about to be forked or spawned, its id
    /// taken from `RegionHeader::guest_next_holder`), which also holds sockets the submitting
    /// holder holds: all of them with SHARE_ALL in flags, else those whose slots buf lists
    /// (u32 each). They are released when the process the engine ties to that id (`hold`,
    /// `join`) exits. May arrive before or after that tie. `sock` is ignored.
    Share = 16,
    /// arg0 = a holder id from `Share` whose process will not exist (the fork failed): its
    /// references are dropped. `sock` is ignored.
    Unshare = 17,
}

/// `Op::Share` flag: the new process holds every socket the submitting holder holds (fork).
pub const SHARE_ALL: u32 = 1;

/// Bytes of one resolved address in an `Op::Resolve` answer.
pub const RESOLVED_SIZE: usize = 36;
/// Or'ed into `Op::Resolve`'s flags: a reverse lookup (address to name).
pub const RESOLVE_REVERSE: u32 = 1 << 31;
/// `Op::Resolve` failures are reported as this plus the (negative) EAI_* code.
pub const RESOLVE_EAI_BASE: i64 = -1_000_000;

impl Op {
    /// Decodes an op a guest wrote; `None` for anything else (an ABI violation).
    pub fn from_u32(v: u32) -> Option<Op> {
        Some(match v {
            1 => Op::Socket,
            2 => Op::Bind,
            3 => Op::Listen,
            4 => Op::Accept,
            5 => Op::Connect,
            6 => Op::Send,
            7 => Op::Recv,
            8 => Op::Shutdown,
            9 => Op::Close,
            10 => Op::GetSockOpt,
            11 => Op::SetSockOpt,
            12 => Op::GetSockName,
            13 => Op::GetPeerName,
            14 => Op::Ioctl,
            15 => Op::Resolve,
            16 => Op::Share,
            17 => Op::Unshare,
            _ => return None,
        })
    }
}

/// Where everything lives in a region of the default geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ring_off: u64,
    pub nqe_off: u64,
    pub slot_off: u64,
    pub guest_off: u64,
    pub pool_off: u64,
    pub pool_size: u64,
    pub region_size: u64,
}

const fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// The layout every region of this ABI version uses.
    pub const fn standard() -> Layout {
        let header = 4096u64;
        let ring_off = header;
        let ring_size = core::mem::size_of::<RingHeader>() as u64 + 4 * NQE_COUNT as u64;
        let nqe_off = align_up(ring_off + ring_size, 64);
        let slot_off = align_up(nqe_off + NQE_COUNT as u64 * core::mem::size_of::<Nqe>() as u64, 64);
        let guest_off = align_up(slot_off + SLOT_COUNT as u64 * core::mem::size_of::<Slot>() as u64, 64);
        let pool_off = align_up(guest_off + SLOT_COUNT as u64 * core::mem::size_of::<GuestSock>() as u64, 4096);
        let pool_size = NQE_COUNT as u64 * BUF_SIZE as u64;
        let region_size = align_up(pool_off + pool_size, REGION_ALIGN);
        Layout { ring_off, nqe_off, slot_off, guest_off, pool_off, pool_size, region_size }
    }

    /// Whether `[off, off+len)` lies inside the buffer pool. The guest chose both numbers.
    pub fn pool_contains(&self, off: u64, len: u32) -> bool {
        off >= self.pool_off && off.checked_add(len as u64).is_some_and(|end| end <= self.pool_off + self.pool_size)
    }

    /// Offset of nqe `i`'s conventional buffer.
    pub const fn buf_off(&self, i: u32) -> u64 {
        self.pool_off + i as u64 * BUF_SIZE as u64
    }
}

/// Why a header is not one this side can use (see [`validate::HeaderSnapshot::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic(u64),
    BadVersion(u32),
    BadGeometry(&'static str),
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HeaderError::BadMagic(m) => write!(f, "region magic {m:#x} is not NetKernel's"),
            HeaderError::BadVersion(v) => {
                write!(f, "region ABI version {v}, this build speaks {ABI_VERSION}")
            }
            HeaderError::BadGeometry(what) => write!(f, "region geometry differs: {what}"),
        }
    }
}

impl RegionHeader {
    /// Fills in a fresh header for the standard layout (the engine does this once per region).
    pub fn init(&mut self, attachment_id: u64) {
        let l = Layout::standard();
        self.magic = MAGIC;
        self.abi_version = ABI_VERSION;
        self.header_size = core::mem::size_of::<RegionHeader>() as u32;
        self.region_size = l.region_size;
        self.nqe_count = NQE_COUNT;
        self.nqe_size = core::mem::size_of::<Nqe>() as u32;
        self.slot_count = SLOT_COUNT;
        self.buf_size = BUF_SIZE;
        self.ring_off = l.ring_off;
        self.nqe_off = l.nqe_off;
        self.slot_off = l.slot_off;
        self.guest_off = l.guest_off;
        self.pool_off = l.pool_off;
        self.pool_size = l.pool_size;
        self.attachment_id = attachment_id;
        self.state = AtomicU32::new(STATE_LIVE);
        self.guest_free_nqes = AtomicU64::new(if NQE_COUNT == 64 { u64::MAX } else { (1u64 << NQE_COUNT) - 1 });
        self.guest_next_holder = AtomicU32::new(1);
    }
}

const _: () = {
    assert!(core::mem::size_of::<RegionHeader>() <= 4096);
    assert!(core::mem::size_of::<Nqe>() == 192);
    assert!(core::mem::size_of::<Slot>() == 16);
    assert!(core::mem::size_of::<GuestSock>() == 24);
    assert!(core::mem::size_of::<RingHeader>() == 128);
    assert!(NQE_COUNT.is_power_of_two());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_layout_is_ordered_and_aligned() {
        let l = Layout::standard();
        assert!(
            l.ring_off < l.nqe_off && l.nqe_off < l.slot_off && l.slot_off < l.guest_off && l.guest_off < l.pool_off
        );
        assert_eq!(l.pool_off % 4096, 0);
        assert_eq!(l.region_size % REGION_ALIGN, 0);
        assert!(l.pool_off + l.pool_size <= l.region_size);
    }

    #[test]
    fn pool_bounds_reject_outside_and_overflow() {
        let l = Layout::standard();
        assert!(l.pool_contains(l.pool_off, BUF_SIZE));
        assert!(l.pool_contains(l.pool_off + l.pool_size - 1, 1));
        assert!(!l.pool_contains(l.pool_off + l.pool_size - 1, 2));
        assert!(!l.pool_contains(l.pool_off - 1, 1));
        assert!(!l.pool_contains(u64::MAX - 2, 10));
        assert!(!l.pool_contains(0, 16));
    }

    #[test]
    fn op_roundtrip_and_garbage() {
        for v in 1..=17 {
            assert_eq!(Op::from_u32(v).map(|o| o as u32), Some(v));
        }
        assert_eq!(Op::from_u32(0), None);
        assert_eq!(Op::from_u32(18), None);
        assert_eq!(Op::from_u32(u32::MAX), None);
    }
}
