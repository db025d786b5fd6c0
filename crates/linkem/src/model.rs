//! The link model, free of I/O so it can be checked against a made-up clock: what happens to a
//! frame offered to one direction of the link at time `now` (nanoseconds, CLOCK_MONOTONIC).

use std::collections::VecDeque;

/// One direction's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// One-way propagation delay, added after serialization.
    pub delay_ns: u64,
    /// Bottleneck rate in bits/s (Ethernet frame bytes, as tbf counts them); 0 = unlimited.
    pub rate_bps: u64,
    /// Probability in [0, 1] that a frame is lost before it reaches the queue.
    pub loss: f64,
    /// Drop-tail limit: bytes waiting for (or in) serialization at the bottleneck.
    pub limit_bytes: u64,
}

impl Default for Shape {
    fn default() -> Shape {
        // 1000 full-size frames, netem's default queue length.
        Shape { delay_ns: 0, rate_bps: 0, loss: 0.0, limit_bytes: 1000 * 1514 }
    }
}

/// Frames (of either kind) held on the wire at once when the rate is unlimited: a bound on memory
/// (256 MiB), not part of the model.
const MAX_IN_FLIGHT_BYTES: u64 = 256 << 20;

/// What became of an offered frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queued; it leaves the link at this time.
    Queued(u64),
    /// Lost at random.
    Lost,
    /// The queue was full.
    Dropped,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames: u64,
    pub bytes: u64,
    pub delivered: u64,
    pub lost: u64,
    pub dropped: u64,
    pub write_errors: u64,
}

/// A seeded generator (splitmix64): the same seed drops the same frames, so a run with loss can
/// be repeated exactly.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of the link: a rate-limited drop-tail queue followed by a delay line. Frames
/// leave in the order they came (the departure time is monotonic), so one FIFO holds both.
pub struct Direction {
    pub shape: Shape,
    rng: Rng,
    /// When the bottleneck finishes serializing the last accepted frame.
    busy_until: u64,
    in_flight_bytes: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    pub stats: Stats,
}

impl Direction {
    pub fn new(shape: Shape, seed: u64) -> Direction {
        Direction {
            shape,
            rng: Rng::new(seed),
            busy_until: 0,
            in_flight_bytes: 0,
            queue: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Offers a frame that arrived at `now`.
    pub fn offer(&mut self, now: u64, frame: Vec<u8>) -> Verdict {
        let len = frame.len() as u64;
        self.stats.frames += 1;
        self.stats.bytes += len;
        // Loss first, as netem does: a lost frame takes no room in the queue.
        if self.shape.loss > 0.0 && self.rng.next_f64() < self.shape.loss {
            self.stats.lost += 1;
            return Verdict::Lost;
        }
        let start = now.max(self.busy_until);
        let serialize = if self.shape.rate_bps == 0 {
            0
        } else {
            // Bytes still ahead of this frame at the bottleneck: the time it waits, at the rate.
            let backlog = ((start - now) as u128 * self.shape.rate_bps as u128 / 8_000_000_000) as u64;
            if backlog + len > self.shape.limit_bytes {
                self.stats.dropped += 1;
                return Verdict::Dropped;
            }
            (len as u128 * 8_000_000_000 / self.shape.rate_bps as u128) as u64
        };
        if self.in_flight_bytes + len > MAX_IN_FLIGHT_BYTES {
            self.stats.dropped += 1;
            return Verdict::Dropped;
        }
        self.busy_until = start + serialize;
        let leave = self.busy_until + self.shape.delay_ns;
        self.in_flight_bytes += len;
        self.queue.push_back((leave, frame));
        Verdict::Queued(leave)
    }

    /// When the next frame is due, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.front().map(|(t, _)| *t)
    }

    /// The next frame due at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Vec<u8>> {
        match self.queue.front() {
            Some((t, _)) if *t <= now => {
                let (_, frame) = self.queue.pop_front()?;
                self.in_flight_bytes -= frame.len() as u64;
                Some(frame)
            }
            _ => None,
        }
    }
}

/// Why a link parameter was not understood.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("{0:?}: not a number with a unit (e.g. {1})")]
    Unit(String, &'static str),
    #[error("{0:?}: a loss is a fraction in [0, 1] or a percentage (e.g. 1%)")]
    Loss(String),
    #[error("{0:?}: give one value for both directions or A/B (a->b / b->a)")]
    Split(String),
}

/// `V` or `A/B`: the same value both ways, or a->b and b->a.
pub fn split<T: Copy>(s: &str, one: impl Fn(&str) -> Result<T, ParseError>) -> Result<(T, T), ParseError> {
    match s.split('/').collect::<Vec<_>>()[..] {
        [v] => {
            let v = one(v)?;
            Ok((v, v))
        }
        [a, b] => Ok((one(a)?, one(b)?)),
        _ => Err(ParseError::Split(s.to_string())),
    }
}

fn number_and_unit(s: &str) -> Option<(f64, String)> {
    let s = s.trim();
    let at = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let n: f64 = s[..at].parse().ok()?;
    Some((n, s[at..].trim().to_ascii_lowercase()))
}

