//! NSM processes: spawned by the engine, talked to over a unix socket pair, restarted when
//! they die (DESIGN.md D3).

use netkernel_ring::sys;
use netkernel_service::control::{NsmRequest, NsmStats, Reply, TenantPolicy};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The fd number an NSM finds its engine channel on.
pub const CONTROL_FD: RawFd = 3;

struct Proc {
    pid: Option<u32>,
    control: Option<UnixStream>,
    generation: u64,
}

/// One supervised NSM.
pub struct Nsm {
    pub name: String,
    pub kind: String,
    congestion: Option<String>,
    hosts: Vec<(String, String)>,
    /// The network namespace the NSM runs in, if one of its own.
    pub net: Option<crate::netns::NsmNet>,
    proc_: Mutex<Proc>,
    restarts: AtomicU64,
    stopping: AtomicBool,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl Nsm {
    pub fn new(
        name: String,
        kind: String,
        congestion: Option<String>,
        hosts: Vec<(String, String)>,
        net: Option<crate::netns::NsmNet>,
    ) -> Nsm {
        Nsm {
            name,
            kind,
            congestion,
            hosts,
            net,
            proc_: Mutex::new(Proc { pid: None, control: None, generation: 0 }),
            restarts: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Proc> {
        self.proc_.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the NSM process (`netkernel nsm ...`, the same binary as the engine).
    pub fn spawn(&self) -> io::Result<Child> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))?;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["nsm", "--kind", &self.kind, "--name", &self.name, "--control-fd", &CONTROL_FD.to_string()]);
        if let Some(cc) = &self.congestion {
            cmd.args(["--congestion", cc]);
        }
        for (name, addr) in &self.hosts {
            cmd.arg("--host").arg(format!("{name}={addr}"));
        }
        // An NSM never serves its own sockets through NetKernel.
        cmd.env_remove("LD_PRELOAD").env_remove("NETKERNEL_SOCKET");
        cmd.stdin(Stdio::null());
        let fd = theirs.as_raw_fd();
        let netns = match &self.net {
            Some(n) => Some(std::fs::File::open(n.path())?),
            None => None,
        };
        let ns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls (setns, dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = ns_fd {
                    if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::dup2(fd, CONTROL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::fcntl(CONTROL_FD, libc::F_SETFD, 0);
                // No PDEATHSIG: if the engine dies, the NSM keeps serving its guests (D1) and
                // exits after the last one.
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        let mut p = self.lock();
        p.pid = Some(child.id());
        p.control = Some(ours);
        p.generation += 1;
        Ok(child)
    }

    pub fn pid(&self) -> Option<u32> {
        self.lock().pid
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// One request/response with the NSM.
    fn call(p: &mut Proc, req: &NsmRequest, fds: &[RawFd]) -> io::Result<serde_json::Value> {
        let c = p.control.as_ref().ok_or_else(|| other("NSM is not running".into()))?;
        let body = serde_json::to_vec(req).map_err(|e| other(e.to_string()))?;
        sys::send_frame(c.as_raw_fd(), &body, fds)?;
        let (payload, extra) = sys::recv_frame(c.as_raw_fd())?.ok_or_else(|| other("NSM closed its channel".into()))?;
        extra.into_iter().for_each(sys::close);
        let reply: Reply = serde_json::from_slice(&payload).map_err(|e| other(format!("malformed NSM reply: {e}")))?;
        if reply.ok {
            Ok(reply.result.unwrap_or_default())
        } else {
            Err(other(reply.error.unwrap_or_default()))
        }
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

    pub fn stats(&self) -> io::Result<NsmStats> {
        let mut p = self.lock();
        let v = Self::call(&mut p, &NsmRequest::Stats, &[])?;
        serde_json::from_value(v).map_err(|e| other(e.to_string()))
    }

    /// Stops the NSM for good (engine shutdown).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut p = self.lock();
        p.control = None;
        if let Some(pid) = p.pid.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
}

/// Waits for the NSM to die, reports it, and starts it again, backing off when it keeps dying.
pub fn supervise(nsm: std::sync::Arc<Nsm>, mut child: Child, on_death: impl Fn(&str, u64)) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let status = child.wait();
        let generation = {
            let mut p = nsm.lock();
            p.control = None;
            p.pid = None;
            p.generation
        };
        if nsm.stopping.load(Ordering::SeqCst) {
            return;
        }
        eprintln!(
            "netkernel engine: NSM {} exited ({}); restarting",
            nsm.name,
            match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            }
        );
        on_death(&nsm.name, generation);
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
                Ok(c) => {
                    child = c;
                    nsm.restarts.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => eprintln!("netkernel engine: restarting NSM {}: {e}", nsm.name),
            }
        }
    }
}
