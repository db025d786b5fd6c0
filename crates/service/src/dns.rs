//! DNS messages for an NSM that resolves through its own stack (RFC 1035; AAAA per RFC 3596).
//!
//! A userspace-stack NSM runs in an empty network namespace, where the system resolver has no
//! route to any nameserver, so a guest's getaddrinfo (Op::Resolve) must become DNS queries sent
//! through the NSM's own stack. This module only builds and reads the bytes: no sockets, no
//! clock. The caller sends [`encode_query`]'s message to each of [`ResolvConf::nameservers`],
//! waits [`ResolvConf::timeout_s`], retries [`ResolvConf::attempts`] times, walks
//! [`ResolvConf::candidates`], and turns a final [`DnsError`] into the guest's EAI_* code with
//! [`DnsError::eai`].
//!
//! A reply comes from the network, so from anyone who can guess a port: [`decode_response`]
//! never panics, never loops (a compression pointer must point backwards, so every jump lands
//! strictly earlier in the message) and allocates in proportion to the reply (about 25 times
//! its size at worst, a record of 12 bytes being kept with its decoded name). It is public (not `pub(crate)`) so that the fuzz target and the user NSM's crate can
//! reach it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

/// Bytes in the fixed header: id, flags and the four section counts.
const HEADER: usize = 12;
const CLASS_IN: u16 = 1;
const TYPE_CNAME: u16 = 5;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
const RCODE_REFUSED: u8 = 5;

/// RFC 1035 §2.3.4: a label is at most 63 octets, a name at most 255 on the wire, which is 253
/// characters of text once the length bytes become dots and the root's zero byte is dropped.
const MAX_LABEL: usize = 63;
const MAX_NAME_TEXT: usize = 253;
const MAX_NAME_WIRE: usize = 255;
/// A name has at most 127 labels and an honest encoder jumps at most once per label, so more
/// jumps than that mean a hostile message (backward-only pointers already rule out loops; this
/// caps the work per name).
const MAX_POINTERS: usize = 128;
/// CNAME hops followed inside one reply; recursive servers give up on chains far shorter.
const MAX_CNAMES: usize = 16;
/// glibc's MAXNS: nameserver lines after the third are ignored.
const MAX_NAMESERVERS: usize = 3;
/// glibc's caps (RES_MAXNDOTS, RES_MAXRETRANS, RES_MAXRETRY) and defaults (resolv.conf(5)).
const MAX_NDOTS: u32 = 15;
const MAX_TIMEOUT_S: u32 = 30;
const MAX_ATTEMPTS: u32 = 5;
const DEFAULT_NDOTS: u8 = 1;
const DEFAULT_TIMEOUT_S: u8 = 5;
const DEFAULT_ATTEMPTS: u8 = 2;

/// The record types a getaddrinfo or getnameinfo needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// An IPv4 address (type 1).
    A,
    /// An IPv6 address (type 28, RFC 3596).
    Aaaa,
    /// A name for an address, asked under in-addr.arpa or ip6.arpa (type 12).
    Ptr,
}

impl QType {
    /// The type's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            QType::A => 1,
            QType::Aaaa => 28,
            QType::Ptr => 12,
        }
    }
}

/// What was wrong with a name the caller wanted to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameProblem {
    /// The name is empty, or only the root's dot.
    Empty,
    /// Two dots in a row or a leading dot.
    EmptyLabel,
    /// A label (the part between two dots) of this many bytes; 63 is the most.
    LabelTooLong(usize),
    /// A name of this many bytes without its trailing dot; 253 is the most.
    TooLong(usize),
    /// A character other than a letter, a digit, '-' or '_'.
    BadChar(char),
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => write!(f, "the name is empty"),
            NameProblem::EmptyLabel => write!(f, "it has an empty label (a leading dot or two dots in a row)"),
            NameProblem::LabelTooLong(n) => write!(f, "a label is {n} bytes long, at most {MAX_LABEL} are allowed"),
            NameProblem::TooLong(n) => write!(f, "it is {n} bytes long, at most {MAX_NAME_TEXT} are allowed"),
            NameProblem::BadChar(c) => {
                write!(f, "it contains {c:?}; a host name has only letters, digits, '-', '_' and dots")
            }
        }
    }
}

/// How a reply broke the message format. The server, or something between it and the NSM,
/// sent bytes no correct server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// Fewer than the header's 12 bytes.
    Short(usize),
    /// A name, record or field runs past the end of the message.
    PastEnd,
    /// A compression pointer at `at` to `target`, which is not before it: a loop or out of
    /// bounds.
    BadPointer { at: usize, target: usize },
    /// More compression pointers in one name than any honest encoder writes.
    TooManyPointers,
    /// A label whose top two bits are 01 or 10 (reserved or obsolete extended labels).
    LabelType(u8),
    /// A name longer than 255 bytes on the wire.
    NameTooLong,
    /// A reply whose question count is not 1.
    QuestionCount(u16),
    /// A record of `rtype` whose data is `len` bytes where its type needs another size.
    RdLength { rtype: u16, len: u16 },
    /// More than 16 CNAME hops, or a CNAME loop.
    CnameChain,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::Short(n) => write!(f, "{n} bytes, shorter than a DNS header"),
            Malformed::PastEnd => write!(f, "a name or record runs past the end of the message"),
            Malformed::BadPointer { at, target } => {
                write!(f, "compression pointer at byte {at} points to {target}, not to an earlier byte")
            }
            Malformed::TooManyPointers => write!(f, "a name with more than {MAX_POINTERS} compression pointers"),
            Malformed::LabelType(b) => write!(f, "unsupported label type {b:#04x}"),
            Malformed::NameTooLong => write!(f, "a name longer than {MAX_NAME_WIRE} bytes"),
            Malformed::QuestionCount(n) => write!(f, "{n} questions where the query had 1"),
            Malformed::RdLength { rtype, len } => write!(f, "a type {rtype} record with {len} bytes of data"),
            Malformed::CnameChain => write!(f, "a CNAME chain longer than {MAX_CNAMES} or looping"),
        }
    }
}

