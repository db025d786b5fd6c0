//! The control socket's front door: every connection waits here, with no thread of its own,
//! until it has sent one whole request. Anyone on the host may connect (the socket is 0666), so
//! what arrives can be garbage, an endless length, half a frame, or hundreds of connections that
//! never send anything; none of it may stop the engine from answering everyone else.
//!
//! One thread watches the listener and every waiting connection with epoll and reassembles
//! frames with the pure [`Decoder`]:
//! - a request is at most [`MAX_REQUEST`] bytes; a longer frame is refused at its header;
//! - a frame begun and not finished within [`FRAME_TIMEOUT`] closes its connection;
//! - at most [`MAX_WAITING`] connections wait; past that the one idle longest is closed, so
//!   idle connections cannot take the engine's file descriptors (or threads) from others.
//!
//! A whole request goes to a thread of its own (attach, status and the rest may wait on an
//! NSM), which answers it and gives the connection back to wait for its next request, unless
//! the request made the connection its process's for life (attach, hold, join): such a
//! connection is read by its own thread without any time limit until it closes (Engine::keep).

use crate::{log, Engine, Next};
use netkernel_control::Reply;
use netkernel_ring::frame::Decoder;
use netkernel_ring::sys;
use std::convert::Infallible;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request accepted on the control socket. Real ones (attach with a tenant name and a
/// token, hold, join, status, ...) are a few hundred bytes.
pub(crate) const MAX_REQUEST: usize = 64 * 1024;
/// How long a connection may take to finish a frame it began. Clients send a request with one
/// system call; only a stalled or hostile one is still sending after this.
pub(crate) const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections waiting for their next request at once (far below the usual open-files
/// limits, leaving descriptors for attachments).
pub(crate) const MAX_WAITING: usize = 4096;
/// Most file descriptors one request may carry (ABI.md section 12.1: at most 8, with the
/// frame's first byte). Each one received takes a slot in the engine's descriptor table.
const MAX_FDS: usize = 8;
/// How long a reply may wait for a client that does not read it before the connection is
/// dropped (applies until the connection is attached).
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

const TOK_LISTENER: u64 = u64::MAX;
const TOK_RETURNED: u64 = u64::MAX - 1;

/// A connection waiting for (the rest of) its next request.
struct Waiting {
    conn: UnixStream,
    decoder: Decoder,
    /// File descriptors that came with the frame so far.
    fds: Vec<OwnedFd>,
    /// When the frame being received began.
    begun: Option<Instant>,
    /// When the connection last sent anything (or arrived).
    active: Instant,
}

/// Why the lobby cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LobbyError {
    #[error("control socket: cannot set up its event loop: {0}")]
    Setup(io::Error),
}

struct Lobby {
    engine: Arc<Engine>,
    epfd: OwnedFd,
    listener: UnixListener,
    waiting: Vec<Option<Waiting>>,
    /// Connections request threads hand back (through `back`) to wait for their next request;
    /// `bell` (an eventfd in the epoll) says one is there.
    returned: Receiver<UnixStream>,
    back: Sender<UnixStream>,
    bell: Arc<OwnedFd>,
}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
    sys::epoll_ctl(epfd, op, fd, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, token)
}

/// Serves the control socket until the process ends; returns only if it cannot start.
pub(crate) fn serve(engine: Arc<Engine>, listener: UnixListener) -> Result<Infallible, LobbyError> {
    let epfd = sys::epoll().map_err(LobbyError::Setup)?;
    // SAFETY: a fresh eventfd, ours alone.
    let bell = Arc::new(unsafe { OwnedFd::from_raw_fd(sys::eventfd().map_err(LobbyError::Setup)?) });
    listener.set_nonblocking(true).map_err(LobbyError::Setup)?;
    epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, listener.as_raw_fd(), TOK_LISTENER).map_err(LobbyError::Setup)?;
    epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, bell.as_raw_fd(), TOK_RETURNED).map_err(LobbyError::Setup)?;
    let (back, returned) = channel();
    let mut lobby = Lobby { engine, epfd, listener, waiting: Vec::new(), returned, back, bell };
    lobby.run()
}

