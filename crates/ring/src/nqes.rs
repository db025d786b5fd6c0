//! Which nqes a guest may use (docs/ABI.md sections 5 and 6): the free bitmap
//! (`RegionHeader::guest_free_nqes`) and the bitmap of asynchronous sends not yet reclaimed
//! (`guest_async_nqes`), both shared by every thread and process of the attachment.
//!
//! Every process reaps completed asynchronous nqes, so two reapers, and a new owner of the
//! same nqe, can race. A reaper claims an nqe's async bit first and only then looks at its
//! state: looking first let a reaper, between its look and its claim, take the bit a new owner
//! had just set and free that nqe while it was in use (fixed in 9d66b20; the loom model below
//! finds that interleaving in the old order and none in this one).

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use netkernel_abi::nqe_state;

/// Where the nqes' state words are (in a region, inside each nqe).
pub trait NqeStates {
    fn state(&self, i: u32) -> &AtomicU32;
}

/// The guest's view of nqe ownership in one region.
pub struct NqePool<'a, T: NqeStates + ?Sized> {
    pub free: &'a AtomicU64,
    pub pending: &'a AtomicU64,
    pub states: &'a T,
    /// Threads sleeping until an nqe is freed (`RegionHeader::guest_nqe_waiters`).
    pub sleepers: &'a AtomicU32,
}

