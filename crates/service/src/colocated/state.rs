//! A co-located connection written down and rebuilt in another process (`ctl upgrade`): the
//! pipe's bytes and TCP-visible state, and which guest slot each end's readiness goes to.
//! Writing one down changes nothing; the old process then forgets its ends without closing them
//! ([`End::forget`]), so no FIN or reset reaches a peer that lives on in the new process.

use super::{End, Owner, Pipe, Side, Stamp, Urgent};
use crate::handover::{Blob, Bytes};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Serialize, Deserialize)]
pub(crate) struct SideState {
    rx: Bytes,
    head: u64,
    /// (stream position, byte, read with MSG_OOB)
    urg: Option<(u64, u8, bool)>,
    inline: bool,
    sndbuf: Option<usize>,
    rcvbuf: Option<usize>,
    stamp: u8,
    /// (attachment id, slot) its readiness goes to.
    owner: Option<(u64, u32)>,
    accepted: bool,
    closed: bool,
    fin: bool,
    rd_shut: bool,
    wr_shut: bool,
    reset: bool,
    err: Option<i32>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct PipeState {
    sides: [SideState; 2],
    default_rcvbuf: usize,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct EndState {
    /// Index into the snapshot's pipes.
    pipe: usize,
    side: usize,
    local: Vec<u8>,
    peer: Vec<u8>,
    opts: Vec<(i32, i32, Vec<u8>)>,
    connecting: bool,
}

/// Writes down pipes as their ends are met; each pipe once, however many ends name it.
#[derive(Default)]
pub(crate) struct PipeWriter {
    index: HashMap<*const RefCell<Pipe>, usize>,
    pub pipes: Vec<PipeState>,
    /// Which ends of each pipe were written down.
    written: Vec<[bool; 2]>,
}

impl PipeWriter {
    pub fn end(&mut self, e: &End, blob: &mut Blob) -> EndState {
        let key = Rc::as_ptr(&e.pipe);
        let pipe = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                let p = e.pipe.borrow();
                let side = |s: &Side, blob: &mut Blob| SideState {
                    rx: blob.put_deque(&s.rx),
                    head: s.head,
                    urg: s.urg.map(|u| (u.seq, u.byte, u.read)),
                    inline: s.inline,
                    sndbuf: s.sndbuf,
                    rcvbuf: s.rcvbuf,
                    stamp: s.stamp as u8,
                    owner: s.owner.as_ref().map(|o| (o.region.header().attachment_id, o.slot)),
                    accepted: s.accepted,
                    closed: s.closed,
                    fin: s.fin,
                    rd_shut: s.rd_shut,
                    wr_shut: s.wr_shut,
                    reset: s.reset,
                    err: s.err,
                };
                let state = PipeState {
                    sides: [side(&p.sides[0], blob), side(&p.sides[1], blob)],
                    default_rcvbuf: p.default_rcvbuf,
                };
                self.pipes.push(state);
                self.written.push([false; 2]);
                self.index.insert(key, self.pipes.len() - 1);
                self.pipes.len() - 1
            }
        };
        self.written[pipe][e.side] = true;
        EndState {
            pipe,
            side: e.side,
            local: e.local.clone(),
            peer: e.peer.clone(),
            opts: e.opts.clone(),
            connecting: e.connecting,
        }
    }
}

impl PipeWriter {
    /// An open end of a written pipe that was not written itself (it belongs to an attachment
    /// not handed over), described.
    pub fn outside(&self) -> Option<String> {
        for (p, written) in self.pipes.iter().zip(&self.written) {
            for (s, done) in p.sides.iter().zip(written) {
                if !done && !s.closed {
                    return Some(match s.owner {
                        Some((att, _)) => format!("attachment {att}"),
                        None => "a listener's backlog".into(),
                    });
                }
            }
        }
        None
    }
}

/// Rebuilds the pipes of a snapshot; `owner` finds a slot's region and doorbell flag by
/// attachment id.
pub(crate) struct PipeReader {
    pipes: Vec<Rc<RefCell<Pipe>>>,
}

