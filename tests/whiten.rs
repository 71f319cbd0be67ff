//! Whitened FPS (`shift-whitened`): ΔW·x = lr·‖x‖²·e at the edit prompt, less interference than
//! plain FPS on unrelated prompts at equal effect; the statistics cache round trips bit for bit,
//! and a damaged, linked or busy cache file never changes or fails an edit.

mod common;

use common::ff2_in_last;

use backlens::arch::Arch;
use backlens::delta::Delta;
use backlens::edit::whiten::{
    builtin_prompts, encode_cache, parse_cache, Moments, MomentsSource, StatsStore, WhitenOptions,
};
use backlens::edit::{self, EditContext, EditRequest, EditSettings, Method};
use backlens::model::Transformer;
use backlens::source::ModelSource;
use backlens::tokenizer::Tokenizer;
use backlens::write::{OutputClaim, OutputKind};
use candle_core::DType;
use std::path::{Path, PathBuf};

const LAYER: usize = 22;
const LR: f64 = 0.24;

/// ΔW·v in f64 from the dense delta (out, in).
fn apply_dense(dense: &[f32], v: &[f32]) -> Vec<f64> {
    dense
        .chunks_exact(v.len())
        .map(|row| row.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum())
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// Every 8th built-in prompt: ~100 prompts, enough for the test and quick to run.
fn test_prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    builtin_prompts()
        .iter()
        .step_by(8)
        .map(|p| tok.encode_prompt(p).unwrap())
        .collect()
}

fn settings(method: Method) -> EditSettings {
    EditSettings {
        method,
        layer: LAYER,
        lr: LR,
    }
}

#[test]
fn whitened_edit_is_exact_at_x_and_quieter_elsewhere_on_smollm2() {
    let path = common::smollm2();
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::from_source(&src).unwrap();
    let model = Transformer::load(&src, DType::F32).unwrap();
    let store = StatsStore::from_tokens(
        &model,
        test_prompts(&tok),
        &path,
        "test",
        WhitenOptions::default(),
        None,
    )
    .unwrap();
    let ctx = EditContext {
        stats: Some(&store),
        ..EditContext::default()
    };
    let records = EditRequest::load_file(&common::counterfact("counterfact-val.json")).unwrap();
    let (mut plain_loc, mut white_loc) = (0.0, 0.0);
    let mut edited = 0;
    for r in records.iter().take(6) {
        let white =
            edit::compute_with(&model, &tok, r, &settings(Method::ShiftWhitened), &ctx).unwrap();
        let plain = edit::compute(&model, &tok, r, &settings(Method::Shift)).unwrap();
        let (Some(dw), Some(dp)) = (white.delta, plain.delta) else {
            continue;
        };
        edited += 1;
        let x = ff2_in_last(&model, &tok, &r.prompt, LAYER);
        let xx: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let e: Vec<f32> = model
            .tok_embd
            .get(white.target_id as usize)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f64> = e.iter().map(|&v| LR * xx * v as f64).collect();
        let (dense_w, dense_p) = (dw.dense(), dp.dense());
        for (name, dense) in [("whitened", &dense_w), ("plain", &dense_p)] {
            let got = apply_dense(dense, &x);
            let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let err = norm(&diff) / norm(&want);
            assert!(
                err <= 1e-4,
                "{name} {:?}: ‖ΔW·x − s·e‖/‖s·e‖ = {err:.2e}",
                r.case_id
            );
        }
        let loc = ff2_in_last(&model, &tok, r.locality_prompt.as_deref().unwrap(), LAYER);
        let (w, p) = (
            norm(&apply_dense(&dense_w, &loc)),
            norm(&apply_dense(&dense_p, &loc)),
        );
        println!("{:?}: ‖ΔW·x'‖ whitened {w:.3}, plain {p:.3}", r.case_id);
        white_loc += w;
        plain_loc += p;
    }
    assert!(edited >= 4, "only {edited} of 6 records edited");
    println!("locality ‖ΔW·x'‖ summed: whitened {white_loc:.3}, plain {plain_loc:.3}");
    assert!(
        white_loc < 0.6 * plain_loc,
        "whitened {white_loc} vs plain {plain_loc}"
    );
}

/// The tiny Llama fixture with a subject-naming request edited at layer 2 (contrast included).
struct Tiny {
    model: Transformer,
    tok: Tokenizer,
    gguf: PathBuf,
    prompts: Vec<Vec<u32>>,
    req: EditRequest,
    settings: EditSettings,
}

const TINY_LAYER: usize = 2;

impl Tiny {
    fn new() -> Tiny {
        let fx = common::tiny(Arch::Llama);
        let src = ModelSource::open(&fx.gguf).unwrap();
        let tok = Tokenizer::from_source(&src).unwrap();
        let model = Transformer::load(&src, DType::F32).unwrap();
        Tiny {
            prompts: test_prompts(&tok),
            model,
            tok,
            gguf: fx.gguf.clone(),
            req: EditRequest::new("Lionel Messi plays for", "Paris", Some("Lionel Messi")).unwrap(),
            settings: EditSettings {
                method: Method::ShiftWhitened,
                layer: TINY_LAYER,
                lr: 0.24,
            },
        }
    }

