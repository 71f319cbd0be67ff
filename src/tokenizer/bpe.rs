//! Byte-level BPE of `tokenizer.ggml.model = "gpt2"` vocabularies, built with the `tokenizers`
//! crate: the pre-tokenizer llama.cpp selects by `tokenizer.ggml.pre` (a table of the regexes
//! `llama-vocab.cpp` splits with, applied in turn), GPT-2's byte-to-character map, and the merges
//! by rank.

use super::{Vocab, TYPE_USER_DEFINED};
use crate::{Error, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// GPT-2's split.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split (contractions in either case, numbers in groups of up to three).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One pre-tokenizer of llama.cpp: the `tokenizer.ggml.pre` values that select it, its regexes
/// (each splits the pieces the previous one left) and its flags.
pub struct PreTokenizer {
    pub names: &'static [&'static str],
    regexes: &'static [&'static str],
    /// A word that is a token is that token, whatever the merges would make of it.
    ignore_merges: bool,
    /// BOS is prepended unless `tokenizer.ggml.add_bos_token` says otherwise.
    pub add_bos: bool,
}

/// The pre-tokenizers implemented, as `llama-vocab.cpp` maps the names (the first name of each
/// row is the one `convert_hf_to_gguf.py` writes for its best-known model).
pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &["default"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
        ],
        regexes: &[GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        regexes: &[r"\p{N}", GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "llama-bpe",
            "llama3",
            "llama-v3",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        regexes: &[LLAMA3],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["dbrx", "smaug-bpe"],
        regexes: &[LLAMA3],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
        ],
        regexes: &[QWEN2],
        ignore_merges: false,
        add_bos: false,
    },
];

/// The pre-tokenizer named `name`.
pub fn pre_tokenizer(name: &str) -> Option<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name))
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Builds the BPE of `vocab` with `merges` (`"left right"`, split at the first space after the
/// first character, as llama.cpp does) and the pre-tokenizer `pre`.
pub fn build(vocab: &Vocab, merges: &[&str], pre: &PreTokenizer) -> Result<tokenizers::Tokenizer> {
    let merges = merges
        .iter()
        .map(|m| {
            let cut = m.char_indices().skip(1).find(|&(_, c)| c == ' ');
            cut.map(|(i, _)| (m[..i].to_string(), m[i + 1..].to_string()))
                .ok_or_else(|| {
                    Error::MissingKey(format!("tokenizer.ggml.merges (merge {m:?} has no space)"))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let map: tokenizers::models::bpe::Vocab = vocab
        .tokens()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(tok_err)?;
    let mut splits: Vec<PreTokenizerWrapper> = pre
        .regexes
        .iter()
        .map(|r| {
            Split::new(
                SplitPattern::Regex((*r).into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::from)
            .map_err(tok_err)
        })
        .collect::<Result<_>>()?;
    splits.push(ByteLevel::new(false, false, false).into());
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(Sequence::new(splits)));
    inner.with_decoder(Some(ByteLevel::default()));
    // llama.cpp (tokenizing without special parsing, as backlens does) splits the text at
    // user-defined tokens only; control tokens in the text are tokenized as text.
    let user: Vec<AddedToken> = (0..vocab.len() as u32)
        .filter(|&id| vocab.kind(id) == TYPE_USER_DEFINED)
        .filter_map(|id| vocab.text(id))
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let _added = inner.add_special_tokens(user).map_err(tok_err)?;
    Ok(inner)
}