/// Why a lookup produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The name cannot be sent in a query.
    BadName { name: String, problem: NameProblem },
    /// A reply to another query (a late one, or a spoofing attempt): discard it and keep
    /// waiting ([`DnsError::is_stray`]).
    IdMismatch { expected: u16, got: u16 },
    /// The QR bit is clear: a query, not a reply. Stray too.
    NotAResponse,
    /// The reply's question is not the one asked (name, type or class). Stray too.
    QuestionMismatch,
    /// A reply with an opcode other than QUERY.
    Opcode(u8),
    /// The reply did not fit in the datagram (TC bit): ask again over TCP.
    Truncated,
    /// The name does not exist (NXDOMAIN).
    NoSuchName,
    /// The name exists but has no record of the type asked (NOERROR with no answer).
    NoData,
    /// The server could not answer now (SERVFAIL).
    Temporary,
    /// The server refused to answer (REFUSED).
    Refused,
    /// The server does not recurse: it answered with a referral.
    NotRecursive,
    /// Another error code from the server: FORMERR (1), NOTIMP (4) or one past REFUSED.
    Rcode(u8),
    /// The reply breaks the message format.
    Malformed(Malformed),
    /// No nameserver answered in time. Never returned here (this module has no clock); the
    /// caller's to report, so that it maps to EAI_AGAIN with the rest.
    Timeout,
}

impl From<Malformed> for DnsError {
    fn from(m: Malformed) -> DnsError {
        DnsError::Malformed(m)
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::BadName { name, problem } => write!(f, "cannot look up {name:?}: {problem}"),
            DnsError::IdMismatch { expected, got } => {
                write!(f, "reply id {got:#06x} is not the query's {expected:#06x} (a late or spoofed reply)")
            }
            DnsError::NotAResponse => write!(f, "received a DNS query where a reply was expected"),
            DnsError::QuestionMismatch => write!(f, "the reply answers another question (a late or spoofed reply)"),
            DnsError::Opcode(op) => write!(f, "the reply has opcode {op}, not QUERY"),
            DnsError::Truncated => write!(f, "the reply was truncated (TC bit); it needs DNS over TCP"),
            DnsError::NoSuchName => write!(f, "the name does not exist (NXDOMAIN)"),
            DnsError::NoData => write!(f, "the name has no record of the type asked"),
            DnsError::Temporary => {
                write!(f, "the nameserver could not answer now (SERVFAIL); try again later or another nameserver")
            }
            DnsError::Refused => write!(
                f,
                "the nameserver refused the query (REFUSED); check that resolv.conf names a server that \
                 resolves for this host"
            ),
            DnsError::NotRecursive => write!(
                f,
                "the nameserver does not resolve recursively (it sent a referral); resolv.conf must name a \
                 recursive resolver"
            ),
            DnsError::Rcode(RCODE_FORMERR) => write!(f, "the nameserver could not parse the query (FORMERR)"),
            DnsError::Rcode(RCODE_NOTIMP) => write!(f, "the nameserver does not support this query (NOTIMP)"),
            DnsError::Rcode(n) => write!(f, "the nameserver answered with error code {n}"),
            DnsError::Malformed(m) => write!(f, "malformed DNS reply: {m}"),
            DnsError::Timeout => {
                write!(f, "no nameserver answered in time; check resolv.conf's nameservers and the NSM's route to them")
            }
        }
    }
}

impl std::error::Error for DnsError {}

impl DnsError {
    /// The getaddrinfo error a guest sees: EAI_NONAME when the name has no answer, EAI_AGAIN
    /// when asking later may work, EAI_FAIL when it will not.
    pub fn eai(&self) -> i32 {
        match self {
            DnsError::BadName { .. } | DnsError::NoSuchName | DnsError::NoData => libc::EAI_NONAME,
            DnsError::Temporary | DnsError::Timeout => libc::EAI_AGAIN,
            // Truncated: this resolver has no TCP fallback yet, so the same question gets the
            // same truncated reply; asking again cannot help.
            DnsError::Truncated
            | DnsError::IdMismatch { .. }
            | DnsError::NotAResponse
            | DnsError::QuestionMismatch
            | DnsError::Opcode(_)
            | DnsError::Refused
            | DnsError::NotRecursive
            | DnsError::Rcode(_)
            | DnsError::Malformed(_) => libc::EAI_FAIL,
        }
    }

    /// A reply that is not to this query: the caller drops it and keeps waiting for the real
    /// one until its timeout, so that a late or forged datagram cannot end the lookup (RFC 5452).
    pub fn is_stray(&self) -> bool {
        matches!(self, DnsError::IdMismatch { .. } | DnsError::NotAResponse | DnsError::QuestionMismatch)
    }

    /// Whether glibc's res_search goes on to the next of [`ResolvConf::candidates`] after this
    /// error: yes when that name has no answer (NXDOMAIN, no data) or its server failed on it
    /// (SERVFAIL); any other error ends the search.
    pub fn tries_next_candidate(&self) -> bool {
        matches!(self, DnsError::NoSuchName | DnsError::NoData | DnsError::Temporary)
    }
}

/// What a reply says, following CNAMEs to the name that has the records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    /// A or AAAA: the addresses in the order the server gave, all of the family asked.
    pub addrs: Vec<IpAddr>,
    /// PTR: the names, each a valid host name (records whose name is not are skipped, as glibc
    /// skips them).
    pub names: Vec<String>,
    /// The name that owns the records after the CNAME chain, spelt as the server spelt it
    /// (getaddrinfo's AI_CANONNAME), if it is a valid host name.
    pub canonical: Option<String>,
    /// Seconds the answer may be cached: the least TTL of the records used.
    pub ttl: u32,
}

/// A domain name in wire form without the root's zero byte: length-prefixed labels in the case
/// they came in. On the stack, so reading a hostile reply allocates nothing per name.
#[derive(Clone, Copy)]
struct Name {
    len: usize,
    buf: [u8; MAX_NAME_WIRE],
}

impl PartialEq for Name {
    /// DNS names compare case-insensitively (RFC 4343). Length bytes are at most 63, never an
    /// ASCII letter, so comparing the whole wire form byte by byte cannot mix them with text.
    fn eq(&self, other: &Name) -> bool {
        self.wire().eq_ignore_ascii_case(other.wire())
    }
}

impl Name {
    fn root() -> Name {
        Name { len: 0, buf: [0; MAX_NAME_WIRE] }
    }

