//! Whitened forward-pass shifting (`shift-whitened`): FPS with a ROME-style key.
//!
//! Plain FPS adds lr · e xᵀ to FF2, so any other FF2 input x' receives lr · (x·x') · e. Prompts
//! that end in the same relation words have FF2 inputs with a large dot product with x, which is
//! why FPS breaks neighbouring facts. Here the key is whitened by the second moment of FF2
//! inputs over generic text,
//!
//! ```text
//! C = E[a aᵀ] + λ·I,   k = C⁻¹x / (xᵀC⁻¹x),   ΔW = s · e kᵀ,   s = lr · ‖x‖²,
//! ```
//!
//! so that ΔW·x = s·e exactly (k·x = 1) while E[(k·a)²] is the smallest among all keys with
//! k·x = 1 (ROME's argument): the edit writes into the residual at x what plain FPS would write
//! with the same lr, and as little as possible on average elsewhere. Because s = lr·‖x‖², `lr`
//! has the same meaning as for plain FPS at the edit prompt, and the delta is linear in lr, so
//! `eval --lr auto` works unchanged. The delta is stored like FPS's: out = lr·e, in = ‖x‖²·k.
//!
//! The statistics ([`KeyStats`]) are the uncentered second moment (and mean) of the FF2 inputs at
//! one layer over every position but the first of a fixed prompt set ([`StatsCorpus`]), computed
//! on the unedited model and cached on disk under `$HOME/.cache/backlens/stats/`
//! (see [`StatsStore`]). λ = `lambda_ratio` · tr(E[a aᵀ]) / n_ff; the Cholesky factor of C is
//! computed on load (well under a second for n_ff = 1536).

use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::runtime::argmax;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Default λ relative to the mean diagonal of E[a aᵀ] (tuned on CounterFact val records).
pub const DEFAULT_LAMBDA_RATIO: f64 = 1e-2;

/// Rows of FF2 inputs gathered before one Aᵀ·A update of the second moment.
const CHUNK_ROWS: usize = 2048;

/// Magic bytes of a cached statistics file.
const MAGIC: &[u8; 8] = b"BLSTATS1";

/// Second-moment statistics of FF2 inputs at one layer, with the Cholesky factor of
/// C = E[a aᵀ] + λ·I.
#[derive(Debug, Clone)]
pub struct KeyStats {
    /// Layer the statistics belong to.
    pub layer: usize,
    /// Width of the FF2 input (n_ff).
    pub n: usize,
    /// Token positions the statistics were accumulated over.
    pub count: usize,
    /// λ added to the diagonal.
    pub lambda: f64,
    /// Mean FF2 input E[a].
    pub mean: Vec<f64>,
    /// Uncentered second moment E[a aᵀ], row-major (n, n).
    pub moment: Vec<f64>,
    /// Lower-triangular Cholesky factor of C = E[a aᵀ] + λ·I, row-major (n, n).
    chol: Vec<f64>,
}

impl KeyStats {
    /// Statistics from raw sums: `sum` = Σ a, `sum_outer` = Σ a aᵀ over `count` positions;
    /// λ = `lambda_ratio` · tr(E[a aᵀ]) / n.
    pub fn from_moments(
        layer: usize,
        n: usize,
        count: usize,
        mean: Vec<f64>,
        moment: Vec<f64>,
        lambda_ratio: f64,
    ) -> Result<KeyStats> {
        if mean.len() != n || moment.len() != n * n || count == 0 {
            return Err(Error::Invalid(format!(
                "key statistics of layer {layer}: inconsistent sizes (n {n}, count {count})"
            )));
        }
        if !(lambda_ratio.is_finite() && lambda_ratio > 0.0) {
            return Err(Error::Invalid(format!(
                "lambda ratio must be a positive number, got {lambda_ratio}"
            )));
        }
        let trace: f64 = (0..n).map(|i| moment[i * n + i]).sum();
        let lambda = lambda_ratio * trace / n as f64;
        let mut chol = moment.clone();
        for i in 0..n {
            chol[i * n + i] += lambda;
        }
        cholesky_in_place(&mut chol, n).map_err(|i| {
            Error::Invalid(format!(
                "key statistics of layer {layer}: C is not positive definite (pivot {i})"
            ))
        })?;
        Ok(KeyStats {
            layer,
            n,
            count,
            lambda,
            mean,
            moment,
            chol,
        })
    }

