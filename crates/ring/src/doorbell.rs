//! The NSM doorbell handshake (docs/ABI.md sections 7 and 8, DESIGN.md D5): the NSM sleeps in
//! epoll only after publishing `nsm_sleeping`, and a guest rings the doorbell (an eventfd write,
//! a system call) only when it sees the flag. Both sides store, fence, then load the other's
//! word, so at least one of them sees the other's store: either the NSM finds the new entry
//! before it sleeps, or the guest finds the flag and rings. Without either fence both could read
//! the old value (store buffering) and the entry would wait for the NSM's next unrelated wakeup.
//! The loom models below check this, and that removing a fence loses the wakeup.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// NSM side, when it found no work: publishes `sleeping` through `set` (1, then back to 0 if
/// it will not sleep) and looks at the queues again with `has_work`. True: it may sleep, every
/// guest that queues from now on rings.
pub fn nsm_may_sleep(set: impl Fn(u32), has_work: impl FnOnce() -> bool) -> bool {
    set(1);
    fence(Ordering::SeqCst);
    if has_work() {
        set(0);
        return false;
    }
    true
}

/// Guest side, right after pushing onto the queue: whether the NSM may be asleep and the
/// doorbell must ring.
pub fn guest_must_ring(nsm_sleeping: &AtomicU32) -> bool {
    fence(Ordering::SeqCst);
    nsm_sleeping.load(Ordering::Relaxed) != 0
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::spsc::{Consumer, RingRef};
    use loom::sync::Arc;

    struct Shared {
        head: AtomicU32,
        tail: AtomicU32,
        entries: [AtomicU32; 1],
        sleeping: AtomicU32,
        /// The doorbell eventfd's counter.
        bell: AtomicU32,
    }

    impl Shared {
        fn ring(&self) -> RingRef<'_> {
            RingRef { head: &self.head, tail: &self.tail, entries: &self.entries }
        }
    }

    /// One guest submits while the NSM, having found nothing, decides whether to sleep. `nsm`
    /// and `guest` are the two halves of the handshake. Fails if the NSM sleeps with the entry
    /// queued and the doorbell never rang: a lost wakeup.
    fn no_lost_wakeup(nsm: fn(&Shared, &Consumer) -> bool, guest: fn(&Shared) -> bool) {
        loom::model(move || {
            let s = Arc::new(Shared {
                head: AtomicU32::new(0),
                tail: AtomicU32::new(0),
                entries: [AtomicU32::new(0)],
                sleeping: AtomicU32::new(0),
                bell: AtomicU32::new(0),
            });
            let g = s.clone();
            let producer = loom::thread::spawn(move || {
                g.ring().push(7).unwrap();
                if guest(&g) {
                    g.bell.fetch_add(1, Ordering::Relaxed);
                }
            });
            let mut c = Consumer::new(s.ring());
            let mut got = c.pop().unwrap();
            let mut slept = false;
            if got.is_none() {
                if nsm(&s, &c) {
                    slept = true;
                } else {
                    got = c.pop().unwrap();
                    assert_eq!(got, Some(7), "has_work said yes, pop found nothing");
                }
            }
            producer.join().unwrap();
            if slept {
                assert!(s.bell.load(Ordering::Relaxed) > 0, "the NSM sleeps on a queued entry: wakeup lost");
            }
        });
    }

    fn nsm(s: &Shared, c: &Consumer) -> bool {
        nsm_may_sleep(|v| s.sleeping.store(v, Ordering::SeqCst), || c.has_work())
    }

    fn guest(s: &Shared) -> bool {
        guest_must_ring(&s.sleeping)
    }

    #[test]
    fn doorbell_handshake_loses_no_wakeup() {
        no_lost_wakeup(nsm, guest);
    }

    /// The guest's fence is needed: without it loom finds the NSM asleep on a queued entry.
    #[test]
    #[should_panic(expected = "wakeup lost")]
    fn without_the_guest_fence_a_wakeup_is_lost() {
        no_lost_wakeup(nsm, |s| s.sleeping.load(Ordering::SeqCst) != 0);
    }

    /// The NSM's fence is needed too (its SeqCst store alone does not order its later load).
    #[test]
    #[should_panic(expected = "wakeup lost")]
    fn without_the_nsm_fence_a_wakeup_is_lost() {
        no_lost_wakeup(
            |s, c| {
                s.sleeping.store(1, Ordering::SeqCst);
                if c.has_work() {
                    s.sleeping.store(0, Ordering::SeqCst);
                    return false;
                }
                true
            },
            guest,
        );
    }
}
