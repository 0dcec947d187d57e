//! The HTML report of a run: verdicts, failing sub-histories, a timeline of operations with the
//! fault windows, a latency scatter plot and a throughput plot (inline SVG, no scripts).

use std::collections::HashSet;
use std::fmt::Write;

use crate::record::{FaultWindow, Op, Outcome};
use crate::runner::{RunResult, TestOpts};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "#6DB6FE",
        Outcome::Info => "#FFAA26",
        Outcome::Fail => "#FEB5DA",
    }
}

fn fault_color(kind: &str) -> &'static str {
    match kind {
        "kill" => "#e41a1c",
        "stop" => "#b2182b",
        "pause" => "#984ea3",
        "partition" => "#ff7f00",
        "latency" => "#4daf4a",
        "member" => "#377eb8",
        "compact" => "#a65628",
        "clock" => "#f781bf",
        _ => "#777777",
    }
}

const W: f64 = 1400.0;
const LEFT: f64 = 60.0;

struct Scale {
    t_max: f64,
}

impl Scale {
    fn x(&self, t_ns: u64) -> f64 {
        LEFT + (t_ns as f64 / 1e9) / self.t_max * (W - LEFT - 10.0)
    }
}

fn bands(out: &mut String, s: &Scale, faults: &[FaultWindow], top: f64, height: f64, labels: bool) {
    for f in faults {
        let x0 = s.x(f.start);
        let x1 = s.x(f.end).max(x0 + 1.0);
        let _ = write!(
            out,
            r#"<rect x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{height:.1}" fill="{}" fill-opacity="0.13"><title>{} {:.1}s–{:.1}s: {}</title></rect>"#,
            x1 - x0,
            fault_color(&f.kind),
            esc(&f.kind),
            f.start as f64 / 1e9,
            f.end as f64 / 1e9,
            esc(&f.description)
        );
        if labels {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" fill="{}">{}</text>"#,
                x0 + 2.0,
                top + 10.0,
                fault_color(&f.kind),
                esc(&f.description)
            );
        }
    }
}

fn axis(out: &mut String, s: &Scale, y: f64) {
    let step = if s.t_max > 120.0 {
        20.0
    } else if s.t_max > 40.0 {
        10.0
    } else {
        5.0
    };
    let mut t = 0.0;
    while t <= s.t_max {
        let x = s.x((t * 1e9) as u64);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{t:.0}s</text>"##,
            y + 4.0,
            y + 15.0
        );
        t += step;
    }
}

/// Assigns each operation a lane: per member, the first lane free at its invocation.
fn lanes(ops: &[Op], nodes: usize) -> (Vec<usize>, usize, Vec<(usize, usize)>) {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| (ops[i].node, ops[i].invoke));
    let mut lane_of = vec![0; ops.len()];
    let mut total = 0;
    let mut node_ranges = Vec::new();
    for n in 0..nodes {
        let mut free_at: Vec<u64> = Vec::new();
        for &i in order.iter().filter(|&&i| ops[i].node == n) {
            let o = &ops[i];
            let l = match free_at.iter().position(|&f| f < o.invoke) {
                Some(l) => l,
                None => {
                    free_at.push(0);
                    free_at.len() - 1
                }
            };
            free_at[l] = o.complete.max(o.invoke + 1);
            lane_of[i] = total + l;
        }
        node_ranges.push((total, free_at.len().max(1)));
        total += free_at.len().max(1);
    }
    (lane_of, total, node_ranges)
}