    /// The same statistics with another λ ratio.
    pub fn with_lambda_ratio(&self, lambda_ratio: f64) -> Result<KeyStats> {
        KeyStats::from_moments(
            self.layer,
            self.n,
            self.count,
            self.mean.clone(),
            self.moment.clone(),
            lambda_ratio,
        )
    }

    /// Solves C z = v.
    pub fn solve(&self, v: &[f64]) -> Vec<f64> {
        let n = self.n;
        let l = &self.chol;
        // L y = v
        let mut y = v.to_vec();
        for i in 0..n {
            let s = dot(&l[i * n..i * n + i], &y[..i]);
            y[i] = (y[i] - s) / l[i * n + i];
        }
        // Lᵀ z = y, row-oriented: after z[i] is known, remove its share from earlier rows.
        for i in (0..n).rev() {
            y[i] /= l[i * n + i];
            let zi = y[i];
            for (yk, &lik) in y[..i].iter_mut().zip(&l[i * n..i * n + i]) {
                *yk -= lik * zi;
            }
        }
        y
    }

    /// The whitened key k = C⁻¹x / (xᵀC⁻¹x), so that k·x = 1.
    pub fn key(&self, x: &[f32]) -> Result<Vec<f64>> {
        if x.len() != self.n {
            return Err(Error::Invalid(format!(
                "key of width {} for statistics of width {}",
                x.len(),
                self.n
            )));
        }
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let z = self.solve(&xd);
        let q = dot(&xd, &z);
        if !(q.is_finite() && q > 0.0) {
            return Err(Error::Invalid(
                "the FF2 input at the edit prompt is zero: nothing to key on".into(),
            ));
        }
        Ok(z.iter().map(|v| v / q).collect())
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// In-place lower Cholesky factorization of the symmetric positive definite row-major (n, n)
/// matrix `a` (only its lower triangle is read; the upper one is zeroed). Err(i): pivot i ≤ 0.
pub fn cholesky_in_place(a: &mut [f64], n: usize) -> std::result::Result<(), usize> {
    for i in 0..n {
        let (before, rest) = a.split_at_mut(i * n);
        let row_i = &mut rest[..n];
        for j in 0..i {
            let row_j = &before[j * n..j * n + j + 1];
            let s = dot(&row_i[..j], &row_j[..j]);
            row_i[j] = (row_i[j] - s) / row_j[j];
        }
        let d = row_i[i] - dot(&row_i[..i], &row_i[..i]);
        if !(d.is_finite() && d > 0.0) {
            return Err(i);
        }
        row_i[i] = d.sqrt();
        row_i[i + 1..].iter_mut().for_each(|v| *v = 0.0);
    }
    Ok(())
}

/// The prompts the statistics are accumulated over.
#[derive(Debug, Clone, PartialEq)]
pub enum StatsCorpus {
    /// The built-in set of generic factual prompts and sentences ([`builtin_prompts`]).
    Builtin,
    /// A file: CounterFact-shaped JSON records (their `prompt`, `rephrase_prompt` and
    /// `locality_prompt` strings, records `skip..` only) or plain text (one prompt a line, lines
    /// `skip..` only).
    File {
        /// The file.
        path: PathBuf,
        /// Records (or lines) skipped from the start.
        skip: usize,
    },
}

impl StatsCorpus {
    /// The prompt strings.
    pub fn prompts(&self) -> Result<Vec<String>> {
        match self {
            StatsCorpus::Builtin => Ok(builtin_prompts()),
            StatsCorpus::File { path, skip } => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let prompts: Vec<String> = if text.trim_start().starts_with('[') {
                    super::EditRequest::load_file(path)?
                        .into_iter()
                        .skip(*skip)
                        .flat_map(|r| {
                            [Some(r.prompt), r.rephrase_prompt, r.locality_prompt]
                                .into_iter()
                                .flatten()
                        })
                        .collect()
                } else {
                    text.lines()
                        .skip(*skip)
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                };
                if prompts.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{}: no statistics prompts after skipping {skip}",
                        path.display()
                    )));
                }
                Ok(prompts)
            }
        }
    }

    /// A short description for cache headers and reports.
    pub fn describe(&self) -> String {
        match self {
            StatsCorpus::Builtin => "builtin".into(),
            StatsCorpus::File { path, skip } => format!("{} (from {skip})", path.display()),
        }
    }
}

