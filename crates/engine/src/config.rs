//! The engine's TOML configuration. Every error names the file, the line and the field.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or does not fit the schema, or a value is wrong.
    #[error("{path}:{line}: {field}: {message}")]
    Invalid { path: PathBuf, line: usize, field: String, message: String },
}

fn yes() -> bool {
    true
}

fn default_kind() -> String {
    "kernel".into()
}

/// One NSM the engine runs and supervises.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsmConfig {
    pub name: Spanned<String>,
    /// The stack: "kernel" (Linux TCP in the NSM's network namespace) or "user" (a TCP/IP
    /// stack inside the NSM process on a TAP device).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// A user NSM's link: "tap" (the default) or "veth".
    #[serde(default)]
    pub link: Option<Spanned<String>>,
    /// A user NSM's address and subnet, e.g. "10.77.0.2/24".
    #[serde(default)]
    pub address: Option<Spanned<String>>,
    /// A user NSM's IPv6 address and prefix, e.g. "fd77::2/64".
    #[serde(default)]
    pub address6: Option<Spanned<String>>,
    /// The host's address on a user NSM's link (its default route), e.g. "10.77.0.1".
    #[serde(default)]
    pub gateway: Option<Spanned<String>>,
    /// The host's IPv6 address on the link.
    #[serde(default)]
    pub gateway6: Option<Spanned<String>>,
    /// Where a user NSM sends its guests' DNS queries (default: /etc/resolv.conf's nameservers).
    #[serde(default)]
    pub nameservers: Option<Spanned<Vec<String>>>,
    /// TCP congestion control for every connection of this NSM (e.g. "cubic", "bbr").
    #[serde(default)]
    pub congestion: Option<Spanned<String>>,
    /// The order the NSM does its tenants' work in: "fifo" (default), "fair" (by CPU time and
    /// `cpu_weight`) or "latency" (short requests and new connections first).
    #[serde(default)]
    pub scheduler: Option<Spanned<String>>,
    /// Threads running the NSM's work: a number, or "auto" (up to the cores it may use, grown
    /// and shrunk with load). Default 1.
    #[serde(default)]
    pub executors: Option<Spanned<Executors>>,
    /// Run the NSM in a network namespace of its own, joined to the host by a veth (root).
    #[serde(default)]
    pub netns: bool,
    /// With netns: shape the NSM's egress to this many bits per second.
    #[serde(default)]
    pub egress_rate: Option<u64>,
    /// With egress_rate: share it between tenants by weight (default), not between flows.
    #[serde(default = "yes")]
    pub fair: bool,
    /// Names this NSM resolves for its guests before its system resolver: name = "address".
    #[serde(default)]
    pub hosts: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    /// Connections between this NSM's guests skip TCP: the NSM carries their bytes from region
    /// to region (default). Off: they go through the stack like any other.
    #[serde(default = "yes")]
    pub colocate: bool,
}

