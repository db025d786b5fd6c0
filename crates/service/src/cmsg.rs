//! Ancillary data of a receive (recvmsg's control messages and flags), handed back to the guest
//! after the data in the nqe's buffer (ABI.md, Op::Recv with RECV_CONTROL).

use crate::colocated::Stamp;
use crate::stack::{Errno, Stack};
use netkernel_abi::validate::{Call, Request};
use netkernel_abi::RecvControl;
use netkernel_ring::region::Region;

const HEADER: u32 = std::mem::size_of::<RecvControl>() as u32;

/// Where a Recv that asks for ancillary data has it written: header, then the control space.
pub(crate) struct Area<'a> {
    header: *mut u8,
    /// The caller's control buffer, as large as theirs (the kernel truncates to it).
    pub space: &'a mut [u8],
}

/// The control messages of a Send that carries some (validate() checked they lie in the pool).
pub(crate) fn sent<'a>(region: &'a Region, req: &Request) -> &'a [u8] {
    let Call::Send { buf, control: Some(len), .. } = req.call else {
        return &[];
    };
    if len == 0 {
        return &[];
    }
    let p = region.pool_ptr(buf.off() + buf.len() as u64, len);
    // SAFETY: validate() put [p, +len) inside the pool of a region that outlives the request;
    // the stack copies the bytes before parsing them.
    unsafe { std::slice::from_raw_parts(p, len as usize) }
}

/// The control area of a Recv that asked for one (validate() checked it lies in the pool).
pub(crate) fn area<'a>(region: &'a Region, req: &Request) -> Option<Area<'a>> {
    let Call::Recv { buf, control: Some(cap), .. } = req.call else {
        return None;
    };
    let header = region.pool_ptr(buf.off() + buf.len() as u64, HEADER + cap);
    // SAFETY: validate() put [header, +HEADER+cap) inside the pool of a region that outlives
    // the request; the guest may write the bytes concurrently, which only spoils its own answer.
    let space = unsafe { std::slice::from_raw_parts_mut(header.add(HEADER as usize), cap as usize) };
    Some(Area { header, space })
}

impl Area<'_> {
    /// Records recvmsg's msg_controllen and msg_flags for the guest.
    pub fn finish(&self, len: usize, flags: i32) {
        let h = RecvControl { len: len.min(self.space.len()) as u32, flags: flags as u32 };
        // SAFETY: header has room for a RecvControl (see area()); the pool gives no alignment.
        unsafe { std::ptr::write_unaligned(self.header.cast::<RecvControl>(), h) };
    }
}

/// A receive on the stack, with the ancillary data when the guest asked for it.
pub(crate) fn recv<S: Stack>(
    stack: &mut S,
    fd: &S::Handle,
    buf: &mut [u8],
    flags: i32,
    from: &mut [u8],
    area: Option<Area>,
) -> Result<(usize, usize), Errno> {
    let Some(area) = area else {
        return stack.recv(fd, buf, flags, from);
    };
    let r = stack.recvmsg(fd, buf, flags, from, area.space)?;
    area.finish(r.control_len, r.flags);
    Ok((r.len, r.from_len))
}

/// The ancillary data of a receive on a co-located socket: a TCP socket gives only the
/// timestamp it asked for. The pipe keeps no arrival times; bytes arrive as they are sent,
/// so the time of the receive stands for it.
pub(crate) fn colocated(area: Area, stamp: Stamp, flags: i32) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (len, more) = match stamp {
        Stamp::None => (0, 0),
        Stamp::Micro => {
            let tv = libc::timeval { tv_sec: now.as_secs() as _, tv_usec: now.subsec_micros() as _ };
            crate::stack::put_cmsg(area.space, libc::SOL_SOCKET, libc::SCM_TIMESTAMP, as_bytes(&tv))
        }
        Stamp::Nano => {
            let ts = libc::timespec { tv_sec: now.as_secs() as _, tv_nsec: now.subsec_nanos() as _ };
            crate::stack::put_cmsg(area.space, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, as_bytes(&ts))
        }
    };
    area.finish(len, flags | more);
}

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: timeval and timespec are plain integers without padding.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}