/// The built-in statistics prompts: relation templates of many kinds (place, origin, language,
/// employer, maker, genre, ...) filled with subjects of the matching kind, plus generic sentences.
/// Written for backlens; they share no text with CounterFact.
pub fn builtin_prompts() -> Vec<String> {
    const PEOPLE: &[&str] = &[
        "Maria Lindqvist",
        "Tomas Brenner",
        "Akira Watanabe",
        "Fatima Haddad",
        "John Carter",
        "Elena Petrova",
        "Samuel Okafor",
        "Lucia Fernandes",
        "Henrik Olsen",
        "Priya Raman",
        "Marco Bellini",
        "Grace Kim",
        "Pierre Dubois",
        "Anna Kowalska",
        "David Cohen",
        "Chen Wei",
        "Olivia Turner",
        "Mehmet Yilmaz",
        "Isabel Ortega",
        "Kwame Mensah",
    ];
    const PERSON_TEMPLATES: &[&str] = &[
        "{} was born in",
        "{} is a citizen of",
        "{} died in",
        "The native language of {} is",
        "{} speaks",
        "{} works for",
        "{} is employed by",
        "{} is a professional",
        "{} plays the position of",
        "{} plays for",
        "{} is known for playing the",
        "The profession of {} is",
        "{} works in the field of",
        "{} is affiliated with the religion of",
        "{} holds the position of",
        "{} was educated at",
        "{} is a member of the",
        "{} writes in",
        "{}'s area of work is",
        "{} has the nationality of",
    ];
    const PLACES: &[&str] = &[
        "Lake Orrin",
        "Valmont",
        "the Kessel valley",
        "Port Amara",
        "Northbridge",
        "Santa Lucena",
        "the Brevik peninsula",
        "Old Harlow",
        "Mount Teller",
        "Riverside Park",
        "Castel Ferro",
        "the Dunmore bridge",
        "Eastfield station",
        "Novigrad",
        "the Selva plateau",
    ];
    const PLACE_TEMPLATES: &[&str] = &[
        "{} is located in",
        "{} is located in the continent of",
        "{} is a part of the country",
        "{} belongs to the continent of",
        "The official language of {} is",
        "{} is the capital of",
        "The capital city of {} is",
        "{} is twinned with",
        "{} shares a border with",
        "In {}, the language spoken is",
        "{} can be found in",
        "The country of {} is",
    ];
    const THINGS: &[&str] = &[
        "the Zentra phone",
        "Nordlys Radio",
        "the Atlas engine",
        "Helix Studio",
        "the Kestrel car",
        "Brightwave TV",
        "the Orion tablet",
        "Vireo OS",
        "the Tempo camera",
        "Lumen Records",
        "the Falcon console",
        "Corvid Press",
        "the Meridian series",
        "Solstice Games",
        "the Pavo browser",
    ];
    const THING_TEMPLATES: &[&str] = &[
        "{} is developed by",
        "{} is produced by",
        "{} is owned by",
        "{} was created by",
        "{} is a product of",
        "{}, by",
        "{} was originally aired on",
        "The headquarters of {} is in",
        "{} was founded in",
        "{} is headquartered in",
        "The original language of {} is",
        "{} is part of the genre of",
        "{} premiered on",
        "{} was released by",
        "The manufacturer of {} is",
    ];
    const SENTENCES: &[&str] = &[
        "The weather today is cold and windy, so we stayed inside and read books.",
        "She opened the window and looked out at the quiet street below.",
        "The committee will meet again next week to discuss the budget.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "He bought bread, cheese and apples at the market on Saturday.",
        "The museum is open every day except Monday.",
        "Most of the students passed the exam on their first attempt.",
        "The train to the airport leaves every twenty minutes.",
        "A new bridge was built across the river last year.",
        "The company reported higher profits in the third quarter.",
        "The children played football in the park until it got dark.",
        "Our neighbours have a small garden with roses and tomatoes.",
        "The film was shot in three different countries over two years.",
        "Scientists found a new species of frog in the rainforest.",
        "The library lends books, music and films for free.",
        "They moved to a larger apartment after their second child was born.",
        "The orchestra played a symphony by a young composer.",
        "Heavy rain caused flooding in several villages.",
        "The recipe needs two eggs, a cup of flour and some milk.",
        "The old castle on the hill attracts many tourists in summer.",
        "The election results will be announced tomorrow morning.",
        "He has been learning to play the guitar for three years.",
        "The software update fixes several security problems.",
        "The river flows through the city and into the sea.",
        "Many birds fly south for the winter.",
        "The team won the championship for the second time in a row.",
        "She works as a nurse at the local hospital.",
        "The book tells the story of a family during the war.",
        "Prices of fruit and vegetables rose sharply this month.",
        "The festival takes place every year in early September.",
    ];
    let fill = |templates: &[&str], subjects: &[&str]| -> Vec<String> {
        templates
            .iter()
            .flat_map(|t| subjects.iter().map(move |s| t.replace("{}", s)))
            .collect()
    };
    let mut out = fill(PERSON_TEMPLATES, PEOPLE);
    out.extend(fill(PLACE_TEMPLATES, PLACES));
    out.extend(fill(THING_TEMPLATES, THINGS));
    out.extend(SENTENCES.iter().map(|s| s.to_string()));
    out
}

