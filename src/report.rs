//! Figures for a [`LensReport`]: the lens grid (the paper's Figure 11), the FF2 gradient-norm
//! heatmaps (Figure 16), the layer × layer cosine of residual-stream VJPs (Appendix G), one
//! self-contained HTML page holding them, and a generic line plot for
//! evaluation sweeps. Output is deterministic and every piece of text is XML-escaped.

pub mod analyses;

use crate::lens::{Cell, LensReport, Projection};

const CELL_W: f64 = 78.0;
const CELL_H: f64 = 18.0;
/// Room left of each panel for the layer labels.
const LEFT: f64 = 46.0;
/// Heading and panel titles.
const TOP: f64 = 64.0;
/// Token labels, positions and legend.
const BOTTOM: f64 = 92.0;
const MONO: &str = "ui-monospace, Menlo, Consolas, 'DejaVu Sans Mono', monospace";
const MID: &str = " text-anchor=\"middle\"";
const END: &str = " text-anchor=\"end\"";
const SMALL: &str = " font-size=\"10\" fill=\"#333\"";
const BOLD: &str = " font-size=\"13\" font-weight=\"bold\"";
const GREY: &str = " fill=\"#444\"";
/// Colour of the last subject token's marks.
const SUBJECT: &str = "#b00020";
/// Target rank colours (0xRRGGBB), strongest (rank 0) to palest (rank ≥ 10000).
const RANK_COLOURS: [u32; 5] = [0x67000d, 0xcb181d, 0xfb6a4a, 0xfcbba1, 0xfff5f0];
/// Norm colours (0xRRGGBB), smallest to largest.
const NORM_COLOURS: [u32; 5] = [0xf7fbff, 0xc6dbef, 0x6baed6, 0x2171b5, 0x08306b];
const SERIES_COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Escapes text for XML and HTML; characters XML cannot hold become U+FFFD.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            '\u{FFFE}' | '\u{FFFF}' => out.push('\u{FFFD}'),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A token as a short one-line label: whitespace and control characters made visible, at
/// most `max` characters, escaped.
fn label(token: &str, max: usize) -> String {
    let visible: String = token
        .chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\t' => '⇥',
            '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => '\u{FFFD}',
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect();
    let visible = match visible.trim().is_empty() {
        true => "␣".repeat(visible.chars().count().clamp(1, 3)),
        false => visible,
    };
    let mut short: String = visible.chars().take(max).collect();
    if short.len() < visible.len() {
        short = short
            .chars()
            .take(max.saturating_sub(1))
            .chain(['…'])
            .collect();
    }
    esc(&short)
}

/// A number in at most about seven characters.
fn num(v: f64) -> String {
    if !v.is_finite() || v == 0.0 {
        format!("{v}")
    } else if (1e-2..1e4).contains(&v.abs()) {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// Colour at `t` in 0..=1 along a piecewise-linear palette.
fn colour(palette: &[u32], t: f64) -> String {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let f = t * (palette.len() - 1) as f64;
    let i = (f as usize).min(palette.len() - 2);
    let (a, b, u) = (palette[i], palette[i + 1], f - i as f64);
    let mix = |shift: u32| {
        let (x, y) = (((a >> shift) & 255) as f64, ((b >> shift) & 255) as f64);
        (x + (y - x) * u).round() as u32
    };
    format!("#{:06x}", mix(16) << 16 | mix(8) << 8 | mix(0))
}

/// Whether text on `fill` (a "#rrggbb" colour) should be white.
fn dark(fill: &str) -> bool {
    let hex = |i: usize| {
        fill.get(i..i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
    };
    let ch = |i: usize| hex(i).unwrap_or(255) as f64;
    0.299 * ch(1) + 0.587 * ch(3) + 0.114 * ch(5) < 140.0
}

/// Position on the rank colour scale: log10(rank + 1) / 4, so rank ≥ 9999 is palest.
fn rank_t(rank: usize) -> f64 {
    ((rank as f64 + 1.0).log10() / 4.0).min(1.0)
}

/// An SVG being written.
struct Svg(String);

impl Svg {
    /// Opens an SVG with a white background; inline SVG in HTML needs no namespace.
    fn new(w: f64, h: f64, standalone: bool) -> Svg {
        let ns = if standalone {
            " xmlns=\"http://www.w3.org/2000/svg\""
        } else {
            ""
        };
        Svg(format!(
            "<svg{ns} width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" \
             font-family=\"{MONO}\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
        ))
    }

    /// A `<text>` at (x, y); `attrs` holds extra attributes, `body` is already escaped.
    fn text(&mut self, (x, y): (f64, f64), attrs: &str, body: &str) {
        let e = format!("<text x=\"{x:.1}\" y=\"{y:.1}\"{attrs}>{body}</text>\n");
        self.0.push_str(&e);
    }

    /// A `<rect>` at (x, y, width, height) with extra attributes.
    fn rect(&mut self, (x, y, w, h): (f64, f64, f64, f64), attrs: &str) {
        let e = format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.2}\" height=\"{h:.1}\"{attrs}/>\n"
        );
        self.0.push_str(&e);
    }

    /// A `<line>` from (x1, y1) to (x2, y2) with extra attributes.
    fn line(&mut self, (x1, y1, x2, y2): (f64, f64, f64, f64), attrs: &str) {
        let e =
            format!("<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\"{attrs}/>\n");
        self.0.push_str(&e);
    }

    fn finish(mut self) -> String {
        self.0.push_str("</svg>\n");
        self.0
    }
}

/// What one heatmap cell shows: fill colour, escaped text, bold text, tooltip (unescaped).
struct CellView {
    fill: String,
    text: String,
    bold: bool,
    tip: String,
}

/// A colour bar: palette, caption and (t, text) tick labels.
struct Legend {
    palette: &'static [u32],
    caption: String,
    ticks: Vec<(f64, String)>,
}

type CellFn<'a> = Box<dyn Fn(usize, &Cell) -> CellView + 'a>;

/// One layer × token heatmap.
struct Panel<'a> {
    title: String,
    view: CellFn<'a>,
    legend: Legend,
}

