//! A tracing forward through llama.cpp's own graph, in process: during an ordinary decode of a
//! prompt, read FF2's input (the activation that multiplies `blk.L.ffn_down.weight`) at chosen
//! layers and positions, and the logits at the last position.
//!
//! llama.cpp calls the context's `cb_eval` for every node of the graph it computes, first asking
//! whether the node's data is wanted and, when it is, again once the node is computed. FF2's
//! input is found by what it feeds, not by what each architecture names it: `src[1]` of the
//! `GGML_OP_MUL_MAT` node whose `src[0]` is the layer's base down-projection weight. A LoRA
//! adapter on that weight adds matrix products on the adapter's tensors, which do not match.
//!
//! This module owns every `unsafe` line of the tracer: the raw llama.cpp model and context (the
//! `llama-cpp-2` wrappers expose neither `cb_eval` nor their raw pointers), the callback and its
//! user data, the batch, the adapters and the reads of graph tensors.

use crate::arch::generic::Shape;
use crate::delta::Delta;
use crate::lora;
use crate::runtime::{
    backend, check_batch, decode_threads, ids_per_token, Decoder, Entry, Seqs, SESSION_CTX,
    SESSION_SEQS,
};
use crate::weights::gguf::GgufFile;
use crate::write::{OutputClaim, OutputKind};
use crate::{Error, Result};
use llama_cpp_sys_2 as sys;
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// FF2 inputs and logits at the last prompt position ([`Tracer::last_position`]).
#[derive(Debug, Clone)]
pub struct Traced {
    /// Next-token logits after the last token.
    pub logits: Vec<f32>,
    /// FF2 input at the last token, one vector (length n_ff) per requested layer, in order.
    pub ff2_in: Vec<Vec<f32>>,
}

/// FF2 inputs at several positions ([`Tracer::trace`]).
#[derive(Debug, Clone)]
pub struct TracedRows {
    /// Next-token logits after the last token.
    pub logits: Vec<f32>,
    /// `ff2_in[l][p]`: FF2 input of the `l`-th requested layer at the `p`-th requested position.
    pub ff2_in: Vec<Vec<Vec<f32>>>,
}

/// What the callback collects during one decode. Lives on the heap at a fixed address for as
/// long as the context (whose `cb_eval_user_data` points at it) exists.
#[derive(Debug, Default)]
struct Capture {
    /// Whether a [`Tracer`] decode is running (outside one, every node is declined).
    armed: bool,
    /// Names of the weights whose matrix product's input is wanted, one per requested layer.
    weights: Vec<Vec<u8>>,
    /// Batch indices of the tokens to read, ascending.
    positions: Vec<usize>,
    /// Batch indices of the tokens that produce outputs (logits), ascending; a superset of
    /// `positions`. The last layer of llama.cpp's graphs keeps only these rows.
    outputs: Vec<usize>,
    /// Tokens in the decode.
    n_tokens: usize,
    /// `rows[l][p]`, filled in by the callback.
    rows: Vec<Option<Vec<Vec<f32>>>>,
    /// The first problem met inside the callback.
    error: Option<String>,
}

impl Capture {
    /// Index of the requested weight that `node` multiplies, if it is such a product.
    fn slot_of(&self, node: &sys::ggml_tensor) -> Option<usize> {
        if node.op != sys::GGML_OP_MUL_MAT || node.src[0].is_null() {
            return None;
        }
        // SAFETY: src[0] is non-null and points at a tensor of the graph being computed, which
        // llama.cpp keeps alive for the whole callback; `name` is a fixed array inside it.
        let name = unsafe { &(*node.src[0]).name };
        let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        let name: Vec<u8> = name[..len].iter().map(|&c| c as u8).collect();
        self.weights.iter().position(|w| *w == name)
    }

