//! Per-connection RTT, congestion window and retransmissions, measured from the wire.
//!
//! smoltcp keeps its RTT estimator and congestion window private, but the stack sees every
//! segment its connections send and receive, so it measures them passively, as a capture tool
//! would. These are estimates from the wire, not smoltcp's own numbers:
//! - RTT: one data segment (or SYN, FIN) at a time is timed from its first transmission to
//!   the first ACK that covers it; a sample whose segment was retransmitted is discarded
//!   (Karn). Samples are smoothed as RFC 6298's SRTT and RTTVAR.
//! - Retransmissions: segments carrying sequence space below the highest already sent.
//! - cwnd: the largest flight (snd_nxt - snd_una) seen over the last smoothed RTT, in
//!   segments of the largest payload seen: what the sender let out, which the receive window
//!   or the application may have limited rather than the congestion window.

use std::net::SocketAddr;

use smoltcp::time::{Duration, Instant};

use crate::frame::{Peek, ACK, FIN, SYN};

/// Linux's default MSS when nothing larger was seen (TCP_MSS_DEFAULT).
const MSS_DEFAULT: u32 = 536;
/// How long a flight window lasts before the first RTT sample.
const WINDOW_DEFAULT: Duration = Duration::from_millis(100);

fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[derive(Debug, Default, Clone)]
pub struct Meter {
    started: bool,
    snd_una: u32,
    snd_nxt: u32,
    /// The segment being timed: the sequence number that acknowledges it, when it left.
    timed: Option<(u32, Instant)>,
    /// Smoothed RTT and its variation, microseconds.
    srtt: Option<f64>,
    rttvar: f64,
    pub retrans: u32,
    mss: u32,
    /// Largest flight in the current window, which started at `window_start`.
    flight_max: u32,
    window_start: Option<Instant>,
    /// Largest flight of the last completed window with any data in flight.
    flight_last: u32,
}

impl Meter {
    /// A segment this side sent.
    pub fn sent(&mut self, p: &Peek, now: Instant) {
        let len = p.payload as u32 + u32::from(p.flags & SYN != 0) + u32::from(p.flags & FIN != 0);
        if !self.started {
            self.started = true;
            self.snd_una = p.seq;
            self.snd_nxt = p.seq;
        }
        if p.payload > 0 {
            self.mss = self.mss.max(p.payload as u32);
        }
        if len == 0 {
            return;
        }
        let end = p.seq.wrapping_add(len);
        // A keepalive probe (one byte or none below snd_una) is not a retransmission.
        let probe = p.seq == self.snd_una.wrapping_sub(1) && len <= 1;
        if lt(p.seq, self.snd_nxt) && !probe {
            self.retrans += 1;
            // Karn: an ACK may now answer either transmission.
            if self.timed.is_some_and(|(t, _)| lt(p.seq, t)) {
                self.timed = None;
            }
        }
        if lt(self.snd_nxt, end) {
            if self.timed.is_none() && !lt(p.seq, self.snd_nxt) {
                self.timed = Some((end, now));
            }
            self.snd_nxt = end;
        }
        self.note_flight(now);
    }

    /// A segment this side received (its ACK field acknowledges what we sent).
    pub fn received(&mut self, p: &Peek, now: Instant) {
        if !self.started || p.flags & ACK == 0 {
            return;
        }
        let ack = p.ack;
        if lt(self.snd_una, ack) && !lt(self.snd_nxt, ack) {
            self.snd_una = ack;
            if let Some((t, at)) = self.timed {
                if !lt(ack, t) {
                    self.timed = None;
                    self.sample((now - at).total_micros() as f64);
                }
            }
        }
        self.note_flight(now);
    }

