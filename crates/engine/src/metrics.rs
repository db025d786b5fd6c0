//! Prometheus text exposition of the engine's telemetry on `/metrics` (DESIGN.md D8).

use crate::Engine;
use netkernel_service::control::NsmStats;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        let _ = writeln!(self.out, "{name}{{{}}} {v}", l.join(","));
    }
}

/// The exposition text for the engine's current state.
pub fn render(engine: &Engine) -> String {
    let all = engine.nsms();
    let nsms: Vec<(&crate::Nsm, Option<NsmStats>)> = all.iter().map(|n| (n.as_ref(), n.stats().ok())).collect();
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.head("netkernel_nsm_up", "gauge", "Whether the NSM process answers its engine.");
    for (n, s) in &nsms {
        f.sample("netkernel_nsm_up", &[("nsm", &n.name), ("kind", &n.kind)], u8::from(s.is_some()));
    }
    f.head("netkernel_nsm_restarts_total", "counter", "Times the engine restarted the NSM.");
    for (n, _) in &nsms {
        f.sample("netkernel_nsm_restarts_total", &[("nsm", &n.name)], n.restarts());
    }
    f.head("netkernel_nsm_upgrades_total", "counter", "Times `ctl upgrade` replaced the NSM's process.");
    for (n, _) in &nsms {
        f.sample("netkernel_nsm_upgrades_total", &[("nsm", &n.name)], n.upgrades().0);
    }
    f.head(
        "netkernel_nsm_upgrade_blackout_seconds",
        "gauge",
        "The last upgrade's blackout: from the old process stopping to the new one serving.",
    );
    for (n, _) in &nsms {
        f.sample("netkernel_nsm_upgrade_blackout_seconds", &[("nsm", &n.name)], n.upgrades().1.as_secs_f64());
    }
    type Get = fn(&NsmStats) -> u64;
    let per_nsm: [(&str, &str, &str, Get); 9] = [
        ("netkernel_nsm_received_bytes_total", "counter", "Bytes the NSM received for its guests.", |s| s.bytes_in),
        ("netkernel_nsm_sent_bytes_total", "counter", "Bytes the NSM sent for its guests.", |s| s.bytes_out),
        ("netkernel_nsm_connections_total", "counter", "Connections accepted or opened.", |s| s.conns_total),
        (
            "netkernel_nsm_colocated_connections_total",
            "counter",
            "Connects between guests of the NSM that took the co-located short cut.",
            |s| s.conns_colocated,
        ),
        ("netkernel_nsm_violations_total", "counter", "Attachments refused for breaking the ABI.", |s| s.violations),
        ("netkernel_nsm_attachments", "gauge", "Guest processes attached.", |s| s.attachments as u64),
        ("netkernel_nsm_sockets", "gauge", "Sockets open in the NSM.", |s| s.conns.len() as u64),
        (
            "netkernel_nsm_draining_processes",
            "gauge",
            "Old processes of a user NSM's upgrade still serving or relaying for its guests.",
            |s| s.draining.len() as u64,
        ),
        (
            "netkernel_nsm_relayed_connections",
            "gauge",
            "Connections the old processes of a user NSM's upgrade relay until they close.",
            |s| s.relayed as u64,
        ),
    ];
    for (name, kind, help, get) in per_nsm {
        f.head(name, kind, help);
        for (n, s) in &nsms {
            if let Some(s) = s {
                f.sample(name, &[("nsm", &n.name)], get(s));
            }
        }
    }
    type GetT = fn(&netkernel_service::control::TenantTotals) -> u64;
    let per_tenant: [(&str, &str, GetT); 6] = [
        ("netkernel_tenant_received_bytes_total", "Bytes received for the tenant.", |t| t.bytes_in),
        ("netkernel_tenant_sent_bytes_total", "Bytes sent for the tenant.", |t| t.bytes_out),
        ("netkernel_tenant_connections_total", "Connections the tenant accepted or opened.", |t| t.conns_total),
        ("netkernel_tenant_violations_total", "The tenant's attachments refused for breaking the ABI.", |t| {
            t.violations
        }),
        ("netkernel_tenant_refused_total", "Operations the tenant's policy refused.", |t| t.refused),
        ("netkernel_tenant_throttled_total", "Times a socket of the tenant waited for its rate limit.", |t| {
            t.throttled
        }),
    ];
    for (name, help, get) in per_tenant {
        f.head(name, "counter", help);
        for (n, s) in &nsms {
            for (t, totals) in s.iter().flat_map(|s| s.tenants.iter()) {
                f.sample(name, &[("tenant", t), ("nsm", &n.name)], get(totals));
            }
        }
    }
    f.head("netkernel_nsm_cpu_seconds_total", "counter", "CPU the NSM's executors used.");
    for (n, s) in &nsms {
        if let Some(s) = s {
            f.sample("netkernel_nsm_cpu_seconds_total", &[("nsm", &n.name)], s.cpu_seconds);
        }
    }
    f.head("netkernel_nsm_executors", "gauge", "Executor threads running the NSM's tasks.");
    for (n, s) in &nsms {
        if let Some(s) = s {
            f.sample("netkernel_nsm_executors", &[("nsm", &n.name)], s.executors);
        }
    }
    let name = "netkernel_tenant_nsm_cpu_seconds_total";
    f.head(name, "counter", "CPU the NSM spent for the tenant (its tasks' share of the NSM's CPU).");
    for (n, s) in &nsms {
        for (t, totals) in s.iter().flat_map(|s| s.tenants.iter()) {
            f.sample(name, &[("tenant", t), ("nsm", &n.name)], totals.nsm_cpu_seconds);
        }
    }
    let conns: Vec<_> = nsms.iter().filter_map(|(_, s)| s.as_ref()).flat_map(|s| s.conns.iter()).collect();
    let conn_metrics: [(&str, &str, &str); 5] = [
        ("netkernel_connection_rtt_seconds", "gauge", "Smoothed round-trip time (TCP_INFO)."),
        ("netkernel_connection_cwnd_segments", "gauge", "Congestion window (TCP_INFO)."),
        ("netkernel_connection_retransmits_total", "counter", "Segments retransmitted (TCP_INFO)."),
        ("netkernel_connection_delivery_rate_bytes_per_second", "gauge", "Delivery rate estimate (TCP_INFO)."),
        ("netkernel_connection_sent_bytes_total", "counter", "Bytes sent on the connection."),
    ];
    for (i, (name, kind, help)) in conn_metrics.iter().enumerate() {
        f.head(name, kind, help);
        for c in conns.iter().filter(|c| c.proto == "tcp" && c.remote != "-") {
            let labels = [("tenant", c.tenant.as_str()), ("nsm", &c.nsm), ("local", &c.local), ("remote", &c.remote)];
            match i {
                0 => f.sample(name, &labels, c.rtt_us as f64 / 1e6),
                1 => f.sample(name, &labels, c.cwnd),
                2 => f.sample(name, &labels, c.retrans),
                3 => f.sample(name, &labels, c.delivery_rate),
                _ => f.sample(name, &labels, c.bytes_out),
            }
        }
    }
    out
}

fn answer(engine: &Engine, mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_string();
    let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
        ["GET", "/metrics"] => ("200 OK", render(engine)),
        _ => ("404 Not Found", "netkernel: only GET /metrics is served\n".to_string()),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves /metrics on `addr` from a thread of its own.
pub fn serve(engine: Arc<Engine>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            answer(&engine, s);
        }
    });
    Ok(bound)
}