    /// Copies the wanted columns of `input` (FF2's input, ne = [n_ff, n_rows]) into `slot`.
    fn read(
        &mut self,
        slot: usize,
        input: *const sys::ggml_tensor,
    ) -> std::result::Result<(), String> {
        if self.rows[slot].is_some() {
            return Err("its down projection ran twice in one decode".into());
        }
        if input.is_null() {
            return Err("the down projection has no input tensor".into());
        }
        // SAFETY: non-null, and a node's sources stay alive while llama.cpp computes the graph.
        let t = unsafe { &*input };
        let esize = match t.type_ {
            sys::GGML_TYPE_F32 => 4,
            sys::GGML_TYPE_F16 => 2,
            other => return Err(format!("its input has ggml type {other}, not f32 or f16")),
        };
        // SAFETY: as above; a view's buffer is its source's, read the way ggml_backend_tensor_get
        // reads it.
        let buffer = unsafe {
            match t.view_src.is_null() {
                true => t.buffer,
                false => (*t.view_src).buffer,
            }
        };
        if buffer.is_null() || t.data.is_null() {
            return Err("its input is not allocated".into());
        }
        let [n_ff, n_rows, n2, n3] = t.ne;
        if n_ff <= 0 || n_rows <= 0 || n2 != 1 || n3 != 1 {
            return Err(format!(
                "its input has shape {:?}, not [n_ff, n_tokens]",
                t.ne
            ));
        }
        let (n_ff, n_rows) = (n_ff as usize, n_rows as usize);
        // SAFETY: `t` is a valid, allocated tensor (checked above).
        let nbytes = unsafe { sys::ggml_nbytes(t) };
        let mut out = Vec::with_capacity(self.positions.len());
        for &pos in &self.positions {
            let col = if n_rows == self.n_tokens {
                pos
            } else if n_rows == self.outputs.len() {
                self.outputs
                    .binary_search(&pos)
                    .map_err(|_| format!("position {pos} is not among the decode's outputs"))?
            } else {
                return Err(format!(
                    "its input has {n_rows} rows for a decode of {} tokens with {} outputs",
                    self.n_tokens,
                    self.outputs.len()
                ));
            };
            let mut raw = vec![0u8; n_ff * esize];
            let base = col * t.nb[1];
            if t.nb[0] == esize {
                if base + raw.len() > nbytes {
                    return Err("a row lies outside its input tensor".into());
                }
                // SAFETY: the tensor is allocated, `raw` has room for the `raw.len()` bytes asked
                // for, and [base, base + len) lies inside the tensor's bytes (checked above),
                // which is all ggml_backend_tensor_get requires; it copies from any backend.
                unsafe { sys::ggml_backend_tensor_get(t, raw.as_mut_ptr().cast(), base, raw.len()) }
            } else {
                for (i, chunk) in raw.chunks_exact_mut(esize).enumerate() {
                    let at = base + i * t.nb[0];
                    if at + esize > nbytes {
                        return Err("an element lies outside its input tensor".into());
                    }
                    // SAFETY: as above, for one element of `esize` bytes at `at`.
                    unsafe { sys::ggml_backend_tensor_get(t, chunk.as_mut_ptr().cast(), at, esize) }
                }
            }
            let values: Vec<f32> = match esize {
                4 => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                _ => raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            };
            out.push(values);
        }
        self.rows[slot] = Some(out);
        Ok(())
    }
}

/// llama.cpp's `cb_eval`: wants exactly the requested down projections and copies their inputs.
/// Returns, when asked, whether the node is wanted; afterwards, whether to go on (always).
///
/// # Safety
/// `user_data` must be null or the [`Capture`] of the context being decoded, with no other
/// reference to it alive; `t` must be null or a node of the graph being computed.
unsafe extern "C" fn on_node(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    if t.is_null() || user_data.is_null() {
        return !ask;
    }
    // Never unwind into C: a panic declines the node (or goes on) and is reported as an error.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: by the contract above, user_data is the context's Capture and the Tracer that
        // owns it holds no reference to it during the decode that calls back here (it only
        // touches it between decodes), and llama.cpp calls back from the decoding thread only.
        let cap = unsafe { &mut *user_data.cast::<Capture>() };
        // SAFETY: t is a non-null node of the graph being computed.
        let node = unsafe { &*t };
        if !cap.armed {
            return !ask;
        }
        let Some(slot) = cap.slot_of(node) else {
            return !ask;
        };
        if ask {
            return true;
        }
        if let Err(e) = cap.read(slot, node.src[1]) {
            let name = String::from_utf8_lossy(&cap.weights[slot]).into_owned();
            cap.error.get_or_insert(format!("{name}: {e}"));
        }
        true
    }));
    run.unwrap_or_else(|_| {
        // SAFETY: as above; the closure that held the reference has unwound.
        let cap = unsafe { &mut *user_data.cast::<Capture>() };
        cap.error
            .get_or_insert("the trace callback panicked".to_string());
        !ask
    })
}

/// A batch from `llama_batch_init`, freed on drop.
struct Batch(sys::llama_batch);

impl Batch {
    /// The tokens of `entries` (callers check that there is at least one).
    fn new(entries: &[Entry]) -> Batch {
        let n = entries.len();
        let per_token = ids_per_token(entries);
        // SAFETY: plain allocation; n ≥ 1 (callers check), room for `per_token` ids per token.
        let raw = unsafe { sys::llama_batch_init(n as i32, 0, per_token as i32) };
        let mut batch = Batch(raw);
        let b = &mut batch.0;
        for (i, e) in entries.iter().enumerate() {
            // SAFETY: llama_batch_init(n, 0, per_token) allocated `token`, `pos`, `n_seq_id`,
            // `logits` with n entries and `seq_id` with n pointers to `per_token` ids each;
            // i < n and e carries at most `per_token` ids.
            unsafe {
                *b.token.add(i) = e.token as sys::llama_token;
                *b.pos.add(i) = e.pos as sys::llama_pos;
                *b.n_seq_id.add(i) = e.seqs.count as i32;
                for (k, id) in e.seqs.ids().enumerate() {
                    *(*b.seq_id.add(i)).add(k) = id;
                }
                *b.logits.add(i) = i8::from(e.logits);
            }
        }
        b.n_tokens = n as i32;
        batch
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the batch came from llama_batch_init and is freed once, here.
        unsafe { sys::llama_batch_free(self.0) }
    }
}