impl<'a> Panel<'a> {
    fn new(
        title: &str,
        view: impl Fn(usize, &Cell) -> CellView + 'a,
        palette: &'static [u32],
        caption: &str,
        ticks: Vec<(f64, String)>,
    ) -> Panel<'a> {
        Panel {
            title: title.to_string(),
            view: Box::new(view),
            legend: Legend {
                palette,
                caption: caption.to_string(),
                ticks,
            },
        }
    }
}

fn legend_svg(o: &mut Svg, g: &Legend, x: f64, y: f64, w: f64) {
    o.text((x, y - 4.0), GREY, &esc(&g.caption));
    let (steps, step_w) = (48, w / 48.0);
    for i in 0..steps {
        let fill = format!(
            " fill=\"{}\"",
            colour(g.palette, (i as f64 + 0.5) / steps as f64)
        );
        o.rect((x + step_w * i as f64, y, step_w + 0.3, 10.0), &fill);
    }
    o.rect((x, y, w, 10.0), " fill=\"none\" stroke=\"#888\"");
    for (t, tick) in &g.ticks {
        let anchor = match t {
            t if *t <= 0.0 => "",
            t if *t >= 1.0 => END,
            _ => MID,
        };
        let attrs = format!("{anchor}{SMALL}");
        o.text((x + w * t.clamp(0.0, 1.0), y + 22.0), &attrs, &esc(tick));
    }
}

/// Draws panels side by side: rows are layers (layer 0 at the bottom), columns prompt tokens.
fn heatmap_figure(r: &LensReport, subtitle: &str, panels: &[Panel], standalone: bool) -> String {
    let (n_tok, n_rows) = (r.tokens.len(), r.layers.len());
    let (grid_w, grid_h) = (n_tok as f64 * CELL_W, n_rows as f64 * CELL_H);
    let width = (panels.len() as f64 * (LEFT + grid_w) + 16.0).max(560.0);
    let subject = r.claims.last_subject_pos.filter(|&p| p < n_tok);
    let max_chars = (width / 7.0) as usize;
    let mut o = Svg::new(width, TOP + grid_h + BOTTOM, standalone);
    o.text((8.0, 18.0), BOLD, &label(&heading(r), max_chars));
    o.text((8.0, 35.0), GREY, &label(subtitle, max_chars));
    let marked =
        format!("{MID} font-weight=\"bold\" text-decoration=\"underline\" fill=\"{SUBJECT}\"");
    let (layer_attrs, pos_attrs) = (
        format!("{END}{SMALL}"),
        format!("{MID} font-size=\"9\" fill=\"#888\""),
    );
    for (k, panel) in panels.iter().enumerate() {
        let x0 = LEFT + k as f64 * (LEFT + grid_w);
        o.text((x0, TOP - 8.0), BOLD, &esc(&panel.title));
        o.text((x0 - 4.0, TOP - 8.0), &layer_attrs, "layer");
        for (i, layer) in r.layers.iter().enumerate() {
            let y = TOP + (n_rows - 1 - i) as f64 * CELL_H;
            o.text((x0 - 4.0, y + 13.0), END, &format!("L{}", layer.layer));
            o.rect((x0, y, grid_w, CELL_H), " fill=\"#f4f4f4\"");
            for cell in layer.cells.iter().filter(|c| c.pos < n_tok) {
                let v = (panel.view)(layer.layer, cell);
                let x = x0 + cell.pos as f64 * CELL_W;
                let ink = if dark(&v.fill) { "#fff" } else { "#111" };
                let weight = if v.bold { " font-weight=\"bold\"" } else { "" };
                o.0.push_str(&format!(
                    "<g class=\"cell\"><title>{}</title>\n",
                    esc(&v.tip)
                ));
                let fill = format!(" fill=\"{}\" stroke=\"#fff\" stroke-width=\"0.5\"", v.fill);
                o.rect((x, y, CELL_W, CELL_H), &fill);
                let attrs = format!("{MID} fill=\"{ink}\"{weight}");
                o.text((x + CELL_W / 2.0, y + 13.0), &attrs, &v.text);
                o.0.push_str("</g>\n");
            }
        }
        let y_lab = TOP + grid_h + 14.0;
        for (p, tok) in r.tokens.iter().enumerate() {
            let cx = x0 + (p as f64 + 0.5) * CELL_W;
            match subject == Some(p) {
                true => o.text((cx, y_lab), &marked, &format!("{}*", label(tok, 9))),
                false => o.text((cx, y_lab), MID, &label(tok, 9)),
            }
            o.text((cx, y_lab + 12.0), &pos_attrs, &p.to_string());
        }
        if let Some(p) = subject {
            let outline = format!(" fill=\"none\" stroke=\"{SUBJECT}\" stroke-width=\"2\"");
            o.rect((x0 + p as f64 * CELL_W, TOP, CELL_W, grid_h), &outline);
        }
        let legend_w = grid_w.clamp(200.0, 300.0);
        legend_svg(&mut o, &panel.legend, x0, y_lab + 42.0, legend_w);
    }
    o.finish()
}

