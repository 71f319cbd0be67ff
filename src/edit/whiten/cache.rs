//! [`StatsStore`]: the moments of each layer, in memory and in a cache file per layer.
//!
//! A cache file is untrusted input: anything may have happened to it since it was written (bit
//! rot, truncation, another program, a link put in its place). It is
//!
//! ```text
//! "BLSTATS3"  u64 LE header length  header JSON ({CacheHeader}, sha256)  payload
//! payload = little-endian f32: n (mean), n·n (all-position moment), n·n (last-position moment)
//! sha256  = hex sha256 of the CacheHeader fields (as compact JSON) followed by the payload
//! ```
//!
//! and it is read without following a symbolic link, only when it is a regular file of exactly
//! the length its header and the layer's width imply (checked before anything is allocated),
//! and used only when the header matches the model, layer and prompts, the checksum matches and every value is finite. Any other file counts as absent: the moments are computed
//! again and the file rewritten, through the crate's one atomic writer
//! ([`crate::write::OutputClaim`]), which never writes through a link and skips the write when a
//! concurrent run holds the file's lock. [`StatsStore::moments_source`] says what happened.

use super::{accumulate, KeyStats, Moments, StatsCorpus, WhitenOptions};
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use crate::write::{OutputClaim, OutputKind};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Magic bytes of a cached statistics file (format 3: with the payload checksum).
const MAGIC: &[u8; 8] = b"BLSTATS3";
/// Bytes before the header JSON: the magic and the header length.
const PREFIX: usize = 16;
/// Longest header JSON accepted (the real ones are a few hundred bytes).
const MAX_HEADER: usize = 1 << 16;

/// What a cache file says about its contents (its JSON header, less the checksum).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// The model file the moments were computed on (for people reading the file).
    pub model: String,
    /// [`model_fingerprint`] of that model.
    pub fingerprint: String,
    /// Layer of the FF2 inputs.
    pub layer: usize,
    /// Width of the FF2 input.
    pub n: usize,
    /// [`Moments::count`].
    pub count: usize,
    /// [`Moments::count_last`].
    pub count_last: usize,
    /// The corpus, described ([`StatsCorpus::describe`]).
    pub corpus: String,
    /// Hash of the tokenized prompts.
    pub corpus_sha: String,
}

/// The header as stored: [`CacheHeader`] and the checksum of it and the payload.
#[derive(Serialize, Deserialize)]
struct FileHeader {
    #[serde(flatten)]
    info: CacheHeader,
    sha256: String,
}

/// The checksum: sha256 of `info` as compact JSON, then of the payload blocks `feed` gives it.
fn checksum(info: &CacheHeader, feed: impl FnOnce(&mut Sha256) -> Result<()>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(info).map_err(|e| Error::Invalid(e.to_string()))?);
    feed(&mut h)?;
    Ok(hex(&h.finalize()))
}

/// Bytes of the payload for width `n`, None on overflow.
fn payload_len(n: usize) -> Option<usize> {
    n.checked_mul(n)?
        .checked_mul(2)?
        .checked_add(n)?
        .checked_mul(4)
}

/// Feeds the payload of `m` (little-endian f32) to `sink` in blocks.
fn for_payload(m: &Moments, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    for v in m.mean.iter().chain(&m.all).chain(&m.last) {
        buf.extend_from_slice(&(*v as f32).to_le_bytes());
        if buf.len() == buf.capacity() {
            sink(&buf)?;
            buf.clear();
        }
    }
    sink(&buf)
}

