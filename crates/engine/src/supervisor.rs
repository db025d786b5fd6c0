//! NSM processes: spawned by the engine, talked to over a unix socket pair, restarted when
//! they die (DESIGN.md D3). An NSM outlives its engine; a restarted engine adopts it through
//! the rendezvous socket the NSM listens on in the engine's state directory (D11).

use netkernel_control as control;
use netkernel_service::control::{NsmRequest, NsmState, NsmStats, TenantPolicy};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The fd number an NSM finds its engine channel on.
pub const CONTROL_FD: RawFd = 3;

struct Proc {
    pid: Option<u32>,
    /// A pidfd of the process, to signal it without mistaking a reused pid for it.
    pidfd: Option<OwnedFd>,
    control: Option<UnixStream>,
    generation: u64,
    /// The generation this process's line began with: an upgrade hands one process's work to
    /// the next, so attachments made by any generation of the line are served by this process.
    line: u64,
}

/// An NSM process the supervisor waits for.
pub enum Running {
    /// Started by this engine.
    Child(Child),
    /// Adopted from an engine that went away: not our child, so watched through its pidfd.
    Adopted(OwnedFd),
}

impl Running {
    /// Blocks until the process has ended, and says how, as far as the engine can know; or
    /// until `swap` (an eventfd) is signalled: then None.
    fn wait(&mut self, swap: Option<&OwnedFd>) -> Option<String> {
        let pidfd = match self {
            Running::Child(c) => pidfd_open(c.id()).ok(),
            Running::Adopted(pidfd) => pidfd.try_clone().ok(),
        };
        if let (Some(pidfd), Some(swap)) = (pidfd, swap) {
            let mut fds = [
                libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: swap.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two live pollfds; a pidfd polls readable once its process has ended.
            while unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {}
            if fds[1].revents != 0 {
                let mut n = 0u64;
                // SAFETY: an eventfd read takes 8 bytes into a live u64.
                unsafe { libc::read(swap.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
                return None;
            }
        }
        Some(match self {
            Running::Child(c) => match c.wait() {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            },
            Running::Adopted(pidfd) => {
                let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one live pollfd; a pidfd polls readable once its process has ended.
                while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
                "ended; it was adopted, so its status is its old engine's to read".into()
            }
        })
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: integers only, no memory passed; an unknown pid is the kernel's to refuse.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// One supervised NSM.
pub struct Nsm {
    pub name: String,
    pub kind: String,
    /// Its congestion control (changed by `ctl reload`: a restarted NSM keeps the new one).
    congestion: Mutex<Option<String>>,
    /// The scheduler the NSM orders its tasks with (None: its default).
    scheduler: Option<String>,
    /// Its executors (`--executors`; None: one).
    executors: Option<String>,
    hosts: Vec<(String, String)>,
    /// The network namespace the NSM runs in, if one of its own.
    pub net: Option<crate::netns::NsmNet>,
    /// A user NSM's link and the name of its TAP device.
    link: Option<(crate::link::UserLink, String)>,
    /// Where the NSM listens for a restarted engine (in the engine's state directory).
    rendezvous: PathBuf,
    /// The binary NSMs are started from (None: the engine's own; `ctl upgrade --binary` sets it).
    exe: Mutex<Option<PathBuf>>,
    /// The process an upgrade started, for the supervisor to watch from now on; `swap` (an
    /// eventfd) tells it so.
    next: Mutex<Option<Running>>,
    swap: Option<OwnedFd>,
    proc_: Mutex<Proc>,
    restarts: AtomicU64,
    /// `ctl upgrade`s done, and the last one's blackout in microseconds.
    upgrades: AtomicU64,
    last_blackout_us: AtomicU64,
    stopping: AtomicBool,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// A non-blocking eventfd (the supervisor's wake-up for an upgrade). Without one (fds
/// exhausted) the supervisor notices an upgrade's new process only when the old one exits.
fn eventfd() -> Option<OwnedFd> {
    // SAFETY: integers only.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: a fresh fd, ours alone.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Nsm {
    pub fn new(
        name: String,
        kind: String,
        congestion: Option<String>,
        hosts: Vec<(String, String)>,
        net: Option<crate::netns::NsmNet>,
        link: Option<(crate::link::UserLink, String)>,
        rendezvous: PathBuf,
    ) -> Nsm {
        Nsm {
            name,
            kind,
            congestion: Mutex::new(congestion),
            scheduler: None,
            executors: None,
            hosts,
            net,
            link,
            rendezvous,
            exe: Mutex::new(None),
            next: Mutex::new(None),
            swap: eventfd(),
            proc_: Mutex::new(Proc { pid: None, pidfd: None, control: None, generation: 0, line: 0 }),
            restarts: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            last_blackout_us: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    /// The scheduler the NSM runs and its executors (`scheduler`, `executors` in its config).
    pub fn with_scheduler(mut self, scheduler: Option<String>, executors: Option<String>) -> Nsm {
        self.scheduler = scheduler;
        self.executors = executors;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Proc> {
        self.proc_.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the NSM process (`netkernel nsm ...`, the same binary as the engine unless an
    /// upgrade named another).
    pub fn spawn(&self) -> io::Result<Running> {
        let exe = self.exe.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (child, ours, pidfd) = self.launch(exe.as_deref(), true, false)?;
        let mut p = self.lock();
        p.pid = Some(child.id());
        p.pidfd = Some(pidfd);
        p.control = Some(ours);
        p.generation += 1;
        p.line = p.generation;
        Ok(Running::Child(child))
    }

    /// Starts an NSM process from `exe` (None: the engine's binary) with its engine channel;
    /// with `listen` it makes the rendezvous socket anew (an upgraded NSM inherits its
    /// predecessor's instead). A `successor` (a user NSM's upgrade) gets its link from the old
    /// process, not a device of its own.
    fn launch(
        &self,
        exe: Option<&std::path::Path>,
        listen: bool,
        successor: bool,
    ) -> io::Result<(Child, UnixStream, OwnedFd)> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))?;
        let exe = match exe {
            Some(e) => e.to_path_buf(),
            None => std::env::current_exe()?,
        };
        let mut cmd = Command::new(exe);
        cmd.args(["nsm", "--kind", &self.kind, "--name", &self.name, "--control-fd", &CONTROL_FD.to_string()]);
        if let Some(cc) = self.congestion.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            cmd.args(["--congestion", cc]);
        }
        if let Some(s) = &self.scheduler {
            cmd.args(["--scheduler", s]);
        }
        if let Some(e) = &self.executors {
            cmd.args(["--executors", e]);
        }
        for (name, addr) in &self.hosts {
            cmd.arg("--host").arg(format!("{name}={addr}"));
        }
        if listen {
            cmd.arg("--listen").arg(&self.rendezvous);
        }
        // A user NSM's device: made anew for each process (it goes with the last fd to it).
        let device = match (&self.link, &self.net) {
            (Some((link, _)), _) if successor => {
                cmd.arg("--successor").args(link.nsm_args());
                None
            }
            (Some((link, _)), Some(net)) => {
                // A veth: the NSM opens its packet socket on its end, inside its namespace.
                cmd.args(["--device", net.nsm_if()]).args(link.nsm_args());
                None
            }
            (Some((link, ifname)), None) => {
                cmd.args(["--device-fd", &crate::link::DEVICE_FD.to_string()]).args(link.nsm_args());
                Some(link.open_tap(ifname).map_err(other)?)
            }
            (None, _) => None,
        };
        let device_fd = device.as_ref().map(|d| d.as_raw_fd());
        let tap = self.link.is_some() && self.net.is_none();
        // An NSM never serves its own sockets through NetKernel.
        cmd.env_remove("LD_PRELOAD").env_remove("NETKERNEL_SOCKET");
        cmd.stdin(Stdio::null());
        let fd = theirs.as_raw_fd();
        let netns = match &self.net {
            Some(n) => Some(std::fs::File::open(n.path())?),
            None => None,
        };
        let ns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls (setns, unshare, dup2, fcntl,
        // sigemptyset, pthread_sigmask), on a sigset_t local to the child.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = ns_fd {
                    if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Both fds are moved above their targets first, so that neither target clobbers
                // the other's source.
                let control = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
                let dev = device_fd.map(|d| libc::fcntl(d, libc::F_DUPFD_CLOEXEC, 16));
                if control < 0 || dev.is_some_and(|d| d < 0) || libc::dup2(control, CONTROL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(dev) = dev {
                    if libc::dup2(dev, crate::link::DEVICE_FD) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // The user NSM's namespace has nothing but its device fd (the device stays
                // in the host's namespace): every packet it exchanges crosses the TAP.
                if tap && libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The engine blocks SIGINT and SIGTERM in every thread (its signal thread takes
                // them with sigwait), and a blocked mask survives exec: an NSM started with it
                // ignored SIGTERM, lingered after its engine had declared its guests' regions
                // dead, and kept their listening sockets open with nobody to accept on them.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // No PDEATHSIG: if the engine dies, the NSM keeps serving its guests (D1) and
                // exits after the last one.
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        drop(device);
        let pidfd = pidfd_open(child.id())?;
        Ok((child, ours, pidfd))
    }

    /// Takes over the NSM a previous engine left running, if one listens on the rendezvous
    /// socket: returns it and what it serves. One of another name or kind (the configuration
    /// changed) is stopped cleanly and not adopted.
    pub fn adopt(&self) -> Option<(Running, NsmState)> {
        let c = UnixStream::connect(&self.rendezvous).ok()?;
        // An NSM runs as the engine's uid; anything else listening there is not one of ours.
        // SAFETY: no arguments, no memory touched; geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if crate::peer_cred(&c).map(|cred| cred.uid).ok() != Some(me) {
            eprintln!(
                "netkernel engine: {} is not an NSM of this engine's uid; not adopted",
                self.rendezvous.display()
            );
            return None;
        }
        // A live NSM answers within its event loop's next turn; a stuck one is not adopted.
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut p = Proc { pid: None, pidfd: None, control: Some(c), generation: 0, line: 0 };
        let state: NsmState = match Self::call(&mut p, &NsmRequest::Adopt, &[])
            .and_then(|v| serde_json::from_value(v).map_err(|e| other(e.to_string())))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "netkernel engine: the NSM at {} did not answer ({e}); starting a new one",
                    self.rendezvous.display()
                );
                return None;
            }
        };
        if state.name != self.name || state.kind != self.kind {
            eprintln!(
                "netkernel engine: stopping NSM {} (kind {}, pid {}): the configuration wants {} of kind {} there",
                state.name, state.kind, state.pid, self.name, self.kind
            );
            let _ = Self::call(&mut p, &NsmRequest::Shutdown, &[]);
            return None;
        }
        let pidfd = match pidfd_open(state.pid) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!(
                    "netkernel engine: NSM {} (pid {}) is going away ({e}); starting a new one",
                    self.name, state.pid
                );
                return None;
            }
        };
        let watch = pidfd.try_clone().ok()?;
        let mut mine = self.lock();
        mine.pid = Some(state.pid);
        mine.pidfd = Some(pidfd);
        mine.control = p.control.take();
        mine.generation += 1;
        mine.line = mine.generation;
        Some((Running::Adopted(watch), state))
    }

    pub fn pid(&self) -> Option<u32> {
        self.lock().pid
    }

    /// The generations served by the NSM process now: each spawn or adoption is a new process
    /// and begins a new line, each upgrade adds one to it.
    pub fn generations(&self) -> std::ops::RangeInclusive<u64> {
        let p = self.lock();
        p.line..=p.generation
    }

    /// The NSM process's number: each spawn or adoption is a new one.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Upgrades done since the engine started, and the last one's blackout.
    pub fn upgrades(&self) -> (u64, Duration) {
        let us = self.last_blackout_us.load(Ordering::Relaxed);
        (self.upgrades.load(Ordering::Relaxed), Duration::from_micros(us))
    }

    /// One request/response with the NSM.
    fn call(p: &mut Proc, req: &NsmRequest, fds: &[RawFd]) -> io::Result<serde_json::Value> {
        Self::call_fds(p, req, fds).map(|(v, _)| v)
    }

    /// One request/response with the NSM; also returns the fds that came with the reply.
    fn call_fds(p: &mut Proc, req: &NsmRequest, fds: &[RawFd]) -> io::Result<(serde_json::Value, Vec<OwnedFd>)> {
        let c = p.control.as_ref().ok_or_else(|| other("NSM is not running".into()))?;
        let (result, extra) = control::call(c.as_raw_fd(), req, fds).map_err(|e| match e {
            control::Error::Send(e) | control::Error::Recv(e) => e,
            control::Error::Closed => other("NSM closed its channel".into()),
            control::Error::Malformed(e) => other(format!("malformed NSM reply: {e}")),
            control::Error::Refused(msg) => other(msg),
        })?;
        // SAFETY: fds just received, owned by nobody else.
        Ok((result, extra.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect()))
    }

    /// Attachment `id`'s region memfd, NSM doorbell and guest doorbell, from an adopted NSM.
    pub fn region(&self, id: u64) -> io::Result<[OwnedFd; 3]> {
        let mut p = self.lock();
        let (_, fds) = Self::call_fds(&mut p, &NsmRequest::Region { attachment: id }, &[])?;
        fds.try_into().map_err(|v: Vec<OwnedFd>| other(format!("NSM sent {} fds for a region, not 3", v.len())))
    }

    /// Hands an attachment to the NSM; returns the NSM generation that serves it.
    pub fn attach(
        &self,
        id: u64,
        tenant: &str,
        pid: i32,
        uid: u32,
        policy: TenantPolicy,
        fds: &[RawFd],
    ) -> io::Result<u64> {
        // A guest re-attaching right after its NSM crashed waits for the restart.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut p = self.lock();
        while p.control.is_none() && Instant::now() < deadline && !self.stopping.load(Ordering::SeqCst) {
            drop(p);
            std::thread::sleep(Duration::from_millis(20));
            p = self.lock();
        }
        let req = NsmRequest::Attach { attachment: id, tenant: tenant.into(), pid, uid, policy };
        Self::call(&mut p, &req, fds)?;
        Ok(p.generation)
    }

    /// Tells the NSM another process (by pidfd) shares attachment `id`.
    pub fn hold(&self, id: u64, holder: u32, pidfd: RawFd) -> io::Result<()> {
        let mut p = self.lock();
        Self::call(&mut p, &NsmRequest::Hold { attachment: id, holder }, &[pidfd]).map(|_| ())
    }

    /// Tenant `tenant`'s attachments follow `policy` from now on.
    pub fn set_policy(&self, tenant: &str, policy: &netkernel_service::control::TenantPolicy) -> io::Result<()> {
        let req = NsmRequest::Policy { tenant: tenant.into(), policy: policy.clone() };
        Self::call(&mut self.lock(), &req, &[]).map(|_| ())
    }

    /// New TCP connections of this NSM use congestion control `cc` (a restart keeps it).
    pub fn set_congestion(&self, cc: &str) -> io::Result<()> {
        Self::call(&mut self.lock(), &NsmRequest::Congestion { congestion: cc.into() }, &[])?;
        *self.congestion.lock().unwrap_or_else(|e| e.into_inner()) = Some(cc.into());
        Ok(())
    }

    /// Ends attachment `id` now, its sockets reset.
    pub fn detach(&self, id: u64) -> io::Result<()> {
        Self::call(&mut self.lock(), &NsmRequest::Detach { attachment: id }, &[]).map(|_| ())
    }

    pub fn stats(&self) -> io::Result<NsmStats> {
        let mut p = self.lock();
        let v = Self::call(&mut p, &NsmRequest::Stats, &[])?;
        serde_json::from_value(v).map_err(|e| other(e.to_string()))
    }

    /// Replaces the NSM's process by a new one, from `binary` (None: the binary it runs now),
    /// that takes over every attachment and socket while the guests run (service/handover.rs).
    /// The old process exits once its closing sockets are flushed. On any failure the new
    /// process is killed and the old one serves on.
    pub fn upgrade(&self, binary: Option<PathBuf>, force: bool) -> io::Result<Upgraded> {
        if let Some(b) = &binary {
            check_abi(b)?;
        }
        let exe = binary.clone().or_else(|| self.exe.lock().unwrap_or_else(|e| e.into_inner()).clone());
        if self.link.is_some() {
            return self.upgrade_user(binary, exe, force);
        }
        let (mut child, ours, pidfd) = self.launch(exe.as_deref(), false, false)?;
        let new_pid = child.id();
        // Holding the lock: no attach, hold or stats reaches either process meanwhile.
        let mut p = self.lock();
        if p.pid.filter(|_| p.control.is_some()).is_none() {
            return Err(self.give_up(&mut child, "it is not running (restarting?)".into()));
        }
        let mut new = Proc { pid: Some(new_pid), pidfd: None, control: Some(ours), generation: 0, line: 0 };
        let (handed, took) = hand(&mut p, &mut new, None);
        let handed = match handed {
            Ok(h) => h,
            Err(e) => {
                let why = match took {
                    Err(t) => format!("{e}; the new NSM: {t}"),
                    Ok(_) => e.to_string(),
                };
                return Err(self.give_up(&mut child, format!("{why}; the old process serves on")));
            }
        };
        if let Err(e) = took {
            // The old process let go only after the new one said it serves: it does.
            eprintln!("netkernel engine: NSM {}: the new process's answer to takeover: {e}", self.name);
        }
        // Dropping the old channel lets the old process exit.
        let blackout = Duration::from_nanos(handed.serving_ns.saturating_sub(handed.stopped_ns));
        Ok(self.become_new(&mut p, (child, new.control, pidfd), binary, blackout, |u| {
            u.attachments = handed.attachments;
            u.sockets = handed.sockets;
        }))
    }

    /// A user NSM's upgrade (service/src/drain.rs): the new process reads the link and takes
    /// every new attachment; the old one serves the attachments it has, as the new one's
    /// executor, until each can move there (no handshake in progress), and relays their
    /// connections until they close. The blackout is the time no process read the link.
    fn upgrade_user(&self, binary: Option<PathBuf>, exe: Option<PathBuf>, force: bool) -> io::Result<Upgraded> {
        let (mut child, ours, pidfd) = self.launch(exe.as_deref(), false, true)?;
        let new_pid = child.id();
        let mut p = self.lock();
        let Some(old_pid) = p.pid.filter(|_| p.control.is_some()) else {
            return Err(self.give_up(&mut child, "it is not running (restarting?)".into()));
        };
        let stopped = if force { Self::end_drain(&mut p) } else { Ok(false) };
        let stopped = match stopped {
            Ok(s) => s,
            Err(e) => return Err(self.give_up(&mut child, format!("ending the previous drain: {e}"))),
        };
        let drain = |p: &mut Proc| {
            Self::call_fds(p, &NsmRequest::Drain, &[]).and_then(|(v, fds)| {
                let d: netkernel_service::drain::Drained =
                    serde_json::from_value(v).map_err(|e| other(format!("malformed drain reply: {e}")))?;
                Ok((d, fds))
            })
        };
        let mut drained = drain(&mut p);
        // A process just stopped is noticed by its successor's loop, not at once.
        let patience = Instant::now() + Duration::from_secs(2);
        while stopped && drained.is_err() && Instant::now() < patience {
            std::thread::sleep(Duration::from_millis(20));
            drained = drain(&mut p);
        }
        let (drained, fds) = match drained {
            Ok(d) => d,
            Err(e) => return Err(self.give_up(&mut child, format!("{e}; the old process serves on"))),
        };
        let mut new = Proc { pid: Some(new_pid), pidfd: None, control: Some(ours), generation: 0, line: 0 };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let serving = Self::call(&mut new, &NsmRequest::Succeed { ports: drained.ports.clone() }, &raw);
        drop(fds);
        // The old process takes orders from the new one now: whatever happens, the engine's
        // channel to it is gone.
        let serving_ns = match serving.and_then(|v| serde_json::from_value::<u64>(v).map_err(|e| other(e.to_string())))
        {
            Ok(t) => t,
            Err(e) => {
                p.control = None;
                return Err(self.give_up(
                    &mut child,
                    format!(
                        "the new process: {e}; the old one (pid {old_pid}) gets its link back and serves its \
                         guests until they leave, then the NSM restarts"
                    ),
                ));
            }
        };
        let blackout = Duration::from_nanos(serving_ns.saturating_sub(drained.stopped_ns));
        Ok(self.become_new(&mut p, (child, new.control, pidfd), binary, blackout, |u| {
            u.draining = Some((drained.attachments, drained.sockets))
        }))
    }

    /// `ctl upgrade --force` while an earlier upgrade's old process still serves or relays: it is
    /// stopped at once, as if it crashed (its guests' relayed connections reset; the guests and
    /// their other connections go on), so that this upgrade can begin. Returns whether one was.
    fn end_drain(p: &mut Proc) -> io::Result<bool> {
        let stats: NsmStats = serde_json::from_value(Self::call(p, &NsmRequest::Stats, &[])?)
            .map_err(|e| other(format!("malformed stats: {e}")))?;
        for &pid in &stats.draining {
            crate::log(format!("ctl upgrade --force: stopping pid {pid}, the previous upgrade's old process"));
            // SAFETY: integers only. The pid is a draining NSM process the NSM just named.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        Ok(!stats.draining.is_empty())
    }

    /// An upgrade that cannot go on: its new process is stopped; the error says why.
    fn give_up(&self, child: &mut Child, why: String) -> io::Error {
        let _ = child.kill();
        let _ = child.wait();
        other(format!("upgrade of NSM {} failed: {why}", self.name))
    }

    /// After an upgrade: the new process (`child`, its channel and pidfd) is the NSM, watched by
    /// the supervisor, and later restarts use `binary` if one was given.
    fn become_new(
        &self,
        p: &mut Proc,
        (child, control, pidfd): (Child, Option<UnixStream>, OwnedFd),
        binary: Option<PathBuf>,
        blackout: Duration,
        what: impl FnOnce(&mut Upgraded),
    ) -> Upgraded {
        let (old_pid, new_pid) = (p.pid.unwrap_or_default(), child.id());
        let exe = binary.clone().or_else(|| self.exe.lock().unwrap_or_else(|e| e.into_inner()).clone());
        self.watch_next(child);
        p.pid = Some(new_pid);
        p.pidfd = Some(pidfd);
        p.control = control;
        p.generation += 1;
        if let Some(b) = binary {
            *self.exe.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        }
        self.upgrades.fetch_add(1, Ordering::Relaxed);
        self.last_blackout_us.store(blackout.as_micros() as u64, Ordering::Relaxed);
        let mut u = Upgraded {
            old_pid,
            new_pid,
            blackout,
            attachments: 0,
            sockets: 0,
            draining: None,
            binary: exe.unwrap_or_else(|| std::env::current_exe().unwrap_or_default()),
        };
        what(&mut u);
        u
    }

    /// The supervisor watches `child`, an upgrade's new process, from now on.
    fn watch_next(&self, child: Child) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running::Child(child));
        if let Some(swap) = &self.swap {
            let one = 1u64;
            // SAFETY: an eventfd write takes 8 bytes from a live u64.
            unsafe { libc::write(swap.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Hands attachments `ids` to NSM `to` (`ctl move`): their sockets, listeners and
    /// co-located connections go on there. Returns what was handed and the generation of `to`
    /// that serves them now. On failure both NSMs serve on as before.
    pub fn move_to(&self, to: &Nsm, ids: Vec<u64>) -> io::Result<(netkernel_service::control::Handed, u64)> {
        if self.link.is_some() || to.link.is_some() {
            return Err(other(
                "a user NSM's connections live in its process: they cannot move (new connections of the tenant \
                 can: change its nsm in the configuration and reload)"
                    .into(),
            ));
        }
        // Both locks, always in the order of the names, so that two moves never wait on each other.
        let (mut p, mut q) = if self.name < to.name {
            let p = self.lock();
            (p, to.lock())
        } else {
            let q = to.lock();
            (self.lock(), q)
        };
        if q.control.is_none() {
            return Err(other(format!("NSM {} is not running", to.name)));
        }
        let (handed, took) = hand(&mut p, &mut q, Some(ids));
        let handed = handed.map_err(|e| other(format!("nothing moved, NSM {} serves on: {e}", self.name)))?;
        if let Err(e) = took {
            eprintln!("netkernel engine: NSM {}: its answer to takeover: {e}", to.name);
        }
        Ok((handed, q.generation))
    }

    /// Stops the NSM for good: it resets its guests (their regions are declared dead) and
    /// exits; one that does not answer gets SIGTERM.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut p = self.lock();
        if Self::call(&mut p, &NsmRequest::Shutdown, &[]).is_err() {
            if let Some(pidfd) = &p.pidfd {
                // SAFETY: pidfd_send_signal on a pidfd we own; it cannot reach a reused pid.
                unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGTERM, 0usize, 0u32) };
            }
        }
        p.control = None;
        p.pid = None;
        p.pidfd = None;
    }
}

/// `giver` hands attachments (`only`; None: everything) to `taker` over a fresh socket pair.
/// The taker is asked from a second thread, since it waits for what the giver writes; the
/// giver answers only once the taker has said it serves them.
fn hand(
    giver: &mut Proc,
    taker: &mut Proc,
    only: Option<Vec<u64>>,
) -> (io::Result<netkernel_service::control::Handed>, io::Result<serde_json::Value>) {
    let (to_giver, to_taker) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return (Err(e), Err(other("no socket pair".into()))),
    };
    std::thread::scope(|s| {
        let took = s.spawn(|| Nsm::call(taker, &NsmRequest::Takeover, &[to_taker.as_raw_fd()]));
        let handed =
            Nsm::call(giver, &NsmRequest::Handover { attachments: only, within: false }, &[to_giver.as_raw_fd()])
                .and_then(|v| serde_json::from_value(v).map_err(|e| other(format!("malformed handover reply: {e}"))));
        // Our copy closed: a taker still waiting for a giver that refused reads the end.
        drop(to_giver);
        let took = took.join().unwrap_or_else(|_| Err(other("the takeover thread panicked".into())));
        (handed, took)
    })
}

/// What an upgrade did.
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
    /// From the old process stopping to the new one serving.
    pub blackout: Duration,
    pub attachments: usize,
    pub sockets: usize,
    /// A user NSM's: the attachments and sockets the old process had (they follow to the new
    /// one as soon as they can; their connections stay, relayed).
    pub draining: Option<(usize, usize)>,
    pub binary: PathBuf,
}

/// Refuses a binary whose region ABI differs from this engine's: its NSM could not read the
/// guests' regions. (`netkernel abi` prints the number.)
fn check_abi(binary: &std::path::Path) -> io::Result<()> {
    let out = Command::new(binary)
        .arg("abi")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| other(format!("cannot run {}: {e}", binary.display())))?;
    let theirs = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().ok().filter(|_| out.status.success());
    match theirs {
        Some(v) if v == netkernel_abi::ABI_VERSION => Ok(()),
        Some(v) => Err(other(format!(
            "{} speaks region ABI {v}, this engine and its guests {}: refused, the old NSM serves on",
            binary.display(),
            netkernel_abi::ABI_VERSION
        ))),
        None => Err(other(format!(
            "{} does not say its region ABI (`{} abi` printed no number): refused, the old NSM serves on",
            binary.display(),
            binary.display()
        ))),
    }
}

/// Waits for the NSM to die, reports it, and starts it again, backing off when it keeps dying.
/// An adopted NSM, no child of ours, is watched the same way through its pidfd; the NSM
/// started in its place is our child.
pub fn supervise(
    nsm: std::sync::Arc<Nsm>,
    mut running: Running,
    on_death: impl Fn(&str, std::ops::RangeInclusive<u64>),
) {
    let mut backoff = Duration::from_millis(100);
    let mut started = Instant::now();
    loop {
        let status = running.wait(nsm.swap.as_ref());
        let (generations, status) = {
            let mut p = nsm.lock();
            // An upgrade handed the old process's work to a new one, which is ours to watch now.
            if let Some(next) = nsm.next.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let old = std::mem::replace(&mut running, next);
                if let Running::Child(mut c) = old {
                    // It exits once it has let go (a user NSM's, once its guests have left).
                    std::thread::spawn(move || c.wait());
                }
                continue;
            }
            let Some(status) = status else { continue };
            p.control = None;
            p.pid = None;
            p.pidfd = None;
            (p.line..=p.generation, status)
        };
        if nsm.stopping.load(Ordering::SeqCst) {
            return;
        }
        eprintln!("netkernel engine: NSM {} exited ({status}); restarting", nsm.name);
        on_death(&nsm.name, generations);
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        loop {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            if nsm.stopping.load(Ordering::SeqCst) {
                return;
            }
            match nsm.spawn() {
                Ok(r) => {
                    running = r;
                    started = Instant::now();
                    nsm.restarts.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => eprintln!("netkernel engine: restarting NSM {}: {e}", nsm.name),
            }
        }
    }
}
