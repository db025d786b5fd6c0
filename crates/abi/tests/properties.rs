//! Properties of the validation of guest-written memory (the same functions the fuzz targets in
//! fuzz/ exercise, here over inputs shaped to reach every branch in a normal `cargo test`).

use netkernel_abi::validate::{
    nqe_index, queue_len, validate, Call, HeaderSnapshot, NqeSnapshot, PoolBuf, Request, SockAddr, Violation,
};
use netkernel_abi::{Layout, Op, ADDR_MAX, CONTROL_MAX, NQE_COUNT, RECV_CONTROL, SEND_CONTROL};
use proptest::prelude::*;

fn layout() -> Layout {
    Layout::standard()
}

/// Offsets around and inside the pool, plus anything.
fn offset() -> impl Strategy<Value = u64> {
    let l = layout();
    let end = l.pool_off + l.pool_size;
    prop_oneof![
        l.pool_off - 64..l.pool_off + 64,
        l.pool_off..end,
        end - 300_000..end + 64,
        u64::MAX - 300_000..=u64::MAX,
        any::<u64>(),
    ]
}

fn snapshot() -> impl Strategy<Value = NqeSnapshot> {
    (
        prop_oneof![0u32..20, any::<u32>()],
        any::<(u32, u32)>(),
        any::<u32>(),
        any::<(u64, u64)>(),
        offset(),
        prop_oneof![0u32..300_000, any::<u32>()],
        prop_oneof![0u32..=140, any::<u32>()],
        proptest::collection::vec(any::<u8>(), ADDR_MAX),
    )
        .prop_map(|(op, (sock, holder), flags, (arg0, arg1), buf_off, buf_len, addr_len, addr)| NqeSnapshot {
            op,
            sock,
            holder,
            flags,
            arg0,
            arg1,
            buf_off,
            buf_len,
            addr_len,
            addr: addr.try_into().unwrap(),
        })
}

fn pool_buf() -> impl Strategy<Value = PoolBuf> {
    let l = layout();
    (0..l.pool_size, any::<u32>()).prop_map(move |(at, len)| {
        let len = (len as u64 % (l.pool_size - at + 1)) as u32;
        PoolBuf::new(&l, l.pool_off + at, len).expect("inside the pool")
    })
}

fn sock_addr() -> impl Strategy<Value = SockAddr> {
    proptest::collection::vec(any::<u8>(), 0..=ADDR_MAX).prop_map(|a| SockAddr::new(&a).unwrap())
}

