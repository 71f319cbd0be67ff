//! llama.cpp in process (crate `llama-cpp-2`): load a GGUF, optionally with LoRA adapters, and
//! compute next-token logits or greedy continuations exactly as llama.cpp serves them. Adapters
//! pass [`crate::lora::validate`] against the model's file before llama.cpp sees them, because
//! llama.cpp aborts the process on some malformed adapters instead of returning an error.

use crate::arch::generic::Shape;
use crate::lora;
use crate::numeric::{argmax, log_probs};
use crate::weights::gguf::GgufFile;
use crate::{Error, Result};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Context window of the sessions backlens opens: the KV cells of one decode, all its
/// sequences together (the cache is unified).
pub const SESSION_CTX: u32 = 512;

/// Most sequences one decode of a session holds.
pub const SESSION_SEQS: u32 = 64;

/// The sequences a batch token belongs to: ids `first .. first + count`. A prompt shared by
/// several continuations belongs to all of theirs, so it is decoded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seqs {
    /// The first id.
    pub first: u32,
    /// How many consecutive ids (at least one).
    pub count: u32,
}

impl Seqs {
    /// Sequence 0 alone.
    pub const FIRST: Seqs = Seqs::one(0);

    /// Sequence `id` alone.
    pub const fn one(id: u32) -> Seqs {
        Seqs {
            first: id,
            count: 1,
        }
    }

    /// The ids, as llama.cpp takes them.
    pub fn ids(self) -> impl Iterator<Item = i32> {
        (self.first..self.first + self.count).map(|id| id as i32)
    }
}

/// One token of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Token id.
    pub token: u32,
    /// Its position in its sequences.
    pub pos: usize,
    /// Whether the logits after it are wanted.
    pub logits: bool,
    /// The sequences it belongs to.
    pub seqs: Seqs,
}

/// Fails for a batch no session decode takes: empty, more than [`SESSION_CTX`] tokens, a
/// sequence id from [`SESSION_SEQS`] on, or a position from `max_tokens` on.
pub(crate) fn check_batch(path: &Path, batch: &[Entry], max_tokens: usize) -> Result<()> {
    if batch.is_empty() || batch.len() > SESSION_CTX as usize {
        return Err(too_long(path, batch.len(), SESSION_CTX as usize));
    }
    let end = batch.iter().map(|e| e.pos + 1).max().unwrap_or(0);
    if end > max_tokens {
        return Err(too_long(path, end, max_tokens));
    }
    match batch
        .iter()
        .find(|e| e.seqs.count == 0 || e.seqs.first + e.seqs.count > SESSION_SEQS)
    {
        Some(e) => Err(Error::BadRequest(format!(
            "{}: sequence ids {}..{} of a decode: sessions take 1 to {SESSION_SEQS} sequences",
            path.display(),
            e.seqs.first,
            e.seqs.first + e.seqs.count
        ))),
        None => Ok(()),
    }
}

/// Most sequence ids any one entry of `batch` carries (the batch's allocation per token).
pub(crate) fn ids_per_token(batch: &[Entry]) -> u32 {
    batch.iter().map(|e| e.seqs.count).max().unwrap_or(1)
}

/// A llama.cpp context with a unified KV cache of [`SESSION_CTX`] cells for up to
/// [`SESSION_SEQS`] sequences: a [`Session`], or [`crate::trace::Tracer`]'s context, so that
/// scoring and generation are written once and one loaded model can both trace and score.
pub trait Decoder {
    /// Empties the KV cache.
    fn clear(&mut self);
    /// Decodes `batch` on top of the cache (see [`check_batch`] for what it takes).
    fn decode(&mut self, batch: &[Entry]) -> Result<()>;
    /// Logits after entry `i` of the last decode (one that asked for them); non-finite refused.
    fn row(&mut self, i: usize) -> Result<Vec<f32>>;
    /// Most positions the sequence may hold.
    fn max_tokens(&self) -> usize;
    /// The end-of-sequence token, if the vocabulary has one.
    fn eos(&self) -> Option<u32>;
}

/// The error for a sequence of `n` tokens where `path`'s sessions take at most `max`.
pub(crate) fn too_long(path: &Path, n: usize, max: usize) -> Error {
    Error::BadRequest(format!(
        "{n} tokens: llama.cpp sessions of {} take 1 to {max} (its training context, at most {SESSION_CTX})",
        path.display()
    ))
}