fn token_at(r: &LensReport, pos: usize) -> &str {
    r.tokens.get(pos).map(String::as_str).unwrap_or("?")
}

fn norms_line(c: &Cell) -> String {
    let n = |v: f32| num(v as f64);
    let (x1, d2, a, g) = (n(c.norm_x1), n(c.norm_d2), n(c.norm_a), n(c.grad_norm));
    format!("‖x1‖ = {x1}  ‖δ‖ = {d2}  ‖a‖ = {a}  ‖δ‖·‖a‖ = {g}")
}

fn heading(r: &LensReport) -> String {
    format!("Backward Lens: {:?} → {:?}", r.prompt, r.target)
}

fn subtitle(r: &LensReport, what: &str) -> String {
    let subject = match r.claims.last_subject_pos {
        Some(_) => "; * = last subject token",
        None => "",
    };
    let (p, loss) = (r.target_prob, r.loss);
    format!("p(target) = {p:.4}, L = {loss:.4}; rows: layers, 0 at the bottom{subject}; {what}")
}

/// A Figure 11 panel of the projection `pick` picks from each cell.
fn lens_panel<'a>(r: &'a LensReport, title: &str, pick: fn(&Cell) -> &Projection) -> Panel<'a> {
    let name = title.to_string();
    let view = move |layer: usize, c: &Cell| {
        let p = pick(c);
        let top5 = p.top.iter().take(5);
        let top5: Vec<String> = top5
            .map(|t| format!("  {:?} {}", t.token, num(t.score as f64)))
            .collect();
        let (pos, tok, rank) = (c.pos, token_at(r, c.pos), p.target_rank);
        let (top5, target, norms) = (top5.join("\n"), &r.target, norms_line(c));
        CellView {
            fill: colour(&RANK_COLOURS, rank_t(rank)),
            text: p.top.first().map_or(String::new(), |t| label(&t.token, 8)),
            bold: rank == 0,
            tip: format!(
                "layer {layer}, position {pos} {tok:?}\n{name}, top-5:\n{top5}\n\
                 target {target:?} rank {rank}\n{norms}"
            ),
        }
    };
    let (ranks, names) = ([0, 10, 100, 1000, 9999], ["0", "10", "100", "1k", "≥10k"]);
    let ticks = ranks
        .iter()
        .zip(names)
        .map(|(&k, s)| (rank_t(k), s.to_string()));
    let caption = "colour: target rank (log scale)";
    Panel::new(title, view, &RANK_COLOURS, caption, ticks.collect())
}

/// The lens grid (the paper's Figure 11): layer × prompt token, FF1 input x1 on the left and
/// FF2 −δ on the right; each cell shows the top-1 token and is coloured by the target's rank.
pub fn lens_grid_svg(r: &LensReport) -> String {
    grid(r, true)
}

fn grid(r: &LensReport, standalone: bool) -> String {
    let panels = [
        lens_panel(r, "FF1 input x1", |c| &c.x1),
        lens_panel(r, "FF2 −δ", |c| &c.neg_d2),
    ];
    let what = "cell: top-1 token (bold = the target), colour: target rank";
    heatmap_figure(r, &subtitle(r, what), &panels, standalone)
}

