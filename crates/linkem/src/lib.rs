//! linkem: a userspace link emulator between two TAP devices, for a kernel without netem.
//!
//! It creates TAP devices `a` and `b` (IFF_TAP|IFF_NO_PI) and forwards Ethernet frames between
//! them, each direction through a drop-tail queue drained at a rate, then a delay line, after a
//! seeded random loss. Whoever sets up the topology moves the devices into network namespaces
//! (`ip link set A netns NS`); the file descriptors keep working there. The devices disappear
//! when linkem exits. One thread; it sleeps in epoll_wait until a frame arrives, a frame is due
//! (a timerfd armed for the earliest one), or SIGINT/SIGTERM.

pub mod model;

use model::{Direction, Shape};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The link, as given on the command line (`netkernel linkem` and the `linkem` binary).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Name of the TAP device at end a (at most 15 bytes).
    #[arg(long)]
    pub a: String,
    /// Name of the TAP device at end b.
    #[arg(long)]
    pub b: String,
    /// One-way delay, e.g. 175ms; A/B sets a->b and b->a apart.
    #[arg(long, default_value = "0", value_parser = |s: &str| model::split(s, model::delay_ns))]
    pub delay: (u64, u64),
    /// Bottleneck rate (Ethernet bytes), e.g. 12mbit; 0 = unlimited; A/B per direction.
    #[arg(long, default_value = "0", value_parser = |s: &str| model::split(s, model::rate_bps))]
    pub rate: (u64, u64),
    /// Random loss, e.g. 1% or 0.01; A/B per direction.
    #[arg(long, default_value = "0", value_parser = |s: &str| model::split(s, model::loss))]
    pub loss: (f64, f64),
    /// Drop-tail queue limit in bytes at the bottleneck, e.g. 500kb (the default is 1000 full frames).
    #[arg(long, default_value = "1514000", value_parser = |s: &str| model::split(s, model::bytes))]
    pub limit: (u64, u64),
    /// Seed of the loss generator: the same seed loses the same frames.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Args {
    /// The a->b and b->a shapes.
    pub fn shapes(&self) -> (Shape, Shape) {
        let shape = |d: usize| {
            let pick = |p: (u64, u64)| if d == 0 { p.0 } else { p.1 };
            Shape {
                delay_ns: pick(self.delay),
                rate_bps: pick(self.rate),
                loss: if d == 0 { self.loss.0 } else { self.loss.1 },
                limit_bytes: pick(self.limit),
            }
        };
        (shape(0), shape(1))
    }
}

/// What stops linkem, in terms of what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/net/tun: {0} (linkem needs root or CAP_NET_ADMIN and the tun module)")]
    OpenTun(io::Error),
    #[error("TAP name {0:?}: give 1 to 15 bytes, no '/' or spaces")]
    Name(String),
    #[error("cannot create TAP device {0:?}: {1} ({2})")]
    CreateTap(String, io::Error, &'static str),
    #[error("TAP device {0:?} went away (its namespace was deleted?)")]
    Gone(String),
    #[error("{0}: {1}")]
    Sys(&'static str, io::Error),
}

fn check(what: &'static str, r: libc::c_int) -> Result<libc::c_int, Error> {
    if r < 0 {
        Err(Error::Sys(what, io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

/// A TAP device, alive while this is open.
pub struct Tap {
    pub name: String,
    fd: OwnedFd,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, padded to the union's 24 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    pub fn create(name: &str) -> Result<Tap, Error> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(Error::Name(name.to_string()));
        }
        // SAFETY: a NUL-terminated path literal; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(Error::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: raw is a file descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back the name into) an ifreq-sized buffer we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => "linkem needs root or CAP_NET_ADMIN",
                Some(libc::EBUSY) | Some(libc::EEXIST) | Some(libc::EINVAL) => {
                    "an interface of that name exists already, or is not a TAP device"
                }
                _ => "is the tun module loaded?",
            };
            return Err(Error::CreateTap(name.to_string(), e, hint));
        }
        Ok(Tap { name: name.to_string(), fd })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Frames read from one device per wake-up, so one busy direction cannot starve the other or
/// hold back frames that are due.
const BATCH: usize = 64;

const A: u64 = 0;
const B: u64 = 1;
const TIMER: u64 = 2;
const SIGNAL: u64 = 3;

/// The emulator: both TAP devices and both directions.
pub struct Link {
    a: Tap,
    b: Tap,
    ab: Direction,
    ba: Direction,
}

impl Link {
    /// Creates both TAP devices.
    pub fn new(args: &Args) -> Result<Link, Error> {
        let (ab, ba) = args.shapes();
        let a = Tap::create(&args.a)?;
        let b = Tap::create(&args.b)?;
        // Each direction draws its own stream, so traffic one way does not change losses the other.
        Ok(Link { a, b, ab: Direction::new(ab, args.seed), ba: Direction::new(ba, args.seed ^ 0x5555_5555_5555_5555) })
    }

    /// Forwards until SIGINT or SIGTERM (or a device disappears); returns the counters
    /// (a->b, b->a).
    pub fn run(mut self, ready: impl FnOnce()) -> Result<(model::Stats, model::Stats), Error> {
        // SAFETY: sigset manipulation on a local set; blocking the signals (in this thread) so the
        // signalfd receives them instead of the default handlers ending the process.
        let sigfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            check("signalfd", libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC))?
        };
        // SAFETY: the fds below were just returned to us by the kernel and are owned from here on.
        let sigfd = unsafe { OwnedFd::from_raw_fd(sigfd) };
        // SAFETY: integer arguments only, no memory passed; the result is checked before use.
        let timer = check("timerfd_create", unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        // SAFETY: timerfd_create returned a new fd (checked) that nothing else holds.
        let timer = unsafe { OwnedFd::from_raw_fd(timer) };
        // SAFETY: integer arguments only, no memory passed; the result is checked before use.
        let ep = check("epoll_create1", unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: epoll_create1 returned a new fd (checked) that nothing else holds.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        for (fd, token) in
            [(self.a.raw(), A), (self.b.raw(), B), (timer.as_raw_fd(), TIMER), (sigfd.as_raw_fd(), SIGNAL)]
        {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
            // SAFETY: registering fds we own with our epoll instance; ev is read by the call.
            check("epoll_ctl", unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        }
        ready();
        let mut buf = vec![0u8; 65536];
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let mut armed: Option<u64> = None;
        loop {
            // SAFETY: events is a valid array of 8 epoll_event; -1 waits until something happens.
            let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 8, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Sys("epoll_wait", e));
            }
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                match token {
                    A | B => {
                        let (tap, dir) = if token == A { (&self.a, &mut self.ab) } else { (&self.b, &mut self.ba) };
                        if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                            return Err(Error::Gone(tap.name.clone()));
                        }
                        drain(tap, dir, &mut buf)?;
                    }
                    TIMER => {
                        let mut expirations = 0u64;
                        // SAFETY: reading the 8-byte expiration count into a u64 we own.
                        unsafe { libc::read(timer.as_raw_fd(), &mut expirations as *mut u64 as *mut libc::c_void, 8) };
                        armed = None;
                    }
                    _ => return Ok((self.ab.stats, self.ba.stats)),
                }
            }
            let now = now_ns();
            deliver(&mut self.ab, &self.b, now);
            deliver(&mut self.ba, &self.a, now);
            let due = match (self.ab.next_due(), self.ba.next_due()) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            };
            if due != armed {
                arm(timer.as_raw_fd(), due)?;
                armed = due;
            }
        }
    }
}

