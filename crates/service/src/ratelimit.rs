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
    pub fn new(bits_per_s: u64, burst_bytes: u64, now: Instant) -> Bucket {
        let burst = (burst_bytes as f64).max(QUANTUM);
        Bucket { rate: (bits_per_s as f64 / 8.0).max(1.0), burst, tokens: 0.0, last: now }
    }

    /// Adds the tokens earned until `now`. The other methods see the bucket as of the last
    /// advance: the bucket reads no clock, so a test can drive it with made-up times.
    pub fn advance(&mut self, now: Instant) {
        if now > self.last {
            self.tokens = (self.tokens + self.rate * now.duration_since(self.last).as_secs_f64()).min(self.burst);
            self.last = now;
        }
    }

    /// Takes up to `want` bytes' worth of tokens; returns how many.
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as f64).min(self.tokens.floor()).max(0.0);
        self.tokens -= n;
        n as usize
    }

    /// Takes tokens for `n` bytes that went already (an asynchronous send, which cannot wait):
    /// the bucket may go into debt, and the tenant waits until it is paid.
    pub fn charge(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// Gives back tokens taken for bytes the stack did not take.
    pub fn refund(&mut self, n: usize) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }

    /// Whether the tenant must wait before sending more.
    pub fn exhausted(&mut self) -> bool {
        self.tokens < QUANTUM.min(self.burst)
    }

    /// How long until sending is worth resuming.
    pub fn wait(&mut self) -> Duration {
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
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = Bucket::new(8_000_000, 100_000, t0); // 1 MB/s
        assert!(b.exhausted(), "a new bucket has saved nothing up");
        b.advance(at(150));
        assert_eq!(b.take(150_000), 100_000, "credit stops at the burst");
        assert!(b.exhausted());
        assert_eq!(b.wait(), Duration::from_micros(16_384), "a quantum (16 KiB) at 1 MB/s");
        b.advance(at(200));
        assert_eq!(b.take(1_000_000), 50_000, "50 ms at 1 MB/s");
        b.refund(50_000);
        assert!(!b.exhausted());
        // Time going backwards (a caller's mistake) earns nothing.
        b.advance(at(100));
        assert_eq!(b.take(1_000_000), 50_000);
    }

    #[test]
    fn an_asynchronous_send_goes_into_debt_and_waits_it_out() {
        let t0 = Instant::now();
        let mut b = Bucket::new(8_000_000, 16_384, t0);
        b.charge(1_000_000);
        assert!(b.exhausted());
        let w = b.wait();
        assert!(w > Duration::from_millis(1_000) && w < Duration::from_millis(1_020), "{w:?}");
        b.advance(t0 + w);
        assert!(!b.exhausted());
    }
}