/// A Figure 16 panel of the norm `value` picks from each cell, on a log colour scale.
fn norm_panel<'a>(r: &'a LensReport, title: &str, value: fn(&Cell) -> f32) -> Panel<'a> {
    let cells = r.layers.iter().flat_map(|l| &l.cells);
    let values = cells.map(|c| value(c) as f64);
    let positive: Vec<f64> = values.filter(|v| *v > 0.0 && v.is_finite()).collect();
    let lo = positive.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = positive.iter().copied().fold(0.0, f64::max);
    let span = if lo < hi { (hi / lo).ln() } else { 0.0 };
    let t_of = move |v: f64| match (span > 0.0, v > 0.0) {
        (true, true) => (v / lo).ln() / span,
        (true, false) => 0.0,
        (false, _) => 0.5,
    };
    let name = title.to_string();
    let view = move |layer: usize, c: &Cell| {
        let v = value(c) as f64;
        let (pos, tok, norms) = (c.pos, token_at(r, c.pos), norms_line(c));
        let (rx, rd) = (c.x1.target_rank, c.neg_d2.target_rank);
        CellView {
            fill: colour(&NORM_COLOURS, t_of(v)),
            text: esc(&num(v)),
            bold: false,
            tip: format!(
                "layer {layer}, position {pos} {tok:?}\n{name} = {}\n{norms}\n\
                 target rank: x1 {rx}, −δ {rd}",
                num(v)
            ),
        }
    };
    let ticks = match positive.is_empty() {
        true => vec![(0.5, "no positive values".to_string())],
        false => {
            let mid = num((lo * hi).sqrt());
            vec![
                (0.0, format!("min {}", num(lo))),
                (0.5, mid),
                (1.0, format!("max {}", num(hi))),
            ]
        }
    };
    let caption = "colour: log scale, this panel";
    Panel::new(title, view, &NORM_COLOURS, caption, ticks)
}

/// The FF2 gradient norms (the paper's Figure 16): layer × prompt token heatmaps of ‖δ‖·‖a‖
/// (the Frobenius norm of the token's rank-one FF2 gradient) and of ‖δ‖, one log colour scale
/// per panel.
pub fn lens_norms_svg(r: &LensReport) -> String {
    norms(r, true)
}

fn norms(r: &LensReport, standalone: bool) -> String {
    let panels = [
        norm_panel(r, "‖δ‖·‖a‖ (FF2 gradient norm)", |c| c.grad_norm),
        norm_panel(r, "‖δ‖ (FF2 output gradient)", |c| c.norm_d2),
    ];
    heatmap_figure(r, &subtitle(r, "cell: the norm"), &panels, standalone)
}

/// Cosine colours (0xRRGGBB) from −1 (blue) through 0 (white) to +1 (red).
const COSINE_COLOURS: [u32; 5] = [0x2166ac, 0x92c5de, 0xf7f7f7, 0xf4a582, 0xb2182b];
/// Side of one cell of the layer × layer heatmap.
const SQUARE: f64 = 16.0;

/// The cosine similarity of residual-stream VJPs between every pair of reported layers at the
/// last prompt token (the paper's Appendix G), as a layer × layer heatmap.
pub fn lens_vjp_svg(r: &LensReport) -> String {
    vjp(r, true)
}

fn vjp(r: &LensReport, standalone: bool) -> String {
    let n = r.vjp_cosine.len();
    let side = n as f64 * SQUARE;
    let width = (LEFT + side + 24.0).max(420.0);
    let mut o = Svg::new(width, TOP + side + BOTTOM, standalone);
    let max_chars = (width / 7.0) as usize;
    o.text((8.0, 18.0), BOLD, &label(&heading(r), max_chars));
    let what = "cosine of the residual-stream VJPs δ (last token), layer × layer";
    o.text((8.0, 35.0), GREY, &label(what, max_chars));
    let layer = |i: usize| r.layers.get(i).map_or(i, |l| l.layer);
    let every = n.div_ceil(16).max(1);
    for (i, row) in r.vjp_cosine.iter().enumerate() {
        let y = TOP + (n - 1 - i) as f64 * SQUARE;
        if i % every == 0 {
            o.text(
                (LEFT - 4.0, y + 12.0),
                &format!("{END}{SMALL}"),
                &format!("L{}", layer(i)),
            );
            let x = LEFT + (i as f64 + 0.5) * SQUARE;
            o.text(
                (x, TOP + side + 14.0),
                &format!("{MID}{SMALL}"),
                &format!("{}", layer(i)),
            );
        }
        for (j, &c) in row.iter().enumerate() {
            let fill = colour(&COSINE_COLOURS, (c as f64 + 1.0) / 2.0);
            let tip = format!("layers {} and {}: cosine {:.4}", layer(i), layer(j), c);
            o.0.push_str(&format!("<g class=\"cell\"><title>{}</title>\n", esc(&tip)));
            let x = LEFT + j as f64 * SQUARE;
            o.rect((x, y, SQUARE, SQUARE), &format!(" fill=\"{fill}\""));
            o.0.push_str("</g>\n");
        }
    }
    let legend = Legend {
        palette: &COSINE_COLOURS,
        caption: "colour: cosine".into(),
        ticks: vec![(0.0, "−1".into()), (0.5, "0".into()), (1.0, "1".into())],
    };
    legend_svg(
        &mut o,
        &legend,
        LEFT,
        TOP + side + 46.0,
        side.clamp(200.0, 300.0),
    );
    o.finish()
}

