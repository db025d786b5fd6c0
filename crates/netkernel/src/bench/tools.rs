//! `netkernel bench --tools`: the standard tools side by side. sockperf ping-pong (64 B), iperf3
//! with 1 and 4 streams, redis-benchmark -P 16 against redis-server, and wrk against nginx, each
//! over four paths: native, through the kernel NSM (both ends guests), a guest client to a native
//! server, and co-located (both ends guests of the co-located NSM).
//!
//! Every round runs every tool on every path in turn (native, kernel, guest→native, co-located,
//! native, ...), so a change in the machine's load shows as spread within a path rather than as a
//! difference between paths; the table gives per path the median and the min–max over the rounds,
//! and the ratio of medians to native. Every server and client is started afresh for each run, and
//! after each NetKernel run the NSM of the path must have served its connections (co-located or not
//! as the path says).

use super::apps::{free_port, nginx_server, redis_rates, redis_server, server, wrk_rate, Killed};
use super::{check_served, command, machine, nsm_stats, Noise, Peer};
use crate::guestlib::{self, which};
use crate::tempengine::TempEngine;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Native,
    Kernel,
    GuestToNative,
    Colocated,
}

const PATHS: [Path; 4] = [Path::Native, Path::Kernel, Path::GuestToNative, Path::Colocated];

impl Path {
    fn key(self) -> &'static str {
        match self {
            Path::Native => "native",
            Path::Kernel => "kernel",
            Path::GuestToNative => "guest_to_native",
            Path::Colocated => "colocated",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path::Native => "native",
            Path::Kernel => "NK kernel",
            Path::GuestToNative => "guest→native",
            Path::Colocated => "NK coloc",
        }
    }

    /// The tenants of server and client (the bench's engine has an NSM of the same name per
    /// tenant); None runs that end natively.
    fn ends(self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            Path::Native => (None, None),
            Path::Kernel => (Some("kernel"), Some("kernel")),
            Path::GuestToNative => (None, Some("kernel")),
            Path::Colocated => (Some("colocated"), Some("colocated")),
        }
    }
}

/// One standard tool: the programs it needs, where they come from, and what it reports.
struct Tool {
    key: &'static str,
    label: &'static str,
    programs: &'static [&'static str],
    packages: &'static str,
    /// (JSON key, label, decimals) of each figure `run` returns, in order.
    metrics: &'static [(&'static str, &'static str, usize)],
    run: fn(&Ctx, Path) -> Result<Vec<f64>, String>,
}

const TOOLS: [Tool; 5] = [
    Tool {
        key: "sockperf",
        label: "sockperf pp 64 B",
        programs: &["sockperf"],
        packages: "sockperf",
        // sockperf's latency is half the round trip (the peer bench's rr reports whole ones).
        metrics: &[("p50_us", "p50 (us, RTT/2)", 2), ("p99_us", "p99 (us, RTT/2)", 2)],
        run: sockperf,
    },
    Tool {
        key: "iperf3_p1",
        label: "iperf3 -P1",
        programs: &["iperf3"],
        packages: "iperf3",
        metrics: &[("gbps", "Gbit/s", 2)],
        run: |c, path| iperf3(c, path, 1),
    },
    Tool {
        key: "iperf3_p4",
        label: "iperf3 -P4",
        programs: &["iperf3"],
        packages: "iperf3",
        metrics: &[("gbps", "Gbit/s", 2)],
        run: |c, path| iperf3(c, path, 4),
    },
    Tool {
        key: "redis",
        label: "redis-bench -P16",
        programs: &["redis-server", "redis-benchmark"],
        packages: "redis-server redis-tools",
        metrics: &[("set_rps", "SET/s", 0), ("get_rps", "GET/s", 0)],
        run: redis,
    },
    Tool {
        key: "nginx_wrk",
        label: "wrk → nginx",
        programs: &["nginx", "wrk"],
        packages: "nginx-light wrk",
        metrics: &[("rps", "requests/s", 0)],
        run: nginx_wrk,
    },
];

