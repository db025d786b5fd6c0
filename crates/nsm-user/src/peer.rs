//! Two processes of one user NSM during an upgrade (`ctl upgrade`). smoltcp's connections live
//! in the process that made them and the wire (a TAP device or packet socket) has one reader,
//! so an upgrade cannot hand connections over as the kernel NSM does. Instead the new process
//! becomes the wire's reader and serves every new attachment; the old one keeps its
//! attachments, and their connections, until their processes exit ("drains"), and writes its
//! frames to the wire itself.
//!
//! A frame the new process has no socket for (no 4-tuple, no listener for a SYN, no UDP socket
//! on the port) goes to the old one over a SOCK_SEQPACKET socket pair, where it is served or
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

/// Room for the largest frame either interface carries (the loopback's 64 KiB MTU) and a tag.
const MAX_MESSAGE: usize = 65536 + 1;

pub(crate) struct Peer {
    pub chan: OwnedFd,
    /// This process is the old one: its wire frames come from the peer, not the wire.
    pub old: bool,
    buf: Vec<u8>,
    /// Frames sent to the peer, and frames the socket had no room for (TCP retransmits them).
    pub sent: u64,
    pub dropped: u64,
    /// The peer closed its end (it exited).
    pub gone: bool,
}

/// A SOCK_SEQPACKET socket pair, non-blocking and close-on-exec, with large send buffers: a
/// burst of forwarded frames should not be dropped for want of room.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let ty = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: fds is a live array of two c_ints, as socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just returned by socketpair and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&a, &b] {
        let size: libc::c_int = 8 << 20;
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
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        unsafe {
            let fl = libc::fcntl(chan.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(chan.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Peer { chan, old, buf: vec![0; MAX_MESSAGE], sent: 0, dropped: 0, gone: false })
    }

    /// Sends one frame of interface `tag` to the peer; a full socket drops it, as a full queue.
    pub fn send(&mut self, tag: u8, frame: &[u8]) {
        if self.gone {
            return;
        }
        let iov = [
            libc::iovec { iov_base: (&tag as *const u8).cast_mut().cast(), iov_len: 1 },
            libc::iovec { iov_base: frame.as_ptr().cast_mut().cast(), iov_len: frame.len() },
        ];
        // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: msg points at two live iovecs over readable memory of the lengths given;
        // sendmsg only reads them.
        let n = unsafe { libc::sendmsg(self.chan.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            self.dropped += 1;
            if io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE) {
                self.gone = true;
            }
        } else {
            self.sent += 1;
        }
    }

    /// Reads up to `max` frames the peer sent, onto `ext` or `lo` by tag. Returns how many, and
    /// whether more may wait.
    pub fn recv(&mut self, ext: &mut VecDeque<Vec<u8>>, lo: &mut VecDeque<Vec<u8>>, max: usize) -> (usize, bool) {
        let mut got = 0;
        while got < max {
            // SAFETY: buf is a live, writable buffer of the length passed.
            let n = unsafe { libc::recv(self.chan.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n == 0 {
                self.gone = true;
            }
            if n <= 0 {
                return (got, false);
            }
            let frame = self.buf[1..n as usize].to_vec();
            match self.buf[0] {
                TAG_EXT => ext.push_back(frame),
                _ => lo.push_back(frame),
            }
            got += 1;
        }
        (got, true)
    }
}
