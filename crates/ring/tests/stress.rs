//! Multi-process stress of the job queue: a forked producer pushes 10^8 entries through a
//! region's ring to the parent, which checks there is no loss, duplication or reordering.
#![cfg(not(loom))]

use netkernel_ring::region::Region;
use netkernel_ring::spsc::Consumer;

#[test]
fn hundred_million_entries_cross_processes_in_order() {
    // Debug builds are ~20x slower; the full count runs in the release test suite.
    let n: u64 = std::env::var("NK_STRESS_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 1_000_000 } else { 100_000_000 });
    let region = Region::create(1).unwrap();
    // SAFETY: the child only spins on atomics in the shared mapping and then _exits; it never
    // returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ring = region.ring();
        let mut i: u64 = 0;
        while i < n {
            match ring.push(i as u32) {
                Ok(()) => i += 1,
                Err(_) => std::hint::spin_loop(),
            }
        }
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut c = Consumer::new(region.ring());
    let mut expect: u64 = 0;
    let start = std::time::Instant::now();
    while expect < n {
        match c.pop() {
            Ok(Some(v)) => {
                assert_eq!(v, expect as u32, "entry {expect} arrived out of order, duplicated or lost");
                expect += 1;
            }
            Ok(None) => std::hint::spin_loop(),
            Err(e) => panic!("ring corrupt: {e:?}"),
        }
    }
    let mut status = 0;
    // SAFETY: &mut status is a live c_int for the call; pid is our own child, so no other process's
    // status is taken.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(status, 0);
    assert_eq!(c.pop(), Ok(None), "entries beyond the last one");
    let el = start.elapsed();
    eprintln!("{n} entries in {el:?}: {:.1} ns/entry", el.as_nanos() as f64 / n as f64);
}
