//! Whitened forward-pass shifting (`shift-whitened`): FPS with a ROME-style key.
//!
//! Plain FPS adds lr · e xᵀ to FF2, so any other FF2 input x' receives lr · (x·x') · e. Prompts
//! that end in the same relation words have FF2 inputs with a large dot product with x, which is
//! why FPS breaks neighbouring facts (CounterFact neighborhood prompts: same relation, another
//! subject). Here the key is whitened:
//!
//! ```text
//! C = E[a aᵀ] + β·E[a_last a_lastᵀ] + λ·I + (γ/J)·Σⱼ xⱼ xⱼᵀ,
//! k = C⁻¹x / (xᵀC⁻¹x),   ΔW = s · e kᵀ,   s = lr · ‖x‖²,
//! ```
//!
//! so that ΔW·x = s·e exactly (k·x = 1) while kᵀCk, the mean square of k·a over the statistics
//! (ROME's argument) plus the contrast penalty, is the smallest among all keys with k·x = 1: the
//! edit writes at x what plain FPS writes with the same lr, and as little as possible elsewhere.
//! Because s = lr·‖x‖², `lr` has the same meaning as for plain FPS at the edit prompt and the
//! delta is linear in lr, so `eval --lr auto` works unchanged. The delta is stored like FPS's:
//! out = lr·e, in = ‖x‖²·k.
//!
//! * E[a aᵀ] is the uncentered second moment of the FF2 inputs at the edited layer over every
//!   position but the first (BOS / attention sink) of a fixed prompt set ([`StatsCorpus`]:
//!   by default backlens's own built-in prompts, [`builtin_prompts`]; or a file, e.g. the
//!   prompt/rephrase/locality strings of CounterFact *val* records), and E[a_last a_lastᵀ] the
//!   same over the last position of each prompt only, weighted by β (`last_weight`), since edit
//!   keys are last positions. Both are computed on the unedited model and cached on disk
//!   ([`StatsStore`], `$HOME/.cache/backlens/stats/`); λ = `lambda_ratio` · the mean diagonal.
//! * Contrast ("which subject?"): when the request names its subject and the prompt contains it,
//!   the prompt is rerun with the subject replaced by J made-up subjects ([`CONTRAST_SUBJECTS`])
//!   and their last-position FF2 inputs xⱼ enter C with weight γ = `contrast_weight` · the mean
//!   diagonal, which makes k nearly orthogonal to "same relation, other subject". The low-rank
//!   term is applied with the Woodbury identity on top of the cached Cholesky factor.

use super::{Delta, EditOutcome, EditRequest};
use crate::arch::ff2_weight;
use crate::model::Transformer;
use crate::numeric::{cholesky_in_place, cholesky_solve, dot};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Rows of FF2 inputs gathered before one Aᵀ·A update of the second moment.
const CHUNK_ROWS: usize = 2048;

/// Magic bytes of a cached statistics file.
const MAGIC: &[u8; 8] = b"BLSTATS2";

/// How the whitened key is built.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WhitenOptions {
    /// λ relative to the mean diagonal of the second moment.
    pub lambda_ratio: f64,
    /// β: weight of the last-position second moment added to the all-position one.
    pub last_weight: f64,
    /// γ relative to the mean diagonal for the contrast-subject term; 0 disables contrast.
    pub contrast_weight: f64,
    /// Key direction from the FF2 input averaged over the prompt and the prompt behind each of
    /// [`CONTEXT_PREFIXES`] (ROME's context templates): more paraphrase reach, less specificity.
    pub context: bool,
}

impl Default for WhitenOptions {
    /// The defaults tuned on CounterFact val records (see the crate docs).
    fn default() -> WhitenOptions {
        WhitenOptions {
            lambda_ratio: 1e-2,
            last_weight: 4.0,
            contrast_weight: 10.0,
            context: false,
        }
    }
}