/// Decodes `tokens` from an empty cache with logits after each position from `from` on.
fn decode_from(
    d: &mut (impl Decoder + ?Sized),
    tokens: &[u32],
    from: usize,
) -> Result<Vec<Vec<f32>>> {
    d.clear();
    let batch: Vec<Entry> = tokens
        .iter()
        .enumerate()
        .map(|(pos, &token)| Entry {
            token,
            pos,
            logits: pos >= from,
            seqs: Seqs::FIRST,
        })
        .collect();
    d.decode(&batch)?;
    (from..tokens.len()).map(|i| d.row(i)).collect()
}

/// Next-token logits after the whole of `tokens` (one decode from an empty cache).
pub fn logits_last(d: &mut (impl Decoder + ?Sized), tokens: &[u32]) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Err(Error::Invalid("the prompt tokenizes to nothing".into()));
    }
    Ok(decode_from(d, tokens, tokens.len() - 1)?.remove(0))
}

/// One sequence of a packed [`score`] decode: query `.0`'s prompt followed by the tail of its
/// continuation `.1` (all but the last token), or the prompt alone (None).
type Unit = (usize, Option<usize>);

/// A query's place in a packed decode: its index, the batch index of its prompt's last token,
/// and each continuation tail's (continuation, batch index of its first token).
type Placed = (usize, usize, Vec<(usize, usize)>);

/// Scores prompts and their continuations in as few decodes as the session takes: each
/// continuation of more than one token is a sequence of its own that shares its prompt's tokens
/// with the prompt's other sequences (the prompt is decoded once), single-token continuations
/// are read off the prompt's last position, and consecutive queries share a decode while its
/// tokens fit [`SESSION_CTX`] and its sequences [`SESSION_SEQS`]. Each sequence attends only to
/// its own tokens, so the scores equal decoding every sequence alone up to the kernels'
/// rounding (`tests/eval.rs packed_scoring_matches_one_sequence_decodes`).
pub fn score(
    d: &mut (impl Decoder + ?Sized),
    queries: &[PromptQuery],
) -> Result<Vec<PromptScores>> {
    if queries
        .iter()
        .any(|q| q.prompt.is_empty() || q.continuations.iter().any(|c| c.is_empty()))
    {
        return Err(Error::Invalid("empty prompt or continuation".into()));
    }
    let units: Vec<Unit> = queries
        .iter()
        .enumerate()
        .flat_map(|(qi, q)| {
            let long: Vec<Option<usize>> = (0..q.continuations.len())
                .filter(|&c| q.continuations[c].len() > 1)
                .map(Some)
                .collect();
            let seqs = if long.is_empty() { vec![None] } else { long };
            seqs.into_iter().map(move |c| (qi, c))
        })
        .collect();
    let mut scores: Vec<PromptScores> = queries
        .iter()
        .map(|q| PromptScores {
            next_logits: Vec::new(),
            logprobs: vec![0.0; q.continuations.len()],
        })
        .collect();
    let mut start = 0;
    while start < units.len() {
        let (mut end, mut tokens) = (start, 0);
        while end < units.len() {
            let (qi, c) = units[end];
            let q = &queries[qi];
            let tail = c.map_or(0, |c| q.continuations[c].len() - 1);
            let prompt = match end > start && units[end - 1].0 == qi {
                true => 0,
                false => q.prompt.len(),
            };
            let full = tokens + prompt + tail > SESSION_CTX as usize
                || end - start >= SESSION_SEQS as usize;
            if end > start && full {
                break;
            }
            tokens += prompt + tail;
            end += 1;
        }
        decode_units(d, queries, &units[start..end], &mut scores)?;
        start = end;
    }
    Ok(scores)
}

