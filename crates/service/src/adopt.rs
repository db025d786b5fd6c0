//! Live restore (DESIGN.md D11: the engine's state is rebuilt from the running NSMs). An NSM
//! outlives its engine; it listens on a rendezvous socket in the engine's state directory, and a
//! restarted engine connects there, asks what the NSM serves (`Adopt`) and takes each region
//! back (`Region`), so that guests never notice the engine was gone.

use crate::control::{AttachmentState, NsmState};
use crate::{epoll_ctl, Service, Stack, TOK_CONTROL, TOK_RENDEZVOUS};
use netkernel_ring::sys;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// The pid a pidfd refers to (`Pid:` in its fdinfo), or None once the process has exited.
fn pid_of(pidfd: RawFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}")).ok()?;
    let pid: i32 = info.lines().find_map(|l| l.strip_prefix("Pid:"))?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

impl<S: Stack> Service<S> {
    /// Lets a restarted engine adopt this NSM through `listener` (created by the `nsm` command in
    /// the engine's state directory, mode 0600).
    pub fn with_rendezvous(mut self, listener: UnixListener) -> io::Result<Self> {
        self.set_rendezvous(listener)?;
        Ok(self)
    }

    /// Listens for a restarted engine on `listener`.
    pub(crate) fn set_rendezvous(&mut self, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOK_RENDEZVOUS,
        )?;
        self.rendezvous = Some(listener);
        Ok(())
    }

    /// An engine connects on the rendezvous socket. Only one engine gives orders at a time, and
    /// only one of our own uid: while the current one is connected, others are turned away.
    pub(crate) fn on_rendezvous(&mut self) {
        let Some(listener) = &self.rendezvous else { return };
        while let Ok((conn, _)) = listener.accept() {
            // SAFETY: geteuid cannot fail.
            let me = unsafe { libc::geteuid() };
            match sys::peer_cred(conn.as_raw_fd()).map(|c| c.uid) {
                Ok(uid) if uid == me && self.orphaned => {}
                Ok(uid) if uid != me => {
                    eprintln!("netkernel nsm {}: uid {uid} may not adopt this NSM; closing", self.core.name);
                    continue;
                }
                Ok(_) => {
                    eprintln!("netkernel nsm {}: an engine still gives orders; refusing a second one", self.core.name);
                    continue;
                }
                Err(e) => {
                    eprintln!("netkernel nsm {}: rendezvous: {e}", self.core.name);
                    continue;
                }
            }
            let ep = self.epfd.as_raw_fd();
            if let Err(e) = epoll_ctl(ep, libc::EPOLL_CTL_ADD, conn.as_raw_fd(), libc::EPOLLIN as u32, TOK_CONTROL) {
                eprintln!("netkernel nsm {}: cannot watch the new engine's channel: {e}", self.core.name);
                continue;
            }
            self.control = OwnedFd::from(conn);
            self.orphaned = false;
            // The engine watches this process again and marks the regions dead if it dies.
            if let Some(pid) = self.reaper.take() {
                // SAFETY: killing and reaping our own child, the reaper.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
            eprintln!("netkernel nsm {}: adopted by a new engine", self.core.name);
        }
    }

    /// What this NSM serves, for an adopting engine.
    pub(crate) fn state(&self) -> NsmState {
        NsmState {
            name: self.core.name.clone(),
            kind: self.core.stack.kind().into(),
            pid: std::process::id(),
            attachments: self
                .core
                .atts
                .iter()
                .flatten()
                .map(|a| AttachmentState {
                    attachment: a.id,
                    tenant: a.tenant.clone(),
                    pid: a.pid,
                    uid: a.uid,
                    holders: a.holders.pidfds().filter_map(|(id, fd)| Some((pid_of(fd.as_raw_fd())?, id))).collect(),
                    busy_us: a.busy.as_micros() as u64,
                    peers: colocated_peers(a),
                    pinned: a.policy.pinned(),
                    staying: a
                        .socks
                        .iter()
                        .flatten()
                        .filter(|s| match &s.handle {
                            Some(h) => !self.core.stack.movable(h),
                            None => s.pipe.is_some(),
                        })
                        .count(),
                    tasks: a.tasks.0,
                    latency_tasks: a.tasks.1,
                })
                .collect(),
            idle_us: self.idle.as_micros() as u64,
            latency_misses: self.core.latency_misses,
        }
    }

    /// Attachment `id`'s region memfd, NSM doorbell and guest doorbell (ours stay open).
    pub(crate) fn region_fds(&self, id: u64) -> Result<Vec<RawFd>, String> {
        let a = self.core.atts.iter().flatten().find(|a| a.id == id).ok_or_else(|| format!("no attachment {id}"))?;
        Ok(vec![a.memfd.as_raw_fd(), a.nsm_bell.as_raw_fd(), a.guest_bell.as_raw_fd()])
    }

    /// Ends every attachment with ECONNRESET for its guest, and the loop with it.
    pub(crate) fn shutdown(&mut self) {
        for a in self.core.atts.iter().flatten() {
            a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
        }
        eprintln!("netkernel nsm {}: stopping at the engine's request", self.core.name);
        self.stopping = true;
        self.stopped_at.get_or_insert_with(std::time::Instant::now);
    }
}

/// The other attachments `a` has co-located connections with, established or in its listeners'
/// backlogs (both ends live in one executor, so they move together).
fn colocated_peers<H>(a: &crate::sock::Attachment<H>) -> Vec<u64> {
    let mut peers: Vec<u64> = a
        .socks
        .iter()
        .flatten()
        .flat_map(|s| s.pipe.iter().chain(s.backlog.iter().flat_map(|b| b.queue.iter())))
        .filter_map(|e| e.peer_attachment())
        .filter(|&id| id != a.id)
        .collect();
    peers.sort_unstable();
    peers.dedup();
    peers
}