/// A duration: `175ms`, `10us`, `1s`, `0`.
pub fn delay_ns(s: &str) -> Result<u64, ParseError> {
    let bad = || ParseError::Unit(s.to_string(), "175ms, 500us, 1s");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let scale = match unit.as_str() {
        "" if n == 0.0 => 1.0,
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return Err(bad()),
    };
    Ok((n * scale).round() as u64)
}

/// A rate in bits/s, tc style: `12mbit`, `500kbit`, `1gbit`, `12000000` (bit/s); `0` = unlimited.
pub fn rate_bps(s: &str) -> Result<u64, ParseError> {
    let bad = || ParseError::Unit(s.to_string(), "12mbit, 500kbit, 1gbit, 0 for unlimited");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let scale = match unit.as_str() {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(bad()),
    };
    Ok((n * scale).round() as u64)
}

/// A size in bytes: `500kb`, `1mb`, `64000`.
pub fn bytes(s: &str) -> Result<u64, ParseError> {
    let bad = || ParseError::Unit(s.to_string(), "500kb, 2mb, 64000 (bytes)");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        _ => return Err(bad()),
    };
    Ok((n * scale).round() as u64)
}

/// A loss probability: `0.01` or `1%`.
pub fn loss(s: &str) -> Result<f64, ParseError> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| ParseError::Loss(s.to_string()))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(ParseError::Loss(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn units() {
        assert_eq!(delay_ns("175ms"), Ok(175 * MS));
        assert_eq!(delay_ns("0"), Ok(0));
        assert_eq!(delay_ns("1.5s"), Ok(1500 * MS));
        assert!(delay_ns("175").is_err(), "a bare delay has no unit to guess");
        assert_eq!(rate_bps("12mbit"), Ok(12_000_000));
        assert_eq!(rate_bps("12Mbit"), Ok(12_000_000));
        assert_eq!(rate_bps("0"), Ok(0));
        assert!(rate_bps("12mb").is_err(), "mb would be megabytes: refuse rather than guess");
        assert_eq!(bytes("500kb"), Ok(500_000));
        assert_eq!(loss("1%"), Ok(0.01));
        assert_eq!(loss("0.25"), Ok(0.25));
        assert!(loss("120%").is_err());
        assert_eq!(split("10ms/20ms", delay_ns), Ok((10 * MS, 20 * MS)));
        assert_eq!(split("10ms", delay_ns), Ok((10 * MS, 10 * MS)));
        assert!(split("1/2/3", delay_ns).is_err());
    }

    #[test]
    fn frames_leave_after_serialization_and_delay() {
        // 12 Mbit/s: a 1500-byte frame takes 1 ms on the wire.
        let shape = Shape { delay_ns: 175 * MS, rate_bps: 12_000_000, loss: 0.0, limit_bytes: 10_000 };
        let mut d = Direction::new(shape, 1);
        assert_eq!(d.offer(0, vec![0; 1500]), Verdict::Queued(176 * MS));
        // A back-to-back frame waits for the first one's serialization.
        assert_eq!(d.offer(0, vec![0; 1500]), Verdict::Queued(177 * MS));
        // One arriving after the bottleneck went idle does not wait.
        assert_eq!(d.offer(10 * MS, vec![0; 1500]), Verdict::Queued(186 * MS));
        assert_eq!(d.pop_due(176 * MS - 1), None);
        assert!(d.pop_due(176 * MS).is_some());
        assert!(d.pop_due(177 * MS).is_some());
        assert_eq!(d.next_due(), Some(186 * MS));
    }

    #[test]
    fn the_queue_drops_at_its_tail() {
        let shape = Shape { delay_ns: 0, rate_bps: 12_000_000, loss: 0.0, limit_bytes: 4500 };
        let mut d = Direction::new(shape, 1);
        for _ in 0..3 {
            assert!(matches!(d.offer(0, vec![0; 1500]), Verdict::Queued(_)));
        }
        assert_eq!(d.offer(0, vec![0; 1500]), Verdict::Dropped);
        // After one frame's serialization time there is room for one more.
        assert!(matches!(d.offer(MS, vec![0; 1500]), Verdict::Queued(_)));
        assert_eq!(d.stats.dropped, 1);
    }

    #[test]
    fn loss_is_seeded_and_near_its_probability() {
        let shape = Shape { loss: 0.01, ..Shape::default() };
        let pattern = |seed| {
            let mut d = Direction::new(shape, seed);
            (0..100_000).map(|i| d.offer(i, vec![0; 64]) == Verdict::Lost).collect::<Vec<_>>()
        };
        let a = pattern(7);
        assert_eq!(a, pattern(7), "the same seed loses the same frames");
        assert_ne!(a, pattern(8));
        let lost = a.iter().filter(|l| **l).count();
        // Binomial(100000, 0.01): sd ~31.
        assert!((850..1150).contains(&lost), "{lost} of 100000 lost at 1%");
    }
}
