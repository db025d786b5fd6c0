//! `netkernel bench --quick` and `--tools`: every mode and every metric is measured and sane.
//! Behaviour tests: the figures must exist, be positive and finite, and NetKernel modes must have
//! used their NSM;
//! how fast anything is is not asserted (CI machines are too noisy for that).

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const MODES: [&str; 4] = ["native", "nk_kernel", "nk_colocated", "unix"];
const METRICS: [&str; 10] = [
    "rr_p50_us",
    "rr_p99_us",
    "rr_p999_us",
    "rr_cpu_us_per_op",
    "bulk1_gbps",
    "bulk4_gbps",
    "bulk1_cpu_s_per_gb",
    "bulk4_cpu_s_per_gb",
    "conn_per_s",
    "conn_cpu_us_per_conn",
];

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is missing or not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}, expected a positive finite number");
    x
}

#[test]
fn quick_bench_reports_every_mode_and_metric() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("bench.svg");
    let mut c = Command::new(NETKERNEL);
    c.args(["bench", "--quick", "--json", "--svg"]).arg(&svg);
    let out = output_within(c, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stderr}"));
    for mode in MODES {
        for m in METRICS {
            positive(&r["modes"][mode][m], &format!("{mode}.{m}"));
            if mode != "native" {
                positive(&r["ratio"][mode][m], &format!("ratio.{mode}.{m}"));
            }
        }
        let m = &r["modes"][mode];
        assert!(m["rr_p50_us"].as_f64() <= m["rr_p99_us"].as_f64(), "{mode}: p50 above p99: {m}");
        assert!(m["rr_p99_us"].as_f64() <= m["rr_p999_us"].as_f64(), "{mode}: p99 above p99.9: {m}");
    }
    for mode in ["nk_kernel", "nk_colocated"] {
        // Their NSM did work for them (the bench itself also fails if the NSM saw no connection).
        positive(&r["modes"][mode]["cpu_s"]["bulk1"]["nsm"], &format!("{mode}: NSM CPU over the bulk run"));
        let want = if mode == "nk_kernel" { "kernel" } else { "colocated" };
        assert_eq!(r["modes"][mode]["path_checked"], want, "{mode}: the bench did not check its path");
    }
    for k in ["other_share", "steal_share"] {
        let x = r["noise"][k].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x >= 0.0, "noise.{k} = {x}");
    }
    let queue = r["queue"].as_array().expect("queue rows");
    let sizes: Vec<u64> = queue.iter().filter_map(|q| q["bytes"].as_u64()).collect();
    assert_eq!(sizes, [64, 256, 512, 1024, 2048, 4096, 8192]);
    for q in queue {
        for k in ["ns_per_record", "gbps", "one_way_p50_ns", "one_way_p99_ns"] {
            positive(&q[k], &format!("queue {} B {k}", q["bytes"]));
        }
    }
    let chart = std::fs::read_to_string(&svg).expect("the --svg file");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"), "not an SVG document");
    assert_eq!(chart.matches("<rect").count(), 1 + 7 * 3 + 3 + 7 + 6 + 2, "bars and legend swatches");
}

/// The tools `netkernel bench --tools` runs (JSON key), the programs each needs and the metrics
/// it reports.
const TOOLS: [(&str, &[&str], &[&str]); 5] = [
    ("sockperf", &["sockperf"], &["p50_us", "p99_us"]),
    ("iperf3_p1", &["iperf3"], &["gbps"]),
    ("iperf3_p4", &["iperf3"], &["gbps"]),
    ("redis", &["redis-server", "redis-benchmark"], &["set_rps", "get_rps"]),
    ("nginx_wrk", &["nginx", "wrk"], &["rps"]),
];
const PATHS: [&str; 4] = ["native", "kernel", "guest_to_native", "colocated"];

/// `netkernel bench --tools`, one short round: every installed tool reports a positive figure on
/// every path (the bench itself fails if a path's NSM did not serve the connections); a tool
/// that is not installed is skipped, naming its package. As root, with --warm.
#[test]
fn tools_bench_reports_every_installed_tool_on_every_path() {
    let installed = |programs: &[&str]| programs.iter().all(|p| which(p).is_some());
    if !TOOLS.iter().any(|(_, programs, _)| installed(programs)) {
        eprintln!("skipping: none of sockperf, iperf3, redis, nginx + wrk is installed (scripts/test installs them)");
        return;
    }
    let mut c = Command::new(NETKERNEL);
    c.args(["bench", "--tools", "--repeat", "1", "--seconds", "1", "--requests", "100000", "--json"]);
    if is_root() {
        c.arg("--warm");
    } else {
        eprintln!("not root: running without --warm (/dev/cpu_dma_latency needs root)");
    }
    let out = output_within(c, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --tools failed: {stderr}");
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stderr}"));
    assert_eq!(r["warm"], is_root(), "warm reported wrongly");
    for (tool, programs, metrics) in TOOLS {
        let skipped = r["skipped"].as_array().unwrap().iter().find(|s| s["tool"] == tool);
        if !installed(programs) {
            let reason = skipped.unwrap_or_else(|| panic!("{tool} is not installed but not reported skipped"));
            assert!(reason["reason"].as_str().unwrap().contains("apt-get install"), "{reason}");
            eprintln!("{tool} skipped: {}", reason["reason"]);
            continue;
        }
        assert!(skipped.is_none(), "{tool} is installed but was skipped");
        for m in metrics {
            for path in PATHS {
                let v = &r["tools"][tool][m][path];
                positive(&v["median"], &format!("{tool}.{m}.{path}"));
                positive(&v["ratio"], &format!("{tool}.{m}.{path} ratio"));
                assert_eq!(v["runs"].as_array().map(Vec::len), Some(1), "{tool}.{m}.{path}: one round, one run");
            }
        }
    }
}
