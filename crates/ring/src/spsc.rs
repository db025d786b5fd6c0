//! A bounded single-producer single-consumer ring of `u32` over memory the two sides share.
//!
//! The producer (a guest, serialised by its own lock) and the consumer (the NSM) live in
//! different processes and distrust each other in one direction only: the consumer must survive
//! any value the producer writes. So the consumer keeps its own copy of `head` and only publishes
//! it, and it checks that the producer's `tail` never claims more than `capacity` entries.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, Ordering};

/// The shared part of a ring: two indices and the entries.
#[derive(Clone, Copy)]
pub struct RingRef<'a> {
    pub head: &'a AtomicU32,
    pub tail: &'a AtomicU32,
    pub entries: &'a [AtomicU32],
}

pub use netkernel_abi::validate::Corrupt;

impl<'a> RingRef<'a> {
    fn cap(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Appends `v`; gives it back when the ring is full. Single producer only.
    pub fn push(&self, v: u32) -> Result<(), u32> {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) >= self.cap() {
            return Err(v);
        }
        self.entries[(tail % self.cap()) as usize].store(v, Ordering::Relaxed);
        self.tail.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Whether the ring holds entries, as the producer sees it.
    pub fn is_empty(&self) -> bool {
        self.tail.load(Ordering::Acquire) == self.head.load(Ordering::Acquire)
    }
}

/// The consumer's side: owns the authoritative head.
pub struct Consumer<'a> {
    ring: RingRef<'a>,
    head: u32,
}

impl<'a> Consumer<'a> {
    /// Starts consuming at the ring's current head (both sides start at 0 in a new region).
    pub fn new(ring: RingRef<'a>) -> Self {
        let head = ring.head.load(Ordering::Acquire);
        Consumer { ring, head }
    }

    /// Resumes consuming at a head this side saved earlier (never one read back from the
    /// shared memory, which the producer can overwrite).
    pub fn resume(ring: RingRef<'a>, head: u32) -> Self {
        Consumer { ring, head }
    }

    /// The head to save for [`Consumer::resume`].
    pub fn head(&self) -> u32 {
        self.head
    }

    /// Whether an entry is waiting, without taking it.
    pub fn has_work(&self) -> bool {
        self.ring.tail.load(Ordering::Acquire) != self.head
    }

    /// The next entry without taking it (None when empty). Unvalidated: good for a guess at
    /// what comes, never for acting on it.
    pub fn peek(&self) -> Option<u32> {
        let tail = self.ring.tail.load(Ordering::Acquire);
        (tail != self.head).then(|| self.ring.entries[(self.head % self.ring.cap()) as usize].load(Ordering::Relaxed))
    }

    /// Takes the next entry, `Ok(None)` when empty, `Err` when the producer broke the protocol.
    pub fn pop(&mut self) -> Result<Option<u32>, Corrupt> {
        let tail = self.ring.tail.load(Ordering::Acquire);
        if tail == self.head {
            return Ok(None);
        }
        netkernel_abi::validate::queue_len(self.head, tail, self.ring.cap())?;
        let v = self.ring.entries[(self.head % self.ring.cap()) as usize].load(Ordering::Relaxed);
        self.head = self.head.wrapping_add(1);
        self.ring.head.store(self.head, Ordering::Release);
        Ok(Some(v))
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    struct Shared {
        head: AtomicU32,
        tail: AtomicU32,
        entries: Vec<AtomicU32>,
    }

    fn shared(cap: usize) -> Arc<Shared> {
        Arc::new(Shared {
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            entries: (0..cap).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    fn rr(s: &Shared) -> RingRef<'_> {
        RingRef { head: &s.head, tail: &s.tail, entries: &s.entries }
    }

    /// Every value pushed arrives once and in order, across wrap-around, with any interleaving.
    #[test]
    fn fifo_no_loss_no_dup() {
        loom::model(|| {
            let s = shared(2);
            let p = s.clone();
            let producer = loom::thread::spawn(move || {
                let mut next = 1;
                while next <= 3 {
                    if rr(&p).push(next).is_ok() {
                        next += 1;
                    } else {
                        loom::thread::yield_now();
                    }
                }
            });
            let mut c = Consumer::new(rr(&s));
            let mut want = 1;
            while want <= 3 {
                match c.pop().unwrap() {
                    Some(v) => {
                        assert_eq!(v, want);
                        want += 1;
                    }
                    None => loom::thread::yield_now(),
                }
            }
            producer.join().unwrap();
            assert_eq!(c.pop().unwrap(), None);
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ring(cap: usize) -> (AtomicU32, AtomicU32, Vec<AtomicU32>) {
        (AtomicU32::new(0), AtomicU32::new(0), (0..cap).map(|_| AtomicU32::new(0)).collect())
    }

    #[test]
    fn full_ring_refuses_and_wraps() {
        let (h, t, e) = ring(4);
        let r = RingRef { head: &h, tail: &t, entries: &e };
        let mut c = Consumer::new(r);
        for round in 0..10u32 {
            for i in 0..4 {
                r.push(round * 4 + i).unwrap();
            }
            assert_eq!(r.push(99), Err(99));
            for i in 0..4 {
                assert_eq!(c.pop(), Ok(Some(round * 4 + i)));
            }
            assert_eq!(c.pop(), Ok(None));
        }
    }

    #[test]
    fn hostile_tail_is_detected() {
        let (h, t, e) = ring(4);
        let r = RingRef { head: &h, tail: &t, entries: &e };
        let mut c = Consumer::new(r);
        t.store(1000, Ordering::Relaxed);
        assert_eq!(c.pop(), Err(Corrupt { head: 0, tail: 1000 }));
        // A producer that rewinds head cannot make the consumer re-read entries.
        t.store(0, Ordering::Relaxed);
        r.push(7).unwrap();
        assert_eq!(c.pop(), Ok(Some(7)));
        h.store(0, Ordering::Relaxed);
        assert_eq!(c.pop(), Ok(None));
    }
}
