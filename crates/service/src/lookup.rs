//! Name resolution through the NSM's own stack, for a stack with no system resolver behind it
//! (a user NSM runs in a network namespace with nothing in it): the configured hosts first, then
//! DNS queries over a UDP socket of the stack, in the order glibc's resolver uses (search list,
//! nameservers, attempts, timeouts). It runs in the NSM's loop: no thread, no clock of its own.

use crate::dns::{self, DnsError, QType, ResolvConf};
use crate::resolve::{self, Query, Resolved};
use crate::stack::{Errno, Stack};
use netkernel_abi::RESOLVE_REVERSE;
use netkernel_ring::region::Region;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One guest's getaddrinfo or getnameinfo in progress.
struct Pending {
    region: Arc<Region>,
    idx: u32,
    buf_off: u64,
    buf_len: u32,
    query: Query,
    /// Names to try in turn (the search list applied), or the one reverse name.
    names: Vec<String>,
    name: usize,
    /// Record types still to ask for the current name; the first is in flight.
    types: Vec<QType>,
    id: u16,
    /// Nameserver asked, and tries so far of this question (over all nameservers).
    server: usize,
    tries: u32,
    deadline: Instant,
    addrs: Vec<IpAddr>,
    /// The error to report if no name gives an answer.
    error: DnsError,
}

pub(crate) struct StackResolver<H> {
    conf: ResolvConf,
    /// The UDP sockets queries go out on, IPv4 and IPv6, made on first use.
    socks: [Option<H>; 2],
    pending: Vec<Pending>,
    next_id: u16,
}

/// The key the resolver's sockets are watched under: kind 3, bit 35.
pub(crate) const TOK_DNS: u64 = (3 << crate::core::KIND_SHIFT) | (1 << 35);

/// The records getaddrinfo asks for, for a family hint.
fn types_for(family: i32) -> Vec<QType> {
    match family {
        libc::AF_INET => vec![QType::A],
        libc::AF_INET6 => vec![QType::Aaaa],
        _ => vec![QType::A, QType::Aaaa],
    }
}

fn sockaddr(a: SocketAddr) -> Vec<u8> {
    crate::policy::encode(&a)
}

impl<H> StackResolver<H> {
    pub(crate) fn new(conf: ResolvConf, seed: u16) -> Self {
        StackResolver { conf, socks: [None, None], pending: Vec::new(), next_id: seed }
    }

    pub(crate) fn set_nameservers(&mut self, servers: Vec<IpAddr>) {
        self.conf.nameservers = servers;
    }