/// A GGUF model loaded by llama.cpp with a context whose decodes can be traced. Owns the raw
/// model, its context, the callback's user data and the applied adapter; frees them on drop.
pub struct Tracer {
    path: PathBuf,
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    /// From `Box::into_raw`; `cb_eval_user_data` of `ctx`. Freed in drop after `ctx`.
    capture: NonNull<Capture>,
    /// The applied adapter, if any.
    adapter: Option<NonNull<sys::llama_adapter_lora>>,
    /// Further contexts of the model, without the callback, for [`Tracer::score_edited`]
    /// (created on its first call), each with its `wipe` flag. Freed in drop before the model.
    lanes: Vec<(NonNull<sys::llama_context>, bool)>,
    /// The model's forward-only shape (architecture, layers and their FFNs).
    shape: Shape,
    n_vocab: usize,
    max_tokens: usize,
    /// Whether the KV cache may hold a non-finite value (a failed decode, non-finite logits or
    /// FF2 input): the next [`Decoder::clear`] then also zeroes its bytes. Otherwise it only
    /// frees the cells: a later decode reads stale cells only through the mask, as a score of
    /// −∞ and a weight of exactly 0, so its results do not depend on what they hold.
    wipe: bool,
}

/// Applies `adapter` to `ctx` at scale 1 (None: no adapter), replacing what was applied before;
/// llama.cpp's return code.
///
/// # Safety
/// `ctx` must be live and not decoding on another thread; `adapter` must be loaded on its model
/// and stay alive while `ctx` holds it.
unsafe fn set_adapter(
    ctx: NonNull<sys::llama_context>,
    adapter: Option<NonNull<sys::llama_adapter_lora>>,
) -> i32 {
    let mut list: Vec<*mut sys::llama_adapter_lora> = adapter.iter().map(|a| a.as_ptr()).collect();
    let mut scales = vec![1f32; list.len()];
    let (lp, sp) = match list.is_empty() {
        true => (std::ptr::null_mut(), std::ptr::null_mut()),
        false => (list.as_mut_ptr(), scales.as_mut_ptr()),
    };
    // SAFETY: by the contract above; `lp`/`sp` hold `list.len()` entries (or are both null with
    // a count of 0, which llama.cpp accepts).
    unsafe { sys::llama_set_adapters_lora(ctx.as_ptr(), lp, list.len(), sp) }
}

/// One `llama_decode` of `entries` (as [`check_batch`] takes them, checked by the callers) on
/// top of `ctx`'s cache; a failure sets `wipe`. `path` names the model in errors.
///
/// # Safety
/// `ctx` must be live and not decoding on another thread; no reference to its Capture, if it has
/// one, may be alive during the call (the callback takes it).
unsafe fn decode_on(
    ctx: NonNull<sys::llama_context>,
    wipe: &mut bool,
    path: &Path,
    entries: &[Entry],
) -> Result<()> {
    let batch = Batch::new(entries);
    // SAFETY: by the contract above; the batch is live and holds entries.len() ≤ n_batch tokens
    // with ids below n_vocab, sequence ids below n_seq_max and positions below the context
    // (checked by the callers).
    let rc = unsafe { sys::llama_decode(ctx.as_ptr(), batch.0) };
    *wipe |= rc != 0;
    match rc {
        0 => Ok(()),
        rc => Err(Error::Runtime(format!(
            "{}: decode failed ({rc})",
            path.display()
        ))),
    }
}

/// The logits after batch position `i` of `ctx`'s last decode (`n_vocab` of them), refused when
/// not finite (which sets `wipe`).
///
/// # Safety
/// `ctx` must be live and not decoding on another thread.
unsafe fn logits_on(
    ctx: NonNull<sys::llama_context>,
    wipe: &mut bool,
    path: &Path,
    n_vocab: usize,
    i: usize,
) -> Result<Vec<f32>> {
    // SAFETY: the context is live (above); llama.cpp returns null for a position without logits.
    let p = unsafe { sys::llama_get_logits_ith(ctx.as_ptr(), i as i32) };
    if p.is_null() {
        return Err(Error::Runtime(format!(
            "{}: no logits at position {i}",
            path.display()
        )));
    }
    // SAFETY: llama.cpp's logits row for one output holds n_vocab floats and stays valid until
    // the next decode; it is copied before any.
    let row = unsafe { std::slice::from_raw_parts(p, n_vocab) }.to_vec();
    if let Some(i) = row.iter().position(|v| !v.is_finite()) {
        *wipe = true;
        return Err(Error::Numeric(format!(
            "llama.cpp gives logit {i} = {}: the model's weights (or an applied edit) hold NaN or Inf",
            row[i]
        ))
        .in_file(path));
    }
    Ok(row)
}

/// Empties `ctx`'s KV cache, zeroing its bytes too where `wipe` was set (then cleared).
///
/// # Safety
/// `ctx` must be live and not decoding on another thread.
unsafe fn clear_on(ctx: NonNull<sys::llama_context>, wipe: &mut bool) {
    let data = std::mem::take(wipe);
    // SAFETY: the context is live (above) and its memory belongs to it.
    unsafe { sys::llama_memory_clear(sys::llama_get_memory(ctx.as_ptr()), data) };
}

