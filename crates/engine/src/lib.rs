//! CoreEngine: owns tenants, NSMs and attachments. It brokers each attachment (creates and
//! seals the region, passes fds with SCM_RIGHTS, tells the NSM which tenant it serves) and then
//! steps out of the data path (DESIGN.md D1). It supervises NSM processes and answers `ctl`.

pub mod config;
pub mod link;
mod lobby;
pub mod metrics;
pub mod netns;
mod supervisor;

use config::Config;
pub use lobby::LobbyError;
use netkernel_control::{AttachReply, EngineRequest, JoinReply, Reply};
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use netkernel_service::control::NsmStats;
use serde::Serialize;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
pub use supervisor::Nsm;

/// The control socket path when none is given: NETKERNEL_SOCKET, else /run/netkernel as root,
/// else $XDG_RUNTIME_DIR/netkernel (or /tmp/netkernel-UID).
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("NETKERNEL_SOCKET") {
        return p.into();
    }
    // SAFETY: no arguments, no memory touched; getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return "/run/netkernel/engine.sock".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => Path::new(&d).join("netkernel/engine.sock"),
        None => format!("/tmp/netkernel-{uid}/engine.sock").into(),
    }
}

/// Engine errors a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Another engine answers on the socket.
    #[error("an engine is already running on {0} (stop it, or pass --socket)")]
    AlreadyRunning(PathBuf),
    /// The control socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    /// An NSM could not be started.
    #[error("cannot start NSM {name}: {source}")]
    Spawn { name: String, source: io::Error },
    /// The state directory (where NSMs wait for a restarted engine) could not be made.
    #[error("cannot make the state directory {path}: {source} (it lives next to the control socket)")]
    StateDir { path: PathBuf, source: io::Error },
}

/// The engine's state directory: next to the control socket, named after it.
pub fn state_dir(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".d");
    name.into()
}

/// Stops, cleanly, NSMs a previous engine left whose names the configuration no longer has.
fn stop_strays(state_dir: &Path, cfg: &Config) {
    let Ok(dir) = std::fs::read_dir(state_dir) else { return };
    for entry in dir.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".sock")) else {
            continue;
        };
        if cfg.nsms.iter().any(|n| n.name.get_ref() == name) {
            continue;
        }
        let net_file = state_dir.join(format!("{name}.net"));
        let net: Option<netns::NsmNet> = std::fs::read(&net_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Ok(c) = UnixStream::connect(&path) {
            let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let body = serde_json::to_vec(&netkernel_service::control::NsmRequest::Shutdown).unwrap_or_default();
            if sys::send_frame(c.as_raw_fd(), &body, &[]).is_ok() && sys::recv_frame(c.as_raw_fd()).is_ok() {
                log(format!("stopped NSM {name}: the configuration has no NSM of that name"));
            }
        }
        // Dropping the namespace removes it.
        drop(net);
        let _ = std::fs::remove_file(&net_file);
        let _ = std::fs::remove_file(&path);
    }
}

/// What becomes of a control connection after a request.
enum Next {
    /// Its reply could not be sent, or the request was garbage: close it.
    Close,
    /// Wait for its next request (in the lobby, with its limits).
    More,
    /// Its process keeps it for life (Engine::keep).
    Keep,
}

/// What the engine remembers of one attachment.
struct Attachment {
    tenant: String,
    nsm: String,
    pid: i32,
    /// Processes sharing the attachment (the attaching one, its forked children, programs that
    /// joined after exec) with their holder indices.
    holders: Vec<(i32, u32)>,
    /// The engine's own mapping, used to declare the region dead if its NSM dies.
    region: Region,
    guest_bell: OwnedFd,
    /// Given, with the guest doorbell, to a program that joins after exec.
    nsm_bell: OwnedFd,
    nsm_generation: u64,
}

/// The secrets of the tenants with a token_file (a file that cannot be read admits nobody).
fn read_tokens(cfg: &Config) -> HashMap<String, String> {
    cfg.tenants
        .iter()
        .filter_map(|t| {
            let token = std::fs::read_to_string(t.token_file.as_ref()?.get_ref()).ok()?;
            Some((t.name.get_ref().clone(), token.trim().to_string()))
        })
        .collect()
}

/// The running engine.
pub struct Engine {
    /// The configuration in effect (replaced whole by `ctl reload`).
    cfg: std::sync::RwLock<Arc<Config>>,
    /// Source addresses the engine gave tenants of namespaced NSMs that configured no addresses.
    auto_addresses: HashMap<String, std::net::IpAddr>,
    socket: PathBuf,
    /// Where NSMs wait to be adopted by the next engine (next to the socket).
    state_dir: PathBuf,
    /// The supervised NSMs (`ctl reload` may add some).
    nsms: std::sync::RwLock<Vec<Arc<Nsm>>>,
    /// This engine, for the supervisor threads of NSMs added later.
    me: std::sync::Weak<Engine>,
    attachments: Mutex<HashMap<u64, Attachment>>,
    /// Tenants `ctl move` gave another NSM than their configuration's (tenant -> NSM), until a
    /// reload names that NSM or the engine restarts.
    moved: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
    started: Instant,
    /// The secrets of tenants with a token_file, read at start and at each reload.
    tokens: std::sync::RwLock<HashMap<String, String>>,
}

#[derive(Serialize)]
struct TenantView {
    name: String,
    /// The NSM serving it now.
    nsm: String,
    /// The configuration's NSM, when `ctl move` put the tenant on another.
    #[serde(skip_serializing_if = "Option::is_none")]
    configured_nsm: Option<String>,
    uids: Option<Vec<u32>>,
    gids: Option<Vec<u32>>,
    /// Whether a token file admits processes too.
    token: bool,
    attachments: usize,
    /// Its share of its NSM's CPU under the fair scheduler, and its cap in cores.
    cpu_weight: u32,
    cpu_limit: Option<f64>,
    /// Totals from the tenant's NSM since it started.
    #[serde(flatten)]
    totals: netkernel_service::control::TenantTotals,
}

#[derive(Serialize)]
struct NsmView {
    name: String,
    kind: String,
    congestion: String,
    scheduler: String,
    /// Executor threads running the NSM's tasks now.
    executors: u32,
    /// CPU the NSM's executors used since it started, seconds.
    cpu_seconds: f64,
    pid: Option<u32>,
    restarts: u64,
    /// `ctl upgrade`s since the engine started, and the last one's blackout.
    upgrades: u64,
    last_blackout_ms: f64,
    /// A user NSM's old processes still serving the attachments they had at an upgrade.
    draining: Vec<u32>,
    /// Connections those old processes relay for guests the new one serves.
    relayed: usize,
    attachments: usize,
    bytes_in: u64,
    bytes_out: u64,
    conns_total: u64,
    /// Of those, connects that took the co-located short cut.
    conns_colocated: u64,
    conns_open: usize,
    violations: u64,
    /// Where the host reaches an NSM in a network namespace of its own.
    address: Option<String>,
}