fn call() -> impl Strategy<Value = Call> {
    let int = any::<i32>;
    prop_oneof![
        (int(), int(), int()).prop_map(|(domain, ty, protocol)| Call::Socket { domain, ty, protocol }),
        sock_addr().prop_map(|addr| Call::Bind { addr }),
        int().prop_map(|backlog| Call::Listen { backlog }),
        Just(Call::Accept),
        (sock_addr(), any::<bool>()).prop_map(|(addr, blocking)| Call::Connect { addr, blocking }),
        (pool_buf(), int(), any::<bool>(), sock_addr()).prop_map(|(buf, f, nowait, to)| Call::Send {
            buf,
            flags: f & i32::MAX,
            nowait,
            to,
            control: None
        }),
        (pool_buf(), int()).prop_map(|(buf, flags)| Call::Recv { buf, flags, control: None }),
        int().prop_map(|how| Call::Shutdown { how }),
        Just(Call::Close),
        (int(), int(), pool_buf()).prop_map(|(level, name, buf)| Call::GetSockOpt { level, name, buf }),
        (int(), int(), pool_buf()).prop_map(|(level, name, buf)| Call::SetSockOpt { level, name, buf }),
        Just(Call::GetSockName),
        Just(Call::GetPeerName),
        any::<u64>().prop_map(|request| Call::Ioctl { request }),
        (pool_buf(), int(), int(), int()).prop_map(|(query, family, socktype, flags)| Call::Resolve {
            query,
            family,
            socktype,
            flags
        }),
        (any::<u64>(), any::<bool>(), pool_buf()).prop_map(|(holder, all, slots)| Call::Share { holder, all, slots }),
        any::<u64>().prop_map(|holder| Call::Unshare { holder }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// Whatever a guest writes, validation answers (it never panics), and it accepts exactly
    /// what docs/ABI.md section 9.1 accepts.
    #[test]
    fn validate_decides_every_nqe(idx in 0..NQE_COUNT, s in snapshot()) {
        let l = layout();
        let known = Op::from_u32(s.op).is_some();
        let addr_ok = s.addr_len as usize <= ADDR_MAX;
        let buf_ok = s.buf_len == 0 || l.pool_contains(s.buf_off, s.buf_len);
        // A Recv or Send may carry a control area after its buffer (header, then size bytes).
        let ctl = match Op::from_u32(s.op) {
            Some(Op::Recv) if s.arg0 & RECV_CONTROL != 0 => Some((s.arg0 as u32, 8u32)),
            Some(Op::Send) if s.arg0 & SEND_CONTROL != 0 => Some((s.arg0 as u32, 0)),
            _ => None,
        };
        let ctl_off = s.buf_off.saturating_add(s.buf_len as u64);
        let ctl_len = ctl.map_or(0, |(n, h)| h.saturating_add(n));
        let ctl_ok = ctl.is_none_or(|(n, _)| n <= CONTROL_MAX && l.pool_contains(ctl_off, ctl_len));
        match validate(idx, &s, &l) {
            Ok(r) => {
                prop_assert!(known && addr_ok && buf_ok && ctl_ok);
                prop_assert_eq!(r.call.op() as u32, s.op);
                prop_assert_eq!((r.sock, r.holder), (s.sock, s.holder));
                let b = r.call.buf();
                prop_assert!(b.is_empty() || l.pool_contains(b.off(), b.len()), "{:?}", r);
                prop_assert_eq!(validate(idx, &r.encode(), &l), Ok(r));
            }
            Err(Violation::Opcode { nqe, op }) => prop_assert!(!known && nqe == idx && op == s.op),
            Err(Violation::AddrLen { nqe, len }) => prop_assert!(known && !addr_ok && nqe == idx && len == s.addr_len),
            Err(Violation::Buffer { nqe, off, len }) => prop_assert!(
                known
                    && addr_ok
                    && nqe == idx
                    && ((!buf_ok && (off, len) == (s.buf_off, s.buf_len))
                        || (buf_ok && !ctl_ok && (off, len) == (ctl_off, ctl_len)))
            ),
            Err(v) => prop_assert!(false, "validate never reports {v:?}"),
        }
    }

    /// A request a well-behaved guest encodes is validated back to itself.
    #[test]
    fn encode_then_validate_round_trips(sock in any::<u32>(), holder in any::<u32>(), call in call()) {
        let r = Request { sock, holder, call };
        prop_assert_eq!(validate(3, &r.encode(), &layout()), Ok(r));
    }

    /// Only the standard header is accepted, and only in a memfd large enough for it.
    #[test]
    fn only_the_standard_header_validates(
        field in 0usize..14,
        value in any::<u64>(),
        mapped in prop_oneof![Just(layout().region_size), any::<u64>()],
    ) {
        let mut h = HeaderSnapshot::standard();
        match field {
            0 => h.magic = value,
            1 => h.abi_version = value as u32,
            2 => h.header_size = value as u32,
            3 => h.region_size = value,
            4 => h.nqe_count = value as u32,
            5 => h.nqe_size = value as u32,
            6 => h.slot_count = value as u32,
            7 => h.buf_size = value as u32,
            8 => h.ring_off = value,
            9 => h.nqe_off = value,
            10 => h.slot_off = value,
            11 => h.guest_off = value,
            12 => h.pool_off = value,
            _ => h.pool_size = value,
        }
        let accepted = h.validate(mapped).is_ok();
        prop_assert_eq!(accepted, h == HeaderSnapshot::standard() && mapped >= layout().region_size);
    }

    /// A queue holds what tail − head says, at most its capacity; a job entry is an nqe index
    /// only below NQE_COUNT.
    #[test]
    fn queue_indices_are_checked(head in any::<u32>(), ahead in prop_oneof![0u32..=70, any::<u32>()], entry in any::<u32>()) {
        let tail = head.wrapping_add(ahead);
        prop_assert_eq!(queue_len(head, tail, NQE_COUNT).is_ok(), ahead <= NQE_COUNT);
        prop_assert_eq!(nqe_index(entry).is_ok(), entry < NQE_COUNT);
    }
}
