//! Validation of everything a guest writes into its region, as pure functions over plain copies
//! (DESIGN.md D2): an nqe ([`validate`]), the region header ([`HeaderSnapshot::validate`]) and
//! the job queue's indices ([`queue_len`], [`nqe_index`]).
//!
//! The NSM copies the shared fields out once (volatile reads, in netkernel-ring) and decides
//! from the copy alone, so what it checked is what it runs; the decisions themselves touch no
//! memory a guest can change, which is what lets them be fuzzed and property-tested.
//!
//! [`validate`] decodes each op's arguments once into named, typed fields ([`Call`]). Integer
//! arguments the kernel takes as `int` (domain, type, level, option name, MSG_* flags, ...) are
//! the low 32 bits of the field, as the kernel's own syscall entry truncates them; their values
//! are the stack's to judge, not a violation.

use crate::{HeaderError, Layout, Nqe, Op, RegionHeader, ABI_VERSION, ADDR_MAX, BUF_SIZE, CONNECT_BLOCKING, MAGIC};
use crate::{RecvControl, CONTROL_MAX, NQE_COUNT, RECV_CONTROL, SEND_ASYNC, SEND_CONTROL, SHARE_ALL, SLOT_COUNT};

/// The request fields of an nqe as the guest wrote them, copied out of shared memory once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NqeSnapshot {
    pub op: u32,
    pub sock: u32,
    pub flags: u32,
    pub arg0: u64,
    pub arg1: u64,
    pub buf_off: u64,
    pub buf_len: u32,
    pub addr_len: u32,
    pub addr: [u8; ADDR_MAX],
    pub holder: u32,
}

impl Default for NqeSnapshot {
    /// All zero: what GuestLib starts every request from.
    fn default() -> Self {
        NqeSnapshot {
            op: 0,
            sock: 0,
            flags: 0,
            arg0: 0,
            arg1: 0,
            buf_off: 0,
            buf_len: 0,
            addr_len: 0,
            addr: [0; ADDR_MAX],
            holder: 0,
        }
    }
}

/// A socket address an nqe carries: at most [`ADDR_MAX`] bytes, as the guest wrote them (what
/// they say is the stack's and the tenant policy's to judge).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SockAddr {
    bytes: [u8; ADDR_MAX],
    len: u8,
}

const _: () = assert!(ADDR_MAX <= u8::MAX as usize);

impl SockAddr {
    /// No address (`addr_len` 0).
    pub const NONE: SockAddr = SockAddr { bytes: [0; ADDR_MAX], len: 0 };

    /// The first `len` bytes of `addr`; None when `len` exceeds [`ADDR_MAX`].
    pub fn new(addr: &[u8]) -> Option<SockAddr> {
        let mut bytes = [0; ADDR_MAX];
        bytes.get_mut(..addr.len())?.copy_from_slice(addr);
        Some(SockAddr { bytes, len: addr.len() as u8 })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl core::fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SockAddr({:?})", self.as_bytes())
    }
}

/// Bytes of the buffer pool an op reads or writes: `[off, off + len)`. Only [`validate`] (or
/// [`PoolBuf::new`]) makes one, after checking that a non-empty buffer lies inside the pool, so
/// holding one is the proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBuf {
    off: u64,
    len: u32,
}

impl PoolBuf {
    /// The empty buffer.
    pub const EMPTY: PoolBuf = PoolBuf { off: 0, len: 0 };

    /// `[off, off + len)` if it is empty or lies inside `layout`'s pool.
    pub fn new(layout: &Layout, off: u64, len: u32) -> Option<PoolBuf> {
        (len == 0 || layout.pool_contains(off, len)).then_some(PoolBuf { off, len })
    }

