//! UserStack: the state shared by all operations (interfaces, socket table, indexes, dirty
//! sets) and the poll loop. The socket calls are in `tcp.rs`, `udp.rs` and `opts.rs`.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use smoltcp::iface::{Config, Interface};
use smoltcp::socket::tcp::{self, CongestionControl};
use smoltcp::socket::udp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::config::{Link, UserConfig};
use crate::device::{FdDevice, LoopDevice};
use crate::frame::{self, Peek};
use crate::seam::{Errno, Ready};
use crate::shard::{shard_of, ExtPort, LoPort, Net, Sk, SHARD0};
use crate::sockaddr::Family;
use crate::table::{Index, Slab};

/// The interface facing the wire.
pub const EXT: usize = 0;
/// The in-process loopback (127.0.0.1, ::1 and the stack's own addresses).
pub const LO: usize = 1;

/// Frames read from the wire per poll: bounds the work of one poll so the driver gets to
/// answer its guests under a flood.
const RX_BATCH: usize = 256;
/// Loopback rounds per poll (each delivers what the previous one sent).
const LO_ROUNDS: usize = 64;

/// How long a passive handshake may take (tcp_synack_retries = 5: 63 s).
const SYNACK_TIMEOUT_S: u64 = 63;

/// How long unacknowledged data or FIN is retransmitted (tcp_retries2 = 15: 924.6 s).
const RETRIES2_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(924_600);
/// How long a closed socket waits in FIN-WAIT-2 for the peer's FIN (tcp_fin_timeout).
const FIN_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);

/// Linux's ephemeral port range (net.ipv4.ip_local_port_range).
pub const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// Default buffer capacities. Linux reports SO_RCVBUF 131072 and SO_SNDBUF 16384 for a new
/// TCP socket and autotunes both upwards; smoltcp's buffers are fixed at creation, so they get
/// room for a window-scaled receive window and a send buffer that keeps a 1 Gb/s LAN busy.
pub const TCP_RX_DEFAULT: usize = 256 * 1024;
pub const TCP_RX_DEFAULT_LO: usize = 128 * 1024;
pub const TCP_TX_DEFAULT: usize = 256 * 1024;
pub const UDP_RX_DEFAULT: usize = 212_992;
pub const UDP_TX_DEFAULT: usize = 212_992;
const UDP_PACKETS: usize = 256;

/// A socket of the user stack. Dropping it closes the socket at the stack's next poll.
pub struct Handle {
    pub(crate) id: usize,
    grave: Grave,
}

/// Ids of dropped handles. A mutex rather than a RefCell so that the stack and its handles
/// can be built on one thread and run on another (the lock is taken once per drop and poll).
type Grave = Arc<Mutex<Vec<usize>>>;

impl Drop for Handle {
    fn drop(&mut self) {
        // A poisoned lock only means a panic elsewhere; the list itself is always whole.
        self.grave.lock().unwrap_or_else(|e| e.into_inner()).push(self.id);
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handle({})", self.id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn num(self) -> u8 {
        match self {
            Proto::Tcp => frame::TCP,
            Proto::Udp => frame::UDP,
        }
    }
}

/// Socket options kept by the stack (applied to smoltcp sockets as they are created).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Opts {
    pub reuseaddr: bool,
    pub keepalive: bool,
    pub nodelay: bool,
    pub keepidle: u32,
    pub keepintvl: u32,
    pub keepcnt: u32,
    /// What SO_RCVBUF/SO_SNDBUF read back (Linux doubles what is set); None: never set.
    pub rcvbuf: Option<usize>,
    pub sndbuf: Option<usize>,
    pub v6only: bool,
    pub broadcast: bool,
    pub linger: Option<i32>,
    pub rcvtimeo: [u8; 16],
    pub sndtimeo: [u8; 16],
    pub ttl: Option<u8>,
    /// SO_TIMESTAMP (Micro) or SO_TIMESTAMPNS (Nano): a receive carries a timestamp cmsg.
    pub stamp: Stamp,
    /// IP_RECVTOS and IP_PKTINFO: a TCP socket only stores them (Linux's tcp_recvmsg gives
    /// no such cmsg).
    pub recvtos: bool,
    pub pktinfo: bool,
    /// IP_RECVTTL, and the IPv6 ones: IPV6_RECVPKTINFO, IPV6_RECVHOPLIMIT, IPV6_RECVTCLASS.
    /// IP_TOS / IPV6_TCLASS of a datagram socket (None: never set, 0).
    pub tos: Option<u8>,
    pub recvttl: bool,
    pub pktinfo6: bool,
    pub hoplimit6: bool,
    pub tclass6: bool,
}

/// What the stack noted of a received datagram's IP header, for its receiver's cmsgs.
#[derive(Debug, Clone, Copy)]
pub struct RxMeta {
    pub tos: u8,
    pub ttl: u8,
    pub dst: IpAddr,
    pub ifindex: u32,
}

/// Datagram notes kept at most (those smoltcp dropped are forgotten oldest first).
const RX_META_MAX: usize = 1 << 16;

/// Which receive timestamp a socket asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Stamp {
    #[default]
    None,
    Micro,
    Nano,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            reuseaddr: false,
            keepalive: false,
            nodelay: false,
            keepidle: 7200,
            keepintvl: 75,
            keepcnt: 9,
            rcvbuf: None,
            sndbuf: None,
            v6only: false,
            broadcast: false,
            linger: None,
            rcvtimeo: [0; 16],
            sndtimeo: [0; 16],
            ttl: None,
            stamp: Stamp::None,
            recvtos: false,
            pktinfo: false,
            tos: None,
            recvttl: false,
            pktinfo6: false,
            hoplimit6: false,
            tclass6: false,
        }
    }
}

/// A TCP connection (active or accepted) and what the stack learnt of its life.
#[derive(Debug)]
pub struct Conn {
    pub ifx: usize,
    pub h: Sk,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub last: tcp::State,
    /// Reached ESTABLISHED once.
    pub established: bool,
    /// connect() already reported the outcome (or the socket came from accept).
    pub connect_reported: bool,
    /// A RST for this connection arrived (peeked before smoltcp saw it).
    pub saw_rst: bool,
    pub peer_fin: bool,
    /// smoltcp closed the connection: the socket is TCP_CLOSE.
    pub dead: bool,
    /// When an orphan was first seen closed with its RST still unsent.
    pub closed_at: Option<SInstant>,
    pub rcv_shut: bool,
    pub snd_shut: bool,
}

/// A connection a listener's smoltcp socket holds until accept() takes it.
#[derive(Debug)]
pub struct Pending {
    pub ifx: usize,
    pub h: Sk,
    /// The tuple of the SYN this socket was made for (for the index).
    pub tuple: (SocketAddr, SocketAddr),
    /// The handshake completed (what is closed after that is still accepted, as on Linux).
    pub established: bool,
    pub saw_rst: bool,
}

#[derive(Debug)]
pub struct UdpState {
    /// One smoltcp socket per interface: a datagram can arrive through either.
    pub h: [Option<Sk>; 2],
    pub peer: Option<SocketAddr>,
    /// The local address a connect chose (getsockname of a socket bound to the wildcard).
    pub conn_local: Option<IpAddr>,
    pub rcv_shut: bool,
    pub snd_shut: bool,
}

