//! Which processes of a guest hold which of its sockets: the NSM's copy of what the kernel keeps
//! in each process's fd table. A socket closes when no process holds it any more, whether its
//! processes closed their fds or exited (their pidfds fire), as the kernel closes an exiting
//! process's fds. The table grows with the processes and frees them at exit: a guest with
//! 10,000 processes costs memory in proportion, and an exit costs what that process held.
//!
//! Holder ids are the guest's to choose (a counter in its region): a vfork child must name its
//! own before it can hear back from the NSM. A guest naming ids badly only confuses its own
//! bookkeeping. Nothing here does I/O: the caller watches the pidfds and closes the sockets this
//! table says are unheld.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;

/// Holders made by `Op::Share` whose process the engine has not tied to them yet (a fork in
/// flight). Real forks are tied within milliseconds; more than this is a guest making them up.
pub const MAX_PENDING: usize = 4096;

#[derive(Default)]
struct Holder {
    /// The process's pidfd; None until the engine ties a process to the id.
    pidfd: Option<OwnedFd>,
    slots: HashSet<u32>,
}

#[derive(Default)]
pub struct Holders {
    by_id: HashMap<u32, Holder>,
    /// Socket slot -> how many holders hold it.
    refs: HashMap<u32, u32>,
    /// Holders no process is tied to.
    pending: usize,
}

impl Holders {
    /// The table of a new attachment: holder 0 is the process that attached.
    pub fn new(first: OwnedFd) -> Holders {
        let mut h = Holders::default();
        h.by_id.insert(0, Holder { pidfd: Some(first), slots: HashSet::new() });
        h
    }

    /// Holder `holder` made socket `slot` (socket, accept): it holds it, alone.
    pub fn created(&mut self, holder: u32, slot: u32) {
        if self.entry(holder).slots.insert(slot) {
            *self.refs.entry(slot).or_default() += 1;
        }
    }

    /// Holder `holder` closed its last fd of `slot`. Returns whether nobody holds it now (the
    /// socket closes). A holder that did not hold it changes nothing.
    pub fn closed(&mut self, holder: u32, slot: u32) -> bool {
        let held = self.by_id.get_mut(&holder).is_some_and(|h| h.slots.remove(&slot));
        held && self.unref(slot)
    }

