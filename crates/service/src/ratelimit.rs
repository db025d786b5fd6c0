//! Per-tenant rate limits: a token bucket of bytes a tenant may send, enforced where the stack
//! runs (DESIGN.md D7). A tenant out of tokens sees its sockets not writable; the NSM wakes them
//! when tokens are back.

use std::time::{Duration, Instant};

/// The smallest refill worth waking up for, so a capped tenant's sockets are not woken for a
/// handful of bytes.
const QUANTUM: f64 = 16.0 * 1024.0;

pub(crate) struct Bucket {
    /// Bytes per second.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket that starts empty: a burst is credit saved up while the tenant sends less than
    /// its rate, so over any stretch from the start it never gets more than its rate.
    pub fn new(bits_per_s: u64, burst_bytes: u64) -> Bucket {
        let burst = (burst_bytes as f64).max(QUANTUM);
        Bucket { rate: (bits_per_s as f64 / 8.0).max(1.0), burst, tokens: 0.0, last: Instant::now() }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + self.rate * now.duration_since(self.last).as_secs_f64()).min(self.burst);
        self.last = now;
    }

    /// Takes up to `want` bytes' worth of tokens; returns how many.
    pub fn take(&mut self, want: usize) -> usize {
        self.refill();
        let n = (want as f64).min(self.tokens.floor()).max(0.0);
        self.tokens -= n;
        n as usize
    }

    /// Takes tokens for `n` bytes that went already (an asynchronous send, which cannot wait):
    /// the bucket may go into debt, and the tenant waits until it is paid.
    pub fn charge(&mut self, n: usize) {
        self.refill();
        self.tokens -= n as f64;
    }

    /// Gives back tokens taken for bytes the stack did not take.
    pub fn refund(&mut self, n: usize) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }

    /// Whether the tenant must wait before sending more.
    pub fn exhausted(&mut self) -> bool {
        self.refill();
        self.tokens < QUANTUM.min(self.burst)
    }

    /// How long until sending is worth resuming.
    pub fn wait(&mut self) -> Duration {
        self.refill();
        let need = QUANTUM.min(self.burst) - self.tokens;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut b = Bucket::new(8_000_000, 100_000); // 1 MB/s
        assert!(b.exhausted(), "a new bucket has saved nothing up");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(b.take(150_000), 100_000, "credit stops at the burst");
        assert!(b.exhausted());
        let w = b.wait();
        assert!(w > Duration::from_millis(10) && w < Duration::from_millis(20), "{w:?}");
        std::thread::sleep(Duration::from_millis(50));
        let n = b.take(1_000_000);
        assert!((45_000..60_000).contains(&n), "{n}");
        b.refund(n);
        assert!(!b.exhausted());
    }
}