#[derive(Debug)]
pub enum St {
    /// TCP before listen/connect (bound or not).
    Idle,
    Listen {
        backlog: usize,
        /// Handshakes in progress, looked at whenever the listener is refreshed.
        pending: Vec<Pending>,
        /// Completed connections in the order they completed, for accept(): kept apart so
        /// that a listener thousands of connections behind its accepts is not walked per
        /// packet (nothing that happens to them before accept needs the listener).
        queue: VecDeque<Pending>,
    },
    Tcp(Conn),
    Udp(UdpState),
    /// A connection another process of this NSM relays (relay.rs).
    Relayed(crate::relay::Relayed),
}

#[derive(Debug)]
pub struct Sock {
    pub family: Family,
    pub proto: Proto,
    pub opts: Opts,
    /// Bound local address (IPv4 unmapped) and port.
    pub bound: Option<SocketAddr>,
    pub st: St,
    /// Pending error (SO_ERROR), 0 for none.
    pub error: i32,
    pub key: Option<u64>,
    /// Last reported (mask, bytes or connections readable, bytes writable).
    pub reported: Option<(u32, usize, usize)>,
    /// Data, FIN or RST arrived since the last report.
    pub arrived: bool,
    /// Closed by the guest; the stack keeps it until its connection is over.
    pub orphan: bool,
    /// Bound by connect() to an ephemeral port, which other connects may share as long as
    /// the 4-tuples differ (Linux's __inet_hash_connect); bind() may not.
    pub conn_port: bool,
}

pub struct UserStack {
    pub(crate) cfg: UserConfig,
    pub(crate) cc: CongestionControl,
    cc_name: &'static str,
    epoch: std::time::Instant,
    pub(crate) nets: [Net; 2],
    pub(crate) ext_dev: FdDevice,
    pub(crate) lo_dev: LoopDevice,
    pub(crate) socks: Slab<Sock>,
    pub(crate) index: Index,
    grave: Grave,
    /// Sockets whose readiness may have changed since the last poll.
    pub(crate) dirty: HashSet<usize>,
    rng: u64,
    /// A datagram larger than the wire's MTU was queued: smoltcp sends one IPv4 fragment per
    /// egress pass, so the poll keeps passing until they are all out.
    pub(crate) fragmenting: bool,
    /// The last read stopped at RX_BATCH frames.
    rx_pending: bool,
    /// The time of the current (or last) poll.
    now: SInstant,
    /// Sockets looked at by polls so far (the cost the dirty sets keep small).
    refreshed: u64,
    /// RTT, cwnd and retransmissions of each connection, measured from its segments.
    pub(crate) meters: crate::meter::Meters,
    /// Received datagrams' notes by the id smoltcp hands back (PacketMeta::id), oldest first.
    rx_meta: std::collections::HashMap<u32, RxMeta>,
    rx_meta_order: VecDeque<u32>,
    rx_meta_next: u32,
    /// The note of the datagram the last udp_recv returned.
    pub(crate) last_rx: Option<RxMeta>,
    /// The other process of this NSM during an upgrade (peer.rs).
    pub(crate) peer: Option<crate::peer::Peer>,
    /// Loopback frames the peer sent, for the next poll.
    lo_from_peer: VecDeque<Vec<u8>>,
    /// Wire frames the old process gave back: for a listener or UDP port it handed over
    /// (relay.rs), which arrived there before this process made it anew.
    ext_from_peer: VecDeque<Vec<u8>>,
    /// Ephemeral ports this process may take: those of this parity (2: any), and none the old
    /// process used when the upgrade began.
    parity: u16,
    reserved: HashSet<(u8, u16)>,
    /// Connections relayed between the two processes of an upgrade (relay.rs).
    pub(crate) relay: crate::relay::Relays,
}

/// Maps the configured name to smoltcp's controller; the error lists the choices.
pub fn parse_congestion(name: Option<&str>) -> Result<(CongestionControl, &'static str), crate::config::ConfigError> {
    match name {
        None | Some("reno") => Ok((CongestionControl::Reno, "reno")),
        Some("cubic") => Ok((CongestionControl::Cubic, "cubic")),
        Some("none") => Ok((CongestionControl::None, "none")),
        Some(o) => Err(crate::config::ConfigError(format!(
            "congestion {o:?}: the user stack has \"reno\", \"cubic\" or \"none\""
        ))),
    }
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

fn v6(ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    }
}

