//! An nqe as a hostile guest may write it: `validate` never panics, refuses exactly what
//! docs/ABI.md section 9.1 refuses, and what it accepts is in bounds and encodes back to itself.
#![no_main]

#[path = "input.rs"]
mod input;

use input::Input;
use libfuzzer_sys::fuzz_target;
use netkernel_abi::validate::{validate, NqeSnapshot, Violation};
use netkernel_abi::{Layout, Op, ADDR_MAX};

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
            assert!(nqe == idx && (off, len) == (s.buf_off, s.buf_len));
            assert!(len > 0 && !layout.pool_contains(off, len) && s.addr_len as usize <= ADDR_MAX);
        }
        Err(v) => panic!("validate never reports {v:?}"),
    }
});