/// One decode of `units` (consecutive sequences, those of one query adjacent), from an empty
/// cache; fills in their queries' scores (a query's next-token logits and single-token
/// continuations from the first decode that holds it).
fn decode_units(
    d: &mut (impl Decoder + ?Sized),
    queries: &[PromptQuery],
    units: &[Unit],
    scores: &mut [PromptScores],
) -> Result<()> {
    let mut batch = Vec::new();
    let mut groups: Vec<Placed> = Vec::new();
    let mut next_seq = 0;
    for run in units.chunk_by(|a, b| a.0 == b.0) {
        let q = &queries[run[0].0];
        let seqs = Seqs {
            first: next_seq,
            count: run.len() as u32,
        };
        batch.extend(q.prompt.iter().enumerate().map(|(pos, &token)| Entry {
            token,
            pos,
            logits: pos + 1 == q.prompt.len(),
            seqs,
        }));
        let prompt_row = batch.len() - 1;
        let mut tails = Vec::new();
        for (seq, c) in (next_seq..).zip(run.iter().filter_map(|u| u.1)) {
            let cont = q.continuations[c];
            tails.push((c, batch.len()));
            batch.extend(
                cont[..cont.len() - 1]
                    .iter()
                    .enumerate()
                    .map(|(k, &token)| Entry {
                        token,
                        pos: q.prompt.len() + k,
                        logits: true,
                        seqs: Seqs::one(seq),
                    }),
            );
        }
        next_seq += run.len() as u32;
        groups.push((run[0].0, prompt_row, tails));
    }
    d.clear();
    d.decode(&batch)?;
    for (qi, prompt_row, tails) in groups {
        let q = &queries[qi];
        let next = d.row(prompt_row)?;
        let first = log_probs(&next);
        let s = &mut scores[qi];
        for (c, first_row) in tails {
            let cont = q.continuations[c];
            let mut total = first[cont[0] as usize];
            for (k, &t) in cont[1..].iter().enumerate() {
                total += log_probs(&d.row(first_row + k)?)[t as usize];
            }
            s.logprobs[c] = total;
        }
        if s.next_logits.is_empty() {
            for (c, cont) in q.continuations.iter().enumerate() {
                if cont.len() == 1 {
                    s.logprobs[c] = first[cont[0] as usize];
                }
            }
            s.next_logits = next;
        }
    }
    Ok(())
}

/// Greedy continuation of `tokens` by up to `n` tokens (stops at end-of-sequence or at the
/// session's last position).
pub fn generate(d: &mut (impl Decoder + ?Sized), tokens: &[u32], n: usize) -> Result<Vec<u32>> {
    if tokens.is_empty() {
        return Err(Error::Invalid("generating needs a prompt".into()));
    }
    let mut logits = decode_from(d, tokens, tokens.len() - 1)?.remove(0);
    let mut out = Vec::with_capacity(n);
    for pos in tokens.len()..tokens.len() + n {
        let next = argmax(&logits) as u32;
        if Some(next) == d.eos() || pos + 1 >= d.max_tokens() {
            break;
        }
        out.push(next);
        d.decode(&[Entry {
            token: next,
            pos,
            logits: true,
            seqs: Seqs::FIRST,
        }])?;
        logits = d.row(0)?;
    }
    Ok(out)
}

/// llama.cpp's backend, initialized once per process with its logs off.
pub(crate) fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(false),
            );
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Runtime(e.clone()))
}

fn rt_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("{what}: {e}"))
}

/// A GGUF model loaded by llama.cpp.
pub struct LlamaRuntime {
    model: LlamaModel,
    /// The model's file, which adapters are validated against.
    path: PathBuf,
    /// That file parsed by backlens, on the first adapter (eval loads one per record).
    header: Option<GgufFile>,
}

impl std::fmt::Debug for LlamaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaRuntime")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl LlamaRuntime {
    /// Loads `path` on the CPU, after backlens's own GGUF checks and the forward-only shape
    /// ([`Shape`]: an architecture the pinned llama.cpp knows, a layer count it takes).
    pub fn load(path: &Path) -> Result<LlamaRuntime> {
        // backlens's own reader first: it names what is wrong where llama.cpp would only say
        // that loading failed (or abort on a typed getter or an assert).
        let header = GgufFile::open(path)?;
        Shape::from_gguf(&header)?;
        let backend = backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(0);
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|_| {
            Error::Runtime(format!(
                "{}: llama.cpp could not load this model (its architecture or hyperparameters are not ones the pinned llama.cpp accepts)",
                path.display()
            ))
        })?;
        Ok(LlamaRuntime {
            model,
            path: path.to_path_buf(),
            header: Some(header),
        })
    }

    /// The model file this runtime loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads a LoRA adapter GGUF against this model (not yet applied to any session), after
    /// [`lora::validate`] has checked it against the model's file: a malformed adapter is an
    /// error naming the file, never an abort inside llama.cpp. (The file must not change between
    /// the check and llama.cpp's own read of it.)
    pub fn load_lora(&mut self, path: &Path) -> Result<LlamaLoraAdapter> {
        if self.header.is_none() {
            self.header = Some(GgufFile::open(&self.path)?);
        }
        let base = self.header.as_ref().expect("parsed just above");
        lora::validate(base, &GgufFile::open(path)?)?;
        self.model
            .lora_adapter_init(path)
            .map_err(|e| rt_err(&format!("loading adapter {}", path.display()), e))
    }

    /// Tokenizes like llama.cpp's tools do for a prompt (BOS per the model, no special parsing).
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, false)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab() as usize
    }

    /// Opens an evaluation session with an F32 KV cache, unified across its sequences.
    pub fn session(&self) -> Result<Session<'_>> {
        let threads = decode_threads();
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(SESSION_CTX))
            .with_n_batch(SESSION_CTX)
            .with_n_ubatch(SESSION_CTX)
            .with_n_seq_max(SESSION_SEQS)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        let ctx = self
            .model
            .new_context(backend()?, params)
            .map_err(|e| rt_err("creating a context", e))?;
        Ok(Session {
            ctx,
            eos: u32::try_from(self.model.vocab().eos().0).ok(),
            max_tokens: (SESSION_CTX as usize).min(self.model.n_ctx_train().max(1) as usize),
            path: self.path.clone(),
        })
    }
}