/// Accumulates E[a] and E[a aᵀ] of the FF2 inputs at `layer` over every position but the first
/// (the BOS / attention-sink position) of each prompt, on a copy of `model` cut after `layer`.
pub fn accumulate(
    model: &Transformer,
    prompts: &[Vec<u32>],
    layer: usize,
) -> Result<(usize, Vec<f64>, Vec<f64>)> {
    if layer >= model.blocks.len() {
        return Err(Error::Invalid(format!("layer {layer} out of range")));
    }
    // Only layers 0..=layer matter; a one-row unembedding makes the final projection free.
    let mut prefix = model.clone();
    prefix.blocks.truncate(layer + 1);
    prefix.output = model.tok_embd.narrow(0, 0, 1)?;
    let n = model.hp.n_ff;
    let mut sum = vec![0f64; n];
    let mut outer = vec![0f64; n * n];
    let mut rows: Vec<f32> = Vec::with_capacity(CHUNK_ROWS * n);
    let mut count = 0usize;
    let flush = |rows: &mut Vec<f32>, outer: &mut Vec<f64>| -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let r = rows.len() / n;
        let a = Tensor::from_slice(rows, (r, n), &Device::Cpu)?;
        let ata: Vec<f32> = a.t()?.matmul(&a)?.flatten_all()?.to_vec1()?;
        for (o, v) in outer.iter_mut().zip(ata) {
            *o += v as f64;
        }
        rows.clear();
        Ok(())
    };
    let max_len = model.hp.n_ctx;
    for ids in prompts {
        let ids = &ids[..ids.len().min(max_len)];
        if ids.len() < 2 {
            continue;
        }
        let (_, trace) = prefix.forward(ids, None)?;
        let a = trace.ff2_in[layer]
            .narrow(0, 1, ids.len() - 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for row in a.chunks_exact(n) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        count += a.len() / n;
        rows.extend_from_slice(&a);
        if rows.len() >= CHUNK_ROWS * n {
            flush(&mut rows, &mut outer)?;
        }
    }
    flush(&mut rows, &mut outer)?;
    if count == 0 {
        return Err(Error::Invalid(
            "no statistics prompts of two or more tokens".into(),
        ));
    }
    let c = count as f64;
    sum.iter_mut().for_each(|v| *v /= c);
    outer.iter_mut().for_each(|v| *v /= c);
    Ok((count, sum, outer))
}

/// Identity of a model file (or HF folder) for the cache: name, size and mtime of its files.
pub fn model_fingerprint(path: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "json")
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files.dedup();
    let mut h = Sha256::new();
    for f in &files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        h.update(format!("{name:?}\0{}\0{mtime}\0", meta.len()).as_bytes());
    }
    Ok(hex16(&h.finalize()))
}