/// A new context of `model` (512 tokens of up to 64 sequences in a unified F32 KV cache, flash
/// attention off, `threads` threads), with the trace callback on `capture` where given.
fn new_context(
    model: NonNull<sys::llama_model>,
    capture: Option<NonNull<Capture>>,
    threads: i32,
) -> Option<NonNull<sys::llama_context>> {
    // SAFETY: returns a plain struct of defaults.
    let mut cparams = unsafe { sys::llama_context_default_params() };
    cparams.n_ctx = SESSION_CTX;
    cparams.n_batch = SESSION_CTX;
    cparams.n_ubatch = SESSION_CTX;
    cparams.n_seq_max = SESSION_SEQS;
    cparams.kv_unified = true;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.type_k = sys::GGML_TYPE_F32;
    cparams.type_v = sys::GGML_TYPE_F32;
    cparams.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if let Some(capture) = capture {
        cparams.cb_eval = Some(on_node);
        cparams.cb_eval_user_data = capture.as_ptr().cast();
    }
    // SAFETY: `model` is live and outlives the context (both owned by a Tracer, its contexts
    // freed first); the user data, if any, is the Tracer's heap Capture, freed after them.
    NonNull::new(unsafe { sys::llama_init_from_model(model.as_ptr(), cparams) })
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("path", &self.path)
            .field("arch", &self.shape.arch)
            .field("n_layer", &self.shape.n_layer)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Loads `path` on the CPU with a tracing context (512 tokens of up to 64 sequences in a
    /// unified F32 KV cache, flash attention off, [`decode_threads`] threads, like
    /// [`crate::runtime::LlamaRuntime`]'s sessions). Fails, naming the file, when no layer has a dense down projection.
    pub fn load(path: &Path) -> Result<Tracer> {
        Self::load_opened(&GgufFile::open(path)?)
    }

    /// [`Self::load`] of a file backlens has opened already (its shape is read from `g`, the
    /// header is not parsed again).
    pub fn load_opened(g: &GgufFile) -> Result<Tracer> {
        let path = g.path();
        let shape = Shape::from_gguf(g)?;
        if let Some(problem) = shape.no_editable_layer() {
            return Err(problem.in_file(path));
        }
        backend()?;
        let cpath = path
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| Error::Invalid(format!("{}: not a valid UTF-8 path", path.display())))?;
        // SAFETY: returns a plain struct of defaults.
        let mut mparams = unsafe { sys::llama_model_default_params() };
        mparams.n_gpu_layers = 0;
        // No repacked copies of the weights (llama.cpp's CPU "extra buffer types" interleave
        // Q4_0 and others into new allocations): the tracer reads the weights from the map, so
        // a 7B Q4_0 edit holds one copy of the model, not two.
        mparams.use_extra_bufts = false;
        // SAFETY: the backend is initialized (above), `cpath` is a NUL-terminated path that
        // outlives the call, and the params are llama.cpp's defaults with the GPU layers and repacking off.
        let model = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), mparams) };
        let model = NonNull::new(model).ok_or_else(|| {
            Error::Runtime(format!(
                "{}: llama.cpp could not load this model (its architecture or hyperparameters are not ones the pinned llama.cpp accepts)",
                path.display()
            ))
        })?;
        // SAFETY: `model` is a live model; the vocabulary belongs to it.
        let (n_vocab, n_ctx_train, n_layer_cpp) = unsafe {
            (
                sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(model.as_ptr())),
                sys::llama_model_n_ctx_train(model.as_ptr()),
                sys::llama_model_n_layer(model.as_ptr()),
            )
        };
        // SAFETY: Box::into_raw never returns null.
        let capture = unsafe { NonNull::new_unchecked(Box::into_raw(Box::<Capture>::default())) };
        let Some(ctx) = new_context(model, Some(capture), decode_threads()) else {
            // SAFETY: no context uses them; each is freed once, here.
            unsafe {
                sys::llama_model_free(model.as_ptr());
                drop(Box::from_raw(capture.as_ptr()));
            }
            return Err(Error::Runtime(format!(
                "{}: llama.cpp could not create a context",
                path.display()
            )));
        };
        let tracer = Tracer {
            path: path.to_path_buf(),
            model,
            ctx,
            capture,
            adapter: None,
            lanes: Vec::new(),
            shape,
            n_vocab: n_vocab.max(0) as usize,
            max_tokens: match n_ctx_train {
                n if n > 0 => (n as usize).min(SESSION_CTX as usize),
                _ => SESSION_CTX as usize,
            },
            wipe: false,
        };
        if n_layer_cpp.max(0) as usize != tracer.shape.n_layer
            || n_vocab.max(0) as usize != tracer.shape.n_vocab
        {
            return Err(Error::Runtime(format!(
                "{}: llama.cpp sees {n_layer_cpp} layers and {n_vocab} tokens, the file {} and {}",
                path.display(),
                tracer.shape.n_layer,
                tracer.shape.n_vocab
            )));
        }
        Ok(tracer)
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's forward-only shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Number of layers.
    pub fn n_layer(&self) -> usize {
        self.shape.n_layer
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Applies `deltas` (edits of this model's FF2) to every later decode as a LoRA adapter at
    /// scale 1, replacing the one applied before; no deltas removes it. llama.cpp reads the
    /// model's weights from the file, so this is how earlier edits of a sequence reach the trace.
    pub fn apply_deltas(&mut self, deltas: &[Delta]) -> Result<()> {
        let new = match deltas.is_empty() {
            true => None,
            false => Some(self.load_deltas(deltas)?),
        };
        self.install(new)
    }

    /// `deltas` (not empty) as a LoRA adapter loaded on the model, applied to no context.
    fn load_deltas(&mut self, deltas: &[Delta]) -> Result<NonNull<sys::llama_adapter_lora>> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "backlens-trace-adapter-{}-{n}.gguf",
            std::process::id()
        ));
        let claim = OutputClaim::new(&path, OutputKind::File, &[], false)?;
        // Staged only: llama.cpp reads it into memory, and dropping it removes the file.
        let staged =
            lora::adapter_plan(&self.shape.arch, deltas, &[]).write_to(claim.stage_file()?)?;
        self.load_adapter(staged.path())
    }

    /// Applies the LoRA adapter GGUF at `path` to every later decode at scale 1, replacing the
    /// one applied before, once [`lora::validate`] has checked it against `base` (this model's
    /// file): llama.cpp aborts on some malformed adapters instead of failing.
    pub fn apply_adapter_file(&mut self, base: &GgufFile, path: &Path) -> Result<()> {
        lora::validate(base, &GgufFile::open(path)?)?;
        self.set_adapter(Some(path))
    }

    /// Applies the LoRA adapter GGUF at `path` at scale 1 (None: no adapter). Private: only
    /// adapters backlens wrote itself or validated are handed to llama.cpp.
    fn set_adapter(&mut self, path: Option<&Path>) -> Result<()> {
        let new = path.map(|p| self.load_adapter(p)).transpose()?;
        self.install(new)
    }

    /// Loads the adapter GGUF at `p` on the model (applied to no context). `&mut self`: llama.cpp
    /// registers it in the model, which no decode may read meanwhile.
    fn load_adapter(&mut self, p: &Path) -> Result<NonNull<sys::llama_adapter_lora>> {
        let cpath = p
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| Error::Invalid(format!("{}: not a valid UTF-8 path", p.display())))?;
        // SAFETY: the model is live; `cpath` is NUL-terminated and outlives the call.
        let a = unsafe { sys::llama_adapter_lora_init(self.model.as_ptr(), cpath.as_ptr()) };
        NonNull::new(a).ok_or_else(|| {
            Error::Runtime(format!(
                "{}: llama.cpp could not load this adapter for {}",
                p.display(),
                self.path.display()
            ))
        })
    }

    /// Applies `new` (loaded by this Tracer) to the tracer's context, replacing and freeing the
    /// adapter applied before.
    fn install(&mut self, new: Option<NonNull<sys::llama_adapter_lora>>) -> Result<()> {
        // SAFETY: the context is live and `&mut self` keeps every decode off it; the new adapter
        // was loaded on its model. The context no longer uses the old adapter after this call.
        let rc = unsafe { set_adapter(self.ctx, new) };
        let old = std::mem::replace(&mut self.adapter, new);
        if let Some(old) = old {
            // SAFETY: loaded by this Tracer, no longer applied to the context, freed once here.
            unsafe { sys::llama_adapter_lora_free(old.as_ptr()) }
        }
        match rc {
            0 => Ok(()),
            rc => Err(Error::Runtime(format!(
                "{}: applying an adapter failed ({rc})",
                self.path.display()
            ))),
        }
    }

    /// One decode of `tokens`: FF2's input at `layers` at the last position, and the logits.
    pub fn last_position(&mut self, tokens: &[u32], layers: &[usize]) -> Result<Traced> {
        Ok(self.last_positions(&[tokens], layers)?.remove(0))
    }

    /// FF2's input at `layers` at the last position of each prompt, and its logits there: the
    /// prompts are packed as sequences of their own into as few decodes as the context takes
    /// (each attends only to itself, so this equals tracing each alone up to the kernels'
    /// rounding).
    pub fn last_positions(&mut self, prompts: &[&[u32]], layers: &[usize]) -> Result<Vec<Traced>> {
        for p in prompts {
            self.check_request(p, layers, &[p.len().saturating_sub(1)])?;
        }
        let mut out = Vec::with_capacity(prompts.len());
        let mut start = 0;
        while start < prompts.len() {
            let mut end = start + 1;
            let mut tokens = prompts[start].len();
            while end < prompts.len()
                && end - start < SESSION_SEQS as usize
                && tokens + prompts[end].len() <= SESSION_CTX as usize
            {
                tokens += prompts[end].len();
                end += 1;
            }
            let mut entries = Vec::with_capacity(tokens);
            let mut lasts = Vec::with_capacity(end - start);
            for (seq, p) in (0..).zip(&prompts[start..end]) {
                entries.extend(p.iter().enumerate().map(|(pos, &token)| Entry {
                    token,
                    pos,
                    logits: pos + 1 == p.len(),
                    seqs: Seqs::one(seq),
                }));
                lasts.push(entries.len() - 1);
            }
            let mut rows = self.capture(&entries, layers, &lasts)?;
            for (k, &last) in lasts.iter().enumerate() {
                out.push(Traced {
                    logits: self.logits(last)?,
                    ff2_in: rows.iter_mut().map(|r| std::mem::take(&mut r[k])).collect(),
                });
            }
            start = end;
        }
        Ok(out)
    }

    /// One decode of `tokens` (from an empty KV cache): FF2's input at each of `layers` at each
    /// of `positions` (indices into `tokens`), and the logits after the last token.
    pub fn trace(
        &mut self,
        tokens: &[u32],
        layers: &[usize],
        positions: &[usize],
    ) -> Result<TracedRows> {
        self.check_request(tokens, layers, positions)?;
        let mut wanted: Vec<usize> = positions.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let last = tokens.len() - 1;
        let entries: Vec<Entry> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| Entry {
                token,
                pos: i,
                logits: i == last || wanted.binary_search(&i).is_ok(),
                seqs: Seqs::FIRST,
            })
            .collect();
        let rows = self.capture(&entries, layers, &wanted)?;
        // Back to the caller's order of positions (which may repeat or be unsorted).
        let ff2_in = rows
            .into_iter()
            .map(|got| {
                positions
                    .iter()
                    .map(|p| got[wanted.binary_search(p).expect("position captured")].clone())
                    .collect()
            })
            .collect();
        Ok(TracedRows {
            logits: self.logits(last)?,
            ff2_in,
        })
    }

    /// One decode of `entries` from an empty KV cache (checked by the callers, the entries at
    /// `wanted` among those with logits): FF2's input of each of `layers` at each batch index
    /// of `wanted` (ascending), `rows[l][w]`.
    fn capture(
        &mut self,
        entries: &[Entry],
        layers: &[usize],
        wanted: &[usize],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        {
            let cap = self.capture_mut();
            *cap = Capture {
                armed: true,
                weights: layers
                    .iter()
                    .map(|l| crate::arch::ff2_weight(*l).into_bytes())
                    .collect(),
                positions: wanted.to_vec(),
                outputs: (0..entries.len()).filter(|&i| entries[i].logits).collect(),
                n_tokens: entries.len(),
                rows: vec![None; layers.len()],
                error: None,
            };
        }
        self.clear();
        let rc = self.decode_raw(entries);
        let cap = std::mem::take(self.capture_mut());
        rc?;
        if let Some(e) = cap.error {
            return Err(Error::Runtime(format!(
                "{}: tracing FF2's input: {e}",
                self.path.display()
            )));
        }
        let mut out = Vec::with_capacity(layers.len());
        for (&layer, got) in layers.iter().zip(cap.rows) {
            let Some(got) = got else {
                return Err(Error::Invalid(format!(
                    "layer {layer}: llama.cpp's graph has no matrix product with {} (its FFN is not one dense down projection)",
                    crate::arch::ff2_weight(layer)
                ))
                .in_file(&self.path));
            };
            if let Some(bad) = got.iter().flatten().find(|v| !v.is_finite()) {
                self.wipe = true;
                return Err(Error::Numeric(format!(
                    "layer {layer}: FF2's input holds {bad} (the model's weights or an applied edit hold NaN or Inf)"
                ))
                .in_file(&self.path));
            }
            let n_ff = self.shape.ff2_width(layer)?;
            if let Some(r) = got.iter().find(|r| r.len() != n_ff) {
                return Err(Error::Invalid(format!(
                    "layer {layer}: llama.cpp's FF2 input has {} values, {} has {n_ff} inputs",
                    r.len(),
                    crate::arch::ff2_weight(layer)
                ))
                .in_file(&self.path));
            }
            out.push(got);
        }
        Ok(out)
    }

    /// Fails for anything the decode or the trace could not take.
    fn check_request(&self, tokens: &[u32], layers: &[usize], positions: &[usize]) -> Result<()> {
        let bad = |e: Error| Err(e.in_file(&self.path));
        if tokens.is_empty() {
            return bad(Error::BadRequest("the prompt tokenizes to nothing".into()));
        }
        if tokens.len() > self.max_tokens {
            return bad(Error::BadRequest(format!(
                "{} tokens: the tracer takes 1 to {}",
                tokens.len(),
                self.max_tokens
            )));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.n_vocab) {
            return bad(Error::BadRequest(format!(
                "token id {t} is past the model's vocabulary of {}",
                self.n_vocab
            )));
        }
        if let Some(p) = positions.iter().find(|&&p| p >= tokens.len()) {
            return bad(Error::BadRequest(format!(
                "position {p} is past the {} tokens of the prompt",
                tokens.len()
            )));
        }
        for (i, &layer) in layers.iter().enumerate() {
            if let Err(e) = self.shape.ff2_width(layer) {
                return bad(e);
            }
            if layers[..i].contains(&layer) {
                return bad(Error::Invalid(format!("layer {layer} is asked for twice")));
            }
        }
        Ok(())
    }

    /// Logits after batch position `i` of the last decode.
    fn logits(&mut self, i: usize) -> Result<Vec<f32>> {
        // SAFETY: the context is live, and `&mut self` keeps other threads off it.
        unsafe { logits_on(self.ctx, &mut self.wipe, &self.path, self.n_vocab, i) }
    }

    /// One `llama_decode` of `entries` (as [`check_batch`] takes them, checked by the callers)
    /// on top of the cache; the callback captures whatever the Capture is armed for.
    fn decode_raw(&mut self, entries: &[Entry]) -> Result<()> {
        // SAFETY: the context is live, `&mut self` keeps other threads off it, and no reference
        // to the Capture is alive during the call, so the callback's exclusive access is sound.
        unsafe { decode_on(self.ctx, &mut self.wipe, &self.path, entries) }
    }

    fn capture_mut(&mut self) -> &mut Capture {
        // SAFETY: the pointer comes from Box::into_raw and lives until drop. llama.cpp touches
        // it only inside llama_decode, which runs only inside `&mut self` methods while no
        // reference from here is alive; `&mut self` makes this reference the only one.
        unsafe { self.capture.as_mut() }
    }
}