impl WhitenOptions {
    fn check(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !(ok(self.lambda_ratio) && self.lambda_ratio > 0.0) {
            return Err(Error::Invalid(format!(
                "whitening λ ratio must be a positive number, got {}",
                self.lambda_ratio
            )));
        }
        if !ok(self.last_weight) || !ok(self.contrast_weight) {
            return Err(Error::Invalid(format!(
                "whitening weights must be non-negative numbers, got last {} contrast {}",
                self.last_weight, self.contrast_weight
            )));
        }
        Ok(())
    }
}

/// Raw statistics of the FF2 inputs at one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// Positions counted in `all` (every position but the first of each prompt).
    pub count: usize,
    /// Prompts counted in `last` (one last position each).
    pub count_last: usize,
    /// E[a] over `count` positions.
    pub mean: Vec<f64>,
    /// E[a aᵀ] over every position but the first, row-major (n, n).
    pub all: Vec<f64>,
    /// E[a aᵀ] over the last position of each prompt, row-major (n, n).
    pub last: Vec<f64>,
}

/// The factored whitening matrix C = E[a aᵀ] + β·E[a_last a_lastᵀ] + λ·I of one layer.
#[derive(Debug, Clone)]
pub struct KeyStats {
    /// Layer the statistics belong to.
    pub layer: usize,
    /// Width of the FF2 input (n_ff).
    pub n: usize,
    /// Positions the all-position moment was accumulated over.
    pub count: usize,
    /// Mean diagonal of the (weighted) second moment: the scale λ and γ are relative to.
    pub scale: f64,
    /// λ added to the diagonal.
    pub lambda: f64,
    /// Options used.
    pub options: WhitenOptions,
    /// Lower-triangular Cholesky factor of C, row-major (n, n).
    chol: Vec<f64>,
}

