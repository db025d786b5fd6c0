//! The one trait ServiceLib calls a network stack through.

use std::os::fd::{BorrowedFd, OwnedFd};

/// A Linux errno value (positive).
pub type Errno = i32;

/// What a recvmsg returned: bytes, source address length, msg_controllen and msg_flags.
pub struct Received {
    pub len: usize,
    pub from_len: usize,
    pub control_len: usize,
    pub flags: i32,
}

/// A network stack an NSM runs. Sockets are file descriptors whose readiness ServiceLib watches
/// with epoll (edge-triggered); all of them are non-blocking: blocking is the guest's business.
/// Return values and errors must be what Linux would return for the same call, since guests
/// hand them unchanged to applications.
pub trait Stack {
    /// Short name for telemetry ("kernel", ...).
    fn kind(&self) -> &'static str;
    /// The congestion control new TCP sockets use.
    fn congestion(&self) -> String;
    fn socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<OwnedFd, Errno>;
    fn bind(&mut self, s: BorrowedFd, addr: &[u8]) -> Result<(), Errno>;
    fn listen(&mut self, s: BorrowedFd, backlog: i32) -> Result<(), Errno>;
    /// Accepts one connection; fills `addr` with the peer and returns its length.
    fn accept(&mut self, s: BorrowedFd, addr: &mut [u8]) -> Result<(OwnedFd, usize), Errno>;
    fn connect(&mut self, s: BorrowedFd, addr: &[u8]) -> Result<(), Errno>;
    fn send(&mut self, s: BorrowedFd, data: &[u8], flags: i32, to: &[u8]) -> Result<usize, Errno>;
    /// Returns bytes received and the length of the source address written to `from`.
    fn recv(&mut self, s: BorrowedFd, buf: &mut [u8], flags: i32, from: &mut [u8]) -> Result<(usize, usize), Errno>;
    /// A receive with ancillary data into `control` (recvmsg(2)); a stack without any returns
    /// none.
    fn recvmsg(
        &mut self,
        s: BorrowedFd,
        buf: &mut [u8],
        flags: i32,
        from: &mut [u8],
        control: &mut [u8],
    ) -> Result<Received, Errno> {
        let _ = control;
        let (len, from_len) = self.recv(s, buf, flags, from)?;
        Ok(Received { len, from_len, control_len: 0, flags: 0 })
    }
    /// A send with control messages (sendmsg(2)); a stack that takes none ignores them.
    fn sendmsg(&mut self, s: BorrowedFd, data: &[u8], flags: i32, to: &[u8], control: &[u8]) -> Result<usize, Errno> {
        let _ = control;
        self.send(s, data, flags, to)
    }
    fn shutdown(&mut self, s: BorrowedFd, how: i32) -> Result<(), Errno>;
    /// Returns the option's length.
    fn getsockopt(&mut self, s: BorrowedFd, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno>;
    fn setsockopt(&mut self, s: BorrowedFd, level: i32, name: i32, val: &[u8]) -> Result<(), Errno>;
    fn getsockname(&mut self, s: BorrowedFd, addr: &mut [u8]) -> Result<usize, Errno>;
    fn getpeername(&mut self, s: BorrowedFd, addr: &mut [u8]) -> Result<usize, Errno>;
    fn ioctl(&mut self, s: BorrowedFd, request: u64) -> Result<i64, Errno>;
    /// Current poll(2) mask of the socket.
    fn poll_mask(&mut self, s: BorrowedFd) -> u32;
}