/// Whether this process runs its llama.cpp decodes with nothing else busy beside them
/// ([`claim_cores`]).
static ALL_CORES: AtomicBool = AtomicBool::new(false);

/// Lets llama.cpp decodes opened from now on use every core: for commands that run nothing
/// beside their decodes (`eval`, `bench`). `BACKLENS_THREADS` still decides where it is set.
pub fn claim_cores() {
    ALL_CORES.store(true, Ordering::Relaxed);
}

/// Threads for llama.cpp decodes: `BACKLENS_THREADS`, else every core after [`claim_cores`],
/// else half the cores (at least one). ggml's workers meet at spinning barriers after every
/// graph node; when they share the cores with other busy threads (candle's, a parallel test,
/// another process) a descheduled worker stalls the others, and on two cores a 10-token decode
/// then takes seconds instead of tens of milliseconds (eval of 20 records with two threads
/// beside another process's bench: 34 s against 8.5 s with one). Leaving half the cores free
/// avoids that at a small cost on an idle machine; the test suite, which runs two test threads,
/// sets `BACKLENS_THREADS=1` (Makefile).
pub fn decode_threads() -> i32 {
    let from_env = std::env::var("BACKLENS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = match ALL_CORES.load(Ordering::Relaxed) {
        true => cores,
        false => cores / 2,
    };
    from_env.unwrap_or(default).max(1) as i32
}

/// A llama.cpp context for repeated evaluations; each call starts from an empty KV cache.
pub struct Session<'m> {
    ctx: LlamaContext<'m>,
    eos: Option<u32>,
    /// Most tokens one evaluation may hold: the session's context, and no more than the model
    /// was trained on (past that, models with learned positions make ggml abort).
    max_tokens: usize,
    /// The model file, for messages.
    path: std::path::PathBuf,
}