    fn wire(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends a label of 1..=63 bytes; refuses one that makes the name longer than 255 bytes
    /// with its final zero.
    fn push(&mut self, label: &[u8]) -> Result<(), Malformed> {
        let end = self.len + 1 + label.len();
        if end + 1 > MAX_NAME_WIRE {
            return Err(Malformed::NameTooLong);
        }
        self.buf[self.len] = label.len() as u8;
        self.buf[self.len + 1..end].copy_from_slice(label);
        self.len = end;
        Ok(())
    }

    fn labels(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.wire();
        std::iter::from_fn(move || {
            let (&n, tail) = rest.split_first()?;
            let (label, tail) = tail.split_at(n as usize);
            rest = tail;
            Some(label)
        })
    }

    /// Checks a name the caller wrote and puts it in wire form.
    fn from_text(text: &str) -> Result<Name, DnsError> {
        let bad = |problem| DnsError::BadName { name: text.to_string(), problem };
        // One trailing dot marks the name absolute; it is not an empty label.
        let body = text.strip_suffix('.').unwrap_or(text);
        if body.is_empty() {
            return Err(bad(NameProblem::Empty));
        }
        if body.len() > MAX_NAME_TEXT {
            return Err(bad(NameProblem::TooLong(body.len())));
        }
        let mut name = Name::root();
        for label in body.split('.') {
            if label.is_empty() {
                return Err(bad(NameProblem::EmptyLabel));
            }
            if let Some(c) = label.chars().find(|&c| !host_char(c)) {
                return Err(bad(NameProblem::BadChar(c)));
            }
            if label.len() > MAX_LABEL {
                return Err(bad(NameProblem::LabelTooLong(label.len())));
            }
            // Cannot fail: 253 bytes of text are at most 255 on the wire.
            name.push(label.as_bytes()).map_err(|_| bad(NameProblem::TooLong(body.len())))?;
        }
        Ok(name)
    }

    /// The name as text, if every label holds only host-name characters: a reply's bytes are
    /// arbitrary, and a name handed on to a guest must be one it could have looked up.
    fn text(&self) -> Option<String> {
        if self.len == 0 {
            return None;
        }
        let mut out = String::with_capacity(self.len);
        for label in self.labels() {
            if !label.iter().all(|&b| host_char(b as char)) {
                return None;
            }
            if !out.is_empty() {
                out.push('.');
            }
            // All ASCII, checked above.
            out.extend(label.iter().map(|&b| b as char));
        }
        Some(out)
    }
}

fn host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Checks that `name` can be looked up: labels of 1 to 63 letters, digits, '-' or '_', at most
/// 253 bytes in all, one optional trailing dot.
pub fn validate_name(name: &str) -> Result<(), DnsError> {
    Name::from_text(name).map(|_| ())
}

/// A recursive query (RD set) for `name`'s records of `qtype`, class IN. `id` should be random
/// per query (RFC 5452): it and the source port are all that tells a reply from a forgery.
pub fn encode_query(id: u16, name: &str, qtype: QType) -> Result<Vec<u8>, DnsError> {
    let name = Name::from_text(name)?;
    let mut m = Vec::with_capacity(HEADER + name.len + 5);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&FLAG_RD.to_be_bytes());
    // One question; no answer, authority or additional records.
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(name.wire());
    m.push(0);
    m.extend_from_slice(&qtype.code().to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(m)
}

/// The name a PTR query for `ip` asks: `d.c.b.a.in-addr.arpa`, or the 32 nibbles of an IPv6
/// address lowest first under `ip6.arpa` (RFC 3596 §2.5). An IPv4-mapped IPv6 address asks for
/// its IPv4 address, as glibc's getnameinfo does.
pub fn reverse_name(ip: IpAddr) -> String {
    let v4 = |a: Ipv4Addr| {
        let [a, b, c, d] = a.octets();
        format!("{d}.{c}.{b}.{a}.in-addr.arpa")
    };
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => v4(m),
            None => {
                let mut s = String::with_capacity(72);
                for byte in a.octets().iter().rev() {
                    for nibble in [byte & 0xf, byte >> 4] {
                        s.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                        s.push('.');
                    }
                }
                s.push_str("ip6.arpa");
                s
            }
        },
    }
}

fn be16(msg: &[u8], at: usize) -> Result<u16, Malformed> {
    match msg.get(at..at.checked_add(2).ok_or(Malformed::PastEnd)?) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(Malformed::PastEnd),
    }
}

fn be32(msg: &[u8], at: usize) -> Result<u32, Malformed> {
    match msg.get(at..at.checked_add(4).ok_or(Malformed::PastEnd)?) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(Malformed::PastEnd),
    }
}

/// Reads the name at `start`, following compression pointers (RFC 1035 §4.1.4). Returns it and
/// the offset just past its bytes at `start` (after the first pointer, if any). A pointer must
/// point before itself: then every jump goes strictly backwards and no loop is possible.
fn read_name(msg: &[u8], start: usize) -> Result<(Name, usize), Malformed> {
    let mut name = Name::root();
    let mut pos = start;
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(pos).ok_or(Malformed::PastEnd)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok((name, end.unwrap_or(pos + 1))),
            0x00 => {
                let label = msg.get(pos + 1..pos + 1 + usize::from(len)).ok_or(Malformed::PastEnd)?;
                name.push(label)?;
                pos += 1 + usize::from(len);
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(Malformed::PastEnd)?;
                let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                if target >= pos {
                    return Err(Malformed::BadPointer { at: pos, target });
                }
                jumps += 1;
                if jumps > MAX_POINTERS {
                    return Err(Malformed::TooManyPointers);
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return Err(Malformed::LabelType(len)),
        }
    }
}

/// An answer record that may matter: class IN, type CNAME or the type asked.
struct Record {
    owner: Name,
    rtype: u16,
    ttl: u32,
    rdata: Range<usize>,
}

