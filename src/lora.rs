//! The LoRA adapter contract, written and read in this one place: the low-rank adapter GGUF that
//! stock llama.cpp loads with `--lora` (and hot-swaps in llama-server), and the checks every
//! adapter passes before backlens hands it to llama.cpp or explains it.
//!
//! # Writing
//!
//! For ΔW = Σᵢ uᵢ vᵢᵀ of rank r on W [out, in]: `lora_a` has ggml dims [in, r] (rows vᵢ),
//! `lora_b` has dims [r, out] (column i is uᵢ), and `adapter.lora.alpha` = r so that llama.cpp's
//! scale alpha / rank is exactly 1 and the adapter adds exactly ΔW·x. `token_embd.weight` is the
//! exception llama.cpp makes: its factors are flipped (see [`validate`]).
//!
//! # Reading
//!
//! [`validate`] accepts exactly what llama.cpp's `llama_adapter_lora_init_impl`
//! (`src/llama-adapter.cpp`) accepts without an error or an abort, and refuses, with the file and
//! the key or tensor named, a few things it would load but crash on later:
//!
//! 1. Metadata, in llama.cpp's order. `general.type` must be the string "adapter",
//!    `general.architecture` a string equal to the base's, `adapter.type` the string "lora".
//!    llama.cpp reads these with `gguf_get_val_str`, which aborts (GGML_ASSERT) on a value of
//!    another type; a missing key reads as "". `adapter.lora.alpha`, when present, must be an
//!    F32 (`gguf_get_val_f32` aborts on anything else; absent means 0) and, here, finite.
//!    `adapter.alora.invocation_tokens`, when present, must be an array of u32.
//! 2. Pairing. Every tensor name ends in `.lora_a` or `.lora_b`, and both halves of each pair
//!    are present; names ending in `_norm.weight` are skipped, as llama.cpp does; any other
//!    name is an error. A base name that itself contains `.lora_a` or `.lora_b` is refused
//!    (llama.cpp strips every occurrence, not only the suffix).
//! 3. Each pair against the base. The base tensor exists; in ggml ne order
//!    `W.ne[0] == a.ne[0]`, `W.ne[1] == b.ne[1]` and `a.ne[1] == b.ne[0]` (for
//!    `token_embd.weight`, whose factors llama.cpp flips: `W.ne[0] == b.ne[1]`,
//!    `W.ne[1] == a.ne[1]`, `a.ne[0] == b.ne[0]`); the rank `b.ne[0]` is at least 1. Stricter
//!    than llama.cpp, which checks only these dimensions and would then abort (GGML_ASSERT in
//!    `ggml_mul_mat`) building its first graph: all three tensors are 2-D; the factors are
//!    stored as f32, f16, bf16 or q8_0 (the types `convert_lora_to_gguf.py --outtype` writes);
//!    and `token_embd.weight` is not adapted in a base without `output.weight`, whose output
//!    projection is `token_embd.weight` itself: llama.cpp finds the pair by name there too and
//!    multiplies with it unflipped.
//!
//! llama.cpp applies a pair as y = W·x + scale·B·(A·x) with scale = alpha / rank, or 1 when
//! alpha is absent or 0 ([`Pair::scale`]).

use crate::delta::Delta;
use crate::weights::gguf::{GgufFile, TensorInfo, Value, ValueType};
use crate::weights::quant::{self, GgmlType};
use crate::write::gguf::{GgufPlan, OutTensor};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const GENERAL_TYPE: &str = "general.type";
const ARCHITECTURE: &str = "general.architecture";
const ADAPTER_TYPE: &str = "adapter.type";
const ALPHA: &str = "adapter.lora.alpha";
const ALORA_TOKENS: &str = "adapter.alora.invocation_tokens";
/// Prefix of llama.cpp's adapter keys.
const ADAPTER_PREFIX: &str = "adapter.";
const SUFFIX_A: &str = ".lora_a";
const SUFFIX_B: &str = ".lora_b";
/// Tensors llama.cpp skips in an adapter ("TODO: add support for norm vector").
const NORM_SUFFIX: &str = "_norm.weight";
/// The token embedding: llama.cpp flips the factors of any tensor whose name ends with it
/// (`llm_build_inp_embd`), and a tied model's output projection carries this name too.
const EMBEDDING: &str = "token_embd.weight";
/// The output projection, absent when it is tied to the token embedding.
const OUTPUT: &str = "output.weight";

