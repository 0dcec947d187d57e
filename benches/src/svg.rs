//! A small SVG writer for the report: line charts (linear or log axes, numeric or categorical
//! x), horizontal bar charts, and grids of charts. No dependencies; the output is plain SVG 1.1
//! that browsers and GitHub render.

use std::fmt::Write;

pub const KEEL: &str = "#d9480f";
pub const ETCD: &str = "#1c7ed6";
const GRID: &str = "#dee2e6";
const TEXT: &str = "#212529";
const FONT: &str = "font-family=\"DejaVu Sans, Arial, sans-serif\"";

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    pub dashed: bool,
    /// (x, y); with categorical x, x is the category index.
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    /// Category names: x values are indexes into them.
    pub categories: Option<Vec<String>>,
    pub series: Vec<Series>,
    pub width: f64,
    pub height: f64,
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn header(w: f64, h: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" {FONT} font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    )
}

/// Human number: 1 234 567 → "1.2M", 0.25 → "0.25".
pub fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Tick values covering `[lo, hi]`: 1-2-5 steps on a linear axis, powers of ten (with 2 and 5
/// between them when the range is under three decades) on a log axis.
pub fn ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    if log {
        let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        let mults: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
        let mut out = Vec::new();
        for e in a..=b {
            for m in mults {
                let v = m * 10f64.powi(e);
                if v >= lo * 0.999 && v <= hi * 1.001 {
                    out.push(v);
                }
            }
        }
        out
    } else {
        let span = (hi - lo).max(1e-12);
        let raw = span / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| span / s <= 6.0)
            .unwrap_or(10.0 * mag);
        let mut v = (lo / step).ceil() * step;
        let mut out = Vec::new();
        while v <= hi + step * 1e-9 {
            out.push(v);
            v += step;
        }
        out
    }
}

/// The axis range for values in `[lo, hi]`.
fn axis_range(lo: f64, hi: f64, log: bool) -> (f64, f64) {
    if log {
        let lo = lo.max(1e-9);
        let hi = hi.max(lo * 1.0001);
        let a = 10f64.powf(lo.log10().floor());
        let b = 10f64.powf(hi.log10().ceil());
        // Tighter than whole decades when the data sits in one: use 1-2-5 bounds.
        let lo_b = [5.0, 2.0, 1.0]
            .iter()
            .map(|m| m * a)
            .find(|v| *v <= lo)
            .unwrap_or(a);
        let hi_b = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * b / 10.0)
            .find(|v| *v >= hi)
            .unwrap_or(b);
        (lo_b, hi_b)
    } else {
        let lo = lo.min(0.0);
        let t = ticks(lo, hi.max(lo + 1e-9), false);
        let step = if t.len() > 1 {
            t[1] - t[0]
        } else {
            hi.max(1.0)
        };
        (lo, (hi / step).ceil() * step)
    }
}

impl LineChart {
    pub fn render(&self) -> String {
        let mut s = header(self.width, self.height);
        s += &self.body();
        s += "</svg>\n";
        s
    }

