//! Tokenizers whose ids are llama.cpp's, from GGUF `tokenizer.ggml.*` metadata (byte-level BPE
//! with llama.cpp's pre-tokenizers in [`bpe`], SentencePiece-style in [`spm`]) or from an HF
//! `tokenizer.json`; BOS per the file, as llama.cpp adds it.

mod bpe;
mod spm;

use crate::source::ModelSource;
use crate::weights::gguf::{GgufFile, Value};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;

/// llama.cpp token type of user-defined tokens (split out of the text before tokenizing).
const TYPE_USER_DEFINED: i32 = 4;
/// llama.cpp token type of byte tokens (`<0x0A>`).
const TYPE_BYTE: i32 = 6;

/// A text tokenizer with the model's BOS convention.
pub struct Tokenizer {
    kind: Kind,
    /// Prepended to a prompt (`tokenizer.ggml.add_bos_token`, default per tokenizer kind).
    bos: Option<u32>,
    /// Rows of the model's token embedding and the file it is in: ids past it are refused.
    embedding: Option<(usize, PathBuf)>,
}

enum Kind {
    /// Byte-level BPE (GGUF `gpt2`) or any HF `tokenizer.json`.
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece-style (GGUF `llama`).
    Spm(spm::Spm),
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

/// The token list of a GGUF file with each token's llama.cpp type.
pub struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    /// User-defined tokens, longest first: the order llama.cpp splits text at them.
    user_defined: Vec<u32>,
}

/// A piece of input text: raw text, or a user-defined token found in it.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// An array-valued key, its items checked to be at least `n` when `n` is given.
fn array<'a>(g: &'a GgufFile, key: &str, n: Option<usize>) -> Result<Option<&'a [Value]>> {
    let Some(v) = g.get(key) else {
        return Ok(None);
    };
    let items = v
        .as_array()
        .ok_or_else(|| Error::MissingKey(format!("{key} (not an array)")))?;
    if let Some(n) = n.filter(|&n| items.len() < n) {
        return Err(Error::MissingKey(format!(
            "{key} ({} entries for {n} tokens)",
            items.len()
        )));
    }
    Ok(Some(items))
}

/// The strings of an array-valued key.
fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    array(g, key, None)?
        .ok_or_else(|| Error::MissingKey(key.to_string()))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| Error::MissingKey(format!("{key} (not an array of strings)")))
        })
        .collect()
}

impl Vocab {
    /// Reads `tokenizer.ggml.tokens` and `tokenizer.ggml.token_type`. An empty token is named
    /// `[EMPTY_i]` as llama.cpp names it; a repeated token is an error (llama.cpp would abort).
    fn from_gguf(g: &GgufFile) -> Result<Vocab> {
        let key = "tokenizer.ggml.tokens";
        let tokens: Vec<String> = strings(g, key)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| match t.is_empty() {
                true => format!("[EMPTY_{i}]"),
                false => t.to_string(),
            })
            .collect();
        let types = match array(g, "tokenizer.ggml.token_type", Some(tokens.len()))? {
            Some(items) => items[..tokens.len()]
                .iter()
                .map(|v| match v {
                    Value::I32(t) => Ok(*t),
                    _ => Err(Error::MissingKey(
                        "tokenizer.ggml.token_type (not an array of i32)".into(),
                    )),
                })
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = ids.insert(t.clone(), i as u32) {
                return Err(Error::MissingKey(format!(
                    "{key} (token {i} repeats token {first}, {t:?})"
                )));
            }
        }
        let mut user_defined: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| types[i as usize] == TYPE_USER_DEFINED)
            .collect();
        user_defined.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        Ok(Vocab {
            tokens,
            types,
            ids,
            user_defined,
        })
    }

    fn tokens(&self) -> &[String] {
        &self.tokens
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    fn text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    fn kind(&self, id: u32) -> i32 {
        self.types.get(id as usize).copied().unwrap_or(0)
    }

    /// Splits `text` at user-defined tokens, longest token first (llama.cpp's
    /// `tokenizer_st_partition` without special parsing).
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut out = vec![Fragment::Text(text)];
        for &id in &self.user_defined {
            let piece = self.tokens[id as usize].as_str();
            if !out
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(piece)))
            {
                continue;
            }
            out = out
                .into_iter()
                .flat_map(|f| match f {
                    Fragment::Text(t) if t.contains(piece) => {
                        let mut parts = Vec::new();
                        for (i, part) in t.split(piece).enumerate() {
                            if i > 0 {
                                parts.push(Fragment::Token(id));
                            }
                            if !part.is_empty() {
                                parts.push(Fragment::Text(part));
                            }
                        }
                        parts
                    }
                    other => vec![other],
                })
                .collect();
        }
        out.retain(|f| !matches!(f, Fragment::Text("")));
        out
    }
}