    pub fn off(&self) -> u64 {
        self.off
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A validated nqe: the socket slot it names, the process that submitted it and the operation
/// with its decoded arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The slot the op applies to. Not checked here: a slot that is not open is `-EBADF` for
    /// the op, not a violation. Every completion reports `slots[sock % SLOT_COUNT].seq`.
    pub sock: u32,
    /// The submitting process's holder id (see `Op::Share`), as the guest wrote it: an id the
    /// NSM does not know holds nothing, which is the NSM's to answer, not a violation.
    pub holder: u32,
    pub call: Call,
}

/// One operation and its arguments (docs/ABI.md section 4 says which nqe field carries which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `arg0` domain, `arg1` type, `flags` protocol.
    Socket {
        domain: i32,
        ty: i32,
        protocol: i32,
    },
    Bind {
        addr: SockAddr,
    },
    /// `flags` backlog.
    Listen {
        backlog: i32,
    },
    /// `flags` (SOCK_* of the new socket) is ignored, as ABI section 4 says.
    Accept,
    /// `flags` bit [`CONNECT_BLOCKING`]: the caller waits for the outcome.
    Connect {
        addr: SockAddr,
        blocking: bool,
    },
    /// `flags` MSG_* without [`SEND_ASYNC`], which is `nowait`; `to` empty unless a sendto.
    /// `arg0` = [`SEND_CONTROL`] | length: `control` bytes of control messages follow `buf`.
    Send {
        buf: PoolBuf,
        flags: i32,
        nowait: bool,
        to: SockAddr,
        control: Option<u32>,
    },
    /// `arg0` = [`RECV_CONTROL`] | capacity: `control` is the caller's control buffer size;
    /// a [`RecvControl`] and that many bytes follow `buf` in the pool.
    Recv {
        buf: PoolBuf,
        flags: i32,
        control: Option<u32>,
    },
    /// `flags` how.
    Shutdown {
        how: i32,
    },
    Close,
    /// `arg0` level, `arg1` option name, `buf` the value (in/out).
    GetSockOpt {
        level: i32,
        name: i32,
        buf: PoolBuf,
    },
    SetSockOpt {
        level: i32,
        name: i32,
        buf: PoolBuf,
    },
    GetSockName,
    GetPeerName,
    /// `arg1` the request.
    Ioctl {
        request: u64,
    },
    /// `buf` the query, `arg0` ai_family, `arg1` ai_socktype, `flags` ai_flags (with
    /// RESOLVE_REVERSE for a reverse lookup).
    Resolve {
        query: PoolBuf,
        family: i32,
        socktype: i32,
        flags: i32,
    },
    /// The new process with holder id `holder` (`arg0`) will hold the submitter's sockets: all
    /// of them (`flags` [`SHARE_ALL`]), else the slots `slots` lists (u32 each).
    Share {
        holder: u64,
        all: bool,
        slots: PoolBuf,
    },
    /// `arg0` a holder id from `Share` whose process will not exist.
    Unshare {
        holder: u64,
    },
}

impl Call {
    /// The opcode this call travels as.
    pub fn op(&self) -> Op {
        match self {
            Call::Socket { .. } => Op::Socket,
            Call::Bind { .. } => Op::Bind,
            Call::Listen { .. } => Op::Listen,
            Call::Accept => Op::Accept,
            Call::Connect { .. } => Op::Connect,
            Call::Send { .. } => Op::Send,
            Call::Recv { .. } => Op::Recv,
            Call::Shutdown { .. } => Op::Shutdown,
            Call::Close => Op::Close,
            Call::GetSockOpt { .. } => Op::GetSockOpt,
            Call::SetSockOpt { .. } => Op::SetSockOpt,
            Call::GetSockName => Op::GetSockName,
            Call::GetPeerName => Op::GetPeerName,
            Call::Ioctl { .. } => Op::Ioctl,
            Call::Resolve { .. } => Op::Resolve,
            Call::Share { .. } => Op::Share,
            Call::Unshare { .. } => Op::Unshare,
        }
    }

    /// The pool buffer the op reads or writes (empty for ops without one).
    pub fn buf(&self) -> PoolBuf {
        match *self {
            Call::Send { buf, .. }
            | Call::Recv { buf, .. }
            | Call::GetSockOpt { buf, .. }
            | Call::SetSockOpt { buf, .. }
            | Call::Resolve { query: buf, .. }
            | Call::Share { slots: buf, .. } => buf,
            _ => PoolBuf::EMPTY,
        }
    }
}