/// The tracer's context scores and generates like a [`crate::runtime::Session`] (the callback
/// declines every node outside [`Tracer::trace`]), so one loaded model serves both.
impl Decoder for Tracer {
    fn clear(&mut self) {
        // SAFETY: the context is live, and `&mut self` keeps other threads off it.
        unsafe { clear_on(self.ctx, &mut self.wipe) }
    }

    fn decode(&mut self, batch: &[Entry]) -> Result<()> {
        check_batch(&self.path, batch, self.max_tokens)?;
        if let Some(e) = batch.iter().find(|e| e.token as usize >= self.n_vocab) {
            return Err(Error::BadRequest(format!(
                "token id {} is past the model's vocabulary of {}",
                e.token, self.n_vocab
            ))
            .in_file(&self.path));
        }
        self.capture_mut().armed = false;
        self.decode_raw(batch)
    }

    fn row(&mut self, i: usize) -> Result<Vec<f32>> {
        self.logits(i)
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn eos(&self) -> Option<u32> {
        // SAFETY: the model is live; the vocabulary belongs to it.
        let eos = unsafe { sys::llama_vocab_eos(sys::llama_model_get_vocab(self.model.as_ptr())) };
        u32::try_from(eos).ok()
    }
}

/// Most contexts [`Tracer::score_edited`] scores on at once (each holds its own KV cache and
/// compute buffers: 24 MB of cache for SmolLM2, 512 MB for a 7B model).
const MAX_LANES: usize = 4;

/// One context of a tracer's model, scoring on a thread of its own in
/// [`Tracer::score_edited`]; decodes like the tracer (its callback, if any, disarmed).
pub struct Lane<'t> {
    ctx: NonNull<sys::llama_context>,
    wipe: &'t mut bool,
    path: &'t Path,
    n_vocab: usize,
    max_tokens: usize,
    eos: Option<u32>,
}