impl Session<'_> {
    /// Applies `adapter` at `scale`, replacing any adapter applied before.
    pub fn set_lora(&mut self, adapter: &mut LlamaLoraAdapter, scale: f32) -> Result<()> {
        self.ctx
            .lora_adapter_set(adapter, scale)
            .map_err(|e| rt_err("applying adapter", e))
    }

    /// Removes every adapter from this session.
    pub fn clear_lora(&mut self, adapter: &mut LlamaLoraAdapter) -> Result<()> {
        self.ctx
            .lora_adapter_remove(adapter)
            .map_err(|e| rt_err("removing adapter", e))
    }

    /// Logits after each position in `want` (indices into `tokens`), from one decode.
    pub fn logits_at(&mut self, tokens: &[u32], want: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.decode_fresh(tokens, |i| want.contains(&i))?;
        want.iter()
            .map(|&i| self.finite_row(i).map(<[f32]>::to_vec))
            .collect()
    }

    /// Decodes `tokens` from an empty KV cache, with logits at the positions `keep` selects.
    fn decode_fresh(&mut self, tokens: &[u32], keep: impl Fn(usize) -> bool) -> Result<()> {
        if tokens.is_empty() || tokens.len() > self.max_tokens {
            return Err(too_long(&self.path, tokens.len(), self.max_tokens));
        }
        self.ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], keep(i))
                .map_err(|e| rt_err("batch", e))?;
        }
        self.ctx.decode(&mut batch).map_err(|e| rt_err("decode", e))
    }

    /// The logits row of position `i` of the last decode, refused when non-finite.
    fn finite_row(&self, i: usize) -> Result<&[f32]> {
        let row = self.ctx.get_logits_ith(i as i32);
        match row.iter().all(|v| v.is_finite()) {
            true => Ok(row),
            false => Err(Error::Numeric(
                "llama.cpp gives non-finite logits: the model's weights (or the edit) hold NaN or Inf"
                    .into(),
            )),
        }
    }

    /// Most tokens one evaluation may hold (the session's context, at most the training one).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// log p(tokens[i+1] | tokens[..=i]) for every i, from one decode (each row's log-softmax
    /// is taken as it is read, so no logits matrix is kept).
    pub fn next_token_logprobs(&mut self, tokens: &[u32]) -> Result<Vec<f64>> {
        if tokens.len() < 2 {
            return Err(Error::Invalid(
                "scoring next tokens needs at least two tokens".into(),
            ));
        }
        self.decode_fresh(tokens, |i| i + 1 < tokens.len())?;
        (0..tokens.len() - 1)
            .map(|i| Ok(log_probs(self.finite_row(i)?)[tokens[i + 1] as usize]))
            .collect()
    }

    /// Scores prompts and their continuations ([`score`]).
    pub fn score(&mut self, queries: &[PromptQuery]) -> Result<Vec<PromptScores>> {
        score(self, queries)
    }

    /// Next-token logits after the whole of `tokens`.
    pub fn logits_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let last = tokens.len().saturating_sub(1);
        Ok(self.logits_at(tokens, &[last])?.remove(0))
    }

    /// log p(target | prompt), teacher-forced over every target token, from one decode.
    pub fn sequence_logprob(&mut self, prompt: &[u32], target: &[u32]) -> Result<f64> {
        let mut tokens = prompt.to_vec();
        tokens.extend_from_slice(&target[..target.len().saturating_sub(1)]);
        let want: Vec<usize> = (0..target.len()).map(|i| prompt.len() - 1 + i).collect();
        let rows = self.logits_at(&tokens, &want)?;
        Ok(rows
            .iter()
            .zip(target)
            .map(|(row, &t)| log_probs(row)[t as usize])
            .sum())
    }

    /// Greedy continuation of `tokens` by up to `n` tokens ([`generate`]).
    pub fn generate(&mut self, tokens: &[u32], n: usize) -> Result<Vec<u32>> {
        if tokens.is_empty() || tokens.len() > self.max_tokens {
            return Err(too_long(&self.path, tokens.len(), self.max_tokens));
        }
        generate(self, tokens, n)
    }
}

impl Decoder for Session<'_> {
    fn clear(&mut self) {
        self.ctx.clear_kv_cache();
    }

    fn decode(&mut self, batch: &[Entry]) -> Result<()> {
        check_batch(&self.path, batch, self.max_tokens)?;
        // Allocated with room for the most ids any entry carries, which `add` relies on.
        let mut b = LlamaBatch::new(batch.len(), ids_per_token(batch) as i32);
        for e in batch {
            let ids: Vec<i32> = e.seqs.ids().collect();
            b.add(LlamaToken(e.token as i32), e.pos as i32, &ids, e.logits)
                .map_err(|e| rt_err("batch", e))?;
        }
        self.ctx.decode(&mut b).map_err(|e| rt_err("decode", e))
    }

    fn row(&mut self, i: usize) -> Result<Vec<f32>> {
        self.finite_row(i).map(<[f32]>::to_vec)
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn eos(&self) -> Option<u32> {
        self.eos
    }
}

/// A prompt and the continuations to score after it ([`Session::score`]).
#[derive(Debug, Clone)]
pub struct PromptQuery<'a> {
    /// Prompt tokens.
    pub prompt: &'a [u32],
    /// Continuations (each at least one token).
    pub continuations: Vec<&'a [u32]>,
}

/// What [`Session::score`] returns for one [`PromptQuery`].
#[derive(Debug, Clone)]
pub struct PromptScores {
    /// Logits for the token after the prompt.
    pub next_logits: Vec<f32>,
    /// log p(continuation | prompt), teacher-forced, per continuation.
    pub logprobs: Vec<f64>,
}
