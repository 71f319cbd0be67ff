//! Perplexity through llama.cpp on the shipped general English text: finite and in the range
//! of a small instruct model on a 19th-century novel, and exactly unchanged by an adapter whose
//! change is zero.

mod common;

use backlens::arch::Arch;
use backlens::edit::Delta;
use backlens::patch;
use backlens::perplexity::{self, DEFAULT_TOKENS, GENERAL_TEXT};
use backlens::runtime::LlamaRuntime;
use backlens::write::{OutputClaim, OutputKind};

#[test]
fn smollm2_perplexity_on_the_shipped_text_is_sane_and_a_zero_adapter_changes_nothing() {
    assert!(
        GENERAL_TEXT.split("\n\n").count() >= 300,
        "a few hundred paragraphs"
    );
    let path = common::smollm2();
    let mut rt = LlamaRuntime::load(&path).unwrap();
    let tokens = perplexity::text_tokens(&rt, GENERAL_TEXT, Some(DEFAULT_TOKENS)).unwrap();
    assert_eq!(tokens.len(), DEFAULT_TOKENS);
    let base = perplexity::perplexity(&mut rt.session().unwrap(), &tokens).unwrap();
    println!(
        "SmolLM2 perplexity on {} tokens: {:.3}",
        base.tokens, base.perplexity
    );
    assert_eq!(base.chunks, DEFAULT_TOKENS / 512);
    assert_eq!(base.tokens, DEFAULT_TOKENS - base.chunks);
    assert!(
        base.perplexity > 5.0 && base.perplexity < 200.0,
        "{}",
        base.perplexity
    );

    // An adapter on FF2 of layer 22 whose output side is zero: llama.cpp adds B(Ax) = 0.
    let (n_ff, n_embd) = (1536, 576);
    let zero = Delta {
        tensor: backlens::arch::ff2_weight(22),
        layer: 22,
        out_vecs: vec![vec![0.0; n_embd]],
        in_vecs: vec![vec![0.5; n_ff]],
    };
    let dir = common::temp_dir("ppl");
    let claim = OutputClaim::new(&dir.join("zero.gguf"), OutputKind::File, &[], false).unwrap();
    let staged = patch::stage_adapter(Arch::Llama.name(), &[zero], claim).unwrap();
    let mut adapter = rt.load_lora(staged.path()).unwrap();
    let mut s = rt.session().unwrap();
    s.set_lora(&mut adapter, 1.0).unwrap();
    let with = perplexity::perplexity(&mut s, &tokens).unwrap();
    assert_eq!(with, base, "a zero adapter changed the perplexity");
}