impl NsmConfig {
    /// A user NSM's link, checked by the user stack's own rules: the span, field and message of
    /// the first thing wrong.
    pub fn user_link(&self) -> Result<crate::link::UserLink, (usize, &'static str, String)> {
        let at = self.name.span().start;
        let medium = match self.link.as_ref().map(|l| (l, l.get_ref().as_str())) {
            None | Some((_, "tap")) => crate::link::Medium::Tap,
            Some((_, "veth")) => crate::link::Medium::Veth,
            Some((l, other)) => {
                let msg = format!("{other:?} is not a link this NetKernel makes (known: tap, veth)");
                return Err((l.span().start, "nsm.link", msg));
            }
        };
        if self.netns {
            return Err((at, "nsm.netns", "a kind = \"user\" NSM always has a network namespace of its own".into()));
        }
        let need = |v: &Option<Spanned<String>>, field: &'static str, example: &str| {
            v.clone().ok_or((at, field, format!("a kind = \"user\" NSM needs {field} (e.g. {example:?})")))
        };
        let address = need(&self.address, "nsm.address", "10.77.0.2/24")?;
        let gateway = need(&self.gateway, "nsm.gateway", "10.77.0.1")?;
        fn opt(v: &Option<Spanned<String>>) -> Option<&str> {
            v.as_ref().map(|s| s.get_ref().as_str())
        }
        let config = netkernel_nsm_user::UserConfig::parse(
            if medium == crate::link::Medium::Tap { "tap" } else { "packet" },
            address.get_ref(),
            opt(&self.address6),
            gateway.get_ref(),
            opt(&self.gateway6),
            opt(&self.congestion),
        )
        .map_err(|e| {
            // The user stack's messages begin with the value's name: point at that field.
            let fields = [
                ("address6", &self.address6, "nsm.address6"),
                ("gateway6", &self.gateway6, "nsm.gateway6"),
                ("address", &self.address, "nsm.address"),
                ("gateway", &self.gateway, "nsm.gateway"),
                ("congestion", &self.congestion, "nsm.congestion"),
            ];
            let (span, field) = fields
                .iter()
                .find(|(name, _, _)| e.0.starts_with(name))
                .map(|(_, v, field)| (v.as_ref().map_or(at, |v| v.span().start), *field))
                .unwrap_or((at, "nsm"));
            (span, field, e.0)
        })?;
        let mut nameservers = Vec::new();
        for s in self.nameservers.iter().flat_map(|v| v.get_ref()) {
            let ns = self.nameservers.as_ref().expect("iterating it");
            let ip =
                s.parse().map_err(|_| (ns.span().start, "nsm.nameservers", format!("{s:?} is not an IP address")))?;
            nameservers.push(ip);
        }
        Ok(crate::link::UserLink { medium, config, nameservers })
    }

    /// Everything an NSM is made from but its congestion control (a kernel NSM changes that
    /// live), without where it was written: two configurations whose NSM has the same identity
    /// run the same NSM.
    pub fn identity(&self) -> String {
        let s = |v: &Option<Spanned<String>>| v.as_ref().map(|v| v.get_ref().clone());
        format!(
            "{:?}",
            (
                self.name.get_ref(),
                &self.kind,
                (s(&self.link), s(&self.address), s(&self.address6), s(&self.gateway), s(&self.gateway6)),
                (self.nameservers.as_ref().map(|v| v.get_ref().clone()), s(&self.scheduler)),
                (self.kind != "kernel").then(|| s(&self.congestion)),
                (self.executors_arg(), self.netns, self.egress_rate, self.fair, self.colocate),
                self.hosts.as_ref().map(|h| h.get_ref().clone()),
            )
        )
    }

    /// `--executors` for the NSM process (validated at load).
    pub fn executors_arg(&self) -> Option<String> {
        self.executors.as_ref().map(|e| match e.get_ref() {
            Executors::Count(n) => n.to_string(),
            Executors::Named(s) => s.clone(),
        })
    }
}

/// An NSM's `executors`: a number or "auto".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Executors {
    Count(u32),
    Named(String),
}

/// One tenant: who may attach, and which NSM serves it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: Spanned<String>,
    pub nsm: Spanned<String>,
    /// Uids allowed to attach as this tenant. With none of uids, gids and token_file: anyone.
    #[serde(default)]
    pub uids: Option<Vec<u32>>,
    /// Gids whose processes may attach as this tenant (primary or supplementary group).
    #[serde(default)]
    pub gids: Option<Vec<u32>>,
    /// A file holding a secret: a process that presents it (`netkernel run --token-file FILE`)
    /// may attach as this tenant whatever its uid. Keep it readable only by the tenant's users.
    #[serde(default)]
    pub token_file: Option<Spanned<PathBuf>>,
    /// The tenant's virtual addresses: wildcard and loopback binds land on them, and other
    /// tenants cannot reach them.
    #[serde(default)]
    pub addresses: Option<Spanned<Vec<String>>>,
    /// The tenant's share of a shaped NSM's egress relative to the other tenants' (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// The tenant's share of its NSM's CPU relative to other tenants' under the `fair`
    /// scheduler (default 1).
    #[serde(default)]
    pub cpu_weight: Option<Spanned<u32>>,
    /// At most this many cores of its NSM's CPU (e.g. 0.5); absent: no cap.
    #[serde(default)]
    pub cpu_limit: Option<Spanned<f64>>,
    /// Sockets the tenant may hold open in its NSM at once.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Bits per second the tenant may send, all its connections together.
    #[serde(default)]
    pub rate_limit: Option<u64>,
    /// Bytes the tenant may send at once above its rate, saved up while it sends less (default: a
    /// hundredth of a second's worth; nothing is saved up at first).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Ports the tenant may listen on: numbers or "LOW-HIGH" ranges; absent: any.
    #[serde(default)]
    pub listen_ports: Option<Spanned<Vec<PortSpec>>>,
    /// The co-located short cut for this tenant's connections (absent: its NSM's `colocate`).
    /// A connection takes it only when both ends' tenants allow it.
    #[serde(default)]
    pub colocate: Option<bool>,
    /// Isolated guests (`netkernel run --isolate`) of a tenant without `addresses` get a
    /// loopback of their own; true gives them the host's 127.0.0.1 instead.
    #[serde(default)]
    pub host_loopback: Option<Spanned<bool>>,
}