/// Storage types accepted for `lora_a` and `lora_b`: `convert_lora_to_gguf.py --outtype`.
pub const FACTOR_TYPES: [GgmlType; 4] =
    [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0];

/// Builds the adapter file contents for `deltas` (several deltas on one tensor are stacked).
pub fn adapter_plan(
    arch: &str,
    deltas: &[Delta],
    provenance: &[(String, Value)],
) -> GgufPlan<'static> {
    let mut plan = GgufPlan::default();
    plan.set(ARCHITECTURE, Value::String(arch.into()));
    plan.set(GENERAL_TYPE, Value::String("adapter".into()));
    plan.set(ADAPTER_TYPE, Value::String("lora".into()));
    // Per edited tensor: its name, output-side vectors and input-side vectors.
    type Factors<'d> = (String, Vec<&'d [f32]>, Vec<&'d [f32]>);
    let mut tensors: Vec<Factors> = Vec::new();
    for d in deltas {
        let entry = match tensors.iter_mut().find(|(n, _, _)| *n == d.tensor) {
            Some(e) => e,
            None => {
                tensors.push((d.tensor.clone(), Vec::new(), Vec::new()));
                tensors.last_mut().expect("just pushed")
            }
        };
        for (u, v) in d.out_vecs.iter().zip(&d.in_vecs) {
            entry.1.push(u);
            entry.2.push(v);
        }
    }
    // llama.cpp has one alpha per adapter and scales each pair by alpha / its rank: every pair is
    // padded with zero rows to the largest rank so that the scale is exactly 1 everywhere.
    let rank = tensors.iter().map(|t| t.1.len()).max().unwrap_or(1);
    plan.set(ALPHA, Value::F32(rank as f32));
    for (k, v) in provenance {
        plan.set(k, v.clone());
    }
    for (name, us, vs) in tensors {
        let (n_out, n_in) = (us[0].len(), vs[0].len());
        let (a, b) = match is_embedding(&name) {
            // Flipped: lora_a (n_vocab, r) and lora_b (n_embd, r), with uᵢ and vᵢ as columns.
            true => (
                OutTensor::f32(&a_name(&name), &[n_out, rank], &columns(&us, rank, n_out)),
                OutTensor::f32(&b_name(&name), &[n_in, rank], &columns(&vs, rank, n_in)),
            ),
            false => (
                OutTensor::f32(&a_name(&name), &[rank, n_in], &rows(&vs, rank, n_in)),
                OutTensor::f32(&b_name(&name), &[n_out, rank], &columns(&us, rank, n_out)),
            ),
        };
        plan.tensors.push(a);
        plan.tensors.push(b);
    }
    plan
}

/// Writes the adapter atomically.
pub fn write_adapter(
    path: &Path,
    arch: &str,
    deltas: &[Delta],
    provenance: &[(String, Value)],
) -> Result<()> {
    adapter_plan(arch, deltas, provenance).write(path)
}

fn a_name(base: &str) -> String {
    format!("{base}{SUFFIX_A}")
}

fn b_name(base: &str) -> String {
    format!("{base}{SUFFIX_B}")
}

/// Row-major (rank, len): row i is `vecs[i]`, zero rows past the end.
fn rows(vecs: &[&[f32]], rank: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; rank * len];
    for (row, v) in out.chunks_exact_mut(len).zip(vecs) {
        row.copy_from_slice(v);
    }
    out
}

/// Row-major (len, rank): column i is `vecs[i]`, zero columns past the end.
fn columns(vecs: &[&[f32]], rank: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len * rank];
    for (i, v) in vecs.iter().enumerate() {
        for (o, &x) in v.iter().enumerate() {
            out[o * rank + i] = x;
        }
    }
    out
}

fn is_embedding(name: &str) -> bool {
    name.ends_with(EMBEDDING)
}

/// Whether `general.type` is the string "adapter".
pub fn is_adapter(file: &GgufFile) -> bool {
    file.get(GENERAL_TYPE).and_then(Value::as_str) == Some("adapter")
}