/// Reads `msg`, the reply to the query [`encode_query`] made of `id`, `name` and `qtype`. The
/// name is needed to check the reply's question (case-insensitively), which with the id is what
/// tells this query's reply from a stray or forged one.
pub fn decode_response(id: u16, name: &str, qtype: QType, msg: &[u8]) -> Result<Answer, DnsError> {
    let asked = Name::from_text(name)?;
    if msg.len() < HEADER {
        return Err(Malformed::Short(msg.len()).into());
    }
    let got = be16(msg, 0)?;
    if got != id {
        return Err(DnsError::IdMismatch { expected: id, got });
    }
    let flags = be16(msg, 2)?;
    if flags & FLAG_QR == 0 {
        return Err(DnsError::NotAResponse);
    }
    let opcode = ((flags >> 11) & 0xf) as u8;
    if opcode != 0 {
        return Err(DnsError::Opcode(opcode));
    }
    let truncated = flags & FLAG_TC != 0;
    let rcode = (flags & 0xf) as u8;
    let (qdcount, ancount, nscount) = (be16(msg, 4)?, be16(msg, 6)?, be16(msg, 8)?);

    let mut pos = HEADER;
    match qdcount {
        1 => match read_question(msg, pos) {
            Ok((qname, qt, qclass, next)) => {
                if qname != asked || qt != qtype.code() || qclass != CLASS_IN {
                    return Err(DnsError::QuestionMismatch);
                }
                pos = next;
            }
            // A truncated reply may be cut inside its question.
            Err(_) if truncated => return Err(DnsError::Truncated),
            Err(e) => return Err(e.into()),
        },
        // Servers may leave out the question when they refuse to parse the query
        // (FORMERR, NOTIMP, REFUSED); the id already matched, so their error stands.
        0 if rcode != 0 || truncated => {}
        n => return Err(Malformed::QuestionCount(n).into()),
    }
    if truncated {
        return Err(DnsError::Truncated);
    }
    match rcode {
        0 => {}
        RCODE_SERVFAIL => return Err(DnsError::Temporary),
        RCODE_NXDOMAIN => return Err(DnsError::NoSuchName),
        RCODE_REFUSED => return Err(DnsError::Refused),
        n => return Err(DnsError::Rcode(n)),
    }

    // One pass over the answer section keeps the records that can matter; authority and
    // additional records are never read. Each record takes at least 11 bytes of the message,
    // so `records` stays proportional to it whatever ancount claims.
    let mut records = Vec::new();
    for _ in 0..ancount {
        let (owner, next) = read_name(msg, pos)?;
        let rtype = be16(msg, next)?;
        let class = be16(msg, next + 2)?;
        let ttl = be32(msg, next + 4)?;
        let rdlength = usize::from(be16(msg, next + 8)?);
        let rdata = next + 10..next + 10 + rdlength;
        if rdata.end > msg.len() {
            return Err(Malformed::PastEnd.into());
        }
        pos = rdata.end;
        if class == CLASS_IN && (rtype == TYPE_CNAME || rtype == qtype.code()) {
            // RFC 2181 §8: a TTL with the top bit set is read as zero.
            let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
            records.push(Record { owner, rtype, ttl, rdata });
        }
    }

    // Follow the chain from the name asked: each hop's target owns the next records. A loop
    // (a -> b -> a) runs into the hop limit.
    let mut current = asked;
    let mut ttl = u32::MAX;
    let mut hops = 0;
    while let Some(r) = records.iter().find(|r| r.rtype == TYPE_CNAME && r.owner == current) {
        hops += 1;
        if hops > MAX_CNAMES {
            return Err(Malformed::CnameChain.into());
        }
        current = name_rdata(msg, r)?;
        ttl = ttl.min(r.ttl);
    }

    let mut answer = Answer::default();
    for r in records.iter().filter(|r| r.rtype == qtype.code() && r.owner == current) {
        let data = &msg[r.rdata.clone()];
        match qtype {
            QType::A => {
                let b: [u8; 4] = data.try_into().map_err(|_| rdlength_error(r))?;
                answer.addrs.push(IpAddr::V4(Ipv4Addr::from(b)));
            }
            QType::Aaaa => {
                let b: [u8; 16] = data.try_into().map_err(|_| rdlength_error(r))?;
                answer.addrs.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            QType::Ptr => match name_rdata(msg, r)?.text() {
                Some(n) => answer.names.push(n),
                // Not a host name a guest could use: skipped, and not counted in the TTL.
                None => continue,
            },
        }
        ttl = ttl.min(r.ttl);
        // As the server spells it, not as the caller asked.
        if answer.canonical.is_none() {
            answer.canonical = r.owner.text();
        }
    }
    if answer.addrs.is_empty() && answer.names.is_empty() {
        // No answer, no authority from the server itself, and no recursion offered: a
        // referral from an authoritative-only server, not a statement that the name is empty.
        if ancount == 0 && nscount > 0 && flags & (FLAG_RA | FLAG_AA) == 0 {
            return Err(DnsError::NotRecursive);
        }
        return Err(DnsError::NoData);
    }
    answer.ttl = ttl;
    Ok(answer)
}

fn read_question(msg: &[u8], pos: usize) -> Result<(Name, u16, u16, usize), Malformed> {
    let (name, next) = read_name(msg, pos)?;
    Ok((name, be16(msg, next)?, be16(msg, next + 2)?, next + 4))
}

/// The name a CNAME or PTR record holds; it must fill the record's data exactly.
fn name_rdata(msg: &[u8], r: &Record) -> Result<Name, Malformed> {
    let (name, end) = read_name(msg, r.rdata.start)?;
    if end != r.rdata.end {
        return Err(rdlength_error(r));
    }
    Ok(name)
}

fn rdlength_error(r: &Record) -> Malformed {
    Malformed::RdLength { rtype: r.rtype, len: r.rdata.len() as u16 }
}

/// What /etc/resolv.conf says, as glibc reads it (resolv.conf(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// At most three, in the file's order; 127.0.0.1 when the file names none.
    pub nameservers: Vec<IpAddr>,
    /// The search list: the last `search` or `domain` line's.
    pub search: Vec<String>,
    /// Names with at least this many dots are tried as they are before the search list.
    pub ndots: u8,
    /// Seconds to wait for one nameserver's reply (1..=30).
    pub timeout_s: u8,
    /// Rounds over the nameservers before giving up (1..=5).
    pub attempts: u8,
}

impl Default for ResolvConf {
    fn default() -> ResolvConf {
        ResolvConf {
            nameservers: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            search: Vec::new(),
            ndots: DEFAULT_NDOTS,
            timeout_s: DEFAULT_TIMEOUT_S,
            attempts: DEFAULT_ATTEMPTS,
        }
    }
}

/// glibc's atoi on an option's value: leading digits, 0 when there are none; saturates instead
/// of overflowing.
fn leading_number(s: &str) -> u32 {
    s.bytes().take_while(u8::is_ascii_digit).fold(0u32, |n, d| n.saturating_mul(10).saturating_add(u32::from(d - b'0')))
}

