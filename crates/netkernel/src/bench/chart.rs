//! `netkernel bench --svg`: the run as a self-contained SVG for docs/. Two panels, both on log
//! scales: each mode's speed relative to native TCP (latency and CPU inverted, so that higher is
//! always better), and the nqe queue's time per record next to the NetKernel paper's.

use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

const W: f64 = 960.0;
const COLORS: [&str; 3] = ["#4e79a7", "#f28e2b", "#59a14f"];
const PAPER_COLOR: &str = "#bab0ac";

/// (JSON key, label, whether lower is better) of the metrics drawn in the comparison panel.
const SHOWN: [(&str, &str, bool); 7] = [
    ("rr_p50_us", "rr p50", true),
    ("rr_p99_us", "rr p99", true),
    ("bulk1_gbps", "bulk 1 flow", false),
    ("bulk4_gbps", "bulk 4 flows", false),
    ("conn_per_s", "conn/s", false),
    ("bulk1_cpu_s_per_gb", "CPU/GB 1 flow", true),
    ("rr_cpu_us_per_op", "CPU/round trip", true),
];

const MODES: [(&str, &str); 3] =
    [("nk_kernel", "NetKernel, kernel NSM"), ("nk_colocated", "NetKernel, co-located"), ("unix", "AF_UNIX")];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A vertical log-scale axis: maps values in [lo, hi] to pixels in [bottom, top].
struct LogAxis {
    lo: f64,
    hi: f64,
    top: f64,
    bottom: f64,
}

impl LogAxis {
    fn y(&self, v: f64) -> f64 {
        let v = v.clamp(self.lo, self.hi);
        self.bottom - (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln()) * (self.bottom - self.top)
    }

    fn grid(&self, svg: &mut String, left: f64, right: f64, ticks: &[(f64, &str)]) {
        for (v, label) in ticks {
            let y = self.y(*v);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end" font-size="11">{label}</text>"##,
                left - 6.0,
                y + 4.0
            );
        }
    }

    /// A bar from 1 (1x in the comparison, 1 ns for the queue) to `v`, up or down, with its
    /// value written at its end.
    fn bar(&self, svg: &mut String, x: f64, w: f64, v: f64, color: &str, label: &str) {
        if !v.is_finite() || v <= 0.0 {
            return;
        }
        let (y0, y1) = (self.y(1.0), self.y(v));
        let (top, h) = (y0.min(y1), (y1 - y0).abs().max(1.0));
        let _ = writeln!(svg, r#"<rect x="{x:.1}" y="{top:.1}" width="{w:.1}" height="{h:.1}" fill="{color}"/>"#);
        let ty = if y1 <= y0 { y1 - 3.0 } else { y1 + 11.0 };
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{ty:.1}" text-anchor="middle" font-size="9">{}</text>"#,
            x + w / 2.0,
            esc(label)
        );
    }
}

fn legend(svg: &mut String, x: f64, y: f64, items: &[(&str, &str)]) {
    let mut x = x;
    for (color, label) in items {
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{:.0}" width="12" height="12" fill="{color}"/><text x="{:.0}" y="{y:.0}" font-size="12">{}</text>"#,
            y - 10.0,
            x + 16.0,
            esc(label)
        );
        x += 28.0 + 7.0 * label.len() as f64;
    }
}

