//! What a change means for the model: its leading output direction u₁ read through the base's
//! final norm and unembedding (the lens), and how strongly given prompts trigger an FF2 change.

use super::report::{AuditReport, LensView, Orientation, ProbeHit, TargetRank, TensorChange};
use super::spectrum::Operator;
use super::{AuditOptions, LensScore};
use crate::lens;
use crate::model::Transformer;
use crate::numeric::{dot, norm2, rank_of};
use crate::provenance::Provenance;
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::GgufFile;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// Scores ±u₁ against the vocabulary ([`LensScore`]), orients the pair by
/// [`Orientation::Lens`] and fills in the promotes/suppresses lists and the target ranks.
pub(super) fn explain_with_lens(
    model: &Transformer,
    tok: &Tokenizer,
    c: &mut TensorChange,
    opts: &AuditOptions,
    targets: &[u32],
) -> Result<()> {
    let plus: Vec<f32> = c.u1.iter().map(|&x| x as f32).collect();
    let minus: Vec<f32> = plus.iter().map(|x| -x).collect();
    let d = plus.len();
    let rows = Tensor::from_vec([plus, minus].concat(), (2, d), &Device::Cpu)?;
    let mut scores = lens::project_rows(model, &rows, opts.score != LensScore::Raw)?;
    if opts.score == LensScore::Cosine {
        let normed = model.out_norm.forward(&rows.to_dtype(model.dtype())?)?;
        let row_norms: Vec<f32> = normed
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let vocab_norms: Vec<f32> = model
            .output
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for (row, rn) in scores.iter_mut().zip(row_norms) {
            for (s, vn) in row.iter_mut().zip(&vocab_norms) {
                *s = if rn > 0.0 && *vn > 0.0 {
                    *s / (rn * vn)
                } else {
                    0.0
                };
            }
        }
    }
    let top = |s: &[f32]| s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let flip = top(&scores[1]) > top(&scores[0]);
    if flip {
        c.u1.iter_mut().for_each(|x| *x = -*x);
        c.v1.iter_mut().for_each(|x| *x = -*x);
    }
    let chosen = &scores[usize::from(flip)];
    let p = lens::summarize(chosen, 0, opts.k.max(1), tok)?;
    c.orientation = Orientation::Lens;
    c.lens = Some(LensView {
        score: opts.score,
        promotes: p.top,
        suppresses: p.bottom,
        targets: targets
            .iter()
            .filter(|&&id| (id as usize) < chosen.len())
            .map(|&id| TargetRank {
                id,
                token: tok.token_text(id),
                rank: rank_of(chosen, id),
                score: chosen[id as usize],
            })
            .collect(),
    });
    Ok(())
}

/// Target token ids of the edits a patch's provenance records (edits not skipped), sorted.
pub(super) fn edit_targets(patch: &GgufFile) -> Vec<u32> {
    let mut ids: Vec<u32> = Provenance::edits_of(patch)
        .into_iter()
        .filter(|e| !e.skipped)
        .map(|e| e.target_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Runs each prompt through the base (`forward(tokens, layers)` gives FF2's input at the last
/// token of each layer) and measures how it triggers every kept `ffn_down` change.
pub(super) fn run_probes(
    tok: &Tokenizer,
    n_layer: usize,
    prompts: &[String],
    kept: &[(usize, Operator)],
    report: &mut AuditReport,
    mut forward: impl FnMut(&[u32], &[usize]) -> Result<Vec<Vec<f32>>>,
) -> Result<()> {
    let layers: Vec<usize> = kept
        .iter()
        .filter_map(|(idx, _)| report.changed[*idx].layer)
        .filter(|&l| l < n_layer)
        .collect();
    for prompt in prompts {
        let ids = tok.encode_prompt(prompt)?;
        let ff2_in = forward(&ids, &layers)?;
        let last_token = tok.token_text(ids[ids.len() - 1]);
        for (idx, op) in kept {
            let c = &mut report.changed[*idx];
            let Some(slot) = c.layer.and_then(|l| layers.iter().position(|&x| x == l)) else {
                continue;
            };
            let x: Vec<f64> = ff2_in[slot].iter().map(|&v| f64::from(v)).collect();
            if x.len() != c.shape[1] {
                continue;
            }
            let nx = norm2(&x);
            let sigma1 = c.singular_values[0];
            let (cosine, gain) = match nx > 0.0 {
                true => (dot(&x, &c.v1) / nx, norm2(&op.apply(&x)) / nx),
                false => (0.0, 0.0),
            };
            c.probes.push(ProbeHit {
                prompt: prompt.clone(),
                last_token: last_token.clone(),
                cosine,
                gain,
                relative_gain: gain / sigma1,
            });
        }
    }
    Ok(())
}