// SAFETY: a Lane is the only handle to its context while it lives (it borrows the Tracer's
// context or one of its lanes, mutably, for 't), so the context is used by one thread at a time.
// llama.cpp's contexts of one model may decode concurrently: a decode reads the model's weights
// and its adapter registry, which `score_edited` changes only before its lanes exist and after
// they are gone; the disarmed callback of the tracer's own context touches only that context's
// Capture, which nothing else touches while the lane lives.
unsafe impl Send for Lane<'_> {}

impl Decoder for Lane<'_> {
    fn clear(&mut self) {
        // SAFETY: the lane's context is live and only this lane uses it.
        unsafe { clear_on(self.ctx, self.wipe) }
    }

    fn decode(&mut self, batch: &[Entry]) -> Result<()> {
        check_batch(self.path, batch, self.max_tokens)?;
        if let Some(e) = batch.iter().find(|e| e.token as usize >= self.n_vocab) {
            return Err(Error::BadRequest(format!(
                "token id {} is past the model's vocabulary of {}",
                e.token, self.n_vocab
            ))
            .in_file(self.path));
        }
        // SAFETY: as above; the batch is checked, and no reference to a Capture is alive here.
        unsafe { decode_on(self.ctx, self.wipe, self.path, batch) }
    }

    fn row(&mut self, i: usize) -> Result<Vec<f32>> {
        // SAFETY: as above.
        unsafe { logits_on(self.ctx, self.wipe, self.path, self.n_vocab, i) }
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn eos(&self) -> Option<u32> {
        self.eos
    }
}