impl UserStack {
    pub fn new(cfg: UserConfig, device: OwnedFd) -> Result<UserStack, String> {
        cfg.validate().map_err(|e| e.to_string())?;
        let (cc, cc_name) = parse_congestion(cfg.congestion.as_deref()).map_err(|e| e.to_string())?;
        let epoch = std::time::Instant::now();
        let mut ext_dev = FdDevice::new(device, cfg.link).map_err(|e| format!("user stack device: {e}"))?;
        let mut lo_dev = LoopDevice::default();
        let seed = seed();

        let a4 = v4(cfg.address.0).ok_or("address must be IPv4")?;
        // On a veth, the veth's MAC; else a locally administered unicast MAC derived from the
        // address: stable across restarts of the NSM, so the gateway's neighbour entry stays
        // right.
        let o = a4.octets();
        let mac = match cfg.link {
            Link::Packet => crate::device::packet_mac(ext_dev.fd()),
            Link::Tap => None,
        };
        let mac = EthernetAddress(mac.unwrap_or([0x02, 0x4e, o[0], o[1], o[2], o[3]]));
        let mut c = Config::new(HardwareAddress::Ethernet(mac));
        c.random_seed = seed;
        let mut ext = boxed_iface(c, &mut ext_dev);
        let a6 = cfg.address6.map(|(a, p)| (v6(a), p));
        ext.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a4), cfg.address.1));
            if let Some((Some(a), p)) = a6 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(a), p));
            }
        });
        let gw = v4(cfg.gateway).ok_or("gateway must be IPv4")?;
        ext.routes_mut().add_default_ipv4_route(gw).map_err(|_| "too many routes")?;
        if let Some(IpAddr::V6(g6)) = cfg.gateway6 {
            ext.routes_mut().add_default_ipv6_route(g6).map_err(|_| "too many routes")?;
        }

        let mut c = Config::new(HardwareAddress::Ip);
        c.random_seed = seed.rotate_left(17);
        let mut lo = boxed_iface(c, &mut lo_dev);
        lo.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(Ipv4Addr::LOCALHOST), 8));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(Ipv6Addr::LOCALHOST), 128));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a4), 32));
            if let Some((Some(a), _)) = a6 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(a), 128));
            }
        });
        // All of 127.0.0.0/8 is local, as on Linux's lo: smoltcp's AnyIP takes packets for a
        // prefix routed via one of the interface's own addresses.
        lo.set_any_ip(true);
        let mut full = false;
        lo.routes_mut().update(|routes| {
            full = routes
                .push(smoltcp::iface::Route {
                    cidr: IpCidr::new(IpAddress::Ipv4(Ipv4Addr::new(127, 0, 0, 0)), 8),
                    via_router: IpAddress::Ipv4(Ipv4Addr::LOCALHOST),
                    preferred_until: None,
                    expires_at: None,
                })
                .is_err();
        });
        if full {
            return Err("too many routes".into());
        }

        Ok(UserStack {
            cfg,
            cc,
            cc_name,
            epoch,
            nets: [Net::new(ext), Net::new(lo)],
            ext_dev,
            lo_dev,
            socks: Slab::default(),
            index: Index::default(),
            grave: Arc::new(Mutex::new(Vec::new())),
            dirty: HashSet::new(),
            rng: seed | 1,
            refreshed: 0,
            meters: Default::default(),
            rx_meta: Default::default(),
            rx_meta_order: VecDeque::new(),
            rx_meta_next: 0,
            last_rx: None,
            fragmenting: false,
            rx_pending: false,
            now: SInstant::ZERO,
            peer: None,
            lo_from_peer: VecDeque::new(),
            ext_from_peer: VecDeque::new(),
            parity: 2,
            reserved: HashSet::new(),
            relay: Default::default(),
        })
    }

    /// Makes this stack the new process of an upgrade (peer.rs): it reads the wire `device`
    /// (the old process's), serves what is its own and passes the rest to the old process over
    /// `chan`; `reserved`: the (protocol, port)s the old process used.
    pub fn successor(
        cfg: UserConfig,
        device: OwnedFd,
        chan: OwnedFd,
        reserved: Vec<(u8, u16)>,
    ) -> Result<UserStack, String> {
        let mut s = UserStack::new(cfg, device)?;
        s.relay_epoll_with(Some(chan.as_raw_fd())).map_err(|e| format!("relay epoll: {e}"))?;
        s.peer = Some(crate::peer::Peer::new(chan, false).map_err(|e| format!("upgrade channel: {e}"))?);
        s.parity = 1;
        s.reserved = reserved.into_iter().collect();
        Ok(s)
    }

    /// Hands the wire to a successor (the old process's side of an upgrade, peer.rs): returns a
    /// copy of the wire fd, the successor's end of the channel and the ports in use. From now
    /// on this stack reads its wire frames from the channel, and takes even ephemeral ports.
    pub fn hand_link(&mut self) -> Result<crate::seam::HandedLink, String> {
        if self.peer.as_ref().is_some_and(|p| !p.gone) {
            return Err(
                "the previous upgrade is still draining (its old process relays connections until they close: \
                        ctl nsms, RELAYED); wait for it, or upgrade with --force to reset them"
                    .into(),
            );
        }
        let wire = self.ext_dev.fd().try_clone_to_owned().map_err(|e| format!("wire fd: {e}"))?;
        let (ours, theirs) = crate::peer::pair(8 << 20).map_err(|e| format!("upgrade channel: {e}"))?;
        self.relay_epoll_with(None).map_err(|e| format!("relay epoll: {e}"))?;
        self.peer = Some(crate::peer::Peer::new(ours, true).map_err(|e| format!("upgrade channel: {e}"))?);
        self.parity = 0;
        Ok(crate::seam::HandedLink { fds: vec![wire, theirs], ports: self.index.ports_used() })
    }

    /// The peer while it is there.
    fn peer_live(&self) -> Option<&crate::peer::Peer> {
        self.peer.as_ref().filter(|p| !p.gone)
    }

    /// The fd the driver sleeps on for frames: the channel while this process drains after
    /// an upgrade (its successor reads the wire), else the wire.
    pub(crate) fn rx_fd(&self) -> BorrowedFd<'_> {
        match self.peer_live() {
            Some(p) if p.old => p.chan.as_fd(),
            _ => self.ext_dev.fd(),
        }
    }

    /// A second fd to sleep on during an upgrade: the epoll of the relayed connections' pairs
    /// and, in the new process, of the channel to the old one (relay.rs).
    pub(crate) fn peer_fd(&self) -> Option<BorrowedFd<'_>> {
        self.relay.ep.as_ref().map(|ep| ep.as_fd())
    }

    /// Whether this process serves the frame `p` arriving on `ifx`: a socket has its 4-tuple,
    /// a listener takes its SYN, or a UDP socket its port.
    fn owns(&self, ifx: usize, p: &Peek) -> bool {
        match p.proto {
            frame::TCP => {
                self.index.tuples.contains_key(&(frame::TCP, p.dst, p.src))
                    || p.flags & (frame::SYN | frame::ACK | frame::RST) == frame::SYN
                        && self.find_listener(ifx, p.dst).is_some()
            }
            frame::UDP => self.index.on_port(frame::UDP, p.dst.port()).next().is_some(),
            _ => true,
        }
    }

    /// Whether an ephemeral port is this process's to take (see `parity`).
    fn port_mine(&self, proto: u8, port: u16) -> bool {
        (self.parity == 2 || port % 2 == self.parity) && !self.reserved.contains(&(proto, port))
    }

    pub fn congestion_name(&self) -> &'static str {
        self.cc_name
    }

    /// Number of sockets in the table (open ones and closing ones the guest let go of).
    pub fn socket_count(&self) -> usize {
        self.socks.len()
    }

    /// How many sockets polls have looked at so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshed
    }

    /// Frames written to and read from the wire.
    pub fn wire_counters(&self) -> (u64, u64, u64) {
        (self.ext_dev.tx_frames, self.ext_dev.rx_frames, self.ext_dev.tx_dropped)
    }

    pub(crate) fn ts(&self, now: std::time::Instant) -> SInstant {
        SInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    pub(crate) fn new_handle(&mut self, s: Sock) -> Handle {
        let id = self.socks.insert(s);
        Handle { id, grave: self.grave.clone() }
    }

    pub(crate) fn rand(&mut self) -> u64 {
        // xorshift64: port and sequence choices need spread, not secrecy.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The stack's own addresses of a family (without loopback).
    pub(crate) fn own(&self, ip: IpAddr) -> bool {
        ip == self.cfg.address.0 || self.cfg.address6.is_some_and(|(a, _)| a == ip)
    }

    /// Addresses a socket may bind: the wildcard, 127.0.0.0/8, ::1 and the configured ones.
    pub(crate) fn bindable(&self, ip: IpAddr) -> bool {
        ip.is_unspecified() || ip.is_loopback() || self.own(ip)
    }

    /// Which interface reaches `dst`, and the source address Linux would pick for it.
    pub(crate) fn route(&self, dst: IpAddr) -> Result<(usize, IpAddr), Errno> {
        if dst.is_loopback() {
            let src = match dst {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            return Ok((LO, src));
        }
        if self.own(dst) {
            return Ok((LO, dst));
        }
        match dst {
            IpAddr::V4(_) => Ok((EXT, self.cfg.address.0)),
            IpAddr::V6(_) => match self.cfg.address6 {
                Some((a, _)) => Ok((EXT, a)),
                None => Err(libc::ENETUNREACH),
            },
        }
    }

    /// Picks a free port of the ephemeral range for `proto`.
    pub(crate) fn ephemeral(&mut self, proto: Proto) -> Option<u16> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        let start = (self.rand() % u64::from(span)) as u32;
        (0..span)
            .map(|i| EPHEMERAL.start() + ((start + i) % span) as u16)
            .find(|&p| !self.index.port_used(proto.num(), p) && self.port_mine(proto.num(), p))
    }

    /// Whether connect() may give `port` to a connection from `local` to `remote`: nobody
    /// bind()s it (only other connects hold it) and the 4-tuple is new.
    pub(crate) fn connect_port_ok(&self, port: u16, local: IpAddr, remote: SocketAddr) -> bool {
        self.index.on_port(frame::TCP, port).all(|&o| self.socks.get(o).is_some_and(|s| s.conn_port))
            && !self.index.tuples.contains_key(&(frame::TCP, SocketAddr::new(local, port), remote))
    }

    /// An ephemeral port for a connection from `local` to `remote`.
    pub(crate) fn ephemeral_connect(&mut self, local: IpAddr, remote: SocketAddr) -> Option<u16> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        let start = (self.rand() % u64::from(span)) as u32;
        (0..span)
            .map(|i| EPHEMERAL.start() + ((start + i) % span) as u16)
            .find(|&p| self.connect_port_ok(p, local, remote) && self.port_mine(frame::TCP, p))
    }

    /// Receive and send buffer sizes of a new connection on interface `ifx`.
    pub(crate) fn tcp_buffers(&self, o: &Opts, ifx: usize) -> (usize, usize) {
        // On loopback there is no bandwidth-delay product to cover: Linux's default receive
        // buffer, so that a peer that never reads holds about what it would on Linux (an
        // SO_RCVBUF set after accept cannot shrink a smoltcp buffer).
        let rx = if ifx == LO { TCP_RX_DEFAULT_LO } else { TCP_RX_DEFAULT };
        (o.rcvbuf.unwrap_or(rx), o.sndbuf.unwrap_or(TCP_TX_DEFAULT))
    }

    /// A smoltcp TCP socket with the socket's options applied, for interface `ifx`.
    pub(crate) fn make_tcp(&self, o: &Opts, ifx: usize) -> tcp::Socket<'static> {
        let (rx, tx) = self.tcp_buffers(o, ifx);
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; tx]));
        s.set_congestion_control(self.cc);
        if ifx == LO {
            // Linux delivers loopback segments within the sending call and acknowledges them
            // at once (quickack): a delayed ACK would hold the sender's next small segment
            // back (Nagle) past the poll that completes its send.
            s.set_ack_delay(None);
        }
        apply_tcp_opts(&mut s, o);
        s
    }

    pub(crate) fn make_udp(&self, o: &Opts) -> udp::Socket<'static> {
        let rx = o.rcvbuf.unwrap_or(UDP_RX_DEFAULT);
        let tx = o.sndbuf.unwrap_or(UDP_TX_DEFAULT).max(65536);
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_PACKETS], vec![0; rx]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_PACKETS], vec![0; tx]),
        );
        s.set_hop_limit(o.ttl);
        s
    }

    pub(crate) fn tcp(&mut self, ifx: usize, h: Sk) -> &mut tcp::Socket<'static> {
        self.nets[ifx].get_mut::<tcp::Socket>(h)
    }

    pub(crate) fn sock(&mut self, id: usize) -> Result<&mut Sock, Errno> {
        self.socks.get_mut(id).ok_or(libc::EBADF)
    }

    /// Closes socket `id` whose handle was just dropped, rather than at the next poll.
    pub(crate) fn close_now(&mut self, id: usize) {
        let mut g = self.grave.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = g.iter().position(|&x| x == id) {
            g.swap_remove(i);
            drop(g);
            self.close_id(id);
        }
    }

    /// Closes the sockets whose handles were dropped.
    fn bury(&mut self) {
        let ids: Vec<usize> = std::mem::take(&mut *self.grave.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            self.close_id(id);
        }
    }

    /// Closes socket `id` as close(2) does: listeners reset their queued connections, a TCP
    /// connection sends its FIN (or a RST when unread data is left, as Linux does) and lives on
    /// as an orphan until it is over.
    pub(crate) fn close_id(&mut self, id: usize) {
        let Some(s) = self.socks.get_mut(id) else { return };
        s.key = None;
        // Another process serves its guest now; this one relays it (relay.rs).
        if self.relay.relaying_for(id) {
            return;
        }
        let st = std::mem::replace(&mut s.st, St::Idle);
        let bound = s.bound;
        let linger0 = s.opts.linger == Some(0);
        match st {
            St::Idle => self.free(id, bound),
            St::Listen { pending, queue, .. } => {
                self.drop_pending(id, pending.into_iter().chain(queue));
                self.free(id, bound);
            }
            St::Udp(u) => {
                for (ifx, h) in u.h.iter().enumerate() {
                    if let Some(h) = h {
                        self.nets[ifx].remove(*h);
                    }
                }
                self.free(id, bound);
            }
            St::Relayed(r) => {
                self.relayed_close(r, linger0);
                self.free(id, bound);
            }
            St::Tcp(c) => {
                let (ifx, h) = (c.ifx, c.h);
                let sk = self.tcp(ifx, h);
                // Nothing left to say to the peer: a connection that is over, or one still in
                // SYN-SENT, which Linux drops without a packet (a late SYN-ACK draws a RST).
                let state = sk.state();
                if (state == tcp::State::Closed && sk.local_endpoint().is_none()) || state == tcp::State::SynSent {
                    self.nets[ifx].remove(h);
                    let t = (frame::TCP, c.local, c.remote);
                    if self.index.tuples.get(&t) == Some(&id) {
                        self.index.tuples.remove(&t);
                    }
                    self.free(id, bound);
                    return;
                }
                if sk.recv_queue() > 0 || linger0 || !c.established {
                    sk.abort();
                } else {
                    sk.close();
                }
                self.nets[ifx].time(h, id);
                let s = self.socks.get_mut(id).expect("checked above");
                s.st = St::Tcp(c);
                s.orphan = true;
                self.dirty.insert(id);
            }
        }
    }

    /// Resets the connections a listener holds and forgets their tuples.
    pub(crate) fn drop_pending(&mut self, id: usize, pending: impl IntoIterator<Item = Pending>) {
        for p in pending {
            let sk = self.tcp(p.ifx, p.h);
            let (l, r) = (sk.local_endpoint(), sk.remote_endpoint());
            if sk.is_active() {
                sk.abort();
                // The RST goes out on the next poll; the orphan socket is kept until then.
                let o = Sock {
                    family: Family::V4,
                    proto: Proto::Tcp,
                    opts: Opts::default(),
                    bound: None,
                    st: St::Tcp(Conn {
                        ifx: p.ifx,
                        h: p.h,
                        local: l.map_or(p.tuple.0, |e| SocketAddr::new(e.addr.into(), e.port)),
                        remote: r.map_or(p.tuple.1, |e| SocketAddr::new(e.addr.into(), e.port)),
                        last: tcp::State::Closed,
                        established: true,
                        connect_reported: true,
                        saw_rst: false,
                        peer_fin: false,
                        dead: false,
                        closed_at: None,
                        rcv_shut: false,
                        snd_shut: false,
                    }),
                    error: 0,
                    key: None,
                    reported: None,
                    arrived: false,
                    orphan: true,
                    conn_port: false,
                };
                let oid = self.socks.insert(o);
                self.nets[p.ifx].time(p.h, oid);
                self.dirty.insert(oid);
                if self.index.tuples.get(&(frame::TCP, p.tuple.0, p.tuple.1)) == Some(&id) {
                    self.index.tuples.remove(&(frame::TCP, p.tuple.0, p.tuple.1));
                }
                if let St::Tcp(c) = &self.socks.get(oid).expect("just inserted").st {
                    let t = (frame::TCP, c.local, c.remote);
                    self.index.tuples.insert(t, oid);
                }
            } else {
                self.nets[p.ifx].remove(p.h);
                if self.index.tuples.get(&(frame::TCP, p.tuple.0, p.tuple.1)) == Some(&id) {
                    self.index.tuples.remove(&(frame::TCP, p.tuple.0, p.tuple.1));
                }
            }
        }
    }

    fn free(&mut self, id: usize, bound: Option<SocketAddr>) {
        if let Some(s) = self.socks.remove(id) {
            if let Some(b) = bound {
                self.index.unbind(s.proto.num(), b.port(), id);
            }
        }
        self.dirty.remove(&id);
    }

    /// Looks at a received packet: marks the socket it concerns dirty, notes RSTs, readies a
    /// listener's socket for a SYN. Returns false to drop the packet (a SYN for a full
    /// listen queue, which Linux drops too so that the client retries).
    fn note(&mut self, ifx: usize, p: Peek) -> bool {
        match p.proto {
            frame::TCP => {
                let key = (frame::TCP, p.dst, p.src);
                let fresh_syn = p.flags & (frame::SYN | frame::ACK | frame::RST) == frame::SYN;
                if let Some(&id) = self.index.tuples.get(&key) {
                    // A new SYN for the 4-tuple of a connection in TIME_WAIT starts a new
                    // connection (tcp_timewait_state_process takes it); the old one is done.
                    if fresh_syn && self.is_time_wait_orphan(id) {
                        self.reap_orphan(id);
                    } else {
                        return self.note_known(id, p);
                    }
                }
                if fresh_syn {
                    if let Some(lid) = self.find_listener(ifx, p.dst) {
                        return self.prepare_syn(lid, ifx, p);
                    }
                }
                true
            }
            frame::UDP => {
                for &id in self.index.on_port(frame::UDP, p.dst.port()) {
                    self.dirty.insert(id);
                    if let Some(s) = self.socks.get_mut(id) {
                        s.arrived = true;
                    }
                }
                true
            }
            _ => true,
        }
    }

    fn is_time_wait_orphan(&self, id: usize) -> bool {
        match self.socks.get(id) {
            Some(s) if s.orphan => match &s.st {
                St::Tcp(c) => self.nets[c.ifx].get::<tcp::Socket>(c.h).state() == tcp::State::TimeWait,
                _ => false,
            },
            _ => false,
        }
    }

    /// Frees an orphan at once (its smoltcp socket, tuple and port).
    fn reap_orphan(&mut self, id: usize) {
        let Some(s) = self.socks.get(id) else { return };
        let St::Tcp(c) = &s.st else { return };
        let (ifx, h, t, bound) = (c.ifx, c.h, (frame::TCP, c.local, c.remote), s.bound);
        self.nets[ifx].remove(h);
        if self.index.tuples.get(&t) == Some(&id) {
            self.index.tuples.remove(&t);
        }
        self.free(id, bound);
    }

    /// A packet for a known 4-tuple: see `note`.
    fn note_known(&mut self, id: usize, p: Peek) -> bool {
        self.dirty.insert(id);
        let Some(s) = self.socks.get_mut(id) else { return true };
        if p.payload > 0 || p.flags & (frame::FIN | frame::RST) != 0 {
            s.arrived = true;
        }
        if let St::Listen { pending, queue, .. } = &mut s.st {
            // A connection not accepted yet: remember its reset for accept.
            if p.flags & frame::RST != 0 {
                if let Some(q) = pending.iter_mut().chain(queue.iter_mut()).find(|q| q.tuple == (p.dst, p.src)) {
                    q.saw_rst = true;
                }
            }
        }
        if let St::Tcp(c) = &mut s.st {
            if p.flags & frame::RST != 0 {
                c.saw_rst = true;
            }
            // Data for a connection whose receiving side is gone (closed, or
            // shut both ways): Linux answers with a RST and the socket, if any,
            // reads ECONNRESET (tcp_rcv_state_process on RCV_SHUTDOWN in
            // FIN_WAIT); smoltcp sends the RST once the socket is aborted.
            if (s.orphan || (c.rcv_shut && c.snd_shut)) && p.payload > 0 && c.established {
                let sk = self.nets[c.ifx].get_mut::<tcp::Socket>(c.h);
                if matches!(sk.state(), tcp::State::FinWait1 | tcp::State::FinWait2 | tcp::State::Closing) {
                    sk.abort();
                    c.saw_rst = true;
                    return false;
                }
            }
        }
        true
    }

    /// An ICMP error about a datagram a connected UDP socket sent becomes its pending error,
    /// as on Linux (unconnected sockets ignore them without IP_RECVERR, which is not here).
    fn note_icmp(&mut self, e: frame::IcmpError) {
        if e.proto != frame::UDP {
            return;
        }
        let ids: Vec<usize> = self.index.on_port(frame::UDP, e.local.port()).copied().collect();
        for id in ids {
            let Some(s) = self.socks.get_mut(id) else { continue };
            if let St::Udp(UdpState { peer: Some(p), .. }) = &s.st {
                if *p == e.remote {
                    s.error = e.errno;
                    s.arrived = true;
                    self.dirty.insert(id);
                }
            }
        }
    }

    /// The listener a SYN to `dst` arriving on `ifx` is for: one bound to exactly that address
    /// before one bound to the wildcard, as Linux's lookup scores them.
    fn find_listener(&self, ifx: usize, dst: SocketAddr) -> Option<usize> {
        let ok_dst = match ifx {
            EXT => self.own(dst.ip()),
            _ => self.own(dst.ip()) || dst.ip().is_loopback(),
        };
        if !ok_dst {
            return None;
        }
        let mut best = None;
        for &id in self.index.listeners(dst.port()) {
            let Some(s) = self.socks.get(id) else { continue };
            if !matches!(s.st, St::Listen { .. }) {
                continue;
            }
            let Some(b) = s.bound else { continue };
            if b.ip() == dst.ip() {
                return Some(id);
            }
            let fam_ok = match dst.ip() {
                IpAddr::V4(_) => s.family == Family::V4 || !s.opts.v6only,
                IpAddr::V6(_) => s.family == Family::V6,
            };
            if b.ip().is_unspecified() && fam_ok && (s.family == Family::V4) == b.is_ipv4() {
                best = Some(id);
            }
        }
        best
    }

    /// Gives listener `lid` a smoltcp socket listening on the SYN's address, unless its queue
    /// (backlog + 1, as Linux's sk_acceptq_is_full) is full.
    fn prepare_syn(&mut self, lid: usize, ifx: usize, p: Peek) -> bool {
        let Some(s) = self.socks.get(lid) else { return true };
        let St::Listen { backlog, pending, queue } = &s.st else { return true };
        if pending.len() + queue.len() > *backlog {
            return false;
        }
        let mut sk = self.make_tcp(&s.opts, ifx);
        if sk.listen(p.dst).is_err() {
            return true;
        }
        // Linux gives up on a handshake after 5 SYN-ACK retries (about a minute).
        sk.set_timeout(Some(smoltcp::time::Duration::from_secs(SYNACK_TIMEOUT_S)));
        let h = self.nets[ifx].add(shard_of(p.dst, p.src), sk);
        if let Some(St::Listen { pending, .. }) = self.socks.get_mut(lid).map(|s| &mut s.st) {
            pending.push(Pending { ifx, h, tuple: (p.dst, p.src), established: false, saw_rst: false });
        }
        self.index.tuples.insert((frame::TCP, p.dst, p.src), lid);
        self.nets[ifx].time(h, lid);
        self.dirty.insert(lid);
        true
    }

    /// Advances both interfaces; see the trait's `poll`.
    pub(crate) fn run(
        &mut self,
        now: std::time::Instant,
        woken: bool,
        ready: &mut Vec<Ready>,
    ) -> Option<std::time::Instant> {
        self.bury();
        let ts = self.ts(now);
        self.now = ts;
        let mut more = false;
        // After a batch cut short the fd may still hold frames though the driver's epoll
        // (edge-triggered or not) does not say so again: read on.
        if woken || self.rx_pending {
            // A read error other than EAGAIN leaves the link unusable (the TAP went away); the
            // stack keeps serving loopback and lets TCP time out what used the wire.
            self.rx_pending = false;
            let draining = self.peer_live().is_some_and(|p| p.old);
            if !draining {
                if let Ok(o) = self.ext_dev.read_frames(RX_BATCH) {
                    more = o.more;
                    self.rx_pending = o.more;
                }
            }
            if let Some(p) = self.peer.as_mut().filter(|p| !p.gone) {
                // The old process's wire frames come from the peer; the new one's from the peer
                // are the few it gave back.
                let ext = if p.old { &mut self.ext_dev.rx } else { &mut self.ext_from_peer };
                let m = p.recv(ext, &mut self.lo_from_peer, RX_BATCH);
                more |= m;
                self.rx_pending |= m;
            }
        }

        if self.relay.ep.is_some() {
            self.relay_events();
        }
        let frames = std::mem::take(&mut self.ext_dev.rx);
        let mut wake_all = self.route_frames(EXT, frames, false);
        let back = std::mem::take(&mut self.ext_from_peer);
        if !back.is_empty() {
            wake_all |= self.route_frames(EXT, back, true);
        }
        self.poll_shards(EXT, ts, true, wake_all);
        if self.fragmenting {
            self.fragmenting = false;
            let Net { iface, shards, .. } = &mut self.nets[EXT];
            let sh = &mut shards[SHARD0];
            // 64 KiB is 45 fragments at MTU 1500.
            for _ in 0..64 {
                let sent = self.ext_dev.tx_frames + self.ext_dev.tx_dropped;
                iface.poll_egress(ts, &mut ExtPort { rx: &mut sh.rx, dev: &mut self.ext_dev }, &mut sh.set);
                if self.ext_dev.tx_frames + self.ext_dev.tx_dropped == sent {
                    break;
                }
            }
        }

        for p in std::mem::take(&mut self.ext_dev.sent) {
            self.meter_sent(&p);
        }

        let from_peer = std::mem::take(&mut self.lo_from_peer);
        if !from_peer.is_empty() {
            self.route_frames(LO, from_peer, true);
        }
        for round in 0..LO_ROUNDS {
            let out = std::mem::take(&mut self.lo_dev.tx);
            let wake_all = self.route_frames(LO, out, false);
            if !self.poll_shards(LO, ts, round == 0, wake_all) {
                break;
            }
        }
        more |= !self.lo_dev.tx.is_empty();

        let dirty: Vec<usize> = self.dirty.drain().collect();
        self.refreshed += dirty.len() as u64;
        for id in dirty {
            self.refresh(id);
            // Bytes a relay put into smoltcp go out on the next poll, at once.
            more |= self.pump(id);
            self.report(id, ready);
        }

        let mut deadline = [EXT, LO]
            .into_iter()
            .filter_map(|i| self.nets[i].deadline())
            .min()
            .map(|t| self.epoch + std::time::Duration::from_micros(t.total_micros().max(0) as u64));
        if let Some(p) = self.peer.as_mut() {
            // Frames for the peer wait for room in the channel: try again in a millisecond.
            p.flush();
            if p.backed_up() {
                let soon = now + std::time::Duration::from_millis(1);
                deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
            }
        }
        if more {
            return Some(now);
        }
        deadline.map(|d| d.max(now))
    }

    /// Hands received packets to the socket sets their 4-tuples hash to (after `note`). Returns
    /// whether one may have resolved a neighbour (ARP, NDP) that sockets of any set may be
    /// waiting for.
    fn route_frames(&mut self, ifx: usize, frames: VecDeque<Vec<u8>>, from_peer: bool) -> bool {
        let mut wake_all = false;
        // During an upgrade (peer.rs): the loopback's frames for the other process go there in
        // both directions, the wire's from the new process to the old; never back again.
        let tag = if ifx == EXT { crate::peer::TAG_EXT } else { crate::peer::TAG_LO };
        let bridge = !from_peer && self.peer_live().is_some_and(|p| ifx == LO || !p.old);
        // The old process gives back what arrives for a port it handed over (relay.rs).
        let give_back = ifx == EXT && self.peer_live().is_some_and(|p| p.old) && self.relay.gave_any();
        for f in frames {
            let peek = if ifx == EXT { frame::peek_ethernet(&f) } else { frame::peek_ip(&f) };
            if peek.is_some_and(|p| give_back && self.relay.gave(p.proto, p.dst.port()) && !self.owns(ifx, &p)) {
                if let Some(peer) = self.peer.as_mut() {
                    peer.send(tag, &f);
                }
                continue;
            }
            if bridge {
                let theirs = match &peek {
                    Some(p) => !self.owns(ifx, p),
                    // Both need their neighbours and the errors about what they sent.
                    None => {
                        let ip = if ifx == EXT { frame::ip_of_ethernet(&f) } else { Some(&f[..]) };
                        if frame::resolves_neighbour(&f) || ip.and_then(frame::peek_icmp_error).is_some() {
                            if let Some(p) = self.peer.as_mut() {
                                p.send(tag, &f);
                            }
                        }
                        false
                    }
                };
                if theirs {
                    if let Some(p) = self.peer.as_mut() {
                        p.send(tag, &f);
                    }
                    continue;
                }
            }
            let sh = match peek {
                Some(p) => {
                    if p.proto == frame::TCP {
                        // On the loopback every packet is one of ours leaving as well.
                        if ifx == LO {
                            self.meter_sent(&p);
                        }
                        if let Some(m) = self.meters.get_mut(p.dst, p.src) {
                            m.received(&p, self.now);
                        }
                    }
                    if !self.note(ifx, p) {
                        continue;
                    }
                    if p.proto == frame::TCP {
                        shard_of(p.dst, p.src)
                    } else {
                        SHARD0
                    }
                }
                None => {
                    let ip = if ifx == EXT { frame::ip_of_ethernet(&f) } else { Some(&f[..]) };
                    if let Some(e) = ip.and_then(frame::peek_icmp_error) {
                        self.note_icmp(e);
                    }
                    // Only the wire has neighbours; a ping or a fragment concerns set 0 alone.
                    wake_all |= ifx == EXT && frame::resolves_neighbour(&f);
                    SHARD0
                }
            };
            let id = if peek.is_some_and(|p| p.proto == frame::UDP) {
                let ip = if ifx == EXT { frame::ip_of_ethernet(&f) } else { Some(&f[..]) };
                match (ip.and_then(frame::tos_ttl), peek) {
                    (Some((tos, ttl)), Some(p)) => {
                        // Linux's lo is ifindex 1; the NSM's wire device is the one other.
                        self.note_rx(RxMeta { tos, ttl, dst: p.dst.ip(), ifindex: if ifx == LO { 1 } else { 2 } })
                    }
                    _ => 0,
                }
            } else {
                0
            };
            self.nets[ifx].shards[sh].rx.push_back((f, id));
            self.nets[ifx].mark(sh);
        }
        if let Some(p) = self.peer.as_mut().filter(|_| bridge || give_back) {
            p.flush();
        }
        wake_all
    }

    /// Sends the datagrams queued on the UDP socket set of interface `ifx` now, those from
    /// `port` with `mark` (IPv6 gets no per-packet id through smoltcp; see device.rs's Marks).
    pub(crate) fn send_marked_now(&mut self, ifx: usize, h: Sk, port: u16, mark: crate::device::Mark) {
        let ts = self.now;
        let Net { iface, shards, .. } = &mut self.nets[ifx];
        let sh = &mut shards[h.sh];
        if ifx == EXT {
            self.ext_dev.marks.live = Some((port, mark));
            iface.poll_egress(ts, &mut ExtPort { rx: &mut sh.rx, dev: &mut self.ext_dev }, &mut sh.set);
            self.ext_dev.marks.live = None;
        } else {
            self.lo_dev.marks.live = Some((port, mark));
            iface.poll_egress(ts, &mut LoPort { rx: &mut sh.rx, dev: &mut self.lo_dev }, &mut sh.set);
            self.lo_dev.marks.live = None;
        }
    }

    /// Keeps a datagram's note; returns its id (never 0, which means none).
    fn note_rx(&mut self, m: RxMeta) -> u32 {
        self.rx_meta_next = self.rx_meta_next.wrapping_add(1).max(1);
        let id = self.rx_meta_next;
        self.rx_meta.insert(id, m);
        self.rx_meta_order.push_back(id);
        while self.rx_meta_order.len() > RX_META_MAX {
            if let Some(old) = self.rx_meta_order.pop_front() {
                self.rx_meta.remove(&old);
            }
        }
        id
    }

    /// The note of a datagram being received (taken unless only peeked at).
    pub(crate) fn rx_meta_of(&mut self, id: u32, peek: bool) -> Option<RxMeta> {
        if peek {
            self.rx_meta.get(&id).copied()
        } else {
            self.rx_meta.remove(&id)
        }
    }

    /// Feeds a TCP segment one of our connections sent to its meter.
    fn meter_sent(&mut self, p: &Peek) {
        let index = &self.index;
        if !index.tuples.contains_key(&(frame::TCP, p.src, p.dst)) {
            return;
        }
        let alive = |k: &(SocketAddr, SocketAddr)| index.tuples.contains_key(&(frame::TCP, k.0, k.1));
        self.meters.entry(p.src, p.dst, alive).sent(p, self.now);
    }

    /// Polls the sets of interface `ifx` that have work: packets, guest operations, and (with
    /// `timers`) a passed deadline, whose timer-driven sockets are then looked at. `wake_all`
    /// also polls every set waiting on a timer. Returns whether any set was polled.
    fn poll_shards(&mut self, ifx: usize, ts: SInstant, timers: bool, wake_all: bool) -> bool {
        let net = &mut self.nets[ifx];
        let mut run = std::mem::take(&mut net.due);
        if timers {
            let mut expired = Vec::new();
            net.expired(ts, &mut expired);
            for sh in expired {
                self.dirty.extend(net.shards[sh].timed.drain());
                if !net.shards[sh].due {
                    net.shards[sh].due = true;
                    run.push(sh);
                }
            }
        }
        if wake_all {
            for sh in 0..net.shards.len() {
                if net.shards[sh].deadline.is_some() && !net.shards[sh].due {
                    net.shards[sh].due = true;
                    run.push(sh);
                }
            }
        }
        for &sh in &run {
            let Net { iface, shards, .. } = &mut *net;
            let s = &mut shards[sh];
            s.due = false;
            if ifx == EXT {
                iface.poll(ts, &mut ExtPort { rx: &mut s.rx, dev: &mut self.ext_dev }, &mut s.set);
            } else {
                iface.poll(ts, &mut LoPort { rx: &mut s.rx, dev: &mut self.lo_dev }, &mut s.set);
            }
            let d = iface.poll_at(ts, &s.set);
            net.set_deadline(sh, d);
        }
        let any = !run.is_empty();
        // Give the allocation back for the next poll.
        run.clear();
        if net.due.is_empty() {
            net.due = run;
        }
        any
    }

    /// Brings the stack's view of socket `id` up to date with smoltcp's.
    pub(crate) fn refresh(&mut self, id: usize) {
        let Some(s) = self.socks.get_mut(id) else { return };
        let listener_opts = matches!(s.st, St::Listen { .. }).then(|| s.opts.clone());
        match &mut s.st {
            St::Tcp(c) => {
                let (ifx, h) = (c.ifx, c.h);
                // Not get_mut: looking must not make the set due for a poll.
                let sk = self.nets[ifx].shards[h.sh].set.get_mut::<tcp::Socket>(h.h);
                let state = sk.state();
                let gone = state == tcp::State::Closed && sk.local_endpoint().is_none();
                let busy = sk.send_queue() > 0 || sk.keep_alive().is_some();
                if state != c.last || (state == tcp::State::Closed && !c.dead) {
                    use tcp::State as T;
                    if matches!(
                        state,
                        T::Established
                            | T::FinWait1
                            | T::FinWait2
                            | T::CloseWait
                            | T::Closing
                            | T::LastAck
                            | T::TimeWait
                    ) && !c.established
                    {
                        c.established = true;
                        // The connect timeout has done its job; an idle connection lives
                        // for ever, as on Linux (keepalive sets its own).
                        if sk.keep_alive().is_none() {
                            sk.set_timeout(None);
                        }
                    }
                    if matches!(state, T::CloseWait | T::LastAck | T::Closing | T::TimeWait) {
                        c.peer_fin = true;
                    }
                    // Linux hands TIME_WAIT to a minisocket and the socket itself is TCP_CLOSE;
                    // the smoltcp socket stays to hold the port and answer late segments.
                    if state == T::TimeWait && !c.dead {
                        c.dead = true;
                    }
                    if state == T::Closed && !c.dead {
                        c.dead = true;
                        let orderly = c.peer_fin && matches!(c.last, T::LastAck | T::TimeWait | T::Closing);
                        let err = if orderly {
                            0
                        } else if !c.established {
                            if c.saw_rst {
                                libc::ECONNREFUSED
                            } else {
                                libc::ETIMEDOUT
                            }
                        } else if c.saw_rst {
                            if c.last == T::CloseWait {
                                libc::EPIPE
                            } else {
                                libc::ECONNRESET
                            }
                        } else if c.snd_shut && c.peer_fin {
                            0
                        } else {
                            libc::ETIMEDOUT
                        };
                        if err != 0 && s.error == 0 && !s.orphan {
                            s.error = err;
                        }
                    }
                    c.last = state;
                }
                let transitional =
                    !matches!(state, tcp::State::Established | tcp::State::CloseWait | tcp::State::Closed);
                // smoltcp retransmits for ever: give up as Linux does. Unacknowledged data or
                // FIN: tcp_retries2 (about 15 minutes without an ACK); an orphan in FIN-WAIT-2:
                // tcp_fin_timeout. Not on an idle connection, which lives for ever (smoltcp's
                // timeout counts silence, so it is set only while something is outstanding).
                if c.established && !s.opts.keepalive && state != tcp::State::Closed {
                    use tcp::State as T;
                    let sk = self.nets[ifx].shards[h.sh].set.get::<tcp::Socket>(h.h);
                    let want = if s.orphan && state == T::FinWait2 {
                        Some(FIN_TIMEOUT)
                    } else if sk.send_queue() > 0 || matches!(state, T::FinWait1 | T::Closing | T::LastAck) {
                        Some(RETRIES2_TIMEOUT)
                    } else {
                        None
                    };
                    if sk.timeout() != want {
                        self.nets[ifx].get_mut::<tcp::Socket>(h).set_timeout(want);
                    }
                    if want.is_some() {
                        self.nets[ifx].time(h, id);
                    }
                }
                // A closed orphan whose last RST cannot go out (the peer's link address
                // expired and it answers no more) is not kept for ever: Linux sends none on a
                // timeout either.
                let mut gone = gone;
                if s.orphan && state == tcp::State::Closed && !gone {
                    match c.closed_at {
                        None => c.closed_at = Some(self.now),
                        Some(t) => gone = self.now >= t + smoltcp::time::Duration::from_secs(3),
                    }
                }
                if s.orphan && gone {
                    let (l, r, bound) = (c.local, c.remote, s.bound);
                    self.nets[ifx].remove(h);
                    if self.index.tuples.get(&(frame::TCP, l, r)) == Some(&id) {
                        self.index.tuples.remove(&(frame::TCP, l, r));
                    }
                    self.free(id, bound);
                    return;
                }
                if transitional || busy || (state == tcp::State::Closed && !gone) {
                    self.nets[ifx].time(h, id);
                }
            }
            St::Listen { pending, queue, .. } => {
                let mut i = 0;
                while i < pending.len() {
                    let p = &mut pending[i];
                    let state = self.nets[p.ifx].get::<tcp::Socket>(p.h).state();
                    match state {
                        tcp::State::SynReceived => self.nets[p.ifx].time(p.h, id),
                        tcp::State::Listen | tcp::State::Closed => {}
                        _ if !p.established => {
                            p.established = true;
                            // An accepted-to-be connection waits in the queue as long as it
                            // takes, as on Linux: the handshake timeout is over.
                            let sk = self.nets[p.ifx].get_mut::<tcp::Socket>(p.h);
                            sk.set_timeout(None);
                            if let Some(o) = &listener_opts {
                                apply_tcp_opts(sk, o);
                            }
                        }
                        _ => {}
                    }
                    // The SYN went elsewhere, the handshake was reset (smoltcp goes back to
                    // LISTEN) or never completed (closed): give the slot back, as Linux drops
                    // a request socket.
                    let failed = state == tcp::State::Listen || (state == tcp::State::Closed && !p.established);
                    if failed {
                        let p = pending.swap_remove(i);
                        self.nets[p.ifx].remove(p.h);
                        let t = (frame::TCP, p.tuple.0, p.tuple.1);
                        if self.index.tuples.get(&t) == Some(&id) {
                            self.index.tuples.remove(&t);
                        }
                        continue;
                    }
                    if p.established {
                        queue.push_back(pending.remove(i));
                        continue;
                    }
                    i += 1;
                }
            }
            // Datagrams the socket must not see (a stranger's on a connected socket, IPv6 on
            // an AF_INET one) go before they make it look readable: Linux never queues them.
            St::Udp(_) => {
                self.udp_purge(id);
            }
            St::Idle | St::Relayed(_) => {}
        }
    }

    /// Reports socket `id` if watched and something new happened to it.
    fn report(&mut self, id: usize, ready: &mut Vec<Ready>) {
        let Some(key) = self.socks.get(id).and_then(|s| s.key) else { return };
        let (mask, rd, wr) = self.readiness(id);
        let s = self.socks.get_mut(id).expect("key read above");
        let news = match s.reported {
            None => mask != 0,
            Some((m, r, w)) => {
                m != mask
                    || (mask & libc::POLLIN as u32 != 0 && (rd > r || s.arrived))
                    || (mask & libc::POLLOUT as u32 != 0 && wr > w)
            }
        };
        s.arrived = false;
        s.reported = Some((mask, rd, wr));
        if news {
            ready.push(Ready { key, events: mask });
        }
    }

    /// The poll(2) mask of socket `id` as Linux's tcp_poll/datagram_poll compute it, and the
    /// readable/writable amounts behind it.
    pub(crate) fn readiness(&mut self, id: usize) -> (u32, usize, usize) {
        const IN: u32 = libc::POLLIN as u32;
        const OUT: u32 = libc::POLLOUT as u32;
        const HUP: u32 = libc::POLLHUP as u32;
        const ERR: u32 = libc::POLLERR as u32;
        const RDHUP: u32 = libc::POLLRDHUP as u32;
        let Some(s) = self.socks.get(id) else { return (libc::POLLNVAL as u32, 0, 0) };
        let err = if s.error != 0 { ERR } else { 0 };
        match &s.st {
            // A TCP socket that is not connected is TCP_CLOSE: hung up, and writable.
            St::Idle => (HUP | OUT | err, 0, 0),
            St::Listen { queue, .. } => {
                let n = queue.len();
                (if n > 0 { IN } else { 0 } | err, n, 0)
            }
            St::Tcp(c) => {
                let sk = self.nets[c.ifx].get::<tcp::Socket>(c.h);
                let rd = sk.recv_queue();
                let queued = sk.send_queue();
                let free = sk.send_capacity() - queued;
                let shut_rd = c.rcv_shut || c.peer_fin || c.dead;
                let shut_wr = c.snd_shut || c.dead;
                let mut m = err;
                if shut_rd && shut_wr {
                    m |= HUP;
                }
                if shut_rd {
                    m |= IN | RDHUP;
                }
                if c.established || c.dead {
                    if rd > 0 {
                        m |= IN;
                    }
                    // sk_stream_is_writeable: free space at least half of what is queued.
                    if shut_wr || (free > 0 && free >= queued / 2) {
                        m |= OUT;
                    }
                }
                (m, rd, free)
            }
            St::Udp(u) => {
                let mut rd = 0;
                let mut free = usize::MAX;
                for (ifx, h) in u.h.iter().enumerate() {
                    if let Some(h) = h {
                        let sk = self.nets[ifx].get::<udp::Socket>(*h);
                        rd += sk.recv_queue();
                        free = free.min(sk.payload_send_capacity() - sk.send_queue());
                    }
                }
                let mut m = err;
                if free > 0 {
                    m |= OUT;
                }
                if rd > 0 {
                    m |= IN;
                }
                if u.rcv_shut {
                    m |= IN | RDHUP;
                }
                if u.rcv_shut && u.snd_shut {
                    m |= HUP;
                }
                (m, rd, if free == usize::MAX { 0 } else { free })
            }
            St::Relayed(r) => self.relayed_readiness(r, s.error),
        }
    }
}