    fn store(&self, cache: Option<&Path>) -> StatsStore {
        StatsStore::from_tokens(
            &self.model,
            self.prompts.clone(),
            &self.gguf,
            "t",
            WhitenOptions::default(),
            cache.map(Path::to_path_buf),
        )
        .unwrap()
    }

    fn delta(&self, store: &StatsStore) -> Delta {
        let ctx = EditContext {
            stats: Some(store),
            ..EditContext::default()
        };
        edit::compute_with(&self.model, &self.tok, &self.req, &self.settings, &ctx)
            .unwrap()
            .delta
            .expect("edited")
    }

    /// The delta with statistics computed afresh, no cache involved.
    fn fresh_delta(&self) -> Delta {
        let store = self.store(None);
        let d = self.delta(&store);
        assert_eq!(store.moments_source(TINY_LAYER), Some(computed(false)));
        d
    }

    /// The expected length of a cache file with `hlen` header bytes.
    fn file_len(&self, hlen: usize) -> u64 {
        let n = self.model.hp.n_ff;
        (16 + hlen + 4 * (n + 2 * n * n)) as u64
    }
}

fn computed(written: bool) -> MomentsSource {
    MomentsSource::Computed {
        refused: None,
        written,
    }
}

/// The delta's values as bits: equal means bit-identical.
fn bits(d: &Delta) -> Vec<u32> {
    d.in_vecs
        .iter()
        .chain(&d.out_vecs)
        .flatten()
        .map(|v| v.to_bits())
        .collect()
}

/// The header length of a cache file.
fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize
}

/// Asserts that `file` is a valid cache file for the tiny model and that a new store takes the
/// moments from it, giving `want`.
fn assert_valid_cache(t: &Tiny, cache: &Path, file: &Path, want: &Delta) {
    let meta = std::fs::symlink_metadata(file).unwrap();
    assert!(
        meta.file_type().is_file(),
        "{} is not a regular file",
        file.display()
    );
    let bytes = std::fs::read(file).unwrap();
    assert_eq!(
        meta.len(),
        t.file_len(header_len(&bytes)),
        "cache file length"
    );
    assert!(
        parse_cache(&bytes, t.model.hp.n_ff).is_some(),
        "cache file does not parse"
    );
    let store = t.store(Some(cache));
    assert_eq!(bits(&t.delta(&store)), bits(want));
    assert_eq!(store.moments_source(TINY_LAYER), Some(MomentsSource::Cache));
}

#[test]
fn whitened_needs_stats() {
    let t = Tiny::new();
    let err = edit::compute(&t.model, &t.tok, &t.req, &t.settings)
        .unwrap_err()
        .to_string();
    assert!(err.contains("statistics"), "{err}");
}