/// A special token id from `key`, else `default` when it is a token; None if neither.
fn special_id(g: &GgufFile, key: &str, default: u32, n_tokens: usize) -> Result<Option<u32>> {
    let Some(v) = g.get(key) else {
        return Ok(((default as usize) < n_tokens).then_some(default));
    };
    let id = v
        .as_u64()
        .ok_or_else(|| Error::MissingKey(format!("{key} (not an integer)")))?;
    let id = u32::try_from(id)
        .map_err(|_| Error::MissingKey(format!("{key} ({id} is not a 32-bit token id)")))?;
    if id as usize >= n_tokens {
        return Err(Error::MissingKey(format!(
            "{key} ({id} is past the {n_tokens} tokens)"
        )));
    }
    Ok(Some(id))
}

/// The BOS to prepend: `tokenizer.ggml.add_bos_token` (else `add_default`) says whether,
/// `tokenizer.ggml.bos_token_id` (else `id_default`) which; asked for but absent is an error
/// (llama.cpp would abort).
fn bos_to_add(
    g: &GgufFile,
    add_default: bool,
    id_default: u32,
    n_tokens: usize,
) -> Result<Option<u32>> {
    let (add_key, id_key) = (
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id",
    );
    let add = match g.get(add_key) {
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::MissingKey(format!("{add_key} (not a bool)")))?,
        None => add_default,
    };
    if !add {
        return Ok(None);
    }
    special_id(g, id_key, id_default, n_tokens)?
        .map(Some)
        .ok_or_else(|| {
            Error::MissingKey(format!(
                "{id_key} (needed by {add_key}, and the default {id_default} is past the {n_tokens} tokens)"
            ))
        })
}