/// The magic, header length and header JSON of a cache file for `m` (the payload follows).
fn encode_prefix(header: &CacheHeader, m: &Moments) -> Result<Vec<u8>> {
    let file_header = FileHeader {
        info: header.clone(),
        sha256: checksum(header, |h| {
            for_payload(m, |b| {
                h.update(b);
                Ok(())
            })
        })?,
    };
    let json = serde_json::to_vec(&file_header).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut bytes = Vec::with_capacity(PREFIX + json.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// A whole cache file for `m` described by `header` (its `n`, `count` and `count_last` should be
/// those of `m`), as [`StatsStore`] writes it.
pub fn encode_cache(header: &CacheHeader, m: &Moments) -> Result<Vec<u8>> {
    let mut bytes = encode_prefix(header, m)?;
    for_payload(m, |b| {
        bytes.extend_from_slice(b);
        Ok(())
    })?;
    Ok(bytes)
}

/// Parses a whole cache file for width `expected_n`: None unless the magic, the length, the
/// header, the payload checksum and every value are right. Checks the length before allocating
/// anything. The reader of [`StatsStore`], for any bytes (fuzzed).
pub fn parse_cache(bytes: &[u8], expected_n: usize) -> Option<(CacheHeader, Moments)> {
    parse(bytes, expected_n).ok()
}

/// The header length a cache file's first [`PREFIX`] bytes give, if they are a cache file's.
fn header_len(prefix: &[u8]) -> std::result::Result<usize, &'static str> {
    if prefix.len() < PREFIX || &prefix[..8] != MAGIC {
        return Err("not a statistics cache file of this version (bad magic)");
    }
    let hlen = u64::from_le_bytes(prefix[8..PREFIX].try_into().expect("8 bytes"));
    match usize::try_from(hlen) {
        Ok(h) if h <= MAX_HEADER => Ok(h),
        _ => Err("implausible header length"),
    }
}

/// The length of a cache file with a header of `hlen` bytes for width `n`.
fn file_len(hlen: usize, n: usize) -> std::result::Result<usize, &'static str> {
    payload_len(n)
        .and_then(|p| p.checked_add(PREFIX + hlen))
        .ok_or("width too large")
}

fn parse(bytes: &[u8], n: usize) -> std::result::Result<(CacheHeader, Moments), &'static str> {
    let hlen = header_len(bytes)?;
    if bytes.len() != file_len(hlen, n)? {
        return Err("wrong length for its header and the layer's width");
    }
    let header: FileHeader =
        serde_json::from_slice(&bytes[PREFIX..PREFIX + hlen]).map_err(|_| "malformed header")?;
    let info = header.info;
    if info.n != n {
        return Err("header of another width");
    }
    if info.count == 0 || info.count_last == 0 || info.count_last > info.count {
        return Err("implausible counts in the header");
    }
    let payload = &bytes[PREFIX + hlen..];
    let sum = checksum(&info, |h| {
        h.update(payload);
        Ok(())
    });
    if sum.ok() != Some(header.sha256) {
        return Err("checksum mismatch (corrupt header or data)");
    }
    let mut values = payload
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64);
    let mut take = |k: usize| -> std::result::Result<Vec<f64>, &'static str> {
        let v: Vec<f64> = values.by_ref().take(k).collect();
        match v.iter().all(|x| x.is_finite()) {
            true => Ok(v),
            false => Err("non-finite values"),
        }
    };
    let (mean, all, last) = (take(n)?, take(n * n)?, take(n * n)?);
    let m = Moments {
        count: info.count,
        count_last: info.count_last,
        mean,
        all,
        last,
    };
    Ok((info, m))
}