impl KeyStats {
    /// Factors C = `moment` + λ·I with λ = `lambda_ratio` · mean diagonal of `moment` (n, n).
    pub fn new(
        layer: usize,
        n: usize,
        count: usize,
        moment: Vec<f64>,
        options: WhitenOptions,
    ) -> Result<KeyStats> {
        options.check()?;
        if moment.len() != n * n || n == 0 {
            return Err(Error::Invalid(format!(
                "key statistics of layer {layer}: a moment of {} values for width {n}",
                moment.len()
            )));
        }
        let scale = (0..n).map(|i| moment[i * n + i]).sum::<f64>() / n as f64;
        let lambda = options.lambda_ratio * scale;
        let mut chol = moment;
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
            scale,
            lambda,
            options,
            chol,
        })
    }

    /// Factors C from raw moments: `all` + β·`last` (+ λ·I).
    pub fn from_moments(layer: usize, m: &Moments, options: WhitenOptions) -> Result<KeyStats> {
        let n = m.mean.len();
        if m.all.len() != n * n || m.last.len() != n * n || m.count == 0 {
            return Err(Error::Invalid(format!(
                "key statistics of layer {layer}: inconsistent moments"
            )));
        }
        let beta = options.last_weight;
        let moment = m
            .all
            .iter()
            .zip(&m.last)
            .map(|(a, l)| a + beta * l)
            .collect();
        KeyStats::new(layer, n, m.count, moment, options)
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
        // Lᵀ z = y, row-oriented: once z[i] is known, remove its share from the rows above.
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
        self.key_with_contrast(x, &[])
    }

    /// The key with contrast inputs: k = C'⁻¹x / (xᵀC'⁻¹x) for
    /// C' = C + (γ/J)·Σⱼ xⱼ xⱼᵀ, γ = `contrast_weight` · `scale` (Woodbury on C's factor).
    pub fn key_with_contrast(&self, x: &[f32], contrast: &[Vec<f32>]) -> Result<Vec<f64>> {
        self.key_toward(x, x, contrast)
    }

    /// The key along C'⁻¹·`dir` scaled so that k·x = 1 (`dir` = x gives
    /// [`KeyStats::key_with_contrast`]).
    pub fn key_toward(&self, dir: &[f32], x: &[f32], contrast: &[Vec<f32>]) -> Result<Vec<f64>> {
        if x.len() != self.n || dir.len() != self.n || contrast.iter().any(|c| c.len() != self.n) {
            return Err(Error::Invalid(format!(
                "key of width {} for statistics of width {}",
                x.len(),
                self.n
            )));
        }
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dd: Vec<f64> = dir.iter().map(|&v| v as f64).collect();
        let mut z = self.solve(&dd);
        let gamma = self.options.contrast_weight * self.scale;
        let j = contrast.len();
        if j > 0 && gamma > 0.0 {
            // C'⁻¹x = z − C⁻¹U (I + UᵀC⁻¹U)⁻¹ Uᵀz with U = √(γ/J)·[x₁ … x_J].
            let w = (gamma / j as f64).sqrt();
            let u: Vec<Vec<f64>> = contrast
                .iter()
                .map(|c| c.iter().map(|&v| v as f64 * w).collect())
                .collect();
            let cu: Vec<Vec<f64>> = u.iter().map(|v| self.solve(v)).collect();
            let mut g = vec![0f64; j * j];
            for a in 0..j {
                for b in 0..=a {
                    g[a * j + b] = dot(&u[a], &cu[b]) + if a == b { 1.0 } else { 0.0 };
                }
            }
            cholesky_in_place(&mut g, j)
                .map_err(|_| Error::Invalid("contrast inputs give a singular system".into()))?;
            let rhs: Vec<f64> = u.iter().map(|v| dot(v, &z)).collect();
            let coef = cholesky_solve(&g, j, rhs);
            for (c, v) in coef.iter().zip(&cu) {
                for (zi, vi) in z.iter_mut().zip(v) {
                    *zi -= c * vi;
                }
            }
        }
        let q = dot(&xd, &z);
        if !(q.is_finite() && q > 0.0) {
            return Err(Error::Invalid(
                "the whitened key is orthogonal to the FF2 input at the edit prompt: nothing to key on"
                    .into(),
            ));
        }
        Ok(z.iter().map(|v| v / q).collect())
    }
}

/// The prompts the statistics are accumulated over.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StatsCorpus {
    /// The built-in set of generic factual prompts and sentences ([`builtin_prompts`]).
    #[default]
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

/// Unrelated sentences put before the edit prompt for [`WhitenOptions::context`].
pub const CONTEXT_PREFIXES: &[&str] = &[
    "The weather was cold that morning. ",
    "She closed the book and smiled. ",
    "Prices went up again last month. ",
    "It was a long day at work. ",
    "The children were playing outside. ",
];

/// Contrast subjects: the edit prompt is rerun with its subject replaced by each of these.
pub const CONTRAST_SUBJECTS: &[&str] = &[
    "Maria Lindqvist",
    "Tomas Brenner",
    "Akira Watanabe",
    "Fatima Haddad",
    "Lake Orrin",
    "Port Amara",
    "Northbridge",
    "Santa Lucena",
    "the Zentra phone",
    "Nordlys Radio",
    "Helix Studio",
    "the Kestrel car",
];

/// Made-up people: subjects of the built-in prompts and contrast subjects.
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

/// Made-up places: subjects of the built-in prompts and contrast subjects.
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

/// Made-up products and organisations: subjects of the built-in prompts and contrast subjects.
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

