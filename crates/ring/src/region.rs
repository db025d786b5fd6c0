//! A region: the memfd-backed shared memory of one attachment, mapped MAP_SHARED by the engine
//! (which creates and seals it), the NSM and the guest.

use crate::nqes::{NqePool, NqeStates};
use crate::spsc::RingRef;
use crate::sys;
use netkernel_abi::validate::{HeaderSnapshot, NqeSnapshot};
use netkernel_abi::{GuestSock, HeaderError, Layout, Nqe, RegionHeader, RingHeader, Slot, NQE_COUNT, SLOT_COUNT};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU32;

/// Which pages back a region; `ctl status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// 2 MiB hugetlb pages (the system has them reserved).
    Huge2M,
    /// Ordinary 4 KiB pages.
    Normal,
}

impl Backing {
    pub fn as_str(self) -> &'static str {
        match self {
            Backing::Huge2M => "hugetlb-2MiB",
            Backing::Normal => "4KiB",
        }
    }
}

/// Why a region could not be mapped.
#[derive(Debug)]
pub enum MapError {
    Io(io::Error),
    Header(HeaderError),
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapError::Io(e) => write!(f, "mapping region: {e}"),
            MapError::Header(e) => write!(f, "region header: {e}"),
        }
    }
}

impl std::error::Error for MapError {}

/// A mapped region. Dropping it unmaps it (and closes the memfd if this side kept it).
pub struct Region {
    base: *mut u8,
    len: usize,
    layout: Layout,
    fd: Option<RawFd>,
    backing: Backing,
}

// SAFETY: the region is shared memory accessed only through atomics and raw-pointer copies;
// the pointer itself may move between threads.
unsafe impl Send for Region {}
// SAFETY: as above: no `&mut` into the mapping is ever handed out.
unsafe impl Sync for Region {}

fn hugepages_free() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    if field("Hugepagesize:") == 2048 {
        field("HugePages_Free:") * 2 * 1024 * 1024
    } else {
        0
    }
}

fn memfd(huge: bool) -> io::Result<RawFd> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if huge {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"netkernel-region".as_ptr(), flags) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

fn sized_sealed_memfd(huge: bool, len: u64) -> io::Result<RawFd> {
    let fd = memfd(huge)?;
    // SAFETY: fd is ours; ftruncate and fcntl take integers.
    let ok = unsafe {
        libc::ftruncate(fd, len as libc::off_t) == 0
            && libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL) == 0
    };
    if ok {
        Ok(fd)
    } else {
        let e = io::Error::last_os_error();
        sys::close(fd);
        Err(e)
    }
}

impl Region {
    /// Creates, sizes and seals a new region (F_SEAL_SHRINK|F_SEAL_GROW, so no guest can
    /// truncate it under the NSM) and writes its header. Uses hugetlb pages when enough are free.
    pub fn create(attachment_id: u64) -> io::Result<Region> {
        let layout = Layout::standard();
        let (fd, backing) = match (hugepages_free() >= layout.region_size)
            .then(|| sized_sealed_memfd(true, layout.region_size).ok())
            .flatten()
        {
            Some(fd) => (fd, Backing::Huge2M),
            None => (sized_sealed_memfd(false, layout.region_size)?, Backing::Normal),
        };
        let mut r = Self::mmap(fd, layout.region_size as usize, layout, backing)?;
        r.fd = Some(fd);
        // SAFETY: the mapping is fresh, zero-filled, at least a page long, and not yet shared.
        unsafe { (*(r.base as *mut RegionHeader)).init(attachment_id) };
        Ok(r)
    }