/// Reads what `tap` has (up to BATCH frames) into its direction.
fn drain(tap: &Tap, dir: &mut Direction, buf: &mut [u8]) -> Result<(), Error> {
    for _ in 0..BATCH {
        // SAFETY: reading at most buf.len() bytes into buf, which we own.
        let n = unsafe { libc::read(tap.raw(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                Some(libc::EBADFD) | Some(libc::ENODEV) => Err(Error::Gone(tap.name.clone())),
                _ => Err(Error::Sys("read from TAP", e)),
            };
        }
        // The verdict is in the counters.
        dir.offer(now_ns(), buf[..n as usize].to_vec());
    }
    Ok(())
}

/// Writes every frame of `dir` that is due by `now` to `out`.
fn deliver(dir: &mut Direction, out: &Tap, now: u64) {
    while let Some(frame) = dir.pop_due(now) {
        // SAFETY: writing frame.len() bytes from a buffer we own. A TAP write hands the frame to
        // the kernel as received on that device; it does not block.
        let n = unsafe { libc::write(out.raw(), frame.as_ptr() as *const libc::c_void, frame.len()) };
        if n == frame.len() as isize {
            dir.stats.delivered += 1;
        } else {
            // Most often the device is down (not configured yet): the frame is lost, as on a wire.
            dir.stats.write_errors += 1;
        }
    }
}

/// Arms the timer for `due` (absolute CLOCK_MONOTONIC ns), or disarms it.
fn arm(timer: RawFd, due: Option<u64>) -> Result<(), Error> {
    // An all-zero it_value disarms; a due time already past fires at once.
    let at = due.map(|t| t.max(1)).unwrap_or(0);
    let spec = libc::itimerspec {
        it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
        it_value: libc::timespec { tv_sec: (at / 1_000_000_000) as i64, tv_nsec: (at % 1_000_000_000) as i64 },
    };
    // SAFETY: spec is a valid itimerspec; the old value is not asked for.
    check("timerfd_settime", unsafe {
        libc::timerfd_settime(timer, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
    })?;
    Ok(())
}

fn describe(s: &Shape) -> String {
    let rate = if s.rate_bps == 0 { "unlimited".to_string() } else { format!("{} bit/s", s.rate_bps) };
    format!(
        "delay {:.3} ms, rate {rate}, loss {}%, queue {} bytes",
        s.delay_ns as f64 / 1e6,
        s.loss * 100.0,
        s.limit_bytes
    )
}

fn report(from: &str, to: &str, s: &model::Stats) -> String {
    format!(
        "linkem: {from} -> {to}: {} frames ({} bytes), {} delivered, {} lost, {} dropped by the queue, {} not written",
        s.frames, s.bytes, s.delivered, s.lost, s.dropped, s.write_errors
    )
}

/// Runs the emulator as a command: prints `ready` on stdout once both devices exist, the counters
/// on stderr when stopped. Returns the exit status.
pub fn main(args: Args) -> i32 {
    let (ab, ba) = args.shapes();
    let link = match Link::new(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("linkem: {e}");
            return 1;
        }
    };
    eprintln!("linkem: {} -> {}: {}", args.a, args.b, describe(&ab));
    eprintln!("linkem: {} -> {}: {}", args.b, args.a, describe(&ba));
    let result = link.run(|| {
        use std::io::Write;
        println!("ready");
        let _ = io::stdout().flush();
    });
    match result {
        Ok((ab, ba)) => {
            eprintln!("{}", report(&args.a, &args.b, &ab));
            eprintln!("{}", report(&args.b, &args.a, &ba));
            0
        }
        Err(e) => {
            eprintln!("linkem: {e}");
            1
        }
    }
}