fn comparison(svg: &mut String, r: &Value, top: f64) {
    let (left, right) = (70.0, W - 20.0);
    let axis = LogAxis { lo: 1.0 / 16.0, hi: 16.0, top: top + 40.0, bottom: top + 300.0 };
    let m = &r["machine"];
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{:.0}" font-size="15" font-weight="bold">Relative to native TCP over loopback (higher is better; latency and CPU inverted)</text>"#,
        top + 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{:.0}" font-size="11">{} CPUs, {}; kernel {}; other processes used {:.1}% of the machine during the run</text>"#,
        top + 30.0,
        m["nproc"],
        esc(m["cpu"].as_str().unwrap_or("?")),
        esc(m["kernel"].as_str().unwrap_or("?")),
        r["noise"]["other_share"].as_f64().unwrap_or(f64::NAN) * 100.0
    );
    let ticks = [
        (0.0625, "1/16x"),
        (0.125, "1/8x"),
        (0.25, "1/4x"),
        (0.5, "1/2x"),
        (1.0, "1x"),
        (2.0, "2x"),
        (4.0, "4x"),
        (8.0, "8x"),
        (16.0, "16x"),
    ];
    axis.grid(svg, left, right, &ticks);
    let y1 = axis.y(1.0);
    let _ = writeln!(svg, r##"<line x1="{left}" y1="{y1:.1}" x2="{right}" y2="{y1:.1}" stroke="#333"/>"##);
    let group = (right - left) / SHOWN.len() as f64;
    let bw = group * 0.8 / MODES.len() as f64;
    for (i, (key, label, lower_better)) in SHOWN.iter().enumerate() {
        let gx = left + i as f64 * group + group * 0.1;
        for (j, (mode, _)) in MODES.iter().enumerate() {
            let ratio = r["ratio"][mode][key].as_f64().unwrap_or(f64::NAN);
            let speed = if *lower_better { 1.0 / ratio } else { ratio };
            axis.bar(svg, gx + j as f64 * bw, bw - 2.0, speed, COLORS[j], &format!("{speed:.2}x"));
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.0}" text-anchor="middle" font-size="12">{label}</text>"#,
            gx + group * 0.4,
            axis.bottom + 18.0
        );
    }
    let items: Vec<(&str, &str)> = MODES.iter().zip(COLORS).map(|((_, l), c)| (c, *l)).collect();
    legend(svg, left, axis.bottom + 40.0, &items);
}

fn queue(svg: &mut String, r: &Value, top: f64) {
    let (left, right) = (70.0, W - 20.0);
    let axis = LogAxis { lo: 1.0, hi: 10000.0, top: top + 30.0, bottom: top + 260.0 };
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{:.0}" font-size="15" font-weight="bold">nqe queue: ns per record (copy in, push, pop, copy out), lower is better</text>"#,
        top + 14.0
    );
    let ticks = [(1.0, "1 ns"), (10.0, "10 ns"), (100.0, "100 ns"), (1000.0, "1 us"), (10000.0, "10 us")];
    axis.grid(svg, left, right, &ticks);
    let rows: Vec<&Value> = r["queue"].as_array().into_iter().flatten().collect();
    let group = (right - left) / rows.len().max(1) as f64;
    let bw = group * 0.8 / 2.0;
    for (i, q) in rows.iter().enumerate() {
        let gx = left + i as f64 * group + group * 0.1;
        let ours = q["ns_per_record"].as_f64().unwrap_or(f64::NAN);
        axis.bar(svg, gx, bw - 2.0, ours, COLORS[0], &format!("{ours:.0}"));
        if let Some(p) = q["paper_ns"].as_f64() {
            axis.bar(svg, gx + bw, bw - 2.0, p, PAPER_COLOR, &format!("{p:.0}"));
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.0}" text-anchor="middle" font-size="12">{} B</text>"#,
            gx + group * 0.4,
            axis.bottom + 18.0,
            q["bytes"]
        );
    }
    legend(
        svg,
        left,
        axis.bottom + 40.0,
        &[(COLORS[0], "this machine"), (PAPER_COLOR, "NetKernel paper (Xeon E5-2618L v3, KVM)")],
    );
}

/// Writes the chart of bench result `r` to `path`.
pub fn write(r: &Value, path: &Path) -> Result<(), String> {
    let h = 740.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    comparison(&mut svg, r, 10.0);
    queue(&mut svg, r, 400.0);
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).map_err(|e| format!("writing the chart to {}: {e}", path.display()))
}