/// What every run needs.
struct Ctx<'a> {
    lib: PathBuf,
    engine: &'a TempEngine,
    /// Duration of each timed run (sockperf, iperf3, wrk).
    seconds: u32,
    /// Requests per redis-benchmark test.
    requests: u32,
}

impl Ctx<'_> {
    fn cmd(&self, tenant: Option<&str>, program: &str, args: &[&str]) -> Command {
        command(tenant.map(|t| (&*self.lib, self.engine, t)), program, args)
    }

    /// Starts the server end of `path` and waits until it listens on `port`.
    fn server(&self, path: Path, port: u16, program: &str, args: &[&str]) -> Result<Killed, String> {
        server(self.cmd(path.ends().0, &which(program)?, args), port)
    }

    /// Runs the client end of `path` to completion and returns its stdout.
    fn client(&self, path: Path, program: &str, args: &[&str]) -> Result<String, String> {
        let cmd = self.cmd(path.ends().1, &which(program)?, args);
        let deadline = Instant::now() + Duration::from_secs(60 + 3 * self.seconds as u64);
        Peer::spawn(cmd, format!("{program} {}", path.key()), &self.engine.dir)?.output(deadline)
    }
}

fn sockperf(c: &Ctx, path: Path) -> Result<Vec<f64>, String> {
    let port = free_port()?;
    let (p, secs) = (port.to_string(), c.seconds.to_string());
    let _server = c.server(path, port, "sockperf", &["sr", "--tcp", "-i", "127.0.0.1", "-p", &p])?;
    let out = c.client(path, "sockperf", &["pp", "--tcp", "-i", "127.0.0.1", "-p", &p, "-m", "64", "-t", &secs])?;
    ["50.000", "99.000"].iter().map(|q| sockperf_percentile(&out, q)).collect()
}

/// From sockperf's `---> percentile 50.000 =   33.099` lines: the latency in µs.
fn sockperf_percentile(out: &str, q: &str) -> Result<f64, String> {
    let tag = format!("percentile {q} =");
    out.lines()
        .find_map(|l| l.split_once(&tag)?.1.trim().parse().ok())
        .ok_or_else(|| format!("no \"{tag}\" line in sockperf's output:\n{out}"))
}

fn iperf3(c: &Ctx, path: Path, streams: u32) -> Result<Vec<f64>, String> {
    let port = free_port()?;
    let (p, secs, streams) = (port.to_string(), c.seconds.to_string(), streams.to_string());
    let _server = c.server(path, port, "iperf3", &["-s", "-B", "127.0.0.1", "-p", &p])?;
    let out = c.client(path, "iperf3", &["-c", "127.0.0.1", "-p", &p, "-t", &secs, "-P", &streams, "-J"])?;
    Ok(vec![iperf3_gbps(&out)?])
}