/// Moves each cell's `<title>` into a floating tooltip.
const PAGE_SCRIPT: &str = "const tip = document.getElementById('tip');
for (const cell of document.querySelectorAll('.cell')) {
  const t = cell.querySelector('title');
  if (!t) continue;
  cell.dataset.tip = t.textContent;
  t.remove();
  cell.addEventListener('mousemove', (e) => {
    tip.textContent = cell.dataset.tip;
    tip.style.display = 'block';
    tip.style.left = (e.pageX + 14) + 'px';
    tip.style.top = (e.pageY + 14) + 'px';
  });
  cell.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
}";

const PAGE_STYLE: &str = "body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #111; }
figure { margin: 0 0 28px 0; overflow-x: auto; }
figcaption { color: #444; margin-top: 4px; max-width: 70em; }
#tip { position: absolute; display: none; white-space: pre; font: 12px ui-monospace, monospace; background: #fffff0;
  border: 1px solid #999; padding: 6px 8px; pointer-events: none; box-shadow: 2px 2px 6px #0003; }
.cell:hover rect { stroke: #000; stroke-width: 1.5; }";

/// One self-contained HTML page (no network access, inline CSS and script): the run's summary,
/// both figures inline with hover details on every cell, and the claims.
pub fn lens_html(r: &LensReport) -> String {
    let t = esc(&heading(r));
    let c = &r.claims;
    let notes: String = c
        .notes
        .iter()
        .map(|n| format!("<li>{}</li>\n", esc(n)))
        .collect();
    let shift = join_or(c.shift_layers.iter().map(|l| l.to_string()), ", ", "none");
    let quoted = |p: usize| esc(&format!("{:?}", token_at(r, p)));
    let subject = join_or(
        c.last_subject_pos.map(|p| format!("{p} ({})", quoted(p))),
        "",
        "not given",
    );
    let max_grad = c
        .max_grad_position
        .iter()
        .map(|&(l, p)| format!("L{l}: {p} {}", quoted(p)));
    let max_grad = join_or(max_grad, "; ", "not computed");
    let normed = if r.normed { "through" } else { "without" };
    let (id, p, loss) = (r.target_id, r.target_prob, r.loss);
    let (n_tok, n_layers) = (r.tokens.len(), r.layers.len());
    let (grid, norms, vjp) = (grid(r, false), norms(r, false), vjp(r, false));
    let ranks = join_or(
        r.layers.iter().map(|l| {
            format!(
                "L{}: {}/{}",
                l.layer, l.grad_rank.rank, l.grad_rank.nonzero_tokens
            )
        }),
        "; ",
        "none",
    );
    let answer = esc(&format!("{:?}", r.answer));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n\
         <style>\n{PAGE_STYLE}\n</style>\n</head>\n<body>\n<h1>{t}</h1>\n\
         <p>Target token id {id}, p(target) = {p:.4}, L = {loss:.4}, {n_tok} prompt tokens, {n_layers} layers \
         shown, projections {normed} the final norm. Hover a cell for its top-5 tokens, the target's rank and the norms.</p>\n\
         <figure>\n{grid}<figcaption>Figure 11 style: each cell shows the top-1 token of the FF1 input x1 (left) \
         and of the FF2 output gradient −δ (right) projected into the vocabulary; the colour is the target's rank \
         in that projection (dark = rank 0). The red column is the last subject token.</figcaption>\n</figure>\n\
         <figure>\n{norms}<figcaption>Figure 16 style: ‖δ‖·‖a‖, the Frobenius norm of each token's rank-one FF2 \
         gradient, and ‖δ‖; log colour scale per panel.</figcaption>\n</figure>\n\
         <figure>\n{vjp}<figcaption>Appendix G style: cosine similarity of the residual-stream VJPs (δ of each \
         layer at the last token) between every pair of layers.</figcaption>\n</figure>\n\
         <h2>Claims</h2>\n<ul>\n{notes}</ul>\n\
         <p>Shift layers (target top-1 in −δ at the last token): {shift}</p>\n\
         <p>Last subject token position: {subject}</p>\n\
         <p>Position with the largest FF2 gradient, per layer: {max_grad}</p>\n\
         <p>The model's own answer: {answer}. FF2 gradient rank / tokens with δ ≠ 0 (Lemma 4.1), per layer: {ranks}</p>\n\
         <div id=\"tip\"></div>\n<script>\n{PAGE_SCRIPT}\n</script>\n</body>\n</html>\n"
    )
}

/// The items joined by `sep`, or `empty` when there are none.
fn join_or(items: impl IntoIterator<Item = String>, sep: &str, empty: &str) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(sep)
    }
}