fn timeline(
    ops: &[Op],
    faults: &[FaultWindow],
    s: &Scale,
    nodes: usize,
    hi: &HashSet<u64>,
) -> String {
    let (lane_of, total, ranges) = lanes(ops, nodes);
    let row = if total > 60 { 4.0 } else { 8.0 };
    let top = 20.0;
    let h = top + total as f64 * row + 30.0;
    let mut out =
        format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h:.0}">"#);
    bands(
        &mut out,
        s,
        faults,
        top - 12.0,
        total as f64 * row + 12.0,
        true,
    );
    for (n, (start, len)) in ranges.iter().enumerate() {
        let y = top + *start as f64 * row;
        let _ = write!(
            out,
            r##"<line x1="0" y1="{y:.1}" x2="{W}" y2="{y:.1}" stroke="#ddd"/><text x="4" y="{:.1}" font-size="11">n{}</text>"##,
            y + (*len as f64 * row) / 2.0 + 4.0,
            n + 1
        );
    }
    for (i, o) in ops.iter().enumerate() {
        let x0 = s.x(o.invoke);
        let x1 = s.x(o.complete).max(x0 + 1.0);
        let y = top + lane_of[i] as f64 * row;
        let stroke = if hi.contains(&o.index) {
            r#" stroke="black" stroke-width="1.5""#
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"{stroke}><title>{}</title></rect>"#,
            x1 - x0,
            row - 1.0,
            color(o.outcome),
            esc(&o.describe())
        );
    }
    axis(&mut out, s, top + total as f64 * row + 4.0);
    out.push_str("</svg>");
    out
}

fn latency_plot(ops: &[Op], faults: &[FaultWindow], s: &Scale) -> String {
    let (top, h) = (10.0, 260.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{:.0}">"#,
        h + 40.0
    );
    bands(&mut out, s, faults, top, h, false);
    // y: log10(ms) from -1 (0.1 ms) to 4 (10 s).
    let y = |ms: f64| top + h - ((ms.max(0.1).log10() + 1.0) / 5.0).clamp(0.0, 1.0) * h;
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let yy = y(ms);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{W}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{ms} ms</text>"##,
            LEFT - 4.0,
            yy + 3.0
        );
    }
    for o in ops {
        let ms = o.latency_ns() as f64 / 1e6;
        let _ = write!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}"/>"#,
            s.x(o.invoke),
            y(ms),
            match o.outcome {
                Outcome::Ok => "#1f77b4",
                Outcome::Info => "#ff7f0e",
                Outcome::Fail => "#d62728",
            }
        );
    }
    axis(&mut out, s, top + h + 4.0);
    out.push_str("</svg>");
    out
}

fn rate_plot(ops: &[Op], faults: &[FaultWindow], s: &Scale) -> String {
    let (top, h) = (10.0, 160.0);
    let secs = s.t_max.ceil() as usize + 1;
    let mut counts = vec![[0u32; 3]; secs];
    for o in ops {
        let b = ((o.complete as f64 / 1e9) as usize).min(secs - 1);
        let k = match o.outcome {
            Outcome::Ok => 0,
            Outcome::Fail => 1,
            Outcome::Info => 2,
        };
        counts[b][k] += 1;
    }
    let max = counts
        .iter()
        .flat_map(|c| c.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{:.0}">"#,
        h + 40.0
    );
    bands(&mut out, s, faults, top, h, false);
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{max:.0}/s</text>"#,
        LEFT - 4.0,
        top + 8.0
    );
    for (k, c) in ["#1f77b4", "#d62728", "#ff7f0e"].iter().enumerate() {
        let pts: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    s.x((i as u64) * 1_000_000_000 + 500_000_000),
                    top + h - v[k] as f64 / max * h
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
    }
    axis(&mut out, s, top + h + 4.0);
    out.push_str("</svg>");
    out
}