#[test]
fn cache_round_trips_bit_for_bit_and_is_read_back() {
    let t = Tiny::new();
    let fresh = t.fresh_delta();
    let cache = common::temp_dir("stats-roundtrip");
    let first = t.store(Some(&cache));
    let d1 = t.delta(&first);
    assert_eq!(first.moments_source(TINY_LAYER), Some(computed(true)));
    assert_eq!(
        bits(&d1),
        bits(&fresh),
        "caching changed the computed delta"
    );
    let file = first.cache_path(TINY_LAYER).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(&bytes[..8], b"BLSTATS3");
    let n = t.model.hp.n_ff;
    assert_eq!(bytes.len() as u64, t.file_len(header_len(&bytes)));
    // The file holds the moments themselves (f32), with a header describing them.
    let (header, m) = parse_cache(&bytes, n).unwrap();
    assert_eq!((header.layer, header.n), (TINY_LAYER, n));
    assert_eq!(m, first.moments(TINY_LAYER).unwrap());
    // A second store reads the file instead of computing, and gets the same statistics.
    let second = t.store(Some(&cache));
    let stats2 = second.get(TINY_LAYER).unwrap();
    assert_eq!(
        second.moments_source(TINY_LAYER),
        Some(MomentsSource::Cache)
    );
    assert!(
        *stats2 == *first.get(TINY_LAYER).unwrap(),
        "KeyStats differ"
    );
    assert_eq!(bits(&t.delta(&second)), bits(&fresh));
    // No leftovers beside it: the temporary file and the lock are gone.
    let names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// Writes a valid cache, damages it with `damage`, and checks that the edit is still the fresh
/// one, that the damaged file was refused and that a valid file replaced it.
fn check_damage(tag: &str, damage: impl FnOnce(&Path, &mut Vec<u8>)) {
    let t = Tiny::new();
    let fresh = t.fresh_delta();
    let cache = common::temp_dir(tag);
    let writer = t.store(Some(&cache));
    writer.get(TINY_LAYER).unwrap();
    let file = writer.cache_path(TINY_LAYER).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    damage(&file, &mut bytes);
    let store = t.store(Some(&cache));
    assert_eq!(
        bits(&t.delta(&store)),
        bits(&fresh),
        "{tag}: the damaged cache changed the edit"
    );
    match store.moments_source(TINY_LAYER) {
        Some(MomentsSource::Computed {
            refused: Some(why),
            written: true,
        }) => assert!(why.contains(&*file.to_string_lossy()), "{tag}: {why}"),
        other => panic!("{tag}: the damaged cache was not refused and rewritten: {other:?}"),
    }
    assert_valid_cache(&t, &cache, &file, &fresh);
}

#[test]
fn zeroed_cache_data_under_an_intact_header_is_rebuilt() {
    check_damage("stats-zeroed", |file, bytes| {
        let start = 16 + header_len(bytes);
        bytes[start..].iter_mut().for_each(|b| *b = 0);
        std::fs::write(file, &bytes).unwrap();
    });
}

#[test]
fn one_flipped_payload_byte_is_rebuilt() {
    check_damage("stats-bitrot", |file, bytes| {
        // The lowest mantissa bit of one value of the all-position moment: still finite, still
        // plausible, only the checksum can tell.
        let n = 128;
        let at = 16 + header_len(bytes) + 4 * (n + 5 * n + 7);
        bytes[at] ^= 1;
        let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert!(v.is_finite());
        std::fs::write(file, &bytes).unwrap();
    });
}

#[test]
fn truncated_or_outdated_cache_is_rebuilt() {
    check_damage("stats-truncated", |file, bytes| {
        std::fs::write(file, &bytes[..bytes.len() - 4]).unwrap();
    });
    check_damage("stats-outdated", |file, bytes| {
        bytes[..8].copy_from_slice(b"BLSTATS2");
        std::fs::write(file, &bytes).unwrap();
    });
}

#[test]
fn checksummed_moments_that_do_not_factor_are_rebuilt() {
    // A well-formed file with a correct checksum whose moments are all zero (C = 0 is not
    // positive definite): not the failure on every run it used to be.
    check_damage("stats-singular", |file, bytes| {
        let (header, m) = parse_cache(bytes, 128).unwrap();
        let zero = Moments {
            mean: vec![0.0; m.mean.len()],
            all: vec![0.0; m.all.len()],
            last: vec![0.0; m.last.len()],
            ..m
        };
        std::fs::write(file, encode_cache(&header, &zero).unwrap()).unwrap();
    });
}

#[test]
fn cache_path_linked_to_dev_zero_is_neither_read_nor_written_through() {
    let t = Tiny::new();
    let fresh = t.fresh_delta();
    let cache = common::temp_dir("stats-devzero");
    let file = t.store(Some(&cache)).cache_path(TINY_LAYER).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &file).unwrap();
    let store = t.store(Some(&cache));
    assert_eq!(bits(&t.delta(&store)), bits(&fresh));
    match store.moments_source(TINY_LAYER) {
        Some(MomentsSource::Computed {
            refused: Some(why),
            written: false,
        }) => assert!(why.contains("symbolic link"), "{why}"),
        other => panic!("the link was followed or written through: {other:?}"),
    }
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    assert_eq!(std::fs::read_link(&file).unwrap(), Path::new("/dev/zero"));
}

#[test]
fn cache_path_linked_to_a_valid_cache_is_not_followed() {
    let t = Tiny::new();
    let fresh = t.fresh_delta();
    let cache = common::temp_dir("stats-link");
    let writer = t.store(Some(&cache));
    writer.get(TINY_LAYER).unwrap();
    let file = writer.cache_path(TINY_LAYER).unwrap();
    // Move the valid file elsewhere and link to it: a reader that follows links would use it.
    let elsewhere = common::temp_dir("stats-link-target").join("real.bin");
    std::fs::rename(&file, &elsewhere).unwrap();
    let before = std::fs::read(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    let store = t.store(Some(&cache));
    assert_eq!(bits(&t.delta(&store)), bits(&fresh));
    assert!(
        matches!(
            store.moments_source(TINY_LAYER),
            Some(MomentsSource::Computed {
                refused: Some(_),
                written: false
            })
        ),
        "{:?}",
        store.moments_source(TINY_LAYER)
    );
    assert!(std::fs::symlink_metadata(&file)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(&elsewhere).unwrap(),
        before,
        "written through the link"
    );
}

#[test]
fn busy_cache_lock_skips_the_write_and_still_edits() {
    let t = Tiny::new();
    let fresh = t.fresh_delta();
    let cache = common::temp_dir("stats-busy");
    let file = t.store(Some(&cache)).cache_path(TINY_LAYER).unwrap();
    // Another run holds the file's lock (it is writing the same statistics).
    let claim = OutputClaim::new(&file, OutputKind::File, &[], true).unwrap();
    let store = t.store(Some(&cache));
    assert_eq!(bits(&t.delta(&store)), bits(&fresh));
    assert_eq!(store.moments_source(TINY_LAYER), Some(computed(false)));
    assert!(!file.exists());
    drop(claim);
    // Once the lock is free, the next run writes it.
    let store = t.store(Some(&cache));
    t.delta(&store);
    assert_eq!(store.moments_source(TINY_LAYER), Some(computed(true)));
    assert_valid_cache(&t, &cache, &file, &fresh);
}
