//! The user NSM's network stack: smoltcp in the NSM process, over one TAP device or AF_PACKET
//! socket (the Machnet least-common-denominator model: one queue, no offloads), serving its
//! guests' sockets through ServiceLib's `Stack` trait.
//!
//! Two smoltcp interfaces: one on the wire, one in memory for 127.0.0.1, ::1 and the stack's own
//! addresses (traffic between two of its own sockets never reaches the device). Each received
//! packet is peeked at before smoltcp sees it, so the stack knows from a hashed 4-tuple index
//! which socket it concerns and recomputes readiness only for those.

pub mod config;
pub mod device;
mod frame;
mod opts;
mod shard;
// Kept byte for byte as ServiceLib has it, so the merge is a deletion.
#[rustfmt::skip]
pub mod seam;
pub mod sockaddr;
mod stack;
mod table;
mod tcp;
mod udp;

#[cfg(test)]
mod tests;

use std::os::fd::BorrowedFd;
use std::time::Instant;

pub use config::{ConfigError, Link, UserConfig};
pub use device::{open_link, open_packet, open_tap};
pub use stack::{Handle, UserStack};

use seam::{Errno, Ready, Stack, TcpStats};
use stack::Proto;

impl Stack for UserStack {
    type Handle = Handle;

    fn kind(&self) -> &'static str {
        "user"
    }

    fn congestion(&self) -> String {
        self.congestion_name().to_owned()
    }

    fn socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<Handle, Errno> {
        self.do_socket(domain, ty, protocol)
    }

    fn bind(&mut self, s: &Handle, addr: &[u8]) -> Result<(), Errno> {
        self.do_bind(s.id, addr)
    }

    fn listen(&mut self, s: &Handle, backlog: i32) -> Result<(), Errno> {
        self.do_listen(s.id, backlog)
    }

    fn accept(&mut self, s: &Handle, addr: &mut [u8]) -> Result<(Handle, usize), Errno> {
        self.do_accept(s.id, addr)
    }

    fn connect(&mut self, s: &Handle, addr: &[u8]) -> Result<(), Errno> {
        self.do_connect(s.id, addr)
    }

    fn send(&mut self, s: &Handle, data: &[u8], flags: i32, to: &[u8]) -> Result<usize, Errno> {
        match self.sock(s.id)?.proto {
            Proto::Tcp => self.tcp_send(s.id, data, flags),
            Proto::Udp => self.udp_send(s.id, data, flags, to),
        }
    }

    fn recv(&mut self, s: &Handle, buf: &mut [u8], flags: i32, from: &mut [u8]) -> Result<(usize, usize), Errno> {
        match self.sock(s.id)?.proto {
            // A stream socket reports no source address (msg_namelen 0).
            Proto::Tcp => self.tcp_recv(s.id, buf, flags).map(|n| (n, 0)),
            Proto::Udp => self.udp_recv(s.id, buf, flags, from),
        }
    }

    fn shutdown(&mut self, s: &Handle, how: i32) -> Result<(), Errno> {
        self.do_shutdown(s.id, how)
    }

    fn getsockopt(&mut self, s: &Handle, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno> {
        self.do_getsockopt(s.id, level, name, val)
    }

    fn setsockopt(&mut self, s: &Handle, level: i32, name: i32, val: &[u8]) -> Result<(), Errno> {
        self.do_setsockopt(s.id, level, name, val)
    }

    fn getsockname(&mut self, s: &Handle, addr: &mut [u8]) -> Result<usize, Errno> {
        self.do_getsockname(s.id, addr)
    }

    fn getpeername(&mut self, s: &Handle, addr: &mut [u8]) -> Result<usize, Errno> {
        self.do_getpeername(s.id, addr)
    }

    fn ioctl(&mut self, s: &Handle, request: u64) -> Result<i64, Errno> {
        self.do_ioctl(s.id, request)
    }

    fn poll_mask(&mut self, s: &Handle) -> u32 {
        self.refresh(s.id);
        self.readiness(s.id).0
    }

    fn close(&mut self, s: Handle) {
        // Dropping queues the id for the next poll; closing now lets the FIN go out with it.
        let id = s.id;
        drop(s);
        self.close_now(id);
    }

    fn tcp_stats(&mut self, s: &Handle) -> Option<TcpStats> {
        self.do_tcp_stats(s.id)
    }

    fn watch(&mut self, s: &Handle, key: u64) -> Result<(), Errno> {
        let st = self.sock(s.id)?;
        st.key = Some(key);
        st.reported = None;
        self.dirty.insert(s.id);
        Ok(())
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.ext_dev.fd()
    }

    fn poll(&mut self, now: Instant, woken: bool, ready: &mut Vec<Ready>) -> Option<Instant> {
        self.run(now, woken, ready)
    }
}