/// A port or an inclusive range of ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    One(u16),
    Range(String),
}

impl PortSpec {
    /// The inclusive range, or None when a range string is malformed.
    pub fn range(&self) -> Option<(u16, u16)> {
        match self {
            PortSpec::One(p) => Some((*p, *p)),
            PortSpec::Range(s) => {
                let (lo, hi) = s.split_once('-')?;
                let (lo, hi) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
                (lo <= hi).then_some((lo, hi))
            }
        }
    }
}

impl TenantConfig {
    /// Whether the tenant admits a process with these credentials (`groups`: its primary and
    /// supplementary gids) that presented `token` (checked by the caller against the file's).
    pub fn admits(&self, uid: u32, groups: &[u32], token_ok: bool) -> bool {
        if self.uids.is_none() && self.gids.is_none() && self.token_file.is_none() {
            return true;
        }
        self.uids.as_ref().is_some_and(|u| u.contains(&uid))
            || self.gids.as_ref().is_some_and(|g| groups.iter().any(|x| g.contains(x)))
            || token_ok
    }

    /// Whether isolated guests of this tenant get a private loopback (see `private_loopback`).
    pub fn private_loopback(&self) -> bool {
        self.addresses.is_none() && !self.host_loopback.as_ref().is_some_and(|h| *h.get_ref())
    }

    /// The tenant's addresses (validated at load).
    pub fn addresses(&self) -> Vec<std::net::IpAddr> {
        self.addresses.as_ref().map(|a| a.get_ref().iter().filter_map(|s| s.parse().ok()).collect()).unwrap_or_default()
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// Path of the control socket (overridden by --socket and NETKERNEL_SOCKET).
    pub socket: Option<PathBuf>,
    /// Address to serve Prometheus text on (`/metrics`), e.g. "127.0.0.1:9464".
    pub metrics: Option<std::net::SocketAddr>,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default, rename = "nsm")]
    pub nsms: Vec<NsmConfig>,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    /// The file it was read from (None: the built-in configuration).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

fn spanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

