//! The aggregate page of a request file (the paper's Figure 5 and 6 analogs): deterministic
//! inline SVG in one self-contained HTML page.

use super::{esc, label, line_plot_svg, num, range, ticks, Svg, BOLD, END, MID, SERIES_COLOURS};
use super::{PAGE_STYLE, SMALL};
use crate::lens::aggregate::{AggregateReport, Segment, Spread};

/// One series of a band plot: (x, low, middle, high) points.
struct Band {
    name: String,
    points: Vec<(f64, f64, f64, f64)>,
}

/// Lines through the middle values with a shaded band from low to high, axes with round ticks,
/// the axis labels and a legend.
fn band_plot_svg(title: &str, x_label: &str, y_label: &str, bands: &[Band]) -> String {
    let (w, h, left, right, top, bottom) = (600.0, 340.0, 60.0, 170.0, 34.0, 48.0);
    let (x0, x1) = range(bands.iter().flat_map(|b| b.points.iter().map(|p| p.0)));
    let ys = bands
        .iter()
        .flat_map(|b| b.points.iter().flat_map(|p| [p.1, p.2, p.3]));
    let (y0, y1) = range(ys);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let mut o = Svg::new(w, h, true);
    o.text((left, 20.0), BOLD, &label(title, 70));
    o.rect((left, top, pw, ph), " fill=\"none\" stroke=\"#444\"");
    let (xs, xd) = ticks(x0, x1, 6);
    for x in xs {
        o.line((sx(x), top, sx(x), top + ph), " stroke=\"#eee\"");
        let at = (sx(x), top + ph + 14.0);
        o.text(at, &format!("{MID}{SMALL}"), &format!("{x:.xd$}"));
    }
    let (yt, yd) = ticks(y0, y1, 5);
    for y in yt {
        o.line((left, sy(y), left + pw, sy(y)), " stroke=\"#eee\"");
        let at = (left - 4.0, sy(y) + 3.5);
        o.text(at, &format!("{END}{SMALL}"), &format!("{y:.yd$}"));
    }
    o.text((left + pw / 2.0, h - 10.0), MID, &label(x_label, 60));
    let rotate = format!(" transform=\"rotate(-90 14 {:.1})\"{MID}", top + ph / 2.0);
    o.text((14.0, top + ph / 2.0), &rotate, &label(y_label, 40));
    for (i, b) in bands.iter().enumerate() {
        let c = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let upper = b.points.iter().map(|p| (p.0, p.3));
        let lower = b.points.iter().rev().map(|p| (p.0, p.1));
        let outline: Vec<String> = upper
            .chain(lower)
            .map(|(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let band = format!(" fill=\"{c}\" fill-opacity=\"0.18\" stroke=\"none\"");
        let polygon = format!("<polygon points=\"{}\"{band}/>\n", outline.join(" "));
        o.0.push_str(&polygon);
        let mid: Vec<String> = b
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.2)))
            .collect();
        let stroke = format!(" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.8\"");
        o.0.push_str(&format!(
            "<polyline points=\"{}\"{stroke}/>\n",
            mid.join(" ")
        ));
        for &(x, lo, m, hi) in &b.points {
            let tip = esc(&format!(
                "{}: x {} median {} [{}, {}]",
                b.name,
                x,
                num(m),
                num(lo),
                num(hi)
            ));
            let dot = format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.6\" fill=\"{c}\">",
                sx(x),
                sy(m)
            );
            o.0.push_str(&format!("{dot}<title>{tip}</title></circle>\n"));
        }
        let ly = top + 8.0 + i as f64 * 16.0;
        let key = format!(" stroke=\"{c}\" stroke-width=\"2.5\"");
        o.line((left + pw + 12.0, ly, left + pw + 30.0, ly), &key);
        o.text((left + pw + 36.0, ly + 4.0), "", &label(&b.name, 18));
    }
    o.finish()
}

/// A rank statistic: whole numbers as such, others with one decimal.
fn rank(v: f64) -> String {
    match v.fract() == 0.0 {
        true => format!("{v:.0}"),
        false => format!("{v:.1}"),
    }
}

/// Share of records whose target is top-1 in −δ at the last token, per layer.
fn top1_plot(r: &AggregateReport) -> String {
    let points = r
        .layers
        .iter()
        .map(|l| (l.layer as f64, l.top1_neg_d2))
        .collect();
    line_plot_svg(
        "share of records with the target top-1 in −δ (last token)",
        "layer",
        &[("−δ top-1".to_string(), points)],
    )
}

/// log10(1 + v).
fn log1p10(v: f64) -> f64 {
    (1.0 + v).log10()
}

