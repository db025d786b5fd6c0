//! A region header and job queue as a hostile guest may leave them: the header check accepts
//! exactly the standard geometry, and the consumer, fed any tail and entries between its pops,
//! never panics, never reads past the queue, and refuses a tail more than a queue ahead.
#![no_main]

#[path = "input.rs"]
mod input;

use input::Input;
use libfuzzer_sys::fuzz_target;
use netkernel_abi::validate::{nqe_index, queue_len, Corrupt, HeaderSnapshot};
use netkernel_abi::NQE_COUNT;
use netkernel_ring::spsc::{Consumer, RingRef};
use std::sync::atomic::{AtomicU32, Ordering};

fuzz_target!(|data: &[u8]| {
    let mut i = Input(data);
    // Start from the standard header and let the input replace some fields, so that inputs
    // reach every check, not only the magic.
    let mut h = HeaderSnapshot::standard();
    let which = i.u32();
    let pick = |n: u32| (which >> n) & 1 == 1;
    if pick(0) {
        h.magic = i.u64();
    }
    if pick(1) {
        h.abi_version = i.u32();
    }
    if pick(2) {
        h.header_size = i.u32();
    }
    if pick(3) {
        h.region_size = i.u64();
    }
    if pick(4) {
        h.nqe_count = i.u32();
    }
    if pick(5) {
        h.nqe_size = i.u32();
    }
    if pick(6) {
        h.slot_count = i.u32();
    }
    if pick(7) {
        h.buf_size = i.u32();
    }
    if pick(8) {
        h.ring_off = i.u64();
    }
    if pick(9) {
        h.nqe_off = i.u64();
    }
    if pick(10) {
        h.slot_off = i.u64();
    }
    if pick(11) {
        h.guest_off = i.u64();
    }
    if pick(12) {
        h.pool_off = i.u64();
    }
    if pick(13) {
        h.pool_size = i.u64();
    }
    let mapped = i.u64();
    let standard = HeaderSnapshot::standard();
    match h.validate(mapped) {
        Ok(l) => assert!(h == standard && mapped >= l.region_size, "{h:?} accepted in {mapped} bytes"),
        Err(_) => assert!(h != standard || mapped < standard.region_size),
    }

    // The queue: the guest writes tail and entries at will; the NSM pops with its own head.
    let head0 = i.u32();
    let ring_head = AtomicU32::new(head0);
    let tail = AtomicU32::new(head0);
    let entries: Vec<AtomicU32> = (0..NQE_COUNT).map(|_| AtomicU32::new(0)).collect();
    let ring = RingRef { head: &ring_head, tail: &tail, entries: &entries };
    let mut c = Consumer::resume(ring, head0);
    while !i.0.is_empty() {
        match i.u8() % 4 {
            0 => tail.store(i.u32(), Ordering::Relaxed),
            1 => entries[usize::from(i.u8()) % entries.len()].store(i.u32(), Ordering::Relaxed),
            2 => ring_head.store(i.u32(), Ordering::Relaxed),
            _ => {
                let (head, t) = (c.head(), tail.load(Ordering::Relaxed));
                match c.pop() {
                    Ok(None) => assert_eq!(head, t),
                    Ok(Some(entry)) => {
                        assert!(queue_len(head, t, NQE_COUNT).is_ok_and(|n| n > 0));
                        assert_eq!(c.head(), head.wrapping_add(1));
                        assert_eq!(nqe_index(entry).is_ok(), entry < NQE_COUNT);
                    }
                    Err(e) => {
                        assert_eq!(e, Corrupt { head, tail: t });
                        assert!(t.wrapping_sub(head) > NQE_COUNT);
                        assert_eq!(c.head(), head);
                    }
                }
            }
        }
    }
});