    /// When the earliest query times out.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    /// Starts a lookup, or answers it at once from `hosts` or a numeric address.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start<S: Stack<Handle = H>>(
        &mut self,
        stack: &mut S,
        hosts: &HashMap<String, String>,
        region: Arc<Region>,
        idx: u32,
        buf_off: u64,
        buf_len: u32,
        mut query: Query,
        now: Instant,
    ) {
        // No interface of this namespace has an address: AI_ADDRCONFIG would hide every answer.
        query.flags &= !libc::AI_ADDRCONFIG;
        let reverse = query.flags as u32 & RESOLVE_REVERSE != 0;
        let local = if reverse {
            resolve::reverse_from_hosts(hosts, &query).map(|n| Ok(Resolved::Name(n)))
        } else if hosts.contains_key(&query.node.to_ascii_lowercase()) || query.node.parse::<IpAddr>().is_ok() {
            Some(resolve::resolve(hosts, &query).map(Resolved::Entries))
        } else {
            None
        };
        if let Some(r) = local {
            return resolve::complete(&region, idx, buf_off, buf_len, r);
        }
        let (names, types) = if reverse {
            match query.node.parse::<IpAddr>() {
                Ok(ip) => (vec![dns::reverse_name(ip)], vec![QType::Ptr]),
                Err(_) => return resolve::complete(&region, idx, buf_off, buf_len, Err(libc::EAI_NONAME)),
            }
        } else {
            (self.conf.candidates(&query.node), types_for(query.family))
        };
        let mut p = Pending {
            region,
            idx,
            buf_off,
            buf_len,
            query,
            names,
            name: 0,
            types,
            id: 0,
            server: 0,
            tries: 0,
            deadline: now,
            addrs: Vec::new(),
            error: DnsError::NoSuchName,
        };
        if self.ask(stack, &mut p, now) {
            self.pending.push(p);
        }
    }

    /// Sends the question `p` is at (its name, its first type) to its nameserver. False: the
    /// lookup ended (answered with an error).
    fn ask<S: Stack<Handle = H>>(&mut self, stack: &mut S, p: &mut Pending, now: Instant) -> bool {
        let servers = &self.conf.nameservers;
        let server = servers[p.server % servers.len()];
        self.next_id = self.next_id.wrapping_mul(25173).wrapping_add(13849);
        p.id = self.next_id;
        p.deadline = now + Duration::from_secs(u64::from(self.conf.timeout_s));
        let sent = dns::encode_query(p.id, &p.names[p.name], p.types[0]).map_err(|e| e.eai()).and_then(|msg| {
            let sock = self.sock(stack, server.is_ipv6()).map_err(|_| libc::EAI_SYSTEM)?;
            stack.send(sock, &msg, 0, &sockaddr(SocketAddr::new(server, 53))).map_err(|_| libc::EAI_AGAIN)
        });
        match sent {
            Ok(_) => true,
            Err(eai) => {
                resolve::complete(&p.region, p.idx, p.buf_off, p.buf_len, Err(eai));
                false
            }
        }
    }

    fn sock<S: Stack<Handle = H>>(&mut self, stack: &mut S, v6: bool) -> Result<&H, Errno> {
        let s = &mut self.socks[v6 as usize];
        if s.is_none() {
            let h = stack.socket(if v6 { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_DGRAM, 0)?;
            stack.watch(&h, TOK_DNS)?;
            *s = Some(h);
        }
        Ok(s.as_ref().expect("made above"))
    }

    /// Reads the replies that arrived and moves each lookup they answer on.
    pub(crate) fn on_ready<S: Stack<Handle = H>>(&mut self, stack: &mut S, now: Instant) {
        let mut buf = [0u8; 512];
        let mut from = [0u8; 128];
        for v6 in [false, true] {
            while let Some(sock) = self.socks[v6 as usize].as_ref() {
                let Ok((n, _)) = stack.recv(sock, &mut buf, 0, &mut from) else { break };
                let msg = &buf[..n];
                let Some(i) = self.pending.iter().position(|p| {
                    dns::decode_response(p.id, &p.names[p.name], p.types[0], msg)
                        .map_or_else(|e| !e.is_stray(), |_| true)
                }) else {
                    continue;
                };
                let mut p = self.pending.swap_remove(i);
                let r = dns::decode_response(p.id, &p.names[p.name], p.types[0], msg);
                if self.advance(stack, &mut p, r, now) {
                    self.pending.push(p);
                }
            }
        }
    }

    /// Retries or gives up the queries whose time is up.
    pub(crate) fn poll<S: Stack<Handle = H>>(&mut self, stack: &mut S, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline > now {
                i += 1;
                continue;
            }
            let mut p = self.pending.swap_remove(i);
            p.tries += 1;
            let keep = if p.tries < u32::from(self.conf.attempts) * self.conf.nameservers.len() as u32 {
                // The next nameserver, round after round, as glibc does.
                p.server += 1;
                self.ask(stack, &mut p, now)
            } else {
                self.advance(stack, &mut p, Err(DnsError::Timeout), now)
            };
            if keep {
                self.pending.push(p);
            }
        }
    }

    /// Takes a reply (or a timeout) to the question in flight: asks the next type, the next
    /// name, or finishes. False: the lookup ended.
    fn advance<S: Stack<Handle = H>>(
        &mut self,
        stack: &mut S,
        p: &mut Pending,
        r: Result<dns::Answer, DnsError>,
        now: Instant,
    ) -> bool {
        let next_name = match r {
            Ok(a) if p.types[0] == QType::Ptr => {
                let name = a.names.into_iter().next().ok_or(libc::EAI_NONAME).map(Resolved::Name);
                resolve::complete(&p.region, p.idx, p.buf_off, p.buf_len, name);
                return false;
            }
            Ok(a) => {
                p.addrs.extend(a.addrs);
                false
            }
            Err(e) => {
                let next = e.tries_next_candidate();
                p.error = e;
                next
            }
        };
        p.types.remove(0);
        p.tries = 0;
        if !p.types.is_empty() {
            return self.ask(stack, p, now);
        }
        if p.addrs.is_empty() && next_name && p.name + 1 < p.names.len() {
            p.name += 1;
            p.types = types_for(p.query.family);
            return self.ask(stack, p, now);
        }
        let r = if p.addrs.is_empty() { Err(p.error.eai()) } else { Ok(self.entries(p)) };
        resolve::complete(&p.region, p.idx, p.buf_off, p.buf_len, r.map(Resolved::Entries));
        false
    }

    /// getaddrinfo's entries for the addresses found (service, socket types and protocols
    /// filled in as for a numeric host).
    fn entries(&self, p: &Pending) -> Vec<[u8; netkernel_abi::RESOLVED_SIZE]> {
        let none = HashMap::new();
        let mut out = Vec::new();
        for a in &p.addrs {
            let q = Query { node: a.to_string(), flags: p.query.flags | libc::AI_NUMERICHOST, ..p.query.clone() };
            out.extend(resolve::resolve(&none, &q).unwrap_or_default());
        }
        out
    }
}
