//! A DNS reply from anyone who can reach the NSM's resolver port, and resolv.conf text: the
//! decoder never panics, never loops, and whatever it returns re-validates (addresses of the
//! family asked, names a guest could look up); a name the encoder accepts comes back as the
//! question of a reply built from its query.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netkernel_service::dns::{
    decode_response, encode_query, parse_resolv_conf, validate_name, Answer, DnsError, QType,
};

const NAME: &str = "x.test";

fn check(qtype: QType, a: &Answer) {
    assert!(!a.addrs.is_empty() || !a.names.is_empty(), "an empty answer instead of NoData");
    for ip in &a.addrs {
        match qtype {
            QType::A => assert!(ip.is_ipv4(), "{ip} for an A query"),
            QType::Aaaa => assert!(ip.is_ipv6(), "{ip} for an AAAA query"),
            QType::Ptr => panic!("an address for a PTR query"),
        }
    }
    if qtype != QType::Ptr {
        assert!(a.names.is_empty());
    }
    for n in a.names.iter().chain(&a.canonical) {
        assert!(validate_name(n).is_ok(), "decoded name {n:?} does not validate");
    }
}

/// Appends records to `m` as `recipe` says, one control byte each, and returns how many.
/// Bits 0-1: the owner (a pointer to the question's name; a pointer to the offset in the next
/// byte; the question's name written out in capitals; a pointer with the next two bytes as its
/// 14-bit offset). Bits 2-4: the type (A, AAAA, CNAME, PTR, the next byte's, or three times the
/// type asked). Bit 5: IN or CH. Bits 6-7: the rdata: the type's size taken from the recipe for
/// A and AAAA, otherwise a length byte then that many bytes (names, pointers, or nonsense).
fn records(m: &mut Vec<u8>, mut recipe: &[u8]) -> u16 {
    let mut take = |n: usize| -> Option<Vec<u8>> {
        let (head, tail) = recipe.split_at_checked(n)?;
        recipe = tail;
        Some(head.to_vec())
    };
    let mut count = 0u16;
    while let Some(k) = take(1).map(|b| b[0]) {
        let Some(owner) = (match k & 3 {
            0 => Some(vec![0xc0, 12]),
            1 => take(1).map(|b| vec![0xc0, b[0]]),
            2 => Some(b"\x01X\x04TEST\x00".to_vec()),
            _ => take(2).map(|b| vec![0xc0 | (b[0] & 0x3f), b[1]]),
        }) else {
            break;
        };
        let rtype: u16 = match (k >> 2) & 7 {
            0 => 1,
            1 => 28,
            2 => 5,
            3 => 12,
            4 => match take(1) {
                Some(b) => u16::from(b[0]),
                None => break,
            },
            _ => [1, 28, 12][usize::from(k >> 6) % 3],
        };
        let class: u16 = if k & 0x20 == 0 { 1 } else { 3 };
        let fixed = match rtype {
            1 if k & 0x40 == 0 => Some(4),
            28 if k & 0x40 == 0 => Some(16),
            _ => None,
        };
        let rdata = match fixed {
            Some(n) => take(n),
            None => take(1).and_then(|b| take(usize::from(b[0]))),
        };
        let Some(rdata) = rdata else { break };
        m.extend_from_slice(&owner);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&class.to_be_bytes());
        m.extend_from_slice(&[0, 0, 1, 0]);
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
        count += 1;
    }
    count
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let qtype = [QType::A, QType::Aaaa, QType::Ptr][usize::from(mode & 3) % 3];

    // The bytes as a whole reply, with the id it carries (so that most get past the id check).
    let id = rest.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    if let Ok(a) = decode_response(id, NAME, qtype, rest) {
        check(qtype, &a);
    }

    // The bytes as the answer section behind a genuine header and question, with flags and
    // counts from the input: this reaches record parsing and CNAME chains at once.
    if rest.len() >= 4 {
        let mut m = encode_query(0x4242, NAME, qtype).unwrap();
        // QR set and opcode 0 (AA, RD from the input; TC rarely); NOERROR half the time.
        m[2] = 0x80 | (rest[0] & 0x05) | if rest[0] & 0xf0 == 0xf0 { 0x02 } else { 0 };
        m[3] = (rest[1] & 0xf0) | if rest[1] & 0x08 == 0 { 0 } else { rest[1] & 0x07 };
        m[7] = rest[2] & 0x1f;
        m[9] = rest[3] & 3;
        m.extend_from_slice(&rest[4..]);
        if let Ok(a) = decode_response(0x4242, NAME, qtype, &m) {
            check(qtype, &a);
        }
    }

    // The bytes as a recipe for well-formed-looking records (see `records`), so that runs
    // reach answers, CNAME chains and PTR names without first guessing a record's layout.
    if rest.len() >= 2 {
        let mut m = encode_query(0x4242, NAME, qtype).unwrap();
        m[2] = 0x81 | (rest[0] & 0x04);
        m[3] = 0x80;
        let n = records(&mut m, &rest[1..]);
        m[6..8].copy_from_slice(&n.to_be_bytes());
        if let Ok(a) = decode_response(0x4242, NAME, qtype, &m) {
            check(qtype, &a);
        }
    }

    // The bytes as a name: what encodes is a name whose reply's question matches it.
    if let Ok(text) = std::str::from_utf8(rest) {
        match encode_query(1, text, qtype) {
            Ok(mut q) => {
                assert!(validate_name(text).is_ok());
                q[2] |= 0x80;
                assert_eq!(decode_response(1, text, qtype, &q), Err(DnsError::NoData));
            }
            Err(e) => assert!(matches!(e, DnsError::BadName { .. }), "{e}"),
        }
    }

    // The bytes as resolv.conf.
    let conf = parse_resolv_conf(&String::from_utf8_lossy(rest));
    assert!((1..=3).contains(&conf.nameservers.len()));
    assert!(conf.ndots <= 15 && (1..=30).contains(&conf.timeout_s) && (1..=5).contains(&conf.attempts));
    for d in &conf.search {
        assert!(validate_name(d).is_ok(), "search domain {d:?}");
    }
    let _ = conf.candidates("host");
});
