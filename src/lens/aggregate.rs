//! Lens readings over a request file: the mean VJP norm ‖δ‖ (and ‖x1‖) per layer by prompt
//! segment (the paper's Figure 5), and the target's rank in x1 and in −δ at the last prompt
//! token per layer (Figure 6), each record from its own backward pass.

use super::{inputs, l2, report, subject_tokens, LensOptions};
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::DType;
use serde::Serialize;
use std::ops::Range;

/// Where a prompt token sits relative to the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Segment {
    /// Before the subject's first token.
    Prefix,
    /// A token overlapping the subject (the last prompt token excepted).
    Subject,
    /// After the subject, before the last token: the relation.
    Relation,
    /// The last prompt token.
    Last,
}

impl Segment {
    /// Every segment, in prompt order.
    pub const ALL: [Segment; 4] = [
        Segment::Prefix,
        Segment::Subject,
        Segment::Relation,
        Segment::Last,
    ];

    /// Lowercase name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Segment::Prefix => "prefix",
            Segment::Subject => "subject",
            Segment::Relation => "relation",
            Segment::Last => "last",
        }
    }
}

/// One value per prompt segment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BySegment<T> {
    /// Before the subject.
    pub prefix: T,
    /// The subject.
    pub subject: T,
    /// Between the subject and the last token.
    pub relation: T,
    /// The last token.
    pub last: T,
}

impl<T> BySegment<T> {
    /// The value of `s`.
    pub fn get(&self, s: Segment) -> &T {
        match s {
            Segment::Prefix => &self.prefix,
            Segment::Subject => &self.subject,
            Segment::Relation => &self.relation,
            Segment::Last => &self.last,
        }
    }

    fn get_mut(&mut self, s: Segment) -> &mut T {
        match s {
            Segment::Prefix => &mut self.prefix,
            Segment::Subject => &mut self.subject,
            Segment::Relation => &mut self.relation,
            Segment::Last => &mut self.last,
        }
    }

    fn from_fn(mut f: impl FnMut(Segment) -> T) -> BySegment<T> {
        BySegment {
            prefix: f(Segment::Prefix),
            subject: f(Segment::Subject),
            relation: f(Segment::Relation),
            last: f(Segment::Last),
        }
    }
}

/// The segment of each of `n` prompt tokens, given the subject's tokens.
pub fn segments(n: usize, subject: Range<usize>) -> Vec<Segment> {
    (0..n)
        .map(|i| match i {
            _ if i + 1 == n => Segment::Last,
            _ if subject.contains(&i) => Segment::Subject,
            _ if i < subject.start => Segment::Prefix,
            _ => Segment::Relation,
        })
        .collect()
}

/// One record's readings at one layer.
#[derive(Debug, Clone, Serialize)]
pub struct RecordLayer {
    /// Layer index.
    pub layer: usize,
    /// Mean ‖δ‖ over each segment's tokens (None: the segment is empty).
    pub norm_d2: BySegment<Option<f64>>,
    /// Mean ‖x1‖ over each segment's tokens.
    pub norm_x1: BySegment<Option<f64>>,
    /// The target's rank in x1 at the last token (0 = top-1).
    pub rank_x1: usize,
    /// The target's rank in −δ at the last token.
    pub rank_neg_d2: usize,
}

/// One record's readings.
#[derive(Debug, Clone, Serialize)]
pub struct RecordLens {
    /// Record id, when the data has one.
    pub case_id: Option<u64>,
    /// Prompt text.
    pub prompt: String,
    /// Target as tokenized.
    pub target: String,
    /// Prompt tokens in each segment (they add up to the prompt's length).
    pub segment_tokens: BySegment<usize>,
    /// One entry per reported layer.
    pub layers: Vec<RecordLayer>,
}

/// Distribution of one reading over records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    /// Records with a value.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// First quartile (linear interpolation between order statistics).
    pub q25: f64,
    /// Third quartile.
    pub q75: f64,
}

impl Spread {
    /// The spread of `values` (None when there are none).
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let x = p * (v.len() - 1) as f64;
            let (i, f) = (x.floor() as usize, x.fract());
            v[i] + (v[(i + 1).min(v.len() - 1)] - v[i]) * f
        };
        Some(Spread {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            median: q(0.5),
            q25: q(0.25),
            q75: q(0.75),
        })
    }
}

/// The readings of one layer over all records.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateLayer {
    /// Layer index.
    pub layer: usize,
    /// Per segment, the spread of the records' mean ‖δ‖ (None: no record has the segment).
    pub norm_d2: BySegment<Option<Spread>>,
    /// Per segment, the spread of the records' mean ‖x1‖.
    pub norm_x1: BySegment<Option<Spread>>,
    /// The target's rank in x1 at the last token.
    pub rank_x1: Spread,
    /// The target's rank in −δ at the last token.
    pub rank_neg_d2: Spread,
    /// Share of records whose target is top-1 in −δ at the last token.
    pub top1_neg_d2: f64,
}

/// The `lens --requests` report.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateReport {
    /// Records aggregated.
    pub records: usize,
    /// Prompt tokens in each segment, over all records.
    pub segment_tokens: BySegment<usize>,
    /// One entry per reported layer.
    pub layers: Vec<AggregateLayer>,
    /// Every record's own readings.
    pub per_record: Vec<RecordLens>,
}

