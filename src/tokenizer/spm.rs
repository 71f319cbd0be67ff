//! SentencePiece-style tokenizer of `tokenizer.ggml.model = "llama"` vocabularies (Llama 2,
//! Mistral, Gemma), run the way llama.cpp's `llm_tokenizer_spm` runs it: spaces become `▁`, the
//! text starts as one symbol per UTF-8 character, the adjacent pair whose concatenation is the
//! highest-scoring token (the leftmost on ties) is merged until no pair is a token, and a symbol
//! that is not a token falls back to its bytes' `<0xXX>` tokens.

use super::{Fragment, Vocab, TYPE_BYTE};
use crate::{Error, Result};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The space marker of SentencePiece pieces.
const SPACE: char = '\u{2581}';

/// A SentencePiece vocabulary with its scores.
pub struct Spm {
    vocab: Vocab,
    scores: Vec<f32>,
    /// Token of each byte: `<0xXX>`, else the one-byte piece, as llama.cpp's `byte_to_token`.
    bytes: Vec<Option<u32>>,
    /// Put a space before text that starts the input or follows a special token
    /// (`tokenizer.ggml.add_space_prefix`, true unless the file says otherwise).
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols into the token `score` belongs to.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged text: a pair whose symbols changed since is stale.
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One symbol of the text being merged: a byte range and its neighbours in the chain.
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// A tokenizer over `vocab` with one finite score per token.
    pub fn new(vocab: Vocab, scores: Vec<f32>, add_space_prefix: bool) -> Result<Spm> {
        if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(Error::MissingKey(format!(
                "tokenizer.ggml.scores (score {s} of token {i} is not finite)"
            )));
        }
        let bytes = (0..=255u8)
            .map(|b| {
                vocab
                    .id(&format!("<0x{b:02X}>"))
                    .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| vocab.id(s)))
            })
            .collect();
        Ok(Spm {
            vocab,
            scores,
            bytes,
            add_space_prefix,
        })
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Token ids of `text`; `at_start` when nothing precedes it (then the space prefix applies).
    pub fn encode(&self, text: &str, at_start: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut prev_special = at_start;
        for fragment in self.vocab.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let prefix = if self.add_space_prefix && prev_special {
                        " "
                    } else {
                        ""
                    };
                    let escaped: String = format!("{prefix}{t}").replace(' ', "\u{2581}");
                    self.encode_escaped(&escaped, &mut out)?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Merges the characters of `text` (spaces already `▁`) and appends the tokens to `out`.
    fn encode_escaped(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = symbols.last_mut() else {
            return Ok(());
        };
        last.next = None;
        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.push_bigram(text, &symbols, i - 1, i, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (&symbols[b.left], &symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            let next = r.next;
            symbols[b.left].len += symbols[b.right].len;
            symbols[b.right].len = 0;
            symbols[b.left].next = next;
            if let Some(n) = next {
                symbols[n].prev = Some(b.left);
            }
            if let Some(p) = symbols[b.left].prev {
                self.push_bigram(text, &symbols, p, b.left, &mut queue);
            }
            if let Some(n) = next {
                self.push_bigram(text, &symbols, b.left, n, &mut queue);
            }
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let s = &symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.bytes[b as usize].ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "{piece:?} is not a token and byte 0x{b:02X} has no <0x{b:02X}> token to fall back to"
                            ))
                        })?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    /// Queues the merge of symbols `left` and `right` if their concatenation is a token.
    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (&symbols[left], &symbols[right]);
        let size = l.len + r.len;
        if let Some(id) = self.vocab.id(&text[l.start..l.start + size]) {
            queue.push(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                size,
            });
        }
    }

    /// Bytes of one token: a byte token's byte, otherwise its text with `▁` as a space.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.vocab.text(id) else {
            return Vec::new();
        };
        if self.vocab.kind(id) == TYPE_BYTE {
            if let Some(b) = parse_byte(text) {
                return vec![b];
            }
        }
        text.replace(SPACE, " ").into_bytes()
    }
}

/// The byte of a `<0xXX>` token.
fn parse_byte(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}