fn hex16(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The default cache folder: `$HOME/.cache/backlens/stats`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/backlens/stats"))
}

/// Statistics for any layer of one unedited model, computed on first use, cached in memory and
/// on disk. It keeps its own copy of the unedited weights, so edits applied to the caller's model
/// afterwards (sequential editing) never leak into the statistics.
pub struct StatsStore {
    model: Transformer,
    prompts: Vec<Vec<u32>>,
    corpus: String,
    model_path: PathBuf,
    fingerprint: String,
    corpus_sha: String,
    lambda_ratio: f64,
    cache_dir: Option<PathBuf>,
    loaded: Mutex<HashMap<usize, Arc<KeyStats>>>,
}

/// Header of a cached statistics file (JSON after the magic and a u64 length), followed by
/// `n` f32 (mean) and `n·n` f32 (second moment, row-major), little-endian.
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheHeader {
    model: String,
    fingerprint: String,
    layer: usize,
    n: usize,
    count: usize,
    corpus: String,
    corpus_sha: String,
}

impl StatsStore {
    /// A store for `model` (unedited, loaded from `model_path`) over `corpus`; `cache_dir` None
    /// disables the disk cache.
    pub fn new(
        model: &Transformer,
        tok: &Tokenizer,
        model_path: &Path,
        corpus: &StatsCorpus,
        lambda_ratio: f64,
        cache_dir: Option<PathBuf>,
    ) -> Result<StatsStore> {
        let prompts = corpus
            .prompts()?
            .iter()
            .map(|p| tok.encode_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        StatsStore::from_tokens(
            model,
            prompts,
            model_path,
            &corpus.describe(),
            lambda_ratio,
            cache_dir,
        )
    }

    /// Like [`StatsStore::new`] with the prompts already tokenized.
    pub fn from_tokens(
        model: &Transformer,
        prompts: Vec<Vec<u32>>,
        model_path: &Path,
        corpus: &str,
        lambda_ratio: f64,
        cache_dir: Option<PathBuf>,
    ) -> Result<StatsStore> {
        if !(lambda_ratio.is_finite() && lambda_ratio > 0.0) {
            return Err(Error::Invalid(format!(
                "lambda ratio must be a positive number, got {lambda_ratio}"
            )));
        }
        let mut h = Sha256::new();
        for p in &prompts {
            for id in p {
                h.update(id.to_le_bytes());
            }
            h.update(u32::MAX.to_le_bytes());
        }
        let corpus_sha = hex16(&h.finalize());
        Ok(StatsStore {
            model: model.clone(),
            prompts,
            corpus: corpus.to_string(),
            model_path: model_path.to_path_buf(),
            fingerprint: model_fingerprint(model_path)?,
            corpus_sha,
            lambda_ratio,
            cache_dir,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// Number of statistics prompts.
    pub fn n_prompts(&self) -> usize {
        self.prompts.len()
    }

    /// The cache file of `layer`.
    pub fn cache_path(&self, layer: usize) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| {
            d.join(format!(
                "{}-{}-L{layer}.bin",
                self.fingerprint, self.corpus_sha
            ))
        })
    }

    /// The statistics of `layer` (memory, then disk cache, then computed and cached).
    pub fn get(&self, layer: usize) -> Result<Arc<KeyStats>> {
        if let Some(s) = self.loaded.lock().expect("stats lock").get(&layer) {
            return Ok(s.clone());
        }
        if layer >= self.model.blocks.len() {
            return Err(Error::Invalid(format!(
                "layer {layer} out of range: the model has layers 0..{}",
                self.model.blocks.len() - 1
            )));
        }
        let n = self.model.hp.n_ff;
        let cached = self
            .cache_path(layer)
            .and_then(|p| read_cache(&p, layer, n));
        let (count, mean, moment) = match cached {
            Some(c) => c,
            None => {
                let c = accumulate(&self.model, &self.prompts, layer)?;
                if let Some(p) = self.cache_path(layer) {
                    // A failed cache write only costs recomputation next time.
                    let _ = self.write_cache(&p, layer, &c);
                }
                c
            }
        };
        let stats = Arc::new(KeyStats::from_moments(
            layer,
            n,
            count,
            mean,
            moment,
            self.lambda_ratio,
        )?);
        self.loaded
            .lock()
            .expect("stats lock")
            .insert(layer, stats.clone());
        Ok(stats)
    }

    fn write_cache(
        &self,
        path: &Path,
        layer: usize,
        c: &(usize, Vec<f64>, Vec<f64>),
    ) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let header = CacheHeader {
            model: self.model_path.display().to_string(),
            fingerprint: self.fingerprint.clone(),
            layer,
            n: c.1.len(),
            count: c.0,
            corpus: self.corpus.clone(),
            corpus_sha: self.corpus_sha.clone(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut bytes = Vec::with_capacity(16 + json.len() + 4 * (c.1.len() + c.2.len()));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        for v in c.1.iter().chain(&c.2) {
            bytes.extend_from_slice(&(*v as f32).to_le_bytes());
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// Reads a cache file; None when absent, malformed or of another shape.
fn read_cache(path: &Path, layer: usize, n: usize) -> Option<(usize, Vec<f64>, Vec<f64>)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return None;
    }
    let hlen = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let header: CacheHeader = serde_json::from_slice(bytes.get(16..16 + hlen)?).ok()?;
    if header.layer != layer || header.n != n || header.count == 0 {
        return None;
    }
    let data = bytes.get(16 + hlen..)?;
    if data.len() != 4 * (n + n * n) {
        return None;
    }
    let vals: Vec<f64> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    let moment = vals[n..].to_vec();
    Some((header.count, vals[..n].to_vec(), moment))
}

/// Computes the whitened FPS edit of `req` at `layer` with step `lr` (the model is not changed).
/// Skips when the target already is the model's top-1 next token.
pub fn compute(
    model: &Transformer,
    tok: &Tokenizer,
    req: &EditRequest,
    layer: usize,
    lr: f64,
    stats: &KeyStats,
) -> Result<EditOutcome> {
    if stats.layer != layer || stats.n != model.hp.n_ff {
        return Err(Error::Invalid(format!(
            "key statistics are for layer {} (width {}), the edit is at layer {layer} (width {})",
            stats.layer, stats.n, model.hp.n_ff
        )));
    }
    let prompt = tok.encode_prompt(&req.prompt)?;
    let target_id = super::first_target_token(tok, req)?;
    let (logits, trace) = model.forward(&prompt, None)?;
    let last = prompt.len() - 1;
    let top1 = argmax(
        &logits
            .narrow(0, last, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
    ) as u32;
    if top1 == target_id {
        return Ok(EditOutcome::skipped(req, target_id, top1));
    }
    let x: Vec<f32> = trace.ff2_in[layer]
        .narrow(0, last, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let e: Vec<f32> = model
        .tok_embd
        .narrow(0, target_id as usize, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let xx: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let k = stats.key(&x)?;
    let delta = Delta {
        tensor: ff2_weight(layer),
        layer,
        out_vecs: vec![e.iter().map(|v| (lr * *v as f64) as f32).collect()],
        in_vecs: vec![k.iter().map(|v| (xx * v) as f32).collect()],
    };
    Ok(EditOutcome::edited(req, target_id, top1, delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves() {
        let n = 37;
        // A = B Bᵀ + I, deterministic B.
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919 % 101) as f64 / 50.0) - 1.0)
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let stats = KeyStats::from_moments(0, n, 1, vec![0.0; n], a.clone(), 1e-9).unwrap();
        let v: Vec<f64> = (0..n).map(|i| (i as f64).sin()).collect();
        let z = stats.solve(&v);
        for i in 0..n {
            let az: f64 = (0..n).map(|j| a[i * n + j] * z[j]).sum();
            assert!((az - v[i]).abs() < 1e-8, "row {i}: {az} vs {}", v[i]);
        }
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
        let k = stats.key(&x).unwrap();
        let kx: f64 = k.iter().zip(&x).map(|(a, b)| a * *b as f64).sum();
        assert!((kx - 1.0).abs() < 1e-10);
    }

    #[test]
    fn builtin_corpus_is_sizeable() {
        assert!(builtin_prompts().len() > 700);
    }
}