/// One record to read (the request fields the aggregate uses).
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// Record id, when the data has one.
    pub case_id: Option<u64>,
    /// Prompt text.
    pub prompt: &'a str,
    /// Target continuation.
    pub target: &'a str,
    /// Subject inside the prompt (required: the segments are read from it).
    pub subject: Option<&'a str>,
}

/// Norm of each of the first `n` rows of `t`, as the lens report computes it.
fn row_norms(t: &candle_core::Tensor, n: usize) -> Result<Vec<f32>> {
    let rows = t.narrow(0, 0, n)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows.iter().map(|r| l2(r)).collect())
}

/// Mean of `values` over the tokens of each segment.
fn segment_means(values: &[f32], segs: &[Segment]) -> BySegment<Option<f64>> {
    BySegment::from_fn(|s| {
        let v: Vec<f64> = values
            .iter()
            .zip(segs)
            .filter(|&(_, &t)| t == s)
            .map(|(&x, _)| x as f64)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    })
}

/// The readings of record `index` at `layers`.
pub fn record(
    model: &Transformer,
    tok: &Tokenizer,
    req: &Query,
    index: usize,
    layers: Range<usize>,
) -> Result<RecordLens> {
    let subject = req.subject.ok_or_else(|| {
        Error::BadRequest(format!(
            "request #{index} ({:?}) names no subject (the segments are read from it)",
            req.prompt
        ))
    })?;
    let opts = LensOptions {
        layers,
        k: 1,
        all_positions: false,
        use_norm: true,
        full_target: false,
        unit: false,
    };
    let inp = inputs(model, tok, req.prompt, req.target, &opts)?;
    let n = inp.prompt_ids.len();
    let span = subject_tokens(tok, req.prompt, &inp.prompt_ids, subject).ok_or_else(|| {
        Error::BadRequest(format!(
            "request #{index}: the subject {subject:?} is not in the prompt {:?}",
            req.prompt
        ))
    })?;
    let segs = segments(n, span);
    let mut counts = BySegment::<usize>::default();
    segs.iter().for_each(|&s| *counts.get_mut(s) += 1);
    let norms = inp
        .d2
        .iter()
        .zip(&inp.x1)
        .map(|(d, x)| Ok((row_norms(d, n)?, row_norms(x, n)?)))
        .collect::<Result<Vec<_>>>()?;
    let target = tok.decode(&inp.target_ids);
    let lens = report(model, tok, req.prompt, Some(subject), &opts, inp)?;
    let layers = lens
        .layers
        .iter()
        .zip(norms)
        .map(|(l, (d, x))| RecordLayer {
            layer: l.layer,
            norm_d2: segment_means(&d, &segs),
            norm_x1: segment_means(&x, &segs),
            rank_x1: l.cells[0].x1.target_rank,
            rank_neg_d2: l.cells[0].neg_d2.target_rank,
        })
        .collect();
    Ok(RecordLens {
        case_id: req.case_id,
        prompt: req.prompt.to_string(),
        target,
        segment_tokens: counts,
        layers,
    })
}

/// Aggregates records read at the same layers.
pub fn aggregate(records: Vec<RecordLens>) -> Result<AggregateReport> {
    let Some(first) = records.first() else {
        return Err(Error::Invalid("no records to aggregate".into()));
    };
    let layer_ids: Vec<usize> = first.layers.iter().map(|l| l.layer).collect();
    let mut counts = BySegment::<usize>::default();
    for r in &records {
        for s in Segment::ALL {
            *counts.get_mut(s) += r.segment_tokens.get(s);
        }
    }
    let layers = layer_ids
        .iter()
        .enumerate()
        .map(|(i, &layer)| {
            let at = |f: &dyn Fn(&RecordLayer) -> Option<f64>| -> Vec<f64> {
                records.iter().filter_map(|r| f(&r.layers[i])).collect()
            };
            let by = |f: fn(&RecordLayer) -> &BySegment<Option<f64>>| {
                BySegment::from_fn(|s| Spread::of(&at(&|l| *f(l).get(s))))
            };
            let ranks = |f: fn(&RecordLayer) -> usize| at(&|l| Some(f(l) as f64));
            let neg = ranks(|l| l.rank_neg_d2);
            AggregateLayer {
                layer,
                norm_d2: by(|l| &l.norm_d2),
                norm_x1: by(|l| &l.norm_x1),
                rank_x1: Spread::of(&ranks(|l| l.rank_x1)).expect("records"),
                top1_neg_d2: neg.iter().filter(|&&r| r == 0.0).count() as f64 / neg.len() as f64,
                rank_neg_d2: Spread::of(&neg).expect("records"),
            }
        })
        .collect();
    Ok(AggregateReport {
        records: records.len(),
        segment_tokens: counts,
        layers,
        per_record: records,
    })
}

/// [`record`] for every request, then [`aggregate`]; `progress` is called after each record.
pub fn run(
    model: &Transformer,
    tok: &Tokenizer,
    requests: &[Query],
    layers: Range<usize>,
    mut progress: impl FnMut(usize),
) -> Result<AggregateReport> {
    let mut records = Vec::with_capacity(requests.len());
    for (i, req) in requests.iter().enumerate() {
        records.push(record(model, tok, req, i, layers.clone())?);
        progress(i + 1);
    }
    aggregate(records)
}