/// Adapters loaded for one [`Tracer::score_edited`] call (None: a record without deltas) and the
/// contexts that may hold them; on drop, removed from those contexts, then freed.
struct Loaded {
    adapters: Vec<Option<NonNull<sys::llama_adapter_lora>>>,
    contexts: Vec<NonNull<sys::llama_context>>,
}

// SAFETY: the lanes only read the pointers, handing them to llama.cpp, which reads the adapters'
// tensors during decodes; nothing modifies or frees them until `Loaded` is dropped, after the
// lanes are gone.
unsafe impl Sync for Loaded {}

impl Loaded {
    /// Record `i`'s adapter (whole-struct access, so that closures capture `Loaded`, which is
    /// Sync, and not its field).
    fn get(&self, i: usize) -> Option<NonNull<sys::llama_adapter_lora>> {
        self.adapters[i]
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        for &ctx in &self.contexts {
            // SAFETY: the contexts are live (the Tracer outlives this) and no lane decodes on
            // them any longer; removing every adapter is always valid.
            unsafe { set_adapter(ctx, None) };
        }
        for a in self.adapters.drain(..).flatten() {
            // SAFETY: loaded by the Tracer for this call, applied to no context any longer (just
            // above), freed once here while no decode runs.
            unsafe { sys::llama_adapter_lora_free(a.as_ptr()) }
        }
    }
}