/// Parses resolv.conf's text the way glibc does: a line is a keyword at its very start followed
/// by a space or tab; lines starting with '#' or ';' are comments; a nameserver's address ends
/// at whitespace, '#' or ';'; nameservers past the third are ignored; the last `search` or
/// `domain` line sets the search list; `options` may repeat.
///
/// Where this differs from glibc, on purpose: no hostname-derived default domain (that needs
/// I/O; the caller may fill `search`); search domains that could never be looked up are
/// dropped; a nameserver with a zone index (`fe80::1%eth0`) is skipped, as an [`IpAddr`] cannot
/// carry the zone; `timeout:0` and `attempts:0` become 1, so a caller never spins or gives up
/// without asking.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf { nameservers: Vec::new(), ..ResolvConf::default() };
    for line in text.lines() {
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((keyword, rest)) = line.split_once([' ', '\t']) else { continue };
        let mut words = rest.split_ascii_whitespace();
        match keyword {
            "nameserver" => {
                let addr = rest.trim_start_matches([' ', '\t']).split([' ', '\t', '#', ';']).next().unwrap_or("");
                if conf.nameservers.len() < MAX_NAMESERVERS {
                    if let Ok(ip) = addr.parse::<IpAddr>() {
                        conf.nameservers.push(ip);
                    }
                }
            }
            "domain" => {
                if let Some(d) = words.next() {
                    conf.search = usable_domain(d).into_iter().collect();
                }
            }
            "search" => conf.search = words.filter_map(usable_domain).collect(),
            "options" => {
                for option in words {
                    let Some((key, value)) = option.split_once(':') else { continue };
                    let n = leading_number(value);
                    match key {
                        "ndots" => conf.ndots = n.min(MAX_NDOTS) as u8,
                        "timeout" => conf.timeout_s = n.clamp(1, MAX_TIMEOUT_S) as u8,
                        "attempts" => conf.attempts = n.clamp(1, MAX_ATTEMPTS) as u8,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if conf.nameservers.is_empty() {
        conf.nameservers.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    conf
}

fn usable_domain(d: &str) -> Option<String> {
    validate_name(d).ok().map(|()| d.trim_end_matches('.').to_string())
}

impl ResolvConf {
    /// The names to ask for `name`, in glibc's res_search order: a name with a trailing dot is
    /// only itself; one with at least `ndots` dots is tried as it is, then with each search
    /// domain; one with fewer, with each search domain first and as it is last. The caller goes
    /// on to the next while [`DnsError::tries_next_candidate`] says so.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if name.ends_with('.') {
            return vec![name.to_string()];
        }
        let searched = self.search.iter().map(|d| format!("{name}.{d}"));
        if name.matches('.').count() >= usize::from(self.ndots) {
            std::iter::once(name.to_string()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.to_string())).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: u16 = 0x1234;
    /// Flags of a normal reply: QR, RD, RA, NOERROR.
    const OK: u16 = 0x8180;

    /// A name in wire form without compression.
    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A resource record with `owner` already encoded (possibly a pointer).
    fn rr(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut out = owner.to_vec();
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        out
    }

    /// A reply to `qname`/`qtype` with `answers` (each a whole record); the question's name is
    /// at byte 12, so `[0xc0, 12]` points to it.
    fn reply(id: u16, flags: u16, qname: &str, qtype: u16, answers: &[Vec<u8>]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&wire(qname));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        for a in answers {
            m.extend_from_slice(a);
        }
        m
    }

    const Q: [u8; 2] = [0xc0, 12];

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn query_bytes() {
        let q = encode_query(0xbeef, "Example.com.", QType::Aaaa).unwrap();
        let mut want = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"\x07Example\x03com\x00");
        want.extend_from_slice(&[0, 28, 0, 1]);
        assert_eq!(q, want);
        assert_eq!(&encode_query(1, "x", QType::Ptr).unwrap()[12..], b"\x01x\x00\x00\x0c\x00\x01");
    }

    #[test]
    fn names_are_checked() {
        let problem = |n: &str| match encode_query(1, n, QType::A) {
            Err(DnsError::BadName { problem, .. }) => Some(problem),
            Ok(_) => None,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(problem(""), Some(NameProblem::Empty));
        assert_eq!(problem("."), Some(NameProblem::Empty));
        assert_eq!(problem("a..b"), Some(NameProblem::EmptyLabel));
        assert_eq!(problem(".a"), Some(NameProblem::EmptyLabel));
        assert_eq!(problem("a.."), Some(NameProblem::EmptyLabel));
        assert_eq!(problem("ex ample.com"), Some(NameProblem::BadChar(' ')));
        assert_eq!(problem("é.com"), Some(NameProblem::BadChar('é')));
        assert_eq!(problem("a\0b"), Some(NameProblem::BadChar('\0')));
        assert_eq!(problem(&"a".repeat(64)), Some(NameProblem::LabelTooLong(64)));
        assert_eq!(problem(&"a".repeat(63)), None);
        // 4 labels of 62 and one of 1: 253 bytes with the dots, the most there is.
        let longest = format!("{0}.{0}.{0}.{0}.a", "b".repeat(62));
        assert_eq!(longest.len(), 253);
        assert_eq!(problem(&longest), None);
        assert_eq!(problem(&format!("{longest}.")), None);
        assert_eq!(problem(&format!("{longest}a")), Some(NameProblem::TooLong(254)));
        assert_eq!(problem("_sip._tcp.example-1.com"), None);
        let e = encode_query(1, "a b", QType::A).unwrap_err();
        assert_eq!(e.eai(), libc::EAI_NONAME);
        assert!(e.to_string().contains("\"a b\""), "{e}");
    }

    #[test]
    fn reverse_names() {
        assert_eq!(reverse_name(v4("192.0.2.10")), "10.2.0.192.in-addr.arpa");
        assert_eq!(reverse_name(v4("::ffff:192.0.2.10")), "10.2.0.192.in-addr.arpa");
        assert_eq!(
            reverse_name(v4("2001:db8::567:89ab")),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert!(validate_name(&reverse_name(v4("2001:db8::1"))).is_ok());
    }

    #[test]
    fn one_address_with_compressed_owner() {
        let m = reply(ID, OK, "example.com", 1, &[rr(&Q, 1, 300, &[192, 0, 2, 1])]);
        let a = decode_response(ID, "example.com", QType::A, &m).unwrap();
        assert_eq!(a.addrs, vec![v4("192.0.2.1")]);
        assert!(a.names.is_empty());
        assert_eq!(a.canonical.as_deref(), Some("example.com"));
        assert_eq!(a.ttl, 300);
    }

    #[test]
    fn several_addresses_keep_their_order_and_skip_others() {
        let m = reply(
            ID,
            OK,
            "example.com",
            1,
            &[
                rr(&Q, 1, 60, &[10, 0, 0, 3]),
                rr(&wire("other.org"), 1, 60, &[10, 9, 9, 9]), // another owner: ignored
                rr(&Q, 28, 60, &[0; 16]),                      // another type: ignored
                rr(&wire("EXAMPLE.com"), 1, 30, &[10, 0, 0, 1]), // owner in another case
                rr(&Q, 1, 90, &[10, 0, 0, 2]),
            ],
        );
        let a = decode_response(ID, "example.com", QType::A, &m).unwrap();
        assert_eq!(a.addrs, vec![v4("10.0.0.3"), v4("10.0.0.1"), v4("10.0.0.2")]);
        assert_eq!(a.ttl, 30);
    }

    #[test]
    fn aaaa() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let m = reply(ID, OK, "v6.example", 28, &[rr(&Q, 28, 5, &ip.octets())]);
        let a = decode_response(ID, "v6.example.", QType::Aaaa, &m).unwrap();
        assert_eq!(a.addrs, vec![IpAddr::V6(ip)]);
    }

    #[test]
    fn cname_chain_with_compression_in_rdata() {
        // www.example.com -> web.example.com -> cdn.net, which has the address.
        let mut m = reply(ID, OK, "www.example.com", 1, &[]);
        // "web" + pointer to "example.com" inside the question (byte 12 + 4).
        let hop1 = rr(&Q, 5, 100, &[3, b'w', b'e', b'b', 0xc0, 16]);
        let hop1_rdata = m.len() + 2 + 10;
        m.extend_from_slice(&hop1);
        m.extend_from_slice(&rr(&[0xc0, hop1_rdata as u8], 5, 50, &wire("cdn.net")));
        let cdn = m.len() - wire("cdn.net").len();
        m.extend_from_slice(&rr(&[0xc0, cdn as u8], 1, 200, &[198, 51, 100, 7]));
        m[7] = 3;
        let a = decode_response(ID, "WWW.example.com", QType::A, &m).unwrap();
        assert_eq!(a.addrs, vec![v4("198.51.100.7")]);
        assert_eq!(a.canonical.as_deref(), Some("cdn.net"));
        assert_eq!(a.ttl, 50);
    }

    #[test]
    fn cname_loop_and_long_chain_are_refused() {
        let m = reply(
            ID,
            OK,
            "a.test",
            1,
            &[rr(&wire("a.test"), 5, 1, &wire("b.test")), rr(&wire("b.test"), 5, 1, &wire("a.test"))],
        );
        assert_eq!(decode_response(ID, "a.test", QType::A, &m), Err(Malformed::CnameChain.into()));
        let chain: Vec<_> = (0..=MAX_CNAMES)
            .map(|i| rr(&wire(&format!("h{i}.test")), 5, 1, &wire(&format!("h{}.test", i + 1))))
            .chain([rr(&wire(&format!("h{}.test", MAX_CNAMES + 1)), 1, 1, &[1, 2, 3, 4])])
            .collect();
        let m = reply(ID, OK, "h0.test", 1, &chain);
        assert_eq!(decode_response(ID, "h0.test", QType::A, &m), Err(Malformed::CnameChain.into()));
        // One hop fewer is fine.
        let m = reply(ID, OK, "h1.test", 1, &chain[1..]);
        assert_eq!(decode_response(ID, "h1.test", QType::A, &m).unwrap().addrs, vec![v4("1.2.3.4")]);
    }

    #[test]
    fn cname_to_a_name_without_addresses_is_no_data() {
        let m = reply(ID, OK, "a.test", 1, &[rr(&Q, 5, 1, &wire("b.test")), rr(&Q, 1, 1, &[1, 1, 1, 1])]);
        // The address belongs to a.test, but a.test is an alias: its records are b.test's.
        assert_eq!(decode_response(ID, "a.test", QType::A, &m), Err(DnsError::NoData));
    }

    #[test]
    fn ptr() {
        let q = reverse_name(v4("192.0.2.1"));
        let m = reply(
            ID,
            OK,
            &q,
            12,
            &[
                rr(&Q, 12, 10, &wire("host.example")),
                rr(&Q, 12, 10, &wire("bad name.example")), // not a host name: skipped
                rr(&Q, 12, 10, &wire("alias.example")),
            ],
        );
        let a = decode_response(ID, &q, QType::Ptr, &m).unwrap();
        assert_eq!(a.names, vec!["host.example", "alias.example"]);
        assert!(a.addrs.is_empty());
        // PTR data longer than its name.
        let m = reply(ID, OK, &q, 12, &[rr(&Q, 12, 10, b"\x01a\x00\x00")]);
        assert_eq!(decode_response(ID, &q, QType::Ptr, &m), Err(Malformed::RdLength { rtype: 12, len: 4 }.into()));
    }

    #[test]
    fn ptr_through_a_classless_delegation_cname() {
        // RFC 2317: the PTR lives under a sub-zone the reverse name is an alias into. Its labels
        // often hold '/', which no host name has: the chain is still followed (names compare in
        // wire form), only the canonical name is not given.
        let q = reverse_name(v4("192.0.2.5"));
        for (target, canonical) in [("5.0-25.2.0.192.in-addr.arpa", true), ("5.0/25.2.0.192.in-addr.arpa", false)] {
            let m = reply(
                ID,
                OK,
                &q,
                12,
                &[rr(&Q, 5, 10, &wire(target)), rr(&wire(target), 12, 20, &wire("mail.example"))],
            );
            let a = decode_response(ID, &q, QType::Ptr, &m).unwrap();
            assert_eq!(a.names, vec!["mail.example"]);
            assert_eq!(a.canonical.as_deref(), canonical.then_some(target));
            assert_eq!(a.ttl, 10);
        }
    }

    #[test]
    fn server_errors() {
        let with = |rcode: u16| reply(ID, OK | rcode, "x.test", 1, &[]);
        let d = |m: &[u8]| decode_response(ID, "x.test", QType::A, m);
        assert_eq!(d(&with(3)), Err(DnsError::NoSuchName));
        assert_eq!(d(&with(2)), Err(DnsError::Temporary));
        assert_eq!(d(&with(5)), Err(DnsError::Refused));
        assert_eq!(d(&with(4)), Err(DnsError::Rcode(4)));
        assert_eq!(d(&with(0)), Err(DnsError::NoData));
        // FORMERR without a question section: the id matched, the error stands.
        let mut m = ID.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d(&m), Err(DnsError::Rcode(1)));
        // ...but a NOERROR reply must carry the question.
        m[3] = 0x80;
        assert_eq!(d(&m), Err(Malformed::QuestionCount(0).into()));
        // A referral: no answer, one authority record, neither RA nor AA.
        let mut m = reply(ID, 0x8100, "x.test", 1, &[rr(&wire("test"), 2, 1, &wire("ns.test"))]);
        m[7] = 0;
        m[9] = 1;
        assert_eq!(d(&m), Err(DnsError::NotRecursive));
    }

    #[test]
    fn truncated() {
        let m = reply(ID, OK | FLAG_TC, "x.test", 1, &[rr(&Q, 1, 1, &[1, 2, 3, 4])]);
        assert_eq!(decode_response(ID, "x.test", QType::A, &m), Err(DnsError::Truncated));
        // Cut inside the question.
        assert_eq!(decode_response(ID, "x.test", QType::A, &m[..15]), Err(DnsError::Truncated));
        // A truncated reply to another question is still stray.
        assert_eq!(decode_response(ID, "y.test", QType::A, &m), Err(DnsError::QuestionMismatch));
    }

    #[test]
    fn stray_replies() {
        let m = reply(ID, OK, "x.test", 1, &[rr(&Q, 1, 1, &[1, 2, 3, 4])]);
        let e = decode_response(ID + 1, "x.test", QType::A, &m).unwrap_err();
        assert_eq!(e, DnsError::IdMismatch { expected: ID + 1, got: ID });
        assert!(e.is_stray());
        assert_eq!(decode_response(ID, "y.test", QType::A, &m), Err(DnsError::QuestionMismatch));
        assert_eq!(decode_response(ID, "x.test", QType::Aaaa, &m), Err(DnsError::QuestionMismatch));
        assert_eq!(decode_response(ID, "X.Test.", QType::A, &m).unwrap().addrs, vec![v4("1.2.3.4")]);
        let mut query = encode_query(ID, "x.test", QType::A).unwrap();
        assert_eq!(decode_response(ID, "x.test", QType::A, &query), Err(DnsError::NotAResponse));
        query[2] |= 0x80 | (2 << 3); // a reply with opcode STATUS
        assert_eq!(decode_response(ID, "x.test", QType::A, &query), Err(DnsError::Opcode(2)));
        // Class CH in the question.
        let mut m2 = m.clone();
        m2[12 + wire("x.test").len() + 3] = 3;
        assert_eq!(decode_response(ID, "x.test", QType::A, &m2), Err(DnsError::QuestionMismatch));
    }

    #[test]
    fn hostile_pointers() {
        let d = |m: &[u8]| decode_response(ID, "x.test", QType::A, m);
        let base = reply(ID, OK, "x.test", 1, &[]);
        let at = base.len();
        let with_owner = |owner: &[u8]| {
            let mut m = base.clone();
            m.extend_from_slice(&rr(owner, 1, 1, &[1, 2, 3, 4]));
            m[7] = 1;
            m
        };
        // A pointer to itself.
        let m = with_owner(&[0xc0, at as u8]);
        assert_eq!(d(&m), Err(Malformed::BadPointer { at, target: at }.into()));
        // Two pointers pointing at each other: the jump back lands on one that points forward.
        assert_eq!(read_name(&[0xc0, 2, 0xc0, 0], 2).err(), Some(Malformed::BadPointer { at: 0, target: 2 }));
        let mut m = base.clone();
        m.extend_from_slice(&[0xc0, 0xff]);
        m[7] = 1;
        assert_eq!(d(&m), Err(Malformed::BadPointer { at, target: 0xff }.into()));
        // Out of bounds and forward.
        let m = with_owner(&[0xff, 0xff]);
        assert_eq!(d(&m), Err(Malformed::BadPointer { at, target: 0x3fff }.into()));
        // Reserved label types.
        assert_eq!(d(&with_owner(&[0x40, 0])), Err(Malformed::LabelType(0x40).into()));
        assert_eq!(d(&with_owner(&[0x80, 0])), Err(Malformed::LabelType(0x80).into()));
        // A pointer cut off by the end.
        let mut m = base.clone();
        m.extend_from_slice(&[0xc0]);
        m[7] = 1;
        assert_eq!(d(&m), Err(Malformed::PastEnd.into()));
    }

    #[test]
    fn names_that_grow_past_255_through_pointers() {
        // Each name is a 63-byte label plus a pointer to the previous one: the fifth is over
        // 255 bytes though every pointer is backwards.
        let mut m = reply(ID, OK, "x.test", 1, &[]);
        let mut prev = 12;
        for _ in 0..5 {
            let here = m.len();
            m.push(63);
            m.extend_from_slice(&[b'a'; 63]);
            m.extend_from_slice(&[0xc0 | (prev >> 8) as u8, prev as u8]);
            prev = here;
        }
        assert_eq!(read_name(&m, prev).err(), Some(Malformed::NameTooLong));
        assert!(read_name(&m, 12 + wire("x.test").len() + 4 + 66 * 2).is_ok());
    }

    #[test]
    fn records_past_the_end_and_bad_lengths() {
        let d = |m: &[u8]| decode_response(ID, "x.test", QType::A, m);
        let good = reply(ID, OK, "x.test", 1, &[rr(&Q, 1, 1, &[1, 2, 3, 4])]);
        for cut in HEADER..good.len() {
            let e = d(&good[..cut]).unwrap_err();
            assert!(matches!(e, DnsError::Malformed(_)), "cut at {cut}: {e}");
            assert_eq!(e.eai(), libc::EAI_FAIL);
        }
        for cut in 0..HEADER {
            assert_eq!(d(&good[..cut]), Err(Malformed::Short(cut).into()));
        }
        // ancount says 2, one is there.
        let mut m = good.clone();
        m[7] = 2;
        assert_eq!(d(&m), Err(Malformed::PastEnd.into()));
        // rdlength 5 for an A record.
        let m = reply(ID, OK, "x.test", 1, &[rr(&Q, 1, 1, &[1, 2, 3, 4, 5])]);
        assert_eq!(d(&m), Err(Malformed::RdLength { rtype: 1, len: 5 }.into()));
        // rdlength past the end.
        let mut m = good.clone();
        let len_at = m.len() - 6;
        m[len_at + 1] = 9;
        assert_eq!(d(&m), Err(Malformed::PastEnd.into()));
        // A CNAME whose name runs past its rdlength.
        let m = reply(ID, OK, "x.test", 1, &[rr(&Q, 5, 1, &wire("y.test")[..3]), rr(&Q, 1, 1, &[1, 1, 1, 1])]);
        assert!(matches!(d(&m), Err(DnsError::Malformed(_))));
    }

    #[test]
    fn ttl_with_top_bit_is_zero() {
        let m = reply(ID, OK, "x.test", 1, &[rr(&Q, 1, 0x8000_0001, &[1, 2, 3, 4])]);
        assert_eq!(decode_response(ID, "x.test", QType::A, &m).unwrap().ttl, 0);
    }

    #[test]
    fn eai_codes() {
        assert_eq!(DnsError::NoSuchName.eai(), libc::EAI_NONAME);
        assert_eq!(DnsError::NoData.eai(), libc::EAI_NONAME);
        assert_eq!(DnsError::Temporary.eai(), libc::EAI_AGAIN);
        assert_eq!(DnsError::Timeout.eai(), libc::EAI_AGAIN);
        assert_eq!(DnsError::Refused.eai(), libc::EAI_FAIL);
        assert_eq!(DnsError::Rcode(1).eai(), libc::EAI_FAIL);
        assert_eq!(DnsError::Malformed(Malformed::PastEnd).eai(), libc::EAI_FAIL);
        assert_eq!(DnsError::Truncated.eai(), libc::EAI_FAIL);
        assert!(DnsError::Temporary.tries_next_candidate());
        assert!(!DnsError::Timeout.tries_next_candidate());
        assert!(!DnsError::NoSuchName.is_stray());
    }

    #[test]
    fn resolv_conf() {
        let c = parse_resolv_conf(
            "# generated\n\
             ; also a comment\n\
             nameserver 192.0.2.53 # inline\n\
             nameserver\t2001:db8::53\n\
             nameserver fe80::1%eth0\n\
             nameserver not-an-address\n\
             nameserver 198.51.100.53;x\n\
             nameserver 203.0.113.53\n\
             search a.example b.example\n\
             domain only.example\n\
             options ndots:3 timeout:0\n\
             options attempts:9 rotate\n\
             \x20nameserver 10.0.0.1\n\
             nameserver10.0.0.2\n",
        );
        assert_eq!(c.nameservers, vec![v4("192.0.2.53"), v4("2001:db8::53"), v4("198.51.100.53")]);
        assert_eq!(c.search, vec!["only.example"]);
        assert_eq!((c.ndots, c.timeout_s, c.attempts), (3, 1, 5));

        let c = parse_resolv_conf("domain x.example\nsearch corp.example. bad..name lab.example\noptions ndots:99");
        assert_eq!(c.search, vec!["corp.example", "lab.example"]);
        assert_eq!(c.ndots, 15);
        assert_eq!(c.nameservers, vec![v4("127.0.0.1")]);

        let c = parse_resolv_conf("");
        assert_eq!(c, ResolvConf::default());
        assert_eq!((c.ndots, c.timeout_s, c.attempts), (1, 5, 2));
        let c = parse_resolv_conf("options timeout:7x ndots:");
        assert_eq!((c.ndots, c.timeout_s), (0, 7));
    }

    #[test]
    fn candidates() {
        let c = parse_resolv_conf("search a.example b.example\noptions ndots:2");
        assert_eq!(c.candidates("host"), ["host.a.example", "host.b.example", "host"]);
        assert_eq!(c.candidates("h.sub"), ["h.sub.a.example", "h.sub.b.example", "h.sub"]);
        assert_eq!(c.candidates("w.x.y"), ["w.x.y", "w.x.y.a.example", "w.x.y.b.example"]);
        assert_eq!(c.candidates("abs.olute."), ["abs.olute."]);
        assert_eq!(parse_resolv_conf("").candidates("host"), ["host"]);
    }

    /// Checks what any successful decode must satisfy, whatever the bytes.
    fn check_answer(qtype: QType, a: &Answer) {
        assert!(!a.addrs.is_empty() || !a.names.is_empty());
        for ip in &a.addrs {
            match qtype {
                QType::A => assert!(ip.is_ipv4()),
                QType::Aaaa => assert!(ip.is_ipv6()),
                QType::Ptr => panic!("an address for a PTR query"),
            }
        }
        for n in a.names.iter().chain(&a.canonical) {
            assert!(validate_name(n).is_ok(), "{n:?}");
        }
        if qtype != QType::Ptr {
            assert!(a.names.is_empty());
        }
    }

    fn qtype() -> impl Strategy<Value = QType> {
        prop_oneof![Just(QType::A), Just(QType::Aaaa), Just(QType::Ptr)]
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), qt in qtype()) {
            let id = bytes.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            if let Ok(a) = decode_response(id, "x.test", qt, &bytes) {
                check_answer(qt, &a);
            }
        }

        /// Arbitrary answer sections behind a valid header and question reach the record
        /// parsing the fully random bytes rarely get to.
        #[test]
        fn decode_never_panics_past_the_question(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            ancount in 0u16..8,
            qt in qtype(),
        ) {
            let mut m = encode_query(7, "x.test", qt).unwrap();
            m[2] |= 0x80;
            m[6..8].copy_from_slice(&ancount.to_be_bytes());
            m.extend_from_slice(&tail);
            if let Ok(a) = decode_response(7, "x.test", qt, &m) {
                check_answer(qt, &a);
            }
        }

        #[test]
        fn encoded_query_plus_answers_round_trips(
            id in any::<u16>(),
            labels in proptest::collection::vec("[a-zA-Z0-9_-]{1,20}", 1..5),
            v6 in any::<bool>(),
            addrs in proptest::collection::vec(any::<[u8; 16]>(), 1..20),
            ttls in proptest::collection::vec(0u32..0x8000_0000, 20),
        ) {
            let name = labels.join(".");
            let qt = if v6 { QType::Aaaa } else { QType::A };
            let mut m = encode_query(id, &name, qt).unwrap();
            m[2] |= 0x80;
            m[3] |= 0x80;
            m[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
            let want: Vec<IpAddr> = addrs
                .iter()
                .map(|b| if v6 { IpAddr::V6(Ipv6Addr::from(*b)) } else { IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])) })
                .collect();
            for (ip, ttl) in want.iter().zip(&ttls) {
                let data = match ip {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                m.extend_from_slice(&rr(&Q, qt.code(), *ttl, &data));
            }
            let a = decode_response(id, &name.to_uppercase(), qt, &m).unwrap();
            prop_assert_eq!(&a.addrs, &want);
            prop_assert_eq!(a.ttl, *ttls[..want.len()].iter().min().unwrap());
            prop_assert_eq!(a.canonical.as_deref(), Some(name.as_str()));
        }
    }
}
