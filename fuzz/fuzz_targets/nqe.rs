//! An nqe as a hostile guest may write it: `validate` never panics, refuses exactly what
//! docs/ABI.md section 9.1 refuses, and what it accepts is in bounds and encodes back to itself.
#![no_main]

#[path = "input.rs"]
mod input;

use input::Input;
use libfuzzer_sys::fuzz_target;
use netkernel_abi::validate::{validate, NqeSnapshot, Violation};
use netkernel_abi::{Layout, Op, ADDR_MAX, CONTROL_MAX, RECV_CONTROL, SEND_CONTROL};

fuzz_target!(|data: &[u8]| {
    let mut i = Input(data);
    let idx = u32::from(i.u8() % 64);
    let layout = Layout::standard();
    let s = NqeSnapshot {
        op: i.u32(),
        sock: i.u32(),
        flags: i.u32(),
        arg0: i.u64(),
        arg1: i.u64(),
        buf_off: i.u64(),
        buf_len: i.u32(),
        addr_len: i.u32(),
        addr: i.bytes(),
        holder: i.u32(),
    };
    match validate(idx, &s, &layout) {
        Ok(r) => {
            assert_eq!(r.call.op() as u32, s.op);
            assert_eq!((r.sock, r.holder), (s.sock, s.holder));
            assert!(s.addr_len as usize <= ADDR_MAX);
            let buf = r.call.buf();
            assert!(buf.is_empty() || layout.pool_contains(buf.off(), buf.len()), "{r:?}");
            assert!(s.buf_len == 0 || layout.pool_contains(s.buf_off, s.buf_len), "{s:?}");
            assert_eq!(validate(idx, &r.encode(), &layout), Ok(r));
        }
        Err(Violation::Opcode { nqe, op }) => assert!(nqe == idx && op == s.op && Op::from_u32(op).is_none()),
        Err(Violation::AddrLen { nqe, len }) => {
            assert!(nqe == idx && len == s.addr_len && len as usize > ADDR_MAX && Op::from_u32(s.op).is_some())
        }
        Err(Violation::Buffer { nqe, off, len }) => {
            assert!(nqe == idx && s.addr_len as usize <= ADDR_MAX);
            if len > 0 && (off, len) == (s.buf_off, s.buf_len) && !layout.pool_contains(off, len) {
                // The op's own buffer.
            } else {
                // The control area after the data (section 9.1): only a Send or Recv announcing one.
                let op = Op::from_u32(s.op);
                let header: u32 = match op {
                    Some(Op::Send) if s.arg0 & SEND_CONTROL != 0 => 0,
                    Some(Op::Recv) if s.arg0 & RECV_CONTROL != 0 => 8,
                    _ => panic!("{op:?} has no control area: {s:?}"),
                };
                assert!(layout.pool_contains(s.buf_off, s.buf_len) || s.buf_len == 0);
                assert_eq!(off, s.buf_off.saturating_add(u64::from(s.buf_len)));
                assert_eq!(len, header.saturating_add(s.arg0 as u32));
                assert!(s.arg0 as u32 > CONTROL_MAX || !layout.pool_contains(off, len));
            }
        }
        Err(v) => panic!("validate never reports {v:?}"),
    }
});
