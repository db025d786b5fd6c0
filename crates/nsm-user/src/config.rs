//! What a user NSM is told: its link, its addresses, its gateways and its congestion control.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// How the NSM's one fd reaches the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A TAP device opened with IFF_TAP|IFF_NO_PI: one Ethernet frame per read/write.
    Tap,
    /// An AF_PACKET SOCK_RAW socket bound to an interface (a veth end): one frame per recv/send.
    Packet,
}

impl FromStr for Link {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Link, ConfigError> {
        match s {
            "tap" => Ok(Link::Tap),
            "packet" | "af_packet" => Ok(Link::Packet),
            _ => Err(ConfigError(format!("link {s:?}: expected \"tap\" or \"packet\""))),
        }
    }
}

/// A configuration value a user can fix; the message names the value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The user stack's configuration (`[[nsm]] kind = "user"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub link: Link,
    /// The IPv4 address and prefix length, e.g. 10.77.0.2/24.
    pub address: (IpAddr, u8),
    pub address6: Option<(IpAddr, u8)>,
    pub gateway: IpAddr,
    pub gateway6: Option<IpAddr>,
    /// "reno", "cubic" or "none"; None means the default, reno (Linux's default is cubic, but
    /// smoltcp's cubic does not slow-start after idle as Linux does, so reno is the safer bet).
    pub congestion: Option<String>,
}

impl UserConfig {
    /// The issue's defaults: a TAP link, 10.77.0.2/24 via 10.77.0.1, no IPv6.
    pub fn default_tap() -> UserConfig {
        UserConfig {
            link: Link::Tap,
            address: (IpAddr::from([10, 77, 0, 2]), 24),
            address6: None,
            gateway: IpAddr::from([10, 77, 0, 1]),
            gateway6: None,
            congestion: None,
        }
    }

    /// Builds a configuration from the strings an operator writes, checking that the pieces
    /// fit together (families, gateway on the subnet).
    pub fn parse(
        link: &str,
        address: &str,
        address6: Option<&str>,
        gateway: &str,
        gateway6: Option<&str>,
        congestion: Option<&str>,
    ) -> Result<UserConfig, ConfigError> {
        let cfg = UserConfig {
            link: link.parse()?,
            address: parse_cidr(address, "address")?,
            address6: address6.map(|a| parse_cidr(a, "address6")).transpose()?,
            gateway: parse_addr(gateway, "gateway")?,
            gateway6: gateway6.map(|g| parse_addr(g, "gateway6")).transpose()?,
            congestion: congestion.map(str::to_owned),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what `parse` checks, for a configuration built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (a, p) = self.address;
        if !a.is_ipv4() {
            return Err(ConfigError(format!("address {a}: must be IPv4 (put IPv6 in address6)")));
        }
        if p == 0 || p > 32 {
            return Err(ConfigError(format!("address {a}/{p}: prefix must be 1..=32")));
        }
        if !self.gateway.is_ipv4() {
            return Err(ConfigError(format!("gateway {}: must be IPv4 (put IPv6 in gateway6)", self.gateway)));
        }
        if !same_subnet(a, self.gateway, p) {
            return Err(ConfigError(format!("gateway {}: not on the subnet of address {a}/{p}", self.gateway)));
        }
        if self.gateway == a {
            return Err(ConfigError(format!("gateway {}: is the stack's own address", self.gateway)));
        }
        if let Some((a6, p6)) = self.address6 {
            if !a6.is_ipv6() {
                return Err(ConfigError(format!("address6 {a6}: must be IPv6")));
            }
            if p6 == 0 || p6 > 128 {
                return Err(ConfigError(format!("address6 {a6}/{p6}: prefix must be 1..=128")));
            }
            if let Some(g6) = self.gateway6 {
                if !g6.is_ipv6() {
                    return Err(ConfigError(format!("gateway6 {g6}: must be IPv6")));
                }
            }
        } else if self.gateway6.is_some() {
            return Err(ConfigError("gateway6 given without address6".into()));
        }
        crate::stack::parse_congestion(self.congestion.as_deref()).map(|_| ())
    }
}

/// Parses "10.77.0.2/24" or "fd77::2/64".
pub fn parse_cidr(s: &str, what: &str) -> Result<(IpAddr, u8), ConfigError> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| ConfigError(format!("{what} {s:?}: expected ADDRESS/PREFIX, e.g. 10.77.0.2/24")))?;
    let addr = parse_addr(addr, what)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| ConfigError(format!("{what} {s:?}: prefix must be a number 1..={max}")))?;
    Ok((addr, prefix))
}

/// Parses one address, naming the setting in the error.
pub fn parse_addr(s: &str, what: &str) -> Result<IpAddr, ConfigError> {
    s.trim().parse().map_err(|_| ConfigError(format!("{what} {s:?}: not an IP address")))
}

fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_defaults() {
        let c = UserConfig::parse("tap", "10.77.0.2/24", None, "10.77.0.1", None, None).unwrap();
        assert_eq!(c, UserConfig::default_tap());
    }

    #[test]
    fn errors_say_what_to_fix() {
        let e = UserConfig::parse("tap", "10.77.0.2", None, "10.77.0.1", None, None).unwrap_err();
        assert!(e.0.contains("ADDRESS/PREFIX"), "{e}");
        let e = UserConfig::parse("tap", "10.77.0.2/33", None, "10.77.0.1", None, None).unwrap_err();
        assert!(e.0.contains("1..=32"), "{e}");
        let e = UserConfig::parse("tap", "10.77.0.2/24", None, "10.78.0.1", None, None).unwrap_err();
        assert!(e.0.contains("not on the subnet"), "{e}");
        let e = UserConfig::parse("wire", "10.77.0.2/24", None, "10.77.0.1", None, None).unwrap_err();
        assert!(e.0.contains("\"tap\" or \"packet\""), "{e}");
        let e = UserConfig::parse("tap", "10.77.0.2/24", None, "10.77.0.1", None, Some("bbr")).unwrap_err();
        assert!(e.0.contains("reno"), "{e}");
        let e = UserConfig::parse("tap", "10.77.0.2/24", Some("10.1.1.1/24"), "10.77.0.1", None, None).unwrap_err();
        assert!(e.0.contains("must be IPv6"), "{e}");
        let ok = UserConfig::parse(
            "packet",
            "10.77.0.2/24",
            Some("fd77::2/64"),
            "10.77.0.1",
            Some("fd77::1"),
            Some("cubic"),
        );
        assert!(ok.is_ok());
    }
}