/// Mean of a reading per layer, one series per segment.
fn segment_plot(r: &AggregateReport, title: &str, d2: bool) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = Segment::ALL
        .iter()
        .map(|&s| {
            let points = r
                .layers
                .iter()
                .filter_map(|l| {
                    let by = if d2 { &l.norm_d2 } else { &l.norm_x1 };
                    Some((l.layer as f64, by.get(s).as_ref()?.mean))
                })
                .collect();
            (s.name().to_string(), points)
        })
        .collect();
    line_plot_svg(title, "layer", &series)
}

/// The target's rank in x1 and −δ per layer: median with the interquartile band.
fn rank_plot(r: &AggregateReport) -> String {
    let band = |name: &str, f: fn(&crate::lens::aggregate::AggregateLayer) -> &Spread| Band {
        name: name.to_string(),
        points: r
            .layers
            .iter()
            .map(|l| {
                let s = f(l);
                (
                    l.layer as f64,
                    log1p10(s.q25),
                    log1p10(s.median),
                    log1p10(s.q75),
                )
            })
            .collect(),
    };
    band_plot_svg(
        "target rank at the last token (median, quartiles)",
        "layer",
        "log10(1 + rank)",
        &[
            band("x1 (FF1 input)", |l| &l.rank_x1),
            band("−δ (FF2 grad.)", |l| &l.rank_neg_d2),
        ],
    )
}

/// One self-contained HTML page (inline CSS and SVG, no script) for a request file: the
/// Figure 5 analog (mean ‖δ‖ and ‖x1‖ per layer by prompt segment), the Figure 6 analog (the
/// target's rank in x1 and −δ per layer) and a table of every layer's numbers. `title` names
/// the model and the data.
pub fn aggregate_html(r: &AggregateReport, title: &str) -> String {
    let t = esc(title);
    let c = &r.segment_tokens;
    let (prefix, subject, relation, last) = (c.prefix, c.subject, c.relation, c.last);
    let d2 = segment_plot(r, "mean ‖δ‖ (VJP at FF2 output) by prompt segment", true);
    let x1 = segment_plot(r, "mean ‖x1‖ (FF1 input) by prompt segment", false);
    let ranks = rank_plot(r);
    let top1 = top1_plot(r);
    let cell = |s: &Option<Spread>| s.as_ref().map_or("–".into(), |s| num(s.mean));
    let spread = |s: &Spread| format!("{} [{}, {}]", rank(s.median), rank(s.q25), rank(s.q75));
    let rows: String = r
        .layers
        .iter()
        .map(|l| {
            let segs: String = Segment::ALL
                .iter()
                .map(|&s| format!("<td>{}</td>", cell(l.norm_d2.get(s))))
                .collect();
            format!(
                "<tr><td>{}</td>{segs}<td>{}</td><td>{}</td><td>{:.2}</td></tr>\n",
                l.layer,
                spread(&l.rank_x1),
                spread(&l.rank_neg_d2),
                l.top1_neg_d2
            )
        })
        .collect();
    let n = r.records;
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n\
         <style>\n{PAGE_STYLE}\n.row {{ display: flex; gap: 12px; flex-wrap: wrap; }}\n\
         table {{ border-collapse: collapse; font: 12px ui-monospace, monospace; }}\n\
         td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}\n</style>\n</head>\n<body>\n\
         <h1>{t}</h1>\n\
         <p>{n} records, one backward pass each (L = −log p(first target token) after the prompt). \
         Prompt tokens by segment, over all records: {prefix} before the subject, {subject} subject, \
         {relation} relation (between the subject and the last token), {last} last.</p>\n\
         <figure>\n<div class=\"row\">\n{d2}{x1}</div>\n<figcaption>Figure 5 analog: per layer, the mean over \
         records of each record's mean norm over the segment's tokens.</figcaption>\n</figure>\n\
         <figure>\n<div class=\"row\">\n{ranks}{top1}</div>\n<figcaption>Figure 6 analog: the target's rank (0 = top-1) when x1 and −δ at the \
         last token are projected through the final norm and the unembedding; line = median over records, \
         band = first to third quartile; right, the share of records whose target is −δ's top-1.</figcaption>\n</figure>\n\
         <table>\n<tr><th>layer</th><th>‖δ‖ prefix</th><th>‖δ‖ subject</th><th>‖δ‖ relation</th>\
         <th>‖δ‖ last</th><th>rank in x1: median [q25, q75]</th><th>rank in −δ: median [q25, q75]</th>\
         <th>top-1 in −δ</th></tr>\n{rows}</table>\n</body>\n</html>\n"
    )
}
