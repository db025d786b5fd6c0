//! A user NSM's upgrade (`ctl upgrade`). Its connections live in smoltcp inside the process,
//! so they cannot be handed over as kernel sockets are (handover.rs). Instead the old process
//! hands its link to the new one (nsm-user's peer.rs: the new one reads the wire and passes
//! on what is the old one's); every new attachment goes to the new process, and the old
//! process's attachments follow as soon as nothing holds them (a handshake in progress, a
//! connection waiting for accept; `Stack::movable`): their connections stay in the old
//! process's smoltcp, which relays their bytes to the new process's sockets until they close
//! (nsm-user's relay.rs). So a guest's new connections are the new process's within a
//! fraction of a second, whatever it keeps open.
//!
//! To the engine the NSM is the new process from the handover on: the old one becomes one of
//! its executors (pool.rs), "draining": the new process routes the engine's messages about the
//! old attachments there, adds its stats in, never places an attachment there, takes over its
//! attachments (the in-process handover, across processes) and tells it to stop once it
//! serves none and relays nothing (after at most 10 s of sending what its closed sockets still
//! have queued). Should the new process die, the old one reads its link again and resets what
//! it relayed; the engine, which sees one NSM, declares the line's regions dead and the old
//! process exits with its guests.
//!
//! 1. Engine → old: `Drain`. The old process makes the channels, answers with [`Drained`] and
//!    the fds (wire, frame channel, its new control channel, rendezvous socket), and from then
//!    on takes orders from the new process.
//! 2. Engine → new (started with `--successor`, waiting before it builds its stack): `Succeed`
//!    with those fds ([`await_succession`]); it builds its stack on them, adopts the old
//!    process as an executor ([`Service::with_predecessor`]) and answers.

use crate::control::{self, NsmRequest};
use crate::{epoll_ctl, pool, Service, Stack, TOK_CONTROL};
use netkernel_ring::sys;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// The old process's answer to `Drain`; the fds follow in this order: wire, frame channel,
/// channel to the old process, rendezvous listener (if it had one).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Drained {
    pub old_pid: u32,
    /// (protocol, port)s its sockets hold: the new process leaves them alone.
    pub ports: Vec<(u8, u16)>,
    /// CLOCK_MONOTONIC (ns) when it stopped reading the wire.
    pub stopped_ns: u64,
    /// Attachments and sockets it had (drain.rs: they follow; their connections stay).
    pub attachments: usize,
    pub sockets: usize,
}

/// What a new user NSM process gets before it builds its stack (see the module).
pub struct Succession {
    pub ports: Vec<(u8, u16)>,
    pub wire: OwnedFd,
    pub chan: OwnedFd,
    pub predecessor: OwnedFd,
    pub rendezvous: Option<UnixListener>,
}

/// Waits on the engine channel `control` for `Succeed` and its fds (a process started with
/// `--successor`). Answer it with [`Service::succeeded`] once the service runs.
pub fn await_succession(control: &OwnedFd) -> Result<Succession, String> {
    let (payload, fds) = sys::recv_frame(control.as_raw_fd())
        .map_err(|e| format!("engine channel: {e}"))?
        .ok_or("the engine closed its channel before the handover")?;
    // SAFETY: the fds were just received and are owned by nobody else.
    let mut fds = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) });
    let ports = match serde_json::from_slice::<NsmRequest>(&payload) {
        Ok(NsmRequest::Succeed { ports }) => ports,
        Ok(_) | Err(_) => return Err("the engine's first message was not Succeed".into()),
    };
    let mut next = |what: &str| fds.next().ok_or_else(|| format!("Succeed came without the {what}"));
    let (wire, chan, predecessor) = (next("wire fd")?, next("frame channel")?, next("old process's channel")?);
    let rendezvous = fds.next().map(UnixListener::from);
    Ok(Succession { ports, wire, chan, predecessor, rendezvous })
}

impl<S: Stack> Service<S> {
    /// The old process of an upgrade serves on as the new one's executor, through `channel`.
    pub fn with_predecessor(mut self, channel: OwnedFd, rendezvous: Option<UnixListener>) -> io::Result<Self> {
        if let Some(l) = rendezvous {
            self.set_rendezvous(l)?;
        }
        let pool = self.pool.get_or_insert_with(|| {
            let none: pool::Spawner = Box::new(|_| Err(io::Error::other("this stack has one executor")));
            pool::Pool::new(self.core.name.clone(), none, 1)
        });
        pool.add_draining(UnixStream::from(channel));
        Ok(self)
    }

    /// Answers the engine's `Succeed`: this process serves from now on.
    pub fn succeeded(&self) -> io::Result<()> {
        let at = crate::handover::monotonic_ns();
        sys::send_frame(self.control.as_raw_fd(), &control::Reply::ok(at).encode(), &[])
    }

    /// The engine's `Drain`: hands the link to a successor (see the module). Returns the answer
    /// and the fds to send with it, and the channel the successor will give orders on (see
    /// `take_orders_from`).
    pub(crate) fn drain(&mut self) -> Result<(Drained, Vec<OwnedFd>, OwnedFd), String> {
        let stopped_ns = crate::handover::monotonic_ns();
        let crate::stack::HandedLink { mut fds, ports } = self.core.stack.hand_link()?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
        fds.push(theirs.into());
        let ep = self.epfd.as_raw_fd();
        if let Some(l) = self.rendezvous.take() {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, l.as_raw_fd(), 0, 0);
            fds.push(l.into());
        }
        self.sync_stack_fds();
        // Its successor's reaper covers no region of ours; guests see this pid die by
        // themselves. Once the successor lets go and no guest is left, it exits.
        self.retired = true;
        self.draining = true;
        let sockets = self.core.atts.iter().flatten().map(|a| a.socks.iter().flatten().count()).sum();
        let attachments = self.core.atts.iter().flatten().count();
        eprintln!(
            "netkernel nsm {}: handed the link to a new process; {attachments} attachments follow it, their connections \
             relayed from here until they close",
            self.core.name
        );
        Ok((Drained { old_pid: std::process::id(), ports, stopped_ns, attachments, sockets }, fds, ours.into()))
    }

    /// From now on `channel` gives the orders (the engine's channel closes).
    pub(crate) fn take_orders_from(&mut self, channel: OwnedFd) -> io::Result<()> {
        let ep = self.epfd.as_raw_fd();
        let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, self.control.as_raw_fd(), 0, 0);
        self.control = channel;
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, self.control.as_raw_fd(), libc::EPOLLIN as u32, TOK_CONTROL)
    }

    /// Watches the fds the stack sleeps on now (they change when a user stack hands its link
    /// over, or its peer goes away).
    pub(crate) fn sync_stack_fds(&mut self) {
        // Compared without allocating: this runs on every turn of the loop.
        let now = [Some(self.core.stack.wait_fd().as_raw_fd()), self.core.stack.peer_fd().map(|f| f.as_raw_fd())];
        if now == self.stack_fds {
            return;
        }
        let ep = self.epfd.as_raw_fd();
        for fd in self.stack_fds.iter().flatten().filter(|f| !now.contains(&Some(**f))) {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, *fd, 0, 0);
        }
        for fd in now.iter().flatten().filter(|f| !self.stack_fds.contains(&Some(**f))) {
            if let Err(e) = epoll_ctl(ep, libc::EPOLL_CTL_ADD, *fd, libc::EPOLLIN as u32, crate::TOK_STACK) {
                eprintln!("netkernel nsm {}: cannot watch the stack's fd: {e}", self.core.name);
            }
        }
        self.stack_fds = now;
    }
}