    /// The chart's elements, for [`grid`] or [`LineChart::render`].
    pub fn body(&self) -> String {
        let (w, h) = (self.width, self.height);
        let (ml, mr, mt, mb) = (62.0, 130.0, 30.0, 42.0);
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"18\" font-size=\"14\" font-weight=\"bold\" fill=\"{TEXT}\">{}</text>",
            ml,
            esc(&self.title)
        );
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|se| se.points.iter().copied())
            .filter(|(x, y)| {
                x.is_finite()
                    && y.is_finite()
                    && (!self.y_log || *y > 0.0)
                    && (!self.x_log || *x > 0.0)
            })
            .collect();
        if pts.is_empty() {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{TEXT}\">no data</text>",
                ml + 10.0,
                mt + ph / 2.0
            );
            return s;
        }
        let (xlo, xhi) = match &self.categories {
            Some(c) => (-0.5, c.len() as f64 - 0.5),
            None => {
                let lo = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
                let hi = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
                if self.x_log {
                    (lo / 1.5, hi * 1.5)
                } else {
                    (lo.min(0.0), hi * 1.05)
                }
            }
        };
        let ylo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let yhi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (ylo, yhi) = axis_range(ylo, yhi, self.y_log);
        let fx = |x: f64| {
            let t = if self.x_log && self.categories.is_none() {
                (x.ln() - xlo.ln()) / (xhi.ln() - xlo.ln())
            } else {
                (x - xlo) / (xhi - xlo)
            };
            ml + t * pw
        };
        let fy = |y: f64| {
            let t = if self.y_log {
                (y.ln() - ylo.ln()) / (yhi.ln() - ylo.ln())
            } else {
                (y - ylo) / (yhi - ylo)
            };
            mt + ph - t * ph
        };
        // Grid and y ticks.
        for t in ticks(ylo, yhi, self.y_log) {
            let y = fy(t);
            let _ = writeln!(
                s,
                "<line x1=\"{ml}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{GRID}\"/>",
                ml + pw
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{TEXT}\">{}</text>",
                ml - 6.0,
                y + 4.0,
                human(t)
            );
        }
        // X ticks: categories, or the data's x values.
        let xt: Vec<(f64, String)> = match &self.categories {
            Some(c) => c
                .iter()
                .enumerate()
                .map(|(i, n)| (i as f64, n.clone()))
                .collect(),
            None => {
                let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
                xs.sort_by(f64::total_cmp);
                xs.dedup();
                xs.into_iter().map(|x| (x, human(x))).collect()
            }
        };
        for (x, label) in xt {
            let px = fx(x);
            let _ = writeln!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{mt}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"{GRID}\"/>",
                mt + ph
            );
            let _ = writeln!(
                s,
                "<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{TEXT}\">{}</text>",
                mt + ph + 16.0,
                esc(&label)
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" stroke=\"#868e96\"/>"
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{TEXT}\">{}</text>",
            ml + pw / 2.0,
            h - 8.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            "<text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{TEXT}\" transform=\"rotate(-90 14 {:.1})\">{}</text>",
            mt + ph / 2.0,
            mt + ph / 2.0,
            esc(&self.y_label)
        );
        // Series and legend.
        for (i, se) in self.series.iter().enumerate() {
            let p: Vec<(f64, f64)> = se
                .points
                .iter()
                .copied()
                .filter(|(x, y)| pts.contains(&(*x, *y)))
                .collect();
            let dash = if se.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            if p.len() > 1 {
                let path: Vec<String> = p
                    .iter()
                    .map(|(x, y)| format!("{:.1},{:.1}", fx(*x), fy(*y)))
                    .collect();
                let _ = writeln!(
                    s,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
                    path.join(" "),
                    se.color
                );
            }
            for (x, y) in &p {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"><title>{}: {}</title></circle>",
                    fx(*x),
                    fy(*y),
                    se.color,
                    esc(&se.name),
                    human(*y)
                );
            }
            let ly = mt + 10.0 + i as f64 * 18.0;
            let lx = ml + pw + 12.0;
            let _ = writeln!(
                s,
                "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
                lx + 22.0,
                se.color
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{TEXT}\">{}</text>",
                lx + 28.0,
                ly + 4.0,
                esc(&se.name)
            );
        }
        s
    }
}

/// Charts laid out `cols` per row, each at its own size (taken from the first chart).
pub fn grid(charts: &[LineChart], cols: usize) -> String {
    let cols = cols.max(1);
    let (cw, ch) = charts
        .first()
        .map(|c| (c.width, c.height))
        .unwrap_or((400.0, 300.0));
    let rows = charts.len().div_ceil(cols).max(1);
    let mut s = header(cw * cols.min(charts.len().max(1)) as f64, ch * rows as f64);
    for (i, c) in charts.iter().enumerate() {
        let (x, y) = ((i % cols) as f64 * cw, (i / cols) as f64 * ch);
        let _ = writeln!(s, "<g transform=\"translate({x},{y})\">");
        s += &c.body();
        s += "</g>\n";
    }
    s += "</svg>\n";
    s
}