impl<T: NqeStates + ?Sized> NqePool<'_, T> {
    /// Takes a free nqe; None when all are in flight (reap, then try again).
    pub fn try_alloc(&self) -> Option<u32> {
        let mut bits = self.free.load(Ordering::Acquire);
        while bits != 0 {
            let i = bits.trailing_zeros();
            match self.free.compare_exchange(bits, bits & !(1u64 << i), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(i),
                Err(now) => bits = now,
            }
        }
        None
    }

    /// Gives nqe `i` back: FREE first, so whoever takes it next sees it unused.
    pub fn free(&self, i: u32) {
        self.states.state(i).store(nqe_state::FREE, Ordering::Release);
        self.free.fetch_or(1u64 << i, Ordering::AcqRel);
    }

    /// Whether a thread sleeps for a free nqe (after `free` or a `reap` that freed one): the
    /// freer must wake it.
    pub fn has_sleepers(&self) -> bool {
        // The fence pairs with `will_sleep`'s: a freer sets a bit, then looks for sleepers; a
        // sleeper counts itself, then looks at the bits; with a full fence between the store and
        // the load on both sides, one of the two sees the other (store buffering otherwise lets
        // both miss: loom finds that without the fences).
        fence(Ordering::SeqCst);
        self.sleepers.load(Ordering::Relaxed) != 0
    }

    /// A thread found no free nqe and is about to sleep: counts it among the sleepers and says
    /// whether it still should (no nqe was freed meanwhile). Pair with `woke`.
    pub fn will_sleep(&self) -> bool {
        self.sleepers.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::SeqCst);
        self.free.load(Ordering::Relaxed) == 0
    }

    /// The thread counted by `will_sleep` is awake again.
    pub fn woke(&self) {
        self.sleepers.fetch_sub(1, Ordering::AcqRel);
    }

    /// Nqe `i` (allocated, about to be submitted) will be reclaimed by whoever reaps after the
    /// NSM completes it, not by its submitter.
    pub fn mark_async(&self, i: u32) {
        self.pending.fetch_or(1u64 << i, Ordering::AcqRel);
    }

    /// Frees every completed asynchronous nqe; returns whether it freed any.
    pub fn reap(&self) -> bool {
        let mut bits = self.pending.load(Ordering::Acquire);
        let mut freed = false;
        while bits != 0 {
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            let bit = 1u64 << i;
            // Claim first: from here on nobody else reaps nqe i, and a new owner cannot have it.
            if self.pending.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
                continue;
            }
            if self.states.state(i).load(Ordering::Acquire) == nqe_state::DONE {
                self.free(i);
                freed = true;
            } else {
                // Still in flight (or its owner is still filling it): not ours to free yet.
                self.pending.fetch_or(bit, Ordering::AcqRel);
            }
        }
        freed
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Nqes 0 and 1 of a region.
    struct Shared {
        free: AtomicU64,
        pending: AtomicU64,
        states: [AtomicU32; 2],
        sleepers: AtomicU32,
    }

    impl NqeStates for Shared {
        fn state(&self, i: u32) -> &AtomicU32 {
            &self.states[i as usize]
        }
    }

    fn pool(s: &Shared) -> NqePool<'_, Shared> {
        NqePool { free: &s.free, pending: &s.pending, states: s, sleepers: &s.sleepers }
    }

    /// Nqe 0 was submitted asynchronously and completed by the NSM (DONE, its bit pending).
    /// Two processes reap; the second then takes the nqe for a new asynchronous send (mark,
    /// then SUBMITTED, as GuestLib does). `reap` is the reaper under test. The new send is never
    /// completed here, so in the end the nqe must be neither free nor FREE.
    fn reaped_once(reap: fn(&NqePool<'_, Shared>) -> bool) {
        loom::model(move || {
            let s = Arc::new(Shared {
                free: AtomicU64::new(0),
                pending: AtomicU64::new(1),
                states: [AtomicU32::new(nqe_state::DONE), AtomicU32::new(nqe_state::FREE)],
                sleepers: AtomicU32::new(0),
            });
            let other = s.clone();
            let reaper = loom::thread::spawn(move || {
                reap(&pool(&other));
            });
            let p = pool(&s);
            reap(&p);
            let owned = p.try_alloc();
            if let Some(i) = owned {
                p.mark_async(i);
                s.states[i as usize].store(nqe_state::SUBMITTED, Ordering::Release);
            }
            reaper.join().unwrap();
            if let Some(i) = owned {
                assert_eq!(s.free.load(Ordering::Acquire) & (1 << i), 0, "an nqe in flight was freed: two owners");
                assert_eq!(s.state(i).load(Ordering::Acquire), nqe_state::SUBMITTED, "an nqe in flight was freed");
            }
        });
    }

    #[test]
    fn claiming_first_never_frees_an_nqe_in_flight() {
        reaped_once(|p| p.reap());
    }

    /// The order before 9d66b20 (look at DONE, then claim the bit): loom finds the reaper
    /// freeing the nqe its new owner just submitted.
    #[test]
    #[should_panic(expected = "freed")]
    fn looking_before_claiming_frees_an_nqe_in_flight() {
        reaped_once(|p| {
            let done = p.states.state(0).load(Ordering::Acquire) == nqe_state::DONE;
            if done && p.pending.fetch_and(!1, Ordering::AcqRel) & 1 != 0 {
                p.free(0);
                return true;
            }
            false
        });
    }

    /// Allocation hands each nqe to one owner at a time, across threads taking and freeing.
    #[test]
    fn alloc_and_free_never_share_an_nqe() {
        loom::model(|| {
            let s = Arc::new(Shared {
                free: AtomicU64::new(0b11),
                pending: AtomicU64::new(0),
                states: [AtomicU32::new(nqe_state::FREE), AtomicU32::new(nqe_state::FREE)],
                sleepers: AtomicU32::new(0),
            });
            let owners = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (s, owners) = (s.clone(), owners.clone());
                    loom::thread::spawn(move || {
                        let p = pool(&s);
                        let i = p.try_alloc().expect("two nqes for two threads");
                        assert_eq!(owners[i as usize].fetch_add(1, Ordering::AcqRel), 0, "nqe {i} has two owners");
                        owners[i as usize].fetch_sub(1, Ordering::AcqRel);
                        p.free(i);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(s.free.load(Ordering::Acquire), 0b11);
        });
    }

    /// Every nqe is in flight; one thread goes to sleep for a free one while another frees
    /// one. Never both: the sleeper sleeping and the freer seeing nobody to wake (a lost
    /// wakeup: the sleeper would wait for its timeout).
    #[test]
    fn a_sleeper_for_a_free_nqe_is_never_missed() {
        loom::model(|| {
            let s = Arc::new(Shared {
                free: AtomicU64::new(0),
                pending: AtomicU64::new(0),
                states: [AtomicU32::new(nqe_state::DONE), AtomicU32::new(nqe_state::DONE)],
                sleepers: AtomicU32::new(0),
            });
            let other = s.clone();
            let freer = loom::thread::spawn(move || {
                let p = pool(&other);
                p.free(0);
                p.has_sleepers()
            });
            let p = pool(&s);
            let sleeps = p.will_sleep();
            let woken = freer.join().unwrap();
            assert!(!sleeps || woken, "the sleeper slept and nobody woke it");
        });
    }
}
