//! Cross-process plumbing shared by GuestLib and ServiceLib: the job queue (an SPSC ring of nqe
//! indices living in a region), region creation and mapping, and the doorbells (futex and
//! eventfd) used to sleep when idle (DESIGN.md D5).
//!
//! Nothing here calls a libc function that GuestLib interposes (read, write, close, ...):
//! system calls go through `libc::syscall`, so this crate is safe to use inside the preload
//! library without re-entering it.

pub mod doorbell;
pub mod frame;
pub mod nqes;
pub mod spsc;

#[cfg(not(loom))]
pub mod region;
#[cfg(not(loom))]
pub mod sys;