/// About `n` round tick values (1, 2 or 5 × 10^k apart) covering lo..=hi, and their decimals.
fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let steps = [1.0, 2.0, 5.0, 10.0].map(|m| m * mag);
    let step = steps.into_iter().find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step - 1e-9).ceil() as i64;
    let values = (first..first + 50).map(|k| k as f64 * step);
    let values = values.take_while(|v| *v <= hi + step * 1e-9);
    let values = values
        .map(|v| if v.abs() < step * 1e-9 { 0.0 } else { v })
        .collect();
    (values, decimals)
}

/// Data range of some values; a flat or empty range is widened.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let fold = |(a, b): (f64, f64), v: f64| (a.min(v), b.max(v));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), fold);
    match (lo.is_finite(), hi > lo) {
        (false, _) => (0.0, 1.0),
        (true, true) => (lo, hi),
        (true, false) => (lo - lo.abs().max(1.0) * 0.5, hi + hi.abs().max(1.0) * 0.5),
    }
}

/// A small line plot: one polyline with markers per series, axes with round ticks, the x-axis
/// label and a legend. Non-finite points are not drawn and break the line.
pub fn line_plot_svg(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, left, right, top, bottom) = (600.0, 340.0, 60.0, 170.0, 34.0, 48.0);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, s)| s.iter().filter(finite).copied().collect())
        .collect();
    let (x0, x1) = range(points.iter().flatten().map(|p| p.0));
    let (y0, y1) = range(points.iter().flatten().map(|p| p.1));
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let mut o = Svg::new(w, h, true);
    o.text((left, 20.0), BOLD, &label(title, 70));
    o.rect((left, top, pw, ph), " fill=\"none\" stroke=\"#444\"");
    let (x_ticks, y_ticks) = (format!("{MID}{SMALL}"), format!("{END}{SMALL}"));
    let (xs, xd) = ticks(x0, x1, 6);
    for x in xs {
        o.line((sx(x), top, sx(x), top + ph), " stroke=\"#eee\"");
        o.text((sx(x), top + ph + 14.0), &x_ticks, &format!("{x:.xd$}"));
    }
    let (ys, yd) = ticks(y0, y1, 5);
    for y in ys {
        o.line((left, sy(y), left + pw, sy(y)), " stroke=\"#eee\"");
        o.text((left - 4.0, sy(y) + 3.5), &y_ticks, &format!("{y:.yd$}"));
    }
    o.text((left + pw / 2.0, h - 10.0), MID, &label(x_label, 60));
    if points.iter().all(Vec::is_empty) {
        o.text((left + pw / 2.0, top + ph / 2.0), MID, "no data");
    }
    for (i, ((name, all), pts)) in series.iter().zip(&points).enumerate() {
        let c = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let stroke = format!(" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.8\"");
        // A non-finite point breaks the line: one polyline per run of finite points.
        for run in all.split(|p| !finite(&p)).filter(|r| !r.is_empty()) {
            let path: Vec<String> = run
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let path = path.join(" ");
            o.0.push_str(&format!("<polyline points=\"{path}\"{stroke}/>\n"));
        }
        for &(x, y) in pts {
            let (cx, cy) = (sx(x), sy(y));
            let tip = esc(&format!("{name}: ({}, {})", num(x), num(y)));
            let dot = format!("<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2.6\" fill=\"{c}\">");
            o.0.push_str(&format!("{dot}<title>{tip}</title></circle>\n"));
        }
        let ly = top + 8.0 + i as f64 * 16.0;
        o.line(
            (left + pw + 12.0, ly, left + pw + 30.0, ly),
            &format!(" stroke=\"{c}\" stroke-width=\"2.5\""),
        );
        o.text((left + pw + 36.0, ly + 4.0), "", &label(name, 18));
    }
    o.finish()
}