/// The whole report.
pub fn html(opts: &TestOpts, r: &RunResult, ops: &[Op], faults: &[FaultWindow]) -> String {
    let t_end = ops
        .iter()
        .map(|o| o.complete)
        .chain(faults.iter().map(|f| f.end))
        .max()
        .unwrap_or(1);
    let s = Scale {
        t_max: (t_end as f64 / 1e9).max(1.0),
    };
    let hi: HashSet<u64> = r
        .checks
        .iter()
        .flat_map(|c| c.witness_ops.iter().copied())
        .collect();
    let mut out = String::new();
    let verdict_color = match r.valid {
        crate::record::Valid::True => "#2a2",
        crate::record::Valid::False => "#d22",
        crate::record::Valid::Unknown => "#c80",
    };
    let _ = write!(
        out,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>keel-jepsen {w} {n} seed {seed}</title>
<style>body{{font-family:sans-serif;margin:20px}} pre{{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}} td,th{{padding:2px 10px;text-align:left}} .legend span{{display:inline-block;padding:1px 6px;margin-right:6px}}</style></head><body>
<h1>keel-jepsen: {w} / {n} / seed {seed}</h1>
<p style="font-size:20px">valid: <b style="color:{verdict_color}">{valid}</b></p>
<table><tr><th>nodes</th><td>{nodes}</td><th>time limit</th><td>{tl} s</td><th>concurrency</th><td>{conc}</td><th>rate</th><td>{rate}/s</td></tr>
<tr><th>operations</th><td>{ops}</td><th>ok / fail / info</th><td>{ok} / {fail} / {info}</td><th>faults</th><td>{faults}</td><th>unsafe local reads</th><td>{unsafe_reads}</td></tr></table>
<p>Replay: <code>keel-jepsen test --workload {w} --nemesis {n} --nodes {nodes} --time-limit {tl} --seed {seed} --concurrency {conc} --rate {rate}{unsafe_flag}</code></p>"#,
        w = opts.workload.name(),
        n = opts.nemesis.name(),
        seed = opts.seed,
        valid = r.valid,
        nodes = opts.nodes,
        tl = opts.time_limit_s,
        conc = opts.concurrency,
        rate = opts.rate,
        ops = r.ops,
        ok = r.ok,
        fail = r.fail,
        info = r.info,
        faults = r.faults,
        unsafe_reads = opts.unsafe_local_reads,
        unsafe_flag = if opts.unsafe_local_reads {
            " --unsafe-local-reads"
        } else {
            ""
        },
    );
    out.push_str("<h2>Checks</h2>");
    for c in &r.checks {
        let _ = write!(
            out,
            "<h3>{}: {}</h3><pre>{}</pre>",
            esc(&c.checker),
            c.valid,
            esc(&c.summary.join("\n"))
        );
        if !c.anomalies.is_empty() {
            let _ = write!(
                out,
                "<p>anomalies: {}</p>",
                esc(&format!("{:?}", c.anomalies))
            );
        }
        if !c.witness.is_empty() {
            let _ = write!(
                out,
                "<p>Failing sub-history (highlighted in the timeline):</p><pre>{}</pre>",
                esc(&c.witness.join("\n"))
            );
        }
    }
    out.push_str(
        "<h2>Faults</h2><table><tr><th>kind</th><th>start</th><th>end</th><th>what</th></tr>",
    );
    for f in faults {
        let _ = write!(
            out,
            r#"<tr><td style="color:{}">{}</td><td>{:.1}s</td><td>{:.1}s</td><td>{}</td></tr>"#,
            fault_color(&f.kind),
            esc(&f.kind),
            f.start as f64 / 1e9,
            f.end as f64 / 1e9,
            esc(&f.description)
        );
    }
    out.push_str("</table>");
    let _ = write!(
        out,
        r#"<h2>Timeline</h2><p class="legend"><span style="background:{}">ok</span><span style="background:{}">fail</span><span style="background:{}">info (indeterminate)</span> bands: <span style="color:{}">kill</span><span style="color:{}">stop</span><span style="color:{}">pause</span><span style="color:{}">partition</span><span style="color:{}">latency</span><span style="color:{}">member</span><span style="color:{}">compact</span><span style="color:{}">clock</span>; hover for details; rows are members (lanes per concurrent operation).</p>"#,
        color(Outcome::Ok),
        color(Outcome::Fail),
        color(Outcome::Info),
        fault_color("kill"),
        fault_color("stop"),
        fault_color("pause"),
        fault_color("partition"),
        fault_color("latency"),
        fault_color("member"),
        fault_color("compact"),
        fault_color("clock")
    );
    out.push_str(&timeline(ops, faults, &s, opts.nodes, &hi));
    out.push_str("<h2>Latency</h2><p>Each dot is one operation at its invocation time (log scale); blue ok, red fail, orange info.</p>");
    out.push_str(&latency_plot(ops, faults, &s));
    out.push_str(
        "<h2>Throughput</h2><p>Completions per second: blue ok, red fail, orange info.</p>",
    );
    out.push_str(&rate_plot(ops, faults, &s));
    out.push_str("</body></html>\n");
    out
}