/// The bytes of the cache file at `path` for width `n`: None when there is no file; Err(why)
/// when something is there that is not a plausible cache file. Never follows a symbolic link,
/// never blocks on a FIFO, never reads more than the expected length.
fn read_cache_bytes(path: &Path, n: usize) -> std::result::Result<Option<Vec<u8>>, String> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("is a symbolic link; not read".into())
        }
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file; not read".into());
    }
    let mut prefix = [0u8; PREFIX];
    (&file)
        .read_exact(&mut prefix)
        .map_err(|_| "shorter than a cache header".to_string())?;
    let expected = file_len(header_len(&prefix)?, n)?;
    if meta.len() != expected as u64 {
        return Err(format!(
            "is {} bytes, its header and the layer's width imply {expected}",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(expected);
    bytes.extend_from_slice(&prefix);
    (&file)
        .take((expected - PREFIX) as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() != expected {
        return Err("changed length while being read".into());
    }
    Ok(Some(bytes))
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
    Ok(hex(&h.finalize()[..8]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The default cache folder: `$HOME/.cache/backlens/stats`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/backlens/stats"))
}

/// Where the moments of a layer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MomentsSource {
    /// Read from its cache file.
    Cache,
    /// Computed over the prompts.
    Computed {
        /// Why an existing cache file was not used (the file and the reason); None when there
        /// was none (or no cache folder).
        refused: Option<String>,
        /// Whether the cache file was (re)written. Not when there is no cache folder, the path
        /// is a link or anything else the output policy refuses, another run is writing the same
        /// file, or the write failed: a missing cache only costs a recomputation next time.
        written: bool,
    },
}

/// The bits of key options, to tell factorizations apart.
type OptionsKey = [u64; 4];

fn options_key(o: &WhitenOptions) -> OptionsKey {
    [
        o.lambda_ratio.to_bits(),
        o.last_weight.to_bits(),
        o.contrast_weight.to_bits(),
        u64::from(o.context),
    ]
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
    loaded: Mutex<HashMap<(usize, OptionsKey), Arc<KeyStats>>>,
    sources: Mutex<HashMap<usize, MomentsSource>>,
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
            corpus_sha: hex(&h.finalize()[..8]),
            prompts,
            corpus: corpus.to_string(),
            model_path: model_path.to_path_buf(),
            fingerprint: model_fingerprint(model_path)?,
            options,
            cache_dir,
            loaded: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
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

    /// Where the moments of `layer` last came from (None before they were first needed).
    pub fn moments_source(&self, layer: usize) -> Option<MomentsSource> {
        self.sources
            .lock()
            .expect("stats lock")
            .get(&layer)
            .cloned()
    }

    /// The raw moments of `layer`: its cache file when valid, else computed (and cached).
    pub fn moments(&self, layer: usize) -> Result<Moments> {
        let n_layer = self.model.blocks.len();
        if layer >= n_layer {
            return Err(Error::Invalid(format!(
                "statistics for layer {layer}: the model has layers 0..{}",
                n_layer.saturating_sub(1)
            )));
        }
        let mut refused = None;
        if let Some(path) = self.cache_path(layer) {
            match self.read_cache(&path, layer) {
                Ok(Some(m)) => {
                    self.set_source(layer, MomentsSource::Cache);
                    return Ok(m);
                }
                Ok(None) => {}
                Err(why) => refused = Some(format!("{}: {why}", path.display())),
            }
        }
        self.compute(layer, refused)
    }

    /// The factored statistics of `layer` (memory, then disk cache, then computed).
    pub fn get(&self, layer: usize) -> Result<Arc<KeyStats>> {
        self.get_with(layer, self.options)
    }

    /// [`Self::get`] under other key options (the same moments, factored again once per
    /// options: ROME's C has no last-position term).
    pub fn get_with(&self, layer: usize, options: WhitenOptions) -> Result<Arc<KeyStats>> {
        let key = (layer, options_key(&options));
        if let Some(s) = self.loaded.lock().expect("stats lock").get(&key) {
            return Ok(s.clone());
        }
        let m = self.moments(layer)?;
        let stats = match KeyStats::from_moments(layer, &m, options) {
            // A checksummed file of moments that do not factor was not written from these
            // prompts by backlens: compute them again instead of failing on every run.
            Err(e) if self.moments_source(layer) == Some(MomentsSource::Cache) => {
                let path = self.cache_path(layer).expect("read from a cache file");
                let m = self.compute(layer, Some(format!("{}: {e}", path.display())))?;
                KeyStats::from_moments(layer, &m, options)
            }
            r => r,
        }
        .map_err(|e| {
            Error::Invalid(format!(
                "{e} (moments computed over {} prompts of {})",
                self.prompts.len(),
                self.corpus
            ))
        })?;
        let stats = Arc::new(stats);
        self.loaded
            .lock()
            .expect("stats lock")
            .insert(key, stats.clone());
        Ok(stats)
    }

    fn set_source(&self, layer: usize, source: MomentsSource) {
        self.sources
            .lock()
            .expect("stats lock")
            .insert(layer, source);
    }

    /// Computes the moments of `layer` and (re)writes its cache file.
    fn compute(&self, layer: usize, refused: Option<String>) -> Result<Moments> {
        let m = accumulate(&self.model, &self.prompts, layer)?;
        let written = self
            .cache_path(layer)
            .is_some_and(|p| self.write_cache(&p, layer, &m).is_ok());
        self.set_source(layer, MomentsSource::Computed { refused, written });
        Ok(m)
    }

    fn header(&self, layer: usize, m: &Moments) -> CacheHeader {
        CacheHeader {
            model: self.model_path.display().to_string(),
            fingerprint: self.fingerprint.clone(),
            layer,
            n: m.mean.len(),
            count: m.count,
            count_last: m.count_last,
            corpus: self.corpus.clone(),
            corpus_sha: self.corpus_sha.clone(),
        }
    }

    /// The moments in the cache file of `layer`: None when there is none, Err(why) when the file
    /// there is not a valid one for this model, layer and corpus.
    fn read_cache(
        &self,
        path: &Path,
        layer: usize,
    ) -> std::result::Result<Option<Moments>, String> {
        let n = self.model.hp.n_ff;
        let Some(bytes) = read_cache_bytes(path, n)? else {
            return Ok(None);
        };
        let (header, m) = parse(&bytes, n)?;
        if header.layer != layer
            || header.fingerprint != self.fingerprint
            || header.corpus_sha != self.corpus_sha
        {
            return Err("holds the statistics of another model, layer or corpus".into());
        }
        Ok(Some(m))
    }

    /// Writes the cache file of `layer` atomically (replacing a regular file only).
    fn write_cache(&self, path: &Path, layer: usize, m: &Moments) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let prefix = encode_prefix(&self.header(layer, m), m)?;
        let mut out = OutputClaim::new(path, OutputKind::File, &[], true)?.stage_file()?;
        out.write_all(&prefix)?;
        for_payload(m, |b| out.write_all(b))?;
        out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> (CacheHeader, Moments) {
        let v = |k: usize, s: f64| -> Vec<f64> { (0..k).map(|i| (i as f64 * s).sin()).collect() };
        let m = Moments {
            count: 9,
            count_last: 3,
            mean: v(n, 0.3),
            all: v(n * n, 0.7),
            last: v(n * n, 1.1),
        };
        let h = CacheHeader {
            model: "m.gguf".into(),
            fingerprint: "f".into(),
            layer: 1,
            n,
            count: 9,
            count_last: 3,
            corpus: "c".into(),
            corpus_sha: "s".into(),
        };
        (h, m)
    }

    fn rounded(m: &Moments) -> Moments {
        let r = |v: &Vec<f64>| v.iter().map(|x| *x as f32 as f64).collect();
        Moments {
            mean: r(&m.mean),
            all: r(&m.all),
            last: r(&m.last),
            ..m.clone()
        }
    }

    #[test]
    fn cache_bytes_round_trip_and_any_damage_is_refused() {
        let n = 5;
        let (h, m) = sample(n);
        let bytes = encode_cache(&h, &m).unwrap();
        let hlen = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 16 + hlen + 4 * (n + 2 * n * n));
        let (h2, m2) = parse_cache(&bytes, n).unwrap();
        assert_eq!((h2, m2), (h.clone(), rounded(&m)));
        assert!(parse_cache(&bytes, n + 1).is_none(), "another width");
        assert!(
            parse_cache(&bytes[..bytes.len() - 1], n).is_none(),
            "truncated"
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse_cache(&longer, n).is_none(), "trailing byte");
        // Every single flipped bit anywhere is caught (magic, length, header or payload).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(
                parse_cache(&b, n).is_none(),
                "bit flip at byte {i} accepted"
            );
        }
        let mut zeroed = bytes.clone();
        zeroed[16 + hlen..].iter_mut().for_each(|b| *b = 0);
        assert!(parse_cache(&zeroed, n).is_none(), "zeroed payload");
        // Non-finite values are refused even under a matching checksum.
        let mut bad = m.clone();
        bad.all[3] = f64::NAN;
        assert!(parse_cache(&encode_cache(&h, &bad).unwrap(), n).is_none());
        // Implausible counts.
        let mut hc = h.clone();
        hc.count_last = 10;
        assert!(parse_cache(&encode_cache(&hc, &m).unwrap(), n).is_none());
        // A huge width never allocates: the length check comes first.
        assert!(parse_cache(&bytes, usize::MAX / 2).is_none());
    }

    #[test]
    fn reading_refuses_links_and_special_files_and_wrong_lengths() {
        let dir = std::env::temp_dir().join(format!("backlens-cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let n = 3;
        let (h, m) = sample(n);
        let good = dir.join("good.bin");
        std::fs::write(&good, encode_cache(&h, &m).unwrap()).unwrap();
        assert!(read_cache_bytes(&good, n).unwrap().is_some());
        assert_eq!(read_cache_bytes(&dir.join("absent.bin"), n), Ok(None));
        let link = dir.join("link.bin");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let err = read_cache_bytes(&link, n).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        let err = read_cache_bytes(Path::new("/dev/zero"), n).unwrap_err();
        assert!(err.contains("regular file"), "{err}");
        let err = read_cache_bytes(&good, n + 1).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