#[derive(Serialize)]
struct StatusView {
    version: &'static str,
    pid: u32,
    socket: String,
    uptime_s: f64,
    region_backing: String,
    region_bytes: u64,
    attachments: usize,
    tenants: usize,
    nsms: Vec<NsmView>,
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new fd that nothing else holds.
    sys::eventfd().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: integers only, no memory passed; an unknown pid is the kernel's to refuse.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new fd (checked >= 0) that nothing else holds.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The peer's primary and supplementary groups (SO_PEERGROUPS: as they were when it connected).
fn peer_groups(s: &UnixStream, primary: u32) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: groups/len describe a live buffer.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
    };
    groups.truncate(if r < 0 { 0 } else { len as usize / std::mem::size_of::<libc::gid_t>() });
    groups.push(primary);
    groups
}

/// Compares a presented token with a tenant's without an early exit.
fn token_matches(presented: Option<&str>, expected: Option<&String>) -> bool {
    match (presented, expected) {
        (Some(p), Some(e)) if p.len() == e.len() => {
            p.bytes().zip(e.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        }
        _ => false,
    }
}

/// Where the engine keeps `ctl move`'s overrides, in its state directory.
const MOVED: &str = "moved.json";

/// The moves a previous engine made (tenant -> NSM) that `cfg` still allows.
fn read_moved(state_dir: &Path, cfg: &Config) -> HashMap<String, String> {
    let mut moved: HashMap<String, String> =
        std::fs::read(state_dir.join(MOVED)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    keep_moved(&mut moved, cfg);
    moved
}

/// Keeps the overrides that still say something: the tenant and the NSM exist, and the file does
/// not name that NSM for the tenant already.
fn keep_moved(moved: &mut HashMap<String, String>, cfg: &Config) {
    moved.retain(|tenant, nsm| {
        cfg.nsms.iter().any(|n| n.name.get_ref() == nsm)
            && cfg.tenants.iter().any(|t| t.name.get_ref() == tenant && t.nsm.get_ref() != nsm)
    });
}

/// A user NSM's TAP device, named for this engine so that engines side by side (tests) do not
/// collide; validated with the configuration.
fn user_link(n: &config::NsmConfig, index: usize) -> Option<(link::UserLink, String)> {
    (n.kind == "user").then(|| n.user_link().ok()).flatten().map(|l| {
        // SAFETY: getpid cannot fail.
        (l, format!("nku{index}p{}", unsafe { libc::getpid() } % 100_000))
    })
}

/// NSM `n`, the `index`th of the configuration, as the engine supervises it; `net`: the network
/// namespace of its own, if it has one.
fn nsm_for(n: &config::NsmConfig, index: usize, state_dir: &Path, net: Option<netns::NsmNet>) -> Nsm {
    let name = n.name.get_ref();
    let hosts = n.hosts.as_ref().map(|h| h.get_ref().clone().into_iter().collect()).unwrap_or_default();
    let congestion = n.congestion.as_ref().map(|c| c.get_ref().clone());
    let rendezvous = state_dir.join(format!("{name}.sock"));
    Nsm::new(name.clone(), n.kind.clone(), congestion, hosts, net, user_link(n, index), rendezvous)
        .with_scheduler(n.scheduler.as_ref().map(|s| s.get_ref().clone()), n.executors_arg())
}

/// Only root and the engine's own uid may change what the engine runs (`what`: the request).
fn operator(conn: &UnixStream, what: &str) -> Result<(), String> {
    // SAFETY: no arguments, no memory touched; geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_cred(conn) {
        Ok(c) if c.uid == 0 || c.uid == me => Ok(()),
        Ok(c) => Err(format!("uid {} may not {what} (root or uid {me} may)", c.uid)),
        Err(e) => Err(format!("SO_PEERCRED: {e}")),
    }
}

fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    sys::peer_cred(s.as_raw_fd())
}

fn log(msg: impl AsRef<str>) {
    eprintln!("netkernel engine: {}", msg.as_ref());
}