/// Why a guest lost its attachment: it broke the ABI. Each message names the field at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The job queue's `tail` claims more entries than the queue holds.
    Queue(Corrupt),
    /// A job queue entry names an nqe past the end of the nqe table.
    NqeIndex(u32),
    /// An nqe's `op` is no opcode.
    Opcode { nqe: u32, op: u32 },
    /// An nqe's `buf_off`/`buf_len` reach outside the buffer pool.
    Buffer { nqe: u32, off: u64, len: u32 },
    /// An nqe's `addr_len` exceeds sockaddr_storage.
    AddrLen { nqe: u32, len: u32 },
    /// Asynchronous sends past what any guest following the protocol can have in flight.
    SendFlood { nqe: u32 },
}

/// Most bytes of asynchronous sends a guest following the protocol can have queued on one
/// socket: every nqe in flight with a whole buffer.
pub const ASYNC_QUEUE_MAX: usize = NQE_COUNT as usize * BUF_SIZE as usize;

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Violation::Queue(c) => write!(f, "{c}"),
            Violation::NqeIndex(i) => {
                write!(f, "job queue entry names nqe {i}, past the end ({NQE_COUNT})")
            }
            Violation::Opcode { nqe, op } => write!(f, "nqe {nqe} field op: unknown opcode {op}"),
            Violation::Buffer { nqe, off, len } => {
                let l = Layout::standard();
                write!(
                    f,
                    "nqe {nqe} fields buf_off/buf_len: buffer [{off:#x}, +{len}) lies outside the buffer pool \
                     [{:#x}, {:#x})",
                    l.pool_off,
                    l.pool_off + l.pool_size
                )
            }
            Violation::AddrLen { nqe, len } => {
                write!(f, "nqe {nqe} field addr_len: address length {len} > {ADDR_MAX}")
            }
            Violation::SendFlood { nqe } => {
                write!(f, "nqe {nqe} queues asynchronous sends past {ASYNC_QUEUE_MAX} bytes")
            }
        }
    }
}

/// Checks an nqe's request fields and decodes them; `idx` is the nqe's index, for the message.
/// The checks run in the order docs/ABI.md section 9.1 lists them: opcode, address length,
/// buffer (every op's buffer, used or not: a guest following the protocol never writes a bad
/// one).
pub fn validate(idx: u32, s: &NqeSnapshot, layout: &Layout) -> Result<Request, Violation> {
    let op = Op::from_u32(s.op).ok_or(Violation::Opcode { nqe: idx, op: s.op })?;
    let addr = s
        .addr
        .get(..s.addr_len as usize)
        .and_then(SockAddr::new)
        .ok_or(Violation::AddrLen { nqe: idx, len: s.addr_len })?;
    let buf = PoolBuf::new(layout, s.buf_off, s.buf_len).ok_or(Violation::Buffer {
        nqe: idx,
        off: s.buf_off,
        len: s.buf_len,
    })?;
    // The kernel's int arguments: the low 32 bits (see the module comment).
    let (flags, arg0, arg1) = (s.flags as i32, s.arg0 as i32, s.arg1 as i32);
    let call = match op {
        Op::Socket => Call::Socket { domain: arg0, ty: arg1, protocol: flags },
        Op::Bind => Call::Bind { addr },
        Op::Listen => Call::Listen { backlog: flags },
        Op::Accept => Call::Accept,
        Op::Connect => Call::Connect { addr, blocking: s.flags & CONNECT_BLOCKING != 0 },
        Op::Send => {
            let control = control_after(idx, s, layout, SEND_CONTROL, 0)?;
            Call::Send {
                buf,
                flags: (s.flags & !SEND_ASYNC) as i32,
                nowait: s.flags & SEND_ASYNC != 0,
                to: addr,
                control,
            }
        }
        Op::Recv => Call::Recv { buf, flags, control: control_after(idx, s, layout, RECV_CONTROL, RECV_HEADER)? },
        Op::Shutdown => Call::Shutdown { how: flags },
        Op::Close => Call::Close,
        Op::GetSockOpt => Call::GetSockOpt { level: arg0, name: arg1, buf },
        Op::SetSockOpt => Call::SetSockOpt { level: arg0, name: arg1, buf },
        Op::GetSockName => Call::GetSockName,
        Op::GetPeerName => Call::GetPeerName,
        Op::Ioctl => Call::Ioctl { request: s.arg1 },
        Op::Resolve => Call::Resolve { query: buf, family: arg0, socktype: arg1, flags },
        Op::Share => Call::Share { holder: s.arg0, all: s.flags & SHARE_ALL != 0, slots: buf },
        Op::Unshare => Call::Unshare { holder: s.arg0 },
    };
    Ok(Request { sock: s.sock, holder: s.holder, call })
}

