//! The interposed libc functions, by what they do. Each starts with one load from the fd table
//! (`lookup`) and hands an fd GuestLib does not own to the next libc definition.

mod conn;
mod data;
mod fdctl;
mod fortify;
mod names;
mod process;
mod ready;

// What GuestLib's own stdio cookies call: the hooks themselves.
pub(crate) use conn::close;
pub(crate) use data::{read, write};
