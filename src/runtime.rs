//! llama.cpp in process (crate `llama-cpp-2`): load a GGUF, optionally with LoRA adapters, and
//! compute next-token logits or greedy continuations exactly as llama.cpp serves them.

use crate::{Error, Result};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

/// Context window of the sessions backlens opens.
const SESSION_CTX: u32 = 512;

fn backend() -> Result<&'static LlamaBackend> {
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
}

impl std::fmt::Debug for LlamaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaRuntime").finish_non_exhaustive()
    }
}

impl LlamaRuntime {
    /// Loads `path` on the CPU. The file should already have passed backlens's own GGUF checks.
    pub fn load(path: &Path) -> Result<LlamaRuntime> {
        let backend = backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(0);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| rt_err(&format!("loading {}", path.display()), e))?;
        Ok(LlamaRuntime { model })
    }

    /// Loads a LoRA adapter GGUF against this model (not yet applied to any session).
    pub fn load_lora(&mut self, path: &Path) -> Result<LlamaLoraAdapter> {
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

    /// Opens an evaluation session with an F32 KV cache.
    pub fn session(&self) -> Result<Session<'_>> {
        let threads = decode_threads();
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(SESSION_CTX))
            .with_n_batch(SESSION_CTX)
            .with_n_ubatch(SESSION_CTX)
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
            eos: self.model.vocab().eos().0,
        })
    }
}

/// Threads for llama.cpp decodes: `BACKLENS_THREADS`, else half the cores (at least one).
/// ggml's workers meet at spinning barriers after every graph node; when they share the cores
/// with other busy threads (candle's, a parallel test, another process) a descheduled worker
/// stalls the others, and on two cores a 10-token decode then takes seconds instead of tens of
/// milliseconds. Leaving half the cores free avoids that at a small cost on an idle machine.
fn decode_threads() -> i32 {
    let from_env = std::env::var("BACKLENS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok());
    let half = std::thread::available_parallelism().map_or(1, |n| n.get() / 2);
    from_env.unwrap_or(half).max(1) as i32
}

/// A llama.cpp context for repeated evaluations; each call starts from an empty KV cache.
pub struct Session<'m> {
    ctx: LlamaContext<'m>,
    eos: i32,
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
        if tokens.is_empty() || tokens.len() > SESSION_CTX as usize {
            return Err(Error::Invalid(format!(
                "{} tokens: llama.cpp sessions take 1 to {SESSION_CTX}",
                tokens.len()
            )));
        }
        self.ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], want.contains(&i))
                .map_err(|e| rt_err("batch", e))?;
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| rt_err("decode", e))?;
        Ok(want
            .iter()
            .map(|&i| self.ctx.get_logits_ith(i as i32).to_vec())
            .collect())
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

    /// Greedy continuation of `tokens` by up to `n` tokens (stops at end-of-sequence).
    pub fn generate(&mut self, tokens: &[u32], n: usize) -> Result<Vec<u32>> {
        let mut logits = self.logits_last(tokens)?;
        let mut out = Vec::with_capacity(n);
        for pos in tokens.len()..tokens.len() + n {
            let next = argmax(&logits) as u32;
            if next as i32 == self.eos || pos + 1 >= SESSION_CTX as usize {
                break;
            }
            out.push(next);
            let mut batch = LlamaBatch::new(1, 1);
            batch
                .add(LlamaToken(next as i32), pos as i32, &[0], true)
                .map_err(|e| rt_err("batch", e))?;
            self.ctx
                .decode(&mut batch)
                .map_err(|e| rt_err("decode", e))?;
            logits = self.ctx.get_logits_ith(0).to_vec();
        }
        Ok(out)
    }
}

/// Index of the largest value.
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Log-softmax of f32 logits, computed in f64.
pub fn log_probs(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}