const RECV_HEADER: u32 = std::mem::size_of::<RecvControl>() as u32;

/// The control area `flag` in `arg0` announces (its size in the low 32 bits, at most
/// CONTROL_MAX): after the op's buffer, `header` + size bytes, all in the pool.
fn control_after(idx: u32, s: &NqeSnapshot, layout: &Layout, flag: u64, header: u32) -> Result<Option<u32>, Violation> {
    if s.arg0 & flag == 0 {
        return Ok(None);
    }
    let size = s.arg0 as u32;
    let off = s.buf_off.saturating_add(s.buf_len as u64);
    let len = header.saturating_add(size);
    if size > CONTROL_MAX || !layout.pool_contains(off, len) {
        return Err(Violation::Buffer { nqe: idx, off, len });
    }
    Ok(Some(size))
}

impl Request {
    /// The nqe fields that carry this request, as a guest writes them (fields an op does not
    /// use are zero). `validate` of the result gives the request back.
    pub fn encode(&self) -> NqeSnapshot {
        let mut s =
            NqeSnapshot { op: self.call.op() as u32, sock: self.sock, holder: self.holder, ..NqeSnapshot::default() };
        let int = |v: i32| v as u32;
        let long = |v: i32| v as u32 as u64;
        let put_addr = |s: &mut NqeSnapshot, a: &SockAddr| {
            s.addr[..a.as_bytes().len()].copy_from_slice(a.as_bytes());
            s.addr_len = a.as_bytes().len() as u32;
        };
        let put_buf = |s: &mut NqeSnapshot, b: PoolBuf| {
            s.buf_off = b.off;
            s.buf_len = b.len;
        };
        match self.call {
            Call::Socket { domain, ty, protocol } => {
                (s.arg0, s.arg1, s.flags) = (long(domain), long(ty), int(protocol));
            }
            Call::Bind { addr } => put_addr(&mut s, &addr),
            Call::Listen { backlog } => s.flags = int(backlog),
            Call::Connect { addr, blocking } => {
                put_addr(&mut s, &addr);
                s.flags = if blocking { CONNECT_BLOCKING } else { 0 };
            }
            Call::Send { buf, flags, nowait, to, control } => {
                put_buf(&mut s, buf);
                put_addr(&mut s, &to);
                s.flags = int(flags) | if nowait { SEND_ASYNC } else { 0 };
                s.arg0 = control.map_or(0, |len| SEND_CONTROL | len as u64);
            }
            Call::Recv { buf, flags, control } => {
                put_buf(&mut s, buf);
                s.flags = int(flags);
                s.arg0 = control.map_or(0, |cap| RECV_CONTROL | cap as u64);
            }
            Call::Shutdown { how } => s.flags = int(how),
            Call::GetSockOpt { level, name, buf } | Call::SetSockOpt { level, name, buf } => {
                put_buf(&mut s, buf);
                (s.arg0, s.arg1) = (long(level), long(name));
            }
            Call::Ioctl { request } => s.arg1 = request,
            Call::Resolve { query, family, socktype, flags } => {
                put_buf(&mut s, query);
                (s.arg0, s.arg1, s.flags) = (long(family), long(socktype), int(flags));
            }
            Call::Share { holder, all, slots } => {
                put_buf(&mut s, slots);
                s.arg0 = holder;
                s.flags = if all { SHARE_ALL } else { 0 };
            }
            Call::Unshare { holder } => s.arg0 = holder,
            Call::Accept | Call::Close | Call::GetSockName | Call::GetPeerName => {}
        }
        s
    }

    /// The slot whose sequence the completion reports.
    pub fn seq_slot(&self) -> u32 {
        self.sock % SLOT_COUNT
    }
}

/// The job queue's producer broke the protocol: its `tail` claims more entries than the queue
/// holds, counted from the consumer's own `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt {
    pub head: u32,
    pub tail: u32,
}

impl core::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "job queue corrupt: field tail = {} is {} entries past head = {} (at most {NQE_COUNT})",
            self.tail,
            self.tail.wrapping_sub(self.head),
            self.head
        )
    }
}

