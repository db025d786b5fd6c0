//! A network namespace of an NSM's own, joined to the host by a veth pair (DESIGN.md D3): the
//! NSM's sockets, routes and sysctls are its own; the host reaches it at `nsm_addr`.

use std::net::Ipv4Addr;
use std::process::Command;

/// A namespace the engine made, removed (with its veth) when dropped. Recorded in the engine's
/// state directory, so that an engine adopting the NSM knows it (and removes it at shutdown).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct NsmNet {
    pub name: String,
    pub host_addr: Ipv4Addr,
    pub nsm_addr: Ipv4Addr,
    /// The NSM's end of the veth.
    ns_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The namespace and veth ends of NSM number `index`, named for this engine so that engines
/// side by side (tests run several) do not collide.
fn names(nsm: &str, index: usize) -> (String, String, String) {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } % 100_000;
    (format!("nk-{nsm}-{pid}"), format!("nkh{index}p{pid}"), format!("nkn{index}p{pid}"))
}

impl NsmNet {
    /// Creates namespace `nk-NSM-PID` and a veth pair on a 10.213.X.0/24: the host side .1,
    /// the NSM's side .2 with a default route through the host. Needs root.
    pub fn create(nsm: &str, index: usize) -> Result<NsmNet, String> {
        // SAFETY: no arguments, no memory touched; getuid and getpid cannot fail.
        let (uid, pid) = unsafe { (libc::getuid(), libc::getpid()) };
        if uid != 0 {
            return Err("a network namespace of its own needs the engine to run as root".into());
        }
        let (name, host_if, ns_if) = names(nsm, index);
        // Engines on one host (tests run several) take different subnets.
        let subnet = ((pid as usize % 31) * 8 + index % 8) as u8;
        let host_addr = Ipv4Addr::new(10, 213, subnet, 1);
        let nsm_addr = Ipv4Addr::new(10, 213, subnet, 2);
        let net = NsmNet { name: name.clone(), host_addr, nsm_addr, ns_if: ns_if.clone() };
        ip(&["netns", "add", &name])?;
        let steps: [Vec<String>; 8] = [
            vec![
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_if.clone(),
            ],
            vec!["link".into(), "set".into(), ns_if.clone(), "netns".into(), name.clone()],
            vec!["addr".into(), "add".into(), format!("{host_addr}/24"), "dev".into(), host_if.clone()],
            vec!["link".into(), "set".into(), host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{nsm_addr}/24"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec!["-n".into(), name.clone(), "link".into(), "set".into(), ns_if.clone(), "up".into()],
            vec!["-n".into(), name.clone(), "link".into(), "set".into(), "lo".into(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "route".into(),
                "add".into(),
                "default".into(),
                "via".into(),
                host_addr.to_string(),
            ],
        ];
        for s in &steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            ip(&args)?;
        }
        Ok(net)
    }

    /// A user NSM's namespace (`link = "veth"`): the veth's host end gets the gateway address,
    /// its NSM end is up with no address (the NSM's own stack owns the address, on an AF_PACKET
    /// socket), and loopback is up. Needs root.
    pub fn create_for_user(nsm: &str, index: usize, link: &crate::link::UserLink) -> Result<NsmNet, String> {
        let (name, host_if, ns_if) = names(nsm, index);
        let (std::net::IpAddr::V4(nsm_addr), std::net::IpAddr::V4(host_addr)) =
            (link.config.address.0, link.config.gateway)
        else {
            return Err("a user NSM's address and gateway are IPv4 (IPv6 goes in address6, gateway6)".into());
        };
        let net = NsmNet { name: name.clone(), host_addr, nsm_addr, ns_if: ns_if.clone() };
        ip(&["netns", "add", &name])?;
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        link.host_side(&host_if)?;
        ip(&["-n", &name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// The NSM's end of the veth (inside its namespace).
    pub fn nsm_if(&self) -> &str {
        &self.ns_if
    }

    /// An address in the namespace's subnet for tenant number `i` (its source address).
    pub fn tenant_addr(&self, i: usize) -> Ipv4Addr {
        let o = self.nsm_addr.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 10 + (i % 200) as u8)
    }

    /// Adds a tenant's address to the NSM's side of the veth.
    pub fn add_addr(&self, a: Ipv4Addr) -> Result<(), String> {
        ip(&["-n", &self.name, "addr", "add", &format!("{a}/24"), "dev", &self.ns_if])
    }

    /// Shapes the NSM's egress to `bits` per second with HTB. With `fair`, each tenant (by its
    /// source address) gets a class whose guaranteed rate is its weight's share and which may
    /// borrow up to the whole link: fairness between tenants, not between flows. Without, all
    /// traffic shares one class, so a tenant with more flows gets more.
    pub fn shape(&self, bits: u64, fair: bool, tenants: &[(Ipv4Addr, u32)]) -> Result<(), String> {
        let tc = |args: &[&str]| -> Result<(), String> {
            let mut full = vec!["-n", self.name.as_str()];
            full.extend_from_slice(args);
            let out = Command::new("tc").args(&full).output().map_err(|e| format!("running tc: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("tc {}: {}", full.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        let dev = self.ns_if.as_str();
        let rate = format!("{bits}bit");
        tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "999", "r2q", "1000"])?;
        tc(&["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate, "ceil", &rate])?;
        let total: u64 = tenants.iter().map(|(_, w)| *w as u64).sum::<u64>().max(1);
        let default_rate = if fair { format!("{}bit", (bits / 100).max(8000)) } else { rate.clone() };
        tc(&[
            "class",
            "add",
            "dev",
            dev,
            "parent",
            "1:1",
            "classid",
            "1:999",
            "htb",
            "rate",
            &default_rate,
            "ceil",
            &rate,
        ])?;
        if fair {
            for (i, (addr, w)) in tenants.iter().enumerate() {
                let class = format!("1:{}", 10 + i);
                let share = format!("{}bit", (bits * *w as u64 / total).max(8000));
                tc(&[
                    "class", "add", "dev", dev, "parent", "1:1", "classid", &class, "htb", "rate", &share, "ceil",
                    &rate,
                ])?;
                let src = format!("{addr}/32");
                tc(&[
                    "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
                    "src", &src, "flowid", &class,
                ])?;
            }
        }
        Ok(())
    }

    /// The namespace's file, to setns(2) into.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl NsmNet {
    /// Removes the namespace (and with it the veth pair); also done on drop.
    pub fn remove(&self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

impl Drop for NsmNet {
    fn drop(&mut self) {
        self.remove();
    }
}