    fn unref(&mut self, slot: u32) -> bool {
        let Some(n) = self.refs.get_mut(&slot) else { return false };
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&slot);
            return true;
        }
        false
    }

    /// Holder `to`, a process about to be made by `from`, also holds what `from` holds of
    /// `slots` (None: all of it). `to` may be new, or already tied (the tie came first).
    /// Err(EAGAIN) past MAX_PENDING untied holders; Err(EINVAL) for `to == from`.
    pub fn share(&mut self, from: u32, to: u32, slots: Option<&[u32]>) -> Result<(), i32> {
        if to == from {
            return Err(libc::EINVAL);
        }
        if !self.by_id.contains_key(&to) && self.pending >= MAX_PENDING {
            return Err(libc::EAGAIN);
        }
        let held = self.by_id.get(&from).map(|h| &h.slots);
        let shared: Vec<u32> = match (held, slots) {
            (None, _) => Vec::new(),
            (Some(h), None) => h.iter().copied().collect(),
            (Some(h), Some(list)) => list.iter().copied().filter(|s| h.contains(s)).collect(),
        };
        let pending = &mut self.pending;
        let target = self.by_id.entry(to).or_insert_with(|| {
            *pending += 1;
            Holder::default()
        });
        for s in shared {
            if target.slots.insert(s) {
                *self.refs.entry(s).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Ties a process to `holder` (engine `hold`/`join`); returns the pidfd it replaces, if
    /// any, for the caller to stop watching. An id the table never gave holds nothing.
    pub fn tie(&mut self, holder: u32, pidfd: OwnedFd) -> Option<OwnedFd> {
        let old = self.entry(holder).pidfd.replace(pidfd);
        if old.is_none() {
            self.pending -= 1;
        }
        old
    }

    /// Holder `id`'s record, made (untied) if new.
    fn entry(&mut self, id: u32) -> &mut Holder {
        let pending = &mut self.pending;
        self.by_id.entry(id).or_insert_with(|| {
            *pending += 1;
            Holder::default()
        })
    }

    /// Holder `holder` is gone (its process exited, or will never exist): returns its pidfd,
    /// for the caller to stop watching, and the slots nobody holds any more.
    pub fn remove(&mut self, holder: u32) -> (Option<OwnedFd>, Vec<u32>) {
        let Some(h) = self.by_id.remove(&holder) else { return (None, Vec::new()) };
        if h.pidfd.is_none() {
            self.pending -= 1;
        }
        let unheld = h.slots.iter().copied().filter(|&s| self.unref(s)).collect();
        (h.pidfd, unheld)
    }

    /// Whether any process is tied to the attachment still: without one it ends.
    pub fn any_process(&self) -> bool {
        self.by_id.values().any(|h| h.pidfd.is_some())
    }

    /// Every holder: its id, its pidfd if a process is tied to it, the slots it holds (to hand
    /// the table to another NSM process).
    pub fn export(&self) -> impl Iterator<Item = (u32, Option<&OwnedFd>, Vec<u32>)> {
        self.by_id.iter().map(|(&id, h)| (id, h.pidfd.as_ref(), h.slots.iter().copied().collect()))
    }

    /// The table [`export`](Self::export) wrote down.
    pub fn import(holders: impl IntoIterator<Item = (u32, Option<OwnedFd>, Vec<u32>)>) -> Holders {
        let mut t = Holders::default();
        for (id, pidfd, slots) in holders {
            t.pending += pidfd.is_none() as usize;
            for &s in &slots {
                *t.refs.entry(s).or_default() += 1;
            }
            t.by_id.insert(id, Holder { pidfd, slots: slots.into_iter().collect() });
        }
        t
    }

    /// The pidfds of the processes tied to the attachment, with their holder ids.
    pub fn pidfds(&self) -> impl Iterator<Item = (u32, &OwnedFd)> {
        self.by_id.iter().filter_map(|(&id, h)| h.pidfd.as_ref().map(|p| (id, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("/dev/null").into()
    }

    #[test]
    fn a_socket_closes_with_its_last_holder() {
        let mut h = Holders::new(fd());
        h.created(0, 5);
        let child = 1;
        h.share(0, child, None).expect("share");
        assert!(!h.closed(0, 5), "the child still holds it");
        assert!(!h.closed(0, 5), "a second close by the same holder changes nothing");
        assert!(h.closed(child, 5));
    }

    #[test]
    fn an_exit_releases_only_what_that_process_held() {
        let mut h = Holders::new(fd());
        h.created(0, 1);
        h.created(0, 2);
        let child = 7;
        h.tie(child, fd());
        h.share(0, child, Some(&[2, 9])).expect("a share may come after the tie");
        h.created(child, 3);
        let (pidfd, unheld) = h.remove(child);
        assert!(pidfd.is_some());
        assert_eq!(unheld, vec![3], "slot 2 is still the parent's; 9 was never the parent's");
        let (_, mut unheld) = h.remove(0);
        unheld.sort_unstable();
        assert_eq!(unheld, vec![1, 2]);
        assert!(!h.any_process());
    }

    #[test]
    fn thousands_of_processes_have_their_own_ids_and_are_freed() {
        let mut h = Holders::new(fd());
        h.created(0, 0);
        let ids: Vec<u32> = (1..=10_000).collect();
        for &id in &ids {
            h.share(0, id, None).expect("share");
            h.tie(id, fd());
        }
        assert_eq!(h.pending, 0);
        assert!(!h.closed(0, 0), "10,000 children hold it still");
        for id in &ids[..9_999] {
            assert!(h.remove(*id).1.is_empty());
        }
        assert_eq!(h.remove(ids[9_999]).1, vec![0], "the last holder out closes the socket");
        assert_eq!(h.by_id.len(), 1, "only the attaching process is left");
        assert!(h.refs.is_empty());
    }

    #[test]
    fn an_exported_table_imports_the_same() {
        let mut h = Holders::new(fd());
        h.created(0, 1);
        h.share(0, 3, None).expect("share");
        h.created(0, 2);
        let copy = Holders::import(h.export().map(|(id, p, s)| (id, p.map(|p| p.try_clone().unwrap()), s)));
        assert_eq!(copy.pending, 1, "holder 3 has no process yet");
        assert_eq!(copy.refs, h.refs);
        let mut copy = copy;
        assert!(!copy.closed(0, 1), "holder 3 holds slot 1 too");
        assert!(copy.closed(3, 1));
        assert!(copy.closed(0, 2));
    }

    #[test]
    fn untied_holders_are_bounded() {
        let mut h = Holders::new(fd());
        for id in 1..=MAX_PENDING as u32 {
            h.share(0, id, None).expect("share");
        }
        assert_eq!(h.share(0, u32::MAX, None), Err(libc::EAGAIN));
        assert_eq!(h.share(0, 1, None), Ok(()), "an existing holder may get more");
        h.remove(1);
        assert_eq!(h.share(0, u32::MAX, None), Ok(()), "a removed one makes room");
        assert_eq!(h.share(0, 0, None), Err(libc::EINVAL));
    }
}
