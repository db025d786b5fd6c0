//! A network namespace of an NSM's own, joined to the host by a veth pair (DESIGN.md D3): the
//! NSM's sockets, routes and sysctls are its own; the host reaches it at `nsm_addr`.

use std::net::Ipv4Addr;
use std::process::Command;

/// A namespace the engine made, removed (with its veth) when dropped.
pub struct NsmNet {
    pub name: String,
    pub host_addr: Ipv4Addr,
    pub nsm_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NsmNet {
    /// Creates namespace `nk-NSM-PID` and a veth pair on a 10.213.X.0/24: the host side .1,
    /// the NSM's side .2 with a default route through the host. Needs root.
    pub fn create(nsm: &str, index: usize) -> Result<NsmNet, String> {
        // SAFETY: getuid and getpid cannot fail.
        let (uid, pid) = unsafe { (libc::getuid(), libc::getpid()) };
        if uid != 0 {
            return Err("a network namespace of its own needs the engine to run as root".into());
        }
        let name = format!("nk-{nsm}-{pid}");
        let (host_if, ns_if) = (format!("nkh{index}p{}", pid % 100_000), format!("nkn{index}p{}", pid % 100_000));
        // Engines on one host (tests run several) take different subnets.
        let subnet = ((pid as usize % 31) * 8 + index % 8) as u8;
        let host_addr = Ipv4Addr::new(10, 213, subnet, 1);
        let nsm_addr = Ipv4Addr::new(10, 213, subnet, 2);
        let net = NsmNet { name: name.clone(), host_addr, nsm_addr };
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