/// How many entries a queue of `capacity` holds, from the consumer's own `head` (never one read
/// back from shared memory) and the `tail` the producer published. Both run free and wrap.
pub fn queue_len(head: u32, tail: u32, capacity: u32) -> Result<u32, Corrupt> {
    let n = tail.wrapping_sub(head);
    if n > capacity {
        return Err(Corrupt { head, tail });
    }
    Ok(n)
}

/// A job queue entry as an nqe index.
pub fn nqe_index(entry: u32) -> Result<u32, Violation> {
    if entry >= NQE_COUNT {
        return Err(Violation::NqeIndex(entry));
    }
    Ok(entry)
}

/// The geometry fields of a region header, copied out once; `validate` decides from the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeaderSnapshot {
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
}

impl HeaderSnapshot {
    /// What `RegionHeader::init` writes: the standard layout of this ABI version.
    pub fn standard() -> HeaderSnapshot {
        let l = Layout::standard();
        HeaderSnapshot {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            header_size: core::mem::size_of::<RegionHeader>() as u32,
            region_size: l.region_size,
            nqe_count: NQE_COUNT,
            nqe_size: core::mem::size_of::<Nqe>() as u32,
            slot_count: SLOT_COUNT,
            buf_size: BUF_SIZE,
            ring_off: l.ring_off,
            nqe_off: l.nqe_off,
            slot_off: l.slot_off,
            guest_off: l.guest_off,
            pool_off: l.pool_off,
            pool_size: l.pool_size,
        }
    }

