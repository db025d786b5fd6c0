//! Two processes of one user NSM during an upgrade (`ctl upgrade`). smoltcp's connections live
//! in the process that made them and the wire (a TAP device or packet socket) has one reader,
//! so an upgrade cannot hand connections over as the kernel NSM does. Instead the new process
//! becomes the wire's reader and serves every new attachment; the old one keeps its
//! attachments, and their connections, until their processes exit ("drains"), and writes its
//! frames to the wire itself.
//!
//! A frame the new process has no socket for (no 4-tuple, no listener for a SYN, no UDP socket
//! on the port) goes to the old one over a unix stream socket pair, where it is served or
//! answered as any unknown frame (a RST). Neighbour resolution and ICMP errors reach both. The
//! loopback (127/8 and the NSM's own addresses) is bridged the same way in both directions, so
//! guests of either process reach each other's listeners; a frame that came from the peer is
//! never sent back. Each message is one frame behind a one-byte interface tag.
//!
//! Ports: from the upgrade on, the old process takes even ephemeral ports and the new one odd
//! ones, and the new one never takes a port the old one used at the upgrade, so the two never
//! make the same 4-tuple.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The interface a bridged frame belongs to.
pub(crate) const TAG_EXT: u8 = 0;
pub(crate) const TAG_LO: u8 = 1;
/// A relayed connection's notice (relay.rs): its relay id (u64) and a code (i32), little-endian.
const TAG_NOTICE: u8 = 2;
/// A relayed connection's telemetry (relay.rs): relay id (u64), TCP state (u8), RTT µs, cwnd,
/// retransmits (u32 each), little-endian.
const TAG_STATS: u8 = 3;
const STATS_LEN: usize = 8 + 1 + 4 * 3;

/// Frames waiting for room in the socket beyond this many bytes are dropped (TCP retransmits
/// them), so a stalled peer cannot grow this process without bound.
const MAX_QUEUED: usize = 16 << 20;

/// A frame on the channel: its length (u32, little-endian, tag included), its tag, its bytes.
/// A stream socket, not a datagram one: a unix datagram socket queues only
/// net.unix.max_dgram_qlen (10) messages, which a burst of forwarded frames overflowed (tens of
/// retransmissions a second on a draining iperf3 connection).
const HEADER: usize = 5;

pub(crate) struct Peer {
    pub chan: OwnedFd,
    /// This process is the old one: its wire frames come from the peer, not the wire.
    pub old: bool,
    /// Bytes read and not yet a whole frame; bytes to send that the socket had no room for.
    inbuf: Vec<u8>,
    out: VecDeque<u8>,
    scratch: Vec<u8>,
    /// Frames sent to the peer, and frames dropped for want of room (TCP retransmits them).
    pub sent: u64,
    pub dropped: u64,
    /// The peer closed its end (it exited).
    pub gone: bool,
    /// Notices received (relay.rs), for the stack to take.
    pub notices: Vec<(u64, i32)>,
    /// Telemetry of relayed connections received, for the stack to take.
    pub stats: Vec<(u64, crate::seam::TcpStats)>,
}

/// A unix stream socket pair, non-blocking and close-on-exec, with `size` bytes of buffer.
pub(crate) fn pair(size: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: fds is a live array of two c_ints, as socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just returned by socketpair and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&a, &b] {
        // SAFETY: size is a live c_int and the length passed is its size. Best effort: without
        // CAP_NET_ADMIN SO_SNDBUFFORCE fails and the default stays.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    Ok((a, b))
}

impl Peer {
    pub fn new(chan: OwnedFd, old: bool) -> io::Result<Peer> {
        crate::device::set_nonblocking(std::os::fd::AsFd::as_fd(&chan))?;
        Ok(Peer {
            chan,
            old,
            inbuf: Vec::new(),
            out: VecDeque::new(),
            scratch: vec![0; 256 << 10],
            sent: 0,
            dropped: 0,
            gone: false,
            notices: Vec::new(),
            stats: Vec::new(),
        })
    }

    /// Queues one frame of interface `tag` for the peer; `flush` sends what is queued (once a
    /// batch, not a system call a frame).
    pub fn send(&mut self, tag: u8, frame: &[u8]) {
        if self.gone {
            return;
        }
        if self.out.len() + frame.len() + HEADER > MAX_QUEUED {
            self.dropped += 1;
            return;
        }
        self.out.extend(((frame.len() + 1) as u32).to_le_bytes());
        self.out.push_back(tag);
        self.out.extend(frame);
        self.sent += 1;
    }

    /// Queues a notice (relay.rs). Never dropped, unlike frames: TCP retransmits no notice.
    pub fn send_notice(&mut self, notice: &[u8; 12]) {
        if !self.gone {
            self.out.extend(13u32.to_le_bytes());
            self.out.push_back(TAG_NOTICE);
            self.out.extend(notice);
        }
    }

