//! The plot: delivered packets per second per system (offered behind it), as an SVG
//! bar chart written by hand.
use std::fmt::Write as _;

use crate::report::Report;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum at or above `x`.
fn axis_max(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&v| v >= x)
        .unwrap_or(10.0 * magnitude)
}

pub fn throughput(report: &Report) -> String {
    let runs = report
        .throughput
        .as_ref()
        .map(|t| t.runs.as_slice())
        .unwrap_or_default();
    let (left, right, top, bar, gap) = (300.0, 140.0, 70.0, 26.0, 18.0);
    let width = 1000.0;
    let plot_w = width - left - right;
    let height = top + runs.len().max(1) as f64 * (bar + gap) + 60.0;
    let max = axis_max(
        runs.iter()
            .map(|r| r.offered_pps.max(r.delivered_pps))
            .fold(0.0, f64::max),
    );
    let x = |v: f64| left + plot_w * (v / max).clamp(0.0, 1.0);
    let st = &report.stamp;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="26" font-size="17" font-weight="bold">Delivered packets per second (900-byte INVITEs, veth, generator on one CPU)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="48" fill="#555">{} run {} - kernel {} - {} - commit {}</text>"##,
        escape(st.mode),
        escape(&st.date),
        escape(&st.kernel),
        escape(&st.cpu),
        escape(&st.commit)
    );
    for i in 0..=5 {
        let v = max * f64::from(i) / 5.0;
        let gx = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            height - 50.0,
            height - 32.0,
            if v >= 1e6 {
                format!("{:.1} M", v / 1e6)
            } else {
                format!("{:.0} k", v / 1e3)
            }
        );
    }
    for (i, r) in runs.iter().enumerate() {
        let y = top + i as f64 * (bar + gap) + gap / 2.0;
        let colour = match r.key {
            "ceiling" => "#7f7f7f",
            "native" | "skb" => "#1f77b4",
            "kamailio" => "#d62728",
            _ => "#ff7f0e",
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 10.0,
            y + bar * 0.68,
            escape(r.label)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y:.1}" width="{:.1}" height="{bar}" fill="{colour}" fill-opacity="0.18"/>"##,
            x(r.offered_pps) - left
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y:.1}" width="{:.1}" height="{bar}" fill="{colour}"/>"##,
            x(r.delivered_pps) - left
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}">{:.0} k ({:.0} % lost)</text>"##,
            x(r.offered_pps.max(r.delivered_pps)) + 6.0,
            y + bar * 0.68,
            r.delivered_pps / 1e3,
            r.loss * 100.0
        );
    }
    if runs.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{:.1}">throughput not measured in this run</text>"#,
            top + 20.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{:.1}" fill="#555">solid: delivered to the backends (to the socket for "no XDP"); pale: offered by the generator</text>"##,
        height - 10.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima() {
        assert_eq!(axis_max(830_000.0), 1_000_000.0);
        assert_eq!(axis_max(1_200_000.0), 1_500_000.0);
        assert_eq!(axis_max(2_100_000.0), 2_500_000.0);
        assert_eq!(axis_max(279_000.0), 300_000.0);
        assert_eq!(axis_max(0.0), 1.0);
    }
}