/// Whether a file presents itself as an adapter in any way: `general.type` "adapter" or not a
/// string at all, an `adapter.*` key, or a tensor named like a LoRA factor. Such a file is a
/// valid adapter or an error, never a model.
pub fn looks_like_adapter(file: &GgufFile) -> bool {
    let odd_type = matches!(file.get(GENERAL_TYPE), Some(v) if v.as_str().is_none());
    is_adapter(file)
        || odd_type
        || file
            .metadata
            .iter()
            .any(|(k, _)| k.starts_with(ADAPTER_PREFIX))
        || file.tensors.iter().any(|t| factor_of(&t.name).is_some())
}

/// The base name and the half (`true` for `lora_a`) of a factor tensor name.
fn factor_of(name: &str) -> Option<(&str, bool)> {
    name.strip_suffix(SUFFIX_A)
        .map(|s| (s, true))
        .or_else(|| name.strip_suffix(SUFFIX_B).map(|s| (s, false)))
}

/// A validated adapter ([`validate`]).
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The adapter file.
    pub path: PathBuf,
    /// `general.architecture`, equal to the base's.
    pub architecture: String,
    /// `adapter.lora.alpha`, when present.
    pub alpha: Option<f32>,
    /// The adapted weights, in the base's tensor order.
    pub pairs: Vec<Pair>,
    /// `*_norm.weight` tensors that llama.cpp skips, in file order.
    pub ignored: Vec<String>,
}

/// One adapted weight: the base tensor and the two factors that fit it.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The base tensor (its name is the factors' name without the suffix).
    pub base: TensorInfo,
    /// `{name}.lora_a`.
    pub a: TensorInfo,
    /// `{name}.lora_b`.
    pub b: TensorInfo,
    /// r = `b.ne[0]`, as llama.cpp counts it.
    pub rank: usize,
    /// The factor scale llama.cpp applies at adapter scale 1: alpha / r, or 1 when alpha is
    /// absent or 0.
    pub scale: f64,
    /// `token_embd.weight`, whose factors llama.cpp flips.
    pub flipped: bool,
}

/// ΔW = scale · B·A of one pair in analysed row-major form: W is (m, n) = (`ne[1]`, `ne[0]`),
/// B is (m, r) and A is (r, n).
#[derive(Debug, Clone)]
pub struct Factors {
    /// Rows of ΔW.
    pub m: usize,
    /// Columns of ΔW.
    pub n: usize,
    /// Inner dimension.
    pub r: usize,
    /// B, row-major (m, r).
    pub b: Vec<f64>,
    /// A, row-major (r, n).
    pub a: Vec<f64>,
    /// The scale of B·A.
    pub scale: f64,
}

impl Pair {
    /// The base tensor's name.
    pub fn name(&self) -> &str {
        &self.base.name
    }

    /// Reads the factors from `file`, the adapter this pair was validated from. Fails on a file
    /// whose tensors differ from the validated ones, and on non-finite values.
    pub fn factors(&self, file: &GgufFile) -> Result<Factors> {
        let read = |want: &TensorInfo| -> Result<Vec<f64>> {
            let t = file
                .tensor(&want.name)
                .filter(|t| t.dims == want.dims && t.ggml_type == want.ggml_type)
                .ok_or_else(|| {
                    adapter_error(
                        file,
                        format!("tensor '{}' is not the one validated", want.name),
                    )
                })?;
            let v = quant::dequantize(t.ggml_type, file.tensor_bytes(t), &t.name)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(adapter_error(
                    file,
                    format!("tensor '{}' holds non-finite values", t.name),
                ));
            }
            Ok(v.into_iter().map(f64::from).collect())
        };
        let [n, m, ..] = ne(&self.base).map(|d| d as usize);
        let r = self.rank;
        let (a, b) = (read(&self.a)?, read(&self.b)?);
        let (b, a) = match self.flipped {
            // lora_a is (m = n_vocab, r) row-major: B itself. lora_b is (n = n_embd, r): Aᵀ.
            true => (a, transpose(&b, n, r)),
            // lora_a is (r, n) row-major: A. lora_b is (m, r): B.
            false => (b, a),
        };
        Ok(Factors {
            m,
            n,
            r,
            b,
            a,
            scale: self.scale,
        })
    }
}

/// Row-major (rows, cols) → row-major (cols, rows).
fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

/// ggml's ne: the dims padded with 1 to four.
fn ne(t: &TensorInfo) -> [u64; 4] {
    let mut ne = [1u64; 4];
    for (slot, &d) in ne.iter_mut().zip(&t.dims) {
        *slot = d;
    }
    ne
}