/// Panels made by [`line_plot_svg`] in one SVG, two a row.
pub fn line_plot_grid_svg(panels: &[String]) -> String {
    let (w, h) = (600.0, 340.0);
    let rows = panels.len().div_ceil(2).max(1);
    let mut o = Svg::new(2.0 * w, rows as f64 * h, true);
    for (i, p) in panels.iter().enumerate() {
        let (x, y) = ((i % 2) as f64 * w, (i / 2) as f64 * h);
        let inner = p.strip_prefix("<svg").unwrap_or(p);
        o.0.push_str(&format!("<svg x=\"{x:.0}\" y=\"{y:.0}\"{inner}"));
    }
    o.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lens::views::GradRank;
    use crate::lens::{Claims, LayerLens, TokenScore};

    fn projection(tokens: &[&str], rank: usize) -> Projection {
        let score = |(i, t): (usize, &&str)| TokenScore {
            id: i as u32,
            token: t.to_string(),
            score: 5.0 - i as f32,
        };
        Projection {
            top: tokens.iter().enumerate().map(score).collect(),
            bottom: vec![],
            target_rank: rank,
            answer_rank: Some(rank + 1),
        }
    }

    fn report() -> LensReport {
        let tokens: Vec<String> = ["<x>", " & co", "\"q\"", "\n\u{1}é🙂\u{202E}"]
            .map(String::from)
            .to_vec();
        let layers = (0..3)
            .map(|l| LayerLens {
                layer: l,
                cells: (0..tokens.len())
                    .map(|pos| Cell {
                        pos,
                        x1: projection(&["<x>", "a&b", " Paris", "it's", "\u{0}"], l * 7 + pos),
                        neg_d2: projection(&[" Paris", "<x>"], 10usize.pow(pos as u32) * l),
                        pos_d2: projection(&["z"], 3),
                        x1_unit: None,
                        neg_d2_unit: None,
                        norm_x1: 1.0 + pos as f32,
                        norm_d2: 0.001 * (l + pos) as f32,
                        norm_a: 2.0,
                        grad_norm: 0.002 * (l + pos) as f32,
                    })
                    .collect(),
                grad_rank: GradRank {
                    rank: 2,
                    nonzero_tokens: 2,
                    singular_values: vec![3.0, 1.0, 0.0, 0.0],
                },
            })
            .collect();
        LensReport {
            prompt: "<x> & co \"q\"".into(),
            target: " Paris".into(),
            target_id: 2,
            tokens,
            loss: 1.5,
            target_prob: 0.22,
            answer_id: 3,
            answer: " Rome".into(),
            normed: true,
            vjp_cosine: (0..3usize)
                .map(|i| (0..3).map(|j| 1.0 - 0.4 * i.abs_diff(j) as f32).collect())
                .collect(),
            layers,
            claims: Claims {
                shift_layers: vec![0],
                max_grad_position: vec![(0, 3), (1, 3), (2, 0)],
                last_subject_pos: Some(1),
                notes: vec!["a <note> & more".into()],
            },
        }
    }

    /// Checks that every element is closed in order and no raw markup characters leak.
    fn assert_well_formed(doc: &str) {
        assert!(
            !doc.chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "control characters"
        );
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = doc;
        while let Some(i) = rest.find('<') {
            let end = rest[i..].find('>').expect("unclosed tag") + i;
            let tag = &rest[i + 1..end];
            assert!(!tag.contains('<'), "raw < inside tag {tag:?}");
            let name = tag
                .trim_start_matches('/')
                .split([' ', '\n'])
                .next()
                .unwrap_or("");
            if tag.starts_with('!')
                || tag.starts_with('?')
                || tag.ends_with('/')
                || ["meta"].contains(&name)
            {
            } else if tag.starts_with('/') {
                assert_eq!(stack.pop(), Some(name), "mismatched </{name}>");
            } else {
                stack.push(name);
            }
            rest = &rest[end + 1..];
            // Text up to the next tag must hold no raw '>' from unescaped data.
            let text = &rest[..rest.find('<').unwrap_or(rest.len())];
            assert!(
                !text.contains('>') || stack.last() == Some(&"script"),
                "raw > in text {text:?}"
            );
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
    }

    #[test]
    fn grid_svg_is_well_formed_and_complete() {
        let r = report();
        let svg = lens_grid_svg(&r);
        assert!(svg.starts_with("<svg xmlns="));
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
        assert_eq!(svg.matches("class=\"cell\"").count(), 2 * 3 * 4);
        assert!(
            svg.contains("&lt;x&gt;") && svg.contains("&amp; co") && svg.contains("&quot;q&quot;")
        );
        assert!(svg.contains("FF1 input x1") && svg.contains("FF2 −δ"));
        assert!(svg.contains("*</text>"), "subject mark");
        assert_eq!(svg, lens_grid_svg(&r), "deterministic");
    }

    #[test]
    fn vjp_svg_is_well_formed_and_complete() {
        let svg = lens_vjp_svg(&report());
        assert_well_formed(&svg);
        assert_eq!(svg.matches("class=\"cell\"").count(), 3 * 3);
        assert!(svg.contains("layers 0 and 2: cosine 0.2000"));
        assert!(
            svg.contains(&format!("fill=\"#{:06x}\"", COSINE_COLOURS[4])),
            "cosine 1"
        );
    }

    #[test]
    fn norms_svg_is_well_formed_and_complete() {
        let svg = lens_norms_svg(&report());
        assert_well_formed(&svg);
        assert_eq!(svg.matches("class=\"cell\"").count(), 2 * 3 * 4);
        assert!(svg.contains("min 1.00e-3") && svg.contains("max 0.010"));
    }

    #[test]
    fn html_is_self_contained() {
        let html = lens_html(&report());
        assert_well_formed(html.trim_start_matches("<!DOCTYPE html>\n"));
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert_eq!(html.matches("<svg").count(), 3);
        assert_eq!(html.matches("class=\"cell\"").count(), 4 * 3 * 4 + 3 * 3);
        assert!(html.contains("L1: 2/2") && html.contains("&quot; Rome&quot;"));
        assert!(html.contains("a &lt;note&gt; &amp; more") && html.contains("Claims"));
    }

    #[test]
    fn empty_report_and_line_plot() {
        let mut r = report();
        r.layers.clear();
        r.tokens.clear();
        r.claims.last_subject_pos = Some(9);
        assert_well_formed(&lens_grid_svg(&r));
        assert_well_formed(&lens_norms_svg(&r));
        let series = vec![
            (
                "acc <edit>".to_string(),
                vec![(0.0, 0.5), (1.0, 0.75), (2.0, f64::NAN)],
            ),
            ("flat".to_string(), vec![(1.0, 1.0)]),
            (
                "gap".to_string(),
                vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 4.0)],
            ),
        ];
        let svg = line_plot_svg("sweep & co", "α", &series);
        assert_well_formed(&svg);
        assert!(svg.contains("acc &lt;edit&gt;") && svg.contains("sweep &amp; co"));
        // One line per run of finite points: 1 + 1 + 2.
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("<circle").count(), 2 + 1 + 3);
        assert_well_formed(&line_plot_svg("empty", "x", &[]));
    }

    #[test]
    fn aggregate_page_is_well_formed_and_shows_every_layer() {
        use crate::lens::aggregate::{aggregate, BySegment, RecordLayer, RecordLens};
        let record = |r: usize| RecordLens {
            case_id: Some(r as u64),
            prompt: "a <b> & c".into(),
            target: " d".into(),
            segment_tokens: BySegment {
                prefix: 0,
                subject: 2,
                relation: 1,
                last: 1,
            },
            layers: (0..3)
                .map(|layer| RecordLayer {
                    layer,
                    norm_d2: BySegment {
                        prefix: None,
                        subject: Some(0.5 * (r + layer) as f64),
                        relation: Some(0.25),
                        last: Some(1.0 + r as f64),
                    },
                    norm_x1: BySegment::default(),
                    rank_x1: 10 * r,
                    rank_neg_d2: r * layer,
                })
                .collect(),
        };
        let agg = aggregate((0..4).map(record).collect()).unwrap();
        let l2 = &agg.layers[2];
        assert_eq!(l2.norm_d2.last.as_ref().unwrap().mean, 2.5);
        assert_eq!(l2.rank_neg_d2.median, 3.0);
        assert_eq!(l2.rank_neg_d2.q25, 1.5);
        assert_eq!(l2.top1_neg_d2, 0.25);
        assert!(l2.norm_d2.prefix.is_none() && l2.norm_x1.subject.is_none());
        assert_eq!(agg.segment_tokens.subject, 8);
        let html = analyses::aggregate_html(&agg, "SmolLM2 <val> & co");
        assert_well_formed(&html);
        assert!(html.contains("SmolLM2 &lt;val&gt; &amp; co") && html.contains("4 records"));
        assert_eq!(html.matches("<tr><td>").count(), 3);
        assert!(html.contains("<td>3 [1.5, 4.5]</td>"));
    }

    #[test]
    fn helpers() {
        let (t, d) = ticks(-0.05, 1.0, 6);
        let shown: Vec<String> = t.iter().map(|v| format!("{v:.d$}")).collect();
        assert_eq!(shown, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(label("abcdefghijk", 8), "abcdefg…");
        assert_eq!(label(" ", 8), "␣");
        assert_eq!(colour(&RANK_COLOURS, 0.0), "#67000d");
        assert_eq!(colour(&RANK_COLOURS, f64::NAN), "#67000d");
        assert_eq!(colour(&NORM_COLOURS, 1.0), "#08306b");
        assert_eq!(colour(&NORM_COLOURS, 0.125), "#dfebf7");
        assert!(rank_t(0) == 0.0 && rank_t(100_000) == 1.0);
    }
}