    fn sample(&mut self, r: f64) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2.0;
            }
            Some(s) => {
                self.rttvar = 0.75 * self.rttvar + 0.25 * (s - r).abs();
                self.srtt = Some(0.875 * s + 0.125 * r);
            }
        }
    }

    fn note_flight(&mut self, now: Instant) {
        let flight = self.snd_nxt.wrapping_sub(self.snd_una);
        let len = self.srtt.map_or(WINDOW_DEFAULT, |s| Duration::from_micros(s.max(1.0) as u64));
        match self.window_start {
            Some(t) if now < t + len => {}
            _ => {
                if self.flight_max > 0 {
                    self.flight_last = self.flight_max;
                }
                self.flight_max = 0;
                self.window_start = Some(now);
            }
        }
        self.flight_max = self.flight_max.max(flight);
    }

    /// Smoothed RTT and its variation, microseconds (0: no sample yet).
    pub fn rtt_us(&self) -> (u32, u32) {
        self.srtt.map_or((0, 0), |s| (s as u32, self.rttvar as u32))
    }

    pub fn mss(&self) -> u32 {
        if self.mss == 0 {
            MSS_DEFAULT
        } else {
            self.mss
        }
    }

    /// Congestion window estimate, segments.
    pub fn cwnd(&self) -> u32 {
        let bytes = self.flight_max.max(self.flight_last);
        bytes.div_ceil(self.mss())
    }
}

/// Meters by (local, remote), kept for as long as the stack's index knows the tuple.
#[derive(Default)]
pub struct Meters {
    map: std::collections::HashMap<(SocketAddr, SocketAddr), Meter>,
    /// Inserts since the last sweep of meters whose connection is gone.
    inserts: usize,
}

impl Meters {
    pub fn get(&self, local: SocketAddr, remote: SocketAddr) -> Option<&Meter> {
        self.map.get(&(local, remote))
    }

    pub fn get_mut(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<&mut Meter> {
        self.map.get_mut(&(local, remote))
    }

    /// The meter of a tuple, made on its first segment. `alive` says whether a tuple still
    /// belongs to a connection: sweeping once the map has doubled since the last sweep keeps
    /// the cost per connection constant.
    pub fn entry(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        alive: impl Fn(&(SocketAddr, SocketAddr)) -> bool,
    ) -> &mut Meter {
        if !self.map.contains_key(&(local, remote)) {
            self.inserts += 1;
            if self.inserts > self.map.len().max(64) {
                self.inserts = 0;
                self.map.retain(|k, _| alive(k));
            }
        }
        self.map.entry((local, remote)).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, ack: u32, flags: u8, payload: usize) -> Peek {
        Peek {
            proto: crate::frame::TCP,
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:2".parse().unwrap(),
            flags,
            payload,
            seq,
            ack,
        }
    }

    #[test]
    fn karn_srtt_and_retransmissions() {
        let mut m = Meter::default();
        let t = |ms: i64| Instant::from_millis(ms);
        m.sent(&seg(1000, 0, SYN, 0), t(0));
        m.received(&seg(5000, 1001, SYN | ACK, 0), t(10));
        assert_eq!(m.rtt_us().0, 10_000);
        m.sent(&seg(1001, 5001, ACK, 1000), t(10));
        m.sent(&seg(2001, 5001, ACK, 1000), t(10));
        m.received(&seg(5001, 3001, ACK, 0), t(30));
        // 7/8 * 10 ms + 1/8 * 20 ms
        assert_eq!(m.rtt_us().0, 11_250);
        assert_eq!(m.cwnd(), 2);
        // A retransmitted segment gives no sample.
        m.sent(&seg(3001, 5001, ACK, 1000), t(40));
        m.sent(&seg(3001, 5001, ACK, 1000), t(240));
        m.received(&seg(5001, 4001, ACK, 0), t(250));
        assert_eq!(m.retrans, 1);
        assert_eq!(m.rtt_us().0, 11_250);
        // A keepalive probe is not a retransmission.
        m.sent(&seg(4000, 5001, ACK, 0), t(9000));
        assert_eq!(m.retrans, 1);
    }
}
