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

    /// The bytes still to send (to hand the queue to another NSM process).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.off..]
    }

    /// A queue holding `bytes`, as another process left it.
    pub fn restore(bytes: &[u8], deferred: Option<Errno>, shutdown_after: Option<i32>) -> SendQueue {
        SendQueue { buf: bytes.to_vec(), off: 0, deferred, shutdown_after }
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
    use crate::fake::{sockaddr, FakeStack};

    #[test]
    fn a_queue_flushed_in_pieces_without_a_limit_goes_out_in_order() {
        let mut stack = FakeStack::new();
        let l = stack.socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        stack.bind(&l, &sockaddr(7000)).unwrap();
        stack.listen(&l, 1).unwrap();
        let c = stack.socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        stack.connect(&c, &sockaddr(7000)).unwrap();
        let (s, _) = stack.accept(&l, &mut [0; 128]).unwrap();
        let mut q = SendQueue::default();
        q.push(b"0123456789");
        stack.rcvbuf = 3;
        assert_eq!(q.flush(&mut stack, &c, usize::MAX), 3);
        assert_eq!(q.queued(), 7);
        let mut taken = stack.drain(s);
        // The second flush starts inside the queue (off > 0) with no rate limit.
        stack.rcvbuf = 4;
        assert_eq!(q.flush(&mut stack, &c, usize::MAX), 4);
        taken.extend(stack.drain(s));
        stack.rcvbuf = 100;
        assert_eq!(q.flush(&mut stack, &c, usize::MAX), 3);
        assert_eq!(q.queued(), 0);
        taken.extend(stack.drain(s));
        assert_eq!(taken, b"0123456789");
    }
}