/// The receiver's bit rate over all streams, in Gbit/s, from iperf3 -J.
fn iperf3_gbps(out: &str) -> Result<f64, String> {
    let v: Value = serde_json::from_str(out).map_err(|e| format!("iperf3 printed no JSON ({e}):\n{out}"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
    bps.map(|b| b / 1e9).ok_or_else(|| format!("no end.sum_received.bits_per_second in iperf3's report:\n{out}"))
}

fn redis(c: &Ctx, path: Path) -> Result<Vec<f64>, String> {
    let port = free_port()?;
    let (p, n) = (port.to_string(), c.requests.to_string());
    let _server = redis_server(|prog, args| c.cmd(path.ends().0, prog, args), port)?;
    let args = ["-h", "127.0.0.1", "-p", &p, "-c", "50", "-n", &n, "-P", "16", "-t", "set,get", "--csv"];
    let rates = redis_rates(&c.client(path, "redis-benchmark", &args)?);
    let rate = |test: &str| {
        let r = rates.iter().find(|(t, _)| t == test).map(|(_, r)| *r);
        r.ok_or_else(|| format!("redis-benchmark reported no {test} rate: {rates:?}"))
    };
    Ok(vec![rate("SET")?, rate("GET")?])
}

/// The static file wrk fetches from nginx.
const PAGE_BYTES: usize = 1024;

fn nginx_wrk(c: &Ctx, path: Path) -> Result<Vec<f64>, String> {
    let port = free_port()?;
    let dir = c.engine.dir.join(format!("nginx-{}", path.key()));
    let root = dir.join("www");
    std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    std::fs::write(root.join("index.html"), "x".repeat(PAGE_BYTES)).map_err(|e| e.to_string())?;
    let location = format!("root {};", root.display());
    let _server = nginx_server(|prog, args| c.cmd(path.ends().0, prog, args), &dir, port, &location)?;
    let url = format!("http://127.0.0.1:{port}/index.html");
    let out = c.client(path, "wrk", &["-t2", "-c50", &format!("-d{}s", c.seconds), &url])?;
    Ok(vec![wrk_rate(&out)?.0])
}

/// Median, min and max of a non-empty sample.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    ((v[(n - 1) / 2] + v[n / 2]) / 2.0, v[0], v[n - 1])
}

pub fn run(repeat: u32, seconds: u32, requests: u32) -> Result<Value, String> {
    let lib = guestlib::find()?;
    let (mut tools, mut skipped) = (Vec::new(), Vec::new());
    for t in &TOOLS {
        let missing: Vec<&str> = t.programs.iter().copied().filter(|p| which(p).is_err()).collect();
        if missing.is_empty() {
            tools.push(t);
            continue;
        }
        let why = format!("{} not installed (Debian: apt-get install {})", missing.join(", "), t.packages);
        eprintln!("netkernel bench --tools: skipping {}: {why}", t.label);
        skipped.push(json!({"tool": t.key, "reason": why, "packages": t.packages}));
    }
    if tools.is_empty() {
        return Err("--tools: none of the tools is installed".into());
    }
    let machine = machine();
    let noise = Noise::start();
    let engine = TempEngine::with_config(Some(&super::engine_config()))?;
    let c = Ctx { lib, engine: &engine, seconds, requests };
    // runs[tool][path]: per round, the tool's figures.
    let mut runs = vec![vec![Vec::new(); PATHS.len()]; tools.len()];
    for round in 1..=repeat {
        for (t, tool) in tools.iter().enumerate() {
            for (p, &path) in PATHS.iter().enumerate() {
                eprintln!("netkernel bench --tools: round {round}/{repeat}: {}, {} ...", tool.label, path.label());
                let nsm = path.ends().1;
                let before = nsm.map(|n| nsm_stats(&engine, n)).transpose()?;
                let what = |e: String| format!("{}, {}: {e}", tool.label, path.label());
                let figures = (tool.run)(&c, path).map_err(what)?;
                if let (Some(n), Some(before)) = (nsm, before) {
                    check_served(&engine, n, &before, path == Path::Colocated).map_err(what)?;
                }
                if let Some(x) = figures.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                    return Err(what(format!("measured {x}")));
                }
                runs[t][p].push(figures);
            }
        }
    }
    let (noise, wall) = noise.end(&engine)?;
    let mut results = Map::new();
    for (tool, runs) in tools.iter().zip(&runs) {
        let mut metrics = Map::new();
        for (m, (key, _, _)) in tool.metrics.iter().enumerate() {
            let samples = |p: usize| runs[p].iter().map(|f| f[m]).collect::<Vec<f64>>();
            let native = spread(samples(0)).0;
            let paths: Map<String, Value> = PATHS
                .iter()
                .enumerate()
                .map(|(p, path)| {
                    let (median, min, max) = spread(samples(p));
                    let v = json!({"median": median, "min": min, "max": max, "runs": samples(p),
                                   "ratio": median / native});
                    (path.key().to_string(), v)
                })
                .collect();
            metrics.insert(key.to_string(), Value::Object(paths));
        }
        results.insert(tool.key.into(), Value::Object(metrics));
    }
    Ok(json!({
        "config": {"repeat": repeat, "seconds": seconds, "redis_requests": requests, "page_bytes": PAGE_BYTES,
                   "paths": PATHS.map(Path::key), "guest_to_native_nsm": Path::GuestToNative.ends().1},
        "machine": machine, "noise": noise, "wall_s": wall, "tools": results, "skipped": skipped,
    }))
}

