//! Asynchronous sends: bytes a guest handed over without waiting, which the stack has not taken
//! yet. They go out in order as the stack allows; while any wait, the socket does not look
//! writable to the guest, and an error is kept for the socket's next call, the way the kernel
//! keeps a pending socket error.

use crate::stack::{Errno, Stack};

/// More than a guest can have in flight (every nqe an asynchronous send of BUF_SIZE bytes);
/// a queue past it means a guest that does not follow the protocol.
pub(crate) const MAX_QUEUED: usize = (netkernel_abi::NQE_COUNT * netkernel_abi::BUF_SIZE) as usize;

#[derive(Default)]
pub(crate) struct SendQueue {
    buf: Vec<u8>,
    off: usize,
    /// An error an asynchronous send met, reported by the socket's next call.
    pub deferred: Option<Errno>,
    /// shutdown(how) asked for while bytes were queued: done once they are out.
    pub shutdown_after: Option<i32>,
}

impl SendQueue {
    pub fn queued(&self) -> usize {
        self.buf.len() - self.off
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.off == self.buf.len() {
            self.buf.clear();
            self.off = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Hands queued bytes to the stack, at most `limit` (the tenant's rate limit). Returns the
    /// bytes sent; the queue is empty afterwards unless the stack is full or the limit hit.
    pub fn flush<S: Stack>(&mut self, stack: &mut S, fd: &S::Handle, limit: usize) -> usize {
        let mut sent = 0;
        while self.off < self.buf.len() && sent < limit {
            // limit is usize::MAX without a rate limit: the sum must not wrap.
            let end = self.buf.len().min(self.off.saturating_add(limit - sent));
            match stack.send(fd, &self.buf[self.off..end], 0, &[]) {
                Ok(n) => {
                    self.off += n;
                    sent += n;
                }
                Err(libc::EAGAIN) => return sent,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
        if self.off < self.buf.len() {
            return sent;
        }
        self.buf.clear();
        self.off = 0;
        if let Some(how) = self.shutdown_after.take() {
            let _ = stack.shutdown(fd, how);
        }
        sent
    }

    /// An asynchronous send failed: its bytes are lost, as they would be in a kernel socket
    /// that met the same error, and the error waits for the next call. EPIPE needs no keeping:
    /// the stack answers every later send with it anyway.
    pub fn fail(&mut self, e: Errno) {
        self.buf.clear();
        self.off = 0;
        if e != libc::EPIPE && e != libc::EAGAIN {
            self.deferred = Some(e);
        }
    }

    /// The readiness the guest should see: not writable while bytes wait, in error while an
    /// error waits.
    pub fn adjust(&self, mut mask: u32) -> u32 {
        if self.queued() > 0 {
            mask &= !((libc::POLLOUT | libc::POLLWRNORM) as u32);
        }
        if self.deferred.is_some() {
            mask |= libc::POLLERR as u32;
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{Ready, TcpStats};
    use std::os::fd::{AsFd, BorrowedFd};
    use std::time::Instant;

    /// A stack whose sockets take `room` bytes per send, then EAGAIN until refilled.
    struct Trickle {
        room: usize,
        taken: Vec<u8>,
        wait: std::fs::File,
    }

    impl Stack for Trickle {
        type Handle = ();

        fn kind(&self) -> &'static str {
            "trickle"
        }
        fn congestion(&self) -> String {
            String::new()
        }
        fn socket(&mut self, _: i32, _: i32, _: i32) -> Result<(), Errno> {
            Err(libc::EAFNOSUPPORT)
        }
        fn bind(&mut self, _: &(), _: &[u8]) -> Result<(), Errno> {
            Ok(())
        }
        fn listen(&mut self, _: &(), _: i32) -> Result<(), Errno> {
            Ok(())
        }
        fn accept(&mut self, _: &(), _: &mut [u8]) -> Result<((), usize), Errno> {
            Err(libc::EAGAIN)
        }
        fn connect(&mut self, _: &(), _: &[u8]) -> Result<(), Errno> {
            Ok(())
        }
        fn send(&mut self, _: &(), data: &[u8], _: i32, _: &[u8]) -> Result<usize, Errno> {
            let n = data.len().min(self.room);
            if n == 0 {
                return Err(libc::EAGAIN);
            }
            self.room -= n;
            self.taken.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn recv(&mut self, _: &(), _: &mut [u8], _: i32, _: &mut [u8]) -> Result<(usize, usize), Errno> {
            Err(libc::EAGAIN)
        }
        fn shutdown(&mut self, _: &(), _: i32) -> Result<(), Errno> {
            Ok(())
        }
        fn getsockopt(&mut self, _: &(), _: i32, _: i32, _: &mut [u8]) -> Result<usize, Errno> {
            Ok(0)
        }
        fn setsockopt(&mut self, _: &(), _: i32, _: i32, _: &[u8]) -> Result<(), Errno> {
            Ok(())
        }
        fn getsockname(&mut self, _: &(), _: &mut [u8]) -> Result<usize, Errno> {
            Ok(0)
        }
        fn getpeername(&mut self, _: &(), _: &mut [u8]) -> Result<usize, Errno> {
            Ok(0)
        }
        fn ioctl(&mut self, _: &(), _: u64) -> Result<i64, Errno> {
            Ok(0)
        }
        fn poll_mask(&mut self, _: &()) -> u32 {
            0
        }
        fn tcp_stats(&mut self, _: &()) -> Option<TcpStats> {
            None
        }
        fn watch(&mut self, _: &(), _: u64) -> Result<(), Errno> {
            Ok(())
        }
        fn unwatch(&mut self, _: &()) {}
        fn wait_fd(&self) -> BorrowedFd<'_> {
            self.wait.as_fd()
        }
        fn poll(&mut self, _: Instant, _: bool, _: &mut Vec<Ready>) -> Option<Instant> {
            None
        }
    }

    #[test]
    fn a_queue_flushed_in_pieces_without_a_limit_goes_out_in_order() {
        let wait = std::fs::File::open("/dev/null").unwrap();
        let mut stack = Trickle { room: 3, taken: vec![], wait };
        let mut q = SendQueue::default();
        q.push(b"0123456789");
        assert_eq!(q.flush(&mut stack, &(), usize::MAX), 3);
        assert_eq!(q.queued(), 7);
        // The second flush starts inside the queue (off > 0) with no rate limit.
        stack.room = 4;
        assert_eq!(q.flush(&mut stack, &(), usize::MAX), 4);
        stack.room = 100;
        assert_eq!(q.flush(&mut stack, &(), usize::MAX), 3);
        assert_eq!(q.queued(), 0);
        assert_eq!(stack.taken, b"0123456789");
    }
}