/// Horizontal bars (label, value) on a log axis, with labelled reference lines.
pub fn bars(
    title: &str,
    x_label: &str,
    items: &[(String, f64, String)],
    refs: &[(f64, &str)],
) -> String {
    let row = 24.0;
    let (ml, mr, mt, mb) = (190.0, 70.0, 52.0, 44.0);
    let w = 760.0;
    let h = mt + mb + row * items.len().max(1) as f64;
    let pw = w - ml - mr;
    let mut s = header(w, h);
    let _ = writeln!(
        s,
        "<text x=\"{ml}\" y=\"20\" font-size=\"14\" font-weight=\"bold\" fill=\"{TEXT}\">{}</text>",
        esc(title)
    );
    let vals: Vec<f64> = items
        .iter()
        .map(|i| i.1)
        .chain(refs.iter().map(|r| r.0))
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).min(0.5);
    let hi = vals
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(2.0);
    let (lo, hi) = axis_range(lo, hi, true);
    let fx = |v: f64| ml + (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()) * pw;
    let base = fx(1.0_f64.clamp(lo, hi));
    for t in ticks(lo, hi, true) {
        let x = fx(t);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{mt}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{GRID}\"/>",
            h - mb
        );
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{TEXT}\">{}×</text>",
            h - mb + 16.0,
            human(t)
        );
    }
    for (i, (label, v, color)) in items.iter().enumerate() {
        let y = mt + i as f64 * row;
        let x = fx(*v);
        let (x0, x1) = if x < base { (x, base) } else { (base, x) };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{TEXT}\">{}</text>",
            ml - 8.0,
            y + row * 0.65,
            esc(label)
        );
        if v.is_finite() && *v > 0.0 {
            let _ = writeln!(
                s,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}: {}×</title></rect>",
                y + 4.0,
                (x1 - x0).max(1.0),
                row - 8.0,
                esc(label),
                human(*v)
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{TEXT}\">{}×</text>",
                x.max(base) + 4.0,
                y + row * 0.65,
                human(*v)
            );
        }
    }
    for (v, label) in refs {
        let x = fx(*v);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{TEXT}\" stroke-dasharray=\"4 3\"/>",
            mt - 4.0,
            h - mb
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"{TEXT}\">{}</text>",
            x,
            mt - 10.0,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{TEXT}\">{}</text>",
        ml + pw / 2.0,
        h - 8.0,
        esc(x_label)
    );
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_choices() {
        assert_eq!(
            ticks(0.0, 100.0, false),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(ticks(1.0, 1000.0, true), vec![1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(ticks(1.0, 10.0, true), vec![1.0, 2.0, 5.0, 10.0]);
    }

    #[test]
    fn humans() {
        assert_eq!(human(1_234_567.0), "1.23M");
        assert_eq!(human(25_000.0), "25k");
        assert_eq!(human(0.25), "0.25");
        assert_eq!(human(32.0), "32");
    }

    #[test]
    fn renders_well_formed_svg() {
        let c = LineChart {
            title: "a <b>".into(),
            x_label: "clients".into(),
            y_label: "ops/s".into(),
            x_log: true,
            y_log: true,
            categories: None,
            series: vec![Series {
                name: "keel".into(),
                color: KEEL.into(),
                dashed: false,
                points: vec![(1.0, 100.0), (32.0, 5000.0), (256.0, 9000.0)],
            }],
            width: 500.0,
            height: 300.0,
        };
        let s = c.render();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("a &lt;b&gt;"));
        assert!(s.contains("<polyline"));
        assert_eq!(s.matches("<circle").count(), 3);
        let g = grid(&[c.clone(), c], 2);
        assert_eq!(g.matches("<g transform").count(), 2);
        let b = bars(
            "r",
            "x",
            &[
                ("put".into(), 1.5, KEEL.into()),
                ("get".into(), 0.5, ETCD.into()),
            ],
            &[(1.0, "parity")],
        );
        assert_eq!(b.matches("<rect").count(), 3);
    }
}