fn adapter_error(file: &GgufFile, problem: String) -> Error {
    Error::Adapter {
        path: file.path().to_path_buf(),
        problem,
    }
}

/// "`key` must be `want`, found U32 ...": a key of a type llama.cpp's typed getter aborts on.
fn wrong_type(key: &str, v: &Value, want: &str) -> String {
    format!(
        "{key} must be {want}, found a {:?} value (llama.cpp aborts reading any other type)",
        v.value_type()
    )
}

/// A required string key, read as llama.cpp's `get_kv_str` would without aborting.
fn string_key<'f>(file: &'f GgufFile, key: &str, expected: &str) -> Result<&'f str> {
    match file.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(adapter_error(file, wrong_type(key, v, "a string"))),
        None => Err(adapter_error(
            file,
            format!("{key} is missing, expected {expected}"),
        )),
    }
}

/// Checks `adapter` against `base` with llama.cpp's rules (see the module docs) and returns its
/// pairs. Errors name the adapter file and the key or tensor at fault.
pub fn validate(base: &GgufFile, adapter: &GgufFile) -> Result<Adapter> {
    let bad = |problem: String| adapter_error(adapter, problem);
    // 1. Metadata.
    match adapter.get(GENERAL_TYPE) {
        Some(Value::String(s)) if s == "adapter" => {}
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "not a LoRA adapter: general.type is {s:?}, expected \"adapter\""
            )))
        }
        Some(v) => return Err(bad(wrong_type(GENERAL_TYPE, v, "a string"))),
        None => {
            return Err(bad(
                "not a LoRA adapter: general.type is missing, expected \"adapter\"".into(),
            ))
        }
    }
    let base_arch = base
        .get(ARCHITECTURE)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Gguf {
            path: base.path().to_path_buf(),
            problem: "no general.architecture string: not a model GGUF".into(),
        })?;
    let architecture = string_key(adapter, ARCHITECTURE, &format!("{base_arch:?}"))?;
    if architecture != base_arch {
        return Err(bad(format!(
            "adapter architecture {architecture:?} does not match the base's {base_arch:?} ({})",
            base.path().display()
        )));
    }
    let kind = string_key(adapter, ADAPTER_TYPE, "\"lora\"")?;
    if kind != "lora" {
        return Err(bad(format!(
            "adapter.type is {kind:?}; only LoRA adapters (\"lora\") are supported"
        )));
    }
    let alpha = match adapter.get(ALPHA) {
        None => None,
        Some(Value::F32(a)) if a.is_finite() => Some(*a),
        Some(Value::F32(a)) => return Err(bad(format!("{ALPHA} is {a}, not a finite number"))),
        Some(v) => return Err(bad(wrong_type(ALPHA, v, "an F32 value"))),
    };
    match adapter.get(ALORA_TOKENS) {
        None | Some(Value::Array(ValueType::U32, _)) => {}
        Some(Value::Array(t, _)) => {
            return Err(bad(format!(
                "{ALORA_TOKENS} must be an array of u32, found an array of {t:?}"
            )))
        }
        Some(v) => return Err(bad(wrong_type(ALORA_TOKENS, v, "an array of u32"))),
    }

    // 2. Pairing, in file order.
    let mut halves: Vec<(&str, Option<&TensorInfo>, Option<&TensorInfo>)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    let mut ignored = Vec::new();
    for t in &adapter.tensors {
        let Some((stem, is_a)) = factor_of(&t.name) else {
            if t.name.ends_with(NORM_SUFFIX) {
                ignored.push(t.name.clone());
                continue;
            }
            return Err(bad(format!(
                "tensor '{}' is neither a .lora_a nor a .lora_b factor (nor a skipped {NORM_SUFFIX})",
                t.name
            )));
        };
        if stem.contains(SUFFIX_A) || stem.contains(SUFFIX_B) {
            return Err(bad(format!(
                "tensor '{}': the adapted name '{stem}' itself contains .lora_a or .lora_b",
                t.name
            )));
        }
        let i = *slot.entry(stem).or_insert_with(|| {
            halves.push((stem, None, None));
            halves.len() - 1
        });
        match is_a {
            true => halves[i].1 = Some(t),
            false => halves[i].2 = Some(t),
        }
    }
    // Report in the base's tensor order.
    let order = |name: &str| base.tensors.iter().position(|t| t.name == name);
    halves.sort_by_key(|h| order(h.0).unwrap_or(usize::MAX));

    // 3. Each pair against the base.
    let mut pairs = Vec::with_capacity(halves.len());
    for (stem, a, b) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            let missing = if a.is_none() { SUFFIX_A } else { SUFFIX_B };
            return Err(bad(format!(
                "'{stem}' has only one of its two factors: {stem}{missing} is missing"
            )));
        };
        let w = base.tensor(stem).ok_or_else(|| {
            bad(format!(
                "adapts '{stem}', which the base {} does not have (hint: maybe the wrong base model?)",
                base.path().display()
            ))
        })?;
        for t in [a, b] {
            if !FACTOR_TYPES.contains(&t.ggml_type) {
                return Err(bad(format!(
                    "tensor '{}' is stored as {}; adapter factors must be f32, f16, bf16 or q8_0",
                    t.name,
                    t.ggml_type.name()
                )));
            }
        }
        let (wn, an, bn) = (ne(w), ne(a), ne(b));
        if [wn, an, bn].iter().any(|x| x[2] != 1 || x[3] != 1) {
            return Err(bad(format!(
                "'{stem}': only 2-D weights and factors can be adapted (base {:?}, lora_a {:?}, lora_b {:?}, ggml dims)",
                w.dims, a.dims, b.dims
            )));
        }
        let flipped = is_embedding(stem);
        let (fits, ranks_agree) = match flipped {
            true => (wn[0] == bn[1] && wn[1] == an[1], an[0] == bn[0]),
            false => (wn[0] == an[0] && wn[1] == bn[1], an[1] == bn[0]),
        };
        if !fits {
            return Err(bad(format!(
                "'{stem}': lora_a {:?} and lora_b {:?} do not fit the base tensor {:?} (ggml dims; hint: maybe the wrong base model?)",
                a.dims, b.dims, w.dims
            )));
        }
        if !ranks_agree {
            return Err(bad(format!(
                "'{stem}': the ranks of lora_a {:?} and lora_b {:?} differ (ggml dims; lora_a must be stored transposed)",
                a.dims, b.dims
            )));
        }
        if stem == EMBEDDING && base.tensor(OUTPUT).is_none() {
            return Err(bad(format!(
                "'{stem}': the base ties its output projection to {EMBEDDING} (it has no {OUTPUT}), so llama.cpp would apply this pair there too, unflipped, and abort"
            )));
        }
        let rank = bn[0] as usize;
        if rank == 0 {
            return Err(bad(format!("'{stem}' has rank 0")));
        }
        let scale = match alpha {
            Some(al) if al != 0.0 => f64::from(al) / rank as f64,
            _ => 1.0,
        };
        pairs.push(Pair {
            base: w.clone(),
            a: a.clone(),
            b: b.clone(),
            rank,
            scale,
            flipped,
        });
    }
    Ok(Adapter {
        path: adapter.path().to_path_buf(),
        architecture: architecture.to_string(),
        alpha,
        pairs,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(tied: bool) -> GgufFile {
        let mut plan = GgufPlan::default();
        plan.set(ARCHITECTURE, Value::String("llama".into()));
        plan.tensors
            .push(OutTensor::f32("token_embd.weight", &[6, 4], &[0.0; 24]));
        plan.tensors
            .push(OutTensor::f32("blk.0.ffn_down.weight", &[4, 5], &[0.0; 20]));
        if !tied {
            plan.tensors
                .push(OutTensor::f32("output.weight", &[6, 4], &[0.0; 24]));
        }
        GgufFile::from_bytes("base.gguf", plan.to_bytes().unwrap()).unwrap()
    }

    fn dense(f: &Factors) -> Vec<f64> {
        let mut w = vec![0.0; f.m * f.n];
        for o in 0..f.m {
            for j in 0..f.n {
                w[o * f.n + j] = f.scale
                    * (0..f.r)
                        .map(|i| f.b[o * f.r + i] * f.a[i * f.n + j])
                        .sum::<f64>();
            }
        }
        w
    }

    /// What is written reads back as the same ΔW, for a plain and for a flipped (token_embd)
    /// tensor, with two stacked deltas on one of them.
    #[test]
    fn written_adapters_read_back_as_their_deltas() {
        let base = base(false);
        let delta = |tensor: &str, out: usize, inp: usize, seed: f32| Delta {
            tensor: tensor.into(),
            layer: 0,
            out_vecs: vec![(0..out).map(|i| seed + i as f32).collect()],
            in_vecs: vec![(0..inp).map(|i| 1.0 - seed * i as f32).collect()],
        };
        let deltas = [
            delta("blk.0.ffn_down.weight", 4, 5, 0.5),
            delta("blk.0.ffn_down.weight", 4, 5, -0.25),
            delta("token_embd.weight", 6, 4, 2.0),
        ];
        let plan = adapter_plan("llama", &deltas, &[]);
        let file = GgufFile::from_bytes("a.gguf", plan.to_bytes().unwrap()).unwrap();
        let adapter = validate(&base, &file).unwrap();
        assert_eq!(adapter.alpha, Some(2.0));
        let names: Vec<&str> = adapter.pairs.iter().map(Pair::name).collect();
        assert_eq!(names, ["token_embd.weight", "blk.0.ffn_down.weight"]);
        for p in &adapter.pairs {
            assert_eq!((p.rank, p.scale), (2, 1.0));
            let f = p.factors(&file).unwrap();
            let mut want = vec![0f32; f.m * f.n];
            for d in deltas.iter().filter(|d| d.tensor == p.name()) {
                d.add_to(&mut want);
            }
            for (x, y) in dense(&f).iter().zip(&want) {
                assert!((x - f64::from(*y)).abs() < 1e-5, "{}: {x} vs {y}", p.name());
            }
        }
    }

    /// A tied base's output projection is token_embd itself: an embedding pair is refused.
    #[test]
    fn embedding_pairs_need_an_untied_output() {
        let delta = Delta {
            tensor: "token_embd.weight".into(),
            layer: 0,
            out_vecs: vec![vec![1.0; 6]],
            in_vecs: vec![vec![1.0; 4]],
        };
        let plan = adapter_plan("llama", &[delta], &[]);
        let file = GgufFile::from_bytes("a.gguf", plan.to_bytes().unwrap()).unwrap();
        assert!(validate(&base(false), &file).is_ok());
        let err = validate(&base(true), &file).unwrap_err().to_string();
        assert!(
            err.starts_with("a.gguf: ") && err.contains("output.weight"),
            "{err}"
        );
    }

    /// Byte flips and truncations of a valid adapter fail cleanly or validate, never panic, and
    /// what validates reads back with factors that fit its base (a small, deterministic cousin
    /// of `fuzz/fuzz_targets/lora.rs`).
    #[test]
    fn mutated_adapters_never_panic() {
        let base = base(false);
        let deltas = [
            Delta {
                tensor: "blk.0.ffn_down.weight".into(),
                layer: 0,
                out_vecs: vec![vec![0.5; 4]],
                in_vecs: vec![vec![0.25; 5]],
            },
            Delta {
                tensor: "token_embd.weight".into(),
                layer: 0,
                out_vecs: vec![vec![0.5; 6]],
                in_vecs: vec![vec![0.25; 4]],
            },
        ];
        let good = adapter_plan("llama", &deltas, &[]).to_bytes().unwrap();
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) as usize
        };
        let mut validated = 0;
        for i in 0..4000 {
            let mut bytes = good.clone();
            match i % 4 {
                0 => bytes.truncate(next() % good.len()),
                _ => {
                    for _ in 0..1 + i % 3 {
                        let at = next() % bytes.len();
                        bytes[at] = next() as u8;
                    }
                }
            }
            let Ok(file) = GgufFile::from_bytes("m.gguf", bytes) else {
                continue;
            };
            let Ok(adapter) = validate(&base, &file) else {
                continue;
            };
            validated += 1;
            assert!(looks_like_adapter(&file));
            for p in &adapter.pairs {
                if let Ok(f) = p.factors(&file) {
                    assert_eq!(f.m * f.n, p.base.n_elements() as usize);
                    assert_eq!((f.b.len(), f.a.len()), (f.m * f.r, f.r * f.n));
                }
            }
        }
        assert!(
            validated > 0,
            "no mutation validated: the harness tests nothing"
        );
    }
}