impl Tracer {
    /// `work(i, lane)` for each `i` of `edits`, on a lane with `edits[i]` applied as an adapter
    /// (none for no deltas), in order of `i`, with `threads` threads in all (callers pass
    /// [`decode_threads`]): one context per thread, at most [`MAX_LANES`] (the threads shared
    /// out among them) and no more than records, the tracer's own
    /// context first and further ones of the same model kept for later calls; each lane takes
    /// the next record when it is done with one. One llama.cpp decode on two threads scales about
    /// 1.7× (its workers wait at each node's barrier); two one-thread decodes at once about 2×.
    /// Every `work` that starts from an empty cache decodes as on one context (same cells, same
    /// kernels: ggml splits a matmul by outputs, never within a dot product), so the results do
    /// not depend on the lanes or their timing. The adapters are loaded before the lanes start and
    /// freed after they end: loading registers an adapter in the model, which decodes read. The
    /// first failure (in order of `i`) is the error.
    pub fn score_edited<R: Send>(
        &mut self,
        threads: usize,
        edits: &[Vec<Delta>],
        work: impl Fn(usize, &mut Lane<'_>) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        let threads = threads.max(1);
        let n = threads.min(MAX_LANES).min(edits.len()).max(1);
        self.install(None)?;
        while self.lanes.len() + 1 < n {
            let ctx = new_context(self.model, None, 1).ok_or_else(|| {
                Error::Runtime(format!(
                    "{}: llama.cpp could not create a context",
                    self.path.display()
                ))
            })?;
            self.lanes.push((ctx, false));
        }
        let mut loaded = Loaded {
            adapters: Vec::with_capacity(edits.len()),
            contexts: std::iter::once(self.ctx)
                .chain(self.lanes[..n - 1].iter().map(|l| l.0))
                .collect(),
        };
        for deltas in edits {
            let a = match deltas.is_empty() {
                true => None,
                false => Some(self.load_deltas(deltas)?),
            };
            loaded.adapters.push(a);
        }
        for (k, &ctx) in loaded.contexts.iter().enumerate() {
            let t = (threads / n + usize::from(k < threads % n)) as i32;
            // SAFETY: the context is live and no decode runs (`&mut self`).
            unsafe { sys::llama_set_n_threads(ctx.as_ptr(), t, t) };
        }
        self.capture_mut().armed = false;
        let eos = Decoder::eos(self);
        let (path, n_vocab, max_tokens) = (self.path.as_path(), self.n_vocab, self.max_tokens);
        let mut lanes: Vec<Lane> = std::iter::once((self.ctx, &mut self.wipe))
            .chain(self.lanes[..n - 1].iter_mut().map(|(c, w)| (*c, w)))
            .map(|(ctx, wipe)| Lane {
                ctx,
                wipe,
                path,
                n_vocab,
                max_tokens,
                eos,
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let run = |lane: &mut Lane| {
            use std::sync::atomic::Ordering::Relaxed;
            let mut out = Vec::new();
            while !failed.load(Relaxed) {
                let i = next.fetch_add(1, Relaxed);
                if i >= edits.len() {
                    break;
                }
                // SAFETY: only this lane uses its context; the adapter was loaded on its model
                // and lives until `loaded` is dropped, which first removes it from the context.
                let r = match unsafe { set_adapter(lane.ctx, loaded.get(i)) } {
                    0 => work(i, lane),
                    rc => Err(Error::Runtime(format!(
                        "{}: applying an adapter failed ({rc})",
                        lane.path.display()
                    ))),
                };
                failed.fetch_or(r.is_err(), Relaxed);
                out.push((i, r));
            }
            out
        };
        let (first, rest) = lanes.split_first_mut().expect("at least one lane");
        let mut results = std::thread::scope(|s| {
            let others: Vec<_> = rest.iter_mut().map(|lane| s.spawn(|| run(lane))).collect();
            let mut all = run(first);
            for h in others {
                all.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            all
        });
        drop(lanes);
        // SAFETY: the lanes are gone; the context is live and idle.
        unsafe { sys::llama_set_n_threads(self.ctx.as_ptr(), threads as i32, threads as i32) };
        drop(loaded);
        results.sort_by_key(|r| r.0);
        // A failure stops the lanes after their current records, all of which come before any
        // record not begun, so the first error in order of `i` is the one a single lane meets.
        results.into_iter().map(|r| r.1).collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // SAFETY: each pointer was created by this Tracer and is freed once, in this order: the
        // contexts (the only users of the adapter and of the Capture), the adapter, the model (which
        // the adapter and context borrowed), then the Capture from its Box.
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            for (ctx, _) in self.lanes.drain(..) {
                sys::llama_free(ctx.as_ptr());
            }
            if let Some(a) = self.adapter.take() {
                sys::llama_adapter_lora_free(a.as_ptr());
            }
            sys::llama_model_free(self.model.as_ptr());
            drop(Box::from_raw(self.capture.as_ptr()));
        }
    }
}
