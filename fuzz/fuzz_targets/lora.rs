//! LoRA adapter reader on arbitrary bytes, against a small fixed base: parsing, the
//! `looks_like_adapter` test, `lora::validate` and reading every validated pair's factors must
//! fail cleanly or succeed, never panic or over-allocate; what validates must fit the base.
#![no_main]

use backlens::lora;
use backlens::weights::gguf::{GgufFile, Value};
use backlens::write::gguf::{GgufPlan, OutTensor};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// A llama-architecture base with an untied output, one FF2 and one norm (`scripts/fuzz.sh`
/// writes a seed adapter for it).
fn base() -> &'static GgufFile {
    static BASE: OnceLock<GgufFile> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut plan = GgufPlan::default();
        plan.set("general.architecture", Value::String("llama".into()));
        // Row-major shapes: token_embd and output (n_vocab 32, n_embd 8), ffn_down (8, n_ff 16).
        for (name, shape) in [
            ("token_embd.weight", &[32usize, 8][..]),
            ("output.weight", &[32, 8]),
            ("blk.0.ffn_down.weight", &[8, 16]),
            ("blk.0.attn_norm.weight", &[8]),
        ] {
            let n = shape.iter().product();
            plan.tensors
                .push(OutTensor::f32(name, shape, &vec![0.5; n]));
        }
        GgufFile::from_bytes("base.gguf", plan.to_bytes().expect("base plan"))
            .expect("the base parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz-lora.gguf", data.to_vec()) else {
        return;
    };
    let looks = lora::looks_like_adapter(&file);
    let Ok(adapter) = lora::validate(base(), &file) else {
        return;
    };
    assert!(looks, "a valid adapter must look like one");
    for p in &adapter.pairs {
        assert!(p.rank >= 1 && p.scale.is_finite());
        let Ok(f) = p.factors(&file) else {
            continue;
        };
        assert_eq!((f.b.len(), f.a.len()), (f.m * f.r, f.r * f.n));
        let w = &p.base;
        assert_eq!(f.m * f.n, w.n_elements() as usize);
    }
});