/// Names accepted for `tokenizer.ggml.pre`, for the error message.
fn supported_pre() -> String {
    bpe::PRE_TOKENIZERS
        .iter()
        .flat_map(|p| p.names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
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
                    kind: Kind::Bpe(Box::new(inner)),
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

    /// Builds the tokenizer `tokenizer.ggml.model` names (`gpt2`: byte-level BPE with the
    /// pre-tokenizer of `tokenizer.ggml.pre`; `llama`: SentencePiece-style). Errors name the file.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        Self::build_gguf(g).map_err(|e| e.in_file(g.path()))
    }

    fn build_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model")?;
        let vocab = Vocab::from_gguf(g)?;
        let n = vocab.len();
        let (kind, bos_default, bos_id_default) = match model {
            "gpt2" => {
                let name = match g.get("tokenizer.ggml.pre") {
                    Some(v) => v.as_str().ok_or_else(|| {
                        Error::MissingKey("tokenizer.ggml.pre (not a string)".into())
                    })?,
                    // llama.cpp warns and uses its default pre-tokenizer.
                    None => "default",
                };
                let pre = bpe::pre_tokenizer(name).ok_or_else(|| Error::UnsupportedTokenizer {
                    key: "tokenizer.ggml.pre".into(),
                    value: name.into(),
                    supported: supported_pre(),
                })?;
                let merges = strings(g, "tokenizer.ggml.merges")?;
                let inner = bpe::build(&vocab, &merges, pre)?;
                (Kind::Bpe(Box::new(inner)), pre.add_bos, 11)
            }
            "llama" => {
                let scores = match array(g, "tokenizer.ggml.scores", Some(n))? {
                    Some(items) => items[..n]
                        .iter()
                        .map(|v| match *v {
                            Value::F32(s) => Ok(s),
                            Value::I32(s) => Ok(s as f32),
                            _ => Err(Error::MissingKey(
                                "tokenizer.ggml.scores (not an array of f32 or i32)".into(),
                            )),
                        })
                        .collect::<Result<_>>()?,
                    None => vec![0.0; n],
                };
                let prefix = match g.get("tokenizer.ggml.add_space_prefix") {
                    Some(v) => v.as_bool().ok_or_else(|| {
                        Error::MissingKey("tokenizer.ggml.add_space_prefix (not a bool)".into())
                    })?,
                    None => true,
                };
                (Kind::Spm(spm::Spm::new(vocab, scores, prefix)?), true, 1)
            }
            other => {
                return Err(Error::UnsupportedTokenizer {
                    key: "tokenizer.ggml.model".into(),
                    value: other.into(),
                    supported: "gpt2, llama".into(),
                })
            }
        };
        let bos = bos_to_add(g, bos_default, bos_id_default, n)?;
        Ok(Tokenizer {
            kind,
            bos,
            embedding: None,
        })
    }

    /// Token ids of `text` alone; `at_start` when it begins the input (SentencePiece: the space
    /// prefix; an HF `tokenizer.json`: its post-processor's tokens, BOS for Llama and Gemma).
    fn encode(&self, text: &str, at_start: bool) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Bpe(inner) => Ok(inner
                .encode_fast(text, at_start)
                .map_err(tok_err)?
                .get_ids()
                .to_vec()),
            Kind::Spm(spm) => spm.encode(text, at_start),
        }
    }

    /// Token ids of a prompt, as llama.cpp tokenizes it with special tokens added: BOS when the
    /// model asks for it. EOS is never appended (a prompt is to be continued), unlike
    /// `llama_tokenize` for the rare files with `tokenizer.ggml.add_eos_token`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.encode(text, true)?);
        self.check_ids(text, ids)
    }

    /// Token ids of a continuation: no BOS or EOS, a leading space unless it has one already,
    /// and (SentencePiece) no space prefix, since the text follows a prompt.
    pub fn encode_target(&self, target: &str) -> Result<Vec<u32>> {
        let spaced = if target.starts_with(' ') {
            target.to_string()
        } else {
            format!(" {target}")
        };
        let ids = self.encode(&spaced, false)?;
        self.check_ids(target, ids)
    }

    /// Text of one token (special tokens included; a byte token of a multi-byte character as
    /// its `<0xXX>` name).
    pub fn token_text(&self, id: u32) -> String {
        match &self.kind {
            Kind::Bpe(inner) => inner
                .decode(&[id], false)
                .unwrap_or_else(|_| format!("<{id}>")),
            Kind::Spm(spm) => String::from_utf8(spm.token_bytes(id))
                .unwrap_or_else(|_| spm.vocab().text(id).unwrap_or_default().to_string()),
        }
    }

    /// Text of a token sequence.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.kind {
            Kind::Bpe(inner) => inner.decode(ids, false).unwrap_or_default(),
            Kind::Spm(spm) => {
                let bytes: Vec<u8> = ids.iter().flat_map(|&id| spm.token_bytes(id)).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    /// The tokenizer as HF `tokenizer.json` text (for writing HF checkpoints of BPE models).
    pub fn to_json(&self) -> Result<String> {
        match &self.kind {
            Kind::Bpe(inner) => inner.to_string(true).map_err(tok_err),
            Kind::Spm(_) => Err(Error::Tokenizer(
                "a SentencePiece vocabulary (tokenizer.ggml.model = llama) is not written as tokenizer.json"
                    .into(),
            )),
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Bpe(inner) => inner.get_vocab_size(true),
            Kind::Spm(spm) => spm.vocab().len(),
        }
    }
}