/// The built-in statistics prompts: relation templates of many kinds (place, origin, language,
/// employer, maker, genre, ...) filled with subjects of the matching kind, plus generic sentences.
/// Written for backlens; they share no text with CounterFact.
pub fn builtin_prompts() -> Vec<String> {
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

/// `model` cut after `layer`, with a one-row unembedding so that the final projection is free:
/// its trace holds the FF2 inputs of layers 0..=layer.
fn prefix_model(model: &Transformer, layer: usize) -> Result<Transformer> {
    let mut prefix = model.clone();
    prefix.blocks.truncate(layer + 1);
    prefix.output = model.tok_embd.narrow(0, 0, 1)?;
    Ok(prefix)
}

/// Accumulates the [`Moments`] of the FF2 inputs at `layer` over `prompts`.
pub fn accumulate(model: &Transformer, prompts: &[Vec<u32>], layer: usize) -> Result<Moments> {
    if layer >= model.blocks.len() {
        return Err(Error::Invalid(format!("layer {layer} out of range")));
    }
    let prefix = prefix_model(model, layer)?;
    let n = model.hp.n_ff;
    let mut sum = vec![0f64; n];
    let mut all = vec![0f64; n * n];
    let mut last = vec![0f64; n * n];
    let mut rows: Vec<f32> = Vec::with_capacity(CHUNK_ROWS * n);
    let mut last_rows: Vec<f32> = Vec::with_capacity(CHUNK_ROWS * n);
    let (mut count, mut count_last) = (0usize, 0usize);
    let flush = |rows: &mut Vec<f32>, acc: &mut Vec<f64>| -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let a = Tensor::from_slice(rows, (rows.len() / n, n), &Device::Cpu)?;
        let ata: Vec<f32> = a.t()?.matmul(&a)?.flatten_all()?.to_vec1()?;
        for (o, v) in acc.iter_mut().zip(ata) {
            *o += v as f64;
        }
        rows.clear();
        Ok(())
    };
    for ids in prompts {
        let ids = &ids[..ids.len().min(model.hp.n_ctx)];
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
        count_last += 1;
        rows.extend_from_slice(&a);
        last_rows.extend_from_slice(&a[a.len() - n..]);
        if rows.len() >= CHUNK_ROWS * n {
            flush(&mut rows, &mut all)?;
        }
        if last_rows.len() >= CHUNK_ROWS * n {
            flush(&mut last_rows, &mut last)?;
        }
    }
    flush(&mut rows, &mut all)?;
    flush(&mut last_rows, &mut last)?;
    if count == 0 {
        return Err(Error::Invalid(
            "no statistics prompts of two or more tokens".into(),
        ));
    }
    let (c, cl) = (count as f64, count_last as f64);
    sum.iter_mut().for_each(|v| *v /= c);
    all.iter_mut().for_each(|v| *v /= c);
    last.iter_mut().for_each(|v| *v /= cl);
    Ok(Moments {
        count,
        count_last,
        mean: sum,
        all,
        last,
    })
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

/// Key statistics for any layer of one unedited model, computed on first use, kept in memory and
/// cached on disk. It keeps its own copy of the unedited weights, so edits applied to the
/// caller's model afterwards (sequential editing) never leak into the statistics.
pub struct StatsStore {
    model: Transformer,
    prompts: Vec<Vec<u32>>,
    corpus: String,
    model_path: PathBuf,
    fingerprint: String,
    corpus_sha: String,
    options: WhitenOptions,
    cache_dir: Option<PathBuf>,
    loaded: Mutex<HashMap<usize, Arc<KeyStats>>>,
}

/// Header of a cached statistics file (JSON after the magic and a u64 length), followed by
/// little-endian f32: `n` (mean), `n·n` (all-position moment), `n·n` (last-position moment).
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheHeader {
    model: String,
    fingerprint: String,
    layer: usize,
    n: usize,
    count: usize,
    count_last: usize,
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
        options: WhitenOptions,
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
            options,
            cache_dir,
        )
    }

    /// Like [`StatsStore::new`] with the prompts already tokenized (`corpus` only describes them).
    pub fn from_tokens(
        model: &Transformer,
        prompts: Vec<Vec<u32>>,
        model_path: &Path,
        corpus: &str,
        options: WhitenOptions,
        cache_dir: Option<PathBuf>,
    ) -> Result<StatsStore> {
        options.check()?;
        let mut h = Sha256::new();
        for p in &prompts {
            for id in p {
                h.update(id.to_le_bytes());
            }
            h.update(u32::MAX.to_le_bytes());
        }
        Ok(StatsStore {
            model: model.clone(),
            corpus_sha: hex16(&h.finalize()),
            prompts,
            corpus: corpus.to_string(),
            model_path: model_path.to_path_buf(),
            fingerprint: model_fingerprint(model_path)?,
            options,
            cache_dir,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// Number of statistics prompts.
    pub fn n_prompts(&self) -> usize {
        self.prompts.len()
    }

    /// The key options.
    pub fn options(&self) -> WhitenOptions {
        self.options
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

    /// The raw moments of `layer`: disk cache, else computed (and cached).
    pub fn moments(&self, layer: usize) -> Result<Moments> {
        if layer >= self.model.blocks.len() {
            return Err(Error::Invalid(format!(
                "layer {layer} out of range: the model has layers 0..{}",
                self.model.blocks.len() - 1
            )));
        }
        let n = self.model.hp.n_ff;
        if let Some(m) = self
            .cache_path(layer)
            .and_then(|p| read_cache(&p, layer, n))
        {
            return Ok(m);
        }
        let m = accumulate(&self.model, &self.prompts, layer)?;
        if let Some(p) = self.cache_path(layer) {
            // A failed cache write only costs a recomputation next time.
            let _ = self.write_cache(&p, layer, &m);
        }
        Ok(m)
    }

    /// The factored statistics of `layer` (memory, then disk cache, then computed).
    pub fn get(&self, layer: usize) -> Result<Arc<KeyStats>> {
        if let Some(s) = self.loaded.lock().expect("stats lock").get(&layer) {
            return Ok(s.clone());
        }
        let stats = Arc::new(KeyStats::from_moments(
            layer,
            &self.moments(layer)?,
            self.options,
        )?);
        self.loaded
            .lock()
            .expect("stats lock")
            .insert(layer, stats.clone());
        Ok(stats)
    }

    fn write_cache(&self, path: &Path, layer: usize, m: &Moments) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let header = CacheHeader {
            model: self.model_path.display().to_string(),
            fingerprint: self.fingerprint.clone(),
            layer,
            n: m.mean.len(),
            count: m.count,
            count_last: m.count_last,
            corpus: self.corpus.clone(),
            corpus_sha: self.corpus_sha.clone(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        let values = m.mean.iter().chain(&m.all).chain(&m.last);
        let mut bytes = Vec::with_capacity(16 + json.len() + 4 * (m.mean.len() + 2 * m.all.len()));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        for v in values {
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
fn read_cache(path: &Path, layer: usize, n: usize) -> Option<Moments> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return None;
    }
    let hlen = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let header: CacheHeader =
        serde_json::from_slice(bytes.get(16..16usize.checked_add(hlen)?)?).ok()?;
    if header.layer != layer || header.n != n || header.count == 0 || header.count_last == 0 {
        return None;
    }
    let data = bytes.get(16 + hlen..)?;
    if data.len() != 4 * (n + 2 * n * n) {
        return None;
    }
    let vals: Vec<f64> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    if vals.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(Moments {
        count: header.count,
        count_last: header.count_last,
        mean: vals[..n].to_vec(),
        all: vals[n..n + n * n].to_vec(),
        last: vals[n + n * n..].to_vec(),
    })
}

/// The edit prompt with its subject replaced by each contrast subject (empty when the request
/// names no subject or the prompt does not contain it).
pub fn contrast_prompts(req: &EditRequest) -> Vec<String> {
    match req.subject.as_deref() {
        Some(s) if !s.trim().is_empty() && req.prompt.contains(s) => CONTRAST_SUBJECTS
            .iter()
            .filter(|c| **c != s)
            .map(|c| req.prompt.replacen(s, c, 1))
            .collect(),
        _ => Vec::new(),
    }
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
    let key = super::shift::prompt_key(model, tok, req, layer)?;
    if key.top1 == key.target_id {
        return Ok(EditOutcome::skipped(req, key.target_id, key.top1));
    }
    let (x, target_id, top1) = (key.x, key.target_id, key.top1);
    let last_ff2_in = |trace: &crate::model::Trace, pos: usize| -> Result<Vec<f32>> {
        Ok(trace.ff2_in[layer]
            .narrow(0, pos, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    let prefix = prefix_model(model, layer)?;
    let run = |p: &str| -> Result<Vec<f32>> {
        let ids = tok.encode_prompt(p)?;
        let (_, t) = prefix.forward(&ids, None)?;
        last_ff2_in(&t, ids.len() - 1)
    };
    let mut contrast = Vec::new();
    if stats.options.contrast_weight > 0.0 {
        for p in contrast_prompts(req) {
            contrast.push(run(&p)?);
        }
    }
    let mut dir = x.clone();
    if stats.options.context {
        for c in CONTEXT_PREFIXES {
            let xc = run(&format!("{c}{}", req.prompt))?;
            dir.iter_mut().zip(&xc).for_each(|(d, v)| *d += v);
        }
    }
    let e: Vec<f32> = model
        .tok_embd
        .narrow(0, target_id as usize, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let xx: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let k = stats.key_toward(&dir, &x, &contrast)?;
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

    fn spd(n: usize) -> Vec<f64> {
        // B Bᵀ + I for a deterministic B.
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
        a
    }

    fn opts(contrast_weight: f64) -> WhitenOptions {
        WhitenOptions {
            lambda_ratio: 1e-12,
            last_weight: 0.0,
            contrast_weight,
            context: false,
        }
    }

    #[test]
    fn cholesky_solves() {
        let n = 37;
        let a = spd(n);
        let stats = KeyStats::new(0, n, 1, a.clone(), opts(0.0)).unwrap();
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
    fn woodbury_contrast_matches_dense_solve() {
        let n = 23;
        let a = spd(n);
        let stats = KeyStats::new(0, n, 1, a.clone(), opts(3.0)).unwrap();
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() + 0.5).collect();
        let negs: Vec<Vec<f32>> = (0..4)
            .map(|j| {
                (0..n)
                    .map(|i| ((i * (j + 2)) as f32 * 0.37).cos())
                    .collect()
            })
            .collect();
        let k = stats.key_with_contrast(&x, &negs).unwrap();
        // Dense C' = A + λI + (γ/J) Σ xⱼ xⱼᵀ, γ = 3 · mean diag(A).
        let gamma = 3.0 * stats.scale / negs.len() as f64;
        let mut c = a.clone();
        for i in 0..n {
            c[i * n + i] += stats.lambda;
            for j in 0..n {
                c[i * n + j] += gamma * negs.iter().map(|v| v[i] as f64 * v[j] as f64).sum::<f64>();
            }
        }
        let dense = KeyStats::new(0, n, 1, c, opts(0.0)).unwrap();
        let want = dense.key(&x).unwrap();
        let top = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let err = k
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / top;
        assert!(err < 1e-9, "relative error {err}");
        let kx: f64 = k.iter().zip(&x).map(|(a, b)| a * *b as f64).sum();
        assert!((kx - 1.0).abs() < 1e-10);
    }

    #[test]
    fn contrast_prompts_replace_the_subject() {
        let mut req = EditRequest::new("BBC One, by", "Sega", Some("BBC One")).unwrap();
        let p = contrast_prompts(&req);
        assert_eq!(p.len(), CONTRAST_SUBJECTS.len());
        assert_eq!(p[0], format!("{}, by", CONTRAST_SUBJECTS[0]));
        req.subject = None;
        assert!(contrast_prompts(&req).is_empty());
    }

    #[test]
    fn builtin_corpus_is_sizeable() {
        assert!(builtin_prompts().len() > 700);
    }
}
