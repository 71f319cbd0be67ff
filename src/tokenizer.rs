//! Tokenizer built with the `tokenizers` crate, either from GGUF metadata (the byte-level BPE
//! vocabulary and merges llama.cpp itself uses) or from an HF `tokenizer.json`.

use crate::source::ModelSource;
use crate::weights::gguf::{GgufFile, Value};
use crate::{Error, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// llama.cpp token type of control tokens (`<|im_start|>` and the like).
const TOKEN_TYPE_CONTROL: u64 = 3;
/// llama.cpp token type of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: u64 = 4;
/// Pre-tokenizer regex of Llama 3 style BPE vocabularies.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A text tokenizer with the model's BOS convention.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding a prompt (GGUF `tokenizer.ggml.add_bos_token`).
    bos: Option<u32>,
    /// Rows of the model's token embedding and the file it is in: ids past it are refused.
    embedding: Option<(usize, std::path::PathBuf)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    g.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| Error::MissingKey(key.to_string()))?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| Error::MissingKey(key.to_string())))
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer of a model file or folder.
    pub fn from_source(source: &ModelSource) -> Result<Tokenizer> {
        let mut tok = match source {
            ModelSource::Gguf(g) => Self::from_gguf(g)?,
            ModelSource::Hf(h) => {
                let path = h.ckpt.dir.join("tokenizer.json");
                let inner = tokenizers::Tokenizer::from_file(&path)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
                Tokenizer {
                    inner,
                    bos: None,
                    embedding: None,
                }
            }
        };
        tok.embedding = source
            .shape("token_embd.weight")
            .and_then(|s| s.first().copied())
            .map(|rows| (rows, source.path().to_path_buf()));
        if let (Some(bos), Some((rows, path))) = (tok.bos, &tok.embedding) {
            if bos as usize >= *rows {
                return Err(Error::MissingKey(format!(
                    "tokenizer.ggml.bos_token_id ({bos} is past the {rows} rows of token_embd.weight)"
                ))
                .in_file(path));
            }
        }
        Ok(tok)
    }

    /// Fails for token ids the model has no embedding row for.
    fn check_ids(&self, text: &str, ids: Vec<u32>) -> Result<Vec<u32>> {
        if let Some((rows, path)) = &self.embedding {
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= *rows) {
                return Err(Error::BadRequest(format!(
                    "{text:?} tokenizes to id {bad}, past the {rows} rows of token_embd.weight (the tokenizer has tokens the model lacks)"
                ))
                .in_file(path));
            }
        }
        Ok(ids)
    }

    /// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')"
            )));
        }
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let merges = string_array(g, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("merge '{m}' has no space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("gpt-2");
        let byte_level = ByteLevel::new(false, false, true);
        let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => (
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
                false,
            ),
            "llama-bpe" | "llama3" => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err)?;
                (
                    Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])
                        .into(),
                    true,
                )
            }
            "gpt-2" | "gpt2" | "default" | "olmo" | "mpt" => (byte_level.into(), false),
            other => {
                return Err(Error::Tokenizer(format!(
                    "pre-tokenizer '{other}' is not supported (gpt-2, smollm, starcoder, llama-bpe, ...)"
                )))
            }
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        if let Some(types) = g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| {
                    matches!(
                        t.as_u64(),
                        Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
                    )
                })
                .map(|(_, tok)| AddedToken::from(tok.to_string(), true))
                .collect();
            let _added = inner.add_special_tokens(special).map_err(tok_err)?;
        }
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let bos = match add_bos {
            true => {
                let id = g.get_u64("tokenizer.ggml.bos_token_id")?;
                Some(u32::try_from(id).map_err(|_| {
                    Error::MissingKey(format!(
                        "tokenizer.ggml.bos_token_id ({id} is not a 32-bit token id)"
                    ))
                })?)
            }
            false => None,
        };
        Ok(Tokenizer {
            inner,
            bos,
            embedding: None,
        })
    }

    /// Token ids of a prompt, with BOS when the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, true).map_err(tok_err)?;
        let ids = self
            .bos
            .into_iter()
            .chain(enc.get_ids().iter().copied())
            .collect();
        self.check_ids(text, ids)
    }

    /// Token ids of a continuation: no BOS, and a leading space unless it has one already.
    pub fn encode_target(&self, target: &str) -> Result<Vec<u32>> {
        let spaced = if target.starts_with(' ') {
            target.to_string()
        } else {
            format!(" {target}")
        };
        let enc = self
            .inner
            .encode_fast(spaced.as_str(), false)
            .map_err(tok_err)?;
        self.check_ids(target, enc.get_ids().to_vec())
    }

    /// Text of one token (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .unwrap_or_else(|_| format!("<{id}>"))
    }

    /// Text of a token sequence.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// The tokenizer as HF `tokenizer.json` text (for writing HF checkpoints).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