impl Engine {
    /// Binds the control socket, adopts the NSMs a previous engine left running (those whose
    /// name and kind the configuration still has) and starts the others.
    pub fn start(cfg: Config, socket: PathBuf) -> Result<(Arc<Engine>, UnixListener), EngineError> {
        if UnixStream::connect(&socket).is_ok() {
            return Err(EngineError::AlreadyRunning(socket));
        }
        if let Some(dir) = socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).map_err(|source| EngineError::Listen { path: socket.clone(), source })?;
        // Guests of every uid connect here; tenants' uid lists decide who may attach.
        let _ = std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let state_dir = state_dir(&socket);
        std::fs::create_dir_all(&state_dir)
            .and_then(|()| {
                // What the engine finds there it trusts (it adopts the NSMs listening there), so
                // the directory must be its own.
                let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::symlink_metadata(&state_dir)?);
                // SAFETY: no arguments, no memory touched; geteuid cannot fail.
                let me = unsafe { libc::geteuid() };
                if owner != me {
                    return Err(io::Error::other(format!("owned by uid {owner}, not this engine's uid {me}")));
                }
                std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            })
            .map_err(|source| EngineError::StateDir { path: state_dir.clone(), source })?;
        stop_strays(&state_dir, &cfg);
        let mut nsms = Vec::new();
        let mut running = Vec::new();
        let mut adopted = Vec::new();
        let mut auto_addresses = HashMap::new();
        for (index, n) in cfg.nsms.iter().enumerate() {
            let name = n.name.get_ref();
            let net_file = state_dir.join(format!("{name}.net"));
            let old_net: Option<netns::NsmNet> =
                std::fs::read(&net_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let had_net = old_net.is_some();
            let link = user_link(n, index);
            let candidate = nsm_for(n, index, &state_dir, old_net);
            let veth = link.as_ref().is_some_and(|(l, _)| l.medium == link::Medium::Veth);
            match candidate.adopt() {
                Some((r, state)) if had_net == (n.netns || veth) => {
                    log(format!(
                        "adopted NSM {name} (pid {}) serving {} attachment(s)",
                        state.pid,
                        state.attachments.len()
                    ));
                    if let Some(net) = candidate.net.as_ref().filter(|_| n.netns) {
                        for (i, t) in cfg.tenants.iter().enumerate().filter(|(_, t)| t.nsm.get_ref() == name) {
                            if t.addresses.is_none() {
                                auto_addresses
                                    .insert(t.name.get_ref().clone(), std::net::IpAddr::V4(net.tenant_addr(i)));
                            }
                        }
                    }
                    nsms.push(Arc::new(candidate));
                    running.push(r);
                    adopted.push(state);
                    continue;
                }
                Some((_, state)) => {
                    log(format!("stopping NSM {name} (pid {}): its network namespace setting changed", state.pid));
                    candidate.stop();
                }
                None => {}
            }
            // Whatever namespace the old NSM had goes with it.
            drop(candidate);
            let _ = std::fs::remove_file(&net_file);
            let spawn_err = |e: String| EngineError::Spawn { name: name.clone(), source: std::io::Error::other(e) };
            let net = if n.netns {
                let net = netns::NsmNet::create(name, index).map_err(spawn_err)?;
                log(format!("NSM {name} runs in network namespace {}, reachable at {}", net.name, net.nsm_addr));
                // Tenants of a namespaced NSM without addresses of their own get a source address
                // in its subnet: their connections leave from it, and shaping tells tenants
                // apart by it.
                let mut shaped = Vec::new();
                for (i, t) in cfg.tenants.iter().enumerate().filter(|(_, t)| t.nsm.get_ref() == name) {
                    if t.addresses.is_none() {
                        let a = net.tenant_addr(i);
                        net.add_addr(a).map_err(spawn_err)?;
                        auto_addresses.insert(t.name.get_ref().clone(), std::net::IpAddr::V4(a));
                        shaped.push((a, t.weight.unwrap_or(1)));
                    }
                }
                if let Some(bits) = n.egress_rate {
                    net.shape(bits, n.fair, &shaped).map_err(spawn_err)?;
                }
                Some(net)
            } else if let (true, Some((l, _))) = (veth, &link) {
                let net = netns::NsmNet::create_for_user(name, index, l).map_err(spawn_err)?;
                log(format!("user NSM {name} runs in network namespace {} on veth, at {}", net.name, net.nsm_addr));
                Some(net)
            } else {
                None
            };
            if let Some(net) = &net {
                // An engine that adopts this NSM later needs to know its namespace.
                let json = serde_json::to_vec(net).map_err(|e| spawn_err(e.to_string()))?;
                std::fs::write(&net_file, json).map_err(|e| spawn_err(format!("{}: {e}", net_file.display())))?;
            }
            let nsm = nsm_for(n, index, &state_dir, net);
            let r = nsm.spawn().map_err(|source| EngineError::Spawn { name: name.clone(), source })?;
            nsms.push(Arc::new(nsm));
            running.push(r);
        }
        let tokens = read_tokens(&cfg);
        let moved = read_moved(&state_dir, &cfg);
        let engine = Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            cfg: std::sync::RwLock::new(Arc::new(cfg)),
            auto_addresses,
            tokens: std::sync::RwLock::new(tokens),
            socket,
            state_dir,
            nsms: std::sync::RwLock::new(nsms),
            attachments: Mutex::new(HashMap::new()),
            moved: Mutex::new(moved),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
        });
        for state in adopted {
            engine.rebuild(state);
        }
        for (nsm, r) in engine.nsms().into_iter().zip(running) {
            engine.supervise(nsm, r);
        }
        log(format!(
            "listening on {} with {} NSM(s), {} tenant(s)",
            engine.socket.display(),
            engine.nsms().len(),
            engine.cfg().tenants.len()
        ));
        Ok((engine, listener))
    }

    /// Takes over the attachments an adopted NSM serves: the engine's own mapping of each region
    /// and its doorbells come back from the NSM, holders from its pidfds. New attachment ids
    /// start past every id it serves.
    fn rebuild(&self, state: netkernel_service::control::NsmState) {
        let Ok(nsm) = self.nsm(&state.name) else { return };
        let generation = nsm.generation();
        let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        for a in state.attachments {
            self.next_id.fetch_max(a.attachment + 1, Ordering::Relaxed);
            let [memfd, nsm_bell, guest_bell] = match nsm.region(a.attachment) {
                Ok(fds) => fds,
                Err(e) => {
                    log(format!("NSM {}: attachment {} not taken over: {e}", nsm.name, a.attachment));
                    continue;
                }
            };
            let region = match Region::map_owned(memfd) {
                Ok(r) => r,
                Err(e) => {
                    log(format!("NSM {}: attachment {}: its region: {e}", nsm.name, a.attachment));
                    continue;
                }
            };
            atts.insert(
                a.attachment,
                Attachment {
                    tenant: a.tenant,
                    nsm: nsm.name.clone(),
                    pid: a.pid,
                    holders: a.holders,
                    region,
                    guest_bell,
                    nsm_bell,
                    nsm_generation: generation,
                },
            );
        }
    }

    /// Serves the control socket until the process ends (see lobby.rs for how connections
    /// are read); returns only if it cannot.
    pub fn serve(self: &Arc<Engine>, listener: UnixListener) -> Result<std::convert::Infallible, LobbyError> {
        lobby::serve(self.clone(), listener)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the engine for good (`ctl shutdown`): the NSMs and the socket and state directory
    /// go. Guests' connections end with ECONNRESET (their regions are declared dead first), not
    /// with a hang.
    pub fn shutdown(&self) {
        for a in self.attachments.lock().unwrap_or_else(|e| e.into_inner()).values() {
            a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
        }
        for n in &self.nsms() {
            n.stop();
            if let Some(net) = &n.net {
                net.remove();
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_file(&self.socket);
    }

    /// The engine exits but its guests do not notice (SIGTERM, SIGINT; live restore): NSMs that
    /// serve guests keep serving them and wait in the state directory for the next engine to
    /// adopt them. Idle ones are stopped (with their namespaces), as nothing would need them.
    pub fn detach(&self) {
        let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        for n in &self.nsms() {
            let serving = atts.values().filter(|a| a.nsm == n.name).count();
            if serving > 0 {
                log(format!("NSM {} keeps serving {serving} attachment(s) for the next engine", n.name));
                continue;
            }
            n.stop();
            if let Some(net) = &n.net {
                net.remove();
                let _ = std::fs::remove_file(self.state_dir.join(format!("{}.net", n.name)));
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Every region served by a dead NSM is declared dead: its guests' calls fail with
    /// ECONNRESET instead of hanging, and their next socket attaches afresh.
    /// `generations`: those the dead process served (its own and, after upgrades, its
    /// predecessors').
    fn nsm_died(&self, nsm: &str, generations: std::ops::RangeInclusive<u64>) {
        let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        let dead: Vec<u64> = atts
            .iter()
            .filter(|(_, a)| a.nsm == nsm && generations.contains(&a.nsm_generation))
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            if let Some(a) = atts.remove(id) {
                a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
            }
        }
        log(format!("NSM {nsm} died; {} attachment(s) reset", dead.len()));
    }

    /// A control connection its process keeps for life (it attached, held or joined): later
    /// requests (hold after fork, join after exec) are read here with no time limit, and its
    /// end lets go of what it attached.
    fn keep(self: Arc<Engine>, conn: UnixStream, mut attached: Option<u64>) {
        let fd = conn.as_raw_fd();
        loop {
            let (frame, fds) = match sys::recv_frame_max(fd, lobby::MAX_REQUEST) {
                Ok(Some((payload, fds))) => {
                    // SAFETY: fds just received, owned by nobody else.
                    (payload, fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect::<Vec<_>>())
                }
                Ok(None) => break,
                Err(e) => {
                    log(format!("control connection: {e}; closing it"));
                    let _ = sys::send_frame(fd, &Reply::err(format!("unreadable request: {e}")).encode(), &[]);
                    break;
                }
            };
            if let Next::Close = self.serve_request(&conn, &mut attached, &frame, fds) {
                break;
            }
        }
        self.hang_up(attached);
    }

    /// A control connection closed: the attachment it made (if any) loses its attaching process.
    fn hang_up(&self, attached: Option<u64>) {
        if let Some(id) = attached {
            // The attaching process is gone; the attachment lives on while forked children
            // hold it (the NSM watches their pidfds and closes the sockets after the last).
            let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = atts.get_mut(&id) {
                let gone = a.pid;
                a.holders.retain(|&(p, _)| p != gone && alive(p));
                if a.holders.is_empty() {
                    atts.remove(&id);
                }
            }
        }
    }

    /// Answers one request on a control connection (`attached`: the attachment it made, if
    /// any) and says what becomes of the connection.
    fn serve_request(&self, conn: &UnixStream, attached: &mut Option<u64>, frame: &[u8], fds: Vec<OwnedFd>) -> Next {
        let fd = conn.as_raw_fd();
        let req = match EngineRequest::parse(frame) {
            Ok(r) => r,
            Err(e) => {
                log(format!("garbage on control socket ({e}); closing that connection"));
                let _ = sys::send_frame(fd, &Reply::err(format!("bad request: {e}")).encode(), &[]);
                return Next::Close;
            }
        };
        // A process that attached, or holds or joined an attachment, keeps its connection.
        let mut kept = attached.is_some();
        let sent = match req {
            EngineRequest::Attach { tenant, token, isolated } if attached.is_none() => {
                match self.attach(conn, tenant, token, isolated) {
                    Ok((id, reply, fds)) => {
                        *attached = Some(id);
                        kept = true;
                        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                        sys::send_frame(fd, &Reply::ok(reply).encode(), &raw)
                    }
                    Err(msg) => {
                        log(&msg);
                        sys::send_frame(fd, &Reply::err(msg).encode(), &[])
                    }
                }
            }
            EngineRequest::Attach { .. } => sys::send_frame(fd, &Reply::err("already attached").encode(), &[]),
            EngineRequest::Hold { attachment, pid, holder } => {
                let r = self.hold(conn, attachment, pid, holder);
                match &r {
                    Ok(()) => kept = true,
                    Err(msg) => log(msg),
                }
                sys::send_frame(fd, &r.map_or_else(Reply::err, Reply::ok).encode(), &[])
            }
            EngineRequest::Join { attachment, holder } => match self.join(conn, attachment, holder, &fds) {
                Ok((holder, bells)) => {
                    kept = true;
                    let raw: Vec<RawFd> = bells.iter().map(|f| f.as_raw_fd()).collect();
                    sys::send_frame(fd, &Reply::ok(JoinReply { holder }).encode(), &raw)
                }
                Err(msg) => {
                    log(&msg);
                    sys::send_frame(fd, &Reply::err(msg).encode(), &[])
                }
            },
            EngineRequest::Shutdown => {
                // Only root or the engine's own uid may stop it.
                // SAFETY: no arguments, no memory touched; geteuid cannot fail.
                let me = unsafe { libc::geteuid() };
                match peer_cred(conn) {
                    Ok(c) if c.uid == 0 || c.uid == me => {
                        log(format!(
                            "shutdown asked by pid {} (uid {}): resetting guests, stopping NSMs",
                            c.pid, c.uid
                        ));
                        self.shutdown();
                        let _ = sys::send_frame(fd, &Reply::ok(()).encode(), &[]);
                        std::process::exit(0);
                    }
                    Ok(c) => sys::send_frame(
                        fd,
                        &Reply::err(format!("uid {} may not stop the engine (root or uid {me} may)", c.uid)).encode(),
                        &[],
                    ),
                    Err(e) => sys::send_frame(fd, &Reply::err(format!("SO_PEERCRED: {e}")).encode(), &[]),
                }
            }
            EngineRequest::Reload => {
                let reply = match operator(conn, "reload the engine").and_then(|()| self.reload()) {
                    Ok(report) => Reply::ok(report),
                    Err(e) => Reply::err(e),
                };
                sys::send_frame(fd, &reply.encode(), &[])
            }
            EngineRequest::Move { tenant, to } => {
                let reply = match operator(conn, "move a tenant").and_then(|()| self.move_tenant(&tenant, &to)) {
                    Ok(report) => Reply::ok(report),
                    Err(e) => Reply::err(e),
                };
                sys::send_frame(fd, &reply.encode(), &[])
            }
            EngineRequest::Upgrade { nsm, binary, force } => {
                let reply = match operator(conn, "upgrade an NSM").and_then(|()| self.upgrade(&nsm, binary, force)) {
                    Ok(report) => Reply::ok(report),
                    Err(e) => Reply::err(e),
                };
                sys::send_frame(fd, &reply.encode(), &[])
            }
            EngineRequest::Status => sys::send_frame(fd, &Reply::ok(self.status()).encode(), &[]),
            EngineRequest::Tenants => sys::send_frame(fd, &Reply::ok(self.tenants()).encode(), &[]),
            EngineRequest::Nsms => sys::send_frame(fd, &Reply::ok(self.nsm_views()).encode(), &[]),
            EngineRequest::Conns => {
                // root sees every tenant's connections; anyone else only those of tenants
                // that admit their uid or groups.
                let (uid, gid) = peer_cred(conn).map(|c| (c.uid, c.gid)).unwrap_or((u32::MAX, u32::MAX));
                let cfg = self.cfg();
                let visible: Vec<&str> = cfg
                    .tenants
                    .iter()
                    .filter(|t| uid == 0 || t.admits(uid, &peer_groups(conn, gid), false))
                    .map(|t| t.name.get_ref().as_str())
                    .collect();
                let conns: Vec<_> = self
                    .stats()
                    .into_iter()
                    .flat_map(|s| s.conns)
                    .filter(|c| visible.contains(&c.tenant.as_str()))
                    .collect();
                sys::send_frame(fd, &Reply::ok(conns).encode(), &[])
            }
        };
        match (sent, kept) {
            (Err(_), _) => Next::Close,
            (Ok(()), true) => Next::Keep,
            (Ok(()), false) => Next::More,
        }
    }

    /// The NSMs now.
    pub(crate) fn nsms(&self) -> Vec<Arc<Nsm>> {
        self.nsms.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// NSM `name`, or an error that lists the NSMs there are.
    fn nsm(&self, name: &str) -> Result<Arc<Nsm>, String> {
        let nsms = self.nsms();
        let found = nsms.iter().find(|n| n.name == name).cloned();
        found.ok_or_else(|| {
            let names: Vec<&str> = nsms.iter().map(|n| n.name.as_str()).collect();
            format!("no NSM named {name:?} (NSMs: {})", names.join(", "))
        })
    }

    /// Watches NSM `nsm` (running as `r`) from a thread of its own: restarts it when it dies,
    /// after declaring its guests' regions dead.
    fn supervise(&self, nsm: Arc<Nsm>, r: supervisor::Running) {
        let e = self.me.clone();
        std::thread::spawn(move || {
            supervisor::supervise(nsm, r, move |name, generations| {
                if let Some(e) = e.upgrade() {
                    e.nsm_died(name, generations);
                }
            })
        });
    }

    /// The NSM serving tenant `t` now: its configuration's, unless `ctl move` said otherwise.
    fn nsm_of(&self, t: &config::TenantConfig) -> String {
        let moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        moved.get(t.name.get_ref()).cloned().unwrap_or_else(|| t.nsm.get_ref().clone())
    }

    /// Serves tenant `tenant` by NSM `to` from now on (`ctl move`): new attachments go there,
    /// and between kernel NSMs the running guests' attachments move with their sockets
    /// (connections, listeners, co-located pipes), TCP ones taking `to`'s congestion control;
    /// refused with nothing moved if a co-located connection joins the tenant to a guest that
    /// stays. To or from a user NSM (whose connections live in its process) or an NSM with a
    /// namespace of its own, the running attachments drain where they are.
    pub fn move_tenant(&self, tenant: &str, to: &str) -> Result<netkernel_control::MoveReport, String> {
        let cfg = self.cfg();
        let t = cfg.tenants.iter().find(|t| t.name.get_ref() == tenant).ok_or_else(|| {
            let names: Vec<&str> = cfg.tenants.iter().map(|t| t.name.get_ref().as_str()).collect();
            format!("no tenant named {tenant:?} (tenants: {})", names.join(", "))
        })?;
        let (from, target) = (self.nsm(&self.nsm_of(t))?, self.nsm(to)?);
        if from.name == target.name {
            return Err(format!("tenant {tenant} is served by NSM {to} already"));
        }
        // A user NSM's connections live in its process, a namespaced NSM's sockets in its
        // namespace: across either, the tenant's new attachments go to the target and the running
        // ones drain where they are.
        let drain = from.kind == "user" || target.kind == "user" || from.net.is_some() || target.net.is_some();
        // A namespaced NSM gives its tenants source addresses (and shaping classes) at start, as a
        // reload that adds a tenant there is refused for.
        if target.net.is_some() && t.addresses.is_none() && !self.auto_addresses.contains_key(tenant) {
            return Err(format!(
                "NSM {to} runs in a network namespace of its own, whose tenants get their addresses when the \
                 engine starts: give tenant {tenant} `addresses`, or put it on {to} in the configuration and \
                 restart the engine"
            ));
        }
        // New attachments go to the target from now on; those already made move below.
        self.serve_by(&cfg, tenant, to);
        let ids: Vec<u64> = {
            let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
            atts.iter().filter(|(_, a)| a.tenant == tenant && a.nsm == from.name).map(|(id, _)| *id).collect()
        };
        let mut report = netkernel_control::MoveReport {
            tenant: tenant.into(),
            from: from.name.clone(),
            to: to.into(),
            ..Default::default()
        };
        if drain {
            report.draining = ids.len();
        } else if !ids.is_empty() {
            let (handed, generation) = match from.move_to(&target, ids.clone()) {
                Ok(h) => h,
                Err(e) => {
                    self.serve_by(&cfg, tenant, &from.name);
                    return Err(e.to_string());
                }
            };
            let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
            for id in &ids {
                if let Some(a) = atts.get_mut(id) {
                    a.nsm = target.name.clone();
                    a.nsm_generation = generation;
                }
            }
            report.attachments = handed.attachments;
            report.sockets = handed.sockets;
            report.blackout_ms = handed.serving_ns.saturating_sub(handed.stopped_ns) as f64 / 1e6;
        }
        // The target's own policy for the tenant (co-location follows the target's setting).
        if let Err(e) = target.set_policy(tenant, &self.policy(&cfg, t, false)) {
            log(format!("tenant {tenant} on NSM {to}: its policy: {e}"));
        }
        if report.draining > 0 {
            report.note = format!(
                "{} attachment(s) stay on NSM {} until their processes exit (their connections cannot leave a \
                 user NSM's process or an NSM's namespace); ",
                report.draining, report.from
            );
        }
        if *t.nsm.get_ref() == to {
            report.note += &format!("NSM {to} is the configuration's again");
        } else {
            report.note += &format!(
                "the configuration says nsm = {:?}; {to} serves the tenant (across engine restarts too) until \
                 another move, or a reload of a file that names {to} for it",
                t.nsm.get_ref()
            );
        }
        log(format!(
            "tenant {tenant} moved from NSM {} to {to}: {} attachment(s), {} socket(s), blackout {:.1} ms",
            report.from, report.attachments, report.sockets, report.blackout_ms
        ));
        Ok(report)
    }

    /// Tenant `tenant`'s new attachments go to NSM `nsm` from now on: an override of `cfg` kept
    /// in the state directory (a restarted engine keeps it), or none when `cfg` says so.
    fn serve_by(&self, cfg: &Config, tenant: &str, nsm: &str) {
        let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        moved.insert(tenant.into(), nsm.into());
        keep_moved(&mut moved, cfg);
        self.write_moved(&moved);
    }

    fn write_moved(&self, moved: &HashMap<String, String>) {
        let path = self.state_dir.join(MOVED);
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(moved)
            .map_err(io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            log(format!("{}: {e}; a restarted engine will not know of the moves", path.display()));
        }
    }

    /// Replaces NSM `name`'s process by a new one that takes over its guests while they run
    /// (`ctl upgrade`); from `binary` if given (it must speak this engine's region ABI).
    pub fn upgrade(
        &self,
        name: &str,
        binary: Option<String>,
        force: bool,
    ) -> Result<netkernel_control::UpgradeReport, String> {
        let nsm = self.nsm(name)?;
        let binary = match binary {
            Some(b) => Some(std::fs::canonicalize(&b).map_err(|e| format!("{b}: {e}"))?),
            None => None,
        };
        let u = nsm.upgrade(binary, force).map_err(|e| e.to_string())?;
        let blackout_ms = u.blackout.as_secs_f64() * 1000.0;
        let (draining_attachments, draining_sockets) = u.draining.unwrap_or_default();
        let following = match u.draining {
            Some((n, _)) => format!(
                ", {n} attachment(s) following from the old process (it relays their connections until they close)"
            ),
            None => String::new(),
        };
        log(format!(
            "NSM {name} upgraded: pid {} -> {} ({}), {} attachment(s), {} socket(s) handed over{following}, \
             blackout {blackout_ms:.1} ms",
            u.old_pid,
            u.new_pid,
            u.binary.display(),
            u.attachments,
            u.sockets,
        ));
        Ok(netkernel_control::UpgradeReport {
            nsm: name.into(),
            old_pid: u.old_pid,
            new_pid: u.new_pid,
            blackout_ms,
            attachments: u.attachments,
            sockets: u.sockets,
            draining_attachments,
            draining_sockets,
            binary: u.binary.display().to_string(),
        })
    }

    /// Applies the configuration file anew (`ctl reload`, SIGHUP): tenants added may attach,
    /// tenants removed lose their guests (sockets reset), tenants changed are served by the new
    /// policy at once, live guests too (weights, limits, addresses, admission). A file that does
    /// not load, or an edit that cannot be applied live (an NSM's, a tenant moved to another
    /// NSM, the [engine] section), is refused naming it, and the running configuration stays.
    pub fn reload(&self) -> Result<netkernel_control::ReloadReport, String> {
        let old = self.cfg();
        let path =
            old.path.clone().ok_or("the engine runs the built-in configuration (no --config): nothing to reload")?;
        let new = Arc::new(Config::load(&path).map_err(|e| format!("{e}; the running configuration stays"))?);
        let refuse = |what: String| Err(format!("{}: {what}; nothing applied", path.display()));
        let nsm_ids = |c: &Config| c.nsms.iter().map(|n| (n.name.get_ref().clone(), n.identity())).collect::<Vec<_>>();
        let (before, after) = (nsm_ids(&old), nsm_ids(&new));
        // An NSM added starts now; one removed or changed cannot change under its guests.
        let mut names: Vec<&str> = before.iter().filter(|b| !after.contains(b)).map(|b| b.0.as_str()).collect();
        names.dedup();
        if !names.is_empty() {
            return refuse(format!(
                "[[nsm]] {} changed or removed, which cannot change under running guests (a new NSM binary: \
                 `netkernel ctl upgrade NSM --binary PATH`; a tenant on another NSM: `netkernel ctl move TENANT --to \
                 NSM`; the rest takes effect when the engine restarts)",
                names.join(", ")
            ));
        }
        let new_nsms: Vec<(usize, &config::NsmConfig)> =
            new.nsms.iter().enumerate().filter(|(_, n)| !before.iter().any(|b| b.0 == *n.name.get_ref())).collect();
        for (_, n) in &new_nsms {
            if n.netns || n.user_link().is_ok_and(|l| l.medium == link::Medium::Veth) {
                return refuse(format!(
                    "NSM {} is new and runs in a network namespace of its own, which the engine makes at start \
                     (restart the engine to add it)",
                    n.name.get_ref()
                ));
            }
        }
        if format!("{:?}", old.engine) != format!("{:?}", new.engine) {
            return refuse("[engine] changed, which takes effect when the engine restarts".into());
        }
        let find = |c: &Config, name: &str| c.tenants.iter().find(|t| t.name.get_ref() == name).cloned();
        for t in &new.tenants {
            let name = t.name.get_ref();
            match find(&old, name) {
                // The edit names the NSM a `ctl move` put the tenant on: what is in effect.
                Some(o) if o.nsm.get_ref() != t.nsm.get_ref() && self.nsm_of(&o) != *t.nsm.get_ref() => {
                    return refuse(format!(
                        "tenant {name} moved from NSM {} to {}: `netkernel ctl move {name} --to {}` moves it with its \
                         running guests, then reload",
                        o.nsm.get_ref(),
                        t.nsm.get_ref(),
                        t.nsm.get_ref()
                    ))
                }
                None if new.nsms.iter().any(|n| n.name.get_ref() == t.nsm.get_ref() && n.netns) => {
                    return refuse(format!(
                        "tenant {name} is new on NSM {}, whose network namespace gives its tenants addresses at start",
                        t.nsm.get_ref()
                    ))
                }
                _ => {}
            }
        }
        let names = |c: &Config| c.tenants.iter().map(|t| t.name.get_ref().clone()).collect::<Vec<_>>();
        let added: Vec<String> = names(&new).into_iter().filter(|n| find(&old, n).is_none()).collect();
        let removed: Vec<String> = names(&old).into_iter().filter(|n| find(&new, n).is_none()).collect();
        let admission = |t: &config::TenantConfig| {
            format!("{:?}", (&t.uids, &t.gids, t.token_file.as_ref().map(|f| f.get_ref().clone())))
        };
        let mut changed = Vec::new();
        let mut policies = Vec::new();
        for t in &new.tenants {
            let Some(o) = find(&old, t.name.get_ref()) else { continue };
            let (p_old, p_new) = (self.policy(&old, &o, false), self.policy(&new, t, false));
            if p_old != p_new || admission(&o) != admission(t) {
                changed.push(t.name.get_ref().clone());
            }
            if p_old != p_new {
                policies.push((self.nsm_of(t), t.name.get_ref().clone(), p_new));
            }
        }
        // Kernel NSMs whose congestion control changed: new connections take the new one.
        let cc = |n: &config::NsmConfig| n.congestion.as_ref().map(|c| c.get_ref().clone());
        let mut switches = Vec::new();
        let pairs = new.nsms.iter().filter_map(|n| Some((old.nsms.iter().find(|o| o.name == n.name)?, n)));
        for (o, n) in pairs.filter(|(o, n)| cc(o) != cc(n)) {
            let Some(now) = cc(n) else {
                return refuse(format!(
                    "NSM {}: congestion removed (name the one new connections use)",
                    n.name.get_ref()
                ));
            };
            let Ok(nsm) = self.nsm(n.name.get_ref()) else { continue };
            switches.push((nsm.clone(), cc(o).unwrap_or_else(|| "default".into()), now));
        }
        let mut nsms_added = Vec::new();
        for (index, n) in new_nsms {
            let nsm = Arc::new(nsm_for(n, index, &self.state_dir, None));
            let r = nsm.spawn().map_err(|e| {
                let done = if nsms_added.is_empty() {
                    "nothing applied".to_string()
                } else {
                    format!("already started: {nsms_added:?}")
                };
                format!("{}: NSM {}: {e}; {done}", path.display(), nsm.name)
            })?;
            self.nsms.write().unwrap_or_else(|e| e.into_inner()).push(nsm.clone());
            nsms_added.push(nsm.name.clone());
            self.supervise(nsm, r);
        }
        let mut nsms = Vec::new();
        for (nsm, was, now) in switches {
            // The kernel checks the name: one it does not offer leaves this NSM as it was.
            nsm.set_congestion(&now).map_err(|e| {
                let done =
                    if nsms.is_empty() { "nothing applied".to_string() } else { format!("already applied: {nsms:?}") };
                format!("{}: NSM {}: congestion {now:?}: {e}; {done}", path.display(), nsm.name)
            })?;
            nsms.push(format!("{}: {was} -> {now}", nsm.name));
        }
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
        {
            let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
            keep_moved(&mut moved, &new);
            self.write_moved(&moved);
        }
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = read_tokens(&new);
        let gone: Vec<(u64, String)> = {
            let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = atts.iter().filter(|(_, a)| removed.contains(&a.tenant)).map(|(id, _)| *id).collect();
            ids.into_iter()
                .filter_map(|id| {
                    let a = atts.remove(&id)?;
                    a.region.mark_dead(Some(a.guest_bell.as_raw_fd()));
                    Some((id, a.nsm))
                })
                .collect()
        };
        for (id, nsm) in gone {
            if let Some(Err(e)) = self.nsm(&nsm).ok().map(|n| n.detach(id)) {
                log(format!("reload: NSM {nsm} could not end attachment {id}: {e}"));
            }
        }
        for (nsm, tenant, policy) in &policies {
            if let Some(Err(e)) = self.nsm(nsm).ok().map(|n| n.set_policy(tenant, policy)) {
                log(format!("reload: NSM {nsm} did not take tenant {tenant}'s new policy: {e}"));
            }
        }
        let report = netkernel_control::ReloadReport {
            config: path.display().to_string(),
            added,
            removed,
            changed,
            nsms,
            nsms_added,
        };
        log(format!(
            "reloaded {}: added {:?}, removed {:?}, changed {:?}, congestion {:?}, NSMs started {:?}",
            report.config, report.added, report.removed, report.changed, report.nsms, report.nsms_added
        ));
        Ok(report)
    }

    /// The configuration in effect.
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The private loopback address of the tenant at `index` in the configuration: 127.77.0.0/16
    /// holds one per tenant (the isolated guests of one tenant share it, as they share a tenant).
    fn private_loopback(index: usize) -> std::net::IpAddr {
        let n = index + 1;
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 77, (n >> 8) as u8, n as u8))
    }

    /// What tenant `t`'s NSM enforces for an attachment of it; `isolated`: the guest runs in a
    /// network namespace of its own.
    /// (Under configuration `cfg`.)
    fn policy(
        &self,
        cfg: &Config,
        t: &config::TenantConfig,
        isolated: bool,
    ) -> netkernel_service::control::TenantPolicy {
        let index = cfg.tenants.iter().position(|o| o.name.get_ref() == t.name.get_ref()).unwrap_or(0);
        netkernel_service::control::TenantPolicy {
            addresses: t.addresses(),
            source: self.auto_addresses.get(t.name.get_ref()).copied(),
            foreign: cfg
                .tenants
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .flat_map(|(i, o)| {
                    let private = o.private_loopback().then(|| Self::private_loopback(i));
                    o.addresses().into_iter().chain(private)
                })
                .collect(),
            loopback: (isolated && t.private_loopback()).then(|| Self::private_loopback(index)),
            max_sockets: t.max_connections,
            listen_ports: t.listen_ports.as_ref().map(|p| p.get_ref().iter().filter_map(|r| r.range()).collect()),
            rate: t.rate_limit.map(|bits| (bits, t.burst.unwrap_or(bits / 800))),
            colocate: t.colocate.unwrap_or_else(|| {
                let nsm = self.nsm_of(t);
                cfg.nsms.iter().find(|n| *n.name.get_ref() == nsm).is_none_or(|n| n.colocate)
            }),
            cpu_weight: t.cpu_weight.as_ref().map_or(1, |w| *w.get_ref()),
            cpu_limit: t.cpu_limit.as_ref().map(|l| *l.get_ref()),
        }
    }

    /// Forgets attachments none of whose processes is alive any more (the attaching process's
    /// connection closed earlier while forked children still ran).
    fn prune(&self) {
        let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        atts.retain(|_, a| {
            a.holders.retain(|&(p, _)| alive(p));
            !a.holders.is_empty()
        });
    }

    fn attach(
        &self,
        conn: &UnixStream,
        tenant: Option<String>,
        token: Option<String>,
        isolated: bool,
    ) -> Result<(u64, AttachReply, Vec<OwnedFd>), String> {
        self.prune();
        let cred = peer_cred(conn).map_err(|e| format!("SO_PEERCRED: {e}"))?;
        let groups = peer_groups(conn, cred.gid);
        let cfg = self.cfg();
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner()).clone();
        let admits = |t: &config::TenantConfig| {
            t.admits(cred.uid, &groups, token_matches(token.as_deref(), tokens.get(t.name.get_ref())))
        };
        let t = match &tenant {
            Some(name) => cfg
                .tenants
                .iter()
                .find(|t| t.name.get_ref() == name)
                .ok_or_else(|| format!("pid {} (uid {}) asked for unknown tenant {name:?}", cred.pid, cred.uid))?,
            None => cfg
                .tenants
                .iter()
                .find(|t| admits(t))
                .ok_or_else(|| format!("pid {} (uid {}): no tenant admits this process", cred.pid, cred.uid))?,
        };
        if !admits(t) {
            let why = if token.is_some() {
                "its token is not the tenant's"
            } else {
                "its uid and groups are not the tenant's"
            };
            return Err(format!(
                "pid {} (uid {}) may not attach as tenant {}: {why}",
                cred.pid,
                cred.uid,
                t.name.get_ref()
            ));
        }
        let nsm_name = self.nsm_of(t);
        let nsm = self.nsm(&nsm_name).map_err(|_| "tenant's NSM is not running")?;
        // The guest's word is checked: isolated means a network namespace other than ours.
        let isolated = isolated && {
            let theirs = net_namespace(cred.pid);
            let differs = theirs.is_some() && theirs != net_namespace(std::process::id() as i32);
            if !differs {
                log(format!(
                    "pid {} says it is isolated but shares the engine's network namespace: no private loopback",
                    cred.pid
                ));
            }
            differs
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let region = Region::create(id).map_err(|e| format!("creating region: {e}"))?;
        let memfd = region.fd().ok_or("region without memfd")?;
        let nsm_bell = eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let guest_bell = eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let pidfd = pidfd_open(cred.pid).map_err(|e| format!("pidfd_open({}): {e}", cred.pid))?;
        let generation = nsm
            .attach(
                id,
                t.name.get_ref(),
                cred.pid,
                cred.uid,
                self.policy(&cfg, t, isolated),
                &[memfd, nsm_bell.as_raw_fd(), guest_bell.as_raw_fd(), pidfd.as_raw_fd()],
            )
            .map_err(|e| format!("NSM {}: {e}", nsm.name))?;
        // SAFETY: integers only; memfd stays open for the call (the region owns it), so the dup is
        // of that file.
        let dup = unsafe { libc::fcntl(memfd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(format!("dup of the region memfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd, ours alone.
        let memfd_copy = unsafe { OwnedFd::from_raw_fd(dup) };
        let reply = AttachReply { attachment: id, tenant: t.name.get_ref().clone(), nsm: nsm.name.clone() };
        let keep_bell = guest_bell.try_clone().map_err(|e| format!("dup: {e}"))?;
        let keep_nsm_bell = nsm_bell.try_clone().map_err(|e| format!("dup: {e}"))?;
        self.attachments.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Attachment {
                tenant: t.name.get_ref().clone(),
                nsm: nsm.name.clone(),
                pid: cred.pid,
                holders: vec![(cred.pid, 0)],
                region,
                guest_bell: keep_bell,
                nsm_bell: keep_nsm_bell,
                nsm_generation: generation,
            },
        );
        Ok((id, reply, vec![memfd_copy, nsm_bell, guest_bell]))
    }

    /// A guest that forked asks that its child share the attachment. Only a process that holds
    /// the attachment may ask, and only for its own child.
    fn hold(&self, conn: &UnixStream, id: u64, child: i32, holder: u32) -> Result<(), String> {
        let cred = peer_cred(conn).map_err(|e| format!("SO_PEERCRED: {e}"))?;
        let nsm_name = {
            let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
            let a = atts.get(&id).ok_or_else(|| format!("pid {} asked to share unknown attachment {id}", cred.pid))?;
            if !a.holders.iter().any(|&(p, _)| p == cred.pid) {
                return Err(format!("pid {} does not hold attachment {id}", cred.pid));
            }
            a.nsm.clone()
        };
        if parent_of(child) != Some(cred.pid) {
            return Err(format!("pid {child} is not a child of pid {}", cred.pid));
        }
        self.add_holder(id, &nsm_name, child, holder).map(|_| ())
    }

    /// Makes `pid` a holder of attachment `id` as index `holder` (the NSM watches its pidfd),
    /// unless it is one already: a spawned child may join before its parent's `hold` arrives, a
    /// vfork child joins once for all its exec attempts. Returns the index `pid` holds with.
    fn add_holder(&self, id: u64, nsm_name: &str, pid: i32, holder: u32) -> Result<u32, String> {
        let held = |atts: &HashMap<u64, Attachment>| {
            atts.get(&id).and_then(|a| a.holders.iter().find(|&&(p, _)| p == pid).map(|&(_, h)| h))
        };
        if let Some(h) = held(&self.attachments.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(h);
        }
        let pidfd = pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let nsm = self.nsm(nsm_name).map_err(|_| "attachment's NSM is gone")?;
        nsm.hold(id, holder, pidfd.as_raw_fd()).map_err(|e| format!("NSM {}: {e}", nsm.name))?;
        let mut atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = atts.get_mut(&id) {
            if !a.holders.iter().any(|&(p, _)| p == pid) {
                a.holders.push((pid, holder));
            }
        }
        Ok(holder)
    }

    /// A program that inherited sockets of attachment `id` across exec holds it from now on.
    /// Having the region's memfd is the proof: only processes the attachment's own processes
    /// gave it to can have it. Returns the holder index it has (`holder`, unless it held the
    /// attachment already) and the doorbells (NSM's, guest's) for it.
    fn join(&self, conn: &UnixStream, id: u64, holder: u32, fds: &[OwnedFd]) -> Result<(u32, [OwnedFd; 2]), String> {
        let cred = peer_cred(conn).map_err(|e| format!("SO_PEERCRED: {e}"))?;
        let ident = |fd: RawFd| {
            // SAFETY: libc::stat is integers only, so all-zero bytes are a valid value (fstat
            // overwrites it).
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: &mut st is a live, writable libc::stat for the call; the kernel checks fd.
            (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
        };
        let (nsm_name, bells) = {
            let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
            let a = atts.get(&id).ok_or_else(|| format!("pid {} asked to join unknown attachment {id}", cred.pid))?;
            let proof = fds.first().and_then(|f| ident(f.as_raw_fd()));
            if proof.is_none() || proof != a.region.fd().and_then(ident) {
                return Err(format!("pid {} asked to join attachment {id} without its region", cred.pid));
            }
            let dup = |f: &OwnedFd| f.try_clone().map_err(|e| format!("dup: {e}"));
            (a.nsm.clone(), [dup(&a.nsm_bell)?, dup(&a.guest_bell)?])
        };
        Ok((self.add_holder(id, &nsm_name, cred.pid, holder)?, bells))
    }

    fn stats(&self) -> Vec<NsmStats> {
        self.nsms().iter().filter_map(|n| n.stats().ok()).collect()
    }

    fn nsm_views(&self) -> Vec<NsmView> {
        // Ask the NSMs before taking the attachments lock: a slow NSM must not stall attaches.
        let nsms = self.nsms();
        let stats: Vec<NsmStats> = nsms.iter().map(|n| n.stats().unwrap_or_default()).collect();
        let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        nsms.iter()
            .zip(stats)
            .map(|(n, s)| NsmView {
                name: n.name.clone(),
                kind: n.kind.clone(),
                congestion: s.congestion.clone(),
                scheduler: s.scheduler.clone(),
                executors: s.executors,
                cpu_seconds: s.cpu_seconds,
                pid: n.pid(),
                restarts: n.restarts(),
                upgrades: n.upgrades().0,
                last_blackout_ms: n.upgrades().1.as_secs_f64() * 1000.0,
                draining: s.draining.clone(),
                relayed: s.relayed,
                attachments: atts.values().filter(|a| a.nsm == n.name).count(),
                bytes_in: s.bytes_in,
                bytes_out: s.bytes_out,
                conns_total: s.conns_total,
                conns_colocated: s.conns_colocated,
                conns_open: s.conns.len(),
                violations: s.violations,
                address: n.net.as_ref().map(|net| format!("{} ({})", net.nsm_addr, net.name)),
            })
            .collect()
    }

    fn tenants(&self) -> Vec<TenantView> {
        let stats = self.stats();
        let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        self.cfg()
            .tenants
            .iter()
            .map(|t| TenantView {
                name: t.name.get_ref().clone(),
                nsm: self.nsm_of(t),
                configured_nsm: Some(t.nsm.get_ref().clone()).filter(|c| *c != self.nsm_of(t)),
                uids: t.uids.clone(),
                gids: t.gids.clone(),
                token: t.token_file.is_some(),
                attachments: atts.values().filter(|a| a.tenant == *t.name.get_ref()).count(),
                cpu_weight: t.cpu_weight.as_ref().map_or(1, |w| *w.get_ref()),
                cpu_limit: t.cpu_limit.as_ref().map(|l| *l.get_ref()),
                // A moved tenant's totals are in both NSMs.
                totals: stats.iter().filter_map(|s| s.tenants.get(t.name.get_ref())).fold(
                    netkernel_service::control::TenantTotals::default(),
                    |mut sum, t| {
                        sum.add(t);
                        sum
                    },
                ),
            })
            .collect()
    }

    fn status(&self) -> StatusView {
        self.prune();
        let nsms = self.nsm_views();
        let atts = self.attachments.lock().unwrap_or_else(|e| e.into_inner());
        let backing = atts
            .values()
            .next()
            .map(|a| a.region.backing().as_str().to_string())
            .unwrap_or_else(|| probe_backing().to_string());
        StatusView {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            socket: self.socket.display().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            region_backing: backing,
            region_bytes: netkernel_abi::Layout::standard().region_size,
            attachments: atts.len(),
            tenants: self.cfg().tenants.len(),
            nsms,
        }
    }
}

/// The network namespace `pid` is in (device and inode of /proc/PID/ns/net).
fn net_namespace(pid: i32) -> Option<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some((std::os::unix::fs::MetadataExt::dev(&m), std::os::unix::fs::MetadataExt::ino(&m)))
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// Whether a process still exists.
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 delivers nothing (the kernel only checks the pid); __errno_location points
    // at this thread's errno, always valid.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Which pages a new region would get.
fn probe_backing() -> &'static str {
    match Region::create(0) {
        Ok(r) => r.backing().as_str(),
        Err(_) => "unavailable",
    }
}

/// A `ctl` client's request/response over the control socket.
pub fn request(socket: &Path, req: &EngineRequest) -> Result<serde_json::Value, String> {
    let s = UnixStream::connect(socket)
        .map_err(|e| format!("no NetKernel engine at {}: {e} (start one with `netkernel serve`)", socket.display()))?;
    let (result, fds) = netkernel_control::call(s.as_raw_fd(), req, &[]).map_err(|e| format!("engine: {e}"))?;
    fds.into_iter().for_each(sys::close);
    Ok(result)
}