pub fn print(r: &Value) {
    let (c, m, n) = (&r["config"], &r["machine"], &r["noise"]);
    println!(
        "{} rounds, each running every tool on every path in turn; {} s per run, redis-benchmark {} requests per \
         test (50 clients, -P 16); nginx: 2 workers, a {} B file; wrk -t2 -c50",
        c["repeat"], c["seconds"], c["redis_requests"], c["page_bytes"]
    );
    let pct = |k: &str| n[k].as_f64().unwrap_or(f64::NAN) * 100.0;
    println!(
        "{} CPUs ({}), kernel {}; load average {} before, {} after; other processes used {:.1}% of the machine, \
         the hypervisor stole {:.1}%",
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["loadavg_before"].as_str().unwrap_or("?"),
        n["loadavg_after"].as_str().unwrap_or("?"),
        pct("other_share"),
        pct("steal_share")
    );
    println!("{}", super::warm_line(r));
    print!("{:<32}", "tool, metric: median [min-max]");
    for path in PATHS {
        print!(" {:>26}", path.label());
        if path != Path::Native {
            print!(" {:>6}", "ratio");
        }
    }
    println!();
    for tool in TOOLS.iter().filter(|t| !r["tools"][t.key].is_null()) {
        for (key, label, dp) in tool.metrics {
            print!("{:<32}", format!("{} {label}", tool.label));
            for path in PATHS {
                let v = &r["tools"][tool.key][key][path.key()];
                let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                print!(" {:>26}", format!("{:.dp$} [{:.dp$}-{:.dp$}]", f("median"), f("min"), f("max")));
                if path != Path::Native {
                    print!(" {:>5.2}x", f("ratio"));
                }
            }
            println!();
        }
    }
    for s in r["skipped"].as_array().into_iter().flatten() {
        println!("skipped {}: {}", s["tool"].as_str().unwrap_or("?"), s["reason"].as_str().unwrap_or("?"));
    }
    println!(
        "ratio = median / native median (latency: above 1 is slower; rates: below 1 is slower). guest→native: the \
         client a guest of the {} NSM, the server native.",
        c["guest_to_native_nsm"].as_str().unwrap_or("?")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_reports_are_parsed() {
        let sp = "sockperf: ---> percentile 99.000 =   54.626\nsockperf: ---> percentile 50.000 =   33.099\n";
        assert_eq!(sockperf_percentile(sp, "50.000"), Ok(33.099));
        assert_eq!(sockperf_percentile(sp, "99.000"), Ok(54.626));
        assert!(sockperf_percentile("sockperf: Test ended", "50.000").is_err());
        let ip = r#"{"end": {"sum_received": {"bits_per_second": 16.5e9}}}"#;
        assert_eq!(iperf3_gbps(ip), Ok(16.5));
        assert_eq!(iperf3_gbps(r#"{"error": "unable to connect"}"#), Err("iperf3: unable to connect".into()));
        let csv =
            "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"605693.50\",\"1.063\"\n\"GET\",\"722543.38\",\"0.787\"\n";
        assert_eq!(redis_rates(csv), [("SET".to_string(), 605693.5), ("GET".to_string(), 722543.38)]);
        let wrk = "  47801 requests in 1.00s, 57.58MB read\nRequests/sec:  47581.46\nTransfer/sec:     57.31MB\n";
        assert_eq!(wrk_rate(wrk), Ok((47581.46, 47801.0)));
        assert!(wrk_rate(&format!("{wrk}  Non-2xx or 3xx responses: 37550\n")).is_err());
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
