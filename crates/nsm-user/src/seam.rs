//! ServiceLib's `Stack` seam, which this stack implements.

pub use netkernel_service::stack::*;