impl PipeReader {
    pub fn new(
        states: Vec<PipeState>,
        blob: &Blob,
        owner: impl Fn(u64, u32) -> Option<Owner>,
    ) -> Result<PipeReader, String> {
        let mut pipes = Vec::with_capacity(states.len());
        for p in states {
            let mut sides: [Side; 2] = Default::default();
            for (s, st) in sides.iter_mut().zip(p.sides) {
                *s = Side {
                    rx: blob.get(st.rx)?.iter().copied().collect(),
                    head: st.head,
                    urg: st.urg.map(|(seq, byte, read)| Urgent { seq, byte, read }),
                    inline: st.inline,
                    sndbuf: st.sndbuf,
                    rcvbuf: st.rcvbuf,
                    stamp: match st.stamp {
                        1 => Stamp::Micro,
                        2 => Stamp::Nano,
                        _ => Stamp::None,
                    },
                    owner: match st.owner {
                        Some((att, slot)) => Some(owner(att, slot).ok_or("a pipe end's slot has no attachment")?),
                        None => None,
                    },
                    accepted: st.accepted,
                    closed: st.closed,
                    fin: st.fin,
                    rd_shut: st.rd_shut,
                    wr_shut: st.wr_shut,
                    reset: st.reset,
                    err: st.err,
                };
            }
            pipes.push(Rc::new(RefCell::new(Pipe { sides, default_rcvbuf: p.default_rcvbuf })));
        }
        Ok(PipeReader { pipes })
    }

    pub fn end(&self, st: EndState) -> Result<End, String> {
        let pipe = self.pipes.get(st.pipe).ok_or("an end names a pipe the snapshot lacks")?.clone();
        if st.side > 1 {
            return Err("a pipe has two ends".into());
        }
        Ok(End { pipe, side: st.side, local: st.local, peer: st.peer, opts: st.opts, connecting: st.connecting })
    }
}

impl End {
    /// Lets go of this end in a process that handed it to another: its pipe lives on there, so
    /// nothing may reach the peer (no FIN, no reset) and the slot it publishes to is not ours.
    pub(crate) fn forget(self) {
        for s in self.pipe.borrow_mut().sides.iter_mut() {
            s.owner = None;
            s.rx = Default::default();
        }
        std::mem::forget(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colocated::pair;

    /// Writes both ends down and reads them back, as a handover does (no owners: not accepted
    /// into a guest's slot here).
    fn round_trip(c: &End, s: &End) -> (End, End) {
        let (mut w, mut blob) = (PipeWriter::default(), Blob::default());
        let (ce, se) = (w.end(c, &mut blob), w.end(s, &mut blob));
        assert_eq!(w.pipes.len(), 1, "one pipe, written once");
        assert!(w.outside().is_none(), "both ends were written");
        let r = PipeReader::new(w.pipes, &blob, |_, _| None).unwrap();
        (r.end(ce).unwrap(), r.end(se).unwrap())
    }

    #[test]
    fn a_pipe_keeps_its_bytes_urgent_mark_and_fin_across_a_handover() {
        let (mut c, s) = pair((vec![1], vec![2]), (vec![2], vec![1]), 131072);
        s.pipe.borrow_mut().sides[1].accepted = true;
        c.send(b"before", false, 0, false).unwrap();
        c.send(b"!", false, 0, true).unwrap();
        c.shutdown(libc::SHUT_WR).unwrap();
        let (mask_c, mask_s) = (c.mask(), s.mask());
        let (c2, mut s2) = round_trip(&c, &s);
        c.forget();
        s.forget();
        assert_eq!((c2.mask(), s2.mask()), (mask_c, mask_s));
        let mut buf = [0u8; 16];
        assert_eq!(s2.recv(&mut buf, 0), Ok(6));
        assert_eq!(&buf[..6], b"before");
        assert!(s2.at_mark());
        assert_eq!(s2.recv(&mut buf, libc::MSG_OOB), Ok(1));
        assert_eq!(buf[0], b'!');
        assert_eq!(s2.recv(&mut buf, 0), Ok(0), "the FIN came along");
        drop(c2);
    }

    #[test]
    fn an_end_left_behind_is_named() {
        let (c, s) = pair((vec![1], vec![2]), (vec![2], vec![1]), 131072);
        let (mut w, mut blob) = (PipeWriter::default(), Blob::default());
        let _ = w.end(&c, &mut blob);
        assert_eq!(w.outside().as_deref(), Some("a listener's backlog"), "the accepted end stays");
        drop((c, s));
    }
}