impl Config {
    /// With no config: one tenant, one kernel NSM in the engine's own network namespace, open
    /// to every uid, so NetKernel works without root.
    pub fn embedded() -> Config {
        Config {
            engine: EngineSection::default(),
            nsms: vec![NsmConfig {
                name: spanned("kernel".into()),
                kind: "kernel".into(),
                link: None,
                nameservers: None,
                address: None,
                address6: None,
                gateway: None,
                gateway6: None,
                congestion: None,
                scheduler: None,
                executors: None,
                netns: false,
                egress_rate: None,
                fair: true,
                hosts: None,
                colocate: true,
            }],
            tenants: vec![TenantConfig {
                name: spanned("default".into()),
                nsm: spanned("kernel".into()),
                uids: None,
                gids: None,
                token_file: None,
                addresses: None,
                max_connections: None,
                weight: None,
                cpu_weight: None,
                cpu_limit: None,
                rate_limit: None,
                burst: None,
                listen_ports: None,
                colocate: None,
                host_loopback: None,
            }],
            path: None,
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg = Self::parse(path, &text)?;
        cfg.path = Some(path.into());
        Ok(cfg)
    }

    /// Parses and checks a configuration; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let invalid = |offset: usize, field: &str, message: String| ConfigError::Invalid {
            path: path.into(),
            line: line_of(offset),
            field: field.into(),
            message,
        };
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let msg = e.message().to_string();
            // toml names the offending key in its message ("unknown field `x`", "missing field
            // `y`"); a value it cannot read ("expected `\"`") is the key's on that line.
            let key_like =
                |k: &&str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            let line_key = || {
                let line = text.lines().nth(line_of(offset) - 1)?;
                Some(line.split_once('=')?.0.trim()).filter(key_like)
            };
            let field = msg.split('`').nth(1).filter(key_like).or_else(line_key).unwrap_or("-").to_string();
            invalid(offset, &field, msg)
        })?;
        if cfg.nsms.is_empty() {
            return Err(invalid(0, "nsm", "at least one [[nsm]] is required".into()));
        }
        if cfg.tenants.is_empty() {
            return Err(invalid(0, "tenant", "at least one [[tenant]] is required".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for n in &cfg.nsms {
            if !valid_name(n.name.get_ref()) {
                return Err(invalid(
                    n.name.span().start,
                    "nsm.name",
                    format!("{:?} is not a valid name (letters, digits, - and _)", n.name.get_ref()),
                ));
            }
            if !seen.insert(n.name.get_ref().clone()) {
                return Err(invalid(
                    n.name.span().start,
                    "nsm.name",
                    format!("NSM {:?} is defined twice", n.name.get_ref()),
                ));
            }
            match n.kind.as_str() {
                "kernel" => {
                    if let Some(ns) = &n.nameservers {
                        let msg = "only a kind = \"user\" NSM resolves through its own stack; a kernel NSM uses its namespace's resolv.conf";
                        return Err(invalid(ns.span().start, "nsm.nameservers", msg.into()));
                    }
                    let user_only = [("nsm.link", &n.link), ("nsm.address", &n.address), ("nsm.address6", &n.address6)];
                    let user_only =
                        user_only.into_iter().chain([("nsm.gateway", &n.gateway), ("nsm.gateway6", &n.gateway6)]);
                    if let Some((field, v)) = user_only.filter_map(|(f, v)| Some((f, v.as_ref()?))).next() {
                        return Err(invalid(
                            v.span().start,
                            field,
                            "only a kind = \"user\" NSM has a link of its own".into(),
                        ));
                    }
                }
                "user" => {
                    n.user_link().map_err(|(span, field, message)| invalid(span, field, message))?;
                }
                other => {
                    return Err(invalid(
                        n.name.span().start,
                        "nsm.kind",
                        format!("unknown kind {other:?} (known: kernel, user)"),
                    ))
                }
            }
            if let Some(hosts) = &n.hosts {
                for (name, addr) in hosts.get_ref() {
                    if addr.parse::<std::net::IpAddr>().is_err() || name.is_empty() || name.contains(['=', ' ']) {
                        return Err(invalid(
                            hosts.span().start,
                            "nsm.hosts",
                            format!("{name:?} = {addr:?}: want a host name and an IP address"),
                        ));
                    }
                }
            }
            if let Some(e) = &n.executors {
                let bad = match e.get_ref() {
                    Executors::Count(c) => !(1..=64).contains(c),
                    Executors::Named(s) => s != "auto",
                };
                if bad {
                    let msg = "want a number of threads from 1 to 64, or \"auto\"".to_string();
                    return Err(invalid(e.span().start, "nsm.executors", msg));
                }
                if n.kind == "user" && !matches!(e.get_ref(), Executors::Count(1)) {
                    let msg = "a kind = \"user\" NSM has one executor (one TAP device, one stack)".to_string();
                    return Err(invalid(e.span().start, "nsm.executors", msg));
                }
            }
            if let Some(s) = &n.scheduler {
                if let Err(e) = s.get_ref().parse::<netkernel_service::sched::Kind>() {
                    return Err(invalid(s.span().start, "nsm.scheduler", e.to_string()));
                }
            }
            if let Some(cc) = n.congestion.as_ref().filter(|_| n.kind == "kernel") {
                let avail = available_congestion();
                if !avail.is_empty() && !avail.iter().any(|a| a == cc.get_ref()) && !loadable(cc.get_ref()) {
                    return Err(invalid(
                        cc.span().start,
                        "nsm.congestion",
                        format!("{:?} is not offered by this kernel (available: {})", cc.get_ref(), avail.join(" ")),
                    ));
                }
            }
        }
        let mut tenants = std::collections::HashSet::new();
        for t in &cfg.tenants {
            if !valid_name(t.name.get_ref()) {
                return Err(invalid(
                    t.name.span().start,
                    "tenant.name",
                    format!("{:?} is not a valid name", t.name.get_ref()),
                ));
            }
            if !tenants.insert(t.name.get_ref().clone()) {
                return Err(invalid(
                    t.name.span().start,
                    "tenant.name",
                    format!("tenant {:?} is defined twice", t.name.get_ref()),
                ));
            }
            if let Some(w) = t.cpu_weight.as_ref().filter(|w| !(1..=10_000).contains(w.get_ref())) {
                return Err(invalid(w.span().start, "tenant.cpu_weight", format!("{} is not 1 to 10000", w.get_ref())));
            }
            if let Some(l) = t.cpu_limit.as_ref().filter(|l| !(l.get_ref().is_finite() && *l.get_ref() > 0.0)) {
                return Err(invalid(
                    l.span().start,
                    "tenant.cpu_limit",
                    format!("{} is not a positive number of cores", l.get_ref()),
                ));
            }
            if let Some(addrs) = &t.addresses {
                for a in addrs.get_ref() {
                    if a.parse::<std::net::IpAddr>().is_err() {
                        return Err(invalid(
                            addrs.span().start,
                            "tenant.addresses",
                            format!("{a:?} is not an IP address"),
                        ));
                    }
                }
            }
            if let (Some(h), Some(_)) = (&t.host_loopback, &t.addresses) {
                return Err(invalid(
                    h.span().start,
                    "tenant.host_loopback",
                    "a tenant with addresses has them as its loopback; drop host_loopback or addresses".into(),
                ));
            }
            if let Some(ports) = &t.listen_ports {
                if let Some(bad) = ports.get_ref().iter().find(|p| p.range().is_none()) {
                    return Err(invalid(
                        ports.span().start,
                        "tenant.listen_ports",
                        format!("{bad:?}: want a port or \"LOW-HIGH\""),
                    ));
                }
            }
            if let Some(f) = &t.token_file {
                match std::fs::read_to_string(f.get_ref()) {
                    Ok(s) if s.trim().len() >= 16 => {}
                    Ok(_) => {
                        return Err(invalid(
                            f.span().start,
                            "tenant.token_file",
                            format!("{}: a token needs at least 16 characters", f.get_ref().display()),
                        ))
                    }
                    Err(e) => {
                        return Err(invalid(
                            f.span().start,
                            "tenant.token_file",
                            format!("cannot read {}: {e}", f.get_ref().display()),
                        ))
                    }
                }
            }
            if !seen.contains(t.nsm.get_ref()) {
                return Err(invalid(
                    t.nsm.span().start,
                    "tenant.nsm",
                    format!("no [[nsm]] is named {:?}", t.nsm.get_ref()),
                ));
            }
        }
        Ok(cfg)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn available_congestion() -> Vec<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Whether the kernel has a module for this congestion control (loaded when the NSM starts).
fn loadable(cc: &str) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = format!("/lib/modules/{}/kernel/net/ipv4", release.trim());
    std::fs::read_dir(dir)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&format!("tcp_{cc}.ko"))))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(Path::new("/etc/nk.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn scheduler_and_cpu_shares_are_checked_where_they_are_written() {
        let e = err("[[nsm]]\nname = \"k\"\nscheduler = \"wfq\"\n[[tenant]]\nname = \"a\"\nnsm = \"k\"\n");
        assert!(
            e.starts_with("/etc/nk.toml:3: nsm.scheduler: \"wfq\" is not a scheduler (known: fifo, fair, latency)"),
            "{e}"
        );
        let base = "[[nsm]]\nname = \"k\"\nscheduler = \"fair\"\n[[tenant]]\nname = \"a\"\nnsm = \"k\"\n";
        let e = err(&format!("{base}cpu_weight = 0\n"));
        assert!(e.starts_with("/etc/nk.toml:7: tenant.cpu_weight: 0 is not 1 to 10000"), "{e}");
        let e = err(&format!("{base}cpu_weight = x\n"));
        assert!(e.starts_with("/etc/nk.toml:7: cpu_weight:"), "a value toml cannot read names its key: {e}");
        let e = err(&format!("{base}cpu_limit = -1.5\n"));
        assert!(e.starts_with("/etc/nk.toml:7: tenant.cpu_limit: -1.5 is not a positive number of cores"), "{e}");
        let c = Config::parse(Path::new("/etc/nk.toml"), &format!("{base}cpu_weight = 3\ncpu_limit = 0.5\n")).unwrap();
        assert_eq!(
            (*c.tenants[0].cpu_weight.as_ref().unwrap().get_ref(), *c.tenants[0].cpu_limit.as_ref().unwrap().get_ref()),
            (3, 0.5)
        );
    }

    #[test]
    fn embedded_default_is_valid_and_minimal() {
        let c = Config::embedded();
        assert_eq!(c.nsms.len(), 1);
        assert_eq!(c.tenants[0].nsm.get_ref(), c.nsms[0].name.get_ref());
    }

    #[test]
    fn good_config_parses() {
        let c = Config::parse(
            Path::new("x.toml"),
            "[[nsm]]\nname = \"k\"\ncongestion = \"cubic\"\n\n[[tenant]]\nname = \"a\"\nnsm = \"k\"\nuids = [0]\n",
        )
        .unwrap();
        assert_eq!(c.tenants[0].uids, Some(vec![0]));
        let t = &c.tenants[0];
        assert!(t.admits(0, &[], false) && !t.admits(1, &[0], false) && t.admits(1, &[], true));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err("[[nsm]]\nname = \"k\"\nkin = \"kernel\"\n");
        assert!(e.starts_with("/etc/nk.toml:3: kin:"), "{e}");
        let e = err("[[nsm]]\nname = \"k\"\n\n[[tenant]]\nname = \"a\"\nnsm = \"nope\"\n");
        assert!(e.starts_with("/etc/nk.toml:6: tenant.nsm:"), "{e}");
        let e = err("[[nsm]]\nname = \"k\"\ncongestion = \"warp-drive\"\n[[tenant]]\nname = \"a\"\nnsm = \"k\"\n");
        assert!(e.starts_with("/etc/nk.toml:3: nsm.congestion:"), "{e}");
        let e =
            err("[[nsm]]\nname = \"k\"\nhosts = { \"a\" = \"not-an-ip\" }\n[[tenant]]\nname = \"t\"\nnsm = \"k\"\n");
        assert!(e.starts_with("/etc/nk.toml:3: nsm.hosts:"), "{e}");
        let e = err("[[nsm]]\nname = 5\n");
        assert!(e.contains("/etc/nk.toml:2:"), "{e}");
        let e = err("[[tenant]]\nname = \"a\"\n");
        assert!(e.starts_with("/etc/nk.toml:1: nsm: missing field"), "{e}");
    }

    #[test]
    fn a_user_nsm_needs_a_consistent_link() {
        let cfg = |nsm: &str| format!("[[nsm]]\nname = \"u\"\n{nsm}\n[[tenant]]\nname = \"t\"\nnsm = \"u\"\n");
        let good = "kind = \"user\"\naddress = \"10.77.0.2/24\"\ngateway = \"10.77.0.1\"\naddress6 = \"fd77::2/64\"\ngateway6 = \"fd77::1\"";
        let c = Config::parse(Path::new("x.toml"), &cfg(good)).unwrap();
        let l = c.nsms[0].user_link().unwrap();
        assert_eq!(l.nsm_args()[..6], ["--link", "tap", "--address", "10.77.0.2/24", "--gateway", "10.77.0.1"]);
        assert!(l.nsm_args().ends_with(&["--gateway6".to_string(), "fd77::1".to_string()]));
        let e = err(&cfg(&format!("{good}\ncongestion = \"bbr\"")));
        assert!(e.contains("nsm.congestion: congestion \"bbr\": the user stack has"), "{e}");
        let e = err(&cfg("kind = \"user\"\ngateway = \"10.77.0.1\""));
        assert!(e.starts_with("/etc/nk.toml:2: nsm.address: a kind = \"user\" NSM needs"), "{e}");
        let e = err(&cfg("kind = \"user\"\naddress = \"10.77.0.2/24\"\ngateway = \"10.78.0.1\""));
        assert!(e.starts_with("/etc/nk.toml:5: nsm.gateway: gateway 10.78.0.1: not on the subnet of address"), "{e}");
        let e = err(&cfg("kind = \"user\"\naddress = \"10.77.0.2\"\ngateway = \"10.77.0.1\""));
        assert!(e.starts_with("/etc/nk.toml:4: nsm.address:"), "{e}");
        let e = err(&cfg("kind = \"user\"\nlink = \"wifi\"\naddress = \"10.77.0.2/24\"\ngateway = \"10.77.0.1\""));
        assert!(e.starts_with("/etc/nk.toml:4: nsm.link:"), "{e}");
        let veth = format!("{good}\nlink = \"veth\"");
        let l = Config::parse(Path::new("x.toml"), &cfg(&veth)).unwrap().nsms[0].user_link().unwrap();
        assert_eq!(l.medium, crate::link::Medium::Veth);
        let e = err(&cfg(&format!("{good}\nnetns = true")));
        assert!(e.contains("nsm.netns: a kind = \"user\" NSM always has a network namespace"), "{e}");
        let e = err(&cfg("address = \"10.77.0.2/24\""));
        assert!(e.starts_with("/etc/nk.toml:3: nsm.address: only a kind = \"user\" NSM"), "{e}");
        let e = err(&cfg("kind = \"smoke\""));
        assert!(e.contains("nsm.kind: unknown kind \"smoke\" (known: kernel, user)"), "{e}");
    }
}