    /// Maps a region received over a unix socket and checks its header. Takes ownership of `fd`
    /// only on success when `keep_fd` is set; otherwise the caller still owns it.
    pub fn map(fd: RawFd) -> Result<Region, MapError> {
        // SAFETY: libc::stat is integers only, so all-zero bytes are a valid value (fstat
        // overwrites it).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: &mut st is a live, writable libc::stat for the call; the kernel checks fd.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(MapError::Io(io::Error::last_os_error()));
        }
        let len = st.st_size as u64;
        if len < 4096 {
            return Err(MapError::Header(HeaderError::BadGeometry("memfd smaller than a header")));
        }
        // SAFETY: F_GET_SEALS only reads the fd's seals.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if seals < 0 || seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW {
            return Err(MapError::Header(HeaderError::BadGeometry("memfd is not sealed against resizing")));
        }
        let backing = if st.st_blksize >= 2 * 1024 * 1024 { Backing::Huge2M } else { Backing::Normal };
        let r = Self::mmap(fd, len as usize, Layout::standard(), backing).map_err(MapError::Io)?;
        r.header_snapshot().validate(len).map_err(MapError::Header)?;
        Ok(r)
    }

    /// Maps a region like [`Region::map`] and keeps its memfd (closed with the region): an
    /// engine that adopts a running NSM gets the memfds back from it and needs them as the
    /// engine that created them did.
    pub fn map_owned(fd: std::os::fd::OwnedFd) -> Result<Region, MapError> {
        let mut r = Self::map(fd.as_raw_fd())?;
        r.fd = Some(std::os::fd::IntoRawFd::into_raw_fd(fd));
        Ok(r)
    }

    fn mmap(fd: RawFd, len: usize, layout: Layout, backing: Backing) -> io::Result<Region> {
        // SAFETY: a null hint lets the kernel choose the address, so no mapping of ours is
        // replaced; the memfd's size was checked above to cover len.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region { base: p.cast(), len, layout, fd: None, backing })
    }

    /// The memfd, when this side created the region.
    pub fn fd(&self) -> Option<RawFd> {
        self.fd
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn header(&self) -> &RegionHeader {
        // SAFETY: the header sits at offset 0 of a mapping at least a page long; its shared
        // mutable fields are atomics.
        unsafe { &*(self.base as *const RegionHeader) }
    }

    /// The header's geometry fields, each read once: the guest can rewrite them at any time.
    pub fn header_snapshot(&self) -> HeaderSnapshot {
        let h = self.base as *const RegionHeader;
        // SAFETY: the header sits at offset 0 of a mapping at least a page long (map checked
        // the memfd's size); volatile reads of plain integers, whatever the guest wrote there.
        unsafe {
            HeaderSnapshot {
                magic: std::ptr::read_volatile(&(*h).magic),
                abi_version: std::ptr::read_volatile(&(*h).abi_version),
                header_size: std::ptr::read_volatile(&(*h).header_size),
                region_size: std::ptr::read_volatile(&(*h).region_size),
                nqe_count: std::ptr::read_volatile(&(*h).nqe_count),
                nqe_size: std::ptr::read_volatile(&(*h).nqe_size),
                slot_count: std::ptr::read_volatile(&(*h).slot_count),
                buf_size: std::ptr::read_volatile(&(*h).buf_size),
                ring_off: std::ptr::read_volatile(&(*h).ring_off),
                nqe_off: std::ptr::read_volatile(&(*h).nqe_off),
                slot_off: std::ptr::read_volatile(&(*h).slot_off),
                guest_off: std::ptr::read_volatile(&(*h).guest_off),
                pool_off: std::ptr::read_volatile(&(*h).pool_off),
                pool_size: std::ptr::read_volatile(&(*h).pool_size),
            }
        }
    }

    /// The job queue (guest -> NSM).
    pub fn ring(&self) -> RingRef<'_> {
        // SAFETY: ring_off and the entries that follow lie inside the mapping (Layout is
        // checked at compile time to fit); all fields are atomics.
        unsafe {
            let h = &*(self.base.add(self.layout.ring_off as usize) as *const RingHeader);
            let e =
                self.base.add(self.layout.ring_off as usize + std::mem::size_of::<RingHeader>()) as *const AtomicU32;
            RingRef { head: &h.head, tail: &h.tail, entries: std::slice::from_raw_parts(e, NQE_COUNT as usize) }
        }
    }

    /// Raw pointer to nqe `i` (`i < NQE_COUNT`). Its non-atomic fields may change under the
    /// reader at any time: copy them out with volatile reads before trusting them.
    pub fn nqe(&self, i: u32) -> *mut Nqe {
        assert!(i < NQE_COUNT);
        // SAFETY: in bounds of the nqe table, which lies inside the mapping.
        unsafe { self.base.add(self.layout.nqe_off as usize).cast::<Nqe>().add(i as usize) }
    }

    /// The request fields of nqe `i` (`i < NQE_COUNT`), each read once: the guest may change
    /// them while they are read, so the copy is what gets validated and used.
    pub fn nqe_snapshot(&self, i: u32) -> NqeSnapshot {
        let p = self.nqe(i);
        // SAFETY: `nqe` returns an in-bounds, aligned pointer into the mapping; volatile reads
        // of plain integers and bytes, any value of which is representable.
        unsafe {
            NqeSnapshot {
                op: std::ptr::read_volatile(&(*p).op),
                sock: std::ptr::read_volatile(&(*p).sock),
                flags: std::ptr::read_volatile(&(*p).flags),
                arg0: std::ptr::read_volatile(&(*p).arg0),
                arg1: std::ptr::read_volatile(&(*p).arg1),
                buf_off: std::ptr::read_volatile(&(*p).buf_off),
                buf_len: std::ptr::read_volatile(&(*p).buf_len),
                addr_len: std::ptr::read_volatile(&(*p).addr_len),
                addr: std::ptr::read_volatile(&(*p).addr),
                holder: std::ptr::read_volatile(&(*p).holder),
            }
        }
    }

    /// The state word of nqe `i`.
    pub fn nqe_state(&self, i: u32) -> &AtomicU32 {
        // SAFETY: `nqe` returns an in-bounds, aligned pointer; `state` is an atomic.
        unsafe { &(*self.nqe(i)).state }
    }

    /// The guest's free and asynchronous nqe bitmaps, with the nqes' state words.
    pub fn nqe_pool(&self) -> NqePool<'_, Region> {
        let h = self.header();
        NqePool { free: &h.guest_free_nqes, pending: &h.guest_async_nqes, states: self, sleepers: &h.guest_nqe_waiters }
    }

    /// Readiness slot `i` (`i < SLOT_COUNT`).
    pub fn slot(&self, i: u32) -> &Slot {
        assert!(i < SLOT_COUNT);
        // SAFETY: in bounds of the slot table; all fields are atomics.
        unsafe { &*self.base.add(self.layout.slot_off as usize).cast::<Slot>().add(i as usize) }
    }

    /// The guest's own state of socket `i` (`i < SLOT_COUNT`); only GuestLib uses it.
    pub fn guest_sock(&self, i: u32) -> &GuestSock {
        assert!(i < SLOT_COUNT);
        // SAFETY: in bounds of the guest table; all fields are atomics.
        unsafe { &*self.base.add(self.layout.guest_off as usize).cast::<GuestSock>().add(i as usize) }
    }

    /// Pointer to `[off, off+len)`, which the caller has checked lies in the buffer pool.
    pub fn pool_ptr(&self, off: u64, len: u32) -> *mut u8 {
        assert!(self.layout.pool_contains(off, len));
        // SAFETY: checked to lie inside the pool, which lies inside the mapping.
        unsafe { self.base.add(off as usize) }
    }

    /// Declares the region dead (its NSM died or refused the guest): every submitted nqe
    /// completes with ECONNRESET and every sleeper is woken, so no guest thread hangs. Changing
    /// the futex words before waking closes the race with a thread about to sleep.
    pub fn mark_dead(&self, guest_bell: Option<RawFd>) {
        use netkernel_abi::nqe_state;
        use std::sync::atomic::Ordering;
        self.header().state.store(netkernel_abi::STATE_DEAD, Ordering::SeqCst);
        for i in 0..NQE_COUNT {
            let st = self.nqe_state(i);
            if st.load(Ordering::Acquire) & nqe_state::SUBMITTED != 0 {
                // SAFETY: nqe(i) is in bounds; the guest reads `result` only after DONE.
                unsafe { std::ptr::write_volatile(&mut (*self.nqe(i)).result, -(libc::ECONNRESET as i64)) };
                st.store(nqe_state::DONE, Ordering::Release);
            }
            sys::futex_wake(st);
        }
        for i in 0..SLOT_COUNT {
            let slot = self.slot(i);
            slot.mask.fetch_or((libc::POLLERR | libc::POLLHUP) as u32, Ordering::Release);
            slot.seq.fetch_add(1, Ordering::Release);
            std::sync::atomic::fence(Ordering::SeqCst);
            if slot.waiters.load(Ordering::Acquire) != 0 {
                sys::futex_wake(&slot.seq);
            }
        }
        // Threads waiting for a free nqe look at the state too.
        self.header().guest_nqe_freed.fetch_add(1, Ordering::SeqCst);
        sys::futex_wake(&self.header().guest_nqe_freed);
        if let Some(fd) = guest_bell {
            sys::ring_bell(fd);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl NqeStates for Region {
    fn state(&self, i: u32) -> &AtomicU32 {
        self.nqe_state(i)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/len describe a mapping this value created and nobody else unmaps.
        unsafe { libc::munmap(self.base.cast(), self.len) };
        if let Some(fd) = self.fd {
            sys::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Region-creating tests run one at a time: the hugepage test changes which pages new
    /// regions get.
    pub(super) static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn create_then_map_shares_memory() {
        let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let a = Region::create(7).unwrap();
        let b = Region::map(a.fd().unwrap()).unwrap();
        assert_eq!(b.header().attachment_id, 7);
        a.slot(3).seq.store(42, Ordering::Release);
        assert_eq!(b.slot(3).seq.load(Ordering::Acquire), 42);
        a.ring().push(5).unwrap();
        let mut c = crate::spsc::Consumer::new(b.ring());
        assert_eq!(c.pop(), Ok(Some(5)));
    }

    #[test]
    fn sealed_region_cannot_shrink() {
        let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let a = Region::create(1).unwrap();
        // SAFETY: integers only, no memory is passed; the kernel checks the fd (and must refuse
        // because of the seal).
        let r = unsafe { libc::ftruncate(a.fd().unwrap(), 4096) };
        assert_eq!(r, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn unsealed_or_foreign_memfd_is_refused() {
        let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let fd = memfd(false).unwrap();
        // SAFETY: integers only, no memory is passed; fd is the memfd this test created.
        unsafe { libc::ftruncate(fd, Layout::standard().region_size as i64) };
        assert!(matches!(Region::map(fd), Err(MapError::Header(_))));
        sys::close(fd);
        let fd = sized_sealed_memfd(false, Layout::standard().region_size).unwrap();
        assert!(matches!(Region::map(fd), Err(MapError::Header(HeaderError::BadMagic(0)))));
        sys::close(fd);
    }
}

#[cfg(test)]
mod hugetlb_tests {
    use super::*;

    /// With 2 MiB pages reserved, regions use them; without, they fall back to 4 KiB pages.
    #[test]
    fn regions_use_reserved_hugepages() {
        let _serial = super::tests::LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: no arguments, no memory touched; getuid cannot fail.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("SKIP regions_use_reserved_hugepages: reserving hugepages needs root");
            return;
        }
        let knob = "/proc/sys/vm/nr_hugepages";
        let Ok(before) = std::fs::read_to_string(knob) else {
            eprintln!("SKIP regions_use_reserved_hugepages: no {knob}");
            return;
        };
        let pages = Layout::standard().region_size / (2 << 20);
        let want = before.trim().parse::<u64>().unwrap_or(0) + pages;
        if std::fs::write(knob, want.to_string()).is_err() || hugepages_free() < Layout::standard().region_size {
            let _ = std::fs::write(knob, before.trim());
            eprintln!("SKIP regions_use_reserved_hugepages: the kernel could not reserve {pages} hugepages");
            return;
        }
        let r = Region::create(9);
        let backing = r.as_ref().map(|r| r.backing()).map_err(|e| e.to_string());
        let mapped =
            r.as_ref().ok().map(|r| Region::map(r.fd().unwrap()).map(|m| m.backing()).map_err(|e| e.to_string()));
        drop(r);
        let _ = std::fs::write(knob, before.trim());
        assert_eq!(backing.unwrap(), Backing::Huge2M);
        assert_eq!(mapped.unwrap().unwrap(), Backing::Huge2M);
    }
}
