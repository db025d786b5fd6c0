//! The link of a userspace NSM (`kind = "user"`): the most basic NIC a host can give a process
//! (the Machnet "least common denominator" model), on which the NSM runs TCP/IP itself.
//!
//! - `link = "tap"` (the default): a TAP device the engine creates in the host's namespace with
//!   the gateway address, so the host answers at the gateway and routes to the NSM's address.
//!   The NSM gets only the device's fd, in a network namespace of its own with nothing in it.
//! - `link = "veth"`: a veth pair, the gateway on the host's end, the other end up but without an
//!   address in a namespace the engine makes for the NSM, which opens an AF_PACKET socket on it.

pub use netkernel_nsm_user::UserConfig;
use std::os::fd::OwnedFd;
use std::process::Command;

/// The device a user NSM's frames cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    Tap,
    Veth,
}

/// How the userspace NSM reaches the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserLink {
    pub medium: Medium,
    /// Addresses, gateways and congestion control, as the user stack checked them.
    pub config: UserConfig,
    /// Where its DNS queries go (empty: /etc/resolv.conf's nameservers).
    pub nameservers: Vec<std::net::IpAddr>,
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

impl UserLink {
    /// The NSM's arguments for this link's addresses.
    pub fn nsm_args(&self) -> Vec<String> {
        let c = &self.config;
        let medium = if self.medium == Medium::Tap { "tap" } else { "packet" };
        let mut v =
            vec!["--link".into(), medium.into(), "--address".into(), format!("{}/{}", c.address.0, c.address.1)];
        v.extend(["--gateway".into(), c.gateway.to_string()]);
        if let Some((a, p)) = c.address6 {
            v.extend(["--address6".into(), format!("{a}/{p}")]);
        }
        if let Some(g) = c.gateway6 {
            v.extend(["--gateway6".into(), g.to_string()]);
        }
        for ns in &self.nameservers {
            v.extend(["--nameserver".into(), ns.to_string()]);
        }
        v
    }

    /// Creates TAP device `name` in this (the host's) namespace with the gateway address and
    /// returns its fd. The device lives as long as an fd to it: when the NSM exits, it goes.
    pub fn open_tap(&self, name: &str) -> Result<OwnedFd, String> {
        let tap = netkernel_nsm_user::open_tap(name)
            .map_err(|e| format!("creating TAP device {name}: {e} (a user NSM needs root and /dev/net/tun)"))?;
        self.host_side(name)?;
        Ok(tap)
    }

    /// Gives the host's end of the link, `dev`, the gateway addresses and brings it up.
    pub fn host_side(&self, dev: &str) -> Result<(), String> {
        let c = &self.config;
        run("ip", &["addr", "add", &format!("{}/{}", c.gateway, c.address.1), "dev", dev])?;
        if let (Some(g), Some((_, prefix))) = (c.gateway6, c.address6) {
            run("ip", &["-6", "addr", "add", &format!("{g}/{prefix}"), "dev", dev, "nodad"])?;
        }
        run("ip", &["link", "set", dev, "up"])?;
        // The host routes for the NSM beyond the link (where the host forwards at all).
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), "1");
        Ok(())
    }
}
