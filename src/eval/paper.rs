//! The Backward Lens paper's Table 1 metrics beside ROME's probability comparisons: efficacy,
//! paraphrase and neighborhood as top-1 accuracy (the first token of the new target is the
//! argmax after the prompt and after its paraphrase; the first token of the true target is the
//! argmax after the neighborhood prompt), and the n-gram entropy on the paper's scale (×100).

use super::Stat;
use crate::numeric::argmax;
use serde::Serialize;

/// The top-1 accuracies of one record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Accuracy {
    /// The new target's first token is the top-1 after the prompt.
    pub efficacy_acc: bool,
    /// The same after the paraphrase.
    pub paraphrase_acc: Option<bool>,
    /// The true target's first token is the top-1 after the neighborhood prompt.
    pub neighborhood_acc: Option<bool>,
}

/// The next-token logits a record is judged on, and the tokens it should predict.
pub struct NextTokens<'a> {
    /// After the prompt.
    pub prompt: &'a [f32],
    /// After the paraphrase, when the record has one.
    pub paraphrase: Option<&'a [f32]>,
    /// After the neighborhood prompt, when the record has one.
    pub neighborhood: Option<&'a [f32]>,
    /// First token of the new target.
    pub new: u32,
    /// First token of the neighborhood prompt's true target.
    pub neighborhood_truth: u32,
}

impl Accuracy {
    /// The accuracies from the logits.
    pub fn of(n: &NextTokens) -> Accuracy {
        let top = |l: &[f32]| argmax(l) as u32;
        Accuracy {
            efficacy_acc: top(n.prompt) == n.new,
            paraphrase_acc: n.paraphrase.map(|l| top(l) == n.new),
            neighborhood_acc: n.neighborhood.map(|l| top(l) == n.neighborhood_truth),
        }
    }
}

/// Table 1's columns over many records.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PaperSummary {
    /// Efficacy, top-1 accuracy.
    pub efficacy_acc: Stat,
    /// Paraphrase, top-1 accuracy.
    pub paraphrase_acc: Stat,
    /// Neighborhood, top-1 accuracy of the true target.
    pub neighborhood_acc: Stat,
    /// n-gram entropy ×100 (the paper's scale), when fluency was computed.
    pub ngram_entropy_x100: Stat,
}

/// Aggregates records' accuracies and fluency scores (the fluency in bits, as eval records it).
pub fn summarize(acc: &[Accuracy], fluency: &[f64]) -> PaperSummary {
    let b = |x: bool| f64::from(u8::from(x));
    let pick = |f: &dyn Fn(&Accuracy) -> Option<bool>| {
        Stat::of(&acc.iter().filter_map(f).map(b).collect::<Vec<_>>())
    };
    PaperSummary {
        efficacy_acc: pick(&|a| Some(a.efficacy_acc)),
        paraphrase_acc: pick(&|a| a.paraphrase_acc),
        neighborhood_acc: pick(&|a| a.neighborhood_acc),
        ngram_entropy_x100: Stat::of(&fluency.iter().map(|f| 100.0 * f).collect::<Vec<_>>()),
    }
}
