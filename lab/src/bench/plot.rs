//! Plain SVG plots for the benchmark (no plotting crate needed).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::Report;

const W: f64 = 640.0;
const H: f64 = 360.0;
const L: f64 = 70.0;
const B: f64 = 60.0;
const T: f64 = 40.0;
const COLORS: [&str; 6] = ["#c0392b", "#e67e22", "#7f8c8d", "#95a5a6", "#2980b9", "#27ae60"];

fn frame(title: &str, ylabel: &str) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        W / 2.0
    );
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{ylabel}</text>",
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    let _ = writeln!(s, "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", H - B, W - 20.0, H - B);
    let _ = writeln!(s, "<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>", H - B);
    s
}

fn yaxis(s: &mut String, max: f64) {
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = H - B - (H - B - T) * f64::from(i) / 4.0;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>", L - 6.0, y + 4.0);
        let _ = writeln!(s, "<line x1=\"{L}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>", W - 20.0);
    }
}

/// Bars per path: router CPU ns per packet, median with min-max whiskers.
pub fn bars(r: &Report) -> String {
    let rows: Vec<(&String, super::Stat)> =
        r.paths.iter().filter_map(|(k, p)| p.router_ns_per_pkt.map(|s| (k, s))).collect();
    let mut s = frame("Router CPU per forwarded packet (64-byte UDP, 1 flow)", "ns per packet");
    let max = rows.iter().map(|(_, st)| st.max).fold(1.0, f64::max) * 1.1;
    yaxis(&mut s, max);
    let n = rows.len().max(1) as f64;
    let slot = (W - 20.0 - L) / n;
    for (i, (name, st)) in rows.iter().enumerate() {
        let x = L + slot * i as f64 + slot * 0.15;
        let bw = slot * 0.7;
        let y = |v: f64| H - B - (H - B - T) * v / max;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
            y(st.median),
            H - B - y(st.median),
            COLORS[i % COLORS.len()]
        );
        let cx = x + bw / 2.0;
        let _ = writeln!(
            s,
            "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
            y(st.min),
            y(st.max)
        );
        let _ = writeln!(
            s,
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>",
            y(st.max) - 5.0,
            st.median
        );
        let _ = writeln!(s, "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\">{name}</text>", H - B + 18.0);
    }
    s + "</svg>\n"
}

/// Fast-path cost per packet against the number of installed flows.
pub fn scaling(r: &Report) -> String {
    let pts: Vec<(f64, f64)> = r.scaling_ns_per_pkt.iter().map(|(n, s)| ((*n as f64).log10(), s.median)).collect();
    let mut s = frame("Fast-path cost vs number of offloaded flows", "ns per packet");
    let max = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    yaxis(&mut s, max);
    let xmax = 6.0;
    let x = |v: f64| L + (W - 40.0 - L) * v / xmax;
    let y = |v: f64| H - B - (H - B - T) * v / max;
    for e in 0..=6 {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">1e{e}</text>",
            x(f64::from(e)),
            H - B + 18.0
        );
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">flows</text>", W / 2.0, H - 15.0);
    let path: Vec<String> = pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
    let _ =
        writeln!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"#2980b9\" stroke-width=\"2\"/>", path.join(" "));
    for (a, b) in &pts {
        let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#2980b9\"/>", x(*a), y(*b));
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{b:.0}</text>", x(*a), y(*b) - 8.0);
    }
    s + "</svg>\n"
}

/// CDF of ping RTT through the router while it is saturated by TCP.
pub fn latency_cdf(r: &Report) -> String {
    let mut s = frame("Ping RTT under load (CDF)", "fraction of pings");
    let all: Vec<f64> = r.paths.values().flat_map(|p| p.ping_loaded_samples.iter().copied()).collect();
    let xmax = all.iter().copied().fold(0.1, f64::max) * 1.05;
    let x = |v: f64| L + (W - 40.0 - L) * v / xmax;
    let y = |v: f64| H - B - (H - B - T) * v;
    for i in 0..=4 {
        let v = f64::from(i) / 4.0;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>", L - 6.0, y(v) + 4.0);
        let xv = xmax * f64::from(i) / 4.0;
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.2}</text>", x(xv), H - B + 18.0);
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">RTT (ms)</text>", W / 2.0, H - 15.0);
    for (i, (name, p)) in r.paths.iter().filter(|(_, p)| !p.ping_loaded_samples.is_empty()).enumerate() {
        let mut v = p.ping_loaded_samples.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len() as f64;
        let pts: Vec<String> =
            v.iter().enumerate().map(|(k, t)| format!("{:.1},{:.1}", x(*t), y((k + 1) as f64 / n))).collect();
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>", pts.join(" "));
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{name}</text>", W - 150.0, T + 16.0 * (i as f64 + 1.0));
    }
    s + "</svg>\n"
}

pub fn write_all(r: &Report, dir: &Path) -> Result<()> {
    std::fs::write(dir.join("router_ns_per_pkt.svg"), bars(r))?;
    std::fs::write(dir.join("scaling.svg"), scaling(r))?;
    std::fs::write(dir.join("latency_cdf.svg"), latency_cdf(r))?;
    Ok(())
}