/// Applies the options smoltcp has a knob for.
pub(crate) fn apply_tcp_opts(s: &mut tcp::Socket<'static>, o: &Opts) {
    use smoltcp::time::Duration;
    s.set_nagle_enabled(!o.nodelay);
    s.set_hop_limit(o.ttl);
    if o.keepalive {
        // smoltcp has one keepalive interval and no probe count: probe every TCP_KEEPINTVL
        // once idle, and give up after TCP_KEEPIDLE + TCP_KEEPCNT * TCP_KEEPINTVL of silence,
        // Linux's total.
        s.set_keep_alive(Some(Duration::from_secs(u64::from(o.keepidle.min(o.keepintvl.max(1))))));
        s.set_timeout(Some(Duration::from_secs(u64::from(o.keepidle) + u64::from(o.keepcnt) * u64::from(o.keepintvl))));
    } else {
        s.set_keep_alive(None);
    }
}

/// Makes an Interface straight into a box, in a frame of its own, so that its 66 KB are on the
/// stack once.
#[inline(never)]
fn boxed_iface(c: Config, dev: &mut impl smoltcp::phy::Device) -> Box<Interface> {
    Box::new(Interface::new(c, dev, SInstant::ZERO))
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the live buffer b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        // No entropy yet (early boot): the clock still separates restarts.
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    }
}
