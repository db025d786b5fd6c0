//! The link of a userspace NSM (`kind = "user"`): the most basic NIC a host can give a process
//! (the Machnet "least common denominator" model), on which the NSM runs TCP/IP itself.
//!
//! - `link = "tap"` (the default): a TAP device the engine creates in the host's namespace with
//!   the gateway address, so the host answers at the gateway and routes to the NSM's address.
//!   The NSM gets only the device's fd, in a network namespace of its own with nothing in it.
//! - `link = "veth"`: a veth pair, the gateway on the host's end, the other end up but without an
//!   address in a namespace the engine makes for the NSM, which opens an AF_PACKET socket on it.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

/// An address with its prefix length ("10.77.0.2/24").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?}: want ADDRESS/PREFIX, e.g. 10.77.0.2/24"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|&p| p > 0 && p < max)
            .ok_or_else(|| format!("{p:?} is not a prefix length for {addr} (1 to {})", max - 1))?;
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this network (same family, same first `prefix` bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        a >> shift == b >> shift
    }
}

/// The device a user NSM's frames cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Medium {
    Tap,
    Veth,
}

/// How the userspace NSM reaches the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLink {
    pub medium: Medium,
    /// The NSM's address and subnet.
    pub address: Cidr,
    /// The host's address on the link, the NSM's default route.
    pub gateway: Ipv4Addr,
    pub address6: Option<Cidr>,
    pub gateway6: Option<Ipv6Addr>,
}

/// The device fd the NSM gets, as `--device-fd`.
pub const DEVICE_FD: i32 = 4;

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl UserLink {
    /// The NSM's arguments for this link's addresses.
    pub fn nsm_args(&self) -> Vec<String> {
        let medium = if self.medium == Medium::Tap { "tap" } else { "veth" };
        let mut v = vec!["--link".into(), medium.into(), "--address".into(), self.address.to_string()];
        v.extend(["--gateway".into(), self.gateway.to_string()]);
        if let Some(a) = self.address6 {
            v.extend(["--address6".into(), a.to_string()]);
        }
        if let Some(g) = self.gateway6 {
            v.extend(["--gateway6".into(), g.to_string()]);
        }
        v
    }

    /// Creates TAP device `name` in this (the host's) namespace with the gateway address and
    /// returns its fd. The device lives as long as an fd to it: when the NSM exits, it goes.
    pub fn open_tap(&self, name: &str) -> Result<OwnedFd, String> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(format!("device name {name:?} is too long"));
        }
        // SAFETY: a NUL-terminated path literal; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(format!(
                "/dev/net/tun: {} (a user NSM needs root and the tun module)",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is fresh and ours.
        let tap = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which IfReq lays out (name, flags,
        // padding to the union's 24 bytes), live for the call.
        if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(format!("creating TAP device {name}: {}", std::io::Error::last_os_error()));
        }
        self.host_side(name)?;
        Ok(tap)
    }

    /// Gives the host's end of the link, `dev`, the gateway addresses and brings it up.
    pub fn host_side(&self, dev: &str) -> Result<(), String> {
        run("ip", &["addr", "add", &format!("{}/{}", self.gateway, self.address.prefix), "dev", dev])?;
        if let (Some(g), Some(a)) = (self.gateway6, self.address6) {
            run("ip", &["-6", "addr", "add", &format!("{g}/{}", a.prefix), "dev", dev, "nodad"])?;
        }
        run("ip", &["link", "set", dev, "up"])?;
        // The host routes for the NSM beyond the link (where the host forwards at all).
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), "1");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.77.0.2/24".parse().unwrap();
        assert!(c.contains("10.77.0.1".parse().unwrap()));
        assert!(!c.contains("10.77.1.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let c6: Cidr = "fd77::2/64".parse().unwrap();
        assert!(c6.contains("fd77::1".parse().unwrap()));
        assert!("10.77.0.2".parse::<Cidr>().unwrap_err().contains("ADDRESS/PREFIX"));
        assert!("10.77.0.2/33".parse::<Cidr>().unwrap_err().contains("prefix"));
        assert!("ten/8".parse::<Cidr>().unwrap_err().contains("not an IP address"));
    }
}