    /// Queues a relayed connection's telemetry (relay.rs); dropped when the channel is full.
    pub fn send_stats(&mut self, relay: u64, s: &crate::seam::TcpStats) {
        let mut b = [0u8; STATS_LEN];
        b[..8].copy_from_slice(&relay.to_le_bytes());
        b[8] = s.state;
        for (i, v) in [s.rtt_us, s.cwnd, s.retrans].into_iter().enumerate() {
            b[9 + 4 * i..13 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        self.send(TAG_STATS, &b);
    }

    /// Whether bytes wait for room in the socket.
    pub fn backed_up(&self) -> bool {
        !self.out.is_empty() && !self.gone
    }

    /// Writes what is queued, as far as the socket takes it.
    pub fn flush(&mut self) {
        while !self.out.is_empty() && !self.gone {
            let (a, _) = self.out.as_slices();
            // SAFETY: a is a live, readable slice of the length passed.
            let n = unsafe {
                libc::send(self.chan.as_raw_fd(), a.as_ptr().cast(), a.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return,
                    _ => {
                        self.gone = true;
                        return;
                    }
                }
            }
            self.out.drain(..n as usize);
        }
    }

    /// Reads what the peer sent, at most `max` frames onto `ext` or `lo` by tag. Returns whether
    /// more may wait.
    pub fn recv(&mut self, ext: &mut VecDeque<Vec<u8>>, lo: &mut VecDeque<Vec<u8>>, max: usize) -> bool {
        self.flush();
        let mut got = 0;
        loop {
            // Whole frames first.
            let mut at = 0;
            while got < max && self.inbuf.len() >= at + 4 {
                let len = u32::from_le_bytes(self.inbuf[at..at + 4].try_into().expect("4 bytes")) as usize;
                if len == 0 || self.inbuf.len() < at + 4 + len {
                    break;
                }
                let frame = self.inbuf[at + HEADER..at + 4 + len].to_vec();
                match self.inbuf[at + 4] {
                    TAG_EXT => ext.push_back(frame),
                    TAG_NOTICE if frame.len() == 12 => self.notices.push((
                        u64::from_le_bytes(frame[..8].try_into().expect("8 bytes")),
                        i32::from_le_bytes(frame[8..].try_into().expect("4 bytes")),
                    )),
                    TAG_STATS if frame.len() == STATS_LEN => {
                        let u32_at = |i: usize| u32::from_le_bytes(frame[i..i + 4].try_into().expect("4 bytes"));
                        let s = crate::seam::TcpStats {
                            state: frame[8],
                            rtt_us: u32_at(9),
                            cwnd: u32_at(13),
                            retrans: u32_at(17),
                            delivery_rate: 0,
                        };
                        self.stats.push((u64::from_le_bytes(frame[..8].try_into().expect("8 bytes")), s));
                    }
                    _ => lo.push_back(frame),
                }
                at += 4 + len;
                got += 1;
            }
            self.inbuf.drain(..at);
            if got >= max {
                return true;
            }
            // SAFETY: scratch is a live, writable buffer of the length passed.
            let n =
                unsafe { libc::recv(self.chan.as_raw_fd(), self.scratch.as_mut_ptr().cast(), self.scratch.len(), 0) };
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n == 0 {
                self.gone = true;
            }
            if n <= 0 {
                return false;
            }
            self.inbuf.extend_from_slice(&self.scratch[..n as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of any size (up to the loopback's 64 KiB) cross in order with their tags, however
    /// the stream cuts them, and a peer that reads nothing holds no more than MAX_QUEUED.
    #[test]
    fn frames_cross_whole_in_order_with_their_tags() {
        let (a, b) = pair(8 << 20).unwrap();
        let (mut tx, mut rx) = (Peer::new(a, false).unwrap(), Peer::new(b, true).unwrap());
        let frames: Vec<(u8, Vec<u8>)> =
            (0..400u32).map(|i| ((i % 2) as u8, (0..(i * 163 % 65535 + 1)).map(|j| (j ^ i) as u8).collect())).collect();
        let (mut ext, mut lo) = (VecDeque::new(), VecDeque::new());
        for (tag, f) in &frames {
            tx.send(*tag, f);
            tx.flush();
            // Read a little now and then: frames arrive cut anywhere.
            rx.recv(&mut ext, &mut lo, 3);
        }
        while tx.backed_up() || rx.recv(&mut ext, &mut lo, usize::MAX) {
            tx.flush();
        }
        rx.recv(&mut ext, &mut lo, usize::MAX);
        let want = |t: u8| frames.iter().filter(|(tag, _)| *tag == t).map(|(_, f)| f.clone()).collect::<Vec<_>>();
        assert_eq!(Vec::from(ext), want(TAG_EXT));
        assert_eq!(Vec::from(lo), want(TAG_LO));
        // Nobody reads: the queue stops at MAX_QUEUED and counts what it dropped.
        let big = vec![7u8; 60_000];
        for _ in 0..(2 * MAX_QUEUED / big.len()) {
            tx.send(TAG_EXT, &big);
            tx.flush();
        }
        assert!(tx.dropped > 0 && tx.out.len() <= MAX_QUEUED);
        drop(rx);
        tx.flush();
        assert!(tx.gone, "a closed peer is noticed");
    }
}