impl Lobby {
    fn run(&mut self) -> ! {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let timeout = self.next_deadline().map_or(-1, |d| {
                d.saturating_duration_since(Instant::now()).as_millis().clamp(1, i32::MAX as u128) as i32
            });
            // SAFETY: events is a live buffer of the length passed.
            let n =
                unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout) };
            for ev in &events[..n.max(0) as usize] {
                match ev.u64 {
                    TOK_LISTENER => self.accept(),
                    TOK_RETURNED => {
                        sys::drain_bell(self.bell.as_raw_fd());
                        while let Ok(conn) = self.returned.try_recv() {
                            self.admit(conn);
                        }
                    }
                    token => self.read(token as usize),
                }
            }
            self.expire();
        }
    }

    /// When the oldest unfinished frame runs out of time.
    fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().flatten().filter_map(|w| w.begun).min().map(|b| b + FRAME_TIMEOUT)
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((conn, _)) => self.admit(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors: the connection idle longest makes room. With none to
                    // close, wait a little rather than spin on a listener that stays readable.
                    if !self.evict(&format!("accept: {e}")) {
                        log(format!("accept: {e}; no idle connection to close"));
                        std::thread::sleep(Duration::from_millis(50));
                        return;
                    }
                }
                Err(e) => {
                    log(format!("accept: {e}"));
                    return;
                }
            }
        }
    }

    /// A new connection, or one back from a request, waits for its next request.
    fn admit(&mut self, conn: UnixStream) {
        if self.waiting.iter().flatten().count() >= MAX_WAITING {
            self.evict(&format!("{MAX_WAITING} control connections wait"));
        }
        if let Err(e) = conn.set_nonblocking(true) {
            log(format!("control connection: {e}; closing it"));
            return;
        }
        let slot = self.waiting.iter().position(|w| w.is_none()).unwrap_or_else(|| {
            self.waiting.push(None);
            self.waiting.len() - 1
        });
        if let Err(e) = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, conn.as_raw_fd(), slot as u64) {
            log(format!("control connection: epoll: {e}; closing it"));
            return;
        }
        let now = Instant::now();
        self.waiting[slot] =
            Some(Waiting { conn, decoder: Decoder::new(MAX_REQUEST), fds: Vec::new(), begun: None, active: now });
    }

    /// Stops watching connection `slot` and hands it over (closing it when dropped).
    fn take(&mut self, slot: usize) -> Option<Waiting> {
        let w = self.waiting.get_mut(slot)?.take()?;
        let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, w.conn.as_raw_fd(), 0);
        Some(w)
    }

    /// Closes the waiting connection idle longest, saying `why`; false when none waits.
    fn evict(&mut self, why: &str) -> bool {
        let oldest =
            self.waiting.iter().enumerate().filter_map(|(i, w)| Some((i, w.as_ref()?.active))).min_by_key(|&(_, t)| t);
        match oldest {
            Some((slot, _)) => {
                log(format!("{why}; closing the control connection idle longest"));
                self.take(slot);
                true
            }
            None => false,
        }
    }

    /// Closes connections that began a frame more than FRAME_TIMEOUT ago.
    fn expire(&mut self) {
        let now = Instant::now();
        for slot in 0..self.waiting.len() {
            let late = self.waiting[slot].as_ref().and_then(|w| w.begun).is_some_and(|b| now - b >= FRAME_TIMEOUT);
            if late {
                log(format!("a control connection left a request unfinished for {FRAME_TIMEOUT:?}; closing it"));
                self.take(slot);
            }
        }
    }

    /// Takes what connection `slot` sent; a whole request goes to a thread of its own.
    fn read(&mut self, slot: usize) {
        loop {
            let Some(w) = self.waiting.get_mut(slot).and_then(|w| w.as_mut()) else { return };
            let fd = w.conn.as_raw_fd();
            let first = !w.decoder.in_frame();
            let (n, fds) = match sys::recv_with_fds(fd, w.decoder.buffer()) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.take(slot);
                    return;
                }
            };
            let late = !first && !fds.is_empty();
            // SAFETY: the fds were just received and are owned by nobody else.
            w.fds.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            if late || w.fds.len() > MAX_FDS {
                log(format!(
                    "a control connection sent file descriptors past a request's first byte or more than \
                     {MAX_FDS} with one; closing it"
                ));
                self.take(slot);
                return;
            }
            if n == 0 {
                if w.decoder.in_frame() {
                    log("a control connection ended in the middle of a request");
                }
                self.take(slot);
                return;
            }
            let now = Instant::now();
            w.active = now;
            w.begun.get_or_insert(now);
            match w.decoder.filled(n) {
                Ok(None) => {}
                Ok(Some(request)) => {
                    let Some(w) = self.take(slot) else { return };
                    self.dispatch(w.conn, request, w.fds);
                    return;
                }
                Err(e) => {
                    log(format!("control connection: {e}; closing it"));
                    let reply = Reply::err(format!("unreadable request: {e}")).encode();
                    // Best effort: the connection is closed either way, and must not block us.
                    let _ = sys::send_with_fds(fd, &netkernel_ring::frame::encode(&reply), &[]);
                    self.take(slot);
                    return;
                }
            }
        }
    }

    fn dispatch(&self, conn: UnixStream, request: Vec<u8>, fds: Vec<OwnedFd>) {
        let (engine, back, bell) = (self.engine.clone(), self.back.clone(), self.bell.clone());
        let spawned = std::thread::Builder::new().name("ctl-request".into()).spawn(move || {
            answer(engine, conn, &request, fds, &back, &bell);
        });
        if let Err(e) = spawned {
            log(format!("no thread for a control request ({e}); closing its connection"));
        }
    }
}

/// Answers one request, then gives the connection back to the lobby, keeps it for its
/// process's lifetime, or closes it.
fn answer(
    engine: Arc<Engine>,
    conn: UnixStream,
    request: &[u8],
    fds: Vec<OwnedFd>,
    back: &Sender<UnixStream>,
    bell: &OwnedFd,
) {
    if conn.set_nonblocking(false).and_then(|()| conn.set_write_timeout(Some(REPLY_TIMEOUT))).is_err() {
        return;
    }
    let mut attached = None;
    match engine.serve_request(&conn, &mut attached, request, fds) {
        Next::Close => engine.hang_up(attached),
        Next::More => {
            if back.send(conn).is_ok() {
                sys::ring_bell(bell.as_raw_fd());
            }
        }
        Next::Keep => {
            // Its process keeps it for life: replies wait as long as it takes.
            if conn.set_write_timeout(None).is_ok() {
                engine.keep(conn, attached);
            }
        }
    }
}
