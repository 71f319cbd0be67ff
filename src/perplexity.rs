//! Token-level perplexity through llama.cpp, on the general English text shipped with backlens
//! (`data/text/`, public domain, see its README) or any text: how much an edit costs the model
//! on text that no edit targets.
//!
//! The text is tokenized once (BOS first when the model adds one) and cut into consecutive
//! chunks of the session's context; each chunk is decoded from an empty KV cache and every token
//! after its first is scored, so the result is exp(−mean log p(tᵢ₊₁ | chunk prefix)).

use crate::runtime::{LlamaRuntime, Session};
use crate::{Error, Result};
use serde::Serialize;

/// *Pride and Prejudice*, its first 400 paragraphs (public domain; `data/text/README.md`).
pub const GENERAL_TEXT: &str = include_str!("../data/text/pride-and-prejudice.txt");

/// Tokens of the text scored by default: 2 chunks of 512 (about 8 s per model on an idle core;
/// llama.cpp computes logits at every position, ~0.27 GFLOP a token on SmolLM2).
pub const DEFAULT_TOKENS: usize = 1024;

/// The perplexity of a model on a text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    /// exp of the mean negative log-likelihood per scored token.
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Chunks decoded.
    pub chunks: usize,
}

/// The first `max_tokens` tokens of `text` (all when `None`) as the model's llama.cpp
/// vocabulary encodes it.
pub fn text_tokens(rt: &LlamaRuntime, text: &str, max_tokens: Option<usize>) -> Result<Vec<u32>> {
    let mut tokens = rt.tokenize(text, true);
    if let Some(n) = max_tokens {
        tokens.truncate(n);
    }
    if tokens.len() < 2 {
        return Err(Error::Invalid(format!(
            "the perplexity text has {} tokens; at least 2 are needed",
            tokens.len()
        )));
    }
    Ok(tokens)
}

/// Perplexity of the session's model (with whatever adapter it has applied) on `tokens`, in
/// chunks of the session's context.
pub fn perplexity(session: &mut Session, tokens: &[u32]) -> Result<Perplexity> {
    let chunk = session.max_tokens().max(2);
    let (mut sum, mut n, mut chunks) = (0f64, 0usize, 0usize);
    for piece in tokens.chunks(chunk).filter(|c| c.len() >= 2) {
        sum -= session.next_token_logprobs(piece)?.iter().sum::<f64>();
        n += piece.len() - 1;
        chunks += 1;
    }
    let nll = sum / n.max(1) as f64;
    if n == 0 || !nll.is_finite() {
        return Err(Error::Numeric(format!(
            "perplexity over {n} tokens is not finite (mean NLL {nll})"
        )));
    }
    Ok(Perplexity {
        perplexity: nll.exp(),
        nll,
        tokens: n,
        chunks,
    })
}