    /// Checks that the header describes exactly the standard layout of this ABI version, in a
    /// memfd of `mapped_len` bytes.
    pub fn validate(&self, mapped_len: u64) -> Result<Layout, HeaderError> {
        if self.magic != MAGIC {
            return Err(HeaderError::BadMagic(self.magic));
        }
        if self.abi_version != ABI_VERSION {
            return Err(HeaderError::BadVersion(self.abi_version));
        }
        let want = HeaderSnapshot::standard();
        let checks: [(bool, &'static str); 10] = [
            (self.header_size == want.header_size, "header_size"),
            (self.region_size == want.region_size, "region_size"),
            (self.region_size <= mapped_len, "region larger than its memfd"),
            (self.nqe_count == want.nqe_count, "nqe_count"),
            (self.nqe_size == want.nqe_size, "nqe_size"),
            (self.slot_count == want.slot_count, "slot_count"),
            (self.buf_size == want.buf_size, "buf_size"),
            (self.ring_off == want.ring_off && self.nqe_off == want.nqe_off, "ring/nqe offsets"),
            (
                self.slot_off == want.slot_off && self.pool_off == want.pool_off && self.guest_off == want.guest_off,
                "slot/guest/pool offsets",
            ),
            (self.pool_size == want.pool_size, "pool_size"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(HeaderError::BadGeometry(what)),
            None => Ok(Layout::standard()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::standard()
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let l = layout();
        let s = NqeSnapshot { op: 999, addr_len: 4096, buf_len: 64, ..NqeSnapshot::default() };
        assert_eq!(validate(3, &s, &l), Err(Violation::Opcode { nqe: 3, op: 999 }));
        let s = NqeSnapshot { op: Op::Send as u32, ..s };
        assert_eq!(validate(3, &s, &l), Err(Violation::AddrLen { nqe: 3, len: 4096 }));
        let s = NqeSnapshot { addr_len: 16, ..s };
        assert_eq!(validate(3, &s, &l), Err(Violation::Buffer { nqe: 3, off: 0, len: 64 }));
    }

    #[test]
    fn an_unused_buffer_is_still_checked_and_an_empty_one_never() {
        let l = layout();
        let bad = NqeSnapshot { op: Op::Bind as u32, buf_off: u64::MAX - 8, buf_len: 64, ..NqeSnapshot::default() };
        assert!(matches!(validate(0, &bad, &l), Err(Violation::Buffer { .. })));
        let empty = NqeSnapshot { buf_len: 0, ..bad };
        assert!(validate(0, &empty, &l).is_ok());
    }

    #[test]
    fn send_splits_async_from_the_msg_flags() {
        let l = layout();
        let s = NqeSnapshot {
            op: Op::Send as u32,
            sock: 7,
            flags: SEND_ASYNC | libc_msg_more(),
            buf_off: l.buf_off(2),
            buf_len: 100,
            ..NqeSnapshot::default()
        };
        let r = validate(0, &s, &l).unwrap();
        assert_eq!(r.sock, 7);
        let Call::Send { buf, flags, nowait, to, control } = r.call else { panic!("{r:?}") };
        assert_eq!(
            (buf.off(), buf.len(), flags, nowait, to, control),
            (l.buf_off(2), 100, libc_msg_more() as i32, true, SockAddr::NONE, None)
        );
        assert_eq!(validate(0, &r.encode(), &l), Ok(r));
    }

    #[test]
    fn control_areas_follow_the_buffer_inside_the_pool() {
        let l = Layout::standard();
        let recv = |off: u64, len: u32, arg0: u64| NqeSnapshot {
            op: Op::Recv as u32,
            buf_off: off,
            buf_len: len,
            arg0,
            ..NqeSnapshot::default()
        };
        let r = validate(0, &recv(l.buf_off(1), 1000, RECV_CONTROL | 64), &l).unwrap();
        assert!(matches!(r.call, Call::Recv { control: Some(64), .. }));
        assert_eq!(validate(0, &r.encode(), &l), Ok(r));
        // The header and the control bytes must fit in the pool too, at most CONTROL_MAX.
        let end = l.pool_off + l.pool_size;
        assert!(validate(0, &recv(end - 1000, 1000, RECV_CONTROL), &l).is_err());
        assert!(validate(0, &recv(l.buf_off(1), 0, RECV_CONTROL | (CONTROL_MAX as u64 + 1)), &l).is_err());
        let send = NqeSnapshot {
            op: Op::Send as u32,
            buf_off: end - 100,
            buf_len: 90,
            arg0: SEND_CONTROL | 11,
            ..NqeSnapshot::default()
        };
        assert_eq!(validate(3, &send, &l), Err(Violation::Buffer { nqe: 3, off: end - 10, len: 11 }));
    }

    /// MSG_MORE (the abi crate has no libc).
    fn libc_msg_more() -> u32 {
        0x8000
    }

    #[test]
    fn queue_indices() {
        assert_eq!(queue_len(0, 0, 64), Ok(0));
        assert_eq!(queue_len(u32::MAX, 63, 64), Ok(64));
        assert_eq!(queue_len(0, 65, 64), Err(Corrupt { head: 0, tail: 65 }));
        assert_eq!(queue_len(10, 9, 64), Err(Corrupt { head: 10, tail: 9 }));
        assert_eq!(nqe_index(63), Ok(63));
        assert_eq!(nqe_index(64), Err(Violation::NqeIndex(64)));
    }

    #[test]
    fn the_standard_header_validates_and_each_field_is_checked() {
        let good = HeaderSnapshot::standard();
        let len = layout().region_size;
        assert_eq!(good.validate(len), Ok(layout()));
        assert_eq!(good.validate(len - 1), Err(HeaderError::BadGeometry("region larger than its memfd")));
        assert_eq!(HeaderSnapshot { magic: 1, ..good }.validate(len), Err(HeaderError::BadMagic(1)));
        assert_eq!(HeaderSnapshot { abi_version: 2, ..good }.validate(len), Err(HeaderError::BadVersion(2)));
        assert_eq!(
            HeaderSnapshot { pool_off: 0, ..good }.validate(len),
            Err(HeaderError::BadGeometry("slot/guest/pool offsets"))
        );
    }

    #[test]
    fn messages_name_the_field() {
        assert!(Violation::Opcode { nqe: 1, op: 999 }.to_string().contains("field op: unknown opcode 999"));
        assert!(Violation::AddrLen { nqe: 1, len: 4096 }.to_string().contains("field addr_len: address length 4096"));
        let b = Violation::Buffer { nqe: 1, off: 0, len: 64 }.to_string();
        assert!(b.contains("buf_off/buf_len") && b.contains("outside the buffer pool"), "{b}");
        let q = Violation::Queue(Corrupt { head: 0, tail: 12345 }).to_string();
        assert!(q.contains("job queue corrupt") && q.contains("tail = 12345"), "{q}");
        assert!(Violation::NqeIndex(69).to_string().contains("past the end"));
    }
}
